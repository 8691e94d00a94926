"""The shared Ecco decode core (kernels/ecco_core.py): multi-symbol tables, and the plain
and fused decoders against the numpy reference decoder on adversarial (random) blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import eccokv.codecs as C
from eccokv.codecs.base import CodecError
from eccokv.codecs.ecco import VARIANTS
from eccokv.entropy.huffman import (
    MULTI_SYMS,
    decode_table,
    huffman_lengths,
    multi_decode_table,
)
from eccokv.kernels.attention import fused_attention, reference_attention
from eccokv.kernels.ecco_core import MULTI_BITS

ECCO = sorted(VARIANTS)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=2, max_size=16), st.integers(8, 12))
def test_multi_symbol_entries_match_single_symbol_decoding(counts, window):
    """Every entry holds the greedy run of whole codes that fits the window (1..3 of
    them), with their exact total length, for every possible peek."""
    lengths = huffman_lengths(np.array(counts), 8)
    single = decode_table(lengths, 8).astype(np.int64)
    multi = multi_decode_table(lengths, window).astype(np.int64)
    for w in range(1 << window):
        e = int(multi[w])
        n, used = (e >> 24) & 3, e >> 26
        assert 1 <= n <= MULTI_SYMS
        pos, syms = 0, []
        while len(syms) < MULTI_SYMS:
            s = int(single[(w >> pos) & 255])
            if pos + (s >> 4) > window:
                break
            syms.append(s & 15)
            pos += s >> 4
        assert n == len(syms) and used == pos
        assert [(e >> (8 * k)) & 255 for k in range(n)] == syms


def test_multi_table_longest_codes_and_bad_window():
    lengths = np.array([1, 2, 3, 4, 5, 6, 7, 8, 8], np.uint8)  # the longest codes: 8 bits
    t = multi_decode_table(lengths, MULTI_BITS)
    assert ((t >> 26) <= MULTI_BITS).all() and (((t >> 24) & 3) >= 1).all()
    with pytest.raises(ValueError, match="window"):
        multi_decode_table(lengths, 7)


def _random_blocks(c: C.Compressed, seed: int, style: int) -> C.Compressed:
    """c with adversarial blocks: random bits (style 0), random code bits under each
    block's real header (1), or all-ones codes (2: the longest codes of every codebook,
    straddling every refill and overrunning the block)."""
    rng = np.random.default_rng(seed)
    blocks = c.arrays["blocks"].copy()
    nw = blocks.size - 1
    rnd = rng.integers(0, 2**63, size=nw, dtype=np.uint64) | (
        rng.integers(0, 2, size=nw, dtype=np.uint64) << np.uint64(63))
    if style == 0:
        blocks[:nw] = rnd
    else:
        codec = C.get(c.codec_config)
        words = codec.block_bytes // 8
        hb = codec.header_bits
        keep = (np.uint64(1) << np.uint64(hb)) - np.uint64(1)
        b = blocks[:nw].reshape(-1, words)
        b[:, 0] = (b[:, 0] & keep) | ((rnd.reshape(-1, words)[:, 0] if style == 1
                                       else np.uint64(2**64 - 1)) & ~keep)
        b[:, 0] &= ~np.uint64(1)  # mode 0: Huffman
        b[:, 1:] = rnd.reshape(-1, words)[:, 1:] if style == 1 else np.uint64(2**64 - 1)
    return C.Compressed(c.codec_config, c.shape, c.dtype, c.axis, {**c.arrays, "blocks": blocks},
                        c.meta)


SHAPES = [((3, 300, 8), 1), ((2, 128, 5), 1), ((7, 130), -1), ((2, 1, 4), -1)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ECCO), st.sampled_from(SHAPES), st.integers(0, 2**32 - 1),
       st.integers(0, 2))
@example("ecco4", ((3, 300, 8), 1), 0, 2)
@example("ecco2", ((3, 300, 8), 1), 1, 1)
def test_decoder_equals_reference_on_adversarial_blocks(name, shape_axis, seed, style):
    """Bit for bit, or both report corrupt data: quads and single blocks, all-zero and
    always-fits blocks (random headers), blocks ending inside a multi-symbol entry."""
    shape, axis = shape_axis
    codec = C.get(name)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed % 1000))
    bad = _random_blocks(codec.encode(x, axis=axis), seed, style)
    try:
        ref = codec.decode_reference(bad)
    except CodecError:
        with pytest.raises(CodecError, match="corrupt"):
            codec.decode(bad)
        return
    for dtype in (torch.float32, torch.bfloat16):
        out = codec.decode(bad, out=torch.empty(shape, dtype=dtype))
        assert torch.equal(out, ref.to(dtype))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ECCO), st.integers(0, 2**32 - 1), st.integers(0, 2))
def test_fused_attention_equals_reference_on_adversarial_blocks(name, seed, style):
    """The fused kernels read blocks through the same core: same result as
    decode-then-attention, or the same corrupt-data error."""
    codec = C.get(name)
    g = torch.Generator().manual_seed(seed % 1000)
    k = codec.encode(torch.randn(2, 256, 8, generator=g), axis=1)
    v = codec.encode(torch.randn(2, 256, 8, generator=g), axis=1)
    kb = _random_blocks(k, seed, style)
    q = torch.randn(4, 2, 8, generator=g)
    try:
        want = reference_attention(q, [kb], None, [v], None, scaling=0.3)
    except CodecError:
        with pytest.raises(CodecError, match="corrupt"):
            fused_attention(q, [kb], None, [v], None, scaling=0.3)
        return
    got = fused_attention(q, [kb], None, [v], None, scaling=0.3)
    scale = want.abs().max().clamp_min(1e-30)
    assert float((got - want).abs().max() / scale) < 1e-4


def test_validated_chunks_are_frozen_and_revalidated_when_replaced():
    """Chunks are validated once for the kernels; their arrays are then read-only, and a
    chunk whose arrays were swapped is validated again (never trusted blindly)."""
    codec = C.get("ecco4")
    k = codec.encode(torch.randn(1, 256, 8), axis=1)
    q = torch.randn(1, 1, 8)
    fused_attention(q, [k], None, [k], None, scaling=1.0)
    assert not k.arrays["blocks"].flags.writeable
    with pytest.raises(ValueError):
        k.arrays["blocks"][1] = 0
    good = k.arrays["blocks"]
    blocks = good.copy()
    blocks[1:-1] = np.uint64(2**64 - 1)  # all-ones codes overrun
    k.arrays["blocks"] = blocks
    with pytest.raises(CodecError, match="corrupt"):
        fused_attention(q, [k], None, [k], None, scaling=1.0)
    # the stream memo too: a stream of the very same chunks whose array was made writable
    # and edited in place is checked again, not reused
    k.arrays["blocks"] = good
    fused_attention(q, [k], None, [k], None, scaling=1.0)
    fused_attention(q, [k], None, [k], None, scaling=1.0)  # a stream memo hit
    good.setflags(write=True)
    good[1:-1] = np.uint64(2**64 - 1)
    with pytest.raises(CodecError, match="corrupt"):
        fused_attention(q, [k], None, [k], None, scaling=1.0)
