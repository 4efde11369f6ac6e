"""rlhfkit.feedback: annotators (built-in, noisy, plug-in), candidate sampling, labeling, writing."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rlhfkit.data.formats import validate_rows
from rlhfkit.data.sources import bundled_dataset_path, load_rows
from rlhfkit.errors import ConfigError, DataError, RlhfkitError
from rlhfkit.feedback import (
    Candidates,
    ScoreAnnotator,
    generate_pairs,
    label_pairs,
    length_scores,
    load_annotator,
    sentiment_scores,
    simulate_feedback,
    write_preferences,
)

POSITIVE = "The cafe was lovely, the staff were friendly and the coffee was excellent."
NEGATIVE = "The cafe was dirty, the staff were rude and the coffee was awful."
NEUTRAL = "The cafe is on the corner of the street."


# --------------------------------------------------------------------------------------------------
# Built-in scorers and annotators


def test_vader_scores_positive_above_neutral_above_negative():
    pos, neu, neg = sentiment_scores(["p"] * 3, [POSITIVE, NEUTRAL, NEGATIVE])
    assert pos > 0.5 and neg < -0.5 and neu == 0.0
    assert all(-1.0 <= s <= 1.0 for s in (pos, neu, neg))
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        sentiment_scores(["a", "b"], ["x"])


def test_length_scores_count_words_and_higher_is_better():
    assert length_scores(["p", "p"], ["one two three", "one"]) == [-3.0, -1.0]
    assert length_scores(["p", "p"], ["one two three", "one"], prefer="longer") == [3.0, 1.0]


def test_sentiment_annotator_prefers_more_positive_and_ties():
    judge = load_annotator("sentiment")
    assert judge.name == "sentiment"
    assert judge.prefer("p", POSITIVE, NEGATIVE) == 0
    assert judge.prefer("p", NEGATIVE, POSITIVE) == 1
    assert judge.prefer("p", NEUTRAL, "A train arrives at noon.") == -1  # both 0.0: no preference


def test_min_gap_turns_small_differences_into_ties():
    judge = ScoreAnnotator("len", lambda p, r: float(len(r)), min_gap=3.0)
    assert judge.prefer("p", "abcdef", "abc") == 0  # gap 3: not under min_gap
    assert judge.prefer("p", "abcde", "abc") == -1  # gap 2 < 3
    assert judge.prefer("p", "a", "abcd") == 1
    short = load_annotator("length")
    assert short.prefer("p", "a b c", "a b") == 1 and short.prefer("p", "a b", "c d") == -1
    long = load_annotator("length", prefer="longer", min_gap=2)
    assert long.prefer("p", "a b c", "a") == 0 and long.prefer("p", "a b", "a") == -1


def test_bad_builtin_options_are_reported():
    with pytest.raises(RlhfkitError, match=r"annotator 'sentiment' has no option 'prefer'; options: min_gap, temperature, seed"):
        load_annotator("sentiment", prefer="shorter")
    with pytest.raises(RlhfkitError, match="option 'prefer' must be 'shorter' or 'longer', got 'tallest'"):
        load_annotator("length", prefer="tallest")
    with pytest.raises(RlhfkitError, match="option 'temperature' must be a finite number >= 0, got -1"):
        load_annotator("sentiment", temperature=-1)
    with pytest.raises(RlhfkitError, match="unknown annotator 'sentimnt'; built-ins: sentiment, length"):
        load_annotator("sentimnt")


def test_noise_temperature_is_deterministic_for_a_seed_and_follows_bradley_terry():
    score = {"a": 1.0, "b": 0.0}

    def labels(seed: int, temperature: float = 1.0) -> list[int]:
        judge = ScoreAnnotator("s", lambda p, r: score[r], temperature=temperature, seed=seed)
        return [judge.prefer("p", "a", "b") for _ in range(2000)]

    first, again, other = labels(7), labels(7), labels(8)
    assert first == again
    assert first != other
    assert set(first) == {0, 1}
    frac_a = first.count(0) / len(first)
    assert abs(frac_a - 1 / (1 + math.exp(-1.0))) < 0.03  # sigmoid(1) = 0.731
    assert set(labels(7, temperature=0.0)) == {0}  # the default is deterministic
    hot = labels(7, temperature=100.0)
    assert abs(hot.count(0) / len(hot) - 0.5) < 0.05
    # The noisy built-in is reproducible too.
    noisy = [load_annotator("sentiment", temperature=0.5, seed=1).prefer("p", POSITIVE, NEUTRAL) for _ in range(3)]
    assert noisy == [load_annotator("sentiment", temperature=0.5, seed=1).prefer("p", POSITIVE, NEUTRAL)
                     for _ in range(3)]


# --------------------------------------------------------------------------------------------------
# Plug-ins


PLUGIN = '''
class Judge:
    """Prefers the answer mentioning the keyword."""

    def __init__(self, keyword="tea"):
        self.keyword = keyword
        self.name = f"judge:{keyword}"

    def prefer(self, prompt, a, b):
        ha, hb = self.keyword in a, self.keyword in b
        return -1 if ha == hb else (0 if ha else 1)


class Scorer:
    name = "scorer"

    def score(self, prompt, response):
        return float(response.count("!"))


def exclamations(prompt, response):
    return float(response.count("!"))


def wrong_arity(response):
    return 0.0


judge_instance = Judge("coffee")
NUMBER = 3
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / "fb_plugin.py").write_text(PLUGIN)
    (tmp_path / "fb_broken.py").write_text("import not_a_real_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "fb_plugin"
    for name in ("fb_plugin", "fb_broken"):
        sys.modules.pop(name, None)


def test_plugin_class_instance_and_function(plugin: str):
    judge = load_annotator(f"{plugin}:Judge", keyword="tea")
    assert judge.name == "judge:tea"
    assert judge.prefer("p", "green tea", "coffee") == 0 and judge.prefer("p", "x", "y") == -1
    assert not hasattr(judge, "score")
    inst = load_annotator(f"{plugin}:judge_instance")
    assert inst.name == "judge:coffee" and inst.prefer("p", "tea", "coffee") == 1

    fn = load_annotator(f"{plugin}:exclamations", min_gap=1)
    assert isinstance(fn, ScoreAnnotator) and fn.name == f"{plugin}:exclamations"
    assert fn.prefer("p", "wow!!", "ok") == 0 and fn.prefer("p", "wow!", "ok!") == -1
    scorer = load_annotator(f"{plugin}:Scorer")  # score() only: wrapped as a score-based annotator
    assert scorer.name == "scorer" and scorer.prefer("p", "a", "b!") == 1


def test_plugin_errors_say_what_is_wrong(plugin: str):
    cases = {
        "no_such_module_xyz:f": "module 'no_such_module_xyz' is not importable",
        "fb_broken:f": "module 'fb_broken' is not importable (No module named 'not_a_real_module_xyz')",
        f"{plugin}:Missing": f"module '{plugin}' has no attribute 'Missing'; it defines: Judge, Scorer, exclamations",
        f"{plugin}:NUMBER": "annotator 'fb_plugin:NUMBER' is int 3; expected an annotator class or instance",
        f"{plugin}:wrong_arity": "function wrong_arity(response) cannot be called as (prompt, response) -> float",
        f"{plugin}:": "expected module:attribute",
    }
    for spec, message in cases.items():
        with pytest.raises(RlhfkitError, match=re.escape(message)):
            load_annotator(spec)
    with pytest.raises(RlhfkitError, match=re.escape("annotator 'fb_plugin:Judge' has no option 'colour'; options: keyword")):
        load_annotator(f"{plugin}:Judge", colour="red")
    with pytest.raises(RlhfkitError, match="is an instance; options"):
        load_annotator(f"{plugin}:judge_instance", keyword="x")


# --------------------------------------------------------------------------------------------------
# Labeling and writing


def test_label_pairs_picks_best_vs_worst_and_counts_skips():
    judge = load_annotator("sentiment")
    cands = [
        Candidates("q1", [NEUTRAL, NEGATIVE, POSITIVE, "It is fine."], duplicates=1),
        Candidates("q2", ["A bus.", "A train."]),  # both 0.0 -> tie
        Candidates("q3", ["only one"], empty=1),  # too few
    ]
    rows, stats = label_pairs(cands, judge)
    assert rows == [{
        "prompt": "q1", "chosen": POSITIVE, "rejected": NEGATIVE,
        "chosen_score": pytest.approx(sentiment_scores(["q"], [POSITIVE])[0]),
        "rejected_score": pytest.approx(sentiment_scores(["q"], [NEGATIVE])[0]),
        "annotator": "sentiment",
    }]
    assert list(rows[0]) == ["prompt", "chosen", "rejected", "chosen_score", "rejected_score", "annotator"]
    assert (stats.prompts, stats.pairs, stats.ties, stats.too_few, stats.duplicates, stats.empty) == (3, 1, 1, 1, 1, 1)


def test_label_pairs_with_a_comparator_uses_the_first_two_and_writes_no_scores(plugin: str):
    judge = load_annotator(f"{plugin}:Judge")
    rows, stats = label_pairs([Candidates("q", ["coffee", "tea", "tea and coffee"])], judge)
    assert rows == [{"prompt": "q", "chosen": "tea", "rejected": "coffee", "annotator": "judge:tea"}]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tea?"}]
    rows, _ = label_pairs([Candidates(msgs, ["tea", "no"])], judge)  # message-list prompts are kept as they are
    assert rows[0]["prompt"] == msgs
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "tea"}]  # answers as messages, as DPO reads them
    from rlhfkit.data.formats import validate_rows as validate
    from rlhfkit.data.sources import Row
    from rlhfkit.data.tokenize import tokenize_preference
    from rlhfkit.models.load import load_tokenizer

    sample = validate([Row("row 1", rows[0])], "preference")[0][0]
    tokenize_preference(sample, load_tokenizer("tiny:llama"), max_length=64)  # no "must both be" refusal


def test_write_preferences_validates_and_is_atomic(tmp_path: Path):
    rows, _ = label_pairs([Candidates("q", [NEGATIVE, POSITIVE])], load_annotator("sentiment"))
    out = write_preferences(rows, tmp_path / "sub" / "pairs.jsonl")
    samples, problems = validate_rows(load_rows(str(out)), "preference")
    assert problems == [] and samples[0].chosen == POSITIVE and samples[0].rejected == NEGATIVE
    before = out.read_bytes()

    with pytest.raises(DataError, match="cannot be written as JSON"):  # fails mid-way through the rows
        write_preferences([*rows, {"prompt": "q", "chosen": "a", "rejected": "b", "x": object()}], out)
    with pytest.raises(DataError, match=re.escape(f"{out}:2: field 'chosen' is identical to 'rejected'")):
        write_preferences([*rows, {"prompt": "q", "chosen": "a", "rejected": "a"}], out)
    with pytest.raises(DataError, match="name the output file"):
        write_preferences(rows, tmp_path / "pairs.json")
    with pytest.raises(DataError, match="no preference rows"):
        write_preferences([], out)
    assert out.read_bytes() == before  # the good file is untouched...
    assert sorted(p.name for p in out.parent.iterdir()) == ["pairs.jsonl"]  # ...and no temp file is left


# --------------------------------------------------------------------------------------------------
# Sampling and end to end (tiny:llama)


@pytest.fixture(scope="module")
def tiny():
    from rlhfkit.models.load import ModelConfig, load_causal_lm, load_tokenizer

    tok = load_tokenizer("tiny:llama")
    return load_causal_lm(ModelConfig(name="tiny:llama", device="cpu"), tokenizer=tok), tok


def test_generate_pairs_is_reproducible_for_a_seed(tiny):
    import torch

    model, tok = tiny
    prompts = ["Describe a cafe.", "Review a phone in one sentence.", "Describe a park."]
    kw = dict(samples_per_prompt=3, max_new_tokens=6, batch_size=4)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = generate_pairs(model, tok, prompts, seed=5, **kw)
    assert torch.equal(torch.get_rng_state(), state), "the caller's RNG must be left as it was"
    assert [c.prompt for c in first] == prompts
    for c in first:
        assert len(c.completions) + c.duplicates + c.empty == 3
        assert len(c.completions) == 3 and len(set(c.completions)) == 3 and all(x.strip() for x in c.completions)
    assert generate_pairs(model, tok, prompts, seed=5, **kw) == first
    assert generate_pairs(model, tok, prompts, seed=6, **kw) != first
    with pytest.raises(ConfigError, match="temperature"):
        generate_pairs(model, tok, prompts, temperature=0.0)
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        generate_pairs(model, tok, prompts, samples_per_prompt=1)


def _head_dtypes(model) -> tuple[list, object]:
    seen: list = []
    handle = model.get_output_embeddings().register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    return seen, handle


def test_generate_pairs_samples_under_the_chosen_autocast(tiny):
    import torch

    from rlhfkit.runtime.optim import cpu_native_bf16

    model, tok = tiny
    prompts = ["Describe a cafe.", "Describe a park."]
    kw = dict(samples_per_prompt=2, max_new_tokens=4, batch_size=4, seed=3)
    seen, handle = _head_dtypes(model)
    try:
        for mode, expected in [("no", torch.float32), ("bf16", torch.bfloat16),
                               ("auto", torch.bfloat16 if cpu_native_bf16() else torch.float32)]:
            seen.clear()
            generate_pairs(model, tok, prompts, mixed_precision=mode, **kw)
            assert seen and set(seen) == {expected}, (mode, set(seen))
    finally:
        handle.remove()
    assert next(model.parameters()).dtype == torch.float32, "autocast must leave the weights as they are"
    with pytest.raises(ConfigError, match="mixed_precision.*fp16 autocast needs a CUDA GPU"):
        generate_pairs(model, tok, prompts, mixed_precision="fp16", **kw)
    with pytest.raises(ConfigError, match="mixed_precision.*expected auto, no, bf16 or fp16"):
        generate_pairs(model, tok, prompts, mixed_precision="fp8", **kw)


def test_simulate_feedback_end_to_end(tmp_path: Path, plugin: str):
    from rlhfkit.runtime.optim import cpu_native_bf16

    out = tmp_path / "pairs.jsonl"
    stats = simulate_feedback("tiny:llama", "bundled:review_prompts", str(out), annotator="length",
                              annotator_options={"prefer": "longer"}, samples_per_prompt=3, max_new_tokens=8,
                              max_prompts=4, device="cpu")
    assert stats["prompts"] == 4 and stats["pairs"] + stats["ties"] + stats["too_few"] == 4
    assert stats["pairs"] >= 1 and stats["device"] == "cpu" and stats["annotator"] == "length"
    assert stats["sampling_autocast"] == "none"  # the default: the model's own dtype
    bf16 = simulate_feedback("tiny:llama", "bundled:review_prompts", str(tmp_path / "auto.jsonl"), annotator="length",
                             annotator_options={"prefer": "longer"}, samples_per_prompt=3, max_new_tokens=8,
                             max_prompts=4, device="cpu", mixed_precision="auto")
    assert bf16["sampling_autocast"] == ("bfloat16" if cpu_native_bf16() else "none")
    samples, problems = validate_rows(load_rows(str(out)), "preference")
    assert problems == [] and len(samples) == stats["pairs"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    bundled = [json.loads(line)["prompt"] for line in bundled_dataset_path("review_prompts").read_text().splitlines()]
    assert all(r["prompt"] in bundled[:4] and r["chosen_score"] > r["rejected_score"] for r in rows)
    assert stats["mean_chosen_score"] > stats["mean_rejected_score"]

    # Bad inputs fail before the model is loaded, and write nothing.
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"question": "no prompt"}\n')
    with pytest.raises(DataError, match=re.escape(f"{bad}:2: field 'prompt' is missing")):
        simulate_feedback("tiny:llama", str(bad), str(tmp_path / "x.jsonl"))
    with pytest.raises(RlhfkitError, match="unknown annotator"):
        simulate_feedback("tiny:llama", str(bad), str(tmp_path / "x.jsonl"), annotator="nope")
    assert not (tmp_path / "x.jsonl").exists()


# --------------------------------------------------------------------------------------------------
# Bundled prompts

_TEMPLATE = set("write a an one or two one- two-sentence sentence sentences review of in describe short brief give "
                "no more than longer long the you your about reviewing description account visit to trip "
                "at day used use have own bought keep tried".split())


def _topic(prompt: str) -> frozenset[str]:
    return frozenset(w for w in re.findall(r"[a-z-]+", prompt.lower()) if w not in _TEMPLATE)


def test_bundled_review_prompts():
    sets = {}
    for name, size in (("review_prompts", 96), ("review_prompts_heldout", 16)):
        samples, problems = validate_rows(load_rows(f"bundled:{name}"), "prompt")
        assert problems == [] and len(samples) == size
        prompts = [s.prompt for s in samples]
        assert len(set(prompts)) == size
        for p in prompts:
            assert "one or two sentences" in p or "sentence or two" in p or "two sentences" in p \
                or "one- or two-sentence" in p, p
            assert not re.search(r"positive|negative|good|bad|favou?rite|love|hate|best|worst", p, re.I), p
        sets[name] = prompts
    train_topics = {_topic(p) for p in sets["review_prompts"]}
    for p in sets["review_prompts_heldout"]:
        topic = _topic(p)
        assert topic not in train_topics, p
        assert all(len(topic & t) / len(topic | t) < 0.5 for t in train_topics), p


def test_the_demo_prompt_sets_share_no_subject():
    """reviews_train / reviews_val / reviews_heldout: valid prompt rows, no duplicates, no sentiment cue in
    the prompt, and no subject in two sets (the held-out score measures generalization, not recall)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_review_prompts",
                                                  Path(__file__).parent.parent / "scripts" / "make_review_prompts.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)  # type: ignore[union-attr]
    subject_of = {}
    for subject in gen.subjects(gen.SUBJECTS) + gen.subjects(gen.HELDOUT_SUBJECTS):
        for template in gen.TEMPLATES:
            subject_of[template.format(s=subject)] = subject
    seen: dict[str, str] = {}
    for name, size in (("reviews_train", 396), ("reviews_val", 66), ("reviews_heldout", 120)):
        samples, problems = validate_rows(load_rows(f"bundled:{name}"), "prompt")
        assert problems == [] and len(samples) == size
        prompts = [s.prompt for s in samples]
        assert len(set(prompts)) == size
        for p in prompts:
            assert not re.search(r"positive|negative|good|bad|favou?rite|love|hate|best|worst", p, re.I), p
            subject = subject_of[p]  # every prompt is a template filled with a subject
            assert seen.setdefault(subject, name) == name, f"{subject!r} is in {seen[subject]} and {name}"


def test_a_cut_off_answer_is_trimmed_to_its_last_complete_sentence():
    from rlhfkit.feedback.pairs import last_sentence

    assert last_sentence("It was great. The staff were") == "It was great."
    assert last_sentence("Wow! Really? Yes") == "Wow! Really?"
    assert last_sentence('He said "fine." Then') == 'He said "fine."'
    assert last_sentence("3.5 stars, would go") == ""  # a decimal point ends no sentence
    assert last_sentence("no sentence ends here") == ""


def test_unfinished_answers_are_kept_dropped_or_trimmed(monkeypatch):
    import rlhfkit.feedback.pairs as pairs

    # two answers per prompt: one ended with EOS, one cut off by the budget after a full sentence
    def fake_generate_text(model, tokenizer, slots, **kwargs):
        return [("Done and ended.", 4, True) if i % 2 == 0 else ("Full sentence. Then cut", 8, False)
                for i in range(len(slots))]

    monkeypatch.setattr(pairs, "generate_text", fake_generate_text)
    monkeypatch.setattr(pairs, "tokenize_prompt", lambda sample, tokenizer: [1, 2])

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

    def run(mode):
        return pairs.generate_pairs(M(), None, ["p"], samples_per_prompt=2, unfinished=mode)[0]

    assert run("keep").completions == ["Done and ended.", "Full sentence. Then cut"]
    dropped = run("drop")
    assert dropped.completions == ["Done and ended."] and dropped.unfinished == 1
    trimmed = run("trim")
    assert trimmed.completions == ["Done and ended.", "Full sentence."] and trimmed.trimmed == 1
    with pytest.raises(ConfigError, match="unfinished"):
        pairs.simulate_feedback("tiny:llama", "bundled:review_prompts", "/tmp/x.jsonl", unfinished="cut")
