"""int8 weight-only quantization with torchao, saved as safetensors that plain transformers loads back.

transformers 5.x serializes torchao models to safetensors itself: `TorchAoHfQuantizer` flattens each
torchao tensor subclass (here `Int8Tensor`: int8 `qdata` + per-row float `scale`) into plain tensors
(`<name>_qdata`, `<name>_scale`) and records their class and attributes as JSON in the safetensors
metadata (`torchao.prototype.safetensors`), and `from_pretrained` rebuilds the subclasses from that
metadata, allowing only a fixed list of torchao classes. No pickle is involved at any step, so we use
that path rather than a layout of our own:

    AutoModelForCausalLM.from_pretrained(folder)   # needs torchao installed; config.json says how

What is quantized: every `nn.Linear` weight in the decoder (symmetric per output channel,
`Int8WeightOnlyConfig()`, PerRow). The embedding and the LM head tied to it stay float32: transformers
leaves output embeddings out by default and torchao's int8 embedding does not round-trip with tied
weights, so for a small-vocabulary-heavy model (SmolLM2: 21% of its parameters) the saving is less than 4x.
Matmuls dequantize int8 -> float on the fly; on a CPU that is usually *slower* than float32, so int8
here is about disk and memory size, not speed (the table shows the measured ratio).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.errors import ModelError, RlhfkitError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def _import_torchao() -> None:
    """Import torchao once with its import-time notices muted: a CPU build of torch logs a warning for
    each CUDA-only kernel library it cannot load (`Failed to load ..._C_cutlass_90a.abi3.so`) and torch's
    pytree one about an Enum; neither affects int8 on CPU, and both would read like errors in the CLI."""
    names = ("torchao", "torch.utils._pytree")
    levels = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        raise RlhfkitError("--to int8 needs the torchao package: pip install torchao") from None
    finally:
        for n, level in zip(names, levels):
            logging.getLogger(n).setLevel(level)


def _torchao_config():  # noqa: ANN202 - transformers.TorchAoConfig, imported lazily
    _import_torchao()
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    # set_inductor_config=False: torchao would otherwise change torch._inductor's global settings.
    return TorchAoConfig(Int8WeightOnlyConfig(set_inductor_config=False))


def count_int8(model: torch.nn.Module) -> int:
    """How many Linear weights are torchao int8 tensors."""
    from torchao.quantization import Int8Tensor

    return sum(isinstance(m.weight, Int8Tensor) for m in model.modules() if isinstance(m, torch.nn.Linear))


def save_int8(merged_folder: Path, out: Path, tokenizer: PreTrainedTokenizerBase) -> int:
    """Quantize the float32 folder `merged_folder` while loading it, save to `out`; returns how many
    weights became int8. Refuses to leave any pickle file behind."""
    try:
        model = AutoModelForCausalLM.from_pretrained(str(merged_folder), dtype=torch.float32, use_safetensors=True,
                                                     quantization_config=_torchao_config())
    except (OSError, ValueError) as exc:
        raise ModelError(f"int8: torchao could not quantize {merged_folder}: {str(exc).splitlines()[0][:300]}") from None
    quantized = count_int8(model)
    if quantized == 0:
        raise ModelError("int8: torchao quantized no weights (no nn.Linear layers found)")
    model.config.use_cache = True
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    pickles = [p.name for p in Path(out).iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles or not any(Path(out).glob("*.safetensors")):
        raise ModelError(f"int8: transformers did not save safetensors only (found {pickles or 'no .safetensors'})")
    return quantized


def load_int8(folder: Path) -> PreTrainedModel:
    """Load an int8 folder with plain transformers (torchao rebuilds the int8 tensors from safetensors)."""
    _import_torchao()
    return AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True).eval()
