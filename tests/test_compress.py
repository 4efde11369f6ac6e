"""rlhfkit compress: every format loads back through plain transformers and matches the input model.

Most tests use a tiny llama with a small byte-level BPE tokenizer trained here (512 tokens, the bundled
chat template): transformers' GGUF reader parses the vocabulary and merges field by field, which takes
about 5 s per read for the bundled 49k vocabulary and well under one for this one. One test exports
`tiny:llama` itself (the bundled SmolLM2 tokenizer) to show the real tokenizer round-trips too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

from rlhfkit.compress import FORMATS, compress_model, format_table
from rlhfkit.compress import run as compress_run
from rlhfkit.errors import ModelError, RlhfkitError
from rlhfkit.models.load import LoraConfig, ModelConfig, apply_lora, load_causal_lm
from rlhfkit.models.save import save_model
from rlhfkit.models.tiny import build_tiny
from rlhfkit.runtime.atomic import umask

FAST = {"max_reference": 4, "speed_prompts": 1, "speed_new_tokens": 2}
"""Small measurement settings: the numbers are not the point here, the files are."""
TEXTS = ["The capital of France is", "digits 12345 and   spaces", "<|im_start|>user\nhi<|im_end|>\n"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread: the machine is shared, and tiny models gain nothing from two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    """A 512-token byte-level BPE (GPT-2 style, like SmolLM2's) trained on the bundled instructions."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from rlhfkit.data.sources import load_rows

    texts = [f"{r.data['prompt']}\n{r.data['completion']}" for r in load_rows("bundled:instructions")]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>",
                                   chat_template=tokenizer.chat_template)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory, small_tokenizer) -> Path:
    """A tiny llama HF folder (safetensors + tokenizer) using the small tokenizer."""
    folder = tmp_path_factory.mktemp("small") / "model"
    model = build_tiny("llama", small_tokenizer)
    model.save_pretrained(str(folder))
    small_tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory, small_model: Path) -> tuple[Path, torch.Tensor]:
    """A LoRA adapter folder as rlhfkit saves one (adapter_config.json + rlhfkit.json), with non-zero B so
    merging changes the weights, and the logits of the unmerged adapter model on TEXTS[0]."""
    base = load_causal_lm(ModelConfig(name=str(small_model)))
    peft_model = apply_lora(base, LoraConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("run") / "model"
    save_model(peft_model, folder)
    ids = AutoTokenizer.from_pretrained(str(small_model))(TEXTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        return folder, peft_model.eval()(ids).logits


def _logits(model: torch.nn.Module, tokenizer, text: str = TEXTS[0]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokenizer(text, return_tensors="pt").input_ids).logits.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def test_merging_an_adapter_gives_the_adapter_models_logits_in_a_plain_folder(tmp_path: Path, adapter) -> None:
    folder, expected = adapter
    calls = []

    def quality(model, tokenizer) -> dict[str, float]:
        calls.append(type(model).__name__)
        return {"reward": 0.5 + len(calls)}

    out = tmp_path / "merged"
    result = compress_model(str(folder), "merged", str(out), quality=quality, **FAST)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "compress.json"} <= names
    assert "adapter_config.json" not in names and not any(n.endswith((".bin", ".pt")) for n in names)
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert torch.allclose(_logits(merged, tokenizer), expected, atol=1e-5)
    # the hook ran on the model before and after; its numbers are in the table and the stored JSON
    assert calls == ["LlamaForCausalLM", "LlamaForCausalLM"]
    assert result["before"]["quality"] == {"reward": 1.5} and result["after"]["quality"] == {"reward": 2.5}
    assert result["merged_adapter"] and result["merge_check"]["max_abs_diff"] < 1e-4
    assert result["check"]["ok"] and result["check"]["max_abs_diff"] < 1e-4
    assert json.loads((out / "compress.json").read_text())["after"]["quality"] == {"reward": 2.5}
    table = format_table(result)
    assert "quality: reward" in table and "perplexity (bundled:instructions, 4 rows)" in table


def test_int8_is_safetensors_only_smaller_and_loads_back_in_transformers(tmp_path: Path, small_model: Path) -> None:
    from torchao.quantization import Int8Tensor

    out = tmp_path / "int8"
    result = compress_model(str(small_model), "int8", str(out), **FAST)
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "torchao"
    # transformers writes model.safetensors as 0600; the output gets the usual mode like its other files
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask()
    model = AutoModelForCausalLM.from_pretrained(str(out))  # plain transformers, no rlhfkit code
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight, Int8Tensor)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    source = AutoModelForCausalLM.from_pretrained(str(small_model))
    assert _rel(_logits(source, tokenizer), _logits(model, tokenizer)) < 0.05
    assert result["after"]["size_bytes"] < 0.6 * result["before"]["size_bytes"]
    assert result["int8_linear_weights"] == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert result["after"]["perplexity"] == pytest.approx(result["before"]["perplexity"], rel=0.05)


@pytest.mark.parametrize("to", ["gguf-f16", "gguf-q8_0"])
def test_gguf_loads_back_through_transformers_reader_with_its_tokenizer(tmp_path: Path, small_model: Path,
                                                                        to: str) -> None:
    out = tmp_path / to
    result = compress_model(str(small_model), to, str(out), **FAST)
    name = result["gguf_file"]
    assert sorted(p.name for p in out.iterdir()) == ["compress.json", name]
    model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(out), gguf_file=name)
    source = AutoModelForCausalLM.from_pretrained(str(small_model))
    source_tokenizer = AutoTokenizer.from_pretrained(str(small_model))
    for text in TEXTS:
        assert tokenizer(text).input_ids == source_tokenizer(text).input_ids, text
    assert tokenizer.chat_template == source_tokenizer.chat_template
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")
    rel = _rel(_logits(source, source_tokenizer), _logits(model, tokenizer))
    # measured about 4e-4 and 1e-2; without llama.cpp's q/k row permutation f16 gives 8e-3 even on this
    # random model (attention is nearly uniform), so the f16 bound also pins the permutation
    assert rel < (2e-3 if to == "gguf-f16" else 3e-2)
    assert result["check"]["ok"] and result["check"]["tokenizer_ids_equal"]
    assert result["gguf_tensor_types"]["F32"] == 5  # 2 x 2 layer norms + final norm stay float32
    assert result["after"]["size_bytes"] < result["before"]["size_bytes"] * (0.55 if to == "gguf-f16" else 0.3)


def test_gguf_pads_a_vocabulary_rounded_up_past_the_tokenizer(tmp_path: Path, small_tokenizer) -> None:
    folder = tmp_path / "padded"
    model = build_tiny("llama", small_tokenizer, config_overrides={"vocab_size": 544})  # 512 tokens + 32 unused rows
    model.save_pretrained(str(folder))
    small_tokenizer.save_pretrained(str(folder))
    result = compress_model(str(folder), "gguf-f16", str(tmp_path / "f16"), **FAST)
    assert result["check"]["ok"] and result["check"]["tokenizer_ids_equal"]
    gguf_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "f16"), gguf_file=result["gguf_file"])
    assert gguf_model.config.vocab_size == 544


def test_gguf_export_of_tiny_llama_keeps_the_bundled_smollm2_tokenizer(tmp_path: Path) -> None:
    out = tmp_path / "q8"
    result = compress_model("tiny:llama", "gguf-q8_0", str(out), max_reference=2, speed_prompts=0)
    check = result["check"]
    assert check["ok"] and check["tokenizer_ids_equal"] and check["chat_template_equal"] and check["rel_err"] < 3e-2
    assert "tokens_per_s" not in result["before"]  # speed_prompts=0 skips the speed test


def test_bad_inputs_fail_before_any_work_and_name_what_was_expected(tmp_path: Path, small_model: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RlhfkitError, match=r"unknown compression format 'int4'; expected one of: merged, int8, "
                                           r"gguf-f16, gguf-q8_0"):
        compress_model(str(small_model), "int4", str(out))
    with pytest.raises(ModelError, match=r"model '.*missing' not found"):
        compress_model(str(tmp_path / "missing"), "int8", str(out))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("not a model")
    with pytest.raises(ModelError, match=r"notes is a folder but has no config\.json"):
        compress_model(str(tmp_path / "notes"), "int8", str(out))
    with pytest.raises(RlhfkitError, match=r"max_reference \(--max-reference\) must be an integer >= 1, got 0"):
        compress_model(str(small_model), "int8", str(out), max_reference=0)
    with pytest.raises(ModelError, match=r"GGUF export supports the llama architecture.*this model is 'qwen2'"):
        compress_model("tiny:qwen2", "gguf-q8_0", str(out))
    reward = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(str(small_model), num_labels=1))
    reward.save_pretrained(str(tmp_path / "reward"))
    with pytest.raises(ModelError, match=r"works on causal language models .* LlamaForSequenceClassification"):
        compress_model(str(tmp_path / "reward"), "int8", str(out))
    with pytest.raises(RlhfkitError, match=r"would replace the model being compressed"):
        compress_model(str(small_model), "merged", str(small_model), overwrite=True)
    assert not out.exists() and FORMATS == ("merged", "int8", "gguf-f16", "gguf-q8_0")


def test_an_adapter_is_not_compressed_unmerged(tmp_path: Path, adapter) -> None:
    with pytest.raises(RlhfkitError, match=r"is a LoRA adapter folder; int8 needs full weights"):
        compress_model(str(adapter[0]), "int8", str(tmp_path / "o"), merge_lora=False)


def test_an_existing_output_is_kept_unless_overwrite_and_a_failed_check_writes_nothing(
        tmp_path: Path, small_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RlhfkitError, match=r"output folder .*out already exists and is not empty.*overwrite=True"):
        compress_model(str(small_model), "merged", str(out), **FAST)
    assert (out / "keep.txt").read_text() == "mine"

    monkeypatch.setitem(compress_run.REL_ERR_LIMITS, "int8", 0.0)  # no int8 model can pass this
    with pytest.raises(ModelError, match=r"int8 output failed its check \(nothing was written"):
        compress_model(str(small_model), "int8", str(out), overwrite=True, **FAST)
    assert (out / "keep.txt").read_text() == "mine"  # the old folder is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary siblings left behind

    compress_model(str(small_model), "merged", str(out), overwrite=True, **FAST)
    assert not (out / "keep.txt").exists() and (out / "compress.json").is_file()
