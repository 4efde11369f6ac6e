"""`tiny:<arch>` models: small, randomly initialized models of real architectures, for tests.

They use the bundled SmolLM2 tokenizer (vocabulary 49,152, chat template included) so that every
data path a real model exercises is exercised here too, in seconds. Initialization is seeded and
independent of the global RNG, so `tiny:llama` is the same model in every process.

A tiny model exists only in code, but adapters trained on it must name a base that peft and
transformers can load on their own. `prepare_tiny` saves the built model once into the rlhfkit cache
(next to the converted bundled model), keyed by a hash of its config and weights, and the loader points
the model's `name_or_path` there.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.errors import ModelError
from rlhfkit.models.bundled import build_atomically, cache_dir

# Shapes small enough for a CPU forward+backward in milliseconds, large enough to learn a pattern.
_SHAPES: dict[str, dict] = {
    "llama": {"model_type": "llama", "num_key_value_heads": 2},
    "qwen2": {"model_type": "qwen2", "num_key_value_heads": 2},
    "mistral": {"model_type": "mistral", "num_key_value_heads": 2, "sliding_window": None},
}
TINY_ARCHS = tuple(_SHAPES)


def build_tiny(
    arch: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0, config_overrides: dict[str, Any] | None = None
) -> PreTrainedModel:
    """Build `tiny:<arch>`: 2 layers, hidden 64, 4 heads, tied embeddings, dropout off.

    `config_overrides` replaces config values (e.g. `{"attention_dropout": 0.3}` in tests); the
    `tiny:` specs never pass any.
    """
    if arch not in _SHAPES:
        raise ModelError(f"unknown tiny architecture 'tiny:{arch}'; available: " + ", ".join(f"tiny:{a}" for a in _SHAPES))
    shape = dict(_SHAPES[arch])
    model_type = shape.pop("model_type")
    values = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **shape,
        **(config_overrides or {}),
    }
    config = AutoConfig.for_model(model_type, **values)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Training models run without a KV cache: with one, transformers skips packed-sequence detection
    # (position resets -> block-diagonal mask) and packed examples would attend to each other.
    model.config.use_cache = False
    return model


def tiny_key(arch: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str:
    """Cache folder name for a built tiny model: arch plus a hash of everything that makes it what it
    is (config, weights, chat template). Hashing the weights themselves, not the inputs that produced
    them, gives a new folder whenever a torch/transformers upgrade changes the initialization."""
    h = hashlib.sha256(f"rlhfkit-tiny-v1|{arch}".encode())
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("use_cache", "_name_or_path")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update((tokenizer.chat_template or "").encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return f"tiny-{arch}-{h.hexdigest()[:12]}"


def prepare_tiny(arch: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Path:
    """The cached HF folder (safetensors, config, tokenizer) of a freshly built `tiny:<arch>` model,
    written on first use under `$RLHFKIT_CACHE/models/`. Call it before training changes the weights."""
    folder = cache_dir() / "models" / tiny_key(arch, model, tokenizer)
    folder.parent.mkdir(parents=True, exist_ok=True)

    def save(tmp: Path) -> None:
        use_cache = model.config.use_cache
        model.config.use_cache = True  # a base model for inference elsewhere: keep generation fast
        try:
            model.save_pretrained(str(tmp), safe_serialization=True)
        finally:
            model.config.use_cache = use_cache
        tokenizer.save_pretrained(str(tmp))

    return build_atomically(folder, save)
