"""Fused decode-step attention over compressed K/V: equals decode-then-attention (1e-4
relative, fp32) across codecs, axes, GQA ratios, head dims, masks, chunk layouts, query
lengths and dtypes; rejects corrupt, mismatched and unsupported input before any kernel
runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numba import njit

import eccokv.codecs as C
from eccokv.codecs.base import CodecError, Compressed
from eccokv.codecs.ecco import EccoCodec
from eccokv.kernels import attention_numba as kn
from eccokv.kernels.attention import (
    FusedAttentionUnsupported,
    fused_attention,
    fused_supported,
    reference_attention,
    unsupported_reason,
)

RTOL = 1e-4

# (codec name, K axis, V axis) of [Hkv, T, D] chunks
CODECS = [
    ("ecco4", 1, 1),
    ("ecco3", 1, 1),
    ("ecco2", 1, 1),
    ("int4", 1, 2),
    ("int2", 1, 2),
    ("kivi2", 1, 2),
    ("kivi4", 1, 2),
    ("int3", 2, 1),  # the other axis on each side
    ("int8", 1, 1),
    ("eb3", 1, 1),  # error-bounded, variable rate (ecco-eb)
    ("eb2", 1, 1),
    ("eb-rel0.05", 1, 1),
]
# (Hkv, n_rep, head_dim)
SHAPES = [(2, 1, 64), (2, 3, 80), (1, 4, 128), (2, 8, 256)]


def kv_like(h: int, t: int, d: int, seed: int) -> torch.Tensor:
    """Random K/V-like data: per-channel scales and offsets, a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(0.5 * torch.randn(1, 1, d, generator=g))
    scale[..., :: max(1, d // 6)] *= 8.0
    off = 0.5 * torch.randn(1, 1, d, generator=g)
    return torch.randn(h, t, d, generator=g) * scale + off


def make_stream(name: str, axis: int, lengths: list[int], te: int, h: int, d: int,
                seed: int) -> tuple[list[Compressed], torch.Tensor]:
    codec = C.get(name)
    chunks = [codec.encode(kv_like(h, n, d, seed + i), axis=axis)
              for i, n in enumerate(lengths)]
    return chunks, kv_like(h, te, d, seed + 100)


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.isfinite(a).all()
    scale = float(b.abs().max()) or 1.0
    err = float((a.float() - b.float()).abs().max())
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol} x {scale:.3g}"


def run_both(q, kc, ke, vc, ve, mask=None, threads=1, scaling=None):
    scaling = q.shape[-1] ** -0.5 if scaling is None else scaling
    a = fused_attention(q, kc, ke, vc, ve, scaling=scaling, mask=mask, num_threads=threads)
    b = reference_attention(q, kc, ke, vc, ve, scaling=scaling, mask=mask, num_threads=threads)
    return a, b


# ------------------------------------------------------------------ equality with reference


@pytest.mark.parametrize("name,kax,vax", CODECS)
@pytest.mark.parametrize("hkv,n_rep,d", SHAPES)
def test_fused_equals_decode_then_attention(name, kax, vax, hkv, n_rep, d):
    seed = sum(map(ord, name)) + d
    # K and V with different chunk boundaries, an exact tail on each, same total length
    kc, ke = make_stream(name, kax, [256, 128], 61, hkv, d, seed)
    vc, ve = make_stream(name, vax, [128, 128], 189, hkv, d, seed + 7)
    for lq in (1, 5):
        q = torch.randn(hkv * n_rep, lq, d, generator=torch.Generator().manual_seed(lq))
        assert_close(*run_both(q, kc, ke, vc, ve))


@pytest.mark.parametrize("lq", [1, 37])
@pytest.mark.parametrize("te", [0, 1, 37, 200])
def test_chunks_and_tails(lq, te):
    hkv, n_rep, d = 2, 4, 64
    kc, ke = make_stream("ecco4", 1, [128, 384, 256], te, hkv, d, 1)
    vc, ve = make_stream("kivi2", 2, [768], te, hkv, d, 2)
    q = torch.randn(hkv * n_rep, lq, d)
    assert_close(*run_both(q, kc, ke, vc, ve))


def test_no_chunks_exact_only_and_chunks_only():
    hkv, n_rep, d = 2, 3, 64
    ke, ve = kv_like(hkv, 300, d, 1), kv_like(hkv, 300, d, 2)
    q = torch.randn(hkv * n_rep, 4, d)
    assert_close(*run_both(q, [], ke, [], ve))
    assert_close(*run_both(q, None, ke, None, ve))
    kc, _ = make_stream("ecco4", 1, [256, 128], 0, hkv, d, 3)
    vc, _ = make_stream("int4", 2, [384], 0, hkv, d, 4)
    assert_close(*run_both(q, kc, None, vc, None))
    # an empty chunk and an empty tail change nothing
    empty = C.get("ecco4").encode(torch.zeros(hkv, 0, d), axis=1)
    assert_close(*run_both(q, [empty] + kc, torch.zeros(hkv, 0, d), vc, None))


def test_partial_ecco_groups():
    """Ecco chunks whose length is not a multiple of 128 (the last group is padded)."""
    hkv, n_rep, d = 2, 2, 64
    kc, ke = make_stream("ecco4", 1, [200, 77], 5, hkv, d, 5)
    vc, ve = make_stream("ecco3", 1, [130, 147], 5, hkv, d, 6)
    q = torch.randn(hkv * n_rep, 3, d)
    assert_close(*run_both(q, kc, ke, vc, ve))


@pytest.mark.parametrize("d", [66, 72])
def test_head_dims_with_remainders(d):
    """head_dim not a multiple of 4 (one-block decode path) or of the V channel slab."""
    hkv, n_rep = 2, 3
    for name, kax, vax in (("ecco4", 1, 1), ("kivi2", 1, 2), ("int4", 2, 1)):
        kc, ke = make_stream(name, kax, [256], 7, hkv, d, 40)
        vc, ve = make_stream(name, vax, [128, 128], 7, hkv, d, 41)
        q = torch.randn(hkv * n_rep, 3, d)
        assert_close(*run_both(q, kc, ke, vc, ve))


@pytest.mark.parametrize("name", ["ecco4", "ecco2", "int4", "kivi2"])
def test_masks(name):
    hkv, n_rep, d, lq = 2, 4, 64, 6
    kax, vax = (1, 1) if name.startswith("ecco") else (1, 2)
    kc, ke = make_stream(name, kax, [256], 40, hkv, d, 7)
    vc, ve = make_stream(name, vax, [256], 40, hkv, d, 8)
    T = 296
    q = torch.randn(hkv * n_rep, lq, d)
    # left padding: the first 50 tokens are padding, plus causal structure
    causal = torch.arange(T)[None, :] <= (T - lq + torch.arange(lq))[:, None]
    pad = torch.arange(T)[None, :] >= 50
    bmask = causal & pad
    assert_close(*run_both(q, kc, ke, vc, ve, mask=bmask))
    # 4-D mask as transformers passes it ([batch=1, 1, Lq, T])
    assert_close(*run_both(q, kc, ke, vc, ve, mask=bmask[None, None]))
    # float masks: 0 / -inf, and 0 / large negative, plus a real additive bias
    fmask = torch.zeros(lq, T).masked_fill(~bmask, float("-inf"))
    assert_close(*run_both(q, kc, ke, vc, ve, mask=fmask))
    big = torch.zeros(lq, T).masked_fill(~bmask, torch.finfo(torch.float32).min)
    assert_close(*run_both(q, kc, ke, vc, ve, mask=big))
    alibi = -0.01 * (T - torch.arange(T, dtype=torch.float32))[None, :].expand(lq, T)
    assert_close(*run_both(q, kc, ke, vc, ve, mask=alibi.masked_fill(~bmask, float("-inf"))))
    # bf16 float mask (transformers builds masks in the model dtype)
    assert_close(*run_both(q, kc, ke, vc, ve, mask=big.to(torch.bfloat16)))


def test_fully_masked_rows_are_zero_not_nan():
    hkv, n_rep, d, lq = 1, 2, 64, 3
    kc, ke = make_stream("ecco4", 1, [128], 10, hkv, d, 9)
    vc, ve = make_stream("int4", 2, [128], 10, hkv, d, 10)
    m = torch.ones(lq, 138, dtype=torch.bool)
    m[1] = False
    a, b = run_both(torch.randn(hkv * n_rep, lq, d), kc, ke, vc, ve, mask=m)
    assert_close(a, b)
    assert (a[:, 1] == 0).all() and a[:, 0].abs().sum() > 0
    # causal with more queries than tokens: the first queries see nothing
    q = torch.randn(hkv * n_rep, 140, d)
    a, b = run_both(q, kc, ke, vc, ve)
    assert_close(a, b)
    assert (a[:, :2] == 0).all() and (a[:, 2:].abs().sum(-1) > 0).all()


def test_bf16_and_fp16_queries():
    hkv, n_rep, d = 2, 4, 128
    kc, ke = make_stream("ecco4", 1, [256], 20, hkv, d, 11)
    vc, ve = make_stream("ecco4", 1, [256], 20, hkv, d, 12)
    q32 = torch.randn(hkv * n_rep, 5, d)
    for dt in (torch.bfloat16, torch.float16):
        q = q32.to(dt)
        a, b = run_both(q, kc, ke.to(dt), vc, ve.to(dt))
        assert a.dtype == dt
        # both paths compute in float32 from the same inputs; only the final rounding to
        # q's dtype can differ (one unit in the last place)
        assert_close(a, b, rtol=2 ** -7)
        f32 = fused_attention(q.float(), kc, ke.to(dt).float(), vc, ve.to(dt).float(),
                              scaling=d ** -0.5, num_threads=1)
        assert_close(a.float(), f32.to(dt).float(), rtol=0)


def test_bf16_chunks_and_float32_scales():
    """Chunks of bf16 tensors; int chunks whose scales are stored in float32 (huge and
    tiny tensors)."""
    hkv, n_rep, d = 2, 2, 64
    ecco = C.get("ecco4")
    kc = [ecco.encode(kv_like(hkv, 256, d, 13).bfloat16(), axis=1)]
    intc = C.get("kivi4")
    big = intc.encode(kv_like(hkv, 128, d, 14) * 3e5, axis=2)
    tiny = intc.encode(kv_like(hkv, 128, d, 15) * 1e-4, axis=2)
    assert big.meta["sdtype"] == "float32" and tiny.meta["sdtype"] == "float32"
    q = torch.randn(hkv * n_rep, 2, d)
    assert_close(*run_both(q, kc, None, [big, tiny], None, scaling=1e-6))
    kt = [intc.encode(kv_like(hkv, 256, d, 16) * 3e5, axis=1)]
    assert_close(*run_both(q, kt, None, kc, None, scaling=1e-7))


def test_always_fits_mode_and_zero_blocks():
    """Ecco blocks in the always-fits (fixed-width) mode and all-zero groups."""
    hkv, n_rep, d = 2, 2, 64
    codec = EccoCodec("ecco4", trim_passes=0)
    g = torch.Generator().manual_seed(17)
    x = torch.sign(torch.randn(hkv, 256, d, generator=g)) * (1 + 0.01 * torch.randn(
        hkv, 256, d, generator=g))
    x[:, :128, 5:9] = 0.0  # zero groups
    codec.reset_stats()
    kc = [codec.encode(x, axis=1)]
    assert codec.stats()["fallback_blocks"] > 0 and codec.stats()["zero_blocks"] > 0
    vc = [codec.encode(x.flip(1), axis=1)]
    assert_close(*run_both(torch.randn(hkv * n_rep, 3, d), kc, None, vc, None))


def test_threads_and_tiles_agree():
    hkv, n_rep, d = 2, 4, 64
    kc, ke = make_stream("ecco4", 1, [512], 33, hkv, d, 18)
    vc, ve = make_stream("kivi4", 2, [512], 33, hkv, d, 19)
    q = torch.randn(hkv * n_rep, 70, d)  # several query tiles
    one = fused_attention(q, kc, ke, vc, ve, scaling=0.125, num_threads=1)
    two = fused_attention(q, kc, ke, vc, ve, scaling=0.125, num_threads=2)
    assert_close(one, two, rtol=1e-5)
    # each query row alone gives the same result as inside its tile
    for i in (0, 33, 69):
        m = torch.ones(1, 545, dtype=torch.bool)
        m[0, 545 - 70 + i + 1:] = False
        row = fused_attention(q[:, i:i + 1], kc, ke, vc, ve, scaling=0.125, mask=m,
                              num_threads=1)
        assert_close(row[:, 0], one[:, i], rtol=1e-5)


def test_reference_sdpa_variant_agrees():
    hkv, n_rep, d = 2, 3, 64
    kc, ke = make_stream("ecco4", 1, [256], 9, hkv, d, 20)
    vc, ve = make_stream("ecco4", 1, [256], 9, hkv, d, 21)
    for lq in (1, 4):
        q = torch.randn(hkv * n_rep, lq, d)
        a = reference_attention(q, kc, ke, vc, ve, scaling=0.1, sdpa=True)
        b = reference_attention(q, kc, ke, vc, ve, scaling=0.1)
        assert_close(a, b, rtol=1e-5)


# ------------------------------------------------------------------ helpers of the kernels


@njit(cache=False)
def _h2f_all(u):
    out = np.empty(u.shape[0], np.float32)
    for i in range(u.shape[0]):
        out[i] = kn._h2f(u[i])
    return out


@njit(cache=False)
def _exp_all(x):
    out = np.empty(x.shape[0], np.float32)
    for i in range(x.shape[0]):
        out[i] = kn._expf(x[i])
    return out


def test_float16_bits_to_float32_exact():
    u = np.arange(1 << 16, dtype=np.uint16)
    ref = u.view(np.float16).astype(np.float32)
    fin = np.isfinite(ref)
    np.testing.assert_array_equal(_h2f_all(u)[fin], ref[fin])


def test_exp_accuracy():
    x = np.linspace(-87.0, 0.0, 200001, dtype=np.float32)
    got = _exp_all(x).astype(np.float64)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got / ref - 1)) < 3e-7


# ------------------------------------------------------------------ support and rejection


def test_supported_combinations():
    for name in ("ecco4", "ecco3", "ecco2"):
        assert fused_supported(name, 1) and fused_supported(name, -2)
        assert not fused_supported(name, 2)
    for name in ("int2", "int3", "int4", "int8", "kivi2", "kivi3", "kivi4"):
        assert fused_supported(name, 1) and fused_supported(name, 2)
        assert fused_supported(C.get(name).get_config(), -1)
        assert not fused_supported(name, 0)
    for name in ("none", "fp8"):
        assert not fused_supported(name, 1) and "no fused" in unsupported_reason(name, 1)
    assert not fused_supported("ecco4", 3)
    assert not fused_supported({"id": "nope"}, 1)


def _small():
    hkv, d = 2, 64
    kc, ke = make_stream("ecco4", 1, [256], 10, hkv, d, 30)
    vc, ve = make_stream("int4", 2, [256], 10, hkv, d, 31)
    q = torch.randn(hkv * 2, 1, d)
    return q, kc, ke, vc, ve


def _fa(q, kc, ke, vc, ve, **kw):
    kw.setdefault("scaling", 0.125)
    return fused_attention(q, kc, ke, vc, ve, num_threads=1, **kw)


def _clone(c: Compressed, **arrays) -> Compressed:
    arrs = dict(c.arrays)
    arrs.update(arrays)
    return Compressed(dict(c.codec_config), c.shape, c.dtype, c.axis, arrs, dict(c.meta))


def test_unsupported_codecs_raise():
    q, kc, ke, vc, ve = _small()
    for name, axis in (("none", 1), ("fp8", 1), ("ecco4", 2), ("int4", 0)):
        bad = [C.get(name).encode(kv_like(2, 256, 64, 1), axis=axis)]
        with pytest.raises(FusedAttentionUnsupported, match="reference_attention"):
            _fa(q, bad, ke, vc, ve)
        with pytest.raises(FusedAttentionUnsupported):
            _fa(q, kc, ke, bad, ve)
    assert issubclass(FusedAttentionUnsupported, ValueError)


def test_corrupt_and_truncated_blocks_raise():
    q, kc, ke, vc, ve = _small()
    blocks = kc[0].arrays["blocks"]
    with pytest.raises(CodecError, match="truncated or mismatched"):
        _fa(q, [_clone(kc[0], blocks=blocks[:-8].copy())], ke, vc, ve)
    # a Huffman block whose code stream overruns: header mode 0, every other bit set
    bad = blocks.copy()
    bad[0:8] = np.uint64(0xFFFFFFFFFFFFFFFF)
    bad[0] &= ~np.uint64(1)
    corrupt = _clone(kc[0], blocks=bad)
    with pytest.raises(CodecError, match="corrupt"):
        C.get("ecco4").decode(corrupt)  # the decoder agrees it is corrupt
    with pytest.raises(CodecError, match="K chunk"):
        _fa(q, [corrupt], ke, vc, ve)
    v_ecco = [C.get("ecco4").encode(kv_like(2, 256, 64, 3), axis=1)]
    v_bad = _clone(v_ecco[0], blocks=bad)
    with pytest.raises(CodecError, match="V chunk"):
        _fa(q, kc, ke, [v_bad], ve)
    # int codec: truncated codes, non-finite scales
    codes = vc[0].arrays["codes"]
    with pytest.raises(CodecError):
        _fa(q, kc, ke, [_clone(vc[0], codes=codes[:-1].copy())], ve)
    sc = vc[0].arrays["scale"].copy()
    sc[3] = np.nan
    with pytest.raises(CodecError, match="non-finite"):
        _fa(q, kc, ke, [_clone(vc[0], scale=sc)], ve)
    with pytest.raises(CodecError, match="dtype|must be"):
        _fa(q, kc, ke, [_clone(vc[0], scale=vc[0].arrays["scale"].astype(np.float64))], ve)


def test_wrong_codec_config_raises():
    q, kc, ke, vc, ve = _small()
    cfg = dict(kc[0].codec_config, profile_hash="0" * 16)
    with pytest.raises(CodecError):
        _fa(q, [Compressed(cfg, kc[0].shape, kc[0].dtype, 1, dict(kc[0].arrays))], ke, vc, ve)
    # int4 data claiming to be int2: its arrays do not fit
    cfg2 = dict(vc[0].codec_config, bits=2)
    with pytest.raises(CodecError):
        _fa(q, kc, ke, [Compressed(cfg2, vc[0].shape, vc[0].dtype, 2, dict(vc[0].arrays),
                                   dict(vc[0].meta))], ve)
    # chunks of one stream with different configs
    other = C.get("ecco3").encode(kv_like(2, 128, 64, 5), axis=1)
    with pytest.raises(ValueError, match="share one codec"):
        _fa(q, kc + [other], ke, vc, ve)


def test_mismatched_shapes_raise():
    q, kc, ke, vc, ve = _small()
    with pytest.raises(ValueError, match="tokens"):
        _fa(q, kc, ke[:, :5], vc, ve)
    with pytest.raises(ValueError, match="Hkv"):
        _fa(q, kc, ke, vc, torch.randn(3, 10, 64))
    with pytest.raises(ValueError, match="exact tail"):
        _fa(q, kc, torch.randn(2, 10, 32), vc, ve)
    with pytest.raises(ValueError, match="head_dim"):
        _fa(torch.randn(4, 1, 32), kc, ke, vc, ve)
    with pytest.raises(ValueError, match="multiple"):
        _fa(torch.randn(3, 1, 64), kc, ke, vc, ve)
    other = make_stream("ecco4", 1, [128], 0, 3, 64, 6)[0]
    with pytest.raises(ValueError, match="Hkv"):
        _fa(q, kc + other, ke, vc, ve)
    with pytest.raises(ValueError, match="mask"):
        _fa(q, kc, ke, vc, ve, mask=torch.ones(1, 100, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        _fa(q, kc, ke, vc, ve, mask=torch.full((1, 266), float("nan")))
    with pytest.raises(TypeError):
        _fa(q, kc, ke, vc, ve, mask=torch.ones(1, 266, dtype=torch.int64))
    with pytest.raises(ValueError, match="give at least one"):
        _fa(q, [], None, vc, ve)


def test_bad_queries_raise():
    q, kc, ke, vc, ve = _small()
    qn = q.clone()
    qn[1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        _fa(qn, kc, ke, vc, ve)
    with pytest.raises(ValueError, match=r"\[Hq, Lq, D\]"):
        _fa(q[0], kc, ke, vc, ve)
    with pytest.raises(TypeError):
        _fa(q.double(), kc, ke, vc, ve)
    with pytest.raises(TypeError):
        _fa(q, kc[0], ke, vc, ve)
    with pytest.raises(ValueError, match="finite"):
        _fa(q, kc, ke, vc, ve, scaling=float("inf"))
    with pytest.raises(ValueError, match="num_threads"):
        fused_attention(q, kc, ke, vc, ve, scaling=0.1, num_threads=0)


# ------------------------------------------------------------------ context blocks


BLOCK_CASES = [  # (K codec, K axis, K lengths, V codec, V axis, V lengths, K tail, V tail)
    ("ecco4", 1, [200, 77, 384], "ecco3", 1, [256, 405], 61, 61),
    ("kivi2", 1, [640], "kivi2", 2, [300, 340], 45, 45),
    ("int3", 2, [128, 333], "int4", 1, [461], 130, 130),
    ("ecco4", 1, [256, 512], "kivi4", 2, [700], 10, 78),  # tails of different lengths
    ("eb3", 1, [200, 77, 384], "eb4", 1, [256, 405], 61, 61),
    ("ecco4", 1, [128, 256], "eb2.5", 1, [384], 40, 40),
]


@pytest.mark.parametrize("case", BLOCK_CASES)
@pytest.mark.parametrize("block_bytes", [1, 3000, 8000])
def test_context_blocks_merge_like_one_softmax(monkeypatch, case, block_bytes):
    """Attention over context blocks (cut at group boundaries of both streams, merged by
    their log-sum-exp) equals the reference, with masks, tiles and fully masked rows."""
    import eccokv.kernels.attention as A

    kn_, kax, kl, vn, vax, vl, kte, vte = case
    hkv, n_rep, d = 2, 3, 64
    kc, ke = make_stream(kn_, kax, kl, kte, hkv, d, 50)
    vc, ve = make_stream(vn, vax, vl, vte, hkv, d, 51)
    T = sum(kl) + kte
    monkeypatch.setattr(A, "S_BLOCK_BYTES", block_bytes)
    ks = A._prepare_stream(kc, ke, "K")
    vs = A._prepare_stream(vc, ve, "V")
    blocks = A._blocks(ks, vs, T, max(128, block_bytes // (4 * hkv * n_rep)))
    assert len(blocks) > 1 and blocks[0][0] == 0 and blocks[-1][1] == T
    for lq in (1, 7):
        q = torch.randn(hkv * n_rep, lq, d, generator=torch.Generator().manual_seed(lq))
        assert_close(*run_both(q, kc, ke, vc, ve, threads=2))
        m = torch.arange(T)[None, :] <= (T - lq + torch.arange(lq))[:, None]
        m &= torch.arange(T)[None, :] >= 300  # left padding past the first blocks
        m[0] = False  # a fully masked row
        a, b = run_both(q, kc, ke, vc, ve, mask=m)
        assert_close(a, b)
        assert (a[:, 0] == 0).all()
        alibi = -0.05 * (T - torch.arange(T, dtype=torch.float32))[None, :].expand(lq, T)
        assert_close(*run_both(q, kc, ke, vc, ve, mask=alibi.masked_fill(~m, float("-inf"))))


def test_context_blocks_cut_only_where_both_streams_allow():
    """Every block starts at a chunk or group boundary of K and of V (or in the exact
    tails), blocks tile [0, T), and none is longer than asked unless no cut exists."""
    import eccokv.kernels.attention as A

    rng = np.random.default_rng(0)
    for _ in range(200):
        kl = [int(x) for x in rng.integers(1, 700, rng.integers(1, 5))]
        vl = [int(x) for x in rng.integers(1, 700, rng.integers(1, 5))]
        T = max(sum(kl), sum(vl)) + int(rng.integers(0, 300))
        kg, vg = int(rng.choice([1, 32, 128])), int(rng.choice([1, 64, 128]))
        ks = A._Stream("K", 1, 8, kind=0 if kg == 128 else 1 if kg > 1 else 2, G=max(kg, 1),
                       Tc=sum(kl), Te=T - sum(kl))
        vs = A._Stream("V", 1, 8, kind=0 if vg == 128 else 1 if vg > 1 else 2, G=max(vg, 1),
                       Tc=sum(vl), Te=T - sum(vl))
        ks.ch = np.zeros((len(kl), 8), np.int64)
        ks.ch[:, 3] = kl
        vs.ch = np.zeros((len(vl), 8), np.int64)
        vs.ch[:, 3] = vl
        ks.lengths, vs.lengths = tuple(kl), tuple(vl)
        tb = int(rng.integers(128, 600))
        blocks = A._blocks(ks, vs, T, tb)

        def ok(p, lengths, g):
            t0 = 0
            for n in lengths:
                if t0 <= p < t0 + n:
                    return (p - t0) % g == 0
                t0 += n
            return True  # chunk end or exact tail

        assert blocks[0][0] == 0 and blocks[-1][1] == T
        for (a, b), (a2, _) in zip(blocks, blocks[1:] + [(T, T)], strict=True):
            assert a < b and b == a2
            assert ok(a, kl, kg) and ok(a, vl, vg)
            if b - a > tb:  # only where no valid cut lies in (a, a + tb]
                assert not any(ok(p, kl, kg) and ok(p, vl, vg) for p in range(a + 1, a + tb + 1))


def test_codec_cache_is_bounded():
    """Codec configs come from data: the per-config codec cache stays bounded (LRU)."""
    import eccokv.kernels.attention as A

    base = C.get("int4").get_config()
    for g in range(2, A._CODECS_MAX + 20):
        A._codec_for({**base, "group_size": g})
    assert len(A._CODECS) <= A._CODECS_MAX
    assert A._codec_for(base) is A._codec_for(base)
