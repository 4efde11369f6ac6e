"""`rlhfkit eval` for language models: answer held-out prompts with the base and the tuned models, score
the answers, compare them, and say whether the gain is real or only length.

    prompts --generate--> answers per model (greedy, and k samples at a temperature)
            --scorers---> scores (built-in sentiment / length, a reward model folder, module:function)
            --metrics---> means with bootstrap intervals, paired win rates, length bias, KL, diversity
            --report----> summary dict (every number), answers.jsonl, report.html (lm_report.py)

Base and tuned answer the same prompts with the same seed, so prompt i of one is paired with prompt i
of the other. With k samples, a prompt's score is the mean over its k answers before pairing (the pair
is the prompt, not the sample). KL(tuned || base) per token is estimated on the tuned model's own
samples (k1 = mean log-ratio; unbiased at temperature 1, which the default uses; k3 is reported too,
Schulman 2020, "Approximating KL divergence").
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from rlhfkit.config import opt
from rlhfkit.data.formats import Sample
from rlhfkit.data.tokenize import IGNORE, tokenize_prompt
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.evaluate.metrics import (
    distinct_n,
    length_bias,
    length_controlled_win_rate,
    length_matched_win_rate,
    mean_ci,
    paired_win_rate,
    summary_stats,
)
from rlhfkit.feedback.pairs import load_prompts, prompt_text
from rlhfkit.losses.logprobs import token_logprobs
from rlhfkit.models.heads import pad_right
from rlhfkit.rollout.generate import Completion, generate
from rlhfkit.runtime.optim import autocast_dtype
from rlhfkit.runtime.seeding import isolated_rng

DECODINGS = ("greedy", "sampled")


@dataclass
class LMEvalConfig:
    prompts: str = opt("bundled:reviews_heldout", "held-out prompts both models answer (prompt rows)")
    scorers: list[str] = field(default_factory=lambda: ["sentiment"], metadata={
        "help": "what scores an answer: sentiment, length, a reward model folder, or module:function"})
    max_prompts: int = opt(0, "answer only the first N prompts; 0 = all", ge=0)
    max_new_tokens: int = opt(48, "token budget of each answer", gt=0)
    samples: int = opt(2, "answers sampled per prompt at `temperature` besides the greedy one; 0 = greedy only", ge=0)
    temperature: float = opt(1.0, "sampling temperature (KL is an unbiased estimate at 1.0)", gt=0.0)
    batch_size: int = opt(16, "prompts per generation batch", ge=1)
    seed: int = opt(0, "seed of the samples (the same for every model) and of the bootstrap")
    length_tolerance: float = opt(0.2, "length-matched win rate: answer lengths within this relative gap", gt=0.0)
    show_samples: int = opt(8, "prompts whose answers are shown side by side in the report", ge=0)
    device: str = opt("auto", "auto, cpu, cuda or mps")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = opt(
        "auto", "autocast of the answering forwards (auto = bf16 on CUDA GPUs that support it and on CPUs with native "
                "bf16; no = the model's dtype); KL is computed without it")

    def validate(self) -> None:
        if not self.scorers:
            raise ConfigError("scorers", "expected at least one scorer: sentiment, length, a reward model folder, "
                                         "or module:function")


@dataclass
class Answers:
    """One model's answers: `greedy[i]` and `sampled[i]` (k answers) for prompt i."""

    greedy: list[Completion]
    sampled: list[list[Completion]]
    seconds: float = 0.0


def prompt_token_ids(tokenizer: Any, prompts: list[Any]) -> list[list[int]]:
    return [tokenize_prompt(Sample(f"prompt {i + 1}", prompt=p), tokenizer) for i, p in enumerate(prompts)]


def answer(model: torch.nn.Module, tokenizer: Any, prompt_ids: list[list[int]], cfg: LMEvalConfig) -> Answers:
    """Greedy answers, then `cfg.samples` sampled answers per prompt drawn under `cfg.seed` (isolated from
    the caller's RNG), so two models sample with the same random stream."""
    t0 = time.perf_counter()
    dtype = autocast_dtype(cfg.mixed_precision, next(model.parameters()).device, cpu_bf16=True,
                           field="mixed_precision")
    greedy = generate(model, tokenizer, prompt_ids, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                      autocast_dtype=dtype)
    sampled: list[list[Completion]] = [[] for _ in prompt_ids]
    if cfg.samples:
        slots = [ids for ids in prompt_ids for _ in range(cfg.samples)]  # k copies of each prompt in a row
        with isolated_rng(cfg.seed):
            flat = generate(model, tokenizer, slots, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            batch_size=cfg.batch_size, autocast_dtype=dtype)
        for i in range(len(prompt_ids)):
            sampled[i] = flat[i * cfg.samples : (i + 1) * cfg.samples]
    return Answers(greedy, sampled, time.perf_counter() - t0)


@torch.no_grad()
def token_kl(policy: torch.nn.Module, reference: torch.nn.Module, prompt_ids: list[list[int]],
             completions: list[Completion], eos_id: int, pad_id: int, batch_size: int = 8) -> list[dict[str, float]]:
    """Per answer: tokens n, k1 = sum of log pi/ref, k3 = sum of (r - 1 - log r) with r = ref/pi, over the
    answer's tokens (its EOS included when it ended). Divide by n for per-token values."""
    device = next(policy.parameters()).device
    out: list[dict[str, float]] = []
    for start in range(0, len(completions), batch_size):
        seqs, labels = [], []
        for ids, c in zip(prompt_ids[start : start + batch_size], completions[start : start + batch_size]):
            reply = c.token_ids + ([eos_id] if c.ended else [])
            seqs.append(ids + reply)
            labels.append([IGNORE] * len(ids) + reply)
        input_ids, attention_mask = pad_right(seqs, pad_id)  # (B, T)
        label_ids, _ = pad_right(labels, IGNORE)
        input_ids, attention_mask, label_ids = input_ids.to(device), attention_mask.to(device), label_ids.to(device)
        lp_pi, mask = token_logprobs(policy(input_ids=input_ids, attention_mask=attention_mask).logits.float(), label_ids)
        lp_ref, _ = token_logprobs(reference(input_ids=input_ids, attention_mask=attention_mask).logits.float(), label_ids)
        log_ratio = (lp_pi - lp_ref) * mask  # (B, T-1): log pi/ref on answer tokens, 0 elsewhere
        k3 = (torch.exp(-log_ratio) - 1 + log_ratio) * mask
        for b in range(len(seqs)):
            out.append({"n": float(mask[b].sum()), "k1": float(log_ratio[b].sum()), "k3": float(k3[b].sum())})
    return out


def _score(sources: list[Any], names: list[str], prompts: list[str], texts: list[str]) -> dict[str, list[float]]:
    from rlhfkit.rl.rewards import score_each

    return {name: values.tolist() for name, values in zip(names, score_each(sources, prompts, texts))}


def _decoding_rows(prompts: list[str], ans: Answers, decoding: str) -> tuple[list[int], list[Completion]]:
    """(prompt index, completion) for every answer of one decoding, in prompt order."""
    if decoding == "greedy":
        return list(range(len(prompts))), list(ans.greedy)
    owners = [i for i, group in enumerate(ans.sampled) for _ in group]
    return owners, [c for group in ans.sampled for c in group]


def _per_prompt(values: list[float], owners: list[int], n: int) -> np.ndarray:
    total, count = np.zeros(n), np.zeros(n)
    np.add.at(total, owners, values)
    np.add.at(count, owners, 1)
    return total / np.maximum(count, 1)


def _answer_stats(comps: list[Completion]) -> dict[str, Any]:
    lengths = [len(c.token_ids) for c in comps]
    texts = [c.text for c in comps]
    return {"length_tokens": summary_stats(lengths), "eos_rate": float(np.mean([c.ended for c in comps])),
            "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
            "empty_rate": float(np.mean([not t.strip() for t in texts]))}


def compare(prompts: list[str], answers: dict[str, Answers], base: str, scored: dict[str, dict[str, dict[str, list[float]]]],
            cfg: LMEvalConfig) -> dict[str, Any]:
    """The numbers of the report from answers and their scores (`scored[model][decoding][scorer]`): per
    model and decoding the answer statistics and mean scores; per tuned model the win rate over `base`,
    the length-bias checks. Pure (no models): tests call it with hand-made scores."""
    n = len(prompts)
    result: dict[str, Any] = {"answers": {}, "scores": {}, "win_rate": {}, "length_bias": {}}
    per_prompt: dict[tuple[str, str, str], np.ndarray] = {}
    lengths: dict[tuple[str, str], np.ndarray] = {}  # per-prompt mean answer length
    answer_lengths: dict[tuple[str, str], list[int]] = {}  # every answer's length, in _decoding_rows order
    decodings = [d for d in DECODINGS if d == "greedy" or cfg.samples]
    for model, ans in answers.items():
        result["answers"][model] = {}
        for decoding in decodings:
            owners, comps = _decoding_rows(prompts, ans, decoding)
            result["answers"][model][decoding] = _answer_stats(comps)
            answer_lengths[model, decoding] = [len(c.token_ids) for c in comps]
            lengths[model, decoding] = _per_prompt(answer_lengths[model, decoding], owners, n)
            for scorer, values in scored[model][decoding].items():
                result["scores"].setdefault(scorer, {}).setdefault(model, {})[decoding] = mean_ci(values, seed=cfg.seed)
                per_prompt[model, decoding, scorer] = _per_prompt(values, owners, n)
    for model in answers:
        if model == base:
            continue
        for scorer in result["scores"]:
            for decoding in decodings:
                t, b = per_prompt[model, decoding, scorer], per_prompt[base, decoding, scorer]
                lt, lb = lengths[model, decoding], lengths[base, decoding]
                result["win_rate"].setdefault(scorer, {}).setdefault(model, {})[decoding] = paired_win_rate(t, b, seed=cfg.seed)
                all_scores = list(scored[model][decoding][scorer]) + list(scored[base][decoding][scorer])
                all_lengths = answer_lengths[model, decoding] + answer_lengths[base, decoding]
                result["length_bias"].setdefault(scorer, {}).setdefault(model, {})[decoding] = {
                    "score_vs_length": length_bias(all_scores, all_lengths),
                    "length_matched": length_matched_win_rate(t, lt, b, lb, tolerance=cfg.length_tolerance, seed=cfg.seed),
                    "length_controlled": length_controlled_win_rate(t, lt, b, lb, seed=cfg.seed),
                }
    return result


def evaluate_lm(base: str, tuned: dict[str, str], cfg: LMEvalConfig, log: Any = print) -> dict[str, Any]:
    """Answer `cfg.prompts` with `base` and each tuned model (name -> model spec), score and compare.

    Returns the summary (JSON-serializable) with every number; `answers` holds every answer text, for
    answers.jsonl and the side-by-side samples. Inputs (prompts, scorers, model specs) are checked before
    any model is loaded.
    """
    from rlhfkit.models.load import ModelConfig, load_causal_lm, load_tokenizer, resolve_device, resolve_spec
    from rlhfkit.rl.rewards import build_reward_sources, metric_names

    cfg.validate()
    if "base" in tuned:
        raise ConfigError("model", "'base' names the starting model; give the tuned models other names")
    if not tuned:
        raise ConfigError("model", "expected at least one tuned model to compare with the base")
    prompts_raw = load_prompts(cfg.prompts, cfg.max_prompts)
    for spec in [base, *tuned.values()]:
        resolve_spec(spec)  # a missing folder or bad spec fails here, before anything loads
    device = resolve_device(cfg.device)
    sources = build_reward_sources(cfg.scorers, device=device, normalize_model=False)
    names = [m.removeprefix("score/") for m in metric_names(sources)]
    prompts = [prompt_text(p) for p in prompts_raw]

    tokenizer = load_tokenizer(base)
    prompt_ids = prompt_token_ids(tokenizer, prompts_raw)
    base_model = load_causal_lm(ModelConfig(name=base, device=str(device)), device=device, tokenizer=tokenizer)
    specs = {"base": base, **tuned}
    answers: dict[str, Answers] = {}
    kl: dict[str, Any] = {}
    for name, spec in specs.items():
        model = base_model if name == "base" else load_causal_lm(ModelConfig(name=spec, device=str(device)),
                                                                 device=device, tokenizer=tokenizer)
        if model.get_output_embeddings().weight.shape != base_model.get_output_embeddings().weight.shape:
            raise RlhfkitError(f"{spec}: its vocabulary differs from the base model {base}'s; answers and KL are "
                               "compared token by token, so the tuned model must share the base's tokenizer")
        log(f"  answering {len(prompts)} prompts with {name} ({spec}) ...")
        answers[name] = answer(model, tokenizer, prompt_ids, cfg)
        if name != "base" and cfg.samples:
            owners = [i for i, group in enumerate(answers[name].sampled) for _ in group]
            comps = [c for group in answers[name].sampled for c in group]
            per = token_kl(model, base_model, [prompt_ids[i] for i in owners], comps, tokenizer.eos_token_id,
                           tokenizer.pad_token_id, batch_size=cfg.batch_size)
            tokens = sum(p["n"] for p in per)
            per_token = [p["k1"] / p["n"] for p in per if p["n"]]
            kl[name] = {"k1_per_token": sum(p["k1"] for p in per) / max(tokens, 1),
                        "k3_per_token": sum(p["k3"] for p in per) / max(tokens, 1),
                        "per_answer": summary_stats(per_token) if per_token else None,
                        "per_answer_values": per_token,
                        "per_sequence_k1": mean_ci([p["k1"] for p in per], seed=cfg.seed)}
        if model is not base_model:
            del model

    scored: dict[str, dict[str, dict[str, list[float]]]] = {}
    for name, ans in answers.items():
        scored[name] = {}
        for decoding in DECODINGS:
            if decoding == "sampled" and not cfg.samples:
                continue
            owners, comps = _decoding_rows(prompts, ans, decoding)
            scored[name][decoding] = _score(sources, names, [prompts[i] for i in owners], [c.text for c in comps])

    summary = compare(prompts, answers, "base", scored, cfg)
    summary.update(
        kind="lm", base=base, models=dict(tuned), scorers=names, kl=kl, settings=asdict(cfg),
        prompts={"source": cfg.prompts, "n": len(prompts)},
        seconds={name: round(a.seconds, 1) for name, a in answers.items()},
        texts=[{"prompt": p, **{f"{name}/greedy": answers[name].greedy[i].text for name in specs},
                **{f"{name}/sampled": [c.text for c in answers[name].sampled[i]] for name in specs if cfg.samples},
                **{f"{name}/greedy_scores": {s: scored[name]["greedy"][s][i] for s in names} for name in specs}}
               for i, p in enumerate(prompts)],
    )
    return summary
