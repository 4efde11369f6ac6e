"""SFT end to end on tiny models: CLI smoke run, exact resume, 2-process torchrun, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhfkit.config import load_config
from rlhfkit.recipes.sft import SFTConfig, train
from tests.conftest import write_jsonl

TINY = [
    "model.name=tiny:llama",
    "train.lr=3e-3",
    "train.batch_size=4",
    "train.scheduler=linear",
    "data.max_length=96",
    "data.max_samples=64",
    "data.eval_fraction=0.1",
    "progress=false",
    "tensorboard=false",
]


def _losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if key in row:
            out[row["step"]] = row[key]
    return out


def _cli(*args: str, cwd: Path, torchrun: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
               "--standalone", "-m", "rlhfkit", *args]
    else:
        cmd = [sys.executable, "-m", "rlhfkit", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_cli_smoke_run_learns_and_writes_a_loadable_model(tmp_path: Path) -> None:
    res = _cli("sft", *TINY, "train.max_steps=12", "sample_every=6", f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    run = tmp_path / "run"
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 13))
    assert losses[12] < losses[1] - 0.5, losses  # a tiny model at lr 3e-3 must clearly learn
    evals = _losses(run, "eval/loss")
    assert set(evals) == {0, 12} and evals[12] < evals[0]
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((run / "config.yaml").read_text())))
    assert cfg["model"]["name"] == "tiny:llama" and cfg["train"]["max_steps"] == 12
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0, 6, 12}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "model")
    tok = AutoTokenizer.from_pretrained(run / "model")
    assert model.config.num_hidden_layers == 2 and tok.chat_template
    assert (run / "checkpoints" / "step-00000012" / "optimizer.pt").is_file()


def test_resume_continues_exactly(tmp_path: Path) -> None:
    """N steps straight == N/2 steps, then a fresh process resuming from the N/2 checkpoint."""
    straight = tmp_path / "straight"
    cfg = load_config(SFTConfig, None, [*TINY, "train.max_steps=8", "train.save_every=4", "train.save_total_limit=0",
                                        f"output_dir={straight}"])
    # One thread, as in the resumed CLI run (_cli sets OMP_NUM_THREADS=1): CPU reductions split over a
    # different number of threads round differently (~1e-8), and the final weights are compared bit for bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    full = _losses(straight)

    # Simulate an interruption right after the step-4 checkpoint: keep only what existed then.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000008")
    (resumed / "checkpoints" / "latest").write_text("step-00000004\n")
    res = _cli("sft", *TINY, "train.max_steps=8", "train.save_every=4", f"output_dir={resumed}", "--resume",
               cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    again = _losses(resumed)
    assert sorted(again) == list(range(1, 9)), "metrics.jsonl must read as one run (no duplicated steps)"
    for step in range(5, 9):
        assert abs(again[step] - full[step]) < 1e-6, (step, again[step], full[step])
    a = (straight / "model" / "model.safetensors").read_bytes()
    b = (resumed / "model" / "model.safetensors").read_bytes()
    assert a == b, "final weights differ between the straight and the resumed run"


def test_resume_with_lora_and_packing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*TINY, "lora.enabled=true", "lora.r=4", "data.packing=true", "data.max_length=128", "train.max_steps=4",
            "train.save_every=2", "train.save_total_limit=0", f"output_dir={run}"]
    train(load_config(SFTConfig, None, args))
    full = _losses(run)
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    (run / "checkpoints" / "latest").unlink()  # fall back to the newest complete checkpoint
    train(load_config(SFTConfig, None, args), resume="latest")
    again = _losses(run)
    for step in (3, 4):
        assert abs(again[step] - full[step]) < 1e-6
    assert (run / "model" / "adapter_model.safetensors").is_file()


def test_refuses_to_overwrite_a_run_without_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(load_config(SFTConfig, None, [*TINY, "train.max_steps=1", f"output_dir={run}"]))
    res = _cli("sft", *TINY, "train.max_steps=1", f"output_dir={run}", cwd=tmp_path)
    assert res.returncode == 2
    assert "already holds a run" in res.stderr and "--resume" in res.stderr
    res = _cli("sft", *TINY, "train.max_steps=1", f"output_dir={tmp_path / 'nothing'}", "--resume", cwd=tmp_path)
    assert res.returncode == 2 and "no checkpoint found" in res.stderr


def test_bad_data_lists_rows_exits_nonzero_and_writes_nothing(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "Hi", "completion": "Hello."},
        {"prompt": "Hi"},
        '{"prompt": "x", "completion": ',
        {"prompt": "", "completion": "y"},
        {"prompt": "Hi", "completion": 3},
    ])
    run = tmp_path / "run"
    res = _cli("sft", *TINY, f"data.train={data}", f"output_dir={run}", cwd=tmp_path)
    assert res.returncode == 2
    assert f"{data}:2: field 'completion' is missing" in res.stderr
    assert f"{data}:3: not valid JSON" in res.stderr
    assert f"{data}:4: field 'prompt' is empty" in res.stderr
    assert f"{data}:5: field 'completion' has the wrong type: expected a string or a list of messages, got a number" in res.stderr
    assert "Traceback" not in res.stderr
    assert not run.exists(), "nothing may be written before the data is valid"

    res = _cli("sft", *TINY, f"data.train={data}", "data.on_error=skip", "train.max_steps=1", "data.eval_fraction=0",
               "train.batch_size=1", f"output_dir={run}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "skipped 4 invalid row(s)" in res.stdout


def test_prompt_longer_than_max_length_is_reported(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 200, "completion": "ok"}, {"prompt": "a", "completion": "b"}])
    res = _cli("sft", *TINY, f"data.train={data}", "data.max_length=64", f"output_dir={tmp_path / 'r'}", cwd=tmp_path)
    assert res.returncode == 2
    assert f"{data}:1: prompt is longer than data.max_length after tokenization" in res.stderr


def test_lora_target_modules_must_exist(tmp_path: Path) -> None:
    res = _cli("sft", *TINY, "lora.enabled=true", "lora.target_modules=q_proj,attn_c", f"output_dir={tmp_path / 'r'}",
               cwd=tmp_path)
    assert res.returncode == 2
    assert "config key 'lora.target_modules': attn_c not found in LlamaForCausalLM" in res.stderr
    assert not (tmp_path / "r").exists()


def test_torchrun_two_processes_match_one_process(tmp_path: Path) -> None:
    """DDP on gloo with 2 ranks x batch 2 takes the same steps as 1 process x batch 4."""
    common = [*TINY, "train.max_steps=4", "train.save_every=2"]
    res = _cli("sft", *common, "train.batch_size=2", f"output_dir={tmp_path / 'ddp'}", cwd=tmp_path, torchrun=2)
    assert res.returncode == 0, res.stderr[-3000:]
    res1 = _cli("sft", *common, "train.batch_size=4", f"output_dir={tmp_path / 'single'}", cwd=tmp_path)
    assert res1.returncode == 0, res1.stderr
    ddp, single = _losses(tmp_path / "ddp"), _losses(tmp_path / "single")
    assert sorted(ddp) == [1, 2, 3, 4]
    for step in ddp:
        assert abs(ddp[step] - single[step]) < 1e-4, (step, ddp[step], single[step])
    # Only rank 0 writes: one metrics row per step, one checkpoint folder per save.
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "model" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4

    # Resume the 2-process run from its step-2 checkpoint.
    shutil.rmtree(tmp_path / "ddp" / "checkpoints" / "step-00000004")
    (tmp_path / "ddp" / "checkpoints" / "latest").write_text("step-00000002\n")
    res = _cli("sft", *common, "train.batch_size=2", f"output_dir={tmp_path / 'ddp'}", "--resume", cwd=tmp_path,
               torchrun=2)
    assert res.returncode == 0, res.stderr[-3000:]
    again = _losses(tmp_path / "ddp")
    for step in (3, 4):
        assert abs(again[step] - ddp[step]) < 1e-6


@pytest.mark.bundled
def test_bundled_model_answers_in_english() -> None:
    from rlhfkit.data.formats import Sample
    from rlhfkit.data.tokenize import tokenize_prompt
    from rlhfkit.models.load import ModelConfig, load_causal_lm, load_tokenizer
    from rlhfkit.rollout.generate import generate_text

    spec = "bundled:smollm2-135m-instruct"
    tok = load_tokenizer(spec)
    model = load_causal_lm(ModelConfig(name=spec, device="cpu"), tokenizer=tok)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = [tokenize_prompt(Sample("t", prompt="What is the capital of France?"), tok)]
    (text, n, ended), = generate_text(model, tok, ids, max_new_tokens=24)
    assert "Paris" in text, text
    assert text.isascii() and len(text.split()) >= 3
    assert torch.get_default_dtype() == torch.float32


def test_grad_accumulation_weighs_every_token_equally(tmp_path: Path) -> None:
    """batch 2 x accumulate 2 takes the same steps as batch 4 (token-weighted, not batch-averaged)."""
    common = [*TINY, "train.max_steps=3", "data.group_by_length=false"]
    train(load_config(SFTConfig, None, [*common, "train.batch_size=4", f"output_dir={tmp_path / 'a'}"]))
    train(load_config(SFTConfig, None, [*common, "train.batch_size=2", "train.grad_accum=2", f"output_dir={tmp_path / 'b'}"]))
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    for step in (1, 2, 3):
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])


def test_lora_merge_writes_a_full_model_and_options_run(tmp_path: Path) -> None:
    """LoRA + merge gives a plain HF model; gradient checkpointing and CPU bf16 autocast train too."""
    run = tmp_path / "run"
    args = [*TINY, "lora.enabled=true", "lora.r=4", "lora.merge=true", "train.max_steps=2", "train.lr=1e-2",
            "model.gradient_checkpointing=true", "train.mixed_precision=bf16", f"output_dir={run}"]
    train(load_config(SFTConfig, None, args))
    from transformers import AutoModelForCausalLM

    assert not (run / "model" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(run / "model")
    assert merged.config.use_cache is True
    losses = _losses(run)
    assert all(v == v for v in losses.values()) and len(losses) == 2  # finite, both steps logged
    assert (run / "tensorboard").is_dir() is False or any((run / "tensorboard").iterdir())


def test_fp16_loss_scaler_state_round_trips_through_state_json() -> None:
    """The GradScaler's scale and growth tracker go into state.json and come back on resume."""
    from rlhfkit.runtime.session import restore_scaler, scaler_state

    assert scaler_state(None) == {} and scaler_state(torch.amp.GradScaler("cpu", enabled=False)) == {}
    trained = torch.amp.GradScaler("cpu", init_scale=65536.0, growth_interval=3)
    param = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([param], lr=0.1)
    for grad in (float("inf"), 1.0, 1.0):  # one overflow halves the scale, then two good steps count up
        opt.zero_grad()
        trained.scale((param * grad).sum()).backward()
        trained.step(opt)
        trained.update()
    saved = json.loads(json.dumps(scaler_state(trained)))
    assert saved["grad_scaler"]["scale"] == 32768.0 and saved["grad_scaler"]["_growth_tracker"] == 2
    fresh = torch.amp.GradScaler("cpu", growth_interval=3)
    restore_scaler(fresh, saved)
    assert fresh.state_dict() == trained.state_dict()
    restore_scaler(fresh, {})  # a checkpoint without scaler state (bf16/fp32 run) leaves it alone
    assert fresh.get_scale() == 32768.0
