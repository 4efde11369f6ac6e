"""The one config of `rlhfkit pipeline`: which stages run, in how many rounds, and each stage's settings.

    output_dir: runs/pipeline
    model: bundled:smollm2-135m-instruct
    stages: [feedback, reward, dpo, eval, compress]
    rounds: 1
    feedback: {annotator: sentiment, prompts: bundled:reviews_train, samples_per_prompt: 4}
    reward: {config: rlhfkit:demo_reward.yaml, set: {train.epochs: 2}}
    dpo: {config: rlhfkit:demo_dpo.yaml}
    eval: {prompts: bundled:reviews_heldout, scorers: [sentiment, reward_model]}
    compress: {to: [int8]}

Recipe stages (sft, reward, dpo, ppo) take an ordinary config of their command (`config`: a YAML file,
or `rlhfkit:NAME.yaml` for one shipped with rlhfkit) plus `set` (dotted or nested keys on top); the
pipeline fills in what connects them: the model, the data, output_dir and seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhfkit.config import opt, section
from rlhfkit.errors import ConfigError

STAGES = ("sft", "feedback", "reward", "dpo", "ppo", "eval", "compress")
"""Every stage, in the order they run within a round (sft before the first round, compress after the last)."""
POLICY_STAGES = ("dpo", "ppo")
REWARD_MODEL = "reward_model"
"""In eval.scorers and ppo's reward sources: this round's reward model."""


@dataclass
class RecipeStage:
    config: str = opt("", "the command's own YAML config (a file, or rlhfkit:NAME.yaml shipped with rlhfkit); "
                          "empty = the command's defaults")
    set: dict = opt({}, "keys set on top of `config` (dotted or nested), e.g. {train.epochs: 2}")


@dataclass
class PPOStage(RecipeStage):
    rewards: list[str] = field(default_factory=lambda: [REWARD_MODEL], metadata={
        "help": "PPO's reward sources: reward_model (this round's), sentiment, length, a folder or module:function; "
                "WEIGHT*NAME weighs one"})


@dataclass
class FeedbackStage:
    source: Literal["simulated", "label"] = opt("simulated", "simulated: an annotator labels the pairs; label: "
                                                            "people label them in the label web app")
    annotator: str = opt("sentiment", "simulated: sentiment, length, or module:attribute")
    annotator_options: dict = opt({}, "simulated: the annotator's options, e.g. {min_gap: 0.2, temperature: 0.1}")
    prompts: str = opt("bundled:reviews_train", "prompts whose answers are compared")
    max_prompts: int = opt(0, "use the first N prompts; 0 = all", ge=0)
    eval_prompts: str = opt("bundled:reviews_val", "prompts of the pairs the reward model is validated on (other "
                                                    "subjects than `prompts`); empty = split off eval_fraction instead")
    max_eval_prompts: int = opt(0, "use the first N eval prompts; 0 = all", ge=0)
    validate: list[str] = field(default_factory=lambda: ["reward", "dpo"], metadata={
        "help": "stages that are validated on the eval_prompts pairs (the others hold out a fraction of their "
                "training pairs)"})
    samples_per_prompt: int = opt(4, "answers sampled per prompt", ge=2)
    pairing: Literal["all", "best_worst"] = opt("all", "simulated: all = every pair of a prompt's answers that is "
                                                       "not a tie; best_worst = one pair per prompt")
    max_new_tokens: int = opt(64, "token budget of each answer", gt=0)
    unfinished: Literal["trim", "drop", "keep"] = opt(
        "trim", "simulated: an answer cut off by the token budget is trimmed to its last complete sentence, dropped, "
                "or kept as it is (a judge of 'more positive' prefers the longer cut-off text; docs/feedback.md)")
    temperature: float = opt(1.0, "sampling temperature of the candidates", gt=0.0)
    batch_size: int = opt(16, "answers generated per batch", ge=1)
    mixed_precision: Literal["no", "auto", "bf16", "fp16"] = opt(
        "no", "autocast of the sampling forwards: no = the model's dtype; auto = bf16 on CUDA GPUs that support it "
              "and on CPUs with native bf16 (faster, but the demo learned less from bf16-sampled pairs: docs/feedback.md)")
    # the label web app (source: label)
    annotators: list[str] = field(default_factory=lambda: ["annotator"],
                                  metadata={"help": "label: the people invited (each gets a personal link)"})
    overlap: int = opt(1, "label: different people per pair", ge=1)
    wait_for: int = opt(0, "label: labels to wait for; 0 = every item x overlap", ge=0)
    host: str = opt("127.0.0.1", "label: address the app listens on")
    port: int = opt(8765, "label: port the app listens on", ge=1, le=65535)
    public_url: str = opt("", "label: the address people reach the app at (for the links); empty = host:port")
    poll_seconds: float = opt(5.0, "label: seconds between checks for new labels", gt=0.0)
    guidelines: str = opt("", "label: Markdown file shown to annotators")


@dataclass
class EvalStage:
    prompts: str = opt("bundled:reviews_heldout", "held-out prompts (other subjects than training and validation)")
    max_prompts: int = opt(0, "answer only the first N; 0 = all", ge=0)
    scorers: list[str] = field(default_factory=lambda: ["sentiment", REWARD_MODEL], metadata={
        "help": "sentiment, length, reward_model (this round's), a folder or module:function"})
    max_new_tokens: int = opt(64, "token budget of each answer", gt=0)
    samples: int = opt(2, "sampled answers per prompt besides the greedy one", ge=0)
    temperature: float = opt(1.0, "sampling temperature", gt=0.0)
    batch_size: int = opt(16, "prompts per generation batch", ge=1)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = opt(
        "auto", "autocast of the answering forwards (KL is computed in the model's dtype); auto = bf16 on CUDA GPUs "
                "that support it and on CPUs with native bf16, no = the model's dtype")


@dataclass
class CompressStage:
    to: list[str] = field(default_factory=lambda: ["int8"], metadata={
        "help": "formats: merged, int8, gguf-f16, gguf-q8_0 (a LoRA adapter is merged first)"})
    reference: str = opt("bundled:instructions", "texts for the perplexity before/after")
    max_reference: int = opt(32, "reference texts used", ge=1)


@dataclass
class PipelineConfig:
    output_dir: str = opt("runs/pipeline", "folder of the whole pipeline: one subfolder per round and stage")
    model: str = opt("bundled:smollm2-135m-instruct", "the starting model (the base every round is compared with)")
    stages: list[str] = field(default_factory=lambda: ["feedback", "reward", "dpo", "eval", "compress"], metadata={
        "help": f"the stages to run, in this order: {', '.join(STAGES)}"})
    rounds: int = opt(1, "rounds of feedback -> reward -> policy -> eval; round r samples from round r-1's policy",
                      ge=1)
    policy: Literal["auto", "dpo", "ppo"] = opt("auto", "which tuned model goes on to the next round and to compress "
                                                        "when both dpo and ppo run; auto = the last listed")
    seed: int = opt(0, "seed of every stage (round r uses seed + r - 1 for its sampling)")
    device: str = opt("auto", "auto, cpu, cuda or mps for every stage")
    sft: RecipeStage = section(RecipeStage, "supervised fine-tuning before the first round (`rlhfkit sft` config)")
    feedback: FeedbackStage = section(FeedbackStage, "answers compared by a simulated annotator or by people")
    reward: RecipeStage = section(RecipeStage, "the reward model (`rlhfkit reward` config), refit each round on all "
                                               "labels so far")
    dpo: RecipeStage = section(RecipeStage, "DPO on all labels so far (`rlhfkit dpo` config)")
    ppo: PPOStage = section(PPOStage, "PPO against the reward model and/or scorers (`rlhfkit ppo` config)")
    eval: EvalStage = section(EvalStage, "the before/after report of each round")
    compress: CompressStage = section(CompressStage, "the final policy made small")

    def validate(self) -> None:
        if not self.stages:
            raise ConfigError("stages", f"expected at least one stage of {', '.join(STAGES)}")
        for i, name in enumerate(self.stages):
            if name not in STAGES:
                import difflib

                close = difflib.get_close_matches(name, STAGES, n=1)
                raise ConfigError(f"stages[{i}]", f"unknown stage {name!r}" + (f" (did you mean {close[0]!r}?)" if close
                                  else "") + f"; expected {', '.join(STAGES)}")
        if len(set(self.stages)) != len(self.stages):
            raise ConfigError("stages", "each stage may be listed once")
        order = [STAGES.index(s) for s in self.stages]
        if order != sorted(order):
            raise ConfigError("stages", f"stages run in the order {' -> '.join(STAGES)}; got {' -> '.join(self.stages)}")
        if self.policy != "auto" and self.policy not in self.stages:
            raise ConfigError("policy", f"policy={self.policy} but stage {self.policy!r} is not in stages")
        if self.rounds > 1 and "feedback" not in self.stages:
            raise ConfigError("rounds", "rounds > 1 need the feedback stage: each round labels the previous policy's answers")
        if self.rounds > 1 and not any(s in self.stages for s in POLICY_STAGES):
            raise ConfigError("rounds", "rounds > 1 need a policy stage (dpo or ppo) to sample the next round from")
        for i, name in enumerate(self.feedback.validate):
            if name not in ("reward", "dpo"):
                raise ConfigError(f"feedback.validate[{i}]", f"expected reward or dpo, got {name!r}")
        for i, fmt in enumerate(self.compress.to):
            if fmt not in ("merged", "int8", "gguf-f16", "gguf-q8_0"):
                raise ConfigError(f"compress.to[{i}]", f"expected merged, int8, gguf-f16 or gguf-q8_0, got {fmt!r}")
