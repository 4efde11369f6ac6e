"""`rlhfkit gym dqn`: DQN (optionally Double DQN) on gymnasium environments with discrete actions, in one
process.

One round, top to bottom: step `env.num_envs` environments until `dqn.train_freq` environment steps are
done, acting epsilon-greedily (uniformly random before `dqn.learning_starts`; epsilon decays linearly from
`exploration_initial_eps` to `exploration_final_eps` over `exploration_fraction` of the run) and storing
every transition in a preallocated replay buffer; then `dqn.gradient_steps` gradient steps on uniformly
sampled minibatches (Huber or squared TD error, Adam, global grad-norm clip). The target network is
copied from the online one every `target_update_interval` environment steps (or moved towards it by
`tau` < 1, Polyak averaging), counted during collection as Stable-Baselines3 does.

Episode ends follow `rlhfkit.gym.common`: with SAME_STEP autoreset the buffer stores the real final
observation (`info["final_obs"]`) as the next observation, never the first one of the next episode, and
only termination stops bootstrapping; a time-limit truncation bootstraps from the final observation.

Resuming is NOT bit-exact, unlike `rlhfkit gym ppo`: a checkpoint holds the network weights (online and
target), the optimizer, the RNG states and the step counters, but not the replay buffer (up to
`buffer_size` transitions, too large to write every checkpoint). A resumed run first refills the empty
buffer with `dqn.refill_steps` transitions of the restored policy (steps that are not counted and not
trained on), then restores the RNG state again and restarts the environments exactly where the
uninterrupted run restarted them. From there the schedule continues correctly — the step count, epsilon,
the target updates, learning_starts, evaluation and checkpoint points — but the minibatches are drawn
from a different (smaller, more recent) buffer, so the learning curve differs from the uninterrupted one.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

from rlhfkit.config import opt, section
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.gym.common import (
    EnvConfig,
    EpisodeTracker,
    GymEvalConfig,
    GymRunConfig,
    SavableAgent,
    UpdateLoop,
    evaluate_policy,
    make_env,
    make_vector_env,
    mlp,
    open_gym_session,
)
from rlhfkit.runtime.atomic import atomic_folder
from rlhfkit.runtime.distributed import DistInfo
from rlhfkit.runtime.optim import NonFiniteGuard
from rlhfkit.runtime.seeding import seed_everything, set_rng_state


@dataclass
class DQNNetConfig:
    hidden: list[int] = opt([256, 256], "hidden layer sizes of the Q network")
    activation: Literal["tanh", "relu"] = opt("relu", "hidden activation")


@dataclass
class GymDQNAlgo:
    total_steps: int = opt(100_000, "environment steps over all envs", gt=0)
    buffer_size: int = opt(100_000, "replay buffer capacity (transitions)", gt=0)
    learning_starts: int = opt(1_000, "environment steps of uniformly random actions before the first gradient step", ge=0)
    batch_size: int = opt(64, "transitions per gradient step", gt=0)
    train_freq: int = opt(256, "environment steps (over all envs) collected per round of gradient steps", gt=0)
    gradient_steps: int = opt(128, "gradient steps per round", ge=0)
    lr: float = opt(2.3e-3, "Adam learning rate", gt=0.0)
    gamma: float = opt(0.99, "discount", ge=0.0, le=1.0)
    loss: Literal["huber", "mse"] = opt("huber", "TD loss: huber (smooth L1, as DQN/SB3) or mse")
    max_grad_norm: float = opt(10.0, "global gradient-norm clip; 0 = off", ge=0.0)
    double_dqn: bool = opt(False, "Double DQN: the online net picks the next action, the target net values it")
    target_update_interval: int = opt(10, "update the target network every N environment steps", gt=0)
    tau: float = opt(1.0, "target update: 1 = hard copy, < 1 = Polyak averaging with this weight", gt=0.0, le=1.0)
    exploration_initial_eps: float = opt(1.0, "epsilon at the start", ge=0.0, le=1.0)
    exploration_final_eps: float = opt(0.04, "epsilon after the decay (also used by `gym eval --stochastic`)",
                                       ge=0.0, le=1.0)
    exploration_fraction: float = opt(0.16, "fraction of total_steps over which epsilon decays linearly", ge=0.0, le=1.0)
    refill_steps: int = opt(0, "on resume: transitions collected into the empty buffer before training goes on; "
                               "0 = learning_starts (at most the steps done, at most buffer_size)", ge=0)


@dataclass
class GymDQNConfig(GymRunConfig):
    output_dir: str = opt("runs/gym-dqn", "run folder: config, metrics, checkpoints, agent")
    seed: int = opt(1, "seed for the network, the environments, exploration and sampling")
    log_every: int = opt(1, "log metrics every N rounds (a round = dqn.train_freq env steps + its gradient steps)", gt=0)
    save_every: int = opt(0, "checkpoint every N rounds (environments restart their episodes there); 0 = end only", ge=0)
    env: EnvConfig = opt(EnvConfig(num_envs=1), "environment (discrete actions; one env by default)")
    net: DQNNetConfig = section(DQNNetConfig, "Q network")
    dqn: GymDQNAlgo = section(GymDQNAlgo, "DQN")
    eval: GymEvalConfig = section(GymEvalConfig, "evaluation (greedy policy)")

    def validate(self) -> None:
        super().validate()
        if self.dqn.batch_size > self.dqn.buffer_size:
            raise ConfigError("dqn.batch_size", f"{self.dqn.batch_size} exceeds dqn.buffer_size {self.dqn.buffer_size}")
        if self.dqn.exploration_final_eps > self.dqn.exploration_initial_eps:
            raise ConfigError("dqn.exploration_final_eps", f"{self.dqn.exploration_final_eps} is above "
                              f"dqn.exploration_initial_eps {self.dqn.exploration_initial_eps}")


# --------------------------------------------------------------------------------------------------
# Pieces (pure functions and the buffer)


def epsilon_at(step: int, total_steps: int, initial: float, final: float, fraction: float) -> float:
    """Linear decay from `initial` to `final` over the first `fraction` of `total_steps`, then `final`
    (SB3's get_linear_fn on progress = step / total_steps)."""
    progress = step / max(total_steps, 1)
    if fraction <= 0.0 or progress >= fraction:
        return final
    return initial + progress * (final - initial) / fraction


def dqn_targets(rewards: torch.Tensor, next_q_online: torch.Tensor | None, next_q_target: torch.Tensor,
                terminated: torch.Tensor, gamma: float, double: bool) -> torch.Tensor:
    """TD targets r + gamma * (1 - terminated) * V(s').

    `next_q_*`: [B, A] Q values of the next observations. DQN: V(s') = max_a Q_target(s', a). Double DQN:
    a* = argmax_a Q_online(s', a), V(s') = Q_target(s', a*). Truncated steps are not terminated: they
    bootstrap from the real final observation."""
    if double:
        if next_q_online is None:
            raise ValueError("double DQN needs the online network's Q values of the next observations")
        best = next_q_online.argmax(-1, keepdim=True)
        next_v = next_q_target.gather(-1, best).squeeze(-1)
    else:
        next_v = next_q_target.max(-1).values
    return rewards + gamma * (1.0 - terminated.to(next_v.dtype)) * next_v


def real_next_obs(next_obs: np.ndarray, terminated: np.ndarray, truncated: np.ndarray,
                  infos: dict[str, Any]) -> np.ndarray:
    """The observation each transition ended in: the vector env's `next_obs`, except where an episode
    ended, where SAME_STEP autoreset already put the next episode's first observation in its place and
    the real last one is in `infos["final_obs"]`."""
    out = np.array(next_obs, dtype=np.float32, copy=True)
    for i in np.flatnonzero(np.logical_or(terminated, truncated)):
        out[i] = infos["final_obs"][i]
    return out


@dataclass
class Transitions:
    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    terminated: torch.Tensor


class ReplayBuffer:
    """A ring of `capacity` transitions in preallocated numpy arrays; uniform sampling (global numpy RNG)."""

    def __init__(self, capacity: int, obs_dim: int):
        self.capacity = capacity
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.actions = np.zeros(capacity, np.int64)
        self.rewards = np.zeros(capacity, np.float32)
        self.terminated = np.zeros(capacity, np.float32)
        self.pos = 0
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_obs: np.ndarray,
            terminated: np.ndarray) -> None:
        """One vector step: a row per environment."""
        for k in range(len(actions)):
            i = self.pos
            self.obs[i], self.next_obs[i] = obs[k], next_obs[k]
            self.actions[i], self.rewards[i], self.terminated[i] = actions[k], rewards[k], terminated[k]
            self.pos = (self.pos + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, device: torch.device) -> Transitions:
        idx = np.random.randint(0, self.size, size=batch_size)
        return Transitions(*(torch.from_numpy(a[idx]).to(device) for a in
                             (self.obs, self.actions, self.rewards, self.next_obs, self.terminated)))


# --------------------------------------------------------------------------------------------------
# Agent


class QAgent(SavableAgent):
    """Online Q network `q` and its target copy `target` (both saved, so a checkpoint resumes both)."""

    def __init__(self, obs_dim: int, n_actions: int, net: dict[str, Any]):
        super().__init__()
        self.obs_dim, self.n_actions, self.net = obs_dim, n_actions, dict(net)
        self.context: dict[str, Any] = {}
        """Written into agent.json with the weights: the env config and the exploration epsilon."""
        sizes = [obs_dim, *list(net["hidden"]), n_actions]
        self.q = mlp(sizes, net["activation"], 1.0, ortho=False)  # PyTorch default init, as SB3's DQN
        self.target = mlp(sizes, net["activation"], 1.0, ortho=False)
        self.target.load_state_dict(self.q.state_dict())
        self.target.requires_grad_(False)

    def spec(self) -> dict[str, Any]:
        return {"type": "dqn", "obs_dim": self.obs_dim, "n_actions": self.n_actions, "net": self.net, **self.context}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> QAgent:
        agent = cls(spec["obs_dim"], spec["n_actions"], spec["net"])
        agent.context = {k: v for k, v in spec.items() if k not in ("type", "obs_dim", "n_actions", "net")}
        return agent

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.q(obs)

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        if tau >= 1.0:
            self.target.load_state_dict(self.q.state_dict())
            return
        for t, s in zip(self.target.parameters(), self.q.parameters()):
            t.mul_(1.0 - tau).add_(s, alpha=tau)

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = True, eps: float | None = None) -> np.ndarray:
        """Greedy actions for a batch of observations; `deterministic=False`: epsilon-greedy with `eps`
        (default: the run's exploration_final_eps)."""
        greedy = self.q(torch.as_tensor(obs, dtype=torch.float32, device=next(self.parameters()).device))
        actions = greedy.argmax(-1).cpu().numpy()
        if not deterministic:
            eps = float(self.context.get("exploration_final_eps", 0.05)) if eps is None else eps
            explore = np.random.random(len(actions)) < eps
            actions[explore] = np.random.randint(0, self.n_actions, size=int(explore.sum()))
        return actions


# --------------------------------------------------------------------------------------------------
# Training


def train(cfg: GymDQNConfig, resume: str | None = None) -> Path:
    """Train; returns the folder of the final agent (`output_dir/agent`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise RlhfkitError(f"DQN runs in one process (WORLD_SIZE={world}): launch `rlhfkit gym dqn` without "
                           "torchrun/accelerate; use env.num_envs for more environments")
    return _train(cfg, resume, DistInfo())


def check_discrete(env_cfg: EnvConfig) -> int:
    """The number of actions; ConfigError for any other action space."""
    env = make_env(env_cfg)
    space = env.action_space
    env.close()
    if not isinstance(space, gym.spaces.Discrete):
        raise ConfigError("env.id", f"'{env_cfg.id}' has action space {space}; DQN needs Discrete actions "
                                    "(use `rlhfkit gym ppo` for continuous ones)")
    return int(space.n)


class _Run:
    """Environments, replay buffer and step counters (environments restart at checkpoints)."""

    def __init__(self, cfg: GymDQNConfig, n_actions: int, device: torch.device):
        self.cfg, self.n_actions, self.device = cfg, n_actions, device
        self.envs = make_vector_env(cfg.env)
        self.obs_dim = int(np.prod(self.envs.single_observation_space.shape))
        self.buffer = ReplayBuffer(cfg.dqn.buffer_size, self.obs_dim)
        self.episodes = EpisodeTracker(cfg.env.num_envs)
        self.obs: np.ndarray | None = None
        self.env_steps = 0
        self.target_updates = 0

    def restart(self, round_: int) -> None:
        """Fresh episodes in every env, seeded by (seed, round): a resumed run restarts exactly here too."""
        seed = self.cfg.seed * 1_000_003 + round_
        raw, _ = self.envs.reset(seed=[seed * 64 + i for i in range(self.cfg.env.num_envs)])
        self.episodes.reset()
        self.obs = np.asarray(raw, np.float32)

    def epsilon(self) -> float:
        d = self.cfg.dqn
        return epsilon_at(self.env_steps, d.total_steps, d.exploration_initial_eps, d.exploration_final_eps,
                          d.exploration_fraction)

    def exploration_eps(self) -> float:
        """The epsilon the next action is drawn with: 1 (uniformly random) before learning_starts."""
        return 1.0 if self.env_steps < self.cfg.dqn.learning_starts else self.epsilon()

    def actions(self, agent: QAgent) -> np.ndarray:
        n = self.cfg.env.num_envs
        eps = self.exploration_eps()
        explore = np.random.random(n) < eps
        actions = np.random.randint(0, self.n_actions, size=n)
        if not explore.all():
            greedy = agent.act(self.obs)
            actions = np.where(explore, actions, greedy)
        return actions

    @torch.no_grad()
    def collect(self, agent: QAgent, vec_steps: int, count: bool = True) -> None:
        """Step every env `vec_steps` times into the buffer. count=False (refilling after a resume): the
        step counter, the target network and the episode statistics are left alone."""
        d = self.cfg.dqn
        for _ in range(vec_steps):
            actions = self.actions(agent)
            next_obs, reward, terminated, truncated, infos = self.envs.step(actions)
            final = real_next_obs(next_obs, terminated, truncated, infos)
            self.buffer.add(self.obs, actions, np.asarray(reward, np.float32), final, terminated)
            self.obs = np.asarray(next_obs, np.float32)
            if not count:
                continue
            self.episodes.step(reward, np.logical_or(terminated, truncated))
            before = self.env_steps
            self.env_steps += len(actions)
            if self.env_steps // d.target_update_interval > before // d.target_update_interval:
                agent.update_target(d.tau)
                self.target_updates += 1


def _optimize(agent: QAgent, optimizer: torch.optim.Optimizer, buffer: ReplayBuffer, d: GymDQNAlgo,
              device: torch.device) -> dict[str, float]:
    loss_fn = F.smooth_l1_loss if d.loss == "huber" else F.mse_loss
    params = list(agent.q.parameters())
    totals = torch.zeros(3)
    for _ in range(d.gradient_steps):
        b = buffer.sample(d.batch_size, device)
        with torch.no_grad():
            next_target = agent.target(b.next_obs)
            next_online = agent.q(b.next_obs) if d.double_dqn else None
            y = dqn_targets(b.rewards, next_online, next_target, b.terminated, d.gamma, d.double_dqn)
        q = agent.q(b.obs).gather(1, b.actions.unsqueeze(1)).squeeze(1)
        loss = loss_fn(q, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, d.max_grad_norm or float("inf"))
        optimizer.step()
        totals += torch.stack([loss.detach(), q.detach().mean(), grad_norm.detach()]).cpu()
    totals /= max(d.gradient_steps, 1)
    return {"train/loss": totals[0].item(), "train/q_mean": totals[1].item(), "train/grad_norm": totals[2].item()}


def _train(cfg: GymDQNConfig, resume: str | None, info: DistInfo) -> Path:
    torch.set_num_threads(cfg.threads)
    device = cfg.torch_device(info.local_rank)
    n_actions = check_discrete(cfg.env)
    d = cfg.dqn
    seed_everything(cfg.seed)
    run = _Run(cfg, n_actions, device)
    agent = QAgent(run.obs_dim, n_actions, dict(cfg.net.__dict__)).to(device)
    agent.context = {"env": dict(cfg.env.__dict__), "exploration_final_eps": d.exploration_final_eps}
    vec_steps = max(1, -(-d.train_freq // cfg.env.num_envs))
    per_round = vec_steps * cfg.env.num_envs
    rounds = max(1, d.total_steps // per_round)
    # A constant schedule: DQN keeps its learning rate; the scheduler only fits the checkpoint format.
    session = open_gym_session(cfg, agent, lr=d.lr, adam_eps=1e-8, anneal_lr=False, updates=rounds, resume=resume,
                               info=info, params=agent.q.parameters())
    optimizer, start, state = session.optimizer, session.start, session.state
    if state:
        run.env_steps, run.target_updates = int(state["env_steps"]), int(state["target_updates"])
        refill = min(d.refill_steps or d.learning_starts, run.env_steps, d.buffer_size)
        run.restart(start)
        run.collect(agent, -(-refill // cfg.env.num_envs), count=False)
        set_rng_state(state["rng"][0])  # from here on: the uninterrupted run's randomness, new buffer contents
        print(f"replay buffer refilled with {len(run.buffer)} transitions at {run.env_steps} env steps "
              "(DQN resume is not bit-exact)", flush=True)
    print(f"{cfg.env.id}: DQN{' (double)' if d.double_dqn else ''}, {cfg.env.num_envs} env(s), {rounds} rounds of "
          f"{per_round} steps + {d.gradient_steps} gradient steps, "
          f"{sum(x.numel() for x in agent.q.parameters()):,} parameters", flush=True)
    run.restart(start)
    loop = UpdateLoop(cfg, session, info, steps_done=run.env_steps)
    gradient_steps = int(state.get("gradient_steps", 0))

    def evaluate() -> dict[str, float]:
        agent.eval()
        m = evaluate_policy(agent.act, cfg.env, episodes=cfg.eval.episodes, seed=cfg.seed + 100_000)
        agent.train()
        return m

    guard = NonFiniteGuard("stop", recipe="gym dqn", hint="Lower dqn.lr, keep dqn.max_grad_norm > 0, or scale the "
                                                         "rewards down (env wrappers).")
    for round_ in range(start + 1, rounds + 1):
        t0 = time.perf_counter()
        run.collect(agent, vec_steps)
        stats: dict[str, float] = {}
        if run.env_steps > d.learning_starts and len(run.buffer) >= d.batch_size and d.gradient_steps:
            stats.update(_optimize(agent, optimizer, run.buffer, d, device))
            guard.check(round_, {k: stats[k] for k in ("train/loss", "train/grad_norm")})  # raises: stop here
            gradient_steps += d.gradient_steps
        elapsed = time.perf_counter() - t0
        stats.update(run.episodes.drain(info))
        stats.update({"train/epsilon": run.exploration_eps(), "train/gradient_steps": float(gradient_steps),
                      "train/target_updates": float(run.target_updates), "buffer/size": float(len(run.buffer))})
        extra = {"env_steps": run.env_steps, "gradient_steps": gradient_steps, "target_updates": run.target_updates}
        stop = loop.end_update(round_, steps=run.env_steps, new_steps=per_round, elapsed=elapsed, stats=stats,
                               evaluate=evaluate, agent=agent, extra_state=lambda e=extra: e, restart=run.restart)
        if stop:
            break
    loop.close()
    session.close()
    run.envs.close()
    out = session.run_dir / "agent"
    with atomic_folder(out) as tmp:  # never half an agent after a kill
        agent.save_pretrained(str(tmp))
    print(f"saved agent to {out}", flush=True)
    return out
