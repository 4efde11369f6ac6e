"""The command line's exit codes: usage errors and Ctrl-C end with a message and a non-zero status."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.test_sft import _cli


def test_usage_errors_exit_2_without_a_traceback(tmp_path: Path) -> None:
    for args, expect in ((["nosuch"], "No such command 'nosuch'"), (["gym", "eval"], "Missing argument"),
                         (["gym", "eval", "x", "--episodes", "0"], "--episodes"), ([], "Usage")):
        res = _cli(*args, cwd=tmp_path)
        assert res.returncode == 2, (args, res.returncode, res.stderr[-500:])
        assert expect in res.stdout + res.stderr and "Traceback" not in res.stderr, args


def test_ctrl_c_stops_a_run_with_exit_code_130(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "rlhfkit", "gym", "ppo", f"output_dir={tmp_path / 'run'}", "ppo.total_steps=10000000",
           "progress=false", "eval.every=0", "tensorboard=false"]
    # the default SIGINT handler, whatever the test runner's shell left it as (background jobs ignore it)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout is not None
    proc.stdout.readline()  # "CartPole-v1: 8 envs x 1 process(es), ...": training has started
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-1000:])
    assert "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "agent").exists()  # no final agent pretends the run finished
