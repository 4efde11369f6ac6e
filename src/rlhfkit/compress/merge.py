"""Load the model to compress, merging a LoRA adapter into its base, and save it as a plain HF folder.

rlhfkit run folders hold either full weights or a PEFT adapter (`adapter_config.json`, plus
`rlhfkit.json` naming the base as an rlhfkit spec such as `tiny:llama` or `bundled:...`, see
models/save.py). Every compressed format starts from full weights, so an adapter is merged first
with PEFT's `merge_and_unload` (W + B·A·scale in place). The logits of the *unmerged* adapter model are
kept as the reference every later check compares against: that is the model the user trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.compress.measure import LogitBatch, logits_on
from rlhfkit.errors import ModelError
from rlhfkit.models.load import (
    ModelConfig,
    ResolvedSpec,
    _adapter_base,
    load_causal_lm,
    load_tokenizer,
    resolve_spec,
)


@dataclass
class Source:
    """The model to compress, resolved and checked before any weights are loaded."""

    spec: str
    resolved: ResolvedSpec
    config: PretrainedConfig
    """Config of the full model (the base's, for an adapter)."""
    tokenizer: PreTrainedTokenizerBase

    @property
    def is_adapter(self) -> bool:
        return self.resolved.kind == "adapter"


def _config_of(spec: str) -> PretrainedConfig:
    """The model config of a spec without loading weights (an adapter: its base's)."""
    from transformers import AutoConfig

    resolved = resolve_spec(spec)
    if resolved.kind == "adapter":
        return _config_of(_adapter_base(Path(resolved.target)))
    if resolved.kind == "tiny":
        return load_causal_lm(ModelConfig(name=spec)).config  # built in code; milliseconds
    try:
        return AutoConfig.from_pretrained(resolved.target)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not read the model config of {spec}: {str(exc).splitlines()[0][:300]}") from None


def _check_causal_lm(spec: str, resolved: ResolvedSpec, config: PretrainedConfig) -> None:
    """Refuse reward models and other heads: every format here serves a text generator."""
    import json

    task = None
    if resolved.kind == "adapter":
        task = json.loads((Path(resolved.target) / "adapter_config.json").read_text()).get("task_type")
    heads = [a for a in (getattr(config, "architectures", None) or []) if not a.endswith("ForCausalLM")]
    if (task not in (None, "CAUSAL_LM")) or (heads and len(heads) == len(config.architectures)):
        raise ModelError(f"{spec}: rlhfkit compress works on causal language models (SFT/DPO/PPO policies); this is "
                         f"{task or ', '.join(heads)} (a reward model?), which the formats here cannot serve")


def resolve_source(spec: str) -> Source:
    """Check `spec` names a causal LM (ModelError naming the path otherwise) and read its config and tokenizer."""
    resolved = resolve_spec(spec)
    config = _config_of(spec)
    _check_causal_lm(spec, resolved, config)
    return Source(spec, resolved, config, load_tokenizer(spec))


@dataclass
class Loaded:
    model: PreTrainedModel
    """Full weights, float32, eval mode (an adapter merged into its base)."""
    reference_logits: torch.Tensor
    """Logits (B, T, V) of the model as trained (an adapter *unmerged*) on the check batch."""
    merge_check: dict[str, float] | None
    """For an adapter: merged vs unmerged logits (see measure.compare_logits)."""


def load_merged(source: Source, batch: LogitBatch) -> Loaded:
    """Load the source on CPU in float32; an adapter is applied, measured unmerged, then merged."""
    from rlhfkit.compress.measure import compare_logits

    if not source.is_adapter:
        model = load_causal_lm(ModelConfig(name=source.spec, device="cpu")).eval()
        return Loaded(model, logits_on(model, batch), None)
    from peft import PeftModel

    base = load_causal_lm(ModelConfig(name=_adapter_base(Path(source.resolved.target)), device="cpu"))
    peft_model = PeftModel.from_pretrained(base, source.resolved.target).eval()
    reference = logits_on(peft_model, batch)
    model = peft_model.merge_and_unload().eval()
    return Loaded(model, reference, compare_logits(reference, logits_on(model, batch), batch.attention_mask))


def save_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """A plain HF folder: config, float32 safetensors, tokenizer. KV cache on: it is for inference."""
    use_cache = model.config.use_cache
    model.config.use_cache = True
    try:
        model.save_pretrained(str(folder), safe_serialization=True)
    finally:
        model.config.use_cache = use_cache
    tokenizer.save_pretrained(str(folder))


def load_folder(folder: Path) -> PreTrainedModel:
    """Load a saved merged folder the way any transformers user would."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True).eval()
