"""eccokv: entropy-coded KV-cache compression for LLM inference (Ecco block codec).

The codec layer (`eccokv.codecs`, `eccokv.entropy`, `eccokv.kernels`) never imports
transformers; the transformers integration is imported lazily.
"""

from __future__ import annotations

__version__ = "0.1.0"

from eccokv import codecs  # noqa: E402

__all__ = ["__version__", "codecs"]
