"""Explicit numba signatures of the kernel entry points (the functions Python calls).

Each entry point is compiled for exactly these types when its module is imported (from the
source-keyed cache that `make setup` fills, `eccokv.runtime`), never lazily for whatever a
caller happens to pass: a call with other types fails with numba's TypeError instead of
compiling for seconds in the middle of a generate(). Inputs the kernels only read are
declared read-only, so both the frozen chunk arrays of the fused path and fresh writable
arrays match (numba converts mutable to read-only arrays safely) with one compiled body.
"""

from __future__ import annotations

from numba import types

from eccokv.kernels.ecco_core import EccoTables

i64, f64, f32, u8, u16, u32, u64 = (types.int64, types.float64, types.float32, types.uint8,
                                    types.uint16, types.uint32, types.uint64)


def arr(dtype: types.Type, ndim: int = 1, readonly: bool = False) -> types.Array:
    """A C-contiguous array type (read-only: the kernel never writes to it)."""
    return types.Array(dtype, ndim, "C", readonly=readonly)


def ro(dtype: types.Type, ndim: int = 1) -> types.Array:
    return arr(dtype, ndim, readonly=True)


# EccoCodec.kernel_tables(): 8 ints, then the (read-only) tables in field order
TABLES = types.NamedTuple((i64,) * 8 + (ro(f32), ro(u8), ro(u32), ro(f64), ro(f32), ro(f32),
                                        ro(f32)), EccoTables)

ENCODE_BLOCKS = [types.void(
    ro(f32, 2), i64, i64, ro(f64, 2), ro(f64, 2), ro(i64, 2), ro(i64, 2), ro(i64, 2),
    ro(f32, 2), i64, ro(f32), f64, f64, i64, i64, ro(f32), ro(f32), i64, i64, i64, i64, i64,
    i64, types.boolean, i64, ro(f64), arr(u64), arr(u8))]

# out: float32 values, or the bits of bfloat16 / float16 values (uint16)
DECODE_BLOCKS = [types.void(ro(u64), i64, TABLES, f64, i64, i64, i64, arr(out), i64, arr(u8))
                 for out in (f32, u16)]

SYMBOLS_PASS = [i64(ro(u64), i64, TABLES)]

_ITEMS = (ro(i64),) * 4  # it_c, it_h, it_s, it_n

K_PHASE = [types.void(
    i64, TABLES, i64, i64, ro(i64, 2), ro(f64), *_ITEMS, ro(f32), i64, i64, i64, i64, i64,
    i64, ro(f32), i64, i64, i64, i64, i64, arr(f32), arr(u8), i64, ro(u8), ro(f32), i64, i64,
    i64, arr(f32), arr(f32))]

V_PHASE = [types.void(
    i64, TABLES, i64, i64, ro(i64, 2), ro(f64), ro(i64), ro(i64), ro(f32), i64, i64, i64, i64,
    i64, i64, ro(f32), ro(f32), i64, i64, i64, i64, i64, arr(f32), arr(u8), *_ITEMS,
    arr(f32))]

# fused decode-GEMV: words, nblocks, tables, tscale, n_in, n_out, unit, X (T, n_in), Y
GEMV = [i64(ro(u64), i64, TABLES, f64, i64, i64, i64, ro(f32, 2), arr(f32, 2))]
