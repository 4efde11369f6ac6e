"""`rlhfkit reward`: reward models from preference pairs, ratings or labels; scoring files with one.

Modes (`mode=`):

- `pairwise` (data kind `preference`): Bradley-Terry, loss -logsigmoid(r_chosen - r_rejected - margin);
- `regression` (kind `rating`): MSE on the scores, z-scored with the train mean/std by default;
- `classification` (kind `classification`: text, label): cross-entropy over `num_labels` classes, the
  head-replacement "transfer fine-tuning"; `freeze_backbone=true` trains the head alone.

Inputs are rendered exactly as the policy sees them (prompt + response through the chat template) and
scored at the last real token (models/heads.py). The loop mirrors recipes/sft.py: validate and tokenize
everything first (nothing is written if the data is bad), build the model (+ LoRA), then per optimizer
step `grad_accum` micro-batches with every example weighted equally across micro-batches and ranks;
log, evaluate, checkpoint, resume exactly. The same file runs alone or under `torchrun`.

Output: `output_dir/model/`, a plain `AutoModelForSequenceClassification` folder. LoRA adapters are
always merged into it, so the trained head is inside (cf. huggingface/trl#1379). The reward mean/std over
the training responses (and, for regression, the target mean/std used to de-normalize predictions) are
stored in its config.json as `rlhfkit_*` attributes and in `reward_stats.json`.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from rlhfkit.config import opt, section
from rlhfkit.data.config import DataConfig, load_train_eval
from rlhfkit.data.formats import VALIDATORS, RowProblem, Sample, _field, enforce
from rlhfkit.data.sampler import BatchSampler, check_batch_size
from rlhfkit.data.sources import Row, load_rows
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.losses.reward import (
    bradley_terry_loss,
    classification_loss,
    mean_std_from_sums,
    pearson_from_sums,
    regression_loss,
)
from rlhfkit.models.heads import (
    build_reward_model,
    check_scalar,
    encode_response,
    encode_text,
    freeze_backbone,
    load_reward_model,
    pad_right,
    score_ids,
    score_sequences,
    score_texts,
    to_reward_units,
)
from rlhfkit.models.load import (
    LoraConfig,
    ModelConfig,
    apply_lora,
    count_parameters,
    load_tokenizer,
)
from rlhfkit.models.wrap import unwrap
from rlhfkit.runtime.atomic import atomic_folder
from rlhfkit.runtime.distributed import (
    DistInfo,
    all_reduce_sum,
    print0,
)
from rlhfkit.runtime.optim import TrainConfig, autocast
from rlhfkit.runtime.seeding import quiet_transformers, seed_everything
from rlhfkit.runtime.session import RunConfig, Session, check, launch, open_session

__all__ = ["RewardConfig", "train", "score_file", "score_texts", "load_reward_model", "encode_response"]

Mode = Literal["pairwise", "regression", "classification"]
KIND = {"pairwise": "preference", "regression": "rating", "classification": "classification"}


@dataclass
class RewardDataConfig(DataConfig):
    train: str = opt("", "training data: .jsonl/.json/.csv/.parquet file, bundled:NAME, or HF dataset name "
                         "(rows of kind preference, rating or classification, following mode)")
    max_length: int = opt(1024, "maximum tokens of prompt + response (or text)", gt=1)
    truncation: Literal["error", "right"] = opt(
        "error", "too-long inputs: report the row (error) or cut the end (right: the score is then read mid-response)"
    )


@dataclass
class RewardConfig(RunConfig):
    output_dir: str = opt("runs/reward", "run folder: config, metrics, TensorBoard logs, checkpoints, final model")
    seed: int = opt(42, "seed for head init, LoRA init and data order")
    mode: Mode = opt("pairwise", "pairwise: Bradley-Terry on preference pairs; regression: MSE on rated "
                                 "responses; classification: cross-entropy on labeled texts")
    num_labels: int = opt(0, "head outputs: 0 = 1 for pairwise/regression, (largest label + 1) for classification", ge=0)
    freeze_backbone: bool = opt(False, "train only the head (transfer fine-tuning, a linear probe); not with LoRA")
    head_init: Literal["auto", "normal", "zeros"] = opt(
        "auto", "head init: normal = N(0, 1/(hidden+1)) (Ziegler et al. 2019); zeros = every score starts at 0 "
                "(the target mean); auto = zeros for regression, normal otherwise"
    )
    pooling: Literal["last", "mean"] = opt(
        "last", "score read at the last real token (the usual reward model), or the mean over all real tokens "
                "(learns from far fewer pairs when the backbone barely moves: see docs/reward.md)"
    )
    backbone_layers: int = opt(0, "keep only the first N transformer blocks of the backbone (0 = all): a shallower, "
                                  "faster reward model; early layers carry word choice best (docs/reward.md)", ge=0)
    use_margin: bool = opt(True, "pairwise: subtract a row's optional 'margin' inside the sigmoid (Llama 2)")
    center_rewards_coefficient: float = opt(
        0.0, "pairwise: weight of mean (r_chosen + r_rejected)^2, keeps rewards centred (Eisenstein et al. 2023)", ge=0.0
    )
    normalize_targets: bool = opt(True, "regression: train on z-scored targets; predictions are de-normalized when scoring")
    model: ModelConfig = section(ModelConfig, "backbone of the reward model")
    lora: LoraConfig = section(LoraConfig, "LoRA adapter (the head always trains in full; the result is merged)")
    data: RewardDataConfig = section(RewardDataConfig, "training and eval data")
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "optimization"})

    def validate(self) -> None:
        super().validate()
        if self.mode != "classification" and self.num_labels > 1:
            raise ConfigError("num_labels", f"mode={self.mode} predicts one scalar; use 0 or 1 (or mode=classification)")
        if self.mode == "classification" and self.num_labels == 1:
            raise ConfigError("num_labels", "classification needs at least 2 classes (or 0 to infer from the labels)")
        if self.freeze_backbone and self.lora.enabled:
            raise ConfigError("freeze_backbone", "a frozen backbone leaves nothing for LoRA to adapt; disable one")
        if self.lora.enabled and "score" in self.lora.target_modules:
            raise ConfigError("lora.target_modules", "'score' (the head) is trained in full already; leave it out")


# --------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class RewardExample:
    where: str
    seqs: list[list[int]]
    """[chosen, rejected] token ids (pairwise), or [ids] (regression, classification)."""
    target: float
    """margin (pairwise; 0 when absent), score (regression) or class index (classification)."""


def _encoder(cfg: RewardConfig, tokenizer: PreTrainedTokenizerBase) -> Callable[[Sample], RewardExample]:
    d = cfg.data

    def enc(prompt: Any, response: Any, what: str = "prompt + response") -> list[int]:
        return encode_response(tokenizer, prompt, response, max_length=d.max_length, chat_template=d.chat_template,
                               truncation=d.truncation, what=what)

    def transform(s: Sample) -> RewardExample:
        if cfg.mode == "pairwise":
            seqs = [enc(s.prompt, s.chosen, "prompt + chosen"), enc(s.prompt, s.rejected, "prompt + rejected")]
            return RewardExample(s.where, seqs, s.margin or 0.0)
        if cfg.mode == "regression":
            return RewardExample(s.where, [enc(s.prompt, s.response)], float(s.score))  # type: ignore[arg-type]
        ids = encode_text(tokenizer, s.text or "", max_length=d.max_length, truncation=d.truncation)
        return RewardExample(s.where, [ids], float(s.label))  # type: ignore[arg-type]

    return transform


def _prepare_data(cfg: RewardConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[list, list, list[str], int]:
    """Train/eval examples, skipped rows, and the number of head outputs."""
    d, kind, transform = cfg.data, KIND[cfg.mode], _encoder(cfg, tokenizer)
    train, evals, skipped = load_train_eval(d, kind, transform, cfg.seed)
    num_labels = 1
    if cfg.mode == "classification":
        num_labels = cfg.num_labels or int(max(ex.target for ex in train + evals)) + 1
        bad = [f"{ex.where}: field 'label' is {int(ex.target)}, but num_labels is {num_labels} (labels are 0.."
               f"{num_labels - 1})" for ex in train + evals if ex.target >= num_labels]
        enforce(bad, on_error="error", total=len(train) + len(evals), max_shown=d.max_errors_shown, what=d.train,
                hint="Fix the labels or raise num_labels (nothing was written).")
        if num_labels < 2:
            raise DataError(f"{d.train}: every label is 0; classification needs at least two classes")
    return train, evals, skipped, num_labels


# --------------------------------------------------------------------------------------------------
# Loss and metrics, per mode. Each returns the micro-batch loss (mean over examples) and metric sums,
# which add up over micro-batches and ranks and are turned into means by _metrics.

SUM_KEYS = {
    # pairwise: r_sum, r_sq_sum and r_count run over every scored response (chosen and rejected)
    "pairwise": ["loss", "n", "tokens", "correct", "margin", "chosen", "r_sum", "r_sq_sum", "r_count"],
    # regression: p = prediction (reward units), y = target; the sums give MSE, mean/std and Pearson's r
    "regression": ["loss", "n", "tokens", "sq_err", "p_sum", "y_sum", "p_sq_sum", "y_sq_sum", "py_sum"],
    "classification": ["loss", "n", "tokens", "correct"],
}


@dataclass(frozen=True)
class TargetNorm:
    """Regression targets are trained as (y - mean) / std; predictions map back as p * std + mean."""

    mean: float = 0.0
    std: float = 1.0


def _forward(model: torch.nn.Module, items: list[RewardExample], cfg: RewardConfig, pad_id: int,
             device: torch.device, amp: torch.dtype | None, norm: TargetNorm) -> tuple[torch.Tensor, dict[str, float]]:
    # Pairwise: one forward over [chosen_1..chosen_B, rejected_1..rejected_B].
    seqs = [it.seqs[k] for k in range(len(items[0].seqs)) for it in items]
    input_ids, attention_mask = pad_right(seqs, pad_id)
    targets = torch.tensor([it.target for it in items], dtype=torch.float32, device=device)  # (B,)
    with autocast(device, amp):
        out = score_sequences(model, input_ids.to(device), attention_mask.to(device))  # (N,) or (N, K)
    out = out.float()
    B = len(items)
    sums: dict[str, float] = {"n": float(B), "tokens": float(attention_mask.sum())}
    if cfg.mode == "pairwise":
        r_chosen, r_rejected = out[:B], out[B:]  # (B,), (B,)
        loss, _ = bradley_terry_loss(r_chosen, r_rejected, targets if cfg.use_margin else None,
                                     cfg.center_rewards_coefficient)
        r = out.detach().double()
        sums.update(correct=float((r[:B] > r[B:]).sum()), margin=float((r[:B] - r[B:]).sum()),
                    chosen=float(r[:B].sum()), r_sum=float(r.sum()), r_sq_sum=float((r * r).sum()),
                    r_count=float(r.numel()))
    elif cfg.mode == "regression":
        loss, _ = regression_loss(out, (targets - norm.mean) / norm.std)
        p, y = out.detach().double() * norm.std + norm.mean, targets.double()
        sums.update(sq_err=float(((p - y) ** 2).sum()), p_sum=float(p.sum()), y_sum=float(y.sum()),
                    p_sq_sum=float((p * p).sum()), y_sq_sum=float((y * y).sum()), py_sum=float((p * y).sum()))
    else:
        loss, _ = classification_loss(out, targets.long())
        sums["correct"] = float((out.argmax(-1) == targets.long()).sum())
    sums["loss"] = loss.item() * B
    return loss, sums


def _add(acc: dict[str, float], new: dict[str, float]) -> dict[str, float]:
    return {k: acc[k] + new[k] for k in acc}


def _reduce(acc: dict[str, float], info: DistInfo) -> dict[str, float]:
    total = all_reduce_sum(torch.tensor(list(acc.values()), dtype=torch.float64), info)
    return dict(zip(acc, total.tolist()))


def _metrics(mode: str, s: dict[str, float], prefix: str) -> dict[str, float]:
    n = max(s["n"], 1.0)
    out = {"loss": s["loss"] / n}
    if mode == "pairwise":
        mean, std = mean_std_from_sums(s["r_count"], s["r_sum"], s["r_sq_sum"])
        out.update(accuracy=s["correct"] / n, margin=s["margin"] / n, chosen=s["chosen"] / n,
                   rejected=(s["r_sum"] - s["chosen"]) / n, reward_mean=mean, reward_std=std)
    elif mode == "regression":
        mean, std = mean_std_from_sums(s["n"], s["p_sum"], s["p_sq_sum"])
        pearson = pearson_from_sums(s["n"], s["p_sum"], s["y_sum"], s["p_sq_sum"], s["y_sq_sum"], s["py_sum"])
        out.update(mse=s["sq_err"] / n, pearson=pearson, reward_mean=mean, reward_std=std)
    else:
        out["accuracy"] = s["correct"] / n
    return {f"{prefix}/{k}": v for k, v in out.items()}


@torch.no_grad()
def evaluate(model: torch.nn.Module, items: list[RewardExample], cfg: RewardConfig, pad_id: int, device: torch.device,
             amp: torch.dtype | None, norm: TargetNorm, info: DistInfo, prefix: str = "eval") -> dict[str, float]:
    """Example-weighted metrics over `items`, sharded across ranks."""
    model.eval()
    sums = dict.fromkeys(SUM_KEYS[cfg.mode], 0.0)
    mine = items[info.rank :: info.world_size]
    for start in range(0, len(mine), cfg.train.eval_batch_size):
        _, s = _forward(model, mine[start : start + cfg.train.eval_batch_size], cfg, pad_id, device, amp, norm)
        sums = _add(sums, s)
    model.train()
    return _metrics(cfg.mode, _reduce(sums, info), prefix)


# --------------------------------------------------------------------------------------------------
# Training


def train(cfg: RewardConfig, resume: str | None = None) -> Path:
    """Train a reward model; returns the folder of the final model. `resume` = 'latest' or a checkpoint path."""
    return launch(_train, cfg, resume)


@dataclass
class _Setup:
    run: Session
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    sampler: BatchSampler
    train_items: list[RewardExample]
    eval_items: list[RewardExample]
    norm: TargetNorm


def _setup(cfg: RewardConfig, resume: str | None, device: torch.device, info: DistInfo) -> _Setup:
    """Data (validated, tokenized), run folder (claimed), model (+ head, LoRA), session (resume)."""
    quiet_transformers()
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code, cfg.model.revision)
    train_items, eval_items, skipped, num_labels = _prepare_data(cfg, tokenizer)
    if skipped:
        print0(info, f"skipped {len(skipped)} invalid row(s) (data.on_error=skip); first: {skipped[0]}")
    check_batch_size(len(train_items), cfg.train.batch_size, info.world_size)
    norm = TargetNorm()
    if cfg.mode == "regression" and cfg.normalize_targets:
        mean, std = mean_std_from_sums(len(train_items), sum(e.target for e in train_items),
                                       sum(e.target**2 for e in train_items))
        norm = TargetNorm(mean, std if std > 1e-8 else 1.0)
    check(cfg, resume, info)

    # The head has no bias, so a random init adds a shared offset to every score. Pairwise losses only see
    # differences and ignore it; regression would spend its first steps unlearning it, hence zeros there.
    head_init = cfg.head_init if cfg.head_init != "auto" else ("zeros" if cfg.mode == "regression" else "normal")
    model = build_reward_model(cfg.model, tokenizer, num_labels=num_labels, head_init=head_init, seed=cfg.seed,
                               device=device, layers=cfg.backbone_layers)
    model.config.rlhfkit_pooling = cfg.pooling  # read by score_sequences, saved in config.json
    if cfg.freeze_backbone:
        freeze_backbone(model)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, task_type="SEQ_CLS")  # PEFT keeps `score` trainable (modules_to_save)
    sampler = BatchSampler(len(train_items), cfg.train.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle,
                           rank=info.rank, world_size=info.world_size,
                           lengths=[max(map(len, e.seqs)) for e in train_items], group_by_length=cfg.data.group_by_length)
    run = open_session(cfg, model=model, sampler=sampler, resume=resume, info=info, device=device, recipe="reward")
    if not run.finished:
        trainable, total = count_parameters(model)
        print0(info, f"{cfg.mode} reward model on {cfg.model.name}: {trainable:,} trainable / {total:,} parameters; "
                     f"{len(train_items)} train / {len(eval_items)} eval examples; device {device}, "
                     f"{info.world_size} process(es)")
    return _Setup(run, model, tokenizer, sampler, train_items, eval_items, norm)


def _train(cfg: RewardConfig, resume: str | None, device: torch.device, info: DistInfo) -> Path:
    s = _setup(cfg, resume, device, info)
    run, model, sampler, norm = s.run, s.model, s.sampler, s.norm
    out = run.run_dir / "model"
    if run.finished:
        run.close()
        return out
    ddp, amp, logger, pad_id = run.ddp, run.amp, run.logger, s.tokenizer.pad_token_id
    headline = "eval/loss" if cfg.mode == "regression" else "eval/accuracy"

    def log_eval(step: int) -> None:
        if s.eval_items:
            metrics = evaluate(ddp, s.eval_items, cfg, pad_id, device, amp, norm, info)
            logger.log(step, metrics)
            print0(info, f"step {step}: {headline} {metrics[headline]:.4f}")

    if run.start == 0:
        log_eval(0)
    bar = run.progress(cfg.progress, f"reward ({cfg.mode})")
    model.train()
    for step in range(run.start + 1, run.steps + 1):
        t0 = time.perf_counter()
        micro = [[s.train_items[i] for i in sampler.next()] for _ in range(cfg.train.grad_accum)]
        # Every example weighs the same: divide by this rank's examples in the step (the sampler always
        # fills its batches, so it is the same on every rank and DDP's gradient mean finishes the job).
        per_rank = sum(len(m) for m in micro)
        sums = dict.fromkeys(SUM_KEYS[cfg.mode], 0.0)
        for k, items in enumerate(micro):
            with run.no_sync(last=k == len(micro) - 1):
                loss, part = _forward(ddp, items, cfg, pad_id, device, amp, norm)
                run.backward(loss * len(items) / per_rank)
            sums = _add(sums, part)
        grad_norm, lr = run.step(model, step, {"train/loss": sums["loss"] / max(sums["n"], 1.0)})

        sums = _reduce(sums, info)
        metrics = _metrics(cfg.mode, sums, "train")
        elapsed = time.perf_counter() - t0
        bar.update(1, int(sums["tokens"]), elapsed, f"loss {metrics['train/loss']:.4f}")
        run.end_step(step, model=model, sampler=sampler, metrics={
            **metrics, "train/lr": lr, "train/grad_norm": grad_norm, "train/tokens_per_s": sums["tokens"] / elapsed,
            "train/step_seconds": elapsed,
        })
        if run.should_eval(step) and s.eval_items:
            logger.log(step, evaluate(ddp, s.eval_items, cfg, pad_id, device, amp, norm, info))
    bar.close()
    if run.final_eval_due():
        log_eval(run.steps)

    # Reward statistics over the training responses (chosen and rejected), in scoring units: PPO can
    # use them to normalise rewards, and a reader sees what scale this model outputs.
    attrs: dict[str, Any] = {"rlhfkit_mode": cfg.mode, "rlhfkit_chat_template": cfg.data.chat_template,
                             "rlhfkit_pooling": cfg.pooling}
    if cfg.mode != "classification":
        stats = evaluate(ddp, s.train_items, cfg, pad_id, device, amp, norm, info, prefix="stats")
        attrs.update(rlhfkit_reward_mean=stats["stats/reward_mean"], rlhfkit_reward_std=stats["stats/reward_std"])
        logger.log(run.steps, {"stats/reward_mean": stats["stats/reward_mean"], "stats/reward_std": stats["stats/reward_std"]})
    if cfg.mode == "regression":
        attrs.update(rlhfkit_target_mean=norm.mean, rlhfkit_target_std=norm.std)
    if info.is_main:
        save_reward_model(model, s.tokenizer, out, attrs)
        print(f"saved reward model to {out}", flush=True)
    run.close()
    return out


def save_reward_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out: Path, attrs: dict[str, Any]) -> None:
    """A plain *ForSequenceClassification folder (LoRA merged), with `attrs` in config.json and reward_stats.json."""
    model = unwrap(model)
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()  # the trained `score` copy replaces the original head
    for key, value in attrs.items():
        setattr(model.config, key, value)
    with atomic_folder(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "reward_stats.json").write_text(json.dumps(attrs, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Scoring


def _response_row(row: Row) -> Sample:
    d = row.data or {}
    return Sample(row.where, prompt=_field(d, "prompt", allow_messages=True),
                  response=_field(d, "response", allow_messages=False))  # type: ignore[arg-type]


def score_file(model_spec: str, data: str, output: str, batch_size: int = 8, max_length: int = 1024) -> Path:
    """Score every row of `data` with a reward model and write JSONL to `output` (nothing partial).

    Rows with `chosen`/`rejected` (preference) get `score_chosen` and `score_rejected`; rows with
    `prompt` + `response` get `score` (an input `score` field, e.g. a human rating, is kept as
    `reference_score`). Other input fields are copied through.
    """
    quiet_transformers()
    model, tokenizer = load_reward_model(model_spec)
    check_scalar(model)
    template = getattr(model.config, "rlhfkit_chat_template", "auto")
    rows = load_rows(data)
    if not rows:
        raise DataError(f"{data}: no rows found")
    pairwise = any(r.data is not None and "chosen" in r.data for r in rows)
    jobs: list[tuple[dict[str, Any], list[list[int]]]] = []
    problems: list[str] = []

    def enc(prompt: Any, response: Any, what: str = "prompt + response") -> list[int]:
        return encode_response(tokenizer, prompt, response, max_length=max_length, chat_template=template, what=what,
                               setting="max_length")

    for row in rows:
        if row.error is not None:
            problems.append(f"{row.where}: {row.error}")
            continue
        try:
            if pairwise:
                s = VALIDATORS["preference"](row)
                seqs = [enc(s.prompt, s.chosen, "prompt + chosen"), enc(s.prompt, s.rejected, "prompt + rejected")]
            else:
                s = _response_row(row)
                seqs = [enc(s.prompt, s.response)]
        except RowProblem as exc:
            problems.append(f"{row.where}: {exc}")
            continue
        jobs.append((row.data or {}, seqs))
    enforce(problems, on_error="error", total=len(rows), what=data, hint="Fix them and score again (nothing was written).")
    flat = [seq for _, seqs in jobs for seq in seqs]
    scores = iter(to_reward_units(model, score_ids(model, flat, tokenizer.pad_token_id, batch_size)))
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        for fields, _ in jobs:
            row_out = dict(fields)
            if pairwise:
                row_out.update(score_chosen=next(scores), score_rejected=next(scores))
            else:
                if "score" in row_out:
                    row_out["reference_score"] = row_out.pop("score")
                row_out["score"] = next(scores)
            handle.write(json.dumps(row_out, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
