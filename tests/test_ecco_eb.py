"""ecco-eb: the error bound as a property, rate control, and corrupt-data handling.

The generic round-trip, serialisation and fuzz tests pick the eb presets up through the
registry (tests/test_codecs_roundtrip.py, tests/test_serialize_errors.py); this file holds
what is specific to the error-bounded format.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eccokv import codecs as C
from eccokv.codecs.base import CodecError, Compressed, Layout, to_rows
from eccokv.codecs.ecco_eb import EccoEbCodec

HYP = settings(max_examples=60, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def group_bounds(x: torch.Tensor, axis: int, bound: float, mode: str) -> torch.Tensor:
    """The bound of every value of x (same shape), computed independently of the codec:
    relative = bound * (max - min) of the value's group of 128 along axis."""
    if mode == "absolute":
        return torch.full(x.shape, bound, dtype=torch.float64)
    lay = Layout(tuple(x.shape), axis % x.dim(), 128)
    xf = x.to(torch.float64)
    moved = xf.movedim(axis, -1)
    L = moved.shape[-1]
    out = torch.empty_like(moved)
    for g0 in range(0, L, 128):
        seg = moved[..., g0:g0 + 128]
        rng = seg.amax(-1, keepdim=True) - seg.amin(-1, keepdim=True)
        out[..., g0:g0 + 128] = bound * rng
    assert lay.ngroups == -(-L // 128)
    return out.movedim(-1, axis)


def check_bound(x: torch.Tensor, codec: EccoEbCodec, axis: int) -> float:
    """Encode, decode into the tensor's dtype and into float32; every value within its
    bound. Returns max |x - x_hat| / bound."""
    c = codec.encode(x, axis=axis)
    bnd = group_bounds(x, axis, float(c.arrays["params"][1]) if codec.target_bits
                       else codec.bound, codec.bound_mode)
    worst = 0.0
    for y in (codec.decode(c), codec.decode(c, out=torch.empty(x.shape))):
        err = (y.to(torch.float64) - x.to(torch.float64)).abs()
        assert bool((err <= bnd).all()), (
            f"bound broken: max err {float(err.max())}, at bound "
            f"{float(bnd.flatten()[int(torch.argmax(err - bnd))])}")
        ratio = torch.where(bnd > 0, err / bnd.clamp_min(1e-300), torch.zeros_like(err))
        worst = max(worst, float(ratio.max()) if x.numel() else 0.0)
    return worst


@st.composite
def tensors(draw):
    nd = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 200 if nd == 1 else 40)) for _ in range(nd))
    axis = draw(st.integers(-nd, nd - 1))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(["gauss", "outliers", "constant", "offset", "edges", "ints"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if kind == "gauss":
        x = torch.randn(n, generator=g) * draw(st.sampled_from([1e-3, 1.0, 30.0]))
    elif kind == "outliers":
        x = torch.randn(n, generator=g)
        x[torch.randint(0, n, (max(1, n // 50),), generator=g)] *= 200.0
    elif kind == "constant":
        x = torch.full((n,), draw(st.sampled_from([0.0, 0.75, -3.5, 1e4])))
    elif kind == "offset":  # a large mean with a small spread (z fields, float32 rounding)
        x = 1000.0 + 0.01 * torch.randn(n, generator=g)
    elif kind == "ints":
        x = torch.randint(-7, 8, (n,), generator=g).float()
    else:  # values at the edges of the grid: half steps of typical bounds
        x = (torch.randint(-40, 40, (n,), generator=g).float() + 0.5) * 0.1
    return x.reshape(shape).to(dtype), axis


@HYP
@given(xa=tensors(), bound=st.floats(1e-4, 0.5), mode=st.sampled_from(["relative", "absolute"]))
def test_bound_holds_for_every_value(xa, bound, mode):
    x, axis = xa
    codec = C.get({"id": "ecco-eb", "bound": bound, "bound_mode": mode})
    assert check_bound(x, codec, axis) <= 1.0


@HYP
@given(xa=tensors(), target=st.sampled_from([2.0, 2.5, 3.0, 4.0, 6.0]))
def test_target_mode_keeps_its_chosen_bound(xa, target):
    x, axis = xa
    codec = C.get({"id": "ecco-eb", "target_bits": target})
    assert check_bound(x, codec, axis) <= 1.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_absolute_bound_below_output_precision_is_exact(dtype):
    """A bound finer than the dtype can express: blocks are stored exactly."""
    x = (100.0 + torch.randn(4, 300)).to(dtype)
    codec = C.get({"id": "ecco-eb", "bound": 1e-6, "bound_mode": "absolute"})
    y = codec.decode(codec.encode(x, axis=1))
    assert torch.equal(y, x)


def test_relative_bound_controls_error_and_rate():
    x = torch.randn(8, 4096)
    rates, errs = [], []
    for b in (0.01, 0.03, 0.1, 0.3):
        codec = C.get({"id": "ecco-eb", "bound": b})
        c = codec.encode(x, axis=1)
        y = codec.decode(c)
        rates.append(c.bits_per_value)
        errs.append(float((y - x).abs().max()))
    assert rates == sorted(rates, reverse=True)
    assert errs == sorted(errs)


def test_non_finite_input_rejected():
    codec = C.get("eb3")
    for bad in (float("nan"), float("inf")):
        x = torch.randn(4, 256)
        x[1, 7] = bad
        with pytest.raises(ValueError, match="non-finite"):
            codec.encode(x)


def test_config_validation():
    with pytest.raises(ValueError, match="bound_mode"):
        C.get({"id": "ecco-eb", "bound_mode": "l2"})
    with pytest.raises(ValueError, match="> 0"):
        C.get({"id": "ecco-eb", "bound": 0.0})
    with pytest.raises(ValueError, match="at most 0.5"):
        C.get({"id": "ecco-eb", "bound": 0.7})
    with pytest.raises(ValueError, match="target_bits"):
        C.get({"id": "ecco-eb", "target_bits": 0.5})
    with pytest.raises(TypeError):
        C.get({"id": "ecco-eb", "bound": "0.1"})
    c = C.get({"id": "ecco-eb", "bound": 0.05, "bound_mode": "absolute"})
    assert c.get_config()["bound_mode"] == "absolute"


# ------------------------------------------------------------------ rate control


def kv_like(h: int, t: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(0.5 * torch.randn(1, 1, d, generator=g))
    scale[..., :: max(1, d // 6)] *= 8.0
    return torch.randn(h, t, d, generator=g) * scale + 0.5 * torch.randn(1, 1, d, generator=g)


@pytest.mark.parametrize("target", [2.0, 2.5, 3.0, 4.0, 5.0])
def test_rate_control_hits_target(target):
    """Every array byte (what a cache holds per chunk) within 2% of the target; the
    self-contained byte form adds its JSON header (~300 bytes per tensor)."""
    codec = C.get({"id": "ecco-eb", "target_bits": target})
    for seed in range(3):
        c = codec.encode(kv_like(3, 256, 64, seed), axis=1)
        held = 8.0 * c.payload_nbytes / c.numel
        assert abs(held - target) <= 0.02 * target, held
        assert c.bits_per_value <= held + 8.0 * 400 / c.numel


def test_rate_control_out_of_reach_keeps_quality():
    """Groups of 5 values cannot reach 2 bits/value (a block's header and padding codes
    cost more): the codec still returns the target's quality, not zeros."""
    x = torch.randn(40, 5)
    codec = C.get("eb2")
    y = codec.decode(codec.encode(x, axis=1))
    assert float(((y - x) ** 2).mean() / x.var()) < 0.3


# ------------------------------------------------------------------ corrupt data


def _enc(seed: int = 0) -> tuple[EccoEbCodec, Compressed]:
    codec = C.get("eb3")
    return codec, codec.encode(kv_like(2, 1024, 64, seed), axis=1)


def _with(c: Compressed, **arrays: np.ndarray) -> Compressed:
    a = {k: v.copy() for k, v in c.arrays.items()}
    a.update(arrays)
    return Compressed(c.codec_config, c.shape, c.dtype, c.axis, a, dict(c.meta))


def test_truncated_index_rejected():
    codec, c = _enc()
    with pytest.raises(CodecError, match="index"):
        codec.decode(_with(c, index=c.arrays["index"][:-1].copy()))


def test_index_outside_data_rejected():
    codec, c = _enc()
    idx = c.arrays["index"].copy()
    idx[-1] = np.uint32(c.arrays["data"].size * 64 + 640)
    with pytest.raises(CodecError, match="truncated or mismatched"):
        codec.decode(_with(c, index=idx))
    with pytest.raises(CodecError, match="truncated or mismatched"):
        codec.decode(_with(c, data=c.arrays["data"][: c.arrays["data"].size // 2].copy()))


def test_overlapping_blocks_rejected():
    codec, c = _enc()
    idx = c.arrays["index"].copy()
    idx[3] = idx[3] - np.uint32(40)  # group 3 starts inside group 2's last block
    with pytest.raises(CodecError, match="corrupt"):
        codec.decode(_with(c, index=idx))
    idx = c.arrays["index"].copy()
    idx[2], idx[3] = idx[3], idx[2]  # not increasing
    with pytest.raises(CodecError, match="not increasing"):
        codec.decode(_with(c, index=idx))


def test_flipped_bits_never_decode_silently_wrong_lengths():
    """Random bit flips in the data either raise CodecError or decode (a flip inside a
    code changes values, as in any entropy-coded format; the container's checksum is what
    catches those) -- never a crash, never a read outside the buffer."""
    codec, c = _enc(3)
    rng = np.random.default_rng(0)
    nbits = int(c.arrays["index"][-1])
    raised = 0
    for _ in range(200):
        d = c.arrays["data"].copy()
        p = int(rng.integers(0, nbits))
        d[p // 64] ^= np.uint64(1) << np.uint64(p % 64)
        try:
            codec.decode(_with(c, data=d))
        except CodecError:
            raised += 1
    assert raised > 0


def test_bytes_round_trip_and_checksum():
    codec, c = _enc(5)
    b = bytearray(c.to_bytes())
    assert torch.equal(C.decode_bytes(bytes(b)), codec.decode(c))
    b[len(b) // 2] ^= 0x10
    with pytest.raises(CodecError, match="checksum"):
        C.from_bytes(bytes(b))


def test_field_widths_validated():
    codec, c = _enc()
    with pytest.raises(CodecError, match="field widths"):
        codec.decode(_with(c, fields=np.array([3, 40], np.uint8)))
    with pytest.raises(CodecError, match="step"):
        codec.decode(_with(c, params=np.array([np.inf, 0.1], np.float32)))


def test_partial_groups_and_every_axis_decode_in_layout():
    x = kv_like(3, 200, 70, 9)
    for axis in (0, 1, 2):
        codec = C.get({"id": "ecco-eb", "bound": 0.02})
        y = codec.decode(codec.encode(x, axis=axis))
        rows = to_rows(x, Layout(tuple(x.shape), axis, 128))
        assert rows.shape[1] == 128
        assert float((y - x).abs().max()) <= 0.02 * float(x.max() - x.min())
