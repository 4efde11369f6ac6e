"""The command line's exit codes: usage errors and Ctrl-C end with a message and a non-zero status."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhfkit.cli import main
from tests.test_sft import _cli


def test_usage_errors_exit_2_without_a_traceback(tmp_path: Path) -> None:
    for args, expect in ((["nosuch"], "No such command 'nosuch'"), (["gym", "eval"], "Missing argument"),
                         (["gym", "eval", "x", "--episodes", "0"], "--episodes"), ([], "Usage")):
        res = _cli(*args, cwd=tmp_path)
        assert res.returncode == 2, (args, res.returncode, res.stderr[-500:])
        assert expect in res.stdout + res.stderr and "Traceback" not in res.stderr, args


@pytest.mark.parametrize(("args", "message"), [
    (["sft", "--bogus", "1"], "No such option: --bogus"),
    (["dpo", "train.lr=1e-4", "--bogus=1", "--print-config"], "No such option: --bogus"),
    (["gym", "ppo", "-x"], "No such option: -x"),
    (["sft", "--confg", "c.yaml"], "No such option: --confg  Did you mean --config?"),
])
def test_unknown_option_to_a_recipe_is_a_usage_error(args, message, capsys, tmp_path, monkeypatch) -> None:
    # Recipe commands pass extra arguments through as key=value overrides; options must not slip through.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    assert info.value.code == 2
    assert f"Error: {message}\n" in err and f"Usage: rlhfkit {' '.join(args[:2] if args[0] == 'gym' else args[:1])}" in err
    assert out == "" and not any(tmp_path.iterdir())  # stopped before the config was even read


def test_overrides_still_pass_through(capsys) -> None:
    main(["sft", "train.lr=0.25", "--print-config"])  # returns: exit code 0
    assert "lr: 0.25" in capsys.readouterr().out


def test_validate_an_empty_file_is_an_error(tmp_path: Path) -> None:
    # docs/data.md: an empty file is an error for `data validate` as for training.
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(SystemExit) as info:
        main(["data", "validate", str(path)])
    assert info.value.code == 2


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
