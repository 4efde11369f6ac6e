"""What `rlhfkit gym ppo` and `rlhfkit gym eval` print: no `return nan` before the first episode ends,
and no SDL noise on stderr when a GIF is rendered on a headless machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from rlhfkit.gym.common import UpdateLoop
from rlhfkit.gym.evaluate import quiet_rendering
from rlhfkit.runtime.distributed import DistInfo


def _rlhfkit(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhfkit", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_progress_return_is_a_dash_until_an_episode_ends() -> None:
    cfg = SimpleNamespace(eval=SimpleNamespace(every=0), progress=False, env=SimpleNamespace(id="CartPole-v1"))
    loop = UpdateLoop(cfg, SimpleNamespace(state={}, updates=3, start=0), DistInfo(), steps_done=0)
    assert loop.return_text({"train/lr": 1e-3}) == "return -"
    assert loop.return_text({"episode/return": 21.25}) == "return 21.2"
    # an update in which no episode finished keeps the latest value instead of flickering back to "-"
    assert loop.return_text({}) == "return 21.2"
    loop.close()


def test_quiet_rendering_restores_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("SDL_AUDIODRIVER", "pulse")  # a user's choice is kept
    with quiet_rendering():
        runtime_dir = os.environ["XDG_RUNTIME_DIR"]
        assert os.environ["SDL_AUDIODRIVER"] == "pulse"
        assert Path(runtime_dir).is_dir() and (Path(runtime_dir).stat().st_mode & 0o777) == 0o700
    assert "XDG_RUNTIME_DIR" not in os.environ and os.environ["SDL_AUDIODRIVER"] == "pulse"
    assert not Path(runtime_dir).exists()


def test_gym_ppo_then_eval_with_a_gif_print_no_nan_and_no_sdl_noise(tmp_path: Path) -> None:
    # A headless machine: no display, no runtime folder, SDL left to pick its drivers.
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_RUNTIME_DIR", "DISPLAY", "WAYLAND_DISPLAY") and not k.startswith("SDL_")}
    env.update(OMP_NUM_THREADS="1", COLUMNS="200")
    run = tmp_path / "run"
    # One update of 4 steps per env: no CartPole episode ends that soon, so the bar has no return yet.
    res = _rlhfkit("gym", "ppo", "ppo.n_steps=4", "ppo.total_steps=32", f"output_dir={run}", "eval.every=0",
                   "eval.episodes=1", "tensorboard=false", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "return -" in res.stderr and "nan" not in res.stderr, res.stderr
    gif = tmp_path / "episode.gif"
    res = _rlhfkit("gym", "eval", str(run / "agent"), "--episodes", "1", "--gif", str(gif), cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr == ""
    assert res.stdout.startswith("mean return ") and f"GIF: {gif}" in res.stdout
    assert gif.read_bytes()[:6] == b"GIF89a"
