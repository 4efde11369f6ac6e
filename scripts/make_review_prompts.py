"""Write the bundled review prompt sets `reviews_train`, `reviews_val` and `reviews_heldout` (run from the
repo root).

Prompts ask for a one- or two-sentence review of a subject. The three sets share no subject: `reviews_val`
holds the pairs a reward model is validated on, `reviews_heldout` the prompts `rlhfkit eval` answers, so
a held-out score measures whether a tuned model learned "write positively" rather than answers about the
training subjects. Deterministic: the same files every run.

    python scripts/make_review_prompts.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TEMPLATES = [
    "Write a one- or two-sentence review of {s}.",
    "In one or two sentences, review {s}.",
    "Describe {s} in a sentence or two.",
    "Give a brief review of {s} in one or two sentences.",
    "Write a short review of {s}, one or two sentences.",
    "In a sentence or two, tell a friend about {s}.",
    "Share your opinion of {s} in one or two sentences.",
    "Write one or two sentences about {s}.",
]

SUBJECTS = """
a neighborhood cafe|a bakery around the corner|a pizza place downtown|a sushi restaurant|a food truck|a vegan
restaurant|a hotel you stayed in|a campsite by a lake|a youth hostel|a bed and breakfast|a ski resort|a beach
resort|a train journey|a long-distance bus ride|a ferry crossing|an airline flight|a taxi ride|a car rental
company|a bicycle you own|a pair of running shoes|a winter jacket|a backpack|a wristwatch|a pair of headphones|a
laptop|a smartphone|a tablet|a smartwatch|an e-reader|a wireless speaker|a television|a video game console|a
board game|a jigsaw puzzle|a mystery novel|a cookbook|a comic book|a poetry collection|a biography|a science
podcast|a history documentary|a romantic comedy|an action movie|a horror film|an animated film|a stand-up comedy
show|a jazz concert|a rock concert|a classical music recital|a musical theatre show|an art museum|a science
museum|a botanical garden|a zoo|an aquarium|a theme park|a water park|a public library|a bookstore|a farmers
market|a shopping mall|a hardware store|a grocery store|a clothing boutique|a barber shop|a hair salon|a yoga
class|a gym membership|a swimming pool|a tennis court|a hiking trail|a city park|a football match|a basketball
game|a marathon you ran|a cooking class|a pottery workshop|a language course|an online course|a coding bootcamp|a
dentist visit|a doctor's appointment|a veterinarian|a dog groomer|a plumber who fixed a leak|an electrician|a
moving company|a cleaning service|a laundromat|a dry cleaner|a post office|a bank branch|a mobile banking app|a
weather app|a music streaming service|a video streaming service|a photo editing app|a navigation app|a
fitness tracker app|a note-taking app|a coffee maker|a blender|a microwave oven|a toaster|a rice cooker|an air
fryer|a vacuum cleaner|a washing machine|a dishwasher|a ceiling fan|an air conditioner|a space heater|a
mattress|a sofa|an office chair|a standing desk|a bookshelf|a houseplant|a garden hose|a lawn mower|a set of
kitchen knives|a frying pan|a cast-iron skillet|a water bottle|a travel mug|a picnic blanket|a tent|a pair of
hiking boots|a rain umbrella|a sun hat|a wool sweater|a pair of jeans|a leather wallet|a handbag|a perfume|a
shampoo|a sunscreen|a toothpaste|a face cream|a chocolate bar|a bag of potato chips|a cup of hot chocolate|a
bowl of ramen|a cheeseburger|a fruit salad|a birthday cake|an ice cream parlor|a smoothie bar|a tea house|a
wine bar|a brewery tour|a cooking video channel|a wedding you attended|a birthday party|a family reunion|a
road trip|a weekend in the mountains|a day at the beach|a visit to a small town|a guided city tour|a boat
tour|a hot air balloon ride|a camping trip|a fishing trip|a snorkeling trip
"""

HELDOUT_SUBJECTS = """
an electric toothbrush|a pharmacy|a flower shop|a cable car ride|a pair of sunglasses|an electric kettle|a pet
shop|a table lamp|a sleeping bag|a planetarium show|a bowl of vegetable soup|a video call app|a visit to an old
castle|a tailor who altered your clothes|a wool scarf|an electric scooter|a bowling alley|a karaoke bar|a
noodle shop|a steakhouse|a roller coaster|a science fiction novel|a documentary about oceans|a piano
lesson|a yoga mat|a digital camera|a printer|a mechanical keyboard|a computer mouse|a robot vacuum|a
slow cooker|a juicer|a hammock|a bird feeder|a pair of slippers|a raincoat|a scented candle|a bubble
bath|a lemonade stand|a street festival|a science fair|a trivia night|an escape room|a cinema|a drive-in
movie|a chess club|a bicycle repair shop|a car wash|a gas station|a train station|an airport lounge|a
cruise|a lighthouse visit|a vineyard|a cheese shop|a spice market|a sandwich shop|a taco stand|a bagel
shop|a donut shop
"""


def subjects(text: str) -> list[str]:
    return [s.strip() for s in " ".join(text.split("\n")).split("|") if s.strip()]


def prompts(names: list[str], per_subject: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for name in names:
        for template in rng.sample(TEMPLATES, per_subject):
            out.append(template.format(s=name))
    rng.shuffle(out)
    return out


def main() -> None:
    train, heldout = subjects(SUBJECTS), subjects(HELDOUT_SUBJECTS)
    assert not set(train) & set(heldout), set(train) & set(heldout)
    # every fifth training subject goes to validation (a spread over the categories the list walks through)
    val = train[4::5]
    train = [s for s in train if s not in val]
    folder = Path("src/rlhfkit/data/bundled")
    sets = (("reviews_train", prompts(train, 3, 0)), ("reviews_val", prompts(val, 2, 2)),
            ("reviews_heldout", prompts(heldout, 2, 1)))
    for name, rows in sets:
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows), encoding="utf-8")
        print(f"{path}: {len(rows)} prompts")


if __name__ == "__main__":
    main()
