"""rlhfkit pipeline on a tiny model: the plan, bad configs refused before anything runs, stages skipped when
unchanged and rerun (with everything after them) when changed, and kill -9 then --resume ending with the
same numbers as a straight run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.pipeline.run import run_pipeline

TINY = {
    "model": "tiny:llama",
    "device": "cpu",
    "stages": ["feedback", "reward", "dpo", "eval", "compress"],
    "feedback": {"annotator": "length", "prompts": "bundled:reviews_train",
                 "max_prompts": 8, "eval_prompts": "bundled:reviews_val", "max_eval_prompts": 4,
                 "samples_per_prompt": 3, "max_new_tokens": 8, "unfinished": "keep"},
    "reward": {"set": {"train.max_steps": 2, "train.batch_size": 4, "data.max_length": 96, "progress": False,
                       "tensorboard": False}},
    "dpo": {"set": {"train.max_steps": 6, "train.batch_size": 4, "train.save_every": 2, "data.max_length": 96,
                    "progress": False, "tensorboard": False}},
    "eval": {"prompts": "bundled:reviews_heldout", "max_prompts": 4, "max_new_tokens": 8, "samples": 1,
             "scorers": ["length", "reward_model"]},
    "compress": {"to": ["merged"], "max_reference": 2},
}


def write_config(tmp_path: Path, out: Path, **changes) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["output_dir"] = str(out)
    cfg.update(changes)
    path = tmp_path / f"pipeline-{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def quiet(*_args) -> None:
    pass


def actions(result: dict) -> dict[str, str]:
    return {s["key"]: s["action"] for s in result["steps"]}


def final_numbers(out: Path) -> dict:
    summary = json.loads((out / "round-1" / "eval" / "summary.json").read_text())
    dpo = [json.loads(x) for x in (out / "round-1" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    return {"scores": summary["scores"], "kl": {m: k["k1_per_token"] for m, k in summary["kl"].items()},
            "dpo_loss": [r["train/loss"] for r in dpo if "train/loss" in r]}


@pytest.mark.parametrize("change, message", [
    ({"stages": ["feedback", "rewrad"]}, "unknown stage 'rewrad' (did you mean 'reward'?)"),
    ({"stages": ["dpo", "feedback"]}, "stages run in the order"),
    ({"stages": ["feedback", "eval"]}, "eval compares a tuned model with the base: add dpo or ppo"),
    ({"stages": ["feedback", "compress"]}, "compress makes the tuned model small"),
    ({"stages": ["reward"]}, "data.train"),
    ({"compress": {"to": ["int4"]}}, "compress.to[0]"),
    ({"dpo": {"set": {"train.lr": "fast"}}}, "dpo.train.lr"),
    ({"eval": {"scorers": ["reward_model"]}, "stages": ["feedback", "dpo", "eval"]}, "reward_model needs the reward stage"),
    ({"rounds": 2, "stages": ["feedback", "reward"]}, "rounds > 1 need a policy stage"),
])
def test_a_bad_pipeline_config_is_refused_before_anything_runs(tmp_path, change, message):
    out = tmp_path / "never"
    with pytest.raises((ConfigError, RlhfkitError)) as exc:
        run_pipeline(write_config(tmp_path, out, **change), [], log=quiet)
    assert message in str(exc.value)
    assert not out.exists()  # nothing written, not even the state file


def test_a_stage_reading_a_missing_file_is_refused_before_anything_runs(tmp_path):
    # PPO against a reward model folder that was never trained: no stage writes it and it is not there
    out = tmp_path / "never"
    cfg = write_config(tmp_path, out, stages=["ppo", "eval"],
                       ppo={"rewards": ["reward_model"], "set": {"train.max_steps": 1}})
    with pytest.raises(ConfigError, match="reward_model needs the reward stage"):
        run_pipeline(cfg, [], log=quiet)
    assert not out.exists()


def test_pipeline_runs_skips_unchanged_stages_and_reruns_changed_ones(tmp_path):
    out = tmp_path / "pipe"
    cfg = write_config(tmp_path, out)
    plan = run_pipeline(cfg, [], dry_run=True, log=quiet)
    assert list(actions(plan).values()) == ["run"] * 5
    assert not out.exists()  # a dry run writes nothing

    result = run_pipeline(cfg, [], log=quiet)
    assert Path(result["report"]).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"][0]["models"] == {"dpo": str(out / "round-1" / "dpo" / "model")}
    assert summary["compress"]["merged"]["check"]["ok"]
    assert (out / "configs" / "round-1-dpo.yaml").is_file()  # the resolved config, as `rlhfkit dpo` reads it
    state = json.loads((out / "pipeline.json").read_text())["stages"]
    assert {v["status"] for v in state.values()} == {"done"}

    # the same config again: every stage is skipped
    assert set(actions(run_pipeline(cfg, [], dry_run=True, log=quiet)).values()) == {"skip"}
    # a DPO setting changes: DPO and what reads it run again, feedback and reward stay
    changed = actions(run_pipeline(cfg, ["dpo.set.train.lr=1e-5"], dry_run=True, log=quiet))
    assert changed == {"round-1/feedback": "skip", "round-1/reward": "skip", "round-1/dpo": "rerun (changed)",
                       "round-1/eval": "rerun (changed)", "compress": "rerun (changed)"}
    # a feedback setting changes: everything after it too
    changed = actions(run_pipeline(cfg, ["feedback.max_prompts=6"], dry_run=True, log=quiet))
    assert set(changed.values()) == {"rerun (changed)"}
    # an output that went missing makes its stage run again
    (out / "round-1" / "reward" / "model" / "config.json").unlink()
    import shutil

    shutil.rmtree(out / "round-1" / "reward" / "model")
    assert actions(run_pipeline(cfg, [], dry_run=True, log=quiet))["round-1/reward"] == "rerun"


def _pipeline_cmd(cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rlhfkit", "pipeline", "--config", str(cfg), *extra]


def test_kill_9_during_dpo_then_resume_ends_with_the_numbers_of_a_straight_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    stop = tmp_path / "stopped"
    cfg_a = write_config(tmp_path, straight, stages=["feedback", "dpo", "eval"],
                         eval={**TINY["eval"], "scorers": ["length"]})
    cfg_b = write_config(tmp_path, stop, stages=["feedback", "dpo", "eval"], eval={**TINY["eval"], "scorers": ["length"]})
    subprocess.run(_pipeline_cmd(cfg_a), check=True, env=env, capture_output=True, timeout=300)

    proc = subprocess.Popen(_pipeline_cmd(cfg_b), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = stop / "round-1" / "dpo" / "checkpoints" / "step-00000002"
    deadline = time.time() + 240
    while not checkpoint.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.is_dir(), "the run ended before its first DPO checkpoint: nothing was interrupted"
    assert not (stop / "round-1" / "eval" / "summary.json").exists()
    state = json.loads((stop / "pipeline.json").read_text())["stages"]
    assert state["round-1/feedback"]["status"] == "done" and state["round-1/dpo"]["status"] == "running"

    done = subprocess.run(_pipeline_cmd(cfg_b, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "round-1/feedback: unchanged, skipped" in done.stdout
    assert "resuming rlhfkit dpo" in done.stdout
    assert final_numbers(stop) == final_numbers(straight)


def test_feedback_from_people_in_the_label_app_feeds_dpo(tmp_path):
    """source=label: the stage creates the project, prints each person's link, serves the app and waits;
    a scripted person answers through the JSON API (the contract every trainer that waits for labels
    relies on) and DPO trains on the exported pairs."""
    import re
    import threading

    import httpx

    from tests.label_services import free_port

    port = free_port()
    out = tmp_path / "people"
    cfg = write_config(tmp_path, out, stages=["feedback", "dpo"],
                       feedback={"source": "label", "prompts": "bundled:reviews_train", "max_prompts": 4,
                                 "max_new_tokens": 6, "annotators": ["pat"], "port": port, "poll_seconds": 0.2},
                       dpo={"set": {**TINY["dpo"]["set"], "train.batch_size": 2, "train.max_steps": 2}})
    proc = subprocess.Popen(_pipeline_cmd(cfg), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    link = threading.Event()
    token: list[str] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            found = re.search(r"pat: (http://\S+/login\?token=(\S+))", line)
            if found:
                token.append(found.group(2))
                link.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert link.wait(180), "no link printed:\n" + "".join(lines[-30:])
        person = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token[0]}"},
                              timeout=30, trust_env=False)
        answered = 0
        deadline = time.time() + 120
        while answered < 4 and time.time() < deadline:
            try:
                task = person.get("/api/next").json()["task"]
            except httpx.TransportError:  # the server is still starting
                time.sleep(0.2)
                continue
            if task is None:
                time.sleep(0.2)
                continue
            body = {"assignment_id": task["assignment_id"], "submission_id": f"submission-{answered}",
                    "choice": "left" if answered % 2 else "right"}
            r = person.post("/api/labels", params={"next": "false"}, json=body)
            assert r.status_code == 200, r.text
            answered += 1
        assert proc.wait(timeout=240) == 0, "".join(lines[-40:])
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    assert answered == 4
    prefs = (out / "round-1" / "feedback" / "preferences.jsonl").read_text().splitlines()
    assert len(prefs) == 4
    assert (out / "round-1" / "dpo" / "model").is_dir()
    assert "4/4 labels" in "".join(lines)


def test_demo_is_the_pipeline_and_prints_the_headline(tmp_path):
    """`rlhfkit demo` on a tiny model (every stage shrunk by overrides): it runs the packaged demo pipeline
    and ends with the answers before/after, the headline numbers and where the report is."""
    out = tmp_path / "demo"
    args = [f"output_dir={out}", "model=tiny:llama", "feedback.max_prompts=6", "feedback.max_eval_prompts=4",
            "feedback.samples_per_prompt=3", "feedback.max_new_tokens=8", "feedback.unfinished=keep",
            "feedback.annotator=length", "feedback.annotator_options={}",
            "reward.set={train.max_steps: 2, train.batch_size: 4, data.max_length: 96, progress: false, backbone_layers: 1}",
            "dpo.set={train.max_steps: 2, train.batch_size: 4, data.max_length: 96, progress: false}",
            "eval.max_prompts=3", "eval.max_new_tokens=6", "eval.samples=1", "compress.to=[merged]",
            "compress.max_reference=2"]
    done = subprocess.run([sys.executable, "-m", "rlhfkit", "demo", *args], capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    for expected in ("greedy answers before -> after", "mean sentiment (greedy) on 3 held-out prompts",
                     "win rate over the base", "reward model accuracy on held-out pairs",
                     "compressed to merged", "report:", "total demo time"):
        assert expected in text, expected
    assert (out / "report.html").is_file()
    again = subprocess.run([sys.executable, "-m", "rlhfkit", "demo", *args], capture_output=True, text=True,
                           timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0 and again.stdout.count("unchanged, skipped") == 5


def test_ppo_stage_runs_the_packaged_demo_ppo_config_against_the_reward_model(tmp_path):
    """dpo and ppo in one round: PPO trains against this round's reward model with the packaged
    rlhfkit:demo_ppo.yaml (shrunk by `set`), eval compares both with the base and compress takes the
    last policy listed (ppo)."""
    out = tmp_path / "both"
    cfg = write_config(tmp_path, out, stages=["feedback", "reward", "dpo", "ppo", "eval", "compress"],
                       ppo={"config": "rlhfkit:demo_ppo.yaml",
                            "set": {"train.max_steps": 2, "rollout.max_new_tokens": 8, "train.batch_size": 2,
                                    "ppo.mini_batch_size": 4, "progress": False, "tensorboard": False,
                                    "train.save_every": 1}})
    plan = run_pipeline(cfg, [], dry_run=True, log=quiet)
    assert actions(plan)["round-1/ppo"] == "run"
    run_pipeline(cfg, [], log=quiet)
    ppo_cfg = yaml.safe_load((out / "configs" / "round-1-ppo.yaml").read_text())
    assert ppo_cfg["reward"]["sources"] == [str(out / "round-1" / "reward" / "model")]
    assert ppo_cfg["ppo"]["advantage"] == "rloo" and ppo_cfg["rollout"]["samples_per_prompt"] == 4
    rows = [json.loads(x) for x in (out / "round-1" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "objective/scores" in r] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["rounds"][0]["models"]) == {"dpo", "ppo"}
    assert set(summary["rounds"][0]["kl"]) == {"dpo", "ppo"}
    assert summary["compress"]["merged"]["source"] == str(out / "round-1" / "ppo" / "model")
