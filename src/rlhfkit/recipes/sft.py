"""`rlhfkit sft`: supervised fine-tuning of a causal LM on prompt/completion or chat data.

The loop, top to bottom: validate and tokenize all data (nothing is written if it is bad), load the
model (+ LoRA), create the run folder, then for each optimizer step take `grad_accum` micro-batches,
weigh every labeled token equally across micro-batches and ranks, clip, step, log, evaluate, sample
and checkpoint. The same file runs alone or under `torchrun` (DDP, data sharded by rank).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rlhfkit.config import opt, section
from rlhfkit.data.collate import pack_examples, packed_batch, pad_batch
from rlhfkit.data.config import DataConfig, load_train_eval
from rlhfkit.data.formats import Sample, Text
from rlhfkit.data.sampler import BatchSampler, check_batch_size
from rlhfkit.data.tokenize import TokenizedExample, tokenize_prompt, tokenize_sft
from rlhfkit.losses.sft import sft_loss
from rlhfkit.models.load import (
    LoraConfig,
    ModelConfig,
    apply_lora,
    count_parameters,
    load_causal_lm,
    load_tokenizer,
)
from rlhfkit.models.save import save_final_model
from rlhfkit.rollout.generate import generate_text
from rlhfkit.runtime.checkpoint import unwrap
from rlhfkit.runtime.distributed import (
    DistInfo,
    all_reduce_sum,
    print0,
)
from rlhfkit.runtime.optim import TrainConfig, autocast
from rlhfkit.runtime.seeding import quiet_transformers, seed_everything
from rlhfkit.runtime.session import RunConfig, Session, check, launch, open_session


@dataclass
class SFTDataConfig(DataConfig):
    train: str = opt("bundled:instructions", "training data: .jsonl/.json/.csv/.parquet file, bundled:NAME, or HF dataset name")
    completion_only_loss: bool = opt(True, "loss on completion/assistant tokens only (false: on every token)")
    packing: bool = opt(False, "pack short examples into rows of max_length (position resets, no cross-attention)")


@dataclass
class SFTConfig(RunConfig):
    output_dir: str = opt("runs/sft", "run folder: config, metrics, TensorBoard logs, checkpoints, final model")
    seed: int = opt(42, "seed for LoRA init, data order and sampling (tiny:* models always start from the same weights)")
    sample_every: int = opt(0, "log sample generations every N steps; 0 = before and after training only", ge=0)
    sample_prompts: list[str] = opt([], "prompts for sample generations; empty = the first 3 eval prompts")
    sample_max_new_tokens: int = opt(64, "new tokens per sample generation", gt=0)
    model: ModelConfig = section(ModelConfig, "model to fine-tune")
    lora: LoraConfig = section(LoraConfig, "LoRA adapter (or full fine-tuning when disabled)")
    data: SFTDataConfig = section(SFTDataConfig, "training and eval data")
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "optimization"})


# --------------------------------------------------------------------------------------------------


def _prepare_data(cfg: SFTConfig, tokenizer) -> tuple[list, list, list[str]]:  # noqa: ANN001
    d = cfg.data
    tok = partial(
        tokenize_sft, tokenizer=tokenizer, max_length=d.max_length, chat_template=d.chat_template,
        completion_only_loss=d.completion_only_loss, truncation=d.truncation,
    )
    return load_train_eval(d, "sft", lambda s: (tok(s), s), cfg.seed)


def _micro_items(examples: list[TokenizedExample], cfg: SFTConfig) -> list:
    return pack_examples(examples, cfg.data.max_length) if cfg.data.packing else examples


def _collate(items: list, cfg: SFTConfig, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    batch = packed_batch(items, pad_id) if cfg.data.packing else pad_batch(items, pad_id)
    return {k: v.to(device) for k, v in batch.items()}


def _count_labels(items: list) -> int:
    return sum(sum(1 for t in it.labels[1:] if t != -100) for it in items)


@torch.no_grad()
def evaluate(model: torch.nn.Module, items: list, cfg: SFTConfig, pad_id: int, device: torch.device,
             amp: torch.dtype | None, info: DistInfo) -> dict[str, float]:
    """Token-weighted eval loss and accuracy over the eval set, sharded across ranks."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    mine = items[info.rank :: info.world_size]
    for start in range(0, len(mine), cfg.train.eval_batch_size):
        batch = _collate(mine[start : start + cfg.train.eval_batch_size], cfg, pad_id, device)
        labels = batch.pop("labels")
        with autocast(device, amp):
            logits = model(**batch, use_cache=False).logits
        _, m = sft_loss(logits, labels)
        totals += torch.tensor([m["nll_sum"].item(), m["num_tokens"].item(), m["num_correct"].item()], dtype=torch.float64)
    totals = all_reduce_sum(totals, info)
    model.train()
    n = max(totals[1].item(), 1.0)
    return {"eval/loss": totals[0].item() / n, "eval/token_accuracy": totals[2].item() / n, "eval/tokens": totals[1].item()}


def _prompt_of(sample: Sample) -> Text:
    """What precedes the trained answer: the prompt, or a chat up to its last assistant turn."""
    if sample.messages is not None:
        last = max(i for i, m in enumerate(sample.messages) if m["role"] == "assistant")
        return sample.messages[:last]
    return sample.prompt if sample.prompt is not None else (sample.text or "")[:200]


def sample(model: torch.nn.Module, tokenizer, prompts: list[Text], cfg: SFTConfig) -> list[dict[str, str]]:  # noqa: ANN001
    ids = [tokenize_prompt(Sample("sample", prompt=p), tokenizer, cfg.data.chat_template) for p in prompts]
    outs = generate_text(unwrap(model), tokenizer, ids, max_new_tokens=cfg.sample_max_new_tokens)
    shown = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
    return [{"prompt": p, "completion": text} for p, (text, _, _) in zip(shown, outs)]


def train(cfg: SFTConfig, resume: str | None = None) -> Path:
    """Run SFT; returns the folder of the final model. `resume` = 'latest' or a checkpoint path."""
    return launch(_train, cfg, resume)


@dataclass
class _Setup:
    run: Session
    model: torch.nn.Module
    tokenizer: Any
    sampler: BatchSampler
    train_items: list
    eval_items: list
    prompts: list[Text]


def _setup(cfg: SFTConfig, resume: str | None, device: torch.device, info: DistInfo) -> _Setup:
    """Everything before the first step, in the order that writes nothing until all of it succeeded:
    data (validated and tokenized), run folder (claimed and locked), model, session (resume)."""
    quiet_transformers()
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code, cfg.model.revision)
    train_pairs, eval_pairs, skipped = _prepare_data(cfg, tokenizer)
    if skipped:
        print0(info, f"skipped {len(skipped)} invalid row(s) (data.on_error=skip); first: {skipped[0]}")
    train_items = _micro_items([t for t, _ in train_pairs], cfg)
    eval_items = _micro_items([t for t, _ in eval_pairs], cfg)
    check_batch_size(len(train_items), cfg.train.batch_size, info.world_size,
                     what="packed training rows" if cfg.data.packing else "training examples")
    prompts = cfg.sample_prompts or [_prompt_of(s) for _, s in eval_pairs[:3]]
    check(cfg, resume, info)

    model = load_causal_lm(cfg.model, device, tokenizer)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    sampler = BatchSampler(len(train_items), cfg.train.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle, rank=info.rank,
                           world_size=info.world_size, lengths=[len(i.input_ids) for i in train_items],
                           group_by_length=cfg.data.group_by_length)
    run = open_session(cfg, model=model, sampler=sampler, resume=resume, info=info, device=device, recipe="sft")
    trainable, total = count_parameters(model)
    if not run.finished:
        print0(info, f"model {cfg.model.name}: {trainable:,} trainable / {total:,} parameters; {len(train_pairs)} "
                     f"train / {len(eval_pairs)} eval examples; device {device}, {info.world_size} process(es)")
    return _Setup(run, model, tokenizer, sampler, train_items, eval_items, prompts)


def _train(cfg: SFTConfig, resume: str | None, device: torch.device, info: DistInfo) -> Path:
    s = _setup(cfg, resume, device, info)
    run, model, tokenizer, sampler, train_items = s.run, s.model, s.tokenizer, s.sampler, s.train_items
    out = run.run_dir / "model"
    if run.finished:
        run.close()
        return out
    ddp, amp, pad_id = run.ddp, run.amp, tokenizer.pad_token_id

    def log_eval(step: int) -> None:
        if s.eval_items:
            metrics = evaluate(ddp, s.eval_items, cfg, pad_id, device, amp, info)
            run.logger.log(step, metrics)
            print0(info, f"step {step}: eval loss {metrics['eval/loss']:.4f}")
        if s.prompts and info.is_main:
            run.logger.samples(step, "samples", sample(model, tokenizer, s.prompts, cfg))

    if run.start == 0:
        log_eval(0)
    bar = run.progress(cfg.progress, "sft")
    model.train()
    for step in range(run.start + 1, run.steps + 1):
        t0 = time.perf_counter()
        micro = [[train_items[i] for i in sampler.next()] for _ in range(cfg.train.grad_accum)]
        # Normalise by the labeled tokens of the whole step, on all ranks (DDP averages gradients,
        # hence the world_size factor), so every token has the same weight.
        local_tokens = sum(_count_labels(m) for m in micro)
        global_tokens = all_reduce_sum(torch.tensor(float(local_tokens)), info).item()
        denom = max(global_tokens, 1.0) / info.world_size
        stats = torch.zeros(3, dtype=torch.float64)  # nll sum, labeled tokens, correct tokens
        n_input = 0
        for k, items in enumerate(micro):
            batch = _collate(items, cfg, pad_id, device)
            labels = batch.pop("labels")
            n_input += batch["input_ids"].numel()
            with run.no_sync(last=k == len(micro) - 1):
                with autocast(device, amp):
                    logits = ddp(**batch, use_cache=False).logits  # (B, T, V)
                loss, m = sft_loss(logits, labels, num_tokens=denom)
                run.backward(loss)
            stats += torch.tensor([m["nll_sum"].item(), m["num_tokens"].item(), m["num_correct"].item()], dtype=torch.float64)
        grad_norm, lr = run.step(model, step, {"train/loss": stats[0].item() / max(stats[1].item(), 1.0)})

        stats = all_reduce_sum(stats, info)
        train_loss = stats[0].item() / max(stats[1].item(), 1.0)
        elapsed = time.perf_counter() - t0
        tokens_all = all_reduce_sum(torch.tensor(float(n_input)), info).item()
        bar.update(1, int(tokens_all), elapsed, f"loss {train_loss:.4f}")
        run.end_step(step, model=model, sampler=sampler, metrics={
            "train/loss": train_loss, "train/token_accuracy": stats[2].item() / max(stats[1].item(), 1.0),
            "train/lr": lr, "train/grad_norm": grad_norm, "train/tokens_per_s": tokens_all / elapsed,
            "train/step_seconds": elapsed, "train/loss_tokens": stats[1].item(),
        })
        if run.should_eval(step) and s.eval_items:
            run.logger.log(step, evaluate(ddp, s.eval_items, cfg, pad_id, device, amp, info))
        if cfg.sample_every and step % cfg.sample_every == 0 and step != run.steps and s.prompts and info.is_main:
            run.logger.samples(step, "samples", sample(model, tokenizer, s.prompts, cfg))
    bar.close()
    if run.final_eval_due():
        log_eval(run.steps)
    if info.is_main:
        save_final_model(model, tokenizer, out, merge=cfg.lora.merge)
        print(f"saved model to {out}", flush=True)
    run.close()
    return out
