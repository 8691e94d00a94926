"""eccokv: entropy-coded KV-cache compression for LLM inference (Ecco block codec).

The codec layer (`eccokv.codecs`, `eccokv.entropy`, `eccokv.kernels`) never imports
transformers; the transformers integration is imported lazily. Importing eccokv sets
its numba cache folder and threading layer (`eccokv.runtime`, docs/runtime.md).
"""

from __future__ import annotations

__version__ = "0.1.0"

from eccokv import runtime as _runtime  # noqa: E402

_runtime.configure()  # numba cache keyed by the kernel sources, thread-safe layer

from eccokv import codecs  # noqa: E402

__all__ = ["EccoCache", "__version__", "codecs"]


def __getattr__(name: str):  # lazy: importing transformers is slow and optional
    if name == "EccoCache":
        from eccokv.hf.cache import EccoCache

        return EccoCache
    raise AttributeError(f"module 'eccokv' has no attribute {name!r}")
