"""`rlhfkit gym mappo`: MAPPO and independent PPO (IPPO) on PettingZoo parallel environments, one process
or many under torchrun (each rank runs its own environments; gradients are averaged every minibatch).

The environment is `env.id` = "module:function" returning a PettingZoo ParallelEnv (for example
"mpe2.simple_spread_v3:parallel_env") called with `env.kwargs`; `env.num_envs` copies are stepped in a
Python loop and restarted by hand when all their agents are done.

- One policy shared by all agents (homogeneous agents: equal observation spaces, one Discrete action
  space). Its input is the agent's local observation, plus a one-hot agent id (`mappo.agent_id_feature`).
- `mappo.critic=centralized` (MAPPO, Yu et al. 2022): one value network, shared by the agents, of the
  global state -- `env.state()` when the environment provides it, else the concatenation of all agents'
  observations in `possible_agents` order -- plus the one-hot agent id, so each agent gets its own value
  of the same state. `mappo.critic=independent` (IPPO): each agent's value of its own actor input.
- `mappo.value_norm` (default on): the value network predicts returns normalized by a running mean/std
  of the GAE returns (`RunningMeanStd`, merged over ranks, updated once per rollout); its outputs are
  denormalized for GAE. The statistics travel with checkpoints and the saved agent.
- GAE per agent (`rlhfkit.rl.advantages.gae`, time-major over (env, agent) columns): a truncated agent
  (e.g. `max_cycles` reached) bootstraps from the value of its real final observation/state, a
  terminated one does not. Then `ppo.py`'s update: clipped surrogate, optional value clipping, entropy
  bonus, per-minibatch advantage normalization, global grad-norm clip, gradient averaging over ranks.

Counting and metrics:
- An environment step is one `step()` of one environment copy, counted once for all its agents:
  `total_steps`, `env_steps`, `time/sps` count these; each holds `n_agents` training samples.
- `episode/return` and `eval/return` are TEAM returns: the undiscounted sum over agents of each agent's
  episode reward, averaged over episodes (simple_spread with N=3 therefore reports 3x the mean per-agent
  return). `episode/length` is in environment steps. `eval/*` uses the deterministic (argmax) policy on
  `eval.episodes` episodes seeded seed+100000, seed+100001, ...
- Agents that leave before the others (some but not all done) are not supported: a clear error is raised.

Exact resume: as in `ppo.py`, every environment restarts its episodes at each checkpoint with a seed of
(seed, rank, update), so a resumed run continues the uninterrupted one step for step.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch

from rlhfkit.config import opt, section
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.gym.agents import load_agent as load_any
from rlhfkit.gym.common import (
    EpisodeTracker,
    GymEvalConfig,
    GymRunConfig,
    RunningMeanStd,
    SavableAgent,
    mlp,
    sample_categorical,
    save_gif,
)
from rlhfkit.gym.ppo import Batch, PPOUpdateConfig, run_ppo_updates
from rlhfkit.losses.ppo import explained_variance
from rlhfkit.plugins import load_object
from rlhfkit.rl.advantages import bootstrap_next_values, gae
from rlhfkit.runtime.atomic import atomic_folder
from rlhfkit.runtime.distributed import DistInfo, barrier, broadcast_object, run_on_ranks
from rlhfkit.runtime.seeding import seed_everything


@dataclass
class ParallelEnvConfig:
    id: str = opt("mpe2.simple_spread_v3:parallel_env",
                  "PettingZoo parallel environment as 'module:function' (the function returns a ParallelEnv)")
    num_envs: int = opt(8, "environment copies per process, stepped in a Python loop", gt=0)
    kwargs: dict = opt({"N": 3, "max_cycles": 25, "continuous_actions": False},
                       "keyword arguments for the environment function")


@dataclass
class MANetConfig:
    hidden: list[int] = opt([64, 64], "hidden layer sizes of the policy and value MLPs")
    activation: Literal["tanh", "relu"] = opt("tanh", "hidden activation")
    ortho_init: bool = opt(True, "orthogonal init: gain sqrt(2) hidden, 0.01 policy head, 1.0 value head")


@dataclass
class GymMAPPOAlgo(PPOUpdateConfig):
    total_steps: int = opt(300_000, "environment steps over all envs and processes (one step = all agents act once)", gt=0)
    n_steps: int = opt(100, "steps per environment per update", gt=0)
    minibatches: int = opt(4, "minibatches per pass (the rollout holds num_envs * n_steps * n_agents samples)", gt=0)
    lr: float = opt(7e-4, "Adam learning rate", gt=0.0)
    clip_range_vf: float = opt(0.0, "value clipping around the rollout values (normalized units); 0 = off", ge=0.0)
    ent_coef: float = opt(0.01, "entropy bonus weight", ge=0.0)
    max_grad_norm: float = opt(10.0, "global gradient-norm clip; 0 = off", ge=0.0)
    critic: Literal["centralized", "independent"] = opt(
        "centralized", "centralized: value of the global state + agent id (MAPPO); independent: of the local observation (IPPO)")
    agent_id_feature: bool = opt(True, "append a one-hot agent id to the policy and value inputs")
    critic_own_obs: bool = opt(True, "centralized critic: put the agent's own observation before the global state "
                                     "(MAPPO's agent-specific global state)")
    value_norm: bool = opt(True, "value net predicts returns normalized by their running mean/std")


@dataclass
class GymMAPPOConfig(GymRunConfig):
    output_dir: str = opt("runs/gym-mappo", "run folder: config, metrics, checkpoints, agent")
    env: ParallelEnvConfig = section(ParallelEnvConfig, "PettingZoo parallel environment")
    net: MANetConfig = section(MANetConfig, "networks")
    mappo: GymMAPPOAlgo = section(GymMAPPOAlgo, "MAPPO / IPPO")
    eval: GymEvalConfig = section(GymEvalConfig, "evaluation (deterministic policy, team return)")

    def validate(self) -> None:
        super().validate()
        if ":" not in self.env.id:
            raise ConfigError("env.id", f"expected 'module:function' (e.g. mpe2.simple_spread_v3:parallel_env), got '{self.env.id}'")
        batch = self.env.num_envs * self.mappo.n_steps
        if self.mappo.minibatches > batch:
            raise ConfigError("mappo.minibatches", f"{self.mappo.minibatches} minibatches for a rollout of {batch} steps")


# --------------------------------------------------------------------------------------------------
# Environments


def make_parallel_env(cfg: ParallelEnvConfig) -> Any:
    """Call `module:function` with env.kwargs; errors name the config key at fault."""
    module_name, _, fn_name = cfg.id.partition(":")
    if not module_name or not fn_name:
        raise ConfigError("env.id", f"expected 'module:function' (e.g. mpe2.simple_spread_v3:parallel_env), got '{cfg.id}'")
    fn = load_object(cfg.id, "env.id")
    if not callable(fn):
        raise ConfigError("env.id", f"'{cfg.id}' is not a function")
    try:
        env = fn(**dict(cfg.kwargs))
    except TypeError as exc:
        raise ConfigError("env.kwargs", f"'{cfg.id}' rejected the arguments {dict(cfg.kwargs)}: {exc}") from None
    if hasattr(env, "agent_iter") or not all(hasattr(env, a) for a in ("possible_agents", "reset", "step", "observation_space")):
        raise ConfigError("env.id", f"'{cfg.id}' returned {type(env).__name__}, not a PettingZoo ParallelEnv "
                                    "(use the module's parallel_env function, not env/raw_env)")
    return env


@dataclass(frozen=True)
class EnvSpec:
    agents: tuple[str, ...]
    obs_dim: int
    n_actions: int
    state_dim: int
    has_state: bool  # env.state() works; else the global state is the agents' observations concatenated


def inspect_env(env: Any, env_id: str) -> EnvSpec:
    """Check that the agents are homogeneous with flat Box observations and one Discrete action space."""
    agents = tuple(env.possible_agents)
    if not agents:
        raise ConfigError("env.id", f"'{env_id}' has no agents")
    obs_spaces = [env.observation_space(a) for a in agents]
    act_spaces = [env.action_space(a) for a in agents]
    first_obs, first_act = obs_spaces[0], act_spaces[0]
    if not isinstance(first_obs, gym.spaces.Box) or len(first_obs.shape) != 1:
        raise ConfigError("env.id", f"'{env_id}' has observation space {first_obs}; expected a flat Box")
    if isinstance(first_act, gym.spaces.Box):
        raise ConfigError("env.id", f"'{env_id}' has continuous (Box) actions {first_act}; the MAPPO recipe needs "
                                    "Discrete actions (for MPE pass env.kwargs.continuous_actions=false)")
    if not isinstance(first_act, gym.spaces.Discrete) or int(first_act.start) != 0:
        raise ConfigError("env.id", f"'{env_id}' has action space {first_act}; expected Discrete(n) starting at 0")
    for name, o, a in zip(agents, obs_spaces, act_spaces):
        if o.shape != first_obs.shape or a != first_act:
            raise ConfigError("env.id", f"'{env_id}' has heterogeneous agents ({agents[0]}: {first_obs}, {first_act}; "
                                        f"{name}: {o}, {a}); one shared policy needs equal observation and action "
                                        "spaces for all agents")
    obs_dim = int(first_obs.shape[0])
    env.reset(seed=0)
    try:
        state = np.asarray(env.state(), np.float32).reshape(-1)
        has_state, state_dim = True, int(state.size)
    except (NotImplementedError, AttributeError):
        has_state, state_dim = False, obs_dim * len(agents)
    return EnvSpec(agents, obs_dim, int(first_act.n), state_dim, has_state)


class Features:
    """Network inputs from observations (..., N, obs_dim) and global states (..., state_dim).

    actor:  [local observation | one-hot agent id]
    critic: centralized -> [own observation | global state | one-hot agent id] (the own observation only
    with own_obs=true); independent -> the actor input.
    (The one-hot part is present only with agent_id_feature=true.)
    """

    def __init__(self, spec: EnvSpec, critic: str, agent_id: bool, own_obs: bool = False):
        self.spec, self.critic, self.agent_id, self.own_obs = spec, critic, agent_id, own_obs
        n = len(spec.agents)
        self.eye = np.eye(n, dtype=np.float32)
        self.actor_dim = spec.obs_dim + (n if agent_id else 0)
        if critic == "centralized":
            self.critic_dim = (spec.obs_dim if own_obs else 0) + spec.state_dim + (n if agent_id else 0)
        else:
            self.critic_dim = self.actor_dim

    def _with_id(self, x: np.ndarray) -> np.ndarray:
        if not self.agent_id:
            return x.astype(np.float32, copy=False)
        eye = np.broadcast_to(self.eye, (*x.shape[:-2], *self.eye.shape))
        return np.concatenate([x, eye], -1).astype(np.float32, copy=False)

    def actor(self, obs: np.ndarray) -> np.ndarray:
        return self._with_id(obs)

    def packed(self, obs: np.ndarray, state: np.ndarray) -> np.ndarray:
        """[actor input | critic input] per agent: (..., N, actor_dim + critic_dim)."""
        a = self.actor(obs)
        if self.critic == "independent":
            return np.concatenate([a, a], -1)
        n = len(self.spec.agents)
        s = np.broadcast_to(state[..., None, :], (*state.shape[:-1], n, state.shape[-1]))
        if self.own_obs:
            s = np.concatenate([obs, s], -1)
        return np.concatenate([a, self._with_id(s)], -1)


def stack_obs(obs: dict[str, Any], spec: EnvSpec) -> np.ndarray:
    missing = [a for a in spec.agents if a not in obs]
    if missing:
        raise RlhfkitError(f"the environment returned no observation for {missing}; agents that leave before the "
                           "episode ends are not supported by the MAPPO recipe")
    return np.stack([np.asarray(obs[a], np.float32).reshape(-1) for a in spec.agents])


def global_state(env: Any, obs: np.ndarray, spec: EnvSpec) -> np.ndarray:
    return np.asarray(env.state(), np.float32).reshape(-1) if spec.has_state else obs.reshape(-1)


# --------------------------------------------------------------------------------------------------
# Agent and value normalization


class MAActorCritic(SavableAgent):
    """Shared categorical policy on the actor input and a value MLP on the critic input.

    `forward`, `sample`, `log_prob`, `entropy` follow `ppo.ActorCritic`, so `ppo._optimize` trains it
    unchanged: its input is the packed [actor input | critic input] of each sample."""

    def __init__(self, actor_dim: int, critic_dim: int, n_actions: int, n_agents: int, critic: str,
                 net: dict[str, Any]):
        super().__init__()
        self.actor_dim, self.critic_dim, self.n_actions = actor_dim, critic_dim, n_actions
        self.action_dim, self.n_agents, self.critic_mode, self.net = n_actions, n_agents, critic, dict(net)
        hidden, act, ortho = list(net["hidden"]), net["activation"], net["ortho_init"]
        self.actor = mlp([actor_dim, *hidden, n_actions], act, 0.01, ortho)
        self.critic = mlp([critic_dim, *hidden, 1], act, 1.0, ortho)
        self.context: dict[str, Any] = {}
        """Written into agent.json: the env config and whether inputs carry the agent id (for `gym eval`)."""

    def spec(self) -> dict[str, Any]:
        return {"type": "mappo", "actor_dim": self.actor_dim, "critic_dim": self.critic_dim,
                "n_actions": self.n_actions, "n_agents": self.n_agents, "critic": self.critic_mode, "net": self.net,
                **self.context}

    @classmethod
    def from_spec(cls, s: dict[str, Any]) -> MAActorCritic:
        agent = cls(s["actor_dim"], s["critic_dim"], s["n_actions"], s["n_agents"], s["critic"], s["net"])
        agent.context = {k: s[k] for k in ("env", "agent_id_feature") if k in s}
        return agent

    def policy(self, actor_x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.actor(actor_x), dim=-1)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """Value head output (normalized units under value_norm) of packed inputs."""
        return self.critic(x[..., self.actor_dim:]).squeeze(-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy(x[..., : self.actor_dim]), self.value(x)

    def sample(self, out: torch.Tensor) -> torch.Tensor:
        return sample_categorical(out)

    def grad_parts(self) -> tuple[torch.nn.Sequential, torch.nn.Sequential, slice, slice]:
        """For `rlhfkit.gym.fastgrad.PPOGrad`: the actor reads the first `actor_dim` input columns."""
        return self.actor, self.critic, slice(None, self.actor_dim), slice(self.actor_dim, None)

    def log_prob(self, out: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return out.gather(-1, action.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self, out: torch.Tensor) -> torch.Tensor:
        return -(out.exp() * out).sum(-1)

    @torch.no_grad()
    def act(self, actor_x: np.ndarray, deterministic: bool = True) -> np.ndarray:
        out = self.policy(torch.as_tensor(actor_x, dtype=torch.float32, device=next(self.parameters()).device))
        return (out.argmax(-1) if deterministic else self.sample(out)).cpu().numpy()


def load_agent(folder: str | Path) -> MAActorCritic:
    """Rebuild a saved agent (`output_dir/agent` or a checkpoint's `model/`)."""
    agent, spec, _ = load_any(folder)
    if not isinstance(agent, MAActorCritic):
        raise RlhfkitError(f"{folder} holds a '{spec.get('type')}' agent, not a MAPPO one")
    return agent


class ValueNormalizer:
    """Running mean/std of value targets (returns): the critic learns (R - mean) / std; its outputs are
    mapped back with `denormalize` for GAE. Disabled: both maps are the identity."""

    def __init__(self, enabled: bool, eps: float = 1e-8):
        self.enabled, self.eps = enabled, eps
        self.rms = RunningMeanStd(())

    def _std(self) -> float:
        return float(np.sqrt(self.rms.var + self.eps))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return ((x.double() - float(self.rms.mean)) / self._std()).to(x.dtype)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return (x.double() * self._std() + float(self.rms.mean)).to(x.dtype)

    def update(self, returns: torch.Tensor, info: DistInfo | None = None) -> None:
        if self.enabled:
            self.rms.update(returns.detach().cpu().double().numpy().reshape(-1), info)

    def state_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, **self.rms.state_dict()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.rms.load_state_dict(d)


# --------------------------------------------------------------------------------------------------
# Training


def train(cfg: GymMAPPOConfig, resume: str | None = None) -> Path:
    """Train; returns the folder of the final agent (`output_dir/agent`)."""
    return run_on_ranks(lambda info: _train(cfg, resume, info), cfg.torch_device())


class _Run:
    """`gym mappo`'s Collector: the environment copies and their current observations (restarted at
    checkpoints), and the value normalizer; `agent` is set once it is built."""

    section = "mappo"

    def __init__(self, cfg: GymMAPPOConfig, info: DistInfo, device: torch.device):
        self.cfg, self.info, self.device = cfg, info, device
        self.agent: MAActorCritic | None = None
        self.vnorm = ValueNormalizer(cfg.mappo.value_norm)
        self.steps_per_update = cfg.env.num_envs * cfg.mappo.n_steps * info.world_size
        self.envs = [make_parallel_env(cfg.env) for _ in range(cfg.env.num_envs)]
        self.spec = inspect_env(self.envs[0], cfg.env.id)
        self.features = Features(self.spec, cfg.mappo.critic, cfg.mappo.agent_id_feature, cfg.mappo.critic_own_obs)
        n = len(self.spec.agents)
        self.obs = np.zeros((cfg.env.num_envs, n, self.spec.obs_dim), np.float32)
        self.state = np.zeros((cfg.env.num_envs, self.spec.state_dim), np.float32)
        self.episodes = EpisodeTracker(cfg.env.num_envs)

    def reset_env(self, i: int, seed: int | None = None) -> None:
        env = self.envs[i]
        raw, _ = env.reset(seed=seed)
        if set(env.agents) != set(self.spec.agents):
            raise RlhfkitError(f"'{self.cfg.env.id}' started an episode with agents {list(env.agents)}, not all of "
                               f"{list(self.spec.agents)}; the MAPPO recipe needs every agent in every episode")
        self.obs[i] = stack_obs(raw, self.spec)
        self.state[i] = global_state(env, self.obs[i], self.spec)

    def restart(self, update: int) -> None:
        """Fresh episodes in every env, seeded by (seed, rank, update): a resumed run restarts here too."""
        seed = self.cfg.seed * 1_000_003 + self.info.rank * 10_007 + update
        for i in range(len(self.envs)):
            self.reset_env(i, seed * 64 + i)
        self.episodes.reset()

    def close(self) -> None:
        for env in self.envs:
            env.close()

    def describe(self, updates: int) -> str:
        cfg, f = self.cfg, self.features
        return (f"{cfg.env.id}: {len(self.spec.agents)} agents, {cfg.mappo.critic} critic (input {f.critic_dim}), "
                f"{cfg.env.num_envs} envs x {self.info.world_size} process(es), {updates} updates of "
                f"{self.steps_per_update} steps, {sum(x.numel() for x in self.agent.parameters()):,} parameters")

    def collect(self, fast: Any) -> tuple[Batch, dict[str, float]]:
        return _collect(self, self.agent, self.vnorm, self.device)  # sampling through the agent itself

    def evaluate(self) -> dict[str, float]:
        return _evaluate(self.cfg, self.agent, self, self.info)

    def state_dict(self) -> dict[str, Any]:
        return {"value_norm": self.vnorm.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vnorm.load_state_dict(state["value_norm"])


def _train(cfg: GymMAPPOConfig, resume: str | None, info: DistInfo) -> Path:
    torch.set_num_threads(cfg.threads)
    device = cfg.torch_device(info.local_rank)
    seed_everything(cfg.seed)  # identical network init on every rank
    run = _Run(cfg, info, device)
    f, p = run.features, cfg.mappo
    agent = MAActorCritic(f.actor_dim, f.critic_dim, run.spec.n_actions, len(run.spec.agents), p.critic,
                          dict(cfg.net.__dict__)).to(device)
    agent.context = {"env": dict(cfg.env.__dict__), "agent_id_feature": p.agent_id_feature}
    run.agent = agent
    vnorm = run.vnorm
    session = run_ppo_updates(cfg, p, agent, info, resume, run)
    run_dir = session.run_dir
    run.close()
    out = run_dir / "agent"
    if info.is_main:
        with atomic_folder(out) as tmp:  # never half an agent after a kill
            agent.save_pretrained(str(tmp))
            (tmp / "value_norm.json").write_text(json.dumps(
                {**vnorm.state_dict(), "agents": list(run.spec.agents), "agent_id_feature": p.agent_id_feature,
                 "state_from": "env.state()" if run.spec.has_state else "concatenated observations",
                 "env": dict(cfg.env.__dict__)}, indent=2))
        print(f"saved agent to {out}", flush=True)
    barrier(info)
    return out


@torch.no_grad()
def _collect(run: _Run, agent: MAActorCritic, vnorm: ValueNormalizer,
             device: torch.device) -> tuple[Batch, dict[str, float]]:
    """One rollout of n_steps x num_envs x n_agents samples; per-agent GAE with truncation bootstrapping."""
    cfg, info, spec, feats = run.cfg, run.info, run.spec, run.features
    T, E, N = cfg.mappo.n_steps, cfg.env.num_envs, len(spec.agents)
    width = feats.actor_dim + feats.critic_dim
    x_buf = torch.zeros((T, E, N, width))
    act_buf = torch.zeros((T, E, N), dtype=torch.long)
    logp_buf, val_buf, rew_buf = torch.zeros((T, E, N)), torch.zeros((T, E, N)), torch.zeros((T, E, N))
    next_val, term_buf, end_buf = torch.zeros((T, E, N)), torch.zeros((T, E, N)), torch.zeros((T, E, N))
    x = torch.as_tensor(feats.packed(run.obs, run.state))
    for t in range(T):
        out, value = agent(x.to(device))
        action = agent.sample(out)
        x_buf[t], act_buf[t] = x, action.cpu()
        logp_buf[t], val_buf[t] = agent.log_prob(out, action).cpu(), value.cpu()
        actions = action.cpu().numpy()
        rewards = np.zeros((E, N))
        terminated, truncated = np.zeros((E, N), bool), np.zeros((E, N), bool)
        finals: list[tuple[int, np.ndarray]] = []
        for i, env in enumerate(run.envs):
            obs, rew, term, trunc, _ = env.step({a: int(actions[i, j]) for j, a in enumerate(spec.agents)})
            rewards[i] = [float(rew.get(a, 0.0)) for a in spec.agents]
            terminated[i] = [bool(term.get(a, False)) for a in spec.agents]
            truncated[i] = [bool(trunc.get(a, False)) for a in spec.agents]
            done = terminated[i] | truncated[i]
            if done.any() and not done.all() or (not done.any() and not env.agents):
                raise RlhfkitError(f"'{cfg.env.id}': agents {[a for a, d in zip(spec.agents, done) if d]} finished "
                                   "while others went on; agents that leave before the episode ends are not "
                                   "supported by the MAPPO recipe")
            o = stack_obs(obs, spec)
            if done.all():
                if truncated[i].any():
                    finals.append((i, feats.packed(o, global_state(env, o, spec))))
                run.reset_env(i)
            else:
                run.obs[i], run.state[i] = o, global_state(env, o, spec)
        ended = terminated | truncated
        run.episodes.step(rewards.sum(1), ended.all(1))
        rew_buf[t] = torch.as_tensor(rewards, dtype=torch.float32)
        term_buf[t] = torch.as_tensor(terminated, dtype=torch.float32)
        end_buf[t] = torch.as_tensor(ended, dtype=torch.float32)
        for i, final_x in finals:  # bootstrap from the real final observation/state, not the next episode's
            next_val[t, i] = vnorm.denormalize(agent.value(torch.as_tensor(final_x).to(device)).cpu())
        x = torch.as_tensor(feats.packed(run.obs, run.state))
    values = vnorm.denormalize(val_buf)
    last_value = vnorm.denormalize(agent.value(x.to(device)).cpu())
    next_values = bootstrap_next_values(values, last_value, next_val, term_buf, end_buf)
    cols = E * N
    adv, ret = gae(rew_buf.reshape(T, cols), values.reshape(T, cols), next_values.reshape(T, cols),
                   term_buf.reshape(T, cols), end_buf.reshape(T, cols), gamma=cfg.mappo.gamma, lam=cfg.mappo.lam)
    stats = {"train/explained_variance": explained_variance(values.reshape(-1), ret.reshape(-1))}
    vnorm.update(ret, info)
    if vnorm.enabled:
        stats.update({"train/value_norm_mean": float(vnorm.rms.mean), "train/value_norm_std": vnorm._std()})
    n = T * cols
    batch = Batch(x_buf.reshape(n, width), act_buf.reshape(n), logp_buf.reshape(n), adv.reshape(n),
                  vnorm.normalize(ret.reshape(n)), val_buf.reshape(n))
    return batch, stats


# --------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_parallel(act: Callable[[np.ndarray], np.ndarray], env_cfg: ParallelEnvConfig, *, episodes: int,
                      seed: int, agent_id_feature: bool = True, record: str = "") -> dict[str, float]:
    """Run `episodes` episodes on one env seeded seed, seed+1, ...; `act(actor_inputs (N, actor_dim)) ->
    actions (N,)` for all agents at once. Returns the mean team return (sum over agents) and length.
    `record`: save the first episode as a GIF there (the env must accept render_mode="rgb_array")."""
    if record:
        env_cfg = ParallelEnvConfig(env_cfg.id, env_cfg.num_envs, {**env_cfg.kwargs, "render_mode": "rgb_array"})
    env = make_parallel_env(env_cfg)
    spec = inspect_env(env, env_cfg.id)
    feats = Features(spec, "independent", agent_id_feature)
    returns, lengths, frames = [], [], []
    for k in range(episodes):
        raw, _ = env.reset(seed=seed + k)
        obs = stack_obs(raw, spec)
        total, n = 0.0, 0
        while True:
            if record and k == 0:
                frames.append(env.render())
            actions = act(feats.actor(obs))
            raw, rew, term, trunc, _ = env.step({a: int(actions[j]) for j, a in enumerate(spec.agents)})
            total += sum(float(rew.get(a, 0.0)) for a in spec.agents)
            n += 1
            if all(term.get(a, False) or trunc.get(a, False) for a in spec.agents) or not env.agents:
                break
            obs = stack_obs(raw, spec)
        returns.append(total)
        lengths.append(n)
    env.close()
    if record and frames:
        save_gif(frames, Path(record))
    return {"eval/return": float(np.mean(returns)), "eval/return_std": float(np.std(returns)),
            "eval/length": float(np.mean(lengths)), "eval/min_return": float(np.min(returns))}


def _evaluate(cfg: GymMAPPOConfig, agent: MAActorCritic, run: _Run, info: DistInfo) -> dict[str, float]:
    """Deterministic episodes on rank 0 (others wait)."""
    m: dict[str, float] = {}
    if info.is_main:
        was = agent.training
        agent.eval()
        m = evaluate_parallel(agent.act, cfg.env, episodes=cfg.eval.episodes, seed=cfg.seed + 100_000,
                              agent_id_feature=cfg.mappo.agent_id_feature)
        agent.train(was)
    return broadcast_object(m, info)  # type: ignore[return-value]
