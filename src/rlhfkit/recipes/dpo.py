"""`rlhfkit dpo`: Direct Preference Optimization on prompt/chosen/rejected pairs.

Top to bottom: validate and tokenize the pairs (nothing is written if one is bad), load the policy
(+ LoRA), get reference log-probs (precomputed once and cached on disk, or live: the base with
adapters disabled under LoRA, a frozen copy otherwise), then for each step run chosen and rejected
through the policy in one forward, take summed response log-probs without a full-vocabulary
log-softmax, apply the selected loss from losses/dpo.py, and log the implicit-reward metrics.
The same file runs alone or under `torchrun`.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from safetensors.torch import load_file, save_file

from rlhfkit.config import opt, section
from rlhfkit.data.collate import SharedPromptBatch, pad_batch, shared_prompt_batch
from rlhfkit.data.config import DataConfig, load_train_eval
from rlhfkit.data.sampler import BatchSampler, check_batch_size
from rlhfkit.data.tokenize import PairExample, tokenize_preference
from rlhfkit.errors import ConfigError
from rlhfkit.losses.dpo import chosen_nll, dpo_loss
from rlhfkit.losses.logprobs import selected_logprobs, sequence_logprobs
from rlhfkit.models.bundled import cache_dir
from rlhfkit.models.load import (
    LoraConfig,
    ModelConfig,
    apply_lora,
    count_parameters,
    load_causal_lm,
    load_tokenizer,
)
from rlhfkit.models.save import save_final_model
from rlhfkit.models.wrap import base_model, reference_mode, unwrap
from rlhfkit.runtime.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    print0,
)
from rlhfkit.runtime.optim import TrainConfig, autocast, autocast_dtype
from rlhfkit.runtime.seeding import quiet_transformers, seed_everything
from rlhfkit.runtime.session import RunConfig, Session, check, launch, open_session


@dataclass
class DPODataConfig(DataConfig):
    train: str = opt("", "preference data (prompt, chosen, rejected): .jsonl/.json/.csv/.parquet, bundled:NAME or HF name")


@dataclass
class DPOLossConfig:
    beta: float = opt(0.1, "strength of the implicit KL constraint (higher = stay closer to the reference)", gt=0.0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = opt("sigmoid", "sigmoid (DPO), ipo (Azar et al.) or hinge (SLiC)")
    label_smoothing: float = opt(0.0, "conservative DPO: assumed fraction of flipped labels (sigmoid only)", ge=0.0, lt=0.5)
    length_alpha: float = opt(0.0, "R-DPO length regularization: the margin gains alpha * (chosen - rejected length in "
                              "tokens), so a longer chosen answer teaches less length (sigmoid/hinge; 0 = off)", ge=0.0)
    sft_weight: float = opt(0.0, "RPO: add this weight times the chosen answer's mean token NLL, which keeps chosen "
                            "answers (and their end-of-turn token) likely; 0 = off", ge=0.0)
    precompute_ref: bool = opt(True, "compute reference log-probs once before training and cache them on disk")
    ref_model: str = opt("", "reference model spec; empty = the starting policy (base weights under LoRA)")
    share_prompt: bool = opt(True, "one row per pair: the prompt computed once, then the chosen and the rejected "
                             "response under a custom attention mask, logits only where a response token is "
                             "predicted (false, or a flash-attention model: two padded rows per pair)")
    logprob_chunk: int = opt(128, "positions per chunk when computing log-probs (bounds float32 memory)", gt=0)

    def validate(self) -> None:
        if self.label_smoothing > 0 and self.loss_type != "sigmoid":
            raise ConfigError("label_smoothing", "only applies to loss_type=sigmoid (conservative DPO)")
        if self.length_alpha > 0 and self.loss_type == "ipo":
            raise ConfigError("length_alpha", "applies to loss_type=sigmoid or hinge; IPO already averages over length")


@dataclass
class DPOConfig(RunConfig):
    output_dir: str = opt("runs/dpo", "run folder: config, metrics, TensorBoard logs, checkpoints, final model")
    seed: int = opt(42, "seed for LoRA init and data order (tiny:* models always start from the same weights)")
    model: ModelConfig = section(ModelConfig, "policy model to fine-tune (also the reference unless dpo.ref_model is set)")
    lora: LoraConfig = section(LoraConfig, "LoRA adapter (the reference is then the base with adapters disabled)")
    data: DPODataConfig = section(DPODataConfig, "preference data")
    dpo: DPOLossConfig = section(DPOLossConfig, "DPO loss and reference model")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-6, batch_size=4),
                               metadata={"help": "optimization (batch_size counts pairs)"})

    CPU_BF16_AUTO: ClassVar[bool] = True
    """train.mixed_precision=auto autocasts to bf16 on CPUs with native bf16 (benchmarks/RESULTS.md: DPO)."""


# --------------------------------------------------------------------------------------------------
# Log-probs


SHARED_PROMPT_ATTENTION = ("sdpa", "eager")
"""Attention kernels that take the custom 4D mask of a shared-prompt batch (flash-attention 2 does not)."""


def shared_prompt_problem(model: torch.nn.Module, max_row: int) -> str | None:
    """Why `model` cannot run shared-prompt batches of rows up to `max_row` tokens, or None when it can."""
    base = base_model(model)
    config = base.config
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in SHARED_PROMPT_ATTENTION:
        return f"attention {impl!r} takes no custom 4D mask (needs {' or '.join(SHARED_PROMPT_ATTENTION)})"
    window = getattr(config, "sliding_window", None)
    sliding = getattr(config, "use_sliding_window", True) is not False and (
        "sliding_attention" in (getattr(config, "layer_types", None) or ["sliding_attention"]))
    if window and sliding and window < max_row:
        return f"sliding-window attention ({window} tokens) is not expressed by the custom mask of {max_row}-token rows"
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward has no logits_to_keep argument"
    return None


def _pair_batch(pairs: list[PairExample], pad_id: int, device: torch.device,
                share: bool) -> dict[str, torch.Tensor] | SharedPromptBatch:
    """`share`: one `SharedPromptBatch` row per pair. Otherwise chosen rows first, then rejected rows,
    right-padded: one forward of 2B sequences (B, T) each half."""
    if share:
        return shared_prompt_batch([p.chosen for p in pairs], [p.rejected for p in pairs], pad_id).to(device)
    batch = pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    return {k: v.to(device) for k, v in batch.items()}


def _batch_tokens(pairs: list[PairExample]) -> int:
    """Tokens of both sequences of every pair (the prompt counted twice), whatever the layout."""
    return sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)


def pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor] | SharedPromptBatch, amp: torch.dtype | None,
               chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed response log-probs (2B,), response token counts (2B,)) for a `_pair_batch`, chosen first."""
    if isinstance(batch, SharedPromptBatch):
        return shared_pair_logps(model, batch, amp, chunk)
    device = batch["input_ids"].device
    with autocast(device, amp):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return sequence_logprobs(logits, batch["labels"], chunk_size=chunk)


def shared_pair_logps(model: torch.nn.Module, batch: SharedPromptBatch, amp: torch.dtype | None,
                      chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`pair_logps` of a `SharedPromptBatch`: logits only at the positions that predict a response token."""
    device = batch.input_ids.device
    sdpa = getattr(base_model(model).config, "_attn_implementation", None) == "sdpa"
    mask = batch.attention_mask(None if sdpa else torch.float32)  # eager adds the mask to its scores
    with autocast(device, amp):
        logits = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                       logits_to_keep=batch.keep, use_cache=False).logits  # (B, K, V)
    picked = logits[batch.rows, batch.cols]  # (N, V)
    logps = selected_logprobs(picked[None], batch.targets[None], chunk_size=chunk)[0]  # (N,)
    n = 2 * batch.input_ids.size(0)
    sums = torch.zeros(n, dtype=logps.dtype, device=device).index_add(0, batch.seq, logps)
    return sums, torch.bincount(batch.seq, minlength=n)


@torch.no_grad()
def compute_reference(model: torch.nn.Module, ref_model: torch.nn.Module | None, pairs: list[PairExample], *,
                      batch_size: int, pad_id: int, device: torch.device, amp: torch.dtype | None, chunk: int,
                      info: DistInfo, share: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of every pair, each rank computing a shard: ((N,), (N,)) chosen, rejected."""
    chosen = torch.zeros(len(pairs), dtype=torch.float64)
    rejected = torch.zeros(len(pairs), dtype=torch.float64)
    mine = list(range(info.rank, len(pairs), info.world_size))
    with reference_mode(model, ref_model) as ref:
        was = ref.training
        ref.eval()
        for start in range(0, len(mine), batch_size):
            idx = mine[start : start + batch_size]
            logps, _ = pair_logps(ref, _pair_batch([pairs[i] for i in idx], pad_id, device, share), amp, chunk)
            n = len(idx)
            chosen[idx] = logps[:n].double().cpu()
            rejected[idx] = logps[n:].double().cpu()
        ref.train(was)
    return all_reduce_sum(chosen, info).float(), all_reduce_sum(rejected, info).float()


def reference_cache_key(ref: torch.nn.Module, pairs: list[PairExample], amp: torch.dtype | None,
                        share: bool = False) -> str:
    """Hash of the reference weights (base weights under LoRA), the tokenized pairs, the precision and
    the batch layout (the two layouts agree to float rounding, not bit for bit)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"rlhfkit-ref-logps-v1|{amp}{'|shared' if share else ''}".encode())
    for name, tensor in sorted(unwrap(ref).state_dict().items()):
        if "lora_" in name:
            continue
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    for p in pairs:
        for ex in (p.chosen, p.rejected):
            h.update(torch.tensor(ex.input_ids, dtype=torch.int64).numpy().tobytes())
            h.update(torch.tensor(ex.labels, dtype=torch.int64).numpy().tobytes())
            h.update(b"|")
    return h.hexdigest()


def cached_reference(model: torch.nn.Module, ref_model: torch.nn.Module | None, pairs: list[PairExample],
                     **kwargs: object) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Reference log-probs from `$RLHFKIT_CACHE/ref_logps/<key>.safetensors`, computing them on a miss."""
    info: DistInfo = kwargs["info"]  # type: ignore[assignment]
    key = reference_cache_key(ref_model if ref_model is not None else model, pairs, kwargs["amp"],  # type: ignore[arg-type]
                              bool(kwargs.get("share", False)))
    path = cache_dir() / "ref_logps" / f"{key}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        if info.is_main:
            path.touch()  # most recently used: kept by prune_cache
        return t["chosen"], t["rejected"], True
    chosen, rejected = compute_reference(model, ref_model, pairs, **kwargs)  # type: ignore[arg-type]
    if info.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, str(tmp))
        tmp.replace(path)
        prune_cache(path.parent, keep=REF_CACHE_KEEP)
    barrier(info)
    return chosen, rejected, False


REF_CACHE_KEEP = 64
"""Reference log-prob files kept in the cache (a hit refreshes a file's age)."""


def prune_cache(folder: Path, keep: int) -> None:
    """Delete all but the `keep` most recently used `*.safetensors` files of `folder`."""
    files = sorted(folder.glob("*.safetensors"), key=lambda f: f.stat().st_mtime, reverse=True)
    for old in files[keep:]:
        old.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Metrics


SUMS = ("count", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
        "logps/chosen", "logps/rejected")
"""The per-pair sums `_stats` returns, in this order; `_metrics` divides them by the count."""


def _stats(losses: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, pc: torch.Tensor, pr: torch.Tensor) -> torch.Tensor:
    """Sums over the pairs to all-reduce, one per name in SUMS (B,) -> (8,)."""
    return torch.stack([
        torch.tensor(float(losses.numel())), losses.detach().sum().cpu(), rc.sum().cpu(), rr.sum().cpu(),
        (rc > rr).float().sum().cpu(), (rc - rr).sum().cpu(), pc.detach().sum().cpu(), pr.detach().sum().cpu(),
    ]).double()


def _metrics(prefix: str, s: torch.Tensor) -> dict[str, float]:
    sums = dict(zip(SUMS, s.tolist()))
    n = max(sums.pop("count"), 1.0)
    return {f"{prefix}{name}": value / n for name, value in sums.items()}


def _loss(cfg: DPOConfig, logps: torch.Tensor, counts: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor):  # noqa: ANN202
    n = ref_c.numel()
    losses, rc, rr = dpo_loss(logps[:n], logps[n:], ref_c, ref_r, beta=cfg.dpo.beta, loss_type=cfg.dpo.loss_type,
                              label_smoothing=cfg.dpo.label_smoothing, chosen_lengths=counts[:n],
                              rejected_lengths=counts[n:], length_alpha=cfg.dpo.length_alpha)
    if cfg.dpo.sft_weight:
        losses = losses + cfg.dpo.sft_weight * chosen_nll(logps[:n], counts[:n])
    return losses, rc, rr


@torch.no_grad()
def evaluate(model: torch.nn.Module, pairs: list[PairExample], ref: tuple[torch.Tensor, torch.Tensor], cfg: DPOConfig,
             pad_id: int, device: torch.device, amp: torch.dtype | None, info: DistInfo,
             share: bool = False) -> dict[str, float]:
    model.eval()
    totals = torch.zeros(len(SUMS), dtype=torch.float64)
    mine = list(range(info.rank, len(pairs), info.world_size))
    for start in range(0, len(mine), cfg.train.eval_batch_size):
        idx = mine[start : start + cfg.train.eval_batch_size]
        logps, counts = pair_logps(model, _pair_batch([pairs[i] for i in idx], pad_id, device, share), amp, cfg.dpo.logprob_chunk)
        rc, rr = ref[0][idx].to(device), ref[1][idx].to(device)
        losses, cr, rj = _loss(cfg, logps, counts, rc, rr)
        totals += _stats(losses, cr, rj, logps[: len(idx)], logps[len(idx) :])
    model.train()
    return _metrics("eval/", all_reduce_sum(totals, info))


# --------------------------------------------------------------------------------------------------
# Training


def train(cfg: DPOConfig, resume: str | None = None) -> Path:
    """Run DPO; returns the folder of the final model. `resume` = 'latest' or a checkpoint path."""
    return launch(_train, cfg, resume)


@dataclass
class _Setup:
    run: Session
    model: torch.nn.Module
    ref_model: torch.nn.Module | None
    """The live reference (precompute_ref=false); None under LoRA (the base without adapters) or when precomputed."""
    tokenizer: Any
    sampler: BatchSampler
    pairs: list[PairExample]
    eval_pairs: list[PairExample]
    ref: tuple[torch.Tensor, torch.Tensor] | None
    """Precomputed reference log-probs of the training pairs ((N,) chosen, (N,) rejected)."""
    eval_ref: tuple[torch.Tensor, torch.Tensor] | None
    share: bool
    """Shared-prompt batches (dpo.share_prompt, and the model supports them)."""


def _setup(cfg: DPOConfig, resume: str | None, device: torch.device, info: DistInfo) -> _Setup:
    """Data, run folder (claimed before the long reference pass), policy and reference, session."""
    quiet_transformers()
    seed_everything(cfg.seed)
    d = cfg.data
    if not d.train.strip():
        raise ConfigError("data.train", "expected a preference data file or dataset name (prompt, chosen, rejected)")
    amp = autocast_dtype(cfg.train.mixed_precision, device, cpu_bf16=cfg.CPU_BF16_AUTO)
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code, cfg.model.revision)
    tok = partial(tokenize_preference, tokenizer=tokenizer, max_length=d.max_length, chat_template=d.chat_template,
                  truncation=d.truncation)
    pairs, eval_pairs, skipped = load_train_eval(d, "preference", tok, cfg.seed)
    if skipped:
        print0(info, f"skipped {len(skipped)} invalid row(s) (data.on_error=skip); first: {skipped[0]}")
    check_batch_size(len(pairs), cfg.train.batch_size, info.world_size, what="training pairs")
    check(cfg, resume, info)

    model = load_causal_lm(cfg.model, device, tokenizer)
    # The reference: another model, or the starting policy. Under LoRA that is the base with adapters
    # disabled (ref_model None, no second copy); a full fine-tune needs a frozen copy only when the
    # reference runs live; precomputing uses the policy itself before its first update.
    ref_model = None
    if cfg.dpo.ref_model:
        ref_cfg = ModelConfig(**{**cfg.model.__dict__, "name": cfg.dpo.ref_model, "gradient_checkpointing": False})
        ref_model = load_causal_lm(ref_cfg, device).eval().requires_grad_(False)
    elif not cfg.lora.enabled:
        ref_model = model if cfg.dpo.precompute_ref else copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    # Reference log-probs come first: on resume the checkpoint's weights are loaded into the policy
    # next, and a full fine-tune's precomputed reference is the policy as it is now.
    share = cfg.dpo.share_prompt
    if share:
        problem = next(filter(None, (shared_prompt_problem(m, 2 * d.max_length) for m in (model, ref_model) if m is not None)), None)
        if problem:
            print0(info, f"dpo.share_prompt: {problem}; using two padded rows per pair")
            share = False
    ref_kwargs = {"batch_size": cfg.train.eval_batch_size, "pad_id": tokenizer.pad_token_id, "device": device,
                  "amp": amp, "chunk": cfg.dpo.logprob_chunk, "share": share, "info": info}
    ref, eval_ref = None, None
    if cfg.dpo.precompute_ref:
        t0 = time.perf_counter()
        ref_c, ref_r, hit = cached_reference(model, ref_model, pairs, **ref_kwargs)
        ref = (ref_c, ref_r)
        if eval_pairs:
            eval_ref = cached_reference(model, ref_model, eval_pairs, **ref_kwargs)[:2]
        print0(info, f"reference log-probs {'loaded from cache' if hit else 'computed'} in {time.perf_counter() - t0:.1f} s")
        ref_model = None  # not needed any more: training runs the policy only
    elif eval_pairs:
        eval_ref = compute_reference(model, ref_model, eval_pairs, **ref_kwargs)

    sampler = BatchSampler(len(pairs), cfg.train.batch_size, seed=cfg.seed, shuffle=d.shuffle, rank=info.rank,
                           world_size=info.world_size, lengths=[p.length for p in pairs], group_by_length=d.group_by_length)
    run = open_session(cfg, model=model, sampler=sampler, resume=resume, info=info, device=device, recipe="dpo")
    if not run.finished:
        trainable, total = count_parameters(model)
        print0(info, f"policy {cfg.model.name}: {trainable:,} trainable / {total:,} parameters; {len(pairs)} train / "
                     f"{len(eval_pairs)} eval pairs; reference: {'precomputed' if cfg.dpo.precompute_ref else 'live'}, "
                     f"{cfg.dpo.ref_model or ('base without adapters' if cfg.lora.enabled else 'starting policy')}")
    return _Setup(run, model, ref_model, tokenizer, sampler, pairs, eval_pairs, ref, eval_ref, share)


def _train(cfg: DPOConfig, resume: str | None, device: torch.device, info: DistInfo) -> Path:
    s = _setup(cfg, resume, device, info)
    run, model, ref_model, sampler, pairs = s.run, s.model, s.ref_model, s.sampler, s.pairs
    out = run.run_dir / "model"
    if run.finished:
        run.close()
        return out
    ddp, amp, pad_id = run.ddp, run.amp, s.tokenizer.pad_token_id

    def log_eval(step: int) -> None:
        if s.eval_pairs and s.eval_ref is not None:
            m = evaluate(ddp, s.eval_pairs, s.eval_ref, cfg, pad_id, device, amp, info, s.share)
            run.logger.log(step, m)
            print0(info, f"step {step}: eval loss {m['eval/loss']:.4f}, accuracy {m['eval/rewards/accuracies']:.3f}, "
                         f"margin {m['eval/rewards/margins']:.4f}")

    if run.start == 0:
        log_eval(0)
    bar = run.progress(cfg.progress, "dpo")
    model.train()
    for step in range(run.start + 1, run.steps + 1):
        t0 = time.perf_counter()
        stats = torch.zeros(len(SUMS), dtype=torch.float64)
        n_tokens = 0
        for k in range(cfg.train.grad_accum):
            idx = sampler.next()
            batch = _pair_batch([pairs[i] for i in idx], pad_id, device, s.share)
            n_tokens += _batch_tokens([pairs[i] for i in idx])
            if s.ref is not None:
                ref_chosen, ref_rejected = s.ref[0][idx].to(device), s.ref[1][idx].to(device)
            else:
                with torch.no_grad(), reference_mode(model, ref_model) as ref:
                    ref_logps, _ = pair_logps(ref, batch, amp, cfg.dpo.logprob_chunk)
                ref_chosen, ref_rejected = ref_logps[: len(idx)], ref_logps[len(idx) :]
            with run.no_sync(last=k == cfg.train.grad_accum - 1):
                logps, counts = pair_logps(ddp, batch, amp, cfg.dpo.logprob_chunk)  # (2B,)
                losses, chosen_r, rejected_r = _loss(cfg, logps, counts, ref_chosen, ref_rejected)
                # Every pair weighs the same: mean over the micro-batch, averaged over micro-batches
                # (all micro-batches hold batch_size pairs) and over ranks (by DDP).
                loss = losses.mean() / cfg.train.grad_accum
                run.backward(loss)
            stats += _stats(losses, chosen_r, rejected_r, logps[: len(idx)], logps[len(idx) :])
        grad_norm, lr = run.step(model, step, {"train/loss": stats[1].item() / max(stats[0].item(), 1.0)})
        stats = all_reduce_sum(stats, info)
        elapsed = time.perf_counter() - t0
        tokens_all = all_reduce_sum(torch.tensor(float(n_tokens)), info).item()
        metrics = _metrics("train/", stats)
        bar.update(1, int(tokens_all), elapsed, f"loss {metrics['train/loss']:.4f} acc {metrics['train/rewards/accuracies']:.2f}")
        run.end_step(step, model=model, sampler=sampler, metrics={
            **metrics, "train/lr": lr, "train/grad_norm": grad_norm, "train/tokens_per_s": tokens_all / elapsed,
            "train/step_seconds": elapsed, "train/pairs_per_s": stats[0].item() / elapsed,
        })
        if run.should_eval(step):
            log_eval(step)
    bar.close()
    if run.final_eval_due():
        log_eval(run.steps)
    if info.is_main:
        save_final_model(model, s.tokenizer, out, merge=cfg.lora.merge)
        print(f"saved model to {out}", flush=True)
    run.close()
    return out
