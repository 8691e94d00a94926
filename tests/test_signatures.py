"""Kernel entry points carry explicit signatures: they never compile lazily for new
argument types (read-only and writable inputs share one body), and a call with other
types fails loudly instead of compiling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import eccokv.codecs as C
from eccokv.kernels import attention_numba as kn
from eccokv.kernels import ecco_numba as en
from eccokv.kernels import gemv_numba as gn
from eccokv.kernels.attention import fused_attention

ENTRY = {"encode_blocks": (en.encode_blocks, 1), "decode_blocks": (en.decode_blocks, 2),
         "symbols_pass": (en.symbols_pass, 1), "k_phase": (kn.k_phase, 1),
         "v_phase": (kn.v_phase, 1), "gemv_blocks": (gn.gemv_blocks, 1)}


@pytest.mark.parametrize("name", sorted(ENTRY))
def test_entry_points_are_compiled_for_exactly_their_signatures(name):
    fn, n = ENTRY[name]
    assert len(fn.overloads) == n
    assert not fn._can_compile  # no lazy compilation for other types


def test_read_only_and_writable_chunks_share_one_compiled_body():
    codec = C.get("ecco4")
    x = torch.randn(2, 300, 64)
    c = codec.encode(x, axis=1)
    before = {k: len(f.overloads) for k, (f, _) in ENTRY.items()}
    a = codec.decode(c)
    q = torch.randn(4, 1, 64)
    fused_attention(q, [c], x[:, :0], [c], x[:, :0], scaling=0.125)  # freezes c's arrays
    assert not c.arrays["blocks"].flags.writeable
    b = codec.decode(c)  # read-only blocks now
    for dt in (torch.bfloat16, torch.float16):
        codec.decode(c, out=torch.empty(c.shape, dtype=dt))
    assert torch.equal(a, b)
    assert {k: len(f.overloads) for k, (f, _) in ENTRY.items()} == before


def test_a_call_with_other_types_fails_instead_of_compiling():
    codec = C.get("ecco4")
    c = codec.encode(torch.randn(1, 128, 8), axis=1)
    words = c.arrays["blocks"].astype(np.int32)  # wrong dtype for the block words
    out = np.empty(1024, np.float32)
    with pytest.raises(TypeError):
        en.decode_blocks(words, 8, codec.kernel_tables(), 1.0, 128, 1, 8, out, 0,
                         np.zeros(8, np.uint8))
    assert len(en.decode_blocks.overloads) == 2
