"""Llama-architecture models -> one GGUF file (f16 or q8_0) that llama.cpp and transformers both read.

Written with the `gguf` package's `GGUFWriter`, following what llama.cpp's `convert_hf_to_gguf.py`
writes and what transformers' GGUF reader (`modeling_gguf_pytorch_utils.load_gguf_checkpoint`, the path
llama takes in transformers 5.x) reads back:

| GGUF                                   | from                                                          |
| -------------------------------------- | ------------------------------------------------------------- |
| `llama.*` keys                         | the config (`block_count`, `embedding_length`, `rope.*`, ...)   |
| `token_embd`, `blk.N.attn_q`, ...      | the state dict, renamed by `gguf.get_tensor_name_map`          |
| `blk.N.attn_q/attn_k` rows             | permuted (llama.cpp's rotary layout); the reader undoes it     |
| no `output.weight`                     | tied embeddings (the reader sets `tie_word_embeddings` so)     |
| `tokenizer.ggml.*`, `tokenizer.chat_template` | the tokenizer: byte-level BPE vocabulary, merges, token types, special ids |

Tensor types: norms (1-D) stay F32 as llama.cpp keeps them; matrices are F16, or Q8_0 (blocks of 32
weights sharing one f16 scale, 8.5 bits per weight) where the row length is a multiple of 32, else F16.

Only what both readers reproduce is written, so anything else is refused before any work
(`check_exportable`): other architectures, biases, rope scaling, tokenizers that are not byte-level BPE
(sentencepiece Llama-2 style, or a pre-tokenizer transformers' reader would not rebuild). After writing,
run.py loads the file back through transformers and compares logits and token ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.data.tokenize import special_prefix
from rlhfkit.errors import ModelError

GGUF_TYPES = {"gguf-f16": "F16", "gguf-q8_0": "Q8_0"}
"""Format name -> GGML tensor type of the weight matrices."""
GGUF_ARCHS = ("llama",)
# transformers' reader rebuilds a byte-level BPE tokenizer with GPT-2's split regex unless
# `tokenizer.ggml.pre` names one of its own table; these are llama.cpp names for splits it knows.
_DEFAULT_PRE = "gpt2"


def gguf_file_name(to: str) -> str:
    """`model-f16.gguf` / `model-q8_0.gguf`: the type in the name, as llama.cpp users expect."""
    return f"model-{to.removeprefix('gguf-')}.gguf"


def _rope_theta(config: PretrainedConfig) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _known_splits() -> dict[str, str]:
    """llama.cpp pre-tokenizer name -> split regex, as transformers' GGUF reader rebuilds them."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # older transformers: only the GPT-2 default is known to round-trip
        return {}
    return dict(GGUF_PRE_TOKENIZER_SPLITS)


def _tokenizer_json(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"GGUF export needs a fast tokenizer (tokenizer.json); {type(tokenizer).__name__} has none")
    return json.loads(backend.to_str())


def _pre_tokenizer_name(spec: dict[str, Any] | None) -> str | None:
    """The `tokenizer.ggml.pre` value that makes transformers rebuild this pre-tokenizer, or None."""
    if spec is None:
        return None
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True) and not spec.get("add_prefix_space"):
        return _DEFAULT_PRE
    parts = spec.get("pretokenizers") if spec.get("type") == "Sequence" else None
    if parts and len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel":
        pattern = parts[0].get("pattern", {}).get("Regex")
        if parts[1].get("use_regex") is False and not parts[1].get("add_prefix_space"):
            for name, regex in _known_splits().items():
                if regex == pattern:
                    return name
    return None


def check_exportable(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, what: str) -> None:
    """Refuse (ModelError naming `what`) a model or tokenizer this writer cannot export faithfully."""
    if config.model_type not in GGUF_ARCHS:
        raise ModelError(
            f"{what}: GGUF export supports the {', '.join(GGUF_ARCHS)} architecture (e.g. SmolLM2, tiny:llama); "
            f"this model is '{config.model_type}'. Use --to int8 or --to merged for it."
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ModelError(f"{what}: GGUF export does not support {flag}=true (transformers' reader would drop the biases)")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ModelError(f"{what}: GGUF export does not support rope scaling ({rope.get('rope_type')}): "
                         "transformers' GGUF reader would load the model without it")
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        raise ModelError(f"{what}: GGUF export needs hidden_act=silu and pretraining_tp=1 (plain llama)")
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or spec.get("normalizer") is not None:
        raise ModelError(
            f"{what}: GGUF export supports byte-level BPE tokenizers (GPT-2 / Llama-3 / SmolLM2 style); this one is "
            f"{model.get('type')} (byte_fallback={model.get('byte_fallback')}, normalizer={spec.get('normalizer')})"
        )
    if _pre_tokenizer_name(spec.get("pre_tokenizer")) is None:
        raise ModelError(
            f"{what}: its pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:200]} is not one transformers' GGUF "
            "reader rebuilds (GPT-2's ByteLevel, or a Split with a regex of its table), so the GGUF would tokenize "
            "differently"
        )
    if len(tokenizer) > config.vocab_size:
        raise ModelError(f"{what}: the tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size}")


def _permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for q/k (`convert_hf_to_gguf.LlamaModel.permute`): within each head, the
    two rotary halves are interleaved. transformers' LlamaTensorProcessor applies the inverse on read."""
    # (n_head * head_dim, in) -> (n_head, 2, head_dim/2, in) -> swap -> (n_head, head_dim/2, 2, in)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tokenizer(writer: Any, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    import gguf

    spec = _tokenizer_json(tokenizer)
    vocab = tokenizer.get_vocab()  # token -> id, added tokens included
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size  # padding rows of a vocabulary rounded up (unused ids)
    for token, index in vocab.items():
        tokens[index] = token
        types[index] = int(gguf.TokenType.NORMAL)
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = int(gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")) or _DEFAULT_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(int(token_id))
    # Measured, not read from add_bos_token: Llama 3 adds BOS in its post-processor (see special_prefix).
    writer.add_add_bos_token(special_prefix(tokenizer) == [tokenizer.bos_token_id])
    writer.add_add_space_prefix(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


def _tensor_type(name: str, w: np.ndarray, matrix_type: str) -> str:
    if w.ndim < 2:
        return "F32"  # norms: tiny, and llama.cpp reads them as F32
    if matrix_type == "Q8_0" and w.shape[-1] % 32 != 0:
        return "F16"  # a Q8_0 block is 32 weights of one row
    return matrix_type


def write_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, to: str, name: str) -> dict:
    """Write `model` (llama, already checked by `check_exportable`) to `path`; returns {gguf type: count}."""
    import gguf

    matrix_type = GGUF_TYPES[to]
    config = model.config
    n_layers, n_head = config.num_hidden_layers, config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if matrix_type == "Q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    _add_tokenizer(writer, tokenizer, config.vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    counts: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # no output.weight: the reader ties the head to token_embd
        base, suffix = hf_name.rsplit(".", 1)
        mapped = names.get_name(base)
        if mapped is None:
            raise ModelError(f"GGUF export: no GGUF name for the tensor {hf_name}")
        w = tensor.detach().to("cpu", torch.float32).numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            w = _permute_rotary(w, n_head)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            w = _permute_rotary(w, n_kv)
        kind = _tensor_type(hf_name, w, matrix_type)
        qtype = gguf.GGMLQuantizationType[kind]
        data = gguf.quants.quantize(np.ascontiguousarray(w), qtype)
        writer.add_tensor(f"{mapped}.{suffix}", data, raw_dtype=qtype if kind == "Q8_0" else None)
        counts[kind] = counts.get(kind, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def load_gguf(folder: Path, file_name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a written GGUF the way a transformers user does (dequantized to float32 for CPU use)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=file_name)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=file_name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    return model.eval(), tokenizer
