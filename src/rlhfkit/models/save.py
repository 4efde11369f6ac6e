"""Writing model folders that load with the ecosystem's own loaders, and again with rlhfkit.

- a full model: `save_pretrained` (safetensors) + tokenizer: `AutoModelForCausalLM.from_pretrained`;
- a LoRA adapter: PEFT's `adapter_config.json` names a loadable base in `base_model_name_or_path`
  (load_causal_lm sets the model's `name_or_path` to one), so `AutoPeftModelForCausalLM.from_pretrained`
  works; `rlhfkit.json` beside it keeps the rlhfkit spec of the base (`tiny:llama`, `bundled:...`),
  which rlhfkit prefers when it loads the adapter. It is a file of our own because PEFT warns about
  unknown keys in adapter_config.json ("saved using a higher version of the library").
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from rlhfkit import __version__
from rlhfkit.models.load import SPEC_ATTR, SPEC_FILE
from rlhfkit.models.wrap import base_model, is_peft, unwrap
from rlhfkit.runtime.atomic import atomic_folder


def base_spec(model: torch.nn.Module) -> str | None:
    """The rlhfkit spec of the model a (PEFT-wrapped) model was loaded from, if load_causal_lm recorded one."""
    spec = getattr(base_model(model), SPEC_ATTR, None)
    return spec if isinstance(spec, str) and spec else None


def save_model(model: torch.nn.Module, folder: Path) -> None:
    """`save_pretrained` in safetensors; for a PEFT adapter also `rlhfkit.json` with the base's spec."""
    model = unwrap(model)
    model.save_pretrained(str(folder), safe_serialization=True)
    spec = base_spec(model) if is_peft(model) else None
    if spec is not None:
        meta = {"base_model": spec, "rlhfkit_version": __version__}
        (Path(folder) / SPEC_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def save_final_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out: Path, merge: bool) -> None:
    """HF-loadable output: full weights, the PEFT adapter, or the adapter merged into the base."""
    model = unwrap(model)
    if merge and hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = True  # the saved model is for inference: keep generation fast
    try:
        with atomic_folder(out) as tmp:
            save_model(model, tmp)
            tokenizer.save_pretrained(str(tmp))
    finally:
        if config is not None:
            config.use_cache = False
