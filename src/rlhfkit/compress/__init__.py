"""`rlhfkit compress`: make a trained model smaller for serving, and show what it cost.

| format      | output folder                                           | loads back with                     |
| ----------- | ------------------------------------------------------- | ----------------------------------- |
| `merged`    | LoRA merged into the base: float32 safetensors + tokenizer | `AutoModelForCausalLM.from_pretrained(folder)` |
| `int8`      | torchao int8 weight-only, safetensors + tokenizer         | the same (torchao installed)        |
| `gguf-f16`  | `model-f16.gguf` (tokenizer inside)                        | `from_pretrained(folder, gguf_file=...)`, llama.cpp |
| `gguf-q8_0` | `model-q8_0.gguf` (tokenizer inside)                       | the same                            |

Every output is loaded back and checked against the input (logits, token ids) before it is renamed
into place, and `compress.json` beside it stores the before/after table. See docs/compress.md.
"""

from __future__ import annotations

from rlhfkit.compress.measure import QualityFn, format_table
from rlhfkit.compress.run import FORMATS, RESULT_FILE, compress_model

__all__ = ["FORMATS", "RESULT_FILE", "QualityFn", "compress_model", "format_table"]
