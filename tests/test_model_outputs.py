"""What `rlhfkit sft/dpo/reward` write loads with the ecosystem's own loaders, in a process that never
imports rlhfkit: transformers for full, merged and reward models, peft for LoRA adapters (final and
checkpoint), AutoTokenizer for every final folder. The same folders still load with rlhfkit, which
gives the same outputs."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.max_steps=2", "train.batch_size=4", "progress=false", "tensorboard=false"]
GOOD = "great lovely excellent wonderful happy superb".split()
BAD = "awful terrible horrible sad poor bad".split()

# Run in a fresh interpreter: only transformers, peft and safetensors, no rlhfkit (and another cache root).
LOADER = textwrap.dedent("""
    import json, sys
    import torch
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    jobs, out = json.loads(sys.argv[1]), sys.argv[2]
    loaders = {"causal": AutoModelForCausalLM, "adapter": AutoPeftModelForCausalLM,
               "reward": AutoModelForSequenceClassification}
    report = {}
    for name, (kind, folder, has_tokenizer) in jobs.items():
        if has_tokenizer:
            tok = AutoTokenizer.from_pretrained(folder)
            ids = tok("Describe the cafe in one sentence.", return_tensors="pt").input_ids
        else:
            ids = torch.tensor([[1, 2, 3, 4, 5]])
        model = loaders[kind].from_pretrained(folder).eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        save_file({"ids": ids, "logits": logits.float().contiguous()}, f"{out}/{name}.safetensors")
        report[name] = {"class": type(model).__name__, "peft": hasattr(model, "peft_config"),
                        "tokenizer": type(tok).__name__ if has_tokenizer else None}
    print(json.dumps(report))
""")


def _pairs(path: Path, n: int = 24) -> Path:
    rnd = random.Random(0)
    rows = [{"prompt": f"Describe the cafe number {i}.", "chosen": f"It is {rnd.choice(GOOD)}.",
             "rejected": f"It is {rnd.choice(BAD)}."} for i in range(n)]
    return write_jsonl(path, rows)


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "RLHFKIT_CACHE": str(cache)}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Five tiny CLI trainings, run side by side (each on one thread)."""
    from rlhfkit.models.bundled import prepare_bundled_tokenizer

    root = tmp_path_factory.mktemp("outputs")
    pairs = _pairs(root / "pairs.jsonl")
    # A fresh cache (the tiny base is written there), seeded with the bundled tokenizer: converting it
    # again would cost each run seconds.
    shutil.copytree(prepare_bundled_tokenizer(), root / "cache" / "tokenizers" / "smollm2-135m-instruct")
    sft = ["sft", "--config", str(ROOT / "configs/sft_tiny.yaml"), "data.max_samples=16", "sample_max_new_tokens=2"]
    runs = {
        "sft_lora": [*sft, "lora.enabled=true"],
        "sft_merged": [*sft, "lora.enabled=true", "lora.merge=true"],
        "sft_full": sft,
        "dpo_lora": ["dpo", "--config", str(ROOT / "configs/dpo_tiny.yaml"), f"data.train={pairs}",
                     "lora.enabled=true"],
        "reward": ["reward", "--config", str(ROOT / "configs/reward_tiny.yaml"), f"data.train={pairs}"],
    }
    procs = {
        name: subprocess.Popen([sys.executable, "-m", "rlhfkit", *args, *FAST, f"output_dir={root / name}"],
                               cwd=root, env=_env(root / "cache"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        for name, args in runs.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
    return {name: root / name for name in runs}


def test_outputs_load_with_transformers_and_peft_alone(outputs: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = outputs["sft_lora"] / "model"
    meta = json.loads((adapter / "adapter_config.json").read_text())
    base = Path(meta["base_model_name_or_path"])
    # The base is the cached copy of tiny:llama, not the spec; the spec is kept in rlhfkit.json.
    assert base.is_absolute() and (base / "config.json").is_file() and (base / "model.safetensors").is_file()
    assert base.parent == (outputs["sft_lora"].parent / "cache" / "models").resolve() and base.name.startswith("tiny-llama-")
    assert json.loads((adapter / "rlhfkit.json").read_text())["base_model"] == "tiny:llama"
    dpo_meta = json.loads((outputs["dpo_lora"] / "model" / "adapter_config.json").read_text())
    assert dpo_meta["base_model_name_or_path"] == str(base)
    assert not (outputs["sft_merged"] / "model" / "adapter_config.json").exists()

    jobs = {
        "sft_lora": ("adapter", str(adapter), True),
        "sft_lora_checkpoint": ("adapter", str(outputs["sft_lora"] / "checkpoints" / "step-00000002" / "model"), False),
        "dpo_lora": ("adapter", str(outputs["dpo_lora"] / "model"), True),
        "sft_merged": ("causal", str(outputs["sft_merged"] / "model"), True),
        "sft_full": ("causal", str(outputs["sft_full"] / "model"), True),
        "reward": ("reward", str(outputs["reward"] / "model"), True),
    }
    res = subprocess.run([sys.executable, "-c", LOADER, json.dumps(jobs), str(tmp_path)], cwd=tmp_path,
                         env=_env(tmp_path / "other-cache"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    for name in ("sft_lora", "sft_lora_checkpoint", "dpo_lora"):
        assert report[name]["class"] == "PeftModelForCausalLM", report
    assert report["sft_merged"]["class"] == report["sft_full"]["class"] == "LlamaForCausalLM"
    assert not report["sft_merged"]["peft"]
    assert report["reward"]["class"] == "LlamaForSequenceClassification"
    assert all(report[n]["tokenizer"] for n in ("sft_lora", "dpo_lora", "sft_merged", "sft_full", "reward"))
    assert not (tmp_path / "other-cache").exists()  # nothing of rlhfkit ran there

    # rlhfkit's own loaders read the same folders (adapters through the tiny:llama spec) and agree.
    from rlhfkit.models.heads import load_reward_model
    from rlhfkit.models.load import ModelConfig, load_causal_lm

    monkeypatch.setenv("RLHFKIT_CACHE", str(outputs["sft_lora"].parent / "cache"))
    for name, (kind, folder, _) in jobs.items():
        saved = load_file(str(tmp_path / f"{name}.safetensors"))
        if kind == "reward":
            model, _ = load_reward_model(folder, device="cpu")
        else:
            model = load_causal_lm(ModelConfig(name=folder, device="cpu")).eval()
        with torch.no_grad():
            logits = model(input_ids=saved["ids"]).logits
        assert torch.allclose(logits, saved["logits"], atol=1e-4), name
