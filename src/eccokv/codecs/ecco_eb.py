"""ecco-eb: error-bounded, variable-rate entropy coding (KVComp/PackKV's store stage on
Ecco's decode core).

Every decoded value is within the bound of its input: |x - x_hat| <= bound ("absolute")
or <= bound * (max - min of the value's group of 128) ("relative"). Per group, values are
quantised on a uniform grid whose step is the largest of the tensor's step codes that
keeps the bound (uniform steps are what entropy-coded scalar quantisation wants), offset
by the group's centre, and the codes are Huffman-coded with the cheapest of 14 shared
codebooks. Groups whose codes do not fit the 64-symbol alphabet use fixed-width codes;
groups the grid cannot hold within the bound are stored exactly. Blocks have variable
size and an offset index (one entry per 8 blocks) keeps random access and parallel
decoding; every byte (index, per-tensor fields) is counted in bits/value.

target_bits: instead of a stated bound, encode picks the absolute bound of each tensor
(each chunk of a cache stream) so that its bits/value meets the target (a secant search
on the exact planned size; within 1%).

With a float16/bfloat16 tensor, the bound is kept for the values decoded into float32
and into the tensor's own dtype: the step leaves room for the output rounding (half a
unit in the last place at the group's largest magnitude), and every block is checked
after encoding by decoding it into that dtype; a block that would break the bound is
stored exactly. Format: `kernels/eb_core.py`, docs/format.md section 4.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

from eccokv.codecs import register
from eccokv.codecs.base import (
    Codec,
    CodecError,
    Compressed,
    Layout,
    check_input,
    decode_blocks_into,
    make_compressed,
    normalize_axis,
    to_rows,
)
from eccokv.entropy.huffman import encode_table, huffman_lengths, multi_decode_table
from eccokv.kernels.eb_core import (
    CB_BITS,
    CB_EXACT,
    LEN_BITS,
    MAX_LEN,
    NCODEBOOKS,
    NSYM,
    SB_BLOCKS,
    STEP_RES,
    G,
)
from eccokv.kernels.ecco_core import MULTI_BITS

KB_BITS = 8  # step code width when a tensor's blocks need more than one step
KMAX = (1 << KB_BITS) - 1
# half a unit in the last place, relative to the magnitude, of the output dtype
_HALF_ULP = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
_F32_SLACK = 2.0 ** -22  # float32 arithmetic of the decoder (three roundings), relative
BOUND_MODES = ("relative", "absolute")
TARGET_TOL = 0.01  # target_bits: relative tolerance of the achieved rate
MAX_BITS = 2 ** 32 - 1  # the index holds uint32 bit offsets


def _f32_down(v: float) -> float:
    """The largest float32 <= v (v > 0)."""
    f = np.float32(v)
    if float(f) > v:
        f = np.nextafter(f, np.float32(0))
    return float(f)


def _zigzag_probs(kind: str, scale: float) -> np.ndarray:
    """Probabilities of the 64 zigzag symbols for e = q - z drawn from a discretised
    Laplacian ("lap") or Gaussian ("gau") of the given scale, in steps."""
    e = np.arange(-(NSYM // 2), NSYM // 2, dtype=np.float64)
    p = np.exp(-np.abs(e) / scale) if kind == "lap" else np.exp(-0.5 * (e / scale) ** 2)
    p = p / p.sum()
    out = np.empty(NSYM)
    for i, ev in enumerate(e.astype(np.int64)):
        out[2 * ev if ev >= 0 else -2 * ev - 1] = p[i]
    return out


# the shared codebooks: Laplacian and Gaussian shapes over a range of widths (docs/format.md)
CODEBOOK_SHAPES: tuple[tuple[str, float], ...] = tuple(
    [("lap", float(s)) for s in np.geomspace(0.3, 9.0, 7)]
    + [("gau", float(s)) for s in np.geomspace(0.6, 11.0, 7)])


@functools.lru_cache(maxsize=1)
def codebooks() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lengths (14, 64) int64, LSB-first codes (14, 64) int64, multi-symbol tables
    (14 << MULTI_BITS,) uint32) of the shared codebooks, read-only."""
    lens = np.stack([huffman_lengths(np.maximum(_zigzag_probs(k, s) * 2.0 ** 24, 1.0), MAX_LEN)
                     for k, s in CODEBOOK_SHAPES]).astype(np.int64)
    assert lens.shape == (NCODEBOOKS, NSYM)
    codes = np.stack([encode_table(ln) for ln in lens]).astype(np.int64)
    mtab = np.concatenate([multi_decode_table(ln, MULTI_BITS) for ln in lens])
    for a in (lens, codes, mtab):
        a.setflags(write=False)
    return lens, codes, mtab


@functools.lru_cache(maxsize=1)
def _kernel_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sbase float64 (256,), lens uint8 (14 * 64,), mtab) for the decoders."""
    lens, _, mtab = codebooks()
    sbase = np.exp2(-np.arange(KMAX + 1, dtype=np.float64) / STEP_RES)
    l8 = np.ascontiguousarray(lens.reshape(-1).astype(np.uint8))
    for a in (sbase, l8):
        a.setflags(write=False)
    return sbase, l8, mtab


@register
class EccoEbCodec(Codec):
    """Error-bounded variable-rate codec. Config keys: bound (> 0), bound_mode
    ("relative": a fraction of each group's range, at most 0.5; "absolute": a value),
    target_bits (None, or a bits/value target in [1.5, 16] that replaces the bound:
    encode searches each tensor's absolute bound), group_size (128)."""

    codec_id = "ecco-eb"
    group_size = G

    def __init__(self, bound: float = 0.05, bound_mode: str = "relative",
                 target_bits: float | None = None, group_size: int = G) -> None:
        if group_size != G:
            raise ValueError(f"ecco-eb groups hold exactly {G} values, got {group_size}")
        if bound_mode not in BOUND_MODES:
            raise ValueError(f"bound_mode must be one of {BOUND_MODES}, got {bound_mode!r}")
        if isinstance(bound, bool) or not isinstance(bound, (int, float)):
            raise TypeError(f"bound must be a number, got {type(bound).__name__}")
        bound = float(bound)
        if not (math.isfinite(bound) and bound > 0):
            raise ValueError(f"bound must be finite and > 0, got {bound}")
        if bound_mode == "relative" and bound > 0.5:
            raise ValueError(f"a relative bound is a fraction of each group's range, at most "
                             f"0.5, got {bound}")
        if target_bits is not None:
            if isinstance(target_bits, bool) or not isinstance(target_bits, (int, float)):
                raise TypeError(f"target_bits must be a number, got {type(target_bits).__name__}")
            target_bits = float(target_bits)
            if not (math.isfinite(target_bits) and 1.5 <= target_bits <= 16.0):
                raise ValueError(f"target_bits must be in [1.5, 16], got {target_bits}")
            bound_mode = "absolute"
        self.bound = bound
        self.bound_mode = bound_mode
        self.target_bits = target_bits

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "bound": self.bound, "bound_mode": self.bound_mode,
                "target_bits": self.target_bits, "group_size": G}

    # -- arrays -------------------------------------------------------------------------
    def expected_arrays(self, c: Compressed) -> dict[str, tuple[Any, tuple[int, ...]]]:
        lay = Layout(c.shape, c.axis, G)
        nsb = -(-lay.nblocks // SB_BLOCKS) if lay.nblocks else 0
        index = c.arrays.get("index")
        ndata = 1  # the data holds exactly the index's total bits, plus one word
        if (isinstance(index, np.ndarray) and index.dtype == np.uint32
                and index.shape == (nsb + 1,)):
            ndata = -(-int(index[-1]) // 64) + 1
        return {"index": (np.uint32, (nsb + 1,)), "data": (np.uint64, (ndata,)),
                "params": (np.float32, (2,)), "fields": (np.uint8, (2,))}

    def validate(self, c: Compressed) -> None:
        from eccokv.kernels.eb_numba import check_blocks

        super().validate(c)
        data, index = c.arrays["data"], c.arrays["index"]
        d0, bound = (float(v) for v in c.arrays["params"])
        KB, ZB = (int(v) for v in c.arrays["fields"])
        if KB not in (0, KB_BITS) or not 0 <= ZB <= 31:
            raise CodecError(f"ecco-eb: invalid field widths KB={KB}, ZB={ZB}")
        if not (math.isfinite(d0) and d0 > 0 and math.isfinite(bound) and bound >= 0):
            raise CodecError(f"ecco-eb: invalid step {d0} or bound {bound}")
        lay = Layout(c.shape, c.axis, G)
        if lay.nblocks == 0:
            return
        idx = index.astype(np.int64)
        if idx[0] != 0 or np.any(np.diff(idx) < 0):
            raise CodecError("ecco-eb: the offset index is not increasing from 0 (corrupt)")
        bad = check_blocks(data, index, lay.nblocks, lay.ngroups,
                           lay.length - (lay.ngroups - 1) * G, KB, ZB)
        if bad >= 0:
            raise CodecError(f"ecco-eb: block {bad} of {lay.nblocks} is corrupt (its length "
                             "field does not match its mode or the offset index: truncated, "
                             "overlapping or foreign data)")

    # -- encode -------------------------------------------------------------------------
    def _stats(self, groups: np.ndarray, lay: Layout) -> tuple[np.ndarray, ...]:
        """Per block: number of valid values, min, max, abs-max (valid values only)."""
        nb = groups.shape[0]
        nvalid = np.full(nb, G, np.int64)
        last = lay.length - (lay.ngroups - 1) * G
        nvalid[lay.ngroups - 1::lay.ngroups] = last
        if last < G:
            m = np.arange(G)[None, :] < nvalid[:, None]
            mn = np.where(m, groups, np.inf).min(axis=1)
            mx = np.where(m, groups, -np.inf).max(axis=1)
        else:
            mn, mx = groups.min(axis=1), groups.max(axis=1)
        amax = np.maximum(np.abs(mn), np.abs(mx)).astype(np.float64)
        return nvalid, mn.astype(np.float64), mx.astype(np.float64), amax

    def _plan(self, groups: np.ndarray, lay: Layout, bnd: np.ndarray, amax: np.ndarray,
              dtype: torch.dtype, force: np.ndarray) -> dict[str, Any]:
        from eccokv.kernels.eb_numba import plan_blocks

        # output rounding: a value v whose half-ulp exceeds half the bound rounds back to
        # v itself when the float32 error is below half the bound; smaller values add at
        # most their half-ulp (<= the group's largest) -- docs/format.md section 5
        half_ulp = amax * _HALF_ULP[dtype]
        if dtype == torch.float16:
            half_ulp = half_ulp + 2.0 ** -25  # half of float16's smallest subnormal
        slack = np.minimum(half_ulp, 0.5 * bnd) + (amax + bnd) * _F32_SLACK
        dt = 2.0 * (bnd - slack)
        pos = dt[dt > 0]
        d0 = 1.0
        if pos.size:
            # every block can take one step: no step codes (KB = 0); else the largest
            top = pos.min() if pos.max() < pos.min() * 2.0 ** (1.0 / STEP_RES) else pos.max()
            d0 = _f32_down(min(top, float(np.finfo(np.float32).max)))
        sbase, _, _ = _kernel_tables()
        lens, _, _ = codebooks()
        nb = groups.shape[0]
        k = np.empty(nb, np.int64)
        z = np.empty(nb, np.int64)
        cb = np.empty(nb, np.int64)
        w = np.empty(nb, np.int64)
        pay = np.empty(nb, np.int64)
        nlast = lay.length - (lay.ngroups - 1) * G
        plan_blocks(groups, nlast, lay.ngroups, bnd, dt, d0, sbase, KMAX, lens, force, k, z, cb,
                    w, pay)
        inexact = cb != CB_EXACT
        KB = KB_BITS if np.any(k[inexact] > 0) else 0
        zi = z[inexact]
        zneed = int(max(int(zi.max(initial=0)), int(-zi.min(initial=0)) - 1, 0))
        ZB = zneed.bit_length() + 1 if np.any(zi != 0) else 0
        bits = LEN_BITS + CB_BITS + pay + np.where(inexact, KB + ZB, 0)
        starts = np.zeros(nb + 1, np.int64)
        np.cumsum(bits, out=starts[1:])
        return {"k": k, "z": z, "cb": cb, "w": w, "KB": KB, "ZB": ZB, "starts": starts,
                "d0": d0, "force": force}

    @staticmethod
    def _block_bits(plan: dict[str, Any], nb: int) -> int:
        """Bits that grow with the tensor: the blocks (in whole words) and the index. The
        per-tensor constants (step, bound, field widths, the data's extra word: 208 bits)
        are left out of rate control (0.004 bits/value for a 256-token cache chunk of
        SmolLM2) but counted in every reported rate."""
        nsb = -(-nb // SB_BLOCKS)
        return 64 * -(-int(plan["starts"][-1]) // 64) + 32 * (nsb + 1)

    def encode(self, x: torch.Tensor, axis: int = -1,
               row_scale: Any = None) -> Compressed:
        """Compress x in groups of 128 along axis. row_scale (rows,) > 0, optional: each
        row's bound is multiplied by its entry (rows = the layout's rows: for [H, T, D]
        over tokens, the H * D channels), so that bits go where errors cost more (e.g. key
        channels weighted by their queries' second moment); decoding does not need it."""
        rs = None
        if row_scale is not None:
            if isinstance(row_scale, torch.Tensor):
                row_scale = row_scale.detach().cpu().to(torch.float64).numpy()
            rs = np.ascontiguousarray(np.asarray(row_scale, dtype=np.float64).reshape(-1))
            if not (np.all(np.isfinite(rs)) and np.all(rs > 0)):
                raise ValueError("row_scale must be finite and > 0 everywhere")
        x = check_input(x)
        ax = normalize_axis(axis, x.dim())
        return self._encode_rows(x.contiguous(), tuple(x.shape), ax, rs)

    def _encode(self, x: torch.Tensor, shape: tuple[int, ...], axis: int) -> Compressed:
        return self._encode_rows(x, shape, axis, None)

    def _encode_rows(self, x: torch.Tensor, shape: tuple[int, ...], axis: int,
                     rs: np.ndarray | None) -> Compressed:
        lay = Layout(shape, axis, G)
        if rs is not None and rs.size != lay.rows:
            raise ValueError(f"row_scale has {rs.size} entries; the tensor of shape {shape} "
                             f"grouped along axis {axis} has {lay.rows} rows")
        rowmul = None if rs is None else np.repeat(rs, lay.ngroups)
        if lay.nblocks == 0:
            arrays = {"data": np.zeros(1, np.uint64), "index": np.zeros(1, np.uint32),
                      "params": np.array([1.0, 0.0], np.float32),
                      "fields": np.zeros(2, np.uint8)}
            return make_compressed(self, shape, x.dtype, axis, arrays)
        groups = to_rows(x, lay)
        nvalid, mn, mx, amax = self._stats(groups, lay)
        force = np.zeros(lay.nblocks, np.uint8)
        if self.target_bits is not None:
            bound, plan = self._search(groups, lay, amax, x.dtype, force, lay.numel, rowmul)
            bnd = np.full(lay.nblocks, bound)
        else:
            bound = self.bound
            bnd = bound * (mx - mn) if self.bound_mode == "relative" else np.full(
                lay.nblocks, bound)
        if rowmul is not None:
            bnd = bnd * rowmul
        if self.target_bits is None:
            plan = self._plan(groups, lay, bnd, amax, x.dtype, force)
        c = self._write(groups, lay, plan, bound, shape, x.dtype, axis)
        if x.dtype != torch.float32:  # output rounding: check the decoded dtype values
            viol = self._violations(c, x, lay, bnd)
            if viol.any():
                force = viol.astype(np.uint8)
                plan = self._plan(groups, lay, bnd, amax, x.dtype, force)
                c = self._write(groups, lay, plan, bound, shape, x.dtype, axis)
        return c

    def _violations(self, c: Compressed, x: torch.Tensor, lay: Layout,
                    bnd: np.ndarray) -> np.ndarray:
        """Blocks with a value decoded into x's dtype farther than the bound from x."""
        got = self.decode(c)
        err = (got.to(torch.float64) - x.to(torch.float64)).abs()
        eg = to_rows(err, lay).astype(np.float64)  # zero-padded: padding never violates
        return (eg > bnd[:, None]).any(axis=1)

    def _write(self, groups: np.ndarray, lay: Layout, plan: dict[str, Any], bound: float,
               shape: tuple[int, ...], dtype: torch.dtype, axis: int) -> Compressed:
        from eccokv.kernels.eb_numba import write_blocks

        starts = plan["starts"]
        total = int(starts[-1])
        if total > MAX_BITS:
            raise ValueError(f"ecco-eb: the compressed tensor would take {total} bits, more "
                             f"than the format's {MAX_BITS} (512 MiB): compress it in parts")
        words = np.zeros(-(-total // 64) + 1, np.uint64)
        sbase, _, _ = _kernel_tables()
        lens, codes, _ = codebooks()
        nlast = lay.length - (lay.ngroups - 1) * G
        write_blocks(groups, nlast, lay.ngroups, starts, plan["KB"], plan["ZB"], plan["d0"],
                     sbase, plan["k"], plan["z"], plan["cb"], plan["w"], codes, lens, words)
        index = np.ascontiguousarray(np.append(starts[:-1:SB_BLOCKS], total).astype(np.uint32))
        arrays = {"data": words, "index": index,
                  "params": np.array([plan["d0"], min(bound, np.finfo(np.float32).max)],
                                     np.float32),
                  "fields": np.array([plan["KB"], plan["ZB"]], np.uint8)}
        return make_compressed(self, shape, dtype, axis, arrays)

    def _search(self, groups: np.ndarray, lay: Layout, amax: np.ndarray, dtype: torch.dtype,
                force: np.ndarray, numel: int, rowmul: np.ndarray | None = None
                ) -> tuple[float, dict[str, Any]]:
        """The absolute bound whose planned size is closest to target_bits (secant search
        in log2(bound); rate falls by about one bit per doubling of the bound)."""
        target = float(self.target_bits)  # type: ignore[arg-type]
        nb = groups.shape[0]
        top = float(amax.max())
        if not top > 0:  # all zeros: any bound gives constant blocks
            plan = self._plan(groups, lay, np.full(groups.shape[0], 1.0), amax, dtype, force)
            return 1.0, plan
        # a robust scale (an outlier must not set the start): median absolute deviation
        flat = groups.reshape(-1)[:: max(1, groups.size // 65536)].astype(np.float64)
        sd = 1.4826 * float(np.median(np.abs(flat - np.median(flat)))) or float(
            np.std(flat)) or top
        # beyond the largest magnitude every code is 0: no larger bound is useful
        hi = math.log2(top)
        lb = min(hi, math.log2(sd) + 1.05 - target)  # ECSQ: rate ~ h(X) - log2(2 bound)
        tried: list[tuple[float, float, dict[str, Any]]] = []
        mul = np.ones(nb) if rowmul is None else rowmul

        def rate(lb_: float) -> float:
            plan = self._plan(groups, lay, 2.0 ** lb_ * mul, amax, dtype, force)
            r = self._block_bits(plan, nb) / numel
            tried.append((lb_, r, plan))
            return r

        # bracket the target (rate falls by about one bit per doubling of the bound), then
        # regula falsi (Illinois) inside the bracket on the exact planned sizes
        r = rate(lb)
        below: tuple[float, float] | None = (lb, r) if r <= target else None
        above: tuple[float, float] | None = (lb, r) if r > target else None
        for _ in range(12):
            if below is not None and above is not None:
                break
            if above is None:  # rate too low: smaller bound
                lb = lb - max(1.0, target - r)
            else:
                if lb >= hi:
                    break  # out of reach even at the largest useful bound
                lb = min(hi, lb + max(1.0, r - target))
            r = rate(lb)
            if r <= target:
                below = (lb, r)
            else:
                above = (lb, r)
        side = 0
        for _ in range(14):
            if below is None or above is None or abs(tried[-1][1] - target) <= (
                    TARGET_TOL * target):
                break
            (l0, r0), (l1, r1) = above, below
            lb = l0 + (l1 - l0) * (r0 - target) / (r0 - r1) if r0 != r1 else 0.5 * (l0 + l1)
            if not min(l0, l1) < lb < max(l0, l1):
                lb = 0.5 * (l0 + l1)
            r = rate(lb)
            if r <= target:
                below = (lb, r)
                if side == -1:  # Illinois: halve the stale end's weight
                    above = (above[0], target + 0.5 * (above[1] - target))
                side = -1
            else:
                above = (lb, r)
                if side == 1:
                    below = (below[0], target - 0.5 * (target - below[1]))
                side = 1
        # the closest at or below target + tolerance. Out of reach (groups much shorter
        # than 128 values pay a block's header and padding codes for a few values): the
        # bound the target gives full groups, not the coarsest bound (which would decode
        # to zeros); the rate is reported as it is
        ok = [t for t in tried if t[1] <= target * (1 + TARGET_TOL)]
        best = min(ok, key=lambda t: abs(t[1] - target)) if ok else tried[0]
        return 2.0 ** best[0], best[2]

    # -- decode -------------------------------------------------------------------------
    def _decode(self, c: Compressed, out: torch.Tensor) -> None:
        from eccokv.kernels.eb_numba import decode_blocks

        lay = Layout(c.shape, c.axis, G)
        sbase, l8, mtab = _kernel_tables()
        KB, ZB = (int(v) for v in c.arrays["fields"])
        d0 = np.float64(c.arrays["params"][0])
        decode_blocks_into(
            out, lay.nblocks,
            lambda arr, kind, bad: decode_blocks(c.arrays["data"], c.arrays["index"],
                                                 lay.nblocks, KB, ZB, d0, sbase, mtab, l8,
                                                 lay.length, lay.ngroups, lay.suffix, arr,
                                                 kind, bad),
            "ecco-eb blocks are corrupt: a code stream does not end at its block's end")
