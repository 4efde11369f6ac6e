"""What the control-task recipes share: vector environments, running normalizers, episode bookkeeping,
deterministic evaluation, and checkpoints of small torch agents.

Environments use gymnasium's SAME_STEP autoreset: when a sub-environment's episode ends, `step` returns
the first observation of the next episode and puts the real last observation in `info["final_obs"]`.
Truncation (time limit) and termination are kept apart: a truncated step bootstraps from the value of
that final observation; a terminated one does not (CleanRL's `ppo.py` ORs them; we don't).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlhfkit.config import opt
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.gym.vector_cartpole import CartPoleVec, is_plain_cartpole
from rlhfkit.runtime.distributed import DistInfo, all_reduce_sum


@dataclass
class EnvConfig:
    id: str = opt("CartPole-v1", "gymnasium environment id (vector observations; discrete or Box actions)")
    num_envs: int = opt(8, "environments per process", gt=0)
    vector: Literal["auto", "sync", "async"] = opt(
        "auto", "auto: CartPole-v1 stepped in numpy for all envs at once (gym/vector_cartpole.py), other ids as sync; "
                "sync: all envs in this process, one after another; async: one subprocess each")
    max_episode_steps: int = opt(0, "time limit per episode; 0 = the environment's own", ge=0)
    kwargs: dict = opt({}, "extra keyword arguments for gymnasium.make")


def make_env(cfg: EnvConfig, render_mode: str | None = None) -> gym.Env:
    kwargs = dict(cfg.kwargs)
    if cfg.max_episode_steps:
        kwargs["max_episode_steps"] = cfg.max_episode_steps
    if render_mode:
        kwargs["render_mode"] = render_mode
    try:
        return gym.make(cfg.id, **kwargs)
    except gym.error.Error as exc:
        raise ConfigError("env.id", f"cannot make '{cfg.id}': {exc}") from None
    except TypeError as exc:
        raise ConfigError("env.kwargs", f"'{cfg.id}' rejected the arguments: {exc}") from None


def make_vector_env(cfg: EnvConfig, render_mode: str | None = None) -> gym.vector.VectorEnv:
    check_spaces(make_env(cfg), cfg.id)
    fns = [lambda: make_env(cfg, render_mode) for _ in range(cfg.num_envs)]
    if cfg.vector == "auto" and is_plain_cartpole(cfg.id, cfg.kwargs, render_mode):
        return CartPoleVec(cfg.num_envs, max_episode_steps=cfg.max_episode_steps or int(cfg.kwargs.get("max_episode_steps", 500)),
                           sutton_barto_reward=bool(cfg.kwargs.get("sutton_barto_reward", False)))
    mode = gym.vector.AutoresetMode.SAME_STEP
    if cfg.vector == "async":
        return gym.vector.AsyncVectorEnv(fns, autoreset_mode=mode)
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)


def check_spaces(env: gym.Env, env_id: str) -> None:
    obs, act = env.observation_space, env.action_space
    env.close()
    if not isinstance(obs, gym.spaces.Box) or len(obs.shape) != 1:
        raise ConfigError("env.id", f"'{env_id}' has observation space {obs}; expected a flat Box (vector observations)")
    if not isinstance(act, (gym.spaces.Discrete, gym.spaces.Box)) or (isinstance(act, gym.spaces.Box) and len(act.shape) != 1):
        raise ConfigError("env.id", f"'{env_id}' has action space {act}; expected Discrete or a flat Box")


@dataclass
class GymEvalConfig:
    every: int = opt(10_000, "evaluate every N environment steps (and at the end); 0 = only at the end", ge=0)
    episodes: int = opt(20, "episodes per evaluation (deterministic policy)", gt=0)
    target_return: float | None = opt(None, "report when the eval mean return first reaches this")
    stop_at_target: bool = opt(False, "stop training once target_return is reached")


@dataclass
class GymRunConfig:
    """The run-level options every control-task recipe has (each recipe adds its env, net, algorithm
    and eval sections, and may redeclare a field to change its default or help)."""

    output_dir: str = opt("runs/gym", "run folder: config, metrics, checkpoints, agent")
    overwrite: bool = opt(False, "replace an existing run in output_dir instead of refusing")
    seed: int = opt(1, "seed for the networks, the environments and sampling")
    device: str = opt("cpu", "cpu, cuda or cuda:N (a bare cuda is cuda:LOCAL_RANK under torchrun); small MLPs are fastest on cpu")
    threads: int = opt(1, "torch CPU threads (small networks: 1 is fastest)", gt=0)
    progress: bool = opt(True, "show a progress bar")
    tensorboard: bool = opt(True, "write TensorBoard logs")
    log_every: int = opt(1, "log metrics every N updates", gt=0)
    save_every: int = opt(0, "checkpoint every N updates (environments restart their episodes there); 0 = end only", ge=0)
    save_total_limit: int = opt(2, "checkpoints to keep; 0 = all", ge=0)

    def validate(self) -> None:
        if not self.output_dir.strip():
            raise ConfigError("output_dir", "expected a folder path for the run")
        self.torch_device()

    def torch_device(self, local_rank: int = 0) -> torch.device:
        """`device` checked (CUDA present, a known device), with a bare `cuda` meaning cuda:LOCAL_RANK."""
        from rlhfkit.models.load import resolve_device

        return resolve_device(self.device, local_rank, key="device")


# --------------------------------------------------------------------------------------------------
# Running statistics


class RunningMeanStd:
    """Mean and variance of everything seen (Chan et al. parallel merge), float64; shared across
    processes by merging every rank's batch statistics, so all ranks hold identical values."""

    def __init__(self, shape: tuple[int, ...] = ()):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = 1e-4

    def update(self, x: np.ndarray, info: DistInfo | None = None) -> None:
        x = np.asarray(x, np.float64).reshape(-1, *self.mean.shape)
        n, total, sq = float(x.shape[0]), x.sum(0), (x**2).sum(0)
        if info is not None and info.enabled:
            packed = torch.from_numpy(np.concatenate([[n], total.ravel(), sq.ravel()]))
            packed = all_reduce_sum(packed, info).numpy()
            k = total.size
            n, total, sq = float(packed[0]), packed[1 : 1 + k].reshape(total.shape), packed[1 + k :].reshape(sq.shape)
        if n == 0:
            return
        batch_mean = total / n
        batch_var = np.maximum(sq / n - batch_mean**2, 0.0)
        delta = batch_mean - self.mean
        tot = self.count + n
        self.mean = self.mean + delta * n / tot
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / tot) / tot
        self.count = tot

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "var": self.var.tolist(), "count": self.count}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.mean = np.asarray(d["mean"], np.float64).reshape(self.mean.shape)
        self.var = np.asarray(d["var"], np.float64).reshape(self.var.shape)
        self.count = float(d["count"])


class ObsNormalizer:
    """(obs - mean) / sqrt(var + eps), clipped; statistics updated from training observations only."""

    def __init__(self, dim: int, enabled: bool, clip: float = 10.0):
        self.enabled, self.clip = enabled, clip
        self.rms = RunningMeanStd((dim,))

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        if not self.enabled:
            return np.asarray(obs, np.float32)
        return np.clip((obs - self.rms.mean) / np.sqrt(self.rms.var + 1e-8), -self.clip, self.clip).astype(np.float32)

    def update(self, obs: np.ndarray, info: DistInfo) -> None:
        if self.enabled:
            self.rms.update(obs, info)


class RewardScaler:
    """Divide rewards by the running std of the discounted return (as SB3's VecNormalize), then clip."""

    def __init__(self, num_envs: int, gamma: float, enabled: bool, clip: float = 10.0):
        self.enabled, self.gamma, self.clip = enabled, gamma, clip
        self.rms = RunningMeanStd(())
        self.ret = np.zeros(num_envs, np.float64)

    def __call__(self, reward: np.ndarray, episode_end: np.ndarray, info: DistInfo) -> np.ndarray:
        if not self.enabled:
            return reward.astype(np.float32)
        self.ret = self.ret * self.gamma + reward
        self.rms.update(self.ret, info)
        out = np.clip(reward / np.sqrt(self.rms.var + 1e-8), -self.clip, self.clip)
        self.ret[episode_end] = 0.0
        return out.astype(np.float32)


class EpisodeTracker:
    """Undiscounted return and length of every finished training episode (raw rewards)."""

    def __init__(self, num_envs: int):
        self.ret = np.zeros(num_envs)
        self.len = np.zeros(num_envs, np.int64)
        self.finished: list[tuple[float, int]] = []

    def step(self, reward: np.ndarray, episode_end: np.ndarray) -> None:
        self.ret += reward
        self.len += 1
        for i in np.flatnonzero(episode_end):
            self.finished.append((float(self.ret[i]), int(self.len[i])))
            self.ret[i], self.len[i] = 0.0, 0

    def reset(self) -> None:
        self.ret[:] = 0.0
        self.len[:] = 0

    def drain(self, info: DistInfo) -> dict[str, float]:
        """Mean return/length of episodes finished since the last call, over all processes."""
        done = self.finished
        self.finished = []
        sums = all_reduce_sum(torch.tensor([len(done), sum(r for r, _ in done), sum(n for _, n in done)],
                                            dtype=torch.float64), info)
        if sums[0] == 0:
            return {}
        return {"episode/return": (sums[1] / sums[0]).item(), "episode/length": (sums[2] / sums[0]).item(),
                "episode/count": sums[0].item()}


# --------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_policy(act: Any, env_cfg: EnvConfig, *, episodes: int, seed: int, normalize: Any = None,
                    record: str = "") -> dict[str, float]:
    """Run `episodes` full episodes with `act(obs_batch) -> actions` (deterministic policy) on one env,
    seeded seed, seed+1, ...; optionally save the first episode as a GIF (`record` = path)."""
    env = make_env(env_cfg, render_mode="rgb_array" if record else None)
    returns, lengths, frames = [], [], []
    for k in range(episodes):
        obs, _ = env.reset(seed=seed + k)
        total, n, done = 0.0, 0, False
        while not done:
            if record and k == 0:
                frames.append(env.render())
            x = normalize(obs[None]) if normalize is not None else np.asarray(obs[None], np.float32)
            action = act(x)[0]
            obs, reward, terminated, truncated, _ = env.step(action)
            total, n, done = total + float(reward), n + 1, terminated or truncated
        returns.append(total)
        lengths.append(n)
    env.close()
    if record and frames:
        save_gif(frames, Path(record))
    return {"eval/return": float(np.mean(returns)), "eval/return_std": float(np.std(returns)),
            "eval/length": float(np.mean(lengths)), "eval/min_return": float(np.min(returns))}


def save_gif(frames: list[np.ndarray], path: Path, fps: int = 30) -> None:
    try:
        from PIL import Image
    except ImportError:
        raise RlhfkitError("saving a GIF needs Pillow (pip install pillow)") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames if f is not None]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


# --------------------------------------------------------------------------------------------------
# Agents on disk


class SavableAgent(torch.nn.Module):
    """A torch agent that writes `model.safetensors` + `agent.json` (enough to rebuild it), so the
    run-folder checkpoint code of the language-model recipes works for it unchanged."""

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def save_pretrained(self, path: str, safe_serialization: bool = True) -> None:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().clone() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "agent.json").write_text(json.dumps(self.spec(), indent=2))

    def load_checkpoint_weights(self, folder: Path) -> None:
        weights = load_file(str(Path(folder) / "model.safetensors"))
        missing, unexpected = self.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise RlhfkitError(f"agent weights in {folder} do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")


def make_adam(params: Any, lr: float, eps: float = 1e-8) -> torch.optim.Adam:
    """Adam, fused where torch has it (on CPU about 5x faster than the per-tensor loop for small MLPs)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, eps=eps)


@dataclass
class GymSession:
    """Optimizer, schedule, run folder, logger and the restored checkpoint of a PPO-style gym run."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    run_dir: Path
    updates: int
    start: int
    state: dict[str, Any]
    """The restored checkpoint's state (empty for a new run): recipes read their statistics here."""
    logger: Any
    folder: Any = None
    """The claimed run folder (runtime.rundir.RunFolder): its lock is released by `close`."""

    def close(self) -> None:
        self.logger.close()
        if self.folder is not None:
            self.folder.release()


def open_gym_session(cfg: Any, agent: SavableAgent, *, lr: float, adam_eps: float, anneal_lr: bool, updates: int,
                     resume: str | None, info: DistInfo, params: Any = None) -> GymSession:
    """Adam over `params` (default: all of the agent's) with linear decay to 0 over `updates` when asked,
    the run folder, and on resume the weights, optimizer, schedule and this rank's RNG state of the
    checkpoint. Seeds sampling per rank after the (rank-independent) network init."""
    from rlhfkit.runtime.checkpoint import restore_training_state
    from rlhfkit.runtime.distributed import print0
    from rlhfkit.runtime.metrics import MetricsLogger
    from rlhfkit.runtime.rundir import claim_run_dir
    from rlhfkit.runtime.seeding import seed_everything

    optimizer = make_adam(agent.parameters() if params is None else params, lr, adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: max(0.0, 1.0 - u / updates) if anneal_lr else 1.0)
    folder = claim_run_dir(cfg.output_dir, resume=resume, overwrite=cfg.overwrite, info=info)  # locks it
    seed_everything(cfg.seed + 7919 * info.rank)  # sampling differs per rank
    start, state = 0, {}
    if folder.resume_from is not None:
        state = restore_training_state(folder.resume_from, model=agent, optimizer=optimizer, scheduler=scheduler,
                                       info=info)
        start = state["step"]
    folder.start(cfg)
    if folder.resume_from is not None:
        print0(info, f"resumed from {state['folder']} at update {start}/{updates}")
    logger = MetricsLogger(folder.path, enabled=info.is_main, tensorboard=cfg.tensorboard,
                           resume_step=start if resume is not None else None)
    return GymSession(optimizer, scheduler, folder.path, updates, start, state, logger, folder)


class UpdateLoop:
    """The bookkeeping after each update that the gym recipes share: metrics and progress, evaluation
    every `eval.every` environment steps (and at the end) with target-return tracking, and checkpoints,
    after which the environments restart their episodes (what makes resume exact)."""

    def __init__(self, cfg: Any, session: GymSession, info: DistInfo, *, steps_done: int):
        from rlhfkit.runtime.metrics import ProgressBar

        self.cfg, self.session, self.info = cfg, session, info
        self.train_seconds = float(session.state.get("train_seconds", 0.0))
        self.reached = session.state.get("reached_target")
        self.last_eval = steps_done // cfg.eval.every if cfg.eval.every else 0  # evaluations already done
        self.last_return: float | None = None  # of the latest update in which episodes finished
        self.bar = ProgressBar(session.updates, enabled=cfg.progress and info.is_main, start=session.start,
                               description=cfg.env.id, unit="env steps")

    def end_update(self, update: int, *, steps: int, new_steps: int, elapsed: float, stats: dict[str, float],
                   evaluate: Any, agent: SavableAgent, extra_state: Any, restart: Any) -> bool:
        """Record update `update` (`steps` environment steps so far, `new_steps` of them in this update,
        `elapsed` seconds); returns True when the run should stop (target reached with stop_at_target)."""
        from rlhfkit.runtime.checkpoint import save_training_state
        from rlhfkit.runtime.distributed import print0

        cfg, logger, last = self.cfg, self.session.logger, update == self.session.updates
        self.train_seconds += elapsed
        stats.update({"time/sps": new_steps / elapsed, "time/train_seconds": self.train_seconds,
                      "env_steps": float(steps)})
        if update % cfg.log_every == 0 or last:
            logger.log(update, stats)
        self.bar.update(1, new_steps, elapsed, self.return_text(stats))
        every = cfg.eval.every
        if (every and steps // every > self.last_eval) or last:
            self.last_eval = steps // every if every else self.last_eval
            m = evaluate()
            logger.log(update, {**m, "env_steps": float(steps), "time/train_seconds": self.train_seconds})
            target = cfg.eval.target_return
            if target is not None and self.reached is None and m["eval/return"] >= target:
                self.reached = {"env_steps": steps, "train_seconds": self.train_seconds, "update": update}
                print0(self.info, f"reached eval return {m['eval/return']:.1f} >= {target} after {steps} steps, "
                                  f"{self.train_seconds:.1f} s of training")
                logger.log(update, {"eval/target_reached_steps": float(steps),
                                    "eval/target_reached_seconds": self.train_seconds})
        stop = self.reached is not None and cfg.eval.stop_at_target
        if (cfg.save_every and update % cfg.save_every == 0) or last or stop:
            state = {**extra_state(), "train_seconds": self.train_seconds, "reached_target": self.reached}
            save_training_state(self.session.run_dir, update, model=agent, optimizer=self.session.optimizer,
                                scheduler=self.session.scheduler, state=state, keep=cfg.save_total_limit, info=self.info)
            if not last:
                restart(update)
        return stop

    def return_text(self, stats: dict[str, float]) -> str:
        """`return 123.4` for the progress bar: the training episodes of the latest update that finished
        any (long episodes span several updates), `return -` until the first episode ends."""
        if "episode/return" in stats:
            self.last_return = stats["episode/return"]
        return "return -" if self.last_return is None else f"return {self.last_return:.1f}"

    def close(self) -> None:
        self.bar.close()


def sample_categorical(logp: torch.Tensor) -> torch.Tensor:
    """One action per row of log-probabilities (..., A), by inverse CDF: a few elementwise ops instead
    of `torch.multinomial`, which costs ~40 us per call on CPU, more than a 64-unit policy forward."""
    cdf = logp.exp().cumsum(-1)
    u = torch.rand(cdf.shape[:-1] + (1,), device=cdf.device) * cdf[..., -1:]
    return (u >= cdf).sum(-1).clamp_(max=logp.shape[-1] - 1)


def layer_init(layer: torch.nn.Linear, gain: float, ortho: bool) -> torch.nn.Linear:
    """Orthogonal weights with `gain`, zero bias (CleanRL / SB3 defaults for PPO)."""
    if ortho:
        torch.nn.init.orthogonal_(layer.weight, gain)
        torch.nn.init.zeros_(layer.bias)
    return layer


def mlp(sizes: list[int], activation: str, out_gain: float, ortho: bool) -> torch.nn.Sequential:
    act = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}[activation]
    layers: list[torch.nn.Module] = []
    for i in range(len(sizes) - 1):
        last = i == len(sizes) - 2
        layers.append(layer_init(torch.nn.Linear(sizes[i], sizes[i + 1]), out_gain if last else math.sqrt(2), ortho))
        if not last:
            layers.append(act())
    return torch.nn.Sequential(*layers)
