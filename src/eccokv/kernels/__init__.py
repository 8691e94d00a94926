"""numba kernels (Ecco encoder/decoder, fused attention) and their numpy/torch references.

Importing this package applies eccokv's numba settings first (`eccokv.runtime`): the
compiled-kernel cache keyed by the kernel sources, and a thread-safe threading layer.
"""

from eccokv import runtime as _runtime

_runtime.configure()
