"""DPO end to end on tiny models: margins grow, references (cached, live, LoRA base), resume, errors."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from rlhfkit.config import load_config
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.recipes.dpo import DPOConfig, train
from tests.conftest import write_jsonl
from tests.test_sft import _cli, _losses

GOOD = "great lovely excellent wonderful happy superb".split()
BAD = "awful terrible horrible sad poor bad".split()


def make_pairs(path: Path, n: int = 48, seed: int = 0) -> Path:
    rnd = random.Random(seed)
    things = "cafe park movie phone hotel book shoe bus".split()
    rows = [{"prompt": f"Describe the {rnd.choice(things)} number {i}.", "chosen": f"It is {rnd.choice(GOOD)}.",
             "rejected": f"It is {rnd.choice(BAD)}."} for i in range(n)]
    return write_jsonl(path, rows)


def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["model.name=tiny:llama", f"data.train={data}", "data.eval_fraction=0.25", "train.lr=1e-3",
            "dpo.beta=0.5", "train.batch_size=4", "progress=false", "tensorboard=false", f"output_dir={out}", *extra]


def test_dpo_margins_grow_and_eval_accuracy_rises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "cache"))
    data = make_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    train(load_config(DPOConfig, None, tiny_args(data, out, "train.max_steps=16")))
    margins = _losses(out, "train/rewards/margins")
    assert margins[1] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the first step
    assert margins[16] > 1.0 and margins[16] > margins[4]
    evals = _losses(out, "eval/rewards/accuracies")
    assert evals[16] >= 0.9
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-2])
    for key in ("train/rewards/chosen", "train/rewards/rejected", "train/logps/chosen", "train/logps/rejected",
                "train/loss", "train/grad_norm", "train/tokens_per_s", "train/pairs_per_s"):
        assert key in row, key
    assert len(list((tmp_path / "cache" / "ref_logps").glob("*.safetensors"))) == 2  # train + eval sets


def test_reference_cache_hit_and_invalidation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rlhfkit.data.formats import Sample
    from rlhfkit.data.tokenize import tokenize_preference
    from rlhfkit.models.load import ModelConfig, load_causal_lm, load_tokenizer
    from rlhfkit.recipes.dpo import cached_reference
    from rlhfkit.runtime.distributed import DistInfo

    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path))
    tok = load_tokenizer("tiny:llama")
    model = load_causal_lm(ModelConfig(name="tiny:llama"), tokenizer=tok)
    pairs = [tokenize_preference(Sample(f"r{i}", prompt=f"Q{i}?", chosen="Yes.", rejected="No."), tok, max_length=64)
             for i in range(3)]
    kw = {"batch_size": 2, "pad_id": tok.pad_token_id, "device": model.device, "amp": None, "chunk": 16, "info": DistInfo()}
    c1, r1, hit = cached_reference(model, model, pairs, **kw)
    assert not hit
    c2, r2, hit = cached_reference(model, model, pairs, **kw)
    assert hit and c1.equal(c2) and r1.equal(r2)
    # Different data -> miss.
    other = pairs[:2] + [tokenize_preference(Sample("x", prompt="Q9?", chosen="Yes.", rejected="No."), tok, max_length=64)]
    assert not cached_reference(model, model, other, **kw)[2]
    # Different model weights -> miss, and different numbers.
    import torch

    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    c3, _, hit = cached_reference(model, model, pairs, **kw)
    assert not hit and not c3.equal(c1)


def test_reference_cache_keeps_the_most_recently_used_files(tmp_path: Path) -> None:
    import os

    from rlhfkit.recipes.dpo import prune_cache

    for i in range(5):
        (tmp_path / f"k{i}.safetensors").write_bytes(b"x")
        os.utime(tmp_path / f"k{i}.safetensors", (1000 + i, 1000 + i))
    (tmp_path / "k0.safetensors").touch()  # a cache hit makes the oldest the newest
    (tmp_path / "notes.txt").write_text("not a cache file")
    prune_cache(tmp_path, keep=2)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["k0.safetensors", "k4.safetensors", "notes.txt"]


def test_live_reference_matches_precomputed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Full fine-tune: a frozen copy (live) and the cached pass (precomputed) give the same run."""
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "cache"))
    data = make_pairs(tmp_path / "pairs.jsonl", n=16)
    common = ("train.max_steps=3", "data.eval_fraction=0")
    train(load_config(DPOConfig, None, tiny_args(data, tmp_path / "pre", *common)))
    train(load_config(DPOConfig, None, tiny_args(data, tmp_path / "live", *common, "dpo.precompute_ref=false")))
    a, b = _losses(tmp_path / "pre"), _losses(tmp_path / "live")
    for step in (1, 2, 3):
        assert a[step] == pytest.approx(b[step], abs=1e-5)


def test_lora_reference_is_the_base_without_adapters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "cache"))
    data = make_pairs(tmp_path / "pairs.jsonl", n=16)
    for mode in ("true", "false"):
        out = tmp_path / f"lora-{mode}"
        train(load_config(DPOConfig, None, tiny_args(data, out, "train.max_steps=3", "lora.enabled=true", "lora.r=4",
                                                     "train.lr=1e-2", "data.eval_fraction=0", f"dpo.precompute_ref={mode}")))
        m = _losses(out, "train/rewards/margins")
        assert m[1] == pytest.approx(0.0, abs=1e-6)  # LoRA B starts at zero: policy == base == reference
        assert m[3] > m[1]
        assert (out / "model" / "adapter_model.safetensors").is_file()
    assert _losses(tmp_path / "lora-true") == pytest.approx(_losses(tmp_path / "lora-false"), abs=1e-5)


def test_dpo_resume_continues_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "cache"))
    data = make_pairs(tmp_path / "pairs.jsonl", n=24)
    out = tmp_path / "run"
    args = tiny_args(data, out, "train.max_steps=6", "train.save_every=3", "train.save_total_limit=0")
    train(load_config(DPOConfig, None, args))
    full = _losses(out)
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    (out / "checkpoints" / "latest").write_text("step-00000003\n")
    res = _cli("dpo", *args, "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    again = _losses(out)
    assert sorted(again) == list(range(1, 7))
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(full[step], abs=1e-6)


def test_dpo_bad_preference_rows(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": "Hi", "chosen": "Same.", "rejected": "Same."},
        {"prompt": "Hi", "rejected": "No."},
        {"prompt": "Hi", "chosen": [{"role": "assistant", "content": "x"}], "rejected": "y"},
        {"prompt": "Hi", "chosen": "a", "rejected": "b", "margin": "wide"},
    ])
    out = tmp_path / "run"
    res = _cli("dpo", *tiny_args(data, out), cwd=tmp_path)
    assert res.returncode == 2
    err = res.stderr
    assert f"{data}:2: field 'chosen' is identical to 'rejected'" in err
    assert f"{data}:3: field 'chosen' is missing" in err
    assert f"{data}:4: fields 'chosen' and 'rejected' must both be strings or both be message lists" in err
    assert f"{data}:5: field 'margin' has the wrong type: expected a number, got 'wide'" in err
    assert "Traceback" not in err and not out.exists()


def test_dpo_config_errors() -> None:
    with pytest.raises(ConfigError, match="config key 'dpo.label_smoothing': only applies to loss_type=sigmoid"):
        load_config(DPOConfig, None, ["data.train=x.jsonl", "dpo.loss_type=ipo", "dpo.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="config key 'dpo.beta'"):
        load_config(DPOConfig, None, ["data.train=x.jsonl", "dpo.beta=0"])
    load_config(DPOConfig, None, [])  # --print-config works without data
    with pytest.raises(ConfigError, match="config key 'data.train'"):
        train(load_config(DPOConfig, None, ["model.name=tiny:llama"]))
    with pytest.raises(DataError, match="file not found"):
        train(load_config(DPOConfig, None, ["model.name=tiny:llama", "data.train=/nonexistent/pairs.jsonl"]))


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_other_losses_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loss_type: str) -> None:
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "cache"))
    data = make_pairs(tmp_path / "pairs.jsonl", n=16)
    out = tmp_path / loss_type
    train(load_config(DPOConfig, None, tiny_args(data, out, "train.max_steps=6", f"dpo.loss_type={loss_type}",
                                                 "data.eval_fraction=0")))
    m = _losses(out, "train/rewards/margins")
    assert m[6] > m[1]


def test_dpo_torchrun_two_processes(tmp_path: Path) -> None:
    data = make_pairs(tmp_path / "pairs.jsonl", n=16)
    # float32: 2 processes x 2 pairs equal 1 x 4 to 1e-4 only without bf16 autocast, which `auto` picks on
    # CPUs with native bf16 (there the two reductions differ by bf16 rounding, ~1e-4)
    common = ["train.max_steps=3", "data.eval_fraction=0", "train.mixed_precision=no"]
    res = _cli("dpo", *tiny_args(data, tmp_path / "ddp", *common, "train.batch_size=2"), cwd=tmp_path, torchrun=2)
    assert res.returncode == 0, res.stderr[-3000:]
    res = _cli("dpo", *tiny_args(data, tmp_path / "one", *common, "train.batch_size=4"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _losses(tmp_path / "ddp"), _losses(tmp_path / "one")
    for step in (1, 2, 3):
        assert a[step] == pytest.approx(b[step], abs=1e-4)


# --------------------------------------------------------------------------------------------------
# Shared-prompt batches: the prompt computed once must give the padded layout's log-probs and gradients


def _tokenized_pairs(tokenizer, **kw):  # noqa: ANN001, ANN003, ANN202
    from rlhfkit.data.formats import Sample
    from rlhfkit.data.tokenize import tokenize_preference

    rows = [("Describe the cafe.", "It is lovely and warm.", "Bad."),
            ("Tell me, in a few words, what you think of the long train ride home?", "Fine.", "It was a terrible ride."),
            ("Hi", "Hello there, friend!", "Hello there, enemy!")]  # both responses begin with the same tokens
    return [tokenize_preference(Sample(f"r{i}", prompt=p, chosen=c, rejected=r), tokenizer, **{"max_length": 64, **kw})
            for i, (p, c, r) in enumerate(rows)]


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("mistral", "eager")])
def test_shared_prompt_logps_and_grads_match_padded(tokenizer, arch: str, attn: str) -> None:
    import torch

    from rlhfkit.models.tiny import build_tiny
    from rlhfkit.recipes.dpo import _pair_batch, pair_logps, shared_prompt_problem

    model = build_tiny(arch, tokenizer)
    model.config._attn_implementation = attn
    assert shared_prompt_problem(model, 128) is None
    for kw in ({}, {"max_length": 50}, {"chat_template": "never"}):  # 50: responses cut short
        pairs = _tokenized_pairs(tokenizer, **kw)
        results = []
        for share in (False, True):
            model.zero_grad(set_to_none=True)
            logps, counts = pair_logps(model, _pair_batch(pairs, tokenizer.pad_token_id, model.device, share), None, 8)
            (logps * torch.arange(1.0, 7.0)).sum().backward()  # a different weight per sequence
            results.append((logps.detach(), counts, [p.grad.clone() for p in model.parameters()]))
        (a, ca, ga), (b, cb, gb) = results
        assert ca.tolist() == cb.tolist()
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-5), (a, b)
        for x, y in zip(ga, gb):
            assert torch.allclose(x, y, atol=1e-5, rtol=1e-3)


def test_shared_prompt_under_lora_and_fallbacks(tokenizer) -> None:
    import torch

    from rlhfkit.models.load import LoraConfig, apply_lora
    from rlhfkit.models.tiny import build_tiny
    from rlhfkit.recipes.dpo import _pair_batch, pair_logps, shared_prompt_problem

    model = apply_lora(build_tiny("llama", tokenizer), LoraConfig(enabled=True, r=4))
    pairs = _tokenized_pairs(tokenizer)
    a, _ = pair_logps(model, _pair_batch(pairs, tokenizer.pad_token_id, torch.device("cpu"), False), None, 16)
    b, _ = pair_logps(model, _pair_batch(pairs, tokenizer.pad_token_id, torch.device("cpu"), True), None, 16)
    assert torch.allclose(a, b, atol=1e-4)
    model = build_tiny("mistral", tokenizer)
    model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in shared_prompt_problem(model, 128)
    model.config._attn_implementation = "sdpa"
    model.config.sliding_window = 64
    assert "sliding-window" in shared_prompt_problem(model, 128)
    assert shared_prompt_problem(model, 64) is None


def test_share_prompt_on_and_off_train_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "cache"))
    data = make_pairs(tmp_path / "pairs.jsonl", n=16)
    for mode in ("true", "false"):
        train(load_config(DPOConfig, None, tiny_args(data, tmp_path / mode, "train.max_steps=4", f"dpo.share_prompt={mode}",
                                                     "train.mixed_precision=no")))
    for key in ("train/loss", "train/rewards/margins", "eval/rewards/accuracies", "train/grad_norm"):
        on, off = _losses(tmp_path / "true", key), _losses(tmp_path / "false", key)
        assert on.keys() == off.keys()
        assert list(on.values()) == pytest.approx(list(off.values()), abs=1e-5), key
