"""`tiny:<arch>` models: small, randomly initialized models of real architectures, for tests.

They use the bundled SmolLM2 tokenizer (vocabulary 49,152, chat template included) so that every
data path a real model exercises is exercised here too, in seconds. Initialization is seeded and
independent of the global RNG, so `tiny:llama` is the same model in every process.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.errors import ModelError

# Shapes small enough for a CPU forward+backward in milliseconds, large enough to learn a pattern.
_SHAPES: dict[str, dict] = {
    "llama": {"model_type": "llama", "num_key_value_heads": 2},
    "qwen2": {"model_type": "qwen2", "num_key_value_heads": 2},
    "mistral": {"model_type": "mistral", "num_key_value_heads": 2, "sliding_window": None},
}
TINY_ARCHS = tuple(_SHAPES)


def build_tiny(arch: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """Build `tiny:<arch>`: 2 layers, hidden 64, 4 heads, tied embeddings, dropout off."""
    if arch not in _SHAPES:
        raise ModelError(f"unknown tiny architecture 'tiny:{arch}'; available: " + ", ".join(f"tiny:{a}" for a in _SHAPES))
    shape = dict(_SHAPES[arch])
    model_type = shape.pop("model_type")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.name_or_path = f"tiny:{arch}"
    # Training models run without a KV cache: with one, transformers skips packed-sequence detection
    # (position resets -> block-diagonal mask) and packed examples would attend to each other.
    model.config.use_cache = False
    return model
