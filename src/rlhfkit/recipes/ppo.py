"""`rlhfkit ppo`: online RL for language models: PPO with a critic, or critic-free RLOO and GRPO.

One step, top to bottom:
1. sample `train.batch_size` prompts (x `rollout.samples_per_prompt`) and generate with the rollout
   engine, which returns token ids, masks and the sampled tokens' log-probs in one pass;
2. decode the completions and score them with the reward sources (reward models with their own
   tokenizer, built-in scorers, `module:function`), minus a penalty for answers that never ended;
   optionally normalize (running statistics) and clip the scores;
3. reference log-probs (the base with adapters disabled under LoRA, a frozen copy otherwise) and the
   critic's values, in no-grad forwards;
4. rewards: per-token `-kl_coef * KL` with the score on the last real token, then GAE over tokens
   (gamma 1, lambda 0.95) and masked whitening; or, for rloo/grpo, one reward per sequence turned
   into leave-one-out / group-normalized advantages;
5. `ppo.epochs` passes over shuffled minibatches: clipped policy loss (+ clipped value loss), one
   optimizer update per minibatch; the learning-rate schedule and the adaptive KL controller advance
   once per step.
Every formula lives in rl/ and losses/ as a tested pure function; this file wires them together.
"""

from __future__ import annotations

import contextlib
import copy
import math
import textwrap
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from rlhfkit.config import opt, section
from rlhfkit.data.config import DataConfig, load_train_eval
from rlhfkit.data.formats import RowProblem, Sample
from rlhfkit.data.sampler import BatchSampler
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
    resolve_device,
    resolve_spec,
)
from rlhfkit.recipes.sft import save_final_model
from rlhfkit.rl.advantages import (
    RunningMoments,
    grpo_advantages,
    masked_mean,
    rloo_advantages,
    token_gae,
    whiten,
)
from rlhfkit.rl.kl import AdaptiveKLController, FixedKLController, kl_penalty
from rlhfkit.rl.rewards import RewardSource, build_reward_sources, metric_names, score_all
from rlhfkit.rollout.engine import Rollout, sample
from rlhfkit.runtime.checkpoint import is_peft, load_model_weights, unwrap
from rlhfkit.runtime.distributed import DistInfo, all_reduce_sum, local_rank_from_env, print0, run_on_ranks
from rlhfkit.runtime.loop import TrainConfig, apply_gradients, autocast, check_run_dir
from rlhfkit.runtime.seeding import isolated_rng, quiet_transformers, seed_everything
from rlhfkit.runtime.session import open_session


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
class RewardConfig:
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
    warmup_steps: int = opt(0, "critic warm-up: steps that train only the value function", ge=0)


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
    kl_estimator: Literal["k1", "k2", "k3"] = opt("k1", "per-token KL estimator (Schulman 2020)")
    kl_clamp: float = opt(10.0, "clamp the per-token log-ratio to +-this before the estimator; 0 = off", ge=0.0)
    kl_in: Literal["reward", "loss"] = opt("reward", "reward: penalty folded into the rewards (PPO, RLOO); "
                                                     "loss: k-estimator added to the policy loss (GRPO's form)")
    adaptive_kl: bool = opt(False, "adapt kl_coef toward target_kl (Ziegler et al. 2019)")
    target_kl: float = opt(6.0, "adaptive KL target: summed KL per completion, in nats", gt=0.0)
    kl_horizon: int = opt(10000, "adaptive KL horizon in completions", gt=0)
    whiten_advantages: bool = opt(True, "normalize advantages over the batch (response tokens only)")
    reward_norm: Literal["none", "running"] = opt("none", "normalize scores with running mean/std (saved in checkpoints)")
    reward_clip: float = opt(0.0, "clip (normalized) scores to +-this; 0 = off", ge=0.0)
    missing_eos_penalty: float = opt(0.0, "subtracted from the score of completions that hit max_new_tokens "
                                          "without EOS", ge=0.0)
    grpo_scale: bool = opt(True, "grpo: divide by the group's std (false = only subtract the mean)")
    recompute_logprobs: bool = opt(False, "recompute old log-probs with a training forward instead of using the "
                                          "sampler's (they agree in fp32; use under bf16/fp16 autocast)")
    logprob_chunk: int = opt(128, "positions per chunk for log-probs and entropy", gt=0)

    def validate(self) -> None:
        if self.advantage == "gae" and self.kl_in == "loss":
            raise ConfigError("kl_in", "loss mode is for rloo/grpo; PPO with a critic puts the KL in the rewards")


@dataclass
class PPOConfig:
    output_dir: str = opt("runs/ppo", "run folder: config, metrics, samples, TensorBoard logs, checkpoints, final model")
    overwrite: bool = opt(False, "replace an existing run in output_dir instead of refusing")
    seed: int = opt(42, "seed for sampling, LoRA init and prompt order")
    progress: bool = opt(True, "show a progress bar")
    tensorboard: bool = opt(True, "write TensorBoard logs to output_dir/tensorboard")
    sample_every: int = opt(10, "log sample completions every N steps (samples.jsonl and TensorBoard); 0 = off", ge=0)
    print_samples: int = opt(3, "held-out prompts printed before/after training", ge=0)
    model: ModelConfig = section(ModelConfig, "policy model (also the reference)")
    lora: LoraConfig = section(LoraConfig, "LoRA adapter (the reference is then the base with adapters disabled)")
    data: PPODataConfig = section(PPODataConfig, "prompts")
    rollout: RolloutConfig = section(RolloutConfig, "generation of completions")
    reward: RewardConfig = section(RewardConfig, "what the completions are scored by")
    value: ValueConfig = section(ValueConfig, "the critic (advantage=gae only)")
    ppo: PPOAlgoConfig = section(PPOAlgoConfig, "advantages, KL penalty and losses")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5, batch_size=8, max_steps=100, warmup_ratio=0.0,
                                                                   scheduler="constant", eval_batch_size=16),
                               metadata={"help": "optimization (batch_size = prompts per step per process; "
                                                 "max_steps = rollout steps)"})

    def validate(self) -> None:
        if not self.output_dir.strip():
            raise ConfigError("output_dir", "expected a folder path for the run")
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
            head = _base(self.value_model).score
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


def _base(model: torch.nn.Module) -> torch.nn.Module:
    model = unwrap(model)
    return model.get_base_model() if is_peft(model) else model


def _trunk(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack without the LM/score head (LoRA layers are injected in place, so they apply)."""
    base = _base(model)
    return getattr(base, base.base_model_prefix)


def _lm_head(model: torch.nn.Module) -> torch.nn.Module:
    return _base(model).get_output_embeddings()


_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def check_plain_lm_head(model: torch.nn.Module, key: str) -> None:
    """PPO computes logits as lm_head(hidden) on the response positions only; families whose causal-LM
    forward rescales or soft-caps logits afterwards would then disagree with the sampler."""
    config = _base(model).config
    used = [k for k in _LOGIT_TRANSFORMS if getattr(config, k, None) not in (None, 1, 1.0)]
    if used:
        raise ConfigError(key, f"{type(_base(model)).__name__} post-processes its logits ({', '.join(used)}), which "
                               "rlhfkit ppo does not reproduce yet; choose another model family")


def build_value(cfg: PPOConfig, policy: torch.nn.Module, tokenizer: Any, device: torch.device
                ) -> tuple[torch.nn.Module | None, torch.nn.Linear | None]:
    """The critic: a zero-initialized head on the policy trunk, or a separate network (from a reward
    model folder, whose head it keeps, or from any model spec with a zero head), LoRA'd like the policy."""
    if cfg.ppo.advantage != "gae":
        return None, None
    if cfg.value.mode == "head":
        hidden = _base(policy).config.get_text_config().hidden_size
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
        for module in value.modules():  # dropout off, as in every model here (ratios and values must be deterministic)
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        value.train()
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


@contextlib.contextmanager
def reference_mode(policy: torch.nn.Module, ref_model: torch.nn.Module | None):
    """The module that computes reference log-probs: the frozen copy, or the policy with adapters off."""
    if ref_model is not None:
        yield ref_model
    else:
        with unwrap(policy).disable_adapter():
            yield policy


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


@torch.no_grad()
def score_rollout(cfg: PPOConfig, model: PolicyAndValue, ref_model: torch.nn.Module | None, r: Rollout,
                  amp: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(old log-probs, reference log-probs, values), each (N, R), in micro-batches."""
    device, temp, chunk = r.response_ids.device, cfg.rollout.temperature, cfg.ppo.logprob_chunk
    mask = r.response_mask.bool()
    old, ref, values = [], [], []
    # A full policy forward runs anyway when there is a critic on the trunk; under autocast the cached
    # decode and the full forward round differently, so the sampler's log-probs are kept only otherwise.
    recompute = cfg.ppo.recompute_logprobs or amp is not None or model.has_value
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


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards (N, R): -kl_coef * KL on every response token, plus the completion's score
    on its last real token (responses are right-padded: never on padding; empty rows get nothing)."""
    rewards = -kl_coef * kl * mask
    lengths = mask.sum(1).long()
    rows = torch.arange(scores.numel(), device=scores.device)
    return rewards.index_put((rows, (lengths - 1).clamp(min=0)), scores * (lengths > 0), accumulate=True)


def penalize_unfinished(scores: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract `penalty` from the scores of completions that used the whole budget without EOS."""
    return scores - penalty * (~ended.bool()).to(scores.dtype)


def shape_rewards(cfg: PPOConfig, scores: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor,
                  values: torch.Tensor | None, mask: torch.Tensor, kl_coef: float
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Advantages, returns (gae only), per-token KL and the per-completion RLHF reward.

    gae: r_t = -kl_coef * KL_t on every response token, + score on the last real token; GAE over
    tokens; masked whitening. rloo/grpo: R = score - kl_coef * sum_t KL_t (kl_in=reward) or the score
    alone (kl_in=loss), turned into per-completion advantages broadcast over the tokens.
    """
    p = cfg.ppo
    kl = kl_penalty(old_logps, ref_logps, p.kl_estimator, clamp=p.kl_clamp or None) * mask  # (N, R)
    if p.advantage == "gae":
        rewards = token_rewards(scores, kl, mask, kl_coef)
        assert values is not None
        advantages, returns = token_gae(rewards, values, mask, gamma=p.gamma, lam=p.lam)
        rlhf_reward = (rewards * mask).sum(1)
    else:
        rlhf_reward = scores - kl_coef * kl.sum(1) if p.kl_in == "reward" else scores.clone()
        k = cfg.rollout.samples_per_prompt
        seq = rloo_advantages(rlhf_reward, k) if p.advantage == "rloo" else grpo_advantages(rlhf_reward, k, scale=p.grpo_scale)
        advantages, returns = seq[:, None] * mask, None
    if p.whiten_advantages:
        advantages = whiten(advantages, mask)
    return advantages * mask, returns, kl, rlhf_reward


# --------------------------------------------------------------------------------------------------
# Training


def train(cfg: PPOConfig, resume: str | None = None) -> Path:
    """Run PPO/RLOO/GRPO; returns the folder of the final policy. `resume` = 'latest' or a checkpoint."""
    device = resolve_device(cfg.model.device, local_rank_from_env())
    return run_on_ranks(lambda info: _train(cfg, resume, device, info), device)


def _gather(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """All ranks' (N,) values concatenated (equal N on every rank)."""
    if not info.enabled:
        return values
    out = torch.zeros(values.numel() * info.world_size, dtype=torch.float64)
    out[info.rank * values.numel() : (info.rank + 1) * values.numel()] = values.double().cpu()
    return all_reduce_sum(out, info).to(values.dtype)


def _train(cfg: PPOConfig, resume: str | None, device: torch.device, info: DistInfo) -> Path:
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
    check_run_dir(cfg.output_dir, resume=resume, overwrite=cfg.overwrite, info=info)
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
    run = open_session(cfg, model=model, sampler=sampler, resume=resume, info=info, device=device)
    if run.finished:
        return run.run_dir / "model"
    p = cfg.ppo
    kl_ctl = AdaptiveKLController(p.kl_coef, p.target_kl, p.kl_horizon) if p.adaptive_kl else FixedKLController(p.kl_coef)
    moments = RunningMoments()
    if run.state.get("kl_ctl"):
        kl_ctl.load_state_dict(run.state["kl_ctl"])
    if run.state.get("reward_moments"):
        moments.load_state_dict(run.state["reward_moments"])

    trainable, total = count_parameters(model)
    k = cfg.rollout.samples_per_prompt
    print0(info, f"policy {cfg.model.name}: {trainable:,} trainable / {total:,} parameters; {len(prompts)} train / "
                 f"{len(eval_prompts)} eval prompts; {cfg.train.batch_size} prompts x {k} completions per step"
                 f"{' per process' if info.enabled else ''}; advantage={p.advantage}; reward = "
                 + " + ".join(f"{s.weight:g}*{s.name}" for s in sources))
    eos_ids = [-1] if cfg.rollout.ignore_eos else _eos_ids(tokenizer, unwrap(policy))  # -1: no token matches
    gen = partial(sample, pad_id=tokenizer.pad_token_id, eos_ids=eos_ids, max_new_tokens=cfg.rollout.max_new_tokens,
                  temperature=cfg.rollout.temperature, top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p,
                  batch_size=cfg.rollout.batch_size * k, engine=cfg.rollout.engine, compile=cfg.rollout.compile)
    ctx = _Context(cfg, model, ref_model, sources, tokenizer, gen, run.amp, info, device)

    first_eval = None
    if run.start == 0:
        first_eval = ctx.evaluate(eval_prompts, 0, run.logger)
    bar = run.progress(cfg.progress, p.advantage if p.advantage != "gae" else "ppo")
    ddp = run.ddp
    model.train()
    for step in range(run.start + 1, run.steps + 1):
        t0 = time.perf_counter()
        batch_prompts = [prompts[i] for i in sampler.next()]
        rollout = gen(unwrap(policy), [ex.ids for ex in batch_prompts for _ in range(k)])
        t_gen = time.perf_counter()
        texts, ids = ctx.decode(rollout)
        raw_prompts = [ex.prompt for ex in batch_prompts for _ in range(k)]
        scores, parts = score_all(sources, raw_prompts, texts, ids)
        ended = rollout.ended.to(device)
        scores = penalize_unfinished(scores.to(device), ended, p.missing_eos_penalty)
        raw_scores = scores.clone()
        if p.reward_norm == "running":
            moments.update(_gather(scores, info))
            scores = (scores - moments.mean) / max(moments.std, 1e-8)
        if p.reward_clip:
            scores = scores.clamp(-p.reward_clip, p.reward_clip)
        t_score = time.perf_counter()

        old_logps, ref_logps, values = score_rollout(cfg, model, ref_model, rollout, run.amp)
        mask = rollout.response_mask.float()
        advantages, returns, kl, rlhf_reward = shape_rewards(cfg, scores, old_logps, ref_logps, values, mask, kl_ctl.value)
        batch = Batch(rollout, old_logps, ref_logps, values, advantages, returns, mask)
        t_prep = time.perf_counter()

        critic_only = step <= cfg.value.warmup_steps and model.has_value
        kl_coef_used = kl_ctl.value
        stats = ctx.optimize(ddp, batch, run, critic_only, kl_coef_used)
        run.scheduler.step()
        t_train = time.perf_counter()

        seq_kl = all_reduce_sum(torch.tensor([kl.sum().item(), float(kl.size(0))], dtype=torch.float64), info)
        mean_kl = (seq_kl[0] / seq_kl[1]).item()
        kl_ctl.update(mean_kl, int(seq_kl[1].item()))
        lengths = mask.sum(1)
        sums = all_reduce_sum(torch.tensor([
            raw_scores.sum().item(), rlhf_reward.sum().item(), lengths.sum().item(), ended.float().sum().item(),
            float(lengths.numel()), *(v * lengths.numel() for v in parts.values()),
        ], dtype=torch.float64), info)
        n = sums[4].item()
        metrics = {
            "objective/scores": sums[0].item() / n, "objective/rlhf_reward": sums[1].item() / n,
            "objective/kl": mean_kl, "objective/kl_coef": kl_coef_used,
            "response/length": sums[2].item() / n, "response/ended_with_eos": sums[3].item() / n,
            **{name: sums[5 + i].item() / n for i, name in enumerate(parts)},
            **stats,
            "train/lr": run.scheduler.get_last_lr()[0],
            "time/generate": t_gen - t0, "time/score": t_score - t_gen, "time/reference_and_values": t_prep - t_score,
            "time/train": t_train - t_prep, "time/step": t_train - t0,
            "time/new_tokens_per_s": sums[2].item() / max(t_gen - t0, 1e-9),
        }
        if p.reward_norm == "running":
            metrics.update({"objective/score_mean": moments.mean, "objective/score_std": moments.std})
        bar.update(1, int(sums[2].item()), t_train - t0,
                   f"score {metrics['objective/scores']:+.3f} kl {mean_kl:.3f}")
        if cfg.sample_every and (step % cfg.sample_every == 0 or step == 1):
            run.logger.samples(step, "samples", [
                {"prompt": _short(str(ex)), "completion": t, "score": round(s, 4)}
                for ex, t, s in list(zip(raw_prompts, texts, raw_scores.tolist()))[:4]
            ])
        run.end_step(step, model=model, sampler=sampler, metrics=metrics,
                     extra_state={"kl_ctl": kl_ctl.state_dict(), "reward_moments": moments.state_dict()})
        if run.should_eval(step):
            ctx.evaluate(eval_prompts, step, run.logger)
    bar.close()
    last_eval = ctx.evaluate(eval_prompts, run.steps, run.logger)
    out = run.run_dir / "model"
    if info.is_main:
        save_final_model(policy, tokenizer, out, merge=cfg.lora.merge)
        if model.has_value:
            model.save_value(run.run_dir / "value")
        print(f"saved policy to {out}", flush=True)
        if first_eval and last_eval:
            _print_before_after(first_eval, last_eval, cfg.print_samples)
    run.logger.close()
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


@dataclass
class EvalResult:
    prompts: list[Any]
    texts: list[str]
    scores: list[float]
    metrics: dict[str, float]


class _Context:
    """What the loop's helpers share (kept out of the loop body to keep it readable)."""

    def __init__(self, cfg: PPOConfig, model: PolicyAndValue, ref_model: torch.nn.Module | None,
                 sources: list[RewardSource], tokenizer: Any, gen: Any, amp: torch.dtype | None, info: DistInfo,
                 device: torch.device):
        self.cfg, self.model, self.ref_model, self.sources = cfg, model, ref_model, sources
        self.tokenizer, self.gen, self.amp, self.info, self.device = tokenizer, gen, amp, info, device

    def decode(self, r: Rollout) -> tuple[list[str], list[list[int]]]:
        """Completion texts and token ids, EOS excluded."""
        texts, out_ids = [], []
        for ids, n, ended in zip(r.response_ids.tolist(), r.response_lengths.tolist(), r.ended.tolist()):
            out_ids.append(ids[: n - int(ended)])
            texts.append(self.tokenizer.decode(out_ids[-1], skip_special_tokens=True).strip())
        return texts, out_ids

    def optimize(self, ddp: torch.nn.Module, b: Batch, run: Any, critic_only: bool, kl_coef: float) -> dict[str, float]:
        """`ppo.epochs` passes of minibatch updates; returns the averaged loss statistics."""
        cfg, p = self.cfg, self.cfg.ppo
        n = b.mask.size(0)
        totals: dict[str, float] = {}
        counts = 0
        for _ in range(p.epochs):
            order = torch.randperm(n)
            for mb in [order[s : s + p.mini_batch_size] for s in range(0, n, p.mini_batch_size)]:
                mb_tokens = b.mask[mb].sum().clamp(min=1.0)
                micro = [mb[i] for i in _chunks(len(mb), p.micro_batch_size)]
                for j, idx in enumerate(micro):
                    sync = j == len(micro) - 1 or not self.info.enabled
                    with ddp.no_sync() if not sync else contextlib.nullcontext():
                        loss, st = self._loss(ddp, b, idx, critic_only, kl_coef)
                        weight = b.mask[idx].sum() / mb_tokens
                        scaled = loss * weight
                        (run.scaler.scale(scaled) if run.scaler else scaled).backward()
                    for key, value in st.items():
                        totals[key] = totals.get(key, 0.0) + value * weight.item()
                grad_norm = apply_gradients(self.model, run.optimizer, cfg.train.max_grad_norm, run.scaler)
                totals["train/grad_norm"] = totals.get("train/grad_norm", 0.0) + grad_norm
                counts += 1
        out = {key: value / counts for key, value in totals.items()}
        if b.values is not None and b.returns is not None:
            out["val/explained_variance"] = explained_variance(b.values, b.returns, b.mask)
        return all_reduce_mean(out, self.info)

    def _loss(self, ddp: torch.nn.Module, b: Batch, idx: torch.Tensor, critic_only: bool, kl_coef: float
              ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, p = self.cfg, self.cfg.ppo
        r = b.rollout.select(idx)
        mask = b.mask[idx]
        with autocast(self.device, self.amp):
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
            loss = loss * 0.0  # keeps every parameter in the graph (DDP) while only the critic learns
        if values is not None and b.values is not None and b.returns is not None:
            vf_loss, vclip = clipped_value_loss(values, b.values[idx], b.returns[idx], mask,
                                                clip_range=cfg.value.clip_range or None)
            loss = loss + cfg.value.coef * vf_loss
            stats.update({"val/loss": vf_loss.item(), "val/clipfrac": float(vclip), "val/mean": masked_mean(values.detach(), mask).item()})
        with torch.no_grad():
            stats["objective/entropy"] = masked_mean(
                entropy_from_logits(logits.detach(), temperature=cfg.rollout.temperature, chunk_size=p.logprob_chunk),
                mask).item()
        return loss, stats

    @torch.no_grad()
    def evaluate(self, eval_prompts: list[PromptExample], step: int, logger: Any) -> EvalResult | None:
        """Sample one completion per held-out prompt (fixed seed, outside the training RNG stream) and
        report the reward, its parts and the per-token KL to the reference."""
        if not eval_prompts:
            return None
        mine = eval_prompts[self.info.rank :: self.info.world_size]
        texts, scores_list, totals = [], [], [0.0] * (5 + len(self.sources))
        if mine:  # a rank may hold no eval prompt; it still joins the all-reduce with zeros
            # sampling and reward functions (which may draw from Python's or numpy's RNG) see the same
            # random streams at every evaluation and leave training's streams untouched
            with isolated_rng(self.cfg.seed + 7919 * (self.info.rank + 1)):
                r = self.gen(unwrap(self.model.policy), [ex.ids for ex in mine], batch_size=self.cfg.train.eval_batch_size)
                texts, ids = self.decode(r)
                scores, parts = score_all(self.sources, [ex.prompt for ex in mine], texts, ids)
            mask = r.response_mask.float()
            old, ref, _ = score_rollout(self.cfg, self.model, self.ref_model, r, self.amp)
            kl = ((old - ref) * mask).sum()
            scores_list = scores.tolist()
            totals = [scores.sum().item(), kl.item(), mask.sum().item(), r.ended.float().sum().item(), float(len(mine)),
                      *(v * len(mine) for v in parts.values())]
        sums = all_reduce_sum(torch.tensor(totals, dtype=torch.float64), self.info)
        names = metric_names(self.sources)
        n = max(sums[4].item(), 1.0)
        metrics = {"eval/score": sums[0].item() / n, "eval/kl_per_token": sums[1].item() / max(sums[2].item(), 1.0),
                   "eval/kl": sums[1].item() / n, "eval/length": sums[2].item() / n, "eval/ended_with_eos": sums[3].item() / n,
                   **{f"eval/{name}": sums[5 + i].item() / n for i, name in enumerate(names)}}
        logger.log(step, metrics)
        print0(self.info, f"step {step}: eval score {metrics['eval/score']:+.4f}, KL {metrics['eval/kl_per_token']:.4f} "
                          f"nats/token, length {metrics['eval/length']:.1f}")
        return EvalResult([ex.prompt for ex in mine], texts, scores_list, metrics)


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
