"""Attention straight from a compressed KV cache: `fused_attention` and its reference.

The cache holds, per layer and batch element, K as a list of compressed chunks (each a
`Compressed` of shape [Hkv, Tc, D]) followed by an exact tail [Hkv, Te, D]; V the same,
possibly with another codec and other chunk boundaries but the same total length T.
`fused_attention` computes softmax(q K^T * scaling + mask) V without ever materialising
the decoded K or V: every compressed block is decoded once per query tile, in code space,
into a per-thread buffer and used at once by all the query heads that share its KV head
(numba kernels in `attention_numba.py`). `reference_attention` decodes, concatenates,
repeats the KV heads and runs the same maths in float32 (or torch SDPA): the
"decode-then-attention" path the fused one must match to 1e-4 (relative, fp32).

Supported compressed chunks (see `fused_supported`): Ecco (`ecco4/3/2`, any profile)
grouped over tokens (axis 1 of [Hkv, T, D]); int codecs (`int2/3/4/8`, `kivi2/3/4`, any
group size) grouped over tokens (axis 1, KIVI's key layout) or over channels (axis 2,
KIVI's value layout). Anything else raises `FusedAttentionUnsupported` (a ValueError), so
the caller can fall back to `reference_attention`. This module imports no transformers.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import operator
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numba
import numpy as np
import torch

from eccokv import codecs
from eccokv.codecs.base import SUPPORTED_DTYPES, Codec, CodecError, Compressed, check_input

__all__ = [
    "FusedAttentionUnsupported",
    "fused_attention",
    "fused_supported",
    "reference_attention",
    "unsupported_reason",
]

KIND_ECCO, KIND_INT_TOKENS, KIND_INT_CHANNELS, KIND_EB = 0, 1, 2, 3  # kernel stream kinds
_BLOCK_KINDS = (KIND_ECCO, KIND_EB)  # 128-token blocks through a decode core
_NCOLS = 12  # columns of a chunk row (attention_numba's module docstring)
_EXACT_SPAN = 64  # tokens per work item of the exact tail
_INT_CH_SPAN = 64  # tokens per work item of an int chunk grouped over channels
_V_SPAN = 256  # tokens per V work item of an int chunk grouped over channels
MAX_TILE_ROWS = 128  # query rows (n_rep * queries) decoded against per block
# Scores/weights scratch per context block: the context is attended to in blocks of about
# this many bytes of S [Hkv, R, block] (cut at group boundaries of both streams) and the
# blocks' outputs are merged through their log-sum-exp (online softmax), so scratch does
# not grow with the context and P stays in L2 for the V pass (see docs/format.md).
S_BLOCK_BYTES = 2 << 20


class FusedAttentionUnsupported(ValueError):
    """The (codec, axis) of a chunk has no fused kernel: use `reference_attention`."""


# ----------------------------------------------------------------------------- support


def _config_of(codec: str | dict[str, Any] | Codec) -> dict[str, Any]:
    if isinstance(codec, Codec):
        return codec.get_config()
    if isinstance(codec, str):
        return codecs.get(codec).get_config()
    if isinstance(codec, dict):
        return codec
    raise TypeError(f"codec must be a name, a config dict or a Codec, got {type(codec).__name__}")


def unsupported_reason(codec: str | dict[str, Any] | Codec, axis: int) -> str | None:
    """Why chunks of shape [Hkv, T, D] made by `codec` with `axis` cannot take the fused
    path, or None if they can. `axis` may be negative (-2 == 1, -1 == 2)."""
    try:
        cfg = _config_of(codec)
    except (KeyError, TypeError, ValueError) as e:
        return f"unknown codec ({e})"
    cid = cfg.get("id")
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool) or not -3 <= axis < 3:
        return f"axis {axis!r} is not an axis of a [Hkv, T, D] chunk"
    ax = int(axis) % 3
    if cid in ("ecco", "ecco-eb"):
        if ax != 1:
            return (f"{cid} chunks must be grouped over tokens (axis 1 of [Hkv, T, D]), "
                    f"got axis {ax}")
        return None
    if cid == "int":
        if ax not in (1, 2):
            return f"int chunks must be grouped along axis 1 (tokens) or 2 (channels), got {ax}"
        return None
    return f"codec {cid!r} has no fused attention kernel (supported: ecco, ecco-eb, int)"


def fused_supported(codec: str | dict[str, Any] | Codec, axis: int) -> bool:
    """True if chunks [Hkv, T, D] made by `codec` grouped along `axis` can be attended to by
    `fused_attention` (Ecco and ecco-eb on axis 1; int/KIVI on axis 1 or 2)."""
    return unsupported_reason(codec, axis) is None


# ----------------------------------------------------------------------------- codec cache

_CODECS: OrderedDict[Any, Codec] = OrderedDict()
_CODECS_MAX = 64
_LOCK = threading.Lock()

_F32 = np.zeros(1, np.float32)
_U8 = np.zeros(1, np.uint8)
_NO_ITEMS = tuple(np.zeros(0, np.int64) for _ in range(4))
_NO_CHUNKS = np.zeros((0, _NCOLS), np.int64)
_NO_TSC = np.zeros(0, np.float64)


def _key(cfg: dict[str, Any]) -> Any:
    try:
        return tuple(sorted(cfg.items()))
    except TypeError:  # unhashable or unorderable values
        return json.dumps(cfg, sort_keys=True, default=str)


def _codec_for(cfg: dict[str, Any]) -> Codec:
    """The codec of a chunk's config, built once (an LRU of `_CODECS_MAX` configs: configs
    come from data, so their number is not ours to bound)."""
    k = _key(cfg)
    with _LOCK:
        c = _CODECS.get(k)
        if c is not None:
            _CODECS.move_to_end(k)
            return c
    try:
        c = codecs.get(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise CodecError(f"cannot build the codec {cfg} of the compressed data: {e}") from e
    with _LOCK:
        _CODECS[k] = c
        while len(_CODECS) > _CODECS_MAX:
            _CODECS.popitem(last=False)
    return c


def _ecco_consts(codec: Codec) -> tuple[Any, ...]:
    """(EccoTables,) of an Ecco codec: the frozen tables the shared decode core reads."""
    return (codec.kernel_tables(),)  # type: ignore[attr-defined]


@lru_cache(maxsize=1)
def _no_ecco() -> tuple[Any, ...]:
    """Tables of the same numba type for streams without Ecco chunks (never read)."""
    return _ecco_consts(codecs.get("ecco4"))


# ----------------------------------------------------------------------------- streams


@dataclass
class _Stream:
    """One validated K or V stream, ready for the kernels."""

    name: str
    Hkv: int
    D: int
    kind: int = KIND_ECCO
    ch: np.ndarray = field(default_factory=lambda: _NO_CHUNKS)  # shared, never written
    tsc: np.ndarray = field(default_factory=lambda: _NO_TSC)
    consts: tuple[Any, ...] = ()
    G: int = 128
    bits: int = 4
    Tc: int = 0  # compressed tokens
    exact: np.ndarray = field(default_factory=lambda: _F32)
    Te: int = 0
    keep: list[Any] = field(default_factory=list)  # keeps chunk arrays alive
    lengths: tuple[int, ...] = ()  # the chunks' token counts (ch[:, 3])

    @property
    def T(self) -> int:
        return self.Tc + self.Te


def _addr(a: np.ndarray) -> int:
    return int(a.ctypes.data)


_MEMO = "_eccokv_fused"  # attribute of a Compressed validated for the kernels


def _memo(c: Compressed, codec: Codec) -> tuple[list[int], float, list[np.ndarray]] | None:
    """The kernel row of a chunk validated earlier for `codec`, if its arrays are still the
    very (read-only) arrays that were validated; else None (validate again)."""
    m = c.__dict__.get(_MEMO)
    if m is None or m[0] is not codec or m[1] is not c.arrays or len(m[2]) != len(c.arrays):
        return None
    for a, b in zip(m[2], c.arrays.values(), strict=True):
        if a is not b or b.flags.writeable:
            return None
    return m[3]


def _eb_tables() -> tuple[np.ndarray, ...]:
    """The ecco-eb decode tables (read-only, alive for the process) at the sizes the
    kernels assume."""
    from eccokv.codecs.ecco_eb import _kernel_tables
    from eccokv.kernels import attention_numba as kn

    sbase, lens, mtab = _kernel_tables()
    if (sbase.size != kn.EB_STEPS or mtab.size != kn.EB_MTAB or lens.size != kn.EB_LENS
            or sbase.dtype != np.float64 or mtab.dtype != np.uint32 or lens.dtype != np.uint8):
        raise CodecError("ecco-eb tables do not fit the fused kernels")
    return sbase, mtab, lens


def _remember(c: Compressed, codec: Codec, cid: str) -> tuple[list[int], float,
                                                              list[np.ndarray]]:
    """Validated once: make the chunk's arrays read-only (so they cannot change under the
    memo) and keep its kernel row on the chunk, so later steps skip validation (a 4K-token
    cache has ~32 chunks per stream and layer: re-validating them took ~28% of a fused
    attention call here)."""
    a = c.arrays
    for x in a.values():
        x.setflags(write=False)
    if cid == "ecco":
        memo = ([_addr(a["blocks"]), 0, 0, 0, 0, 0, a["blocks"].size, 0, 0, 0, 0, 0],
                float(a["tscale"][0]), [a["blocks"]])
    elif cid == "ecco-eb":
        sb, mt, ln = _eb_tables()
        kb, zb = (int(v) for v in a["fields"])
        memo = ([_addr(a["data"]), _addr(a["index"]), 0, 0, 0, 0, a["data"].size,
                 a["index"].size, _addr(sb), _addr(mt), _addr(ln), kb | zb << 8],
                float(a["params"][0]), [a["data"], a["index"], sb, mt, ln])
    else:
        is32 = int(a["scale"].dtype == np.float32)
        memo = ([_addr(a["codes"]), _addr(a["scale"]), _addr(a["zero"]), 0, 0, is32,
                 a["codes"].size, a["scale"].size, 0, 0, 0, 0], 0.0,
                [a["codes"], a["scale"], a["zero"]])
    c.__dict__[_MEMO] = (codec, a, tuple(a.values()), memo)
    return memo


_SMEMO = "_eccokv_streams"  # attribute of a stream's last chunk: streams ending with it
_SMEMO_SIZE = 4
_FIELDS = operator.attrgetter("codec_config", "shape", "axis", "arrays")
_VALUES = operator.methodcaller("values")
_WRITEABLE = operator.attrgetter("flags.writeable")


def _stream_state(chunks: Sequence[Compressed]) -> list[Any]:
    """Everything a validated stream depends on, for identity checks: per chunk its codec
    config, shape, axis and arrays dict, then every array (C-level iteration: ~0.2 us per
    chunk against ~3.5 us for a chunk's own memo check)."""
    fields = list(itertools.chain.from_iterable(map(_FIELDS, chunks)))
    arrays = list(itertools.chain.from_iterable(map(_VALUES, fields[3::4])))
    return fields + arrays


def _stream_memo(chunks: Sequence[Compressed]) -> tuple[Any, _Stream | None]:
    """(key, the chunk part of a stream prepared earlier from these very chunks, if none of
    them changed: same objects (weak references), same codec configs, shapes, axes, array
    dicts and arrays, all arrays still read-only); else (key, None). The memo lives on the
    stream's last chunk, so it goes when the chunks go."""
    key = tuple(map(id, chunks))
    memo = chunks[-1].__dict__.get(_SMEMO)
    hit = memo.get(key) if memo is not None else None
    if hit is None:
        return key, None
    refs, state, st = hit
    now = _stream_state(chunks)
    if (len(now) != len(state) or not all(map(operator.is_, map(operator.call, refs), chunks))
            or not all(map(operator.is_, now, state))
            or any(map(_WRITEABLE, state[4 * len(chunks):]))):
        memo.pop(key, None)
        return key, None
    return key, st


def _remember_stream(chunks: Sequence[Compressed], key: Any, st: _Stream) -> None:
    memo = chunks[-1].__dict__.setdefault(_SMEMO, OrderedDict())
    memo[key] = ([weakref.ref(c) for c in chunks], _stream_state(chunks), st)
    memo.move_to_end(key)
    while len(memo) > _SMEMO_SIZE:
        memo.popitem(last=False)


def _prepare_stream(chunks: Sequence[Compressed] | None, exact: torch.Tensor | None,
                    name: str) -> _Stream:
    """Validate a stream (every chunk through its codec's own checks, once: a stream whose
    chunks are the very chunks of an earlier call, unchanged, reuses that call's chunk
    table) and build the chunk table. Raises TypeError/ValueError/CodecError/
    FusedAttentionUnsupported."""
    if chunks is None:
        chunks = []
    if isinstance(chunks, Compressed) or not isinstance(chunks, (list, tuple)):
        raise TypeError(f"{name} chunks must be a list of Compressed, got {type(chunks).__name__}")
    key = None
    if chunks and all(isinstance(c, Compressed) for c in chunks):
        key, st0 = _stream_memo(chunks)
        if st0 is not None and st0.name == name:
            return _with_exact(copy.copy(st0), exact, name)
    st = _prepare_chunks(chunks, name)
    if key is not None:
        _remember_stream(chunks, key, st)
    return _with_exact(copy.copy(st), exact, name)


def _prepare_chunks(chunks: Sequence[Compressed], name: str) -> _Stream:
    """The chunk part of `_prepare_stream` (Hkv/D = -1 without chunks)."""
    Hkv = D = -1
    cfg: dict[str, Any] | None = None
    axis = -1
    codec: Codec | None = None
    rows: list[list[int]] = []
    tsc: list[float] = []
    keep: list[Any] = []
    t0 = 0
    for i, c in enumerate(chunks):
        if not isinstance(c, Compressed):
            raise TypeError(f"{name} chunk {i} is a {type(c).__name__}, not a Compressed")
        if len(c.shape) != 3:
            raise ValueError(f"{name} chunk {i} has shape {c.shape}; expected [Hkv, T, D]")
        if cfg is None:
            cfg, axis = c.codec_config, c.axis
            why = unsupported_reason(cfg, axis) if isinstance(cfg, dict) else "no codec config"
            if why is not None:
                raise FusedAttentionUnsupported(
                    f"{name} chunks: {why}; decode them and use reference_attention instead")
            codec = _codec_for(cfg)
            Hkv, D = c.shape[0], c.shape[2]
        elif c.codec_config != cfg or c.axis != axis:
            raise ValueError(f"{name} chunk {i} was made by {c.codec_config} on axis {c.axis}, "
                             f"chunk 0 by {cfg} on axis {axis}: all chunks of one stream must "
                             f"share one codec config and axis")
        assert codec is not None
        memo = _memo(c, codec)
        if memo is None:
            codec.check_compatible(c)
            codec.validate(c)
            memo = _remember(c, codec, cfg["id"])
        h, tc, d = c.shape
        if (h, d) != (Hkv, D):
            raise ValueError(f"{name} chunk {i} has shape {c.shape}, but chunk 0 has "
                             f"Hkv={Hkv}, D={D}")
        if tc == 0:
            continue
        row, ts, arrs = memo
        r = list(row)
        r[3], r[4] = tc, t0
        rows.append(r)
        tsc.append(ts)
        keep += arrs
        t0 += tc
    st = _Stream(name, Hkv, D, Tc=t0, keep=keep, consts=_no_ecco())
    if rows:
        assert codec is not None and cfg is not None
        st.ch = np.array(rows, dtype=np.int64)
        st.ch.setflags(write=False)
        st.tsc = np.array(tsc if tsc else [0.0] * len(rows), dtype=np.float64)
        st.lengths = tuple(r[3] for r in rows)
        if cfg["id"] == "ecco":
            st.kind = KIND_ECCO
            st.consts = _ecco_consts(codec)
        elif cfg["id"] == "ecco-eb":
            st.kind = KIND_EB
        else:
            st.kind = KIND_INT_TOKENS if axis == 1 else KIND_INT_CHANNELS
            st.G = int(codec.group_size)  # type: ignore[attr-defined]
            st.bits = int(codec.bits)  # type: ignore[attr-defined]
    return st


def _with_exact(st: _Stream, exact: torch.Tensor | None, name: str) -> _Stream:
    """`st` (a fresh copy) with the exact tail checked and attached."""
    Hkv, D = st.Hkv, st.D
    if exact is not None:
        if not isinstance(exact, torch.Tensor):
            raise TypeError(f"{name} exact tail must be a torch.Tensor, got "
                            f"{type(exact).__name__}")
        if exact.dim() != 3 or exact.dtype not in SUPPORTED_DTYPES or exact.is_complex():
            raise ValueError(f"{name} exact tail must be a float32/float16/bfloat16 tensor "
                             f"[Hkv, Te, D], got {exact.dtype} {tuple(exact.shape)}")
        if exact.device.type != "cpu":
            raise ValueError(f"{name} exact tail must be on the CPU")
        if Hkv < 0:
            Hkv, D = exact.shape[0], exact.shape[2]
        elif (exact.shape[0], exact.shape[2]) != (Hkv, D):
            raise ValueError(f"{name} exact tail has shape {tuple(exact.shape)}, but the "
                             f"chunks have Hkv={Hkv}, D={D}")
    if Hkv < 0:
        raise ValueError(f"{name}: give at least one chunk or an exact tail (its shape gives "
                         f"Hkv and D)")
    st.Hkv, st.D = Hkv, D
    if exact is not None and exact.shape[1] > 0:
        st.Te = int(exact.shape[1])
        st.exact = exact.detach().to(torch.float32).contiguous().reshape(-1).numpy()
    return st


def _spans(los: np.ndarray, his: np.ndarray, span: int, Hkv: int,
           chunk_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Work items (chunk, head, start, count) covering tokens lo .. hi-1 of each chunk in
    `span`-token pieces from lo."""
    los = np.asarray(los, np.int64)
    lengths = np.asarray(his, np.int64) - los
    nsp = (lengths + span - 1) // span
    per = nsp * Hkv
    tot = int(per.sum())
    c = np.repeat(chunk_ids.astype(np.int64), per)
    k = np.arange(tot, dtype=np.int64) - np.repeat(np.cumsum(per) - per, per)
    nsp_r = np.repeat(nsp, per)
    h = k // np.maximum(nsp_r, 1)
    s = (k % np.maximum(nsp_r, 1)) * span
    n = np.minimum(span, np.repeat(lengths, per) - s)
    return c, h, s + np.repeat(los, per), n


@lru_cache(maxsize=512)
def _chunk_items(lengths: tuple[int, ...], span: int, Hkv: int, a: int = 0,
                 b: int = -1) -> tuple[np.ndarray, ...]:
    """Work items (chunk, head, first token within the chunk, count) cutting each chunk's
    tokens inside the context block a .. b-1 (b < 0: all) into `span`-token pieces per KV
    head (cached: a stream's chunks change only when one is appended). The exact tail's
    items are derived inside the kernels."""
    L = np.array(lengths, np.int64)
    t0 = np.cumsum(L) - L
    if b < 0:
        lo, hi = np.zeros_like(L), L
    else:
        lo = np.clip(a - t0, 0, L)
        hi = np.clip(b - t0, 0, L)
    keep = hi > lo
    items = _spans(lo[keep], hi[keep], span, Hkv, np.flatnonzero(keep))
    return tuple(np.ascontiguousarray(x) for x in items)  # callers never write to them


def _k_span(st: _Stream, nthreads: int, ntok: int) -> int:
    """Tokens per K work item for a block of ntok compressed tokens."""
    if st.kind in _BLOCK_KINDS:
        # up to 8 token groups per item (each channel's blocks are then read in order),
        # while leaving >= 4 items per thread
        groups = -(-ntok // 128) * st.Hkv
        return 128 * max(1, min(8, groups // (4 * nthreads)))
    if st.kind == KIND_INT_TOKENS:
        return st.G * max(1, 128 // st.G)
    return _INT_CH_SPAN


def _lengths(st: _Stream) -> tuple[int, ...]:
    return st.lengths


def _gran(st: _Stream) -> int:
    """Token granularity of a stream's groups: context blocks are cut only there."""
    return 128 if st.kind in _BLOCK_KINDS else st.G if st.kind == KIND_INT_TOKENS else 1


@lru_cache(maxsize=256)
def _cuts_of(lengths: tuple[int, ...], gran: int) -> np.ndarray:
    """Token positions inside the compressed part of a stream where a context block may
    start: chunk starts and group starts within chunks (sorted, > 0)."""
    pos = []
    t0 = 0
    for n in lengths:
        pos.append(np.arange(t0, t0 + n, gran, dtype=np.int64))
        t0 += n
    pos.append(np.array([t0], np.int64))
    p = np.concatenate(pos)
    return p[p > 0]


@lru_cache(maxsize=256)
def _common_cuts(kl: tuple[int, ...], kg: int, vl: tuple[int, ...], vg: int) -> np.ndarray:
    """Block starts valid for both streams below the end of the longer compressed part."""
    kc, vc = _cuts_of(kl, kg), _cuts_of(vl, vg)
    kt, vt = sum(kl), sum(vl)
    lo = min(kt, vt)
    both = np.intersect1d(kc[kc <= lo], vc[vc <= lo])
    longer = kc if kt > vt else vc
    return np.concatenate([both, longer[longer > lo]])


def _blocks(ks: _Stream, vs: _Stream, T: int, tb: int) -> list[tuple[int, int]]:
    """Context blocks [a, b) of about tb tokens (at most tb where the groups allow)."""
    if T <= tb:
        return [(0, T)]
    cuts = _common_cuts(_lengths(ks), _gran(ks), _lengths(vs), _gran(vs))
    top = max(ks.Tc, vs.Tc)  # from here on (exact tails) any token may start a block
    out = []
    a = 0
    while a < T:
        lim = a + tb
        if lim >= T:
            b = T
        elif lim >= top:
            b = max(lim, a + 1)
        else:
            i = int(np.searchsorted(cuts, lim, "right")) - 1
            if i >= 0 and cuts[i] > a:
                b = int(cuts[i])
            else:
                j = int(np.searchsorted(cuts, a, "right"))
                b = int(cuts[j]) if j < cuts.shape[0] else top
        out.append((a, b))
        a = b
    return out


def _v_items(st: _Stream, a: int = 0, b: int = -1) -> tuple[np.ndarray, ...]:
    """Token-span V items, used only for int chunks grouped over channels (kind 2)."""
    if st.kind != KIND_INT_CHANNELS:
        return _NO_ITEMS
    return _chunk_items(_lengths(st), _V_SPAN, st.Hkv, a, b)


def _chunk_range(st: _Stream, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """(cl0, cl1): each chunk's tokens inside the context block a .. b-1 (chunk-local)."""
    L = st.ch[:, 3]
    t0 = st.ch[:, 4]
    return (np.ascontiguousarray(np.clip(a - t0, 0, L)),
            np.ascontiguousarray(np.clip(b - t0, 0, L)))


def _exact_range(st: _Stream, a: int, b: int) -> tuple[int, int]:
    """The exact tail's tokens (tail-local) inside the context block a .. b-1."""
    return max(0, a - st.Tc), max(0, min(st.Te, b - st.Tc))


def _v_width(Hkv: int, D: int, nthreads: int) -> int:
    """Channels per V work item: as many as possible (each item re-reads the weights p)
    while leaving >= 4 items per thread."""
    for dw in (16, 8):
        if Hkv * -(-D // dw) >= 4 * nthreads:
            return dw
    return 4


# ----------------------------------------------------------------------------- inputs


def _prepare_mask(mask: torch.Tensor | None, Lq: int, T: int) -> tuple[int, np.ndarray,
                                                                       np.ndarray]:
    """(mode, allow uint8 [Lq*T], bias float32 [Lq*T]); mode 0 = causal aligned at the end,
    1 = boolean mask, 2 = additive float mask (-inf = not allowed)."""
    if mask is None:
        return 0, _U8, _F32
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be None or a torch.Tensor, got {type(mask).__name__}")
    m = mask.detach()
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    if tuple(m.shape) != (Lq, T):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected [Lq, T] = [{Lq}, {T}] "
                         f"(leading dims of size 1 are allowed)")
    m = m.cpu()
    if m.dtype == torch.bool:
        return 1, m.to(torch.uint8).contiguous().reshape(-1).numpy(), _F32
    if not m.is_floating_point():
        raise TypeError(f"mask must be bool or floating point, got {m.dtype}")
    b = m.to(torch.float32)
    if bool(torch.isnan(b).any()) or bool(torch.isposinf(b).any()):
        raise ValueError("float mask contains NaN or +inf")
    allow = ~torch.isneginf(b)
    b = torch.where(allow, b, torch.zeros((), dtype=torch.float32))
    return (2, allow.to(torch.uint8).contiguous().reshape(-1).numpy(),
            b.contiguous().reshape(-1).numpy())


def _check_q(q: Any) -> tuple[torch.Tensor, np.ndarray]:
    """(q on the CPU, its float32 values as a contiguous numpy array [Hq, Lq, D]); raises
    TypeError / ValueError (NaN or Inf, with positions) like `check_input`."""
    if (not isinstance(q, torch.Tensor) or q.dtype not in SUPPORTED_DTYPES
            or q.device.type != "cpu"):
        q = check_input(q, "q")  # the detailed TypeError, or moves q to the CPU
    if q.dim() != 3:
        raise ValueError(f"q must be [Hq, Lq, D], got shape {tuple(q.shape)}")
    qn = q.detach().to(torch.float32).contiguous().numpy()
    if qn.size and not np.isfinite(qn).all():
        check_input(q, "q")  # raises with the count and positions
    return q, qn


def _check_shapes(q: torch.Tensor, ks: _Stream, vs: _Stream) -> int:
    Hq, _, D = q.shape
    if (ks.Hkv, ks.D) != (vs.Hkv, vs.D):
        raise ValueError(f"K has Hkv={ks.Hkv}, D={ks.D} but V has Hkv={vs.Hkv}, D={vs.D}")
    if ks.D != D:
        raise ValueError(f"q has head_dim {D} but K/V have {ks.D}")
    if ks.T != vs.T:
        raise ValueError(f"K holds {ks.T} tokens ({ks.Tc} compressed + {ks.Te} exact) but V "
                         f"holds {vs.T} ({vs.Tc} + {vs.Te})")
    if ks.Hkv == 0 or Hq % ks.Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {ks.Hkv} KV heads")
    return Hq // ks.Hkv


def _check_scaling(scaling: Any) -> float:
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float, np.floating)):
        raise TypeError(f"scaling must be a float, got {type(scaling).__name__}")
    s = float(scaling)
    if not math.isfinite(s):
        raise ValueError(f"scaling must be finite, got {s}")
    return s


def _default_threads(num_threads: int | None) -> int:
    if num_threads is None:
        return max(1, min(numba.get_num_threads(), torch.get_num_threads()))
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)) \
            or num_threads < 1:
        raise ValueError(f"num_threads must be a positive int, got {num_threads!r}")
    return int(num_threads)


@contextmanager
def _numba_threads(n: int) -> Iterator[int]:
    prev = numba.get_num_threads()
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    try:
        yield n
    finally:
        numba.set_num_threads(prev)


_tls = threading.local()


def _scratch(name: str, n: int) -> np.ndarray:
    """A per-thread float32 work buffer of at least n elements (reused across calls)."""
    buf = getattr(_tls, name, None)
    if buf is None or buf.size < n:
        buf = np.empty(max(n, 1), np.float32)
        setattr(_tls, name, buf)
    return buf[:n]


# ----------------------------------------------------------------------------- entry points


def fused_attention(q: torch.Tensor, k_chunks: Sequence[Compressed] | None,
                    k_exact: torch.Tensor | None, v_chunks: Sequence[Compressed] | None,
                    v_exact: torch.Tensor | None, *, scaling: float,
                    mask: torch.Tensor | None = None,
                    num_threads: int | None = None) -> torch.Tensor:
    """softmax(q K^T * scaling + mask) V straight from a compressed cache -> [Hq, Lq, D].

    q: [Hq, Lq, D] float32/bfloat16/float16 (computed in float32, returned in q's dtype);
    query head h uses KV head h // (Hq // Hkv) (GQA/MQA, as transformers' repeat_kv).
    k_chunks / v_chunks: lists of `Compressed` [Hkv, Tc, D] (one codec config and axis per
    stream; see `fused_supported`), followed by k_exact / v_exact [Hkv, Te, D] (or None);
    K and V must hold the same number of tokens T.
    mask: None = causal aligned at the end (query i attends to t <= T - Lq + i); or [Lq, T]
    (leading size-1 dims allowed) bool (True = attend) or float additive (-inf = blocked;
    finite large negatives are added like any bias). A query row with no allowed token
    outputs zeros.
    num_threads: numba threads for this call (default: min of numba's and torch's).
    Raises TypeError/ValueError for bad inputs, CodecError for corrupt or mismatched
    chunks, FusedAttentionUnsupported for a codec/axis without a fused kernel.

    Every chunk is validated by its codec (`check_compatible`, `validate`) before any
    kernel runs; an Ecco block whose code stream overruns is detected by the kernel (as
    by the decoder) and raises CodecError. Exact tails are used as given (not scanned for
    NaN). Queries are processed in tiles of up to 32 (at most 128 rows n_rep * queries);
    each compressed block is decoded once per tile. The context is taken in blocks of
    about `S_BLOCK_BYTES` of score scratch, merged by their log-sum-exp (online softmax),
    so scratch memory does not grow with T. Two parallel launches per tile and block; on a
    machine shared with other busy processes, OMP_WAIT_POLICY=passive avoids multi-ms
    stalls of numba's OpenMP workers (measured here: 2 threads 44.8 ms -> 23.4 ms).
    """
    from eccokv.kernels import attention_numba as kn

    q, qn = _check_q(q)
    scaling = _check_scaling(scaling)
    ks = _prepare_stream(k_chunks, k_exact, "K")
    vs = _prepare_stream(v_chunks, v_exact, "V")
    n_rep = _check_shapes(q, ks, vs)
    Hq, Lq, D = q.shape
    Hkv, T = ks.Hkv, ks.T
    mode, allow, bias = _prepare_mask(mask, Lq, T)
    nthreads = _default_threads(num_threads)
    out = torch.zeros(Hkv, n_rep, Lq, D, dtype=torch.float32)
    if T == 0 or Lq == 0 or D == 0:
        return out.reshape(Hq, Lq, D).to(q.dtype)
    qs = torch.from_numpy(qn * np.float32(scaling)).reshape(Hkv, n_rep, Lq, D)
    Lt = max(1, min(32, MAX_TILE_ROWS // n_rep, Lq))
    bad_k = np.zeros(max(1, ks.ch.shape[0]), np.uint8)
    bad_v = np.zeros(max(1, vs.ch.shape[0]), np.uint8)
    with _numba_threads(nthreads) as nt:
        dw = _v_width(Hkv, D, nt)
        for i0 in range(0, Lq, Lt):
            lt = min(Lt, Lq - i0)
            R = n_rep * lt
            qf = qs[:, :, i0:i0 + lt].contiguous().reshape(-1).numpy()
            blocks = _blocks(ks, vs, T, max(128, S_BLOCK_BYTES // (4 * Hkv * R)))
            o = _scratch("out", Hkv * R * D)
            lsum = _scratch("lsum", Hkv * R)
            mrow = _scratch("mrow", Hkv * R)
            acc = None
            for a, b in blocks:
                _attend_block(kn, ks, vs, a, b, T, nt, dw, qf, Hkv, R, D, mode, allow, bias,
                              i0, lt, Lq, bad_k, bad_v, o, lsum, mrow)
                if len(blocks) > 1:
                    acc = _merge(acc, o, lsum, mrow, Hkv * R, D)
            if acc is not None:
                res = acc[0] / np.where(acc[1] > 0, acc[1], 1.0)[:, None]
                o = res.astype(np.float32).reshape(-1)
            out[:, :, i0:i0 + lt] = torch.from_numpy(o).view(Hkv, n_rep, lt, D)
    return out.reshape(Hq, Lq, D).to(q.dtype)


def _attend_block(kn: Any, ks: _Stream, vs: _Stream, a: int, b: int, T: int, nt: int,
                  dw: int, qf: np.ndarray, Hkv: int, R: int, D: int, mode: int,
                  allow: np.ndarray, bias: np.ndarray, i0: int, lt: int, Lq: int,
                  bad_k: np.ndarray, bad_v: np.ndarray, o: np.ndarray, lsum: np.ndarray,
                  mrow: np.ndarray) -> None:
    """One query tile against the context block a .. b-1: o [Hkv, R, D] normalised by the
    block's own softmax sums lsum [Hkv, R], block row maxima in mrow [Hkv, R]."""
    whole = a == 0 and b == T
    tb = b - a
    if whole:
        it = _chunk_items(_lengths(ks), _k_span(ks, nt, ks.Tc), ks.Hkv)
        vit = _v_items(vs)
        cl0, cl1 = np.zeros(vs.ch.shape[0], np.int64), np.ascontiguousarray(vs.ch[:, 3])
    else:
        it = _chunk_items(_lengths(ks), _k_span(ks, nt, min(b, ks.Tc) - min(a, ks.Tc)),
                          ks.Hkv, a, b)
        vit = _v_items(vs, a, b)
        cl0, cl1 = _chunk_range(vs, a, b)
    ke0, ke1 = _exact_range(ks, a, b)
    ve0, ve1 = _exact_range(vs, a, b)
    S = _scratch("S", Hkv * R * tb)
    kn.k_phase(ks.kind, *ks.consts, ks.G, ks.bits, ks.ch, ks.tsc, *it, ks.exact, ks.Te, ke0,
               ke1, _EXACT_SPAN, ks.Tc, a, qf, Hkv, R, D, tb, T, S, bad_k, mode, allow, bias,
               i0, lt, Lq, lsum, mrow)
    _raise_bad(bad_k, "K")
    nvi = vit[0].shape[0] + Hkv * -(-(ve1 - ve0) // _V_SPAN) if vs.kind == 2 else 0
    part = _scratch("part", nvi * R * D)
    kn.v_phase(vs.kind, *vs.consts, vs.G, vs.bits, vs.ch, vs.tsc, cl0, cl1, vs.exact, vs.Te,
               ve0, ve1, _V_SPAN, vs.Tc, a, S, lsum, Hkv, R, D, tb, dw, o, bad_v, *vit, part)
    _raise_bad(bad_v, "V")


def _merge(acc: tuple[np.ndarray, np.ndarray, np.ndarray] | None, o: np.ndarray,
           lsum: np.ndarray, mrow: np.ndarray, rows: int, D: int) -> tuple[
               np.ndarray, np.ndarray, np.ndarray]:
    """Online-softmax merge of one block's (o normalised, lsum, mrow) into the running
    (sum_b o_b l_b e^(m_b - M) [rows, D], sum_b l_b e^(m_b - M) [rows], M [rows]), float64."""
    l_ = lsum.astype(np.float64)
    m = np.where(l_ > 0, mrow.astype(np.float64), -np.inf)
    ob = o.reshape(rows, D).astype(np.float64) * l_[:, None]
    if acc is None:
        return ob, l_, m
    O, L, M = acc
    Mn = np.maximum(M, m)
    base = np.where(np.isfinite(Mn), Mn, 0.0)
    fo, fn = np.isfinite(M), np.isfinite(m)
    so = np.where(fo, np.exp(np.where(fo, M, 0.0) - base), 0.0)
    sn = np.where(fn, np.exp(np.where(fn, m, 0.0) - base), 0.0)
    return O * so[:, None] + ob * sn[:, None], L * so + l_ * sn, Mn


def _raise_bad(bad: np.ndarray, name: str) -> None:
    if bad.any():
        idx = np.flatnonzero(bad)
        raise CodecError(f"{name} chunk(s) {idx.tolist()} hold corrupt Ecco blocks (a code "
                         f"stream overruns its block)")


def _decode_stream(chunks: Sequence[Compressed] | None, exact: torch.Tensor | None,
                   name: str) -> torch.Tensor:
    parts = []
    for i, c in enumerate(chunks or []):
        if not isinstance(c, Compressed):
            raise TypeError(f"{name} chunk {i} is a {type(c).__name__}, not a Compressed")
        codec = _codec_for(c.codec_config)
        parts.append(codec.decode(c, out=torch.empty(c.shape, dtype=torch.float32)))
    if exact is not None:
        parts.append(exact.detach().to(torch.float32))
    if not parts:
        raise ValueError(f"{name}: give at least one chunk or an exact tail")
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def reference_attention(q: torch.Tensor, k_chunks: Sequence[Compressed] | None,
                        k_exact: torch.Tensor | None, v_chunks: Sequence[Compressed] | None,
                        v_exact: torch.Tensor | None, *, scaling: float,
                        mask: torch.Tensor | None = None, num_threads: int | None = None,
                        sdpa: bool = False) -> torch.Tensor:
    """Decode-then-attention with the semantics of `fused_attention` -> [Hq, Lq, D].

    Every chunk is decoded with `codec.decode` into float32, concatenated with the exact
    tail, the KV heads are repeated (repeat_kv) and attention runs in float32: explicit
    softmax (rows with no allowed token -> 0) by default, torch SDPA if `sdpa` (one query
    without a mask folds the query heads of a KV head into one SDPA call; fully masked
    rows then follow SDPA's own convention).
    """
    q, _ = _check_q(q)
    scaling = _check_scaling(scaling)
    nthreads = _default_threads(num_threads)
    prev_torch = torch.get_num_threads()
    torch.set_num_threads(nthreads)
    try:
        with _numba_threads(nthreads):
            K = _decode_stream(k_chunks, k_exact, "K")
            V = _decode_stream(v_chunks, v_exact, "V")
        if K.dim() != 3 or V.shape != K.shape:
            raise ValueError(f"K {tuple(K.shape)} and V {tuple(V.shape)} must both be "
                             f"[Hkv, T, D]")
        Hq, Lq, D = q.shape
        Hkv, T, Dk = K.shape
        if Dk != D or Hkv == 0 or Hq % Hkv:
            raise ValueError(f"q {tuple(q.shape)} does not fit K/V {tuple(K.shape)}")
        n_rep = Hq // Hkv
        qf = q.to(torch.float32)
        if sdpa and mask is None and Lq == 1:
            o = torch.nn.functional.scaled_dot_product_attention(
                qf.reshape(1, Hkv, n_rep, D), K[None], V[None], scale=scaling)
            return o.reshape(Hq, 1, D).to(q.dtype)
        if mask is None:
            t = torch.arange(T)
            allow = t[None, :] <= (T - Lq + torch.arange(Lq))[:, None]
            bias = torch.zeros(Lq, T)
        else:
            mode, a, b = _prepare_mask(mask, Lq, T)
            allow = torch.from_numpy(a.copy()).view(Lq, T).bool()
            bias = torch.from_numpy(b.copy()).view(Lq, T) if mode == 2 else torch.zeros(Lq, T)
        Kr = K.repeat_interleave(n_rep, dim=0)
        Vr = V.repeat_interleave(n_rep, dim=0)
        if sdpa:
            am = torch.where(allow, bias, torch.tensor(float("-inf")))
            o = torch.nn.functional.scaled_dot_product_attention(
                qf[None], Kr[None], Vr[None], attn_mask=am, scale=scaling)[0]
            return o.to(q.dtype)
        s = torch.matmul(qf, Kr.transpose(1, 2)) * scaling + bias
        s = s.masked_fill(~allow, float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        lsum = p.sum(dim=-1, keepdim=True)
        o = torch.matmul(p, Vr) / torch.where(lsum > 0, lsum, torch.ones_like(lsum))
        return o.to(q.dtype)
    finally:
        torch.set_num_threads(prev_torch)
