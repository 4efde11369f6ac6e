"""`compress_model`: check inputs, load (and merge), measure, export, load back, check, measure, store.

    setup:   format, numbers and output folder checked; model spec resolved; GGUF support checked
    load:    the model as trained (adapter unmerged) gives the reference logits; then merged
    before:  saved as a float32 HF folder (its size), tokens/s, perplexity, quality hook
    export:  merged folder | torchao int8 safetensors | GGUF f16/q8_0, into a temporary sibling folder
    after:   loaded back with plain transformers; logits and token ids checked against the reference;
             tokens/s, perplexity, quality hook; compress.json written; the folder renamed into place

Any failure, including a failed check, leaves no output folder (runtime.atomic.atomic_folder).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.compress.gguf_export import check_exportable, gguf_file_name, load_gguf, write_gguf
from rlhfkit.compress.int8 import load_int8, save_int8
from rlhfkit.compress.measure import (
    LogitBatch,
    QualityFn,
    check_batch,
    compare_logits,
    folder_size,
    logits_on,
    measure,
    reference_samples,
    tokenize_reference,
)
from rlhfkit.compress.merge import Source, load_folder, load_merged, resolve_source, save_merged
from rlhfkit.data.formats import Sample
from rlhfkit.errors import ModelError, RlhfkitError
from rlhfkit.models.load import load_tokenizer
from rlhfkit.runtime.atomic import atomic_folder, umask

FORMATS = ("merged", "int8", "gguf-f16", "gguf-q8_0")
REL_ERR_LIMITS = {"merged": 1e-4, "int8": 0.2, "gguf-f16": 0.02, "gguf-q8_0": 0.2}
"""Largest ‖Δlogits‖/‖logits‖ a format may show before the output is refused. Measured on the bundled
SmolLM2-135M: f16 8.6e-4, q8_0 0.037, int8 0.046 (its 30 layers compound a 0.5-0.9% weight error;
perplexity moves < 0.5%). A wrong q/k permutation, tensor name or tokenizer gives errors near 1, so the
limits catch bugs while leaving room for models with larger outliers."""
TOKENIZER_PROBES = ("  two leading spaces", "digits 12345 and 3.14159", "naïve café — “quotes” 東京",
                    "code:\n\tdef f(x):\n\t\treturn x ** 2\n", "<|im_start|>user\nhi<|im_end|>")
RESULT_FILE = "compress.json"


def _check_args(to: str, output: str, max_reference: int, speed_prompts: int, speed_new_tokens: int,
                overwrite: bool, model: str) -> Path:
    if to not in FORMATS:
        raise RlhfkitError(f"unknown compression format '{to}'; expected one of: {', '.join(FORMATS)}")
    for name, value, least in (("max_reference", max_reference, 1), ("speed_prompts", speed_prompts, 0),
                               ("speed_new_tokens", speed_new_tokens, 0)):
        if not isinstance(value, int) or value < least:
            raise RlhfkitError(f"{name} (--{name.replace('_', '-')}) must be an integer >= {least}, got {value!r}")
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise RlhfkitError(f"output {out} exists and is a file; expected a folder to create")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RlhfkitError(f"output folder {out} already exists and is not empty; choose another folder, "
                           "or pass overwrite=True (--overwrite) to replace it")
    source = Path(model).expanduser()
    if source.exists() and (out.resolve() == source.resolve() or out.resolve() in source.resolve().parents):
        raise RlhfkitError(f"output folder {out} would replace the model being compressed ({source}); "
                           "choose a folder outside it")
    return out


def _load_after(to: str, folder: Path, file_name: str | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The written output, loaded as a user of plain transformers loads it."""
    if to.startswith("gguf-"):
        assert file_name is not None
        return load_gguf(folder, file_name)
    model = load_int8(folder) if to == "int8" else load_folder(folder)
    return model, load_tokenizer(str(folder))


def _tokenizer_check(before: PreTrainedTokenizerBase, after: PreTrainedTokenizerBase,
                     samples: list[Sample]) -> dict[str, object]:
    """Do both tokenizers give the same ids on the reference examples (chat template included) and probes?"""
    a = [e.input_ids for e in tokenize_reference(samples, before)]
    b = [e.input_ids for e in tokenize_reference(samples, after)]
    probes_equal = [before(p)["input_ids"] == after(p)["input_ids"] for p in TOKENIZER_PROBES]
    specials = {k: (getattr(before, k), getattr(after, k)) for k in ("eos_token", "pad_token", "bos_token")}
    return {
        "tokenizer_ids_equal": a == b and all(probes_equal),
        "tokenizer_mismatches": [TOKENIZER_PROBES[i] for i, ok in enumerate(probes_equal) if not ok]
        + [samples[i].where for i, (x, y) in enumerate(zip(a, b)) if x != y][:5],
        "special_tokens_equal": all(x == y for x, y in specials.values()),
        "chat_template_equal": (before.chat_template or "") == (after.chat_template or ""),
    }


def _check(to: str, reference: torch.Tensor, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
           source: Source, batch: LogitBatch, samples: list[Sample]) -> dict[str, object]:
    check: dict[str, object] = {"against": "the input model as trained" + (" (adapter unmerged)" if source.is_adapter
                                                                           else "")}
    check.update(compare_logits(reference, logits_on(model, batch), batch.attention_mask))
    check.update(_tokenizer_check(source.tokenizer, tokenizer, samples))
    check["rel_err_limit"] = REL_ERR_LIMITS[to]
    check["ok"] = bool(check["rel_err"] <= REL_ERR_LIMITS[to] and check["tokenizer_ids_equal"]
                       and check["special_tokens_equal"] and check["chat_template_equal"])
    return check


def _gguf_name(out: Path) -> str:
    """general.name: the output folder's name, except `mistral`, which transformers' reader takes as
    "load this llama file as Mistral"."""
    return "model" if out.name.lower() == "mistral" else out.name


def _load_hint(to: str, out: Path, file_name: str | None) -> str:
    if to.startswith("gguf-"):
        return (f'AutoModelForCausalLM.from_pretrained("{out}", gguf_file="{file_name}") and AutoTokenizer likewise '
                f"(dequantizes to float32); llama.cpp: llama-cli -m {out / str(file_name)}")
    extra = "  # needs torchao installed" if to == "int8" else ""
    return f'AutoModelForCausalLM.from_pretrained("{out}"), AutoTokenizer.from_pretrained("{out}"){extra}'


def _notes(to: str, is_adapter: bool) -> list[str]:
    if to == "merged" and not is_adapter:
        return ["the input has full weights (no LoRA adapter to merge): saved again as float32 safetensors"]
    if to == "int8":
        return ["int8 weight-only: Linear weights int8 (per-row scales), embeddings and tied LM head float32; "
                "on CPU the int8 matmul dequantizes on the fly, so it saves size and memory, not time"]
    if to.startswith("gguf-"):
        return ["GGUF 'after' tokens/s is transformers running the dequantized float32 weights, not llama.cpp's "
                "quantized kernels; perplexity does reflect the quantization"]
    return []


def _usual_modes(folder: Path) -> None:
    """Give every output file the usual mode (0666 minus the umask): transformers 5.x writes
    model.safetensors as 0600, which other users of a shared run folder could not read."""
    mode = 0o666 & ~umask()
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(mode)


def _versions() -> dict[str, str]:
    out = {}
    for package in ("rlhfkit", "torch", "transformers", "peft", "torchao", "gguf"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def compress_model(model: str, to: str, output: str, *, merge_lora: bool = True,
                   reference: str = "bundled:instructions", max_reference: int = 32, speed_prompts: int = 4,
                   speed_new_tokens: int = 16, quality: QualityFn | None = None, overwrite: bool = False) -> dict:
    """Compress `model` into the folder `output` as `to`; writes it with its compress.json and returns
    the result (the before/after table, the check, settings) as a dict.

    model: a model spec (run or adapter folder, HF folder, bundled:NAME, tiny:ARCH).
    to: one of FORMATS; `merged` only merges a LoRA adapter (a full model is saved again as float32).
    merge_lora: merge an adapter input before int8/GGUF; False refuses an adapter instead.
    reference, max_reference: the SFT rows whose completion perplexity is measured (and checked on).
    speed_prompts, speed_new_tokens: the generation batch timed for tokens/s; 0 skips the timing.
    quality: `quality(model, tokenizer) -> {name: number}`, called on the model before and after (e.g. a
        held-out reward or sentiment score); its numbers join the table.
    overwrite: replace an existing non-empty output folder (only once the new one is complete).
    """
    model, output = str(model), str(output)
    out = _check_args(to, output, max_reference, speed_prompts, speed_new_tokens, overwrite, model)
    source = resolve_source(model)
    if source.is_adapter and not merge_lora and to != "merged":
        raise RlhfkitError(f"{model} is a LoRA adapter folder; {to} needs full weights, so it must be merged "
                           "first: leave merge_lora on (--merge-lora)")
    if to.startswith("gguf-"):
        check_exportable(source.config, source.tokenizer, model)
    samples = reference_samples(reference, max_reference)
    pad_id = source.tokenizer.pad_token_id
    batch = check_batch(tokenize_reference(samples, source.tokenizer), pad_id)
    loaded = load_merged(source, batch)
    settings = {"reference": reference, "reference_rows": len(samples), "max_reference": max_reference,
                "speed_prompts": min(speed_prompts, len(samples)), "speed_new_tokens": speed_new_tokens,
                "torch_threads": torch.get_num_threads(), "device": "cpu"}

    def measured(m: PreTrainedModel, tok: PreTrainedTokenizerBase, folder: Path) -> dict[str, object]:
        size = folder_size(folder)
        return {"size_bytes": size, "size_mib": size / 2**20,
                **measure(m, tok, samples, speed_prompt_count=speed_prompts, speed_new_tokens=speed_new_tokens,
                          quality=quality)}

    with atomic_folder(out) as tmp:
        # The float32 merged folder: the output itself for `merged`, else a scratch sibling (its size is
        # "before", and torchao quantizes while loading it).
        scratch = tmp if to == "merged" else Path(tempfile.mkdtemp(prefix=f".{out.name}.merged-", dir=out.parent))
        file_name = gguf_file_name(to) if to.startswith("gguf-") else None
        try:
            save_merged(loaded.model, source.tokenizer, scratch)
            before = measured(loaded.model, source.tokenizer, scratch)
            if to == "int8":
                exported: dict[str, object] = {"int8_linear_weights": save_int8(scratch, tmp, source.tokenizer)}
            elif file_name is not None:
                exported = {"gguf_file": file_name, "gguf_tensor_types": write_gguf(
                    loaded.model, source.tokenizer, tmp / file_name, to, name=_gguf_name(out))}
            else:
                exported = {}
        finally:
            if scratch != tmp:
                shutil.rmtree(scratch, ignore_errors=True)
        after_model, after_tokenizer = _load_after(to, tmp, file_name)
        check = _check(to, loaded.reference_logits, after_model, after_tokenizer, source, batch, samples)
        if not check["ok"]:
            raise ModelError(f"{to} output failed its check (nothing was written to {out}): logits relative error "
                             f"{check['rel_err']:.3g} (limit {check['rel_err_limit']}), token ids identical: "
                             f"{check['tokenizer_ids_equal']} {check['tokenizer_mismatches']}, special tokens equal: "
                             f"{check['special_tokens_equal']}, chat template equal: {check['chat_template_equal']}")
        after = measured(after_model, after_tokenizer, tmp)
        result = {
            "source": model, "format": to, "output": str(out), "merged_adapter": source.is_adapter,
            **exported, "merge_check": loaded.merge_check, "before": before, "after": after, "check": check,
            "settings": settings, "load": _load_hint(to, out, file_name), "notes": _notes(to, source.is_adapter),
            "versions": _versions(),
        }
        (tmp / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        _usual_modes(tmp)
    return result
