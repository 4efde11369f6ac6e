"""The run folder and the checkpoints in it: nothing of the user's is ever removed, one run per folder,
damaged checkpoints are caught before anything is touched, and a run that diverges stops loudly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.config import load_config
from rlhfkit.errors import RlhfkitError
from rlhfkit.recipes.sft import SFTConfig, train
from rlhfkit.runtime.checkpoint import choose_checkpoint, verify_checkpoint
from rlhfkit.runtime.distributed import DistInfo
from rlhfkit.runtime.optim import NonFiniteError, NonFiniteGuard, guarded_update
from rlhfkit.runtime.rundir import claim_run_dir, holds_run
from tests.test_sft import TINY, _cli, _losses

QUICK = [*TINY, "train.max_steps=2", "data.eval_fraction=0", "sample_prompts=[]"]


def _sft(out: Path, *extra: str, resume: str | None = None) -> Path:
    return train(load_config(SFTConfig, None, [*QUICK, f"output_dir={out}", *extra]), resume=resume)


# --------------------------------------------------------------------------------------------------
# What overwrite may remove


@pytest.mark.parametrize("overwrite", ["true", "false"])
def test_a_plain_file_as_output_dir_is_refused_and_kept(tmp_path: Path, overwrite: str) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    res = _cli("sft", *QUICK, f"output_dir={target}", f"overwrite={overwrite}", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "is a file, not a folder" in res.stderr and "Traceback" not in res.stderr
    assert target.read_text() == "mine"


def test_overwrite_never_removes_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text("{}\n")
    (folder / "model").mkdir()  # looks like a run's output, but rlhfkit did not write this folder
    for overwrite in ("true", "false"):
        with pytest.raises(RlhfkitError, match="holds other files"):
            _sft(folder, f"overwrite={overwrite}")
    assert (folder / "train.jsonl").read_text() == "{}\n" and (folder / "model").is_dir()


def test_overwrite_replaces_an_earlier_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _sft(run)
    (run / "checkpoints" / "step-00000099").mkdir()  # an old checkpoint of that run: replaced as well
    _sft(run, "overwrite=true")
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")) == [
        "step-00000002"]
    assert sorted(_losses(run)) == [1, 2]


def test_a_start_that_failed_early_does_not_block_the_rerun(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    # what a run that stopped during its first step leaves: the marker, config and a metrics row
    (run / "rlhfkit-run.json").write_text("{}")
    (run / "config.yaml").write_text("seed: 1\n")
    (run / "metrics.jsonl").write_text('{"step": 0, "eval/loss": 1.0}\n')
    assert not holds_run(run)
    _sft(run)  # no overwrite needed, and the leftovers are replaced
    assert sorted(_losses(run)) == [1, 2]


def test_batch_larger_than_the_data_is_an_error_before_anything_is_written(tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = _cli("sft", *QUICK, "train.batch_size=100000", f"output_dir={run}", cwd=tmp_path)
    assert res.returncode == 2
    assert "config key 'train.batch_size': 100000 is larger than the 64 training examples" in res.stderr
    assert not run.exists()


# --------------------------------------------------------------------------------------------------
# One run per folder


def test_a_second_run_into_a_busy_folder_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen([sys.executable, "-m", "rlhfkit", "sft", *TINY, "train.max_steps=100000",
                              "data.eval_fraction=0", f"output_dir={run}"], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").is_file():  # the first run is past its set-up, training
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            assert time.time() < deadline
            time.sleep(0.5)
        for extra in ("overwrite=false", "overwrite=true"):
            res = _cli("sft", *QUICK, f"output_dir={run}", extra, cwd=tmp_path)
            assert res.returncode == 2, res.stderr
            assert f"is in use by another rlhfkit run (pid {first.pid})" in res.stderr
        res = _cli("sft", *QUICK, f"output_dir={run}", "--resume", cwd=tmp_path)
        assert res.returncode == 2 and f"pid {first.pid}" in res.stderr
        assert first.poll() is None, "the first run must be untouched"
        assert (run / "config.yaml").is_file()
    finally:
        first.kill()
        first.wait()
    # kill -9 frees the lock (it is the kernel's): the folder can be resumed or replaced now
    res = _cli("sft", *QUICK, f"output_dir={run}", "overwrite=true", cwd=tmp_path)
    assert res.returncode == 0, res.stderr


def test_the_same_process_may_start_again_after_a_failed_run(tmp_path: Path) -> None:
    folder = claim_run_dir(str(tmp_path / "run"), resume=None, overwrite=False, info=DistInfo())
    # no release (as after an exception): the next claim by this process still succeeds
    again = claim_run_dir(str(tmp_path / "run"), resume=None, overwrite=False, info=DistInfo())
    again.release()
    folder.release()


# --------------------------------------------------------------------------------------------------
# Damaged checkpoints


def _checkpoints(run: Path) -> list[Path]:
    return sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))


@pytest.fixture()
def three_checkpoints(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    _sft(run, "train.max_steps=3", "train.save_every=1", "train.save_total_limit=0")
    assert [p.name for p in _checkpoints(run)] == ["step-00000001", "step-00000002", "step-00000003"]
    return run


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_good_one(three_checkpoints: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    run = three_checkpoints
    step2, step3 = _checkpoints(run)[1:]
    weights = step3 / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    assert "truncated" in (verify_checkpoint(step3) or "")
    (step2 / "state.json").write_text('{"step": 2, "sampler"')  # broken JSON
    step1 = _checkpoints(run)[0]
    assert choose_checkpoint(run, "latest", warn=lambda m: None) == step1
    _sft(run, "train.max_steps=4", resume="latest")
    out = capsys.readouterr().out
    assert "resuming from step-00000001, the newest intact checkpoint" in out
    assert "resumed from" in out and "at step 1" in out


def test_an_optimizer_file_cut_short_is_caught(three_checkpoints: Path) -> None:
    step3 = _checkpoints(three_checkpoints)[-1]
    opt = step3 / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    assert "optimizer.pt has 100 bytes" in (verify_checkpoint(step3) or "")


def test_resuming_a_damaged_checkpoint_by_path_is_one_error_and_touches_nothing(three_checkpoints: Path) -> None:
    run = three_checkpoints
    step3 = _checkpoints(run)[-1]
    (step3 / "rng.pt").write_bytes(b"garbage")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    res = _cli("sft", *QUICK, f"output_dir={run}", "train.max_steps=4", "--resume", str(step3), cwd=run.parent)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "the checkpoint is damaged: rng.pt" in res.stderr
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_a_killed_save_leaves_a_temporary_folder_that_the_next_start_removes(three_checkpoints: Path) -> None:
    stale = three_checkpoints / "checkpoints" / ".tmp-step-00000004-abc123"
    (stale / "model").mkdir(parents=True)
    _sft(three_checkpoints, "train.max_steps=4", resume="latest")
    assert not stale.exists()


def test_resume_with_lora_toggled_is_one_clear_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _sft(run, "train.save_every=1")
    res = _cli("sft", *QUICK, f"output_dir={run}", "train.max_steps=3", "lora.enabled=true", "--resume", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "holds full weights, but this run has lora.enabled=true" in res.stderr


# --------------------------------------------------------------------------------------------------
# Non-finite training


def test_guard_stops_names_the_metric_and_step_or_skips_up_to_a_limit(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(NonFiniteError, match=r"sft step 7: train/loss = nan.*last finite checkpoint"):
        NonFiniteGuard("stop", recipe="sft").check(7, {"train/loss": float("nan"), "train/grad_norm": 1.0})
    with pytest.raises(NonFiniteError, match="no checkpoint had been written yet"):
        NonFiniteGuard("stop", run_dir=tmp_path).check(1, {"train/loss": float("inf")})
    guard = NonFiniteGuard("skip", max_skips=2, recipe="dpo")
    assert guard.check(1, {"train/grad_norm": float("inf")}) is False
    assert guard.check(2, {"train/grad_norm": float("inf")}) is False
    assert guard.check(3, {"train/grad_norm": 0.5}) is True  # a finite step resets the count
    assert guard.check(4, {"train/grad_norm": float("inf")}) is False
    assert guard.check(5, {"train/grad_norm": float("inf")}) is False
    with pytest.raises(NonFiniteError, match="3 updates in a row"):
        guard.check(6, {"train/grad_norm": float("inf")})
    assert "update skipped" in capsys.readouterr().out


def test_a_skipped_update_leaves_weights_and_optimizer_state_alone() -> None:
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.tensor([[float("nan"), 1.0, 2.0]])).sum()
    loss.backward()
    guard = NonFiniteGuard("skip", max_skips=3)
    guarded_update(model, optimizer, guard, 1, {"train/loss": loss.item()}, max_grad_norm=1.0, info=DistInfo())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert optimizer.state_dict()["state"] == {} and all(p.grad is None for p in model.parameters())


def test_a_diverging_sft_run_stops_keeps_its_finite_checkpoint_and_writes_no_model(tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = _cli("sft", *QUICK, "train.lr=1e30", "train.max_steps=6", "train.save_every=1", "train.save_total_limit=1",
               f"output_dir={run}", cwd=tmp_path)
    assert res.returncode == 3, res.stderr
    assert "Traceback" not in res.stderr and "train/" in res.stderr and "sft step 2" in res.stderr
    assert "train.on_nonfinite=skip" in res.stderr and "the last finite checkpoint, " in res.stderr
    assert not (run / "model").exists()
    (ckpt,) = _checkpoints(run)
    assert ckpt.name == "step-00000001" and verify_checkpoint(ckpt) is None
    weights = load_file(str(ckpt / "model" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(row["step"] for row in logged) == 1, "the non-finite step is not logged as a normal step"


def test_a_ppo_reward_that_overflows_stops_the_run(tmp_path: Path) -> None:
    from tests.test_ppo import make_prompts, tiny_args

    data = make_prompts(tmp_path / "p.jsonl")
    args = tiny_args(data, tmp_path / "r", "reward.sources=tests.ppo_rewards:huge_score", "train.max_steps=3")
    res = _cli("ppo", *args, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 3, res.stderr
    assert "ppo step 1" in res.stderr and "inf" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "r" / "model").exists()


def test_fp16_on_cpu_is_refused_before_the_folder_exists(tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = _cli("sft", *QUICK, "train.mixed_precision=fp16", "model.device=cpu", f"output_dir={run}", cwd=tmp_path)
    assert res.returncode == 2 and "fp16 autocast needs a CUDA GPU" in res.stderr
    assert not run.exists()


def test_a_ppo_run_whose_reward_fails_at_the_first_eval_can_be_rerun(tmp_path: Path) -> None:
    from tests.test_ppo import make_prompts, tiny_args

    data = make_prompts(tmp_path / "p.jsonl")
    root = Path(__file__).resolve().parents[1]
    res = _cli("ppo", *tiny_args(data, tmp_path / "r", "reward.sources=tests.ppo_rewards:explodes",
                                  "train.max_steps=1"), cwd=root)
    assert res.returncode == 2 and "scorer crashed" in res.stderr and "Traceback" not in res.stderr
    res = _cli("ppo", *tiny_args(data, tmp_path / "r", "train.max_steps=1"), cwd=root)  # same folder, no overwrite
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "r" / "model").is_dir()


def test_dpo_and_reward_stop_on_a_non_finite_loss_too(tmp_path: Path) -> None:
    from rlhfkit.recipes import dpo, reward
    from tests.test_dpo import make_pairs
    from tests.test_dpo import tiny_args as dpo_args

    data = make_pairs(tmp_path / "pairs.jsonl")
    runs = [(dpo, dpo.DPOConfig, dpo_args(data, tmp_path / "d", "train.lr=1e30", "train.max_steps=5",
                                          "train.save_every=1", "data.eval_fraction=0")),
            (reward, reward.RewardConfig, [*QUICK[:1], f"data.train={data}", "train.lr=1e30", "train.max_steps=5",
                                           "train.save_every=1", "train.batch_size=4", "data.eval_fraction=0",
                                           "progress=false", "tensorboard=false", f"output_dir={tmp_path / 'w'}"])]
    for module, cls, args in runs:
        with pytest.raises(NonFiniteError, match=rf"{module.__name__.rsplit('.', 1)[1]} step \d: train/"):
            module.train(load_config(cls, None, args))
        out = Path(load_config(cls, None, args).output_dir)
        assert not (out / "model").exists()
        assert all(verify_checkpoint(p) is None for p in _checkpoints(out))


def test_gym_dqn_stops_on_a_non_finite_loss(tmp_path: Path) -> None:
    from rlhfkit.gym.dqn import GymDQNConfig
    from rlhfkit.gym.dqn import train as train_dqn

    cfg = load_config(GymDQNConfig, None, [f"output_dir={tmp_path / 'q'}", "progress=false", "tensorboard=false",
                                           "dqn.lr=1e30", "dqn.learning_starts=64", "dqn.total_steps=2000",
                                           "eval.every=0"])
    with pytest.raises(NonFiniteError, match=r"gym dqn step \d+: train/loss = nan"):
        train_dqn(cfg)
    assert not (tmp_path / "q" / "agent").exists()


def test_a_project_folder_with_a_config_and_a_model_is_not_a_run(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "model").mkdir(parents=True)
    (project / "config.yaml").write_text("mine: true\n")
    assert not holds_run(project)
    with pytest.raises(RlhfkitError, match="holds other files"):
        _sft(project, "overwrite=true")
    assert (project / "config.yaml").read_text() == "mine: true\n" and (project / "model").is_dir()
    (project / "model").rmdir()  # a config.yaml alone is the user's too: never taken for a failed start
    with pytest.raises(RlhfkitError, match=r"holds other files \(config.yaml\)"):
        _sft(project)
    assert (project / "config.yaml").read_text() == "mine: true\n"


def test_overwrite_keeps_the_users_own_files_in_a_run_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _sft(run)
    (run / "notes.txt").write_text("mine")
    (run / "mydir").mkdir()
    _sft(run, "overwrite=true")
    assert (run / "notes.txt").read_text() == "mine" and (run / "mydir").is_dir()


def test_resume_from_a_path_never_writes_among_a_users_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _sft(src, "train.save_every=1")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RlhfkitError, match="holds other files"):
        _sft(other, "train.max_steps=3", resume=str(src / "checkpoints" / "step-00000002"))
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_output_dir_below_a_file_is_refused_before_anything_loads(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    with pytest.raises(RlhfkitError, match="is a file, so no folder can be made below it"):
        from rlhfkit.runtime.rundir import check_run_dir

        check_run_dir(str(tmp_path / "plain" / "sub"), resume=None, overwrite=False, info=DistInfo())


def test_a_changed_learning_rate_applies_on_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _sft(run, "train.max_steps=2", "train.scheduler=constant", "train.warmup_steps=0")
    _sft(run, "train.max_steps=3", "train.scheduler=constant", "train.warmup_steps=0", "train.lr=1e-5",
         resume="latest")
    lrs = _losses(run, "train/lr")
    assert lrs[1] == pytest.approx(3e-3) and lrs[3] == pytest.approx(1e-5)


def test_a_checkpoint_without_manifest_is_used_with_a_warning_and_a_bad_state_is_one_error(
        three_checkpoints: Path, capsys: pytest.CaptureFixture) -> None:
    step3 = _checkpoints(three_checkpoints)[-1]
    (step3 / "manifest.json").unlink()
    assert choose_checkpoint(three_checkpoints, "latest", warn=print) == step3
    assert "has no manifest.json" in capsys.readouterr().out
    (step3 / "state.json").write_text("{}")
    assert "holds no step number" in (verify_checkpoint(step3) or "")
    (step3 / "state.json").write_text('{"step": 3}')
    with pytest.raises(RlhfkitError, match="no data position"):
        _sft(three_checkpoints, "train.max_steps=4", resume="latest")


def test_an_interrupted_final_save_leaves_no_half_folder(tmp_path: Path) -> None:
    from rlhfkit.runtime.atomic import atomic_folder, umask

    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(out) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (out / "old.txt").is_file()
    with atomic_folder(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask()  # not mkdtemp's 0700


def test_resuming_a_run_stopped_before_its_final_save_logs_the_final_eval_once(tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    args = [*TINY, "train.max_steps=2", "sample_prompts=[]", f"output_dir={run}"]
    train(load_config(SFTConfig, None, args))
    shutil.rmtree(run / "model")  # what a kill between the last checkpoint and the final save leaves
    out = train(load_config(SFTConfig, None, args), resume="latest")
    assert (out / "config.json").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/loss" in r] == [0, 2]
