"""`rlhfkit gym ppo`: PPO on gymnasium environments (discrete or continuous actions), one process or
many under torchrun (decentralized: each rank runs its own envs; gradients are averaged every minibatch).

One update, top to bottom: collect `ppo.n_steps` steps from `env.num_envs` environments with the current
policy (observations normalized with running statistics if asked; truncated episodes keep the value of
their real final observation for bootstrapping), compute GAE with `rlhfkit.rl.advantages.gae` (the same
function the language-model PPO uses), then `ppo.epochs` passes of shuffled minibatches with the clipped
surrogate (`rlhfkit.losses.ppo`), optional value clipping, an entropy bonus, and a global grad-norm clip.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist

from rlhfkit.config import opt, section
from rlhfkit.errors import ConfigError
from rlhfkit.gym.common import (
    EnvConfig,
    EpisodeTracker,
    GymEvalConfig,
    GymRunConfig,
    GymSession,
    ObsNormalizer,
    RewardScaler,
    SavableAgent,
    UpdateLoop,
    evaluate_policy,
    layer_init,
    make_env,
    make_vector_env,
    mlp,
    open_gym_session,
    sample_categorical,
)
from rlhfkit.gym.fastgrad import FlatParams, PPOGrad
from rlhfkit.losses.ppo import clipped_policy_loss, clipped_value_loss, explained_variance
from rlhfkit.rl.advantages import bootstrap_next_values, gae
from rlhfkit.runtime.atomic import atomic_folder
from rlhfkit.runtime.distributed import DistInfo, all_reduce_sum, barrier, print0, run_on_ranks
from rlhfkit.runtime.optim import NonFiniteError
from rlhfkit.runtime.seeding import seed_everything


@dataclass
class NetConfig:
    hidden: list[int] = opt([64, 64], "hidden layer sizes of the policy and value MLPs")
    activation: Literal["tanh", "relu"] = opt("tanh", "hidden activation")
    shared: bool = opt(False, "one trunk for policy and value (default: separate networks)")
    ortho_init: bool = opt(True, "orthogonal init: gain sqrt(2) hidden, 0.01 policy head, 1.0 value head")
    log_std_init: float = opt(0.0, "initial log std of the Gaussian policy (Box actions)")


@dataclass
class PPOUpdateConfig:
    """PPO's rollout and update options, shared by `gym ppo` and `gym mappo` (which changes defaults)."""

    total_steps: int = opt(100_000, "environment steps over all envs and processes", gt=0)
    n_steps: int = opt(128, "steps per environment per update", gt=0)
    epochs: int = opt(10, "passes over each rollout", gt=0)
    minibatches: int = opt(4, "minibatches per pass (rollout size / minibatches per update)", gt=0)
    lr: float = opt(3e-4, "Adam learning rate", gt=0.0)
    anneal_lr: bool = opt(True, "decay the learning rate linearly to 0 over the run")
    adam_eps: float = opt(1e-5, "Adam epsilon", gt=0.0)
    gamma: float = opt(0.99, "discount", ge=0.0, le=1.0)
    lam: float = opt(0.95, "GAE lambda", ge=0.0, le=1.0)
    clip_range: float = opt(0.2, "ratio clipping epsilon", gt=0.0)
    clip_range_vf: float = opt(0.0, "value clipping around the rollout values; 0 = off", ge=0.0)
    ent_coef: float = opt(0.0, "entropy bonus weight", ge=0.0)
    vf_coef: float = opt(0.5, "value-loss weight", ge=0.0)
    max_grad_norm: float = opt(0.5, "global gradient-norm clip; 0 = off", ge=0.0)
    norm_adv: bool = opt(True, "normalize advantages per minibatch")
    target_kl: float = opt(0.0, "stop the epochs of an update once approx KL exceeds this; 0 = never", ge=0.0)
    grad: str = opt("auto", "gradients: auto (hand-written when the agent allows, else autograd), autograd, or "
                            "manual (hand-written, gym/fastgrad.py; an error if the agent has none)")


@dataclass
class GymPPOAlgo(PPOUpdateConfig):
    normalize_obs: bool = opt(False, "normalize observations with running mean/std (saved with the agent)")
    normalize_reward: bool = opt(False, "scale rewards by the running std of the discounted return")
    clip_obs: float = opt(10.0, "clip normalized observations to +-this", gt=0.0)


@dataclass
class GymPPOConfig(GymRunConfig):
    output_dir: str = opt("runs/gym-ppo", "run folder: config, metrics, checkpoints, agent")
    env: EnvConfig = section(EnvConfig, "environment")
    net: NetConfig = section(NetConfig, "networks")
    ppo: GymPPOAlgo = section(GymPPOAlgo, "PPO")
    eval: GymEvalConfig = section(GymEvalConfig, "evaluation")

    def validate(self) -> None:
        super().validate()
        batch = self.env.num_envs * self.ppo.n_steps
        if self.ppo.minibatches > batch:
            raise ConfigError("ppo.minibatches", f"{self.ppo.minibatches} minibatches for a rollout of {batch} steps")


# --------------------------------------------------------------------------------------------------
# Agent


class ActorCritic(SavableAgent):
    """Separate (or shared-trunk) MLPs; categorical policy for Discrete, diagonal Gaussian with a
    state-independent log std for Box actions."""

    def __init__(self, obs_dim: int, action_kind: str, action_dim: int, net: dict[str, Any]):
        super().__init__()
        self.obs_dim, self.action_kind, self.action_dim, self.net = obs_dim, action_kind, action_dim, dict(net)
        self.context: dict[str, Any] = {}
        """Written into agent.json with the weights: the env config and observation normalization."""
        hidden, act, ortho = list(net["hidden"]), net["activation"], net["ortho_init"]
        if net["shared"]:
            trunk = mlp([obs_dim, *hidden], act, np.sqrt(2), ortho)
            self.trunk = torch.nn.Sequential(trunk, {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}[act]())
            self.actor = layer_init(torch.nn.Linear(hidden[-1], action_dim), 0.01, ortho)
            self.critic = layer_init(torch.nn.Linear(hidden[-1], 1), 1.0, ortho)
        else:
            self.trunk = torch.nn.Identity()
            self.actor = mlp([obs_dim, *hidden, action_dim], act, 0.01, ortho)
            self.critic = mlp([obs_dim, *hidden, 1], act, 1.0, ortho)
        if action_kind == "box":
            self.log_std = torch.nn.Parameter(torch.full((action_dim,), float(net["log_std_init"])))

    def spec(self) -> dict[str, Any]:
        return {"type": "ppo", "obs_dim": self.obs_dim, "action_kind": self.action_kind,
                "action_dim": self.action_dim, "net": self.net, **self.context}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ActorCritic:
        return cls(spec["obs_dim"], spec["action_kind"], spec["action_dim"], spec["net"])

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.trunk(obs)).squeeze(-1)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(policy output, value): log-probs of every action (Discrete) or the Gaussian mean (Box).

        The distributions are written out instead of using torch.distributions, whose per-call argument
        checks cost more than the 64-unit networks themselves."""
        h = self.trunk(obs)
        out = self.actor(h)
        if self.action_kind == "discrete":
            out = torch.log_softmax(out, dim=-1)
        return out, self.critic(h).squeeze(-1)

    def sample(self, out: torch.Tensor) -> torch.Tensor:
        if self.action_kind == "discrete":
            return sample_categorical(out)
        return out + self.log_std.exp() * torch.randn_like(out)

    def grad_parts(self) -> tuple[torch.nn.Sequential, torch.nn.Sequential, slice, slice] | None:
        """What `rlhfkit.gym.fastgrad.PPOGrad` needs: actor and critic MLPs and their input columns."""
        if self.net["shared"]:
            return None
        return self.actor, self.critic, slice(None), slice(None)  # type: ignore[return-value]

    def log_prob(self, out: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        if self.action_kind == "discrete":
            return out.gather(-1, action.long().unsqueeze(-1)).squeeze(-1)
        z = (action - out) / self.log_std.exp()
        return (-0.5 * z**2 - self.log_std - _HALF_LOG_2PI).sum(-1)

    def entropy(self, out: torch.Tensor) -> torch.Tensor:
        if self.action_kind == "discrete":
            return -(out.exp() * out).sum(-1)
        return (0.5 + _HALF_LOG_2PI + self.log_std).sum(-1).expand(out.shape[:-1])

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        out, _ = self(torch.as_tensor(obs, dtype=torch.float32, device=next(self.parameters()).device))
        if deterministic:
            a = out.argmax(-1) if self.action_kind == "discrete" else out
        else:
            a = self.sample(out)
        return a.cpu().numpy()


_HALF_LOG_2PI = 0.5 * float(np.log(2 * np.pi))


def build_agent(env: gym.Env, net: NetConfig | dict[str, Any]) -> ActorCritic:
    obs_dim = int(np.prod(env.observation_space.shape))
    space = env.action_space
    kind, dim = ("discrete", int(space.n)) if isinstance(space, gym.spaces.Discrete) else ("box", int(space.shape[0]))
    net_dict = net if isinstance(net, dict) else dict(net.__dict__)
    return ActorCritic(obs_dim, kind, dim, net_dict)


# --------------------------------------------------------------------------------------------------
# Training


def train(cfg: GymPPOConfig, resume: str | None = None) -> Path:
    """Train; returns the folder of the final agent (`output_dir/agent`)."""
    return run_on_ranks(lambda info: _train(cfg, resume, info), cfg.torch_device())


class _Run:
    """`gym ppo`'s Collector: the vector env and its normalizers, which live across updates (and are
    restarted at checkpoints); `agent` is set once it is built (it needs the env's spaces)."""

    section = "ppo"

    def __init__(self, cfg: GymPPOConfig, info: DistInfo, device: torch.device | None = None):
        self.cfg, self.info, self.device = cfg, info, device or torch.device("cpu")
        self.agent: ActorCritic | None = None
        self.steps_per_update = cfg.env.num_envs * cfg.ppo.n_steps * info.world_size
        self.envs = make_vector_env(cfg.env)
        self.obs_dim = int(np.prod(self.envs.single_observation_space.shape))
        space = self.envs.single_action_space
        self.box = isinstance(space, gym.spaces.Box)
        self.low, self.high = (space.low, space.high) if self.box else (None, None)
        self.obs_norm = ObsNormalizer(self.obs_dim, cfg.ppo.normalize_obs, cfg.ppo.clip_obs)
        self.rew_scale = RewardScaler(cfg.env.num_envs, cfg.ppo.gamma, cfg.ppo.normalize_reward)
        self.episodes = EpisodeTracker(cfg.env.num_envs)
        self.obs: np.ndarray | None = None

    def restart(self, update: int) -> None:
        """Start fresh episodes in every env, seeded by (seed, rank, update): a resumed run restarts
        exactly here too, so it continues the uninterrupted run step for step."""
        seed = self.cfg.seed * 1_000_003 + self.info.rank * 10_007 + update
        raw, _ = self.envs.reset(seed=[seed * 64 + i for i in range(self.cfg.env.num_envs)])
        self.episodes.reset()
        self.rew_scale.ret[:] = 0.0
        self.obs_norm.update(raw, self.info)
        self.obs = self.obs_norm(raw)
        self.raw_obs = np.asarray(raw, np.float32)  # before normalization (gym rlhf's reward model reads these)

    def normalizer_state(self) -> dict[str, Any]:
        return {"obs": self.obs_norm.rms.state_dict(), "reward": self.rew_scale.rms.state_dict()}

    def load_normalizers(self, state: dict[str, Any]) -> None:
        self.obs_norm.rms.load_state_dict(state["obs"])
        self.rew_scale.rms.load_state_dict(state["reward"])

    def describe(self, updates: int) -> str:
        return (f"{self.cfg.env.id}: {self.cfg.env.num_envs} envs x {self.info.world_size} process(es), {updates} "
                f"updates of {self.steps_per_update} steps, {sum(x.numel() for x in self.agent.parameters()):,} parameters")

    def collect(self, fast: PPOGrad | None) -> tuple[Batch, dict[str, float]]:
        return _collect(self, self.agent, self.device, fast)

    def evaluate(self) -> dict[str, float]:
        return _evaluate(self.cfg, self.agent, self, self.info)

    def state_dict(self) -> dict[str, Any]:
        return {"normalizers": self.normalizer_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_normalizers(state["normalizers"])


def _train(cfg: GymPPOConfig, resume: str | None, info: DistInfo) -> Path:
    torch.set_num_threads(cfg.threads)
    device = cfg.torch_device(info.local_rank)
    seed_everything(cfg.seed)  # identical network init on every rank
    run = _Run(cfg, info, device)
    agent = build_agent(make_env(cfg.env), cfg.net).to(device)
    agent.context = {"env": dict(cfg.env.__dict__), "normalize_obs": cfg.ppo.normalize_obs, "clip_obs": cfg.ppo.clip_obs}
    run.agent = agent
    session = run_ppo_updates(cfg, cfg.ppo, agent, info, resume, run)
    run_dir = session.run_dir
    run.envs.close()
    out = run_dir / "agent"
    if info.is_main:
        with atomic_folder(out) as tmp:  # never half an agent after a kill
            agent.save_pretrained(str(tmp))
            (tmp / "normalizers.json").write_text(json.dumps(run.normalizer_state(), indent=2))
        print(f"saved agent to {out}", flush=True)
    barrier(info)
    return out


class Collector(Protocol):
    """What the PPO update loop needs from a trainer: `gym ppo`, `gym mappo` and `gym rlhf` each
    implement it (their environments, rewards and evaluation differ; the PPO update does not)."""

    section: str
    """The config section of the PPO options ("ppo", "mappo"), for messages."""
    steps_per_update: int
    """Environment steps per update, over all processes."""
    episodes: EpisodeTracker

    def describe(self, updates: int) -> str:
        """One line printed before training."""

    def restart(self, update: int) -> None:
        """Fresh episodes, seeded by the update number (also after every checkpoint: exact resume)."""

    def collect(self, fast: PPOGrad | None) -> tuple[Batch, dict[str, float]]:
        """One rollout with the current policy (`fast.forward` when hand-written gradients are on)."""

    def evaluate(self) -> dict[str, float]:
        """Evaluation episodes (on the true reward); every rank gets the same numbers."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the agent and optimizer (normalizers, ...)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def gradient_path(agent: Any, flat: FlatParams, choice: str, section: str) -> PPOGrad | None:
    """The hand-written gradients of gym/fastgrad.py (`manual`), or None for autograd. `auto` takes the
    hand-written ones when the agent has them (actor MLP + critic MLP); `manual` insists."""
    if choice not in ("auto", "autograd", "manual"):
        raise ConfigError(f"{section}.grad", f"expected auto, autograd or manual, got {choice!r}")
    if choice == "autograd":
        return None
    fast = PPOGrad.build(agent, flat)
    if fast is None and choice == "manual":
        raise ConfigError(f"{section}.grad", f"no hand-written gradients for a {type(agent).__name__} (they cover an "
                                             "actor MLP + critic MLP); use auto or autograd")
    return fast


def run_ppo_updates(cfg: Any, p: PPOUpdateConfig, agent: SavableAgent, info: DistInfo, resume: str | None,
                    collector: Collector) -> GymSession:
    """The update loop of `gym ppo` and `gym mappo`: optimizer over one flat parameter buffer, resume,
    then collect -> PPO update -> schedule -> logging/eval/checkpoints until `p.total_steps`; under
    torchrun, checks at the end that the processes' parameters are identical. Returns the (closed) session."""
    per_update, episodes = collector.steps_per_update, collector.episodes
    updates = max(1, p.total_steps // per_update)
    flat = FlatParams(agent)
    fast = gradient_path(agent, flat, p.grad, collector.section)
    session = open_gym_session(cfg, agent, lr=p.lr, adam_eps=p.adam_eps, anneal_lr=p.anneal_lr, updates=updates,
                               resume=resume, info=info, params=[flat.param])
    if session.state:
        collector.load_state_dict(session.state)
    print0(info, collector.describe(updates))
    print0(info, f"gradients: {'hand-written (gym/fastgrad.py)' if fast is not None else 'autograd'} "
                 f"({collector.section}.grad={p.grad})")
    collector.restart(session.start)
    loop = UpdateLoop(cfg, session, info, steps_done=session.start * per_update)
    update = session.start
    for update in range(session.start + 1, updates + 1):
        t0 = time.perf_counter()
        batch, stats = collector.collect(fast)
        stats.update(ppo_update(agent, flat, session.optimizer, batch, p, info, fast))
        stats["train/lr"] = session.scheduler.get_last_lr()[0]
        session.scheduler.step()
        stats.update(episodes.drain(info))
        stop = loop.end_update(update, steps=update * per_update, new_steps=per_update, elapsed=time.perf_counter() - t0,
                               stats=stats, evaluate=collector.evaluate, agent=agent,
                               extra_state=collector.state_dict, restart=collector.restart)
        if stop:
            break
    loop.close()
    if info.enabled:  # DD-PPO invariant: every rank applied the same averaged updates
        divergence = param_divergence(agent, info)
        session.logger.log(update, {"dist/param_divergence": divergence})
        print0(info, f"parameters across {info.world_size} processes: max difference {divergence:.3g}")
    session.close()
    return session


@dataclass
class Batch:
    obs: torch.Tensor
    actions: torch.Tensor
    logprobs: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    values: torch.Tensor


@torch.no_grad()
def _collect(run: _Run, agent: ActorCritic, device: torch.device, fast: PPOGrad | None = None,
             learned: Any = None) -> tuple[Batch, dict[str, float]]:
    """One rollout of n_steps x num_envs; GAE with truncation bootstrapping. The per-step bookkeeping
    lives in numpy (a torch indexing op costs more than stepping a CartPole).

    `learned(trace) -> (T, N) rewards` replaces the environment's rewards before GAE (gym rlhf): `trace`
    holds the rollout's raw observations (T, N, D; before any normalization, which moves as it learns),
    actions, the environment's `true` rewards,
    `terminated`, `ends`, and `frames` (T lists of N images) when the envs render."""
    cfg, info = run.cfg, run.info
    T, N = cfg.ppo.n_steps, cfg.env.num_envs
    forward = fast.forward if fast is not None else agent
    obs_buf = np.zeros((T, N, run.obs_dim), np.float32)
    act_buf = np.zeros((T, N, agent.action_dim), np.float32) if run.box else np.zeros((T, N), np.int64)
    logp_buf, rew_buf, val_buf = np.zeros((T, N), np.float32), np.zeros((T, N), np.float32), np.zeros((T, N), np.float32)
    next_val, term_buf, end_buf = np.zeros((T, N), np.float32), np.zeros((T, N), np.float32), np.zeros((T, N), np.float32)
    obs = run.obs
    true_buf = np.zeros((T, N), np.float32) if learned is not None else None
    raw_buf = np.zeros((T, N, run.obs_dim), np.float32) if learned is not None else None
    frames: list[Any] | None = [] if learned is not None and getattr(run, "render", False) else None
    for t in range(T):
        if frames is not None:
            frames.append(run.envs.render())  # the state the action below is taken in
        d, value = forward(torch.from_numpy(obs).to(device))
        action = agent.sample(d)
        obs_buf[t] = obs
        act_buf[t] = a = action.cpu().numpy()
        logp_buf[t], val_buf[t] = agent.log_prob(d, action).cpu().numpy(), value.cpu().numpy()
        if run.box:
            a = np.clip(a, run.low, run.high)
        raw_obs, reward, terminated, truncated, infos = run.envs.step(a)
        ended = np.logical_or(terminated, truncated)
        run.episodes.step(reward, ended)
        if true_buf is not None:
            true_buf[t], raw_buf[t] = reward, run.raw_obs
            run.raw_obs = np.asarray(raw_obs, np.float32)
        else:
            rew_buf[t] = run.rew_scale(np.asarray(reward, np.float64), ended, info)
        term_buf[t], end_buf[t] = terminated, ended
        run.obs_norm.update(raw_obs, info)
        obs = run.obs_norm(raw_obs)
        if truncated.any():  # bootstrap from the real final observation, not the next episode's first
            idx = np.flatnonzero(truncated & ~terminated)
            if len(idx):
                final = np.stack([infos["final_obs"][i] for i in idx])
                next_val[t, idx] = forward(torch.from_numpy(run.obs_norm(final)).to(device))[1].cpu().numpy()
    run.obs = obs
    if learned is not None:
        rew_buf = np.asarray(learned({"obs": raw_buf, "actions": act_buf, "true": true_buf, "terminated": term_buf,
                                      "ends": end_buf, "frames": frames}), np.float32)
    last_value = forward(torch.from_numpy(obs).to(device))[1].cpu()
    values, rewards, terminal, ends = (torch.from_numpy(x) for x in (val_buf, rew_buf, term_buf, end_buf))
    next_values = bootstrap_next_values(values, last_value, torch.from_numpy(next_val), terminal, ends)
    adv, ret = gae(rewards, values, next_values, terminal, ends, gamma=cfg.ppo.gamma, lam=cfg.ppo.lam)
    act = torch.from_numpy(act_buf)
    flat = Batch(torch.from_numpy(obs_buf).reshape(T * N, -1), act.reshape(T * N, *act.shape[2:]),
                 torch.from_numpy(logp_buf).reshape(-1), adv.reshape(-1), ret.reshape(-1), values.reshape(-1))
    return flat, {"train/explained_variance": explained_variance(values.reshape(-1), ret.reshape(-1))}


def ppo_update(agent: Any, flat: FlatParams, optimizer: torch.optim.Optimizer, b: Batch, p: PPOUpdateConfig,
               info: DistInfo, fast: PPOGrad | None = None) -> dict[str, float]:
    """`p.epochs` passes of `p.minibatches` shuffled minibatches over the rollout `b`; the optimizer
    steps `flat.param`. Gradients are hand-written (`fast`, see `rlhfkit.gym.fastgrad`) when the agent is
    an actor MLP + critic MLP, else autograd through the agent's forward and the losses of
    `rlhfkit.losses.ppo`. Under torchrun the gradient is averaged over ranks before each step."""
    n = b.obs.size(0)
    size = n // p.minibatches
    device = flat.param.device
    keys = ("train/policy_loss", "train/value_loss", "train/entropy", "train/approx_kl", "train/clipfrac",
            "train/value_clipfrac", "train/grad_norm")
    totals = torch.zeros(len(keys))
    count = 0
    for _ in range(p.epochs):
        order = torch.randperm(n) if p.minibatches > 1 else None  # one minibatch: the whole rollout, no gather
        epoch_kl = torch.zeros(())
        for k in range(p.minibatches):
            idx = order[k * size : (k + 1) * size] if order is not None else slice(None)
            obs, actions = b.obs[idx].to(device), b.actions[idx].to(device)
            adv = b.advantages[idx].to(device)
            if p.norm_adv and adv.numel() > 1:
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            old_logp, old_values, returns = b.logprobs[idx].to(device), b.values[idx].to(device), b.returns[idx].to(device)
            if fast is not None:
                st = fast.loss_and_grad(obs, actions, old_logp, adv, old_values, returns, clip_range=p.clip_range,
                                        clip_range_vf=p.clip_range_vf, ent_coef=p.ent_coef, vf_coef=p.vf_coef)
            else:
                st = _autograd_loss_and_grad(agent, flat, obs, actions, old_logp, adv, old_values, returns, p)
            if info.enabled:  # DD-PPO: every rank applies the same averaged gradient
                dist.all_reduce(flat.grad)
                flat.grad.div_(info.world_size)
            grad_norm = flat.clip_grad_norm_(p.max_grad_norm)
            optimizer.step()
            # Statistics stay tensors until the end of the update: a .item() per minibatch costs a
            # quarter of a 64-unit network's whole update step on CPU.
            totals += torch.cat([st, grad_norm.detach().reshape(1)]).cpu()
            epoch_kl += st[3].cpu()
            count += 1
        if p.target_kl:
            kl = all_reduce_sum(epoch_kl / p.minibatches, info).item() / info.world_size
            if kl > p.target_kl:  # the same decision on every rank (averaged KL), so no rank waits alone
                break
    means = dict(zip(keys, (totals / count).tolist()))
    bad = [k for k, v in means.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteError(f"the PPO update diverged: non-finite {', '.join(bad)}; no agent was written and the "
                             "checkpoints written so far are kept. Lower ppo.lr, keep ppo.max_grad_norm > 0, or normalize "
                             "observations/rewards (ppo.normalize_obs, ppo.normalize_reward)")
    return means


def _autograd_loss_and_grad(agent: Any, flat: FlatParams, obs: torch.Tensor, actions: torch.Tensor,
                            old_logp: torch.Tensor, adv: torch.Tensor, old_values: torch.Tensor,
                            returns: torch.Tensor, p: PPOUpdateConfig) -> torch.Tensor:
    """The reference path: the loss of `PPOGrad.loss_and_grad`, differentiated by autograd."""
    d, values = agent(obs)
    logp = agent.log_prob(d, actions)
    pg_loss, st = clipped_policy_loss(logp, old_logp, adv, clip_range=p.clip_range)
    v_loss, vclip = clipped_value_loss(values, old_values, returns, clip_range=p.clip_range_vf or None)
    entropy = agent.entropy(d).mean()
    loss = pg_loss - p.ent_coef * entropy + p.vf_coef * v_loss
    for x in flat.params:
        x.grad = None
    loss.backward()
    flat.gather_grads()
    return torch.stack([pg_loss.detach(), v_loss.detach(), entropy.detach(), st["approx_kl"], st["clipfrac"],
                        vclip.detach().float()])


def param_divergence(model: torch.nn.Module, info: DistInfo) -> float:
    """Largest |difference| of any parameter between ranks (0.0 when they are bit-identical)."""
    flat = torch.cat([x.detach().reshape(-1).double().cpu() for x in model.parameters()])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).max())


def _evaluate(cfg: GymPPOConfig, agent: ActorCritic, run: _Run, info: DistInfo) -> dict[str, float]:
    """Deterministic episodes on rank 0 (others wait): mean return over cfg.eval.episodes."""
    m = {}
    if info.is_main:
        was = agent.training
        agent.eval()
        norm = run.obs_norm if cfg.ppo.normalize_obs else None
        m = evaluate_policy(agent.act, cfg.env, episodes=cfg.eval.episodes, seed=cfg.seed + 100_000, normalize=norm)
        agent.train(was)
    from rlhfkit.runtime.distributed import broadcast_object

    return broadcast_object(m, info)  # type: ignore[return-value]
