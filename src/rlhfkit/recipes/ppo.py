"""`rlhfkit ppo`: online RL for language models: PPO with a critic, or critic-free RLOO and GRPO.

One step, top to bottom:
1. sample `train.batch_size` prompts (x `rollout.samples_per_prompt`) and generate with the rollout
   engine, which returns token ids, masks and the sampled tokens' log-probs in one pass;
2. decode the completions and score them with the reward sources (reward models with their own
   tokenizer, built-in scorers, `module:function`), minus a penalty for answers that never ended;
   optionally normalize (running statistics) and clip the scores;
3. reference log-probs (the base with adapters disabled under LoRA, a frozen copy otherwise) and the
   critic's values, in no-grad forwards;
4. rewards (rl/shaping.py): per-token `-kl_coef * KL` with the score on the last real token, then GAE
   over tokens (gamma 1, lambda 0.95) and masked whitening; or, for rloo/grpo, one reward per sequence
   turned into leave-one-out / group-normalized advantages;
5. `ppo.epochs` passes over shuffled minibatches: clipped policy loss (+ clipped value loss), each
   token weighted equally across the minibatch on every rank, one guarded optimizer update per
   minibatch; the learning-rate schedule and the adaptive KL controller advance once per step.
Every formula lives in rl/ and losses/ as a tested pure function; this file wires them together.
"""

from __future__ import annotations

import copy
import math
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from safetensors.torch import load_file, save_file

from rlhfkit.config import opt, section
from rlhfkit.data.config import DataConfig, load_train_eval
from rlhfkit.data.formats import RowProblem, Sample
from rlhfkit.data.sampler import BatchSampler, check_batch_size
from rlhfkit.data.tokenize import tokenize_prompt
from rlhfkit.errors import ConfigError
from rlhfkit.losses.logprobs import selected_logprobs
from rlhfkit.losses.ppo import (
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
)
from rlhfkit.models.heads import build_reward_model, init_score_head, load_reward_model
from rlhfkit.models.load import (
    LoraConfig,
    ModelConfig,
    apply_lora,
    count_parameters,
    load_causal_lm,
    load_tokenizer,
    resolve_spec,
)
from rlhfkit.models.save import save_final_model
from rlhfkit.models.wrap import base_model, reference_mode, unwrap
from rlhfkit.rl.advantages import RunningMoments, masked_mean
from rlhfkit.rl.kl import AdaptiveKLController, FixedKLController, kl_penalty
from rlhfkit.rl.rewards import RewardSource, build_reward_sources, metric_names, score_all
from rlhfkit.rl.shaping import Shaped, penalize_unfinished, shape_rewards
from rlhfkit.rollout.engine import Rollout, sample
from rlhfkit.runtime.checkpoint import load_model_weights
from rlhfkit.runtime.distributed import DistInfo, all_reduce_sum, print0
from rlhfkit.runtime.optim import TrainConfig, autocast
from rlhfkit.runtime.seeding import isolated_rng, quiet_transformers, seed_everything
from rlhfkit.runtime.session import RunConfig, Session, check, launch, open_session


@dataclass
class PPODataConfig(DataConfig):
    train: str = opt("", "prompt data (a `prompt` field: string or message list): file, bundled:NAME or HF name")
    max_prompt_length: int = opt(256, "longest prompt in tokens; longer prompts keep their last tokens "
                                      "(data.truncation=right) or are reported (error)", gt=0)


@dataclass
class RolloutConfig:
    max_new_tokens: int = opt(48, "token budget of each completion", gt=0)
    temperature: float = opt(1.0, "sampling temperature; log-probs use the same scale", gt=0.0)
    top_k: int = opt(0, "sample among the k most likely tokens; 0 = off (off-policy when on: log-probs "
                        "are those of the untruncated distribution)", ge=0)
    top_p: float = opt(1.0, "nucleus sampling threshold; 1.0 = off (same caveat as top_k)", gt=0.0, le=1.0)
    samples_per_prompt: int = opt(1, "completions per prompt (k); rloo and grpo need k >= 2", gt=0)
    batch_size: int = opt(0, "prompts per generation batch; 0 = the whole rollout batch at once", ge=0)
    ignore_eos: bool = opt(False, "never stop at EOS: every completion uses max_new_tokens (benchmarks)")
    engine: Literal["dynamic", "static"] = opt("dynamic", "dynamic: eager decode with a growing KV cache (any device); "
                                                          "static: preallocated cache and fixed shapes (for CUDA graphs)")
    compile: bool = opt(False, "engine=static: compile the decode step (CUDA: torch.compile reduce-overhead = CUDA "
                               "graphs; one compile per batch shape)")

    def validate(self) -> None:
        if self.compile and self.engine != "static":
            raise ConfigError("compile", "needs rollout.engine=static (fixed shapes)")


@dataclass
class RewardSourcesConfig:
    sources: list[str] = opt(["sentiment"], "reward sources, each SOURCE or WEIGHT*SOURCE: a reward model "
                                            "folder, sentiment, length, or module:function; summed")
    normalize_model: bool = opt(True, "z-normalize reward-model scores with the statistics saved at training time")
    batch_size: int = opt(16, "reward-model batch size", gt=0)
    max_length: int = opt(1024, "reward-model input limit in tokens (prompt + completion)", gt=1)
    truncation: Literal["left", "error"] = opt(
        "left", "reward-model inputs over max_length: left = score the last max_length tokens (warns once), "
                "error = stop the run")


@dataclass
class ValueConfig:
    mode: Literal["head", "model"] = opt("head", "head: a value head on the policy trunk (one forward, cheap); "
                                                 "model: a separate value network")
    init: str = opt("", "mode=model: a reward model folder (its head starts the critic) or any model spec; "
                        "empty = the policy's model")
    coef: float = opt(0.1, "value-loss weight in the total loss", gt=0.0)
    clip_range: float = opt(0.2, "clip value updates to +-this around the rollout values; 0 = no clipping", ge=0.0)
    warmup_steps: int = opt(0, "critic warm-up: steps that train only the value function (the policy's "
                               "optimizer state does not move)", ge=0)


@dataclass
class PPOAlgoConfig:
    advantage: Literal["gae", "rloo", "grpo"] = opt("gae", "gae (PPO with a critic), rloo (leave-one-out "
                                                          "baseline) or grpo (group-normalized); the last two need no critic")
    epochs: int = opt(2, "optimization passes over each rollout batch", gt=0)
    mini_batch_size: int = opt(8, "completions per optimizer update", gt=0)
    micro_batch_size: int = opt(0, "completions per forward/backward (memory); 0 = the whole minibatch", ge=0)
    clip_range: float = opt(0.2, "PPO ratio clipping epsilon", gt=0.0)
    clip_range_high: float = opt(0.0, "upper clip epsilon when asymmetric (0 = same as clip_range)", ge=0.0)
    gamma: float = opt(1.0, "discount over tokens", ge=0.0, le=1.0)
    lam: float = opt(0.95, "GAE lambda over tokens", ge=0.0, le=1.0)
    kl_coef: float = opt(0.05, "KL penalty coefficient (initial value when adaptive)", ge=0.0)
    kl_estimator: Literal["k1", "k2", "k3"] = opt("k1", "per-token KL estimator (Schulman 2020); as a loss "
                                                       "(kl_in=loss) k2 follows KL(pi||ref), k3 KL(ref||pi), k1 nothing")
    kl_clamp: float = opt(10.0, "clamp each per-token KL estimate to +-this; 0 = off", ge=0.0)
    kl_in: Literal["reward", "loss"] = opt("reward", "reward: penalty folded into the rewards (PPO, RLOO); "
                                                     "loss: k2/k3 estimate added to the policy loss (GRPO's form)")
    adaptive_kl: bool = opt(False, "adapt kl_coef toward target_kl (Ziegler et al. 2019)")
    target_kl: float = opt(6.0, "adaptive KL target: summed KL per completion, in nats", gt=0.0)
    kl_horizon: int = opt(10000, "adaptive KL horizon in completions", gt=0)
    whiten_advantages: bool | None = opt(None, "normalize advantages over the batch (response tokens only); "
                                                "null = on for gae, off for rloo/grpo (it can flip a completion's sign)")
    reward_norm: Literal["none", "running"] = opt("none", "normalize scores with running mean/std (saved in checkpoints)")
    reward_clip: float = opt(0.0, "clip (normalized) scores to +-this; 0 = off", ge=0.0)
    missing_eos_penalty: float = opt(0.0, "subtracted from the score of completions that hit max_new_tokens "
                                          "without EOS", ge=0.0)
    grpo_scale: bool = opt(True, "grpo: divide by the group's std (false = only subtract the mean)")
    recompute_logprobs: bool = opt(False, "always recompute old log-probs with a training forward instead of "
                                          "using the sampler's (done anyway under autocast, for bf16/fp16 weights "
                                          "and with a critic on the trunk)")
    logprob_chunk: int = opt(128, "positions per chunk for log-probs and entropy", gt=0)

    def validate(self) -> None:
        if self.advantage == "gae" and self.kl_in == "loss":
            raise ConfigError("kl_in", "loss mode is for rloo/grpo; PPO with a critic puts the KL in the rewards")
        if self.kl_in == "loss" and self.kl_estimator == "k1":
            raise ConfigError("kl_estimator", "k1 used as a loss has zero expected gradient, so it would regularize "
                                              "nothing; with kl_in=loss use k3 (GRPO's, follows KL(ref||pi)) or k2 "
                                              "(follows KL(pi||ref))")


@dataclass
class PPOConfig(RunConfig):
    output_dir: str = opt("runs/ppo", "run folder: config, metrics, samples, TensorBoard logs, checkpoints, final model")
    seed: int = opt(42, "seed for sampling, LoRA init and prompt order")
    sample_every: int = opt(10, "log sample completions every N steps (samples.jsonl and TensorBoard); 0 = off", ge=0)
    print_samples: int = opt(3, "held-out prompts printed before/after training", ge=0)
    model: ModelConfig = section(ModelConfig, "policy model (also the reference)")
    lora: LoraConfig = section(LoraConfig, "LoRA adapter (the reference is then the base with adapters disabled)")
    data: PPODataConfig = section(PPODataConfig, "prompts")
    rollout: RolloutConfig = section(RolloutConfig, "generation of completions")
    reward: RewardSourcesConfig = section(RewardSourcesConfig, "what the completions are scored by")
    value: ValueConfig = section(ValueConfig, "the critic (advantage=gae only)")
    ppo: PPOAlgoConfig = section(PPOAlgoConfig, "advantages, KL penalty and losses")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5, batch_size=8, max_steps=100, warmup_ratio=0.0,
                                                                   scheduler="constant", eval_batch_size=16),
                               metadata={"help": "optimization (batch_size = prompts per step per process; "
                                                 "max_steps = rollout steps)"})

    CPU_BF16_AUTO: ClassVar[bool] = True
    """train.mixed_precision=auto autocasts sampling and training to bf16 on CPUs with native bf16."""

    def validate(self) -> None:
        super().validate()
        k = self.rollout.samples_per_prompt
        if self.ppo.advantage in ("rloo", "grpo") and k < 2:
            raise ConfigError("rollout.samples_per_prompt", f"advantage={self.ppo.advantage} compares k >= 2 "
                                                            f"completions of each prompt, got {k}")
        if self.train.grad_accum != 1:
            raise ConfigError("train.grad_accum", "PPO does not use it; set ppo.mini_batch_size (completions per "
                                                  "update) and ppo.micro_batch_size (per forward) instead")
        if self.lora.enabled and self.lora.dropout > 0:
            raise ConfigError("lora.dropout", "must be 0 for PPO: the ratio pi/pi_old needs deterministic forwards")
        rollouts = self.train.batch_size * k
        if self.ppo.mini_batch_size > rollouts:
            raise ConfigError("ppo.mini_batch_size", f"{self.ppo.mini_batch_size} is larger than the rollout batch "
                                                     f"(train.batch_size x samples_per_prompt = {rollouts})")


# --------------------------------------------------------------------------------------------------
# Models


@dataclass
class PromptExample:
    ids: list[int]
    prompt: Any
    """The prompt as the data gave it (string or messages): what reward models and functions see."""


def _prompt_example(sample_: Sample, *, tokenizer: Any, d: PPODataConfig) -> PromptExample:
    ids = tokenize_prompt(sample_, tokenizer, d.chat_template)
    if len(ids) > d.max_prompt_length:
        if d.truncation == "error":
            raise RowProblem(f"prompt is longer than data.max_prompt_length ({len(ids)} > {d.max_prompt_length} tokens)")
        ids = ids[-d.max_prompt_length :]
    if not ids:
        raise RowProblem("prompt is empty after tokenization")
    return PromptExample(ids, sample_.prompt)


class PolicyAndValue(torch.nn.Module):
    """The trained modules in one place, so one optimizer, one DDP wrapper and one checkpoint hold them.

    forward() returns the logits for the response positions and the critic's values there: position
    t of the result scores response token t from the state before it (prompt + tokens < t).
    """

    def __init__(self, policy: torch.nn.Module, value_model: torch.nn.Module | None = None,
                 value_head: torch.nn.Linear | None = None):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.value_head = value_head

    @property
    def has_value(self) -> bool:
        return self.value_model is not None or self.value_head is not None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                response_len: int, with_values: bool = True, freeze_trunk_for_value: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        inputs = (input_ids, attention_mask, position_ids, response_len)
        hidden = response_hidden(self.policy, *inputs)
        logits = _lm_head(self.policy)(hidden)
        values = None
        if with_values and self.value_head is not None:
            h = hidden.detach() if freeze_trunk_for_value else hidden  # critic warm-up: the shared trunk stays put
            values = self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()
        elif with_values and self.value_model is not None:
            h = response_hidden(self.value_model, *inputs)
            head = base_model(self.value_model).score
            values = head(h.to(head.weight.dtype)).squeeze(-1).float()
        return logits, values

    # Checkpoint hooks (runtime/checkpoint.py): the policy as usual, the critic in value/.
    def save_pretrained(self, path: str, safe_serialization: bool = True) -> None:
        self.policy.save_pretrained(path, safe_serialization=safe_serialization)
        self.save_value(Path(path) / "value")

    def save_value(self, folder: Path) -> None:
        if self.value_head is not None:
            folder.mkdir(parents=True, exist_ok=True)
            save_file({"weight": self.value_head.weight.detach().contiguous().cpu()}, str(folder / "value_head.safetensors"))
        elif self.value_model is not None:
            self.value_model.save_pretrained(str(folder), safe_serialization=True)

    def load_checkpoint_weights(self, folder: Path) -> None:
        load_model_weights(self.policy, folder)
        if self.value_head is not None:
            weight = load_file(str(folder / "value" / "value_head.safetensors"))["weight"]
            with torch.no_grad():
                self.value_head.weight.copy_(weight)
        elif self.value_model is not None:
            load_model_weights(self.value_model, folder / "value")


def _trunk(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack without the LM/score head (LoRA layers are injected in place, so they apply)."""
    base = base_model(model)
    return getattr(base, base.base_model_prefix)


def _lm_head(model: torch.nn.Module) -> torch.nn.Module:
    return base_model(model).get_output_embeddings()


_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def check_plain_lm_head(model: torch.nn.Module, key: str) -> None:
    """PPO computes logits as lm_head(hidden) on the response positions only; families whose causal-LM
    forward rescales or soft-caps logits afterwards would then disagree with the sampler."""
    config = base_model(model).config
    used = [k for k in _LOGIT_TRANSFORMS if getattr(config, k, None) not in (None, 1, 1.0)]
    if used:
        raise ConfigError(key, f"{type(base_model(model)).__name__} post-processes its logits ({', '.join(used)}), which "
                               "rlhfkit ppo does not reproduce yet; choose another model family")


def build_value(cfg: PPOConfig, policy: torch.nn.Module, tokenizer: Any, device: torch.device
                ) -> tuple[torch.nn.Module | None, torch.nn.Linear | None]:
    """The critic: a zero-initialized head on the policy trunk, or a separate network (from a reward
    model folder, whose head it keeps, or from any model spec with a zero head), LoRA'd like the policy."""
    if cfg.ppo.advantage != "gae":
        return None, None
    if cfg.value.mode == "head":
        hidden = base_model(policy).config.get_text_config().hidden_size
        weight = next(policy.parameters())
        head = torch.nn.Linear(hidden, 1, bias=False, device=weight.device, dtype=torch.float32)
        init_score_head(head, "zeros", cfg.seed)
        return None, head
    spec = cfg.value.init or cfg.model.name
    if resolve_spec(spec).kind == "folder" and _is_reward_folder(spec):
        value, value_tok = load_reward_model(spec, device, cfg.model.trust_remote_code)
        if value_tok.get_vocab() != tokenizer.get_vocab():
            raise ConfigError("value.init", f"{spec} uses a different tokenizer than the policy; the critic reads the "
                                            "policy's tokens, so it must share its vocabulary")
        value.train()  # load_reward_model turned every dropout off (ratios and values must be deterministic)
    else:
        vcfg = ModelConfig(**{**cfg.model.__dict__, "name": spec})
        value = build_reward_model(vcfg, tokenizer, head_init="zeros", seed=cfg.seed, device=device)
        rows = value.get_input_embeddings().weight.size(0)
        if rows < len(tokenizer):
            raise ConfigError("value.init", f"{spec} has {rows} token embeddings but the policy's tokenizer has "
                                            f"{len(tokenizer)} tokens; the critic must share the policy's vocabulary")
    if cfg.lora.enabled:
        value = apply_lora(value, cfg.lora, task_type="SEQ_CLS")
    return value, None


def _is_reward_folder(spec: str) -> bool:
    import json

    config = Path(spec) / "config.json"
    if not config.is_file():
        return False
    archs = json.loads(config.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def response_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor, response_len: int) -> torch.Tensor:
    """Last hidden states at the positions that predict the response tokens: (B, response_len, H).

    Position t of the result is the state before response token t (prompt + tokens < t), which is
    where both the token's logit and the critic's value are read. The LM head is applied by the caller,
    to these positions only."""
    start = input_ids.size(1) - response_len - 1  # the position that predicts response token 0
    return _trunk(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state[:, start:-1]


def _response_logits(model: torch.nn.Module, r: Rollout) -> torch.Tensor:
    hidden = response_hidden(model, r.input_ids, r.attention_mask, r.position_ids, r.response_ids.size(1))
    return _lm_head(model)(hidden)


# --------------------------------------------------------------------------------------------------
# One rollout batch


@dataclass
class Batch:
    rollout: Rollout
    old_logps: torch.Tensor  # (N, R)
    ref_logps: torch.Tensor  # (N, R)
    values: torch.Tensor | None  # (N, R)
    advantages: torch.Tensor  # (N, R)
    returns: torch.Tensor | None  # (N, R)
    mask: torch.Tensor  # (N, R) float


def _chunks(n: int, size: int) -> list[torch.Tensor]:
    size = size or n
    return [torch.arange(s, min(n, s + size)) for s in range(0, n, size)]


def _recompute_old_logprobs(cfg: PPOConfig, model: PolicyAndValue, amp: torch.dtype | None) -> bool:
    """Whether the old log-probs come from a training-style forward instead of the sampler's.

    A full policy forward runs anyway when there is a critic on the trunk. Under autocast, and with
    weights that are not fp32, the cached decode and the full forward round differently (on GPUs the
    kernels differ too), so the first ratio would not be 1: the sampler's log-probs are kept only in
    plain fp32."""
    weights = next(model.policy.parameters()).dtype
    return cfg.ppo.recompute_logprobs or amp is not None or weights != torch.float32 or model.has_value


@torch.no_grad()
def score_rollout(cfg: PPOConfig, model: PolicyAndValue, ref_model: torch.nn.Module | None, r: Rollout,
                  amp: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(old log-probs, reference log-probs, values), each (N, R), in micro-batches."""
    device, temp, chunk = r.response_ids.device, cfg.rollout.temperature, cfg.ppo.logprob_chunk
    mask = r.response_mask.bool()
    old, ref, values = [], [], []
    recompute = _recompute_old_logprobs(cfg, model, amp)
    was = model.training
    model.eval()
    for idx in _chunks(r.response_ids.size(0), cfg.ppo.micro_batch_size or cfg.ppo.mini_batch_size):
        part = r.select(idx)
        targets = part.response_ids
        with autocast(device, amp):
            if recompute:
                logits, v = model(part.input_ids, part.attention_mask, part.position_ids, targets.size(1))
                old.append(selected_logprobs(logits, targets, temperature=temp, chunk_size=chunk))
                if v is not None:
                    values.append(v)
                del logits
            with reference_mode(model.policy, ref_model) as ref_net:
                ref_logits = _response_logits(ref_net, part)
            ref.append(selected_logprobs(ref_logits, targets, temperature=temp, chunk_size=chunk))
    model.train(was)
    old_logps = torch.cat(old) * mask if old else r.logprobs.float() * mask
    values_t = torch.cat(values) * mask if values else None
    return old_logps, torch.cat(ref) * mask, values_t


def shape(cfg: PPOConfig, scores: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor,
          values: torch.Tensor | None, mask: torch.Tensor, kl_coef: float) -> Shaped:
    """rl.shaping.shape_rewards with this run's settings."""
    p = cfg.ppo
    return shape_rewards(scores, old_logps, ref_logps, values, mask, kl_coef=kl_coef, advantage=p.advantage,
                         kl_estimator=p.kl_estimator, kl_clamp=p.kl_clamp or None, kl_in=p.kl_in, gamma=p.gamma,
                         lam=p.lam, samples_per_prompt=cfg.rollout.samples_per_prompt, grpo_scale=p.grpo_scale,
                         whiten_advantages=p.whiten_advantages)


# --------------------------------------------------------------------------------------------------
# The update: `ppo.epochs` passes of minibatch updates over one rollout batch


def minibatch_loss(cfg: PPOConfig, ddp: torch.nn.Module, b: Batch, idx: torch.Tensor, *, critic_only: bool,
                   kl_coef: float, amp: torch.dtype | None) -> tuple[torch.Tensor, dict[str, float]]:
    """The PPO loss of completions `idx` (mean over their real tokens) and its statistics.

    policy: clipped surrogate (+ kl_coef * KL estimate when kl_in=loss); critic: clipped value loss
    weighted by value.coef. During critic warm-up only the value loss is returned."""
    p = cfg.ppo
    r = b.rollout.select(idx)
    mask = b.mask[idx]
    with autocast(r.input_ids.device, amp):
        logits, values = ddp(r.input_ids, r.attention_mask, r.position_ids, r.response_ids.size(1),
                             freeze_trunk_for_value=critic_only)
    logps = selected_logprobs(logits, r.response_ids, temperature=cfg.rollout.temperature, chunk_size=p.logprob_chunk)
    pg_loss, pst = clipped_policy_loss(logps, b.old_logps[idx], b.advantages[idx], mask, clip_range=p.clip_range,
                                       clip_range_high=p.clip_range_high or None)
    stats = {"policy/loss": pg_loss.item(), "policy/clipfrac": pst["clipfrac"].item(),
             "policy/approx_kl": pst["approx_kl"].item(), "policy/ratio": pst["ratio"].item()}
    loss = pg_loss
    if p.kl_in == "loss" and kl_coef > 0:
        kl_term = masked_mean(kl_penalty(logps, b.ref_logps[idx], p.kl_estimator, clamp=p.kl_clamp or None), mask)
        loss = loss + kl_coef * kl_term
        stats["policy/kl_loss"] = kl_term.item()
    if critic_only:
        loss = loss * 0.0  # keeps every parameter in the graph (DDP); the policy's optimizer step is skipped
    if values is not None and b.values is not None and b.returns is not None:
        vf_loss, vclip = clipped_value_loss(values, b.values[idx], b.returns[idx], mask,
                                            clip_range=cfg.value.clip_range or None)
        loss = loss + cfg.value.coef * vf_loss
        stats.update({"val/loss": vf_loss.item(), "val/clipfrac": float(vclip),
                      "val/mean": masked_mean(values.detach(), mask).item()})
    with torch.no_grad():
        stats["objective/entropy"] = masked_mean(
            entropy_from_logits(logits.detach(), temperature=cfg.rollout.temperature, chunk_size=p.logprob_chunk),
            mask).item()
    return loss, stats


def ppo_update(cfg: PPOConfig, run: Session, model: PolicyAndValue, b: Batch, step: int, *, critic_only: bool,
               kl_coef: float) -> dict[str, float]:
    """`ppo.epochs` passes over shuffled minibatches, one guarded optimizer update each; returns the
    token-weighted loss statistics averaged over the updates (and over ranks).

    Every real token of a minibatch weighs the same on every rank: each micro-batch's mean loss is
    scaled by its tokens over the minibatch's tokens summed across ranks (times world_size, since DDP
    averages gradients), as SFT does. During critic warm-up the policy's parameters get no optimizer
    step at all (their gradients are dropped), so Adam's state and weight decay leave them alone.
    """
    p, info = cfg.ppo, run.info
    n = b.mask.size(0)
    totals: dict[str, float] = {}
    updates = 0
    policy_params = [q for q in model.policy.parameters() if q.requires_grad] if critic_only else []
    for _ in range(p.epochs):
        order = torch.randperm(n)
        for mb in [order[s : s + p.mini_batch_size] for s in range(0, n, p.mini_batch_size)]:
            local_tokens = b.mask[mb].sum()
            global_tokens = all_reduce_sum(local_tokens.detach().double().cpu(), info).item()
            scale = info.world_size / max(global_tokens, 1.0)
            micro = [mb[i] for i in _chunks(len(mb), p.micro_batch_size)]
            loss_sum = 0.0
            for j, idx in enumerate(micro):
                with run.no_sync(last=j == len(micro) - 1):
                    loss, st = minibatch_loss(cfg, run.ddp, b, idx, critic_only=critic_only, kl_coef=kl_coef,
                                              amp=run.amp)
                    tokens = b.mask[idx].sum().item()
                    run.backward(loss * tokens * scale)
                loss_sum += loss.item() * tokens
                weight = tokens / max(local_tokens.item(), 1.0)
                for key, value in st.items():
                    totals[key] = totals.get(key, 0.0) + value * weight
            for q in policy_params:
                q.grad = None  # AdamW skips parameters without a gradient: no moment update, no decay
            losses = {"train/loss": loss_sum / max(local_tokens.item(), 1.0)}
            grad_norm = run.update(model, step, losses)
            totals["train/grad_norm"] = totals.get("train/grad_norm", 0.0) + grad_norm
            updates += 1
    out = {key: value / updates for key, value in totals.items()}
    if b.values is not None and b.returns is not None:
        out["val/explained_variance"] = explained_variance(b.values, b.returns, b.mask)
    return all_reduce_mean(out, info)


# --------------------------------------------------------------------------------------------------
# Evaluation on held-out prompts


@dataclass
class EvalResult:
    prompts: list[Any]
    texts: list[str]
    scores: list[float]
    metrics: dict[str, float]


def decode(tokenizer: Any, r: Rollout) -> tuple[list[str], list[list[int]]]:
    """Completion texts and token ids, EOS excluded."""
    texts, out_ids = [], []
    for ids, n, ended in zip(r.response_ids.tolist(), r.response_lengths.tolist(), r.ended.tolist()):
        out_ids.append(ids[: n - int(ended)])
        texts.append(tokenizer.decode(out_ids[-1], skip_special_tokens=True).strip())
    return texts, out_ids


EVAL_SUMS = ("score", "kl", "tokens", "ended", "count")
"""The sums behind the eval metrics (then one per reward source part), all-reduced together."""


@torch.no_grad()
def evaluate(cfg: PPOConfig, s: _Setup, eval_prompts: list[PromptExample], step: int, logger: Any,
             amp: torch.dtype | None) -> EvalResult | None:
    """Sample one completion per held-out prompt (fixed seed, outside the training RNG stream) and
    report the reward, its parts and the per-token KL to the reference."""
    if not eval_prompts:
        return None
    info = s.info
    names = metric_names(s.sources)
    mine = eval_prompts[info.rank :: info.world_size]
    texts, scores_list = [], []
    sums = dict.fromkeys([*EVAL_SUMS, *names], 0.0)
    if mine:  # a rank may hold no eval prompt; it still joins the all-reduce with zeros
        # sampling and reward functions (which may draw from Python's or numpy's RNG) see the same
        # random streams at every evaluation and leave training's streams untouched
        with isolated_rng(cfg.seed + 7919 * (info.rank + 1)):
            r = s.gen(unwrap(s.model.policy), [ex.ids for ex in mine], batch_size=cfg.train.eval_batch_size)
            texts, ids = decode(s.tokenizer, r)
            scores, parts = score_all(s.sources, [ex.prompt for ex in mine], texts, ids)
        mask = r.response_mask.float()
        old, ref, _ = score_rollout(cfg, s.model, s.ref_model, r, amp)
        scores_list = scores.tolist()
        sums.update(score=scores.sum().item(), kl=((old - ref) * mask).sum().item(), tokens=mask.sum().item(),
                    ended=r.ended.float().sum().item(), count=float(len(mine)))
        sums.update({name: value * len(mine) for name, value in zip(names, parts.values())})
    sums = dict(zip(sums, all_reduce_sum(torch.tensor(list(sums.values()), dtype=torch.float64), info).tolist()))
    n = max(sums["count"], 1.0)
    metrics = {"eval/score": sums["score"] / n, "eval/kl_per_token": sums["kl"] / max(sums["tokens"], 1.0),
               "eval/kl": sums["kl"] / n, "eval/length": sums["tokens"] / n, "eval/ended_with_eos": sums["ended"] / n,
               **{f"eval/{name}": sums[name] / n for name in names}}
    logger.log(step, metrics)
    print0(info, f"step {step}: eval score {metrics['eval/score']:+.4f}, KL {metrics['eval/kl_per_token']:.4f} "
                 f"nats/token, length {metrics['eval/length']:.1f}")
    return EvalResult([ex.prompt for ex in mine], texts, scores_list, metrics)


# --------------------------------------------------------------------------------------------------
# Training


def train(cfg: PPOConfig, resume: str | None = None) -> Path:
    """Run PPO/RLOO/GRPO; returns the folder of the final policy. `resume` = 'latest' or a checkpoint."""
    return launch(_train, cfg, resume)


def _gather(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """All ranks' (N,) values concatenated (equal N on every rank)."""
    if not info.enabled:
        return values
    out = torch.zeros(values.numel() * info.world_size, dtype=torch.float64)
    out[info.rank * values.numel() : (info.rank + 1) * values.numel()] = values.double().cpu()
    return all_reduce_sum(out, info).to(values.dtype)


@dataclass
class _Setup:
    run: Session
    model: PolicyAndValue
    ref_model: torch.nn.Module | None
    """A frozen copy of the starting policy; None under LoRA (the base with adapters disabled)."""
    tokenizer: Any
    sources: list[RewardSource]
    sampler: BatchSampler
    prompts: list[PromptExample]
    eval_prompts: list[PromptExample]
    gen: Callable[..., Rollout]
    """The rollout engine with this run's sampling settings: gen(policy, prompt_ids) -> Rollout."""
    kl_ctl: AdaptiveKLController | FixedKLController
    moments: RunningMoments
    info: DistInfo


def _setup(cfg: PPOConfig, resume: str | None, device: torch.device, info: DistInfo) -> _Setup:
    """Prompts, run folder (claimed), reward sources, policy (+ LoRA), reference, critic, session, and
    the running state a checkpoint restores (KL controller, reward statistics)."""
    quiet_transformers()
    seed_everything(cfg.seed + info.rank)  # each rank samples its own completions
    d = cfg.data
    if not d.train.strip():
        raise ConfigError("data.train", "expected prompt data: a file with a `prompt` field, bundled:NAME or an HF name")
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code, cfg.model.revision)
    prompts, eval_prompts, skipped = load_train_eval(d, "prompt", partial(_prompt_example, tokenizer=tokenizer, d=d),
                                                     cfg.seed)
    if skipped:
        print0(info, f"skipped {len(skipped)} invalid row(s) (data.on_error=skip); first: {skipped[0]}")
    check_batch_size(len(prompts), cfg.train.batch_size, info.world_size, what="training prompts")
    check(cfg, resume, info)
    sources = build_reward_sources(cfg.reward.sources, device=device, normalize_model=cfg.reward.normalize_model,
                                   batch_size=cfg.reward.batch_size, max_length=cfg.reward.max_length,
                                   truncation=cfg.reward.truncation)

    policy = load_causal_lm(cfg.model, device, tokenizer)
    check_plain_lm_head(policy, "model.name")
    ref_model = None if cfg.lora.enabled else copy.deepcopy(policy).eval().requires_grad_(False)
    if cfg.lora.enabled:
        policy = apply_lora(policy, cfg.lora)
    value_model, value_head = build_value(cfg, policy, tokenizer, device)
    model = PolicyAndValue(policy, value_model, value_head).to(device)

    sampler = BatchSampler(len(prompts), cfg.train.batch_size, seed=cfg.seed, shuffle=d.shuffle, rank=info.rank,
                           world_size=info.world_size)
    run = open_session(cfg, model=model, sampler=sampler, resume=resume, info=info, device=device, recipe="ppo")
    p = cfg.ppo
    kl_ctl = AdaptiveKLController(p.kl_coef, p.target_kl, p.kl_horizon) if p.adaptive_kl else FixedKLController(p.kl_coef)
    moments = RunningMoments()
    if run.state.get("kl_ctl"):
        kl_ctl.load_state_dict(run.state["kl_ctl"])
    if run.state.get("reward_moments"):
        moments.load_state_dict(run.state["reward_moments"])

    k = cfg.rollout.samples_per_prompt
    if not run.finished:
        trainable, total = count_parameters(model)
        print0(info, f"policy {cfg.model.name}: {trainable:,} trainable / {total:,} parameters; {len(prompts)} train / "
                     f"{len(eval_prompts)} eval prompts; {cfg.train.batch_size} prompts x {k} completions per step"
                     f"{' per process' if info.enabled else ''}; advantage={p.advantage}; reward = "
                     + " + ".join(f"{s.weight:g}*{s.name}" for s in sources))
    eos_ids = [-1] if cfg.rollout.ignore_eos else _eos_ids(tokenizer, unwrap(policy))  # -1: no token matches
    sampler_fn = partial(sample, pad_id=tokenizer.pad_token_id, eos_ids=eos_ids, max_new_tokens=cfg.rollout.max_new_tokens,
                         temperature=cfg.rollout.temperature, top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p,
                         batch_size=cfg.rollout.batch_size * k, engine=cfg.rollout.engine, compile=cfg.rollout.compile)

    def gen(policy_: torch.nn.Module, prompt_ids: list[list[int]], **kw: Any) -> Rollout:
        # Sampling runs under the training autocast too; the old log-probs then come from a training
        # forward (`_recompute_old_logprobs`), so the first ratio is still 1.
        with autocast(device, run.amp):
            return sampler_fn(policy_, prompt_ids, **kw)

    return _Setup(run, model, ref_model, tokenizer, sources, sampler, prompts, eval_prompts, gen, kl_ctl, moments, info)


STEP_SUMS = ("score", "rlhf_reward", "length", "ended", "count")
"""The per-step sums behind the objective/response metrics (then one per reward source part)."""


def _train(cfg: PPOConfig, resume: str | None, device: torch.device, info: DistInfo) -> Path:
    s = _setup(cfg, resume, device, info)
    run, model, p, k = s.run, s.model, cfg.ppo, cfg.rollout.samples_per_prompt
    out = run.run_dir / "model"
    if run.finished:
        run.close()
        return out
    first_eval = evaluate(cfg, s, s.eval_prompts, 0, run.logger, run.amp) if run.start == 0 else None
    bar = run.progress(cfg.progress, p.advantage if p.advantage != "gae" else "ppo")
    model.train()
    for step in range(run.start + 1, run.steps + 1):
        t0 = time.perf_counter()
        # 1. rollouts: k completions of each prompt, with the sampler's log-probs
        batch_prompts = [s.prompts[i] for i in s.sampler.next()]
        rollout = s.gen(unwrap(model.policy), [ex.ids for ex in batch_prompts for _ in range(k)])
        t_gen = time.perf_counter()
        # 2. scores: reward sources, the penalty for never ending, optional running normalization and clip
        texts, ids = decode(s.tokenizer, rollout)
        raw_prompts = [ex.prompt for ex in batch_prompts for _ in range(k)]
        scores, parts = score_all(s.sources, raw_prompts, texts, ids)
        ended = rollout.ended.to(device)
        scores = penalize_unfinished(scores.to(device), ended, p.missing_eos_penalty)
        raw_scores = scores.clone()
        if p.reward_norm == "running":
            s.moments.update(_gather(scores, info))
            scores = (scores - s.moments.mean) / max(s.moments.std, 1e-8)
        if p.reward_clip:
            scores = scores.clamp(-p.reward_clip, p.reward_clip)
        t_score = time.perf_counter()
        # 3.-4. old/reference log-probs and values, then rewards and advantages
        old_logps, ref_logps, values = score_rollout(cfg, model, s.ref_model, rollout, run.amp)
        mask = rollout.response_mask.float()
        kl_coef = s.kl_ctl.value
        shaped = shape(cfg, scores, old_logps, ref_logps, values, mask, kl_coef)
        batch = Batch(rollout, old_logps, ref_logps, values, shaped.advantages, shaped.returns, mask)
        t_prep = time.perf_counter()
        # 5. the PPO update, then the schedule and the KL controller
        critic_only = step <= cfg.value.warmup_steps and model.has_value
        stats = ppo_update(cfg, run, model, batch, step, critic_only=critic_only, kl_coef=kl_coef)
        run.scheduler.step()
        t_train = time.perf_counter()
        seq_kl = all_reduce_sum(torch.tensor([shaped.kl.sum().item(), float(shaped.kl.size(0))], dtype=torch.float64), info)
        mean_kl = (seq_kl[0] / seq_kl[1]).item()
        s.kl_ctl.update(mean_kl, int(seq_kl[1].item()))

        lengths = mask.sum(1)
        n = float(lengths.numel())
        local = {"score": raw_scores.sum().item(), "rlhf_reward": shaped.rlhf_reward.sum().item(),
                 "length": lengths.sum().item(), "ended": ended.float().sum().item(), "count": n,
                 **{name: value * n for name, value in parts.items()}}
        sums = dict(zip(local, all_reduce_sum(torch.tensor(list(local.values()), dtype=torch.float64), info).tolist()))
        count = sums["count"]
        metrics = {
            "objective/scores": sums["score"] / count, "objective/rlhf_reward": sums["rlhf_reward"] / count,
            "objective/kl": mean_kl, "objective/kl_coef": kl_coef,
            "response/length": sums["length"] / count, "response/ended_with_eos": sums["ended"] / count,
            **{name: sums[name] / count for name in parts},
            **stats,
            "train/lr": run.scheduler.get_last_lr()[0],
            "time/generate": t_gen - t0, "time/score": t_score - t_gen, "time/reference_and_values": t_prep - t_score,
            "time/train": t_train - t_prep, "time/step": t_train - t0,
            "time/new_tokens_per_s": sums["length"] / max(t_gen - t0, 1e-9),
        }
        if p.reward_norm == "running":
            metrics.update({"objective/score_mean": s.moments.mean, "objective/score_std": s.moments.std})
        bar.update(1, int(sums["length"]), t_train - t0, f"score {metrics['objective/scores']:+.3f} kl {mean_kl:.3f}")
        if cfg.sample_every and (step % cfg.sample_every == 0 or step == 1):
            run.logger.samples(step, "samples", [
                {"prompt": _short(str(ex)), "completion": t, "score": round(sc, 4)}
                for ex, t, sc in list(zip(raw_prompts, texts, raw_scores.tolist()))[:4]
            ])
        run.end_step(step, model=model, sampler=s.sampler, metrics=metrics,
                     extra_state={"kl_ctl": s.kl_ctl.state_dict(), "reward_moments": s.moments.state_dict()})
        if run.should_eval(step):
            evaluate(cfg, s, s.eval_prompts, step, run.logger, run.amp)
    bar.close()
    last_eval = evaluate(cfg, s, s.eval_prompts, run.steps, run.logger, run.amp) if run.final_eval_due() else None
    if info.is_main:
        save_final_model(model.policy, s.tokenizer, out, merge=cfg.lora.merge)
        if model.has_value:
            model.save_value(run.run_dir / "value")
        print(f"saved policy to {out}", flush=True)
        if first_eval and last_eval:
            _print_before_after(first_eval, last_eval, cfg.print_samples)
    run.close()
    return out


def _eos_ids(tokenizer: Any, model: torch.nn.Module) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, list):
        ids.update(gen_eos)
    if not ids:
        raise ConfigError("model.name", "the tokenizer has no EOS token, so completions could never end")
    return sorted(ids)


def _short(text: str, width: int = 160) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    if not info.enabled:
        return values
    keys = sorted(values)
    summed = all_reduce_sum(torch.tensor([values[k] for k in keys], dtype=torch.float64), info)
    return {k: v / info.world_size for k, v in zip(keys, summed.tolist())}


def _print_before_after(before: EvalResult, after: EvalResult, how_many: int) -> None:
    b, a = before.metrics, after.metrics
    print(f"\nheld-out prompts: score {b['eval/score']:+.4f} -> {a['eval/score']:+.4f}; KL to the reference "
          f"{a['eval/kl_per_token']:.4f} nats/token ({a['eval/kl']:.2f} per completion); "
          f"length {b['eval/length']:.1f} -> {a['eval/length']:.1f} tokens")
    for prompt, t0, s0, t1, s1 in list(zip(before.prompts, before.texts, before.scores, after.texts, after.scores))[:how_many]:
        print(f"\n  prompt: {_short(str(prompt), 100)}")
        print(textwrap.indent(textwrap.fill(f"before ({s0:+.3f}): {t0}", 100), "    "))
        print(textwrap.indent(textwrap.fill(f"after  ({s1:+.3f}): {t1}", 100), "    "))
    if math.isfinite(a["eval/score"]):
        print()
