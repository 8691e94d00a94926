"""The eccokv LMCache serde, through LMCache 0.5.6's own interface: its --l2-adapter
config parser, `create_serde_processor`, the AsyncSerdeProcessor submit/eventfd/query
cycle, and TensorMemoryObj buffers sized by `serialized_layout_desc`.

Skipped (with the reason) only when lmcache is not installed; `make setup` installs it
without its CUDA dependencies."""

from __future__ import annotations

import argparse
import json
import os
import select
import time

import pytest
import torch

lmc = pytest.importorskip("lmcache.v1.distributed.serde",
                          reason="lmcache 0.5.6 is not installed (make setup installs it)")

from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey  # noqa: E402
from lmcache.v1.distributed.l2_adapters.config import (  # noqa: E402
    add_l2_adapters_args,
    parse_args_to_l2_adapters_config,
)
from lmcache.v1.distributed.serde import (  # noqa: E402
    SerdeConfig,
    create_serde_processor,
    serialized_layout_desc,
)
from lmcache.v1.memory_management import MemoryObjMetadata, TensorMemoryObj  # noqa: E402

import eccokv.codecs as C  # noqa: E402
from eccokv.store import lmcache as E  # noqa: E402

L, T, HID = 3, 256, 128  # layers, chunk tokens, kv_heads * head_dim


def memobj(shape, dtype, fill=None) -> TensorMemoryObj:
    shape = torch.Size(shape)
    n = shape.numel() * dtype.itemsize
    raw = torch.empty(n, dtype=torch.uint8)
    if fill is not None:
        raw.fill_(fill)
    meta = MemoryObjMetadata(shape=shape, dtype=dtype, address=0, phy_size=n, ref_count=1,
                             shapes=[shape], dtypes=[dtype])
    return TensorMemoryObj(raw, meta, None)


def key(h: bytes = b"\x01" * 16, model: str = "smollm2") -> ObjectKey:
    return ObjectKey(chunk_hash=h, model_name=model, kv_rank=0)


def wait(fd: int, query, task) -> bool | None:
    """As LMCache's controllers do: poll the event fd, drain it, query the task."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = query(task)
        if r is not None:
            return r
        if select.select([fd], [], [], 0.1)[0]:
            os.read(fd, 8)
    return None


def kv(dtype=torch.bfloat16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2, L, T, HID), generator=g).to(dtype)


def store_and_load(serde, x, k_store, k_load, damage=None, dst_dtype=None):
    """LMCache's store path (serialize into a temp buffer of the estimated size, keep the
    bytes written) and load path (the bytes into a fresh temp buffer of that size, then
    deserialize into a KV buffer). Returns (store ok, load ok, bytes, destination)."""
    src = memobj(x.shape, x.dtype)
    src.tensor.copy_(x)
    lay = serialized_layout_desc(MemoryLayoutDesc([x.shape], [x.dtype]), serde)
    tmp = memobj(lay.shapes[0], torch.uint8)
    ok_s = wait(serde.get_serialize_event_fd(), serde.query_serialize_result,
                serde.submit_serialize([src], [tmp], [k_store]))
    n = tmp.get_size()  # narrowed by LMCache to what serialize returned
    data = bytes(tmp.byte_array)[:n]
    if damage is not None:
        data = damage(data)
    back = memobj(lay.shapes[0], torch.uint8, fill=0xA5)  # garbage after the object
    back.raw_data[: len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dst = memobj(x.shape, dst_dtype or x.dtype, fill=0)
    ok_l = wait(serde.get_deserialize_event_fd(), serde.query_deserialize_result,
                serde.submit_deserialize([back], [dst], [k_load]))
    return ok_s, ok_l, data, dst


@pytest.fixture(scope="module")
def serde():
    s = create_serde_processor(SerdeConfig(type="eccokv", kwargs={"codec": "ecco4"}))
    yield s
    s.close()


def test_config_line_parses_through_lmcache():
    """The documented --l2-adapter line, parsed by LMCache's own CLI parser, builds it."""
    p = add_l2_adapters_args(argparse.ArgumentParser())
    line = json.dumps({"type": "fs", "base_path": "/tmp/eccokv-lmc",
                       "serde": {"type": "eccokv", "codec": "ecco4"}})
    cfg = parse_args_to_l2_adapters_config(p.parse_args(["--l2-adapter", line]))
    sc = cfg.adapters[0].serde_config
    assert sc.type == "eccokv" and sc.kwargs == {"codec": "ecco4"}
    proc = create_serde_processor(sc)
    assert isinstance(proc, lmc.AsyncSerdeProcessor)
    proc.close()
    with pytest.raises(ValueError, match="unknown options"):
        create_serde_processor(SerdeConfig(type="eccokv", kwargs={"bits": 4}))
    with pytest.raises(ValueError, match="unknown codec"):
        create_serde_processor(SerdeConfig(type="eccokv", kwargs={"codec": "ecco9"}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_roundtrip_equals_eccokv_codec(serde, dtype):
    x = kv(dtype)
    ok_s, ok_l, data, dst = store_and_load(serde, x, key(), key())
    assert ok_s is True and ok_l is True
    codec = C.get("ecco4")
    want = torch.stack([torch.stack([codec.decode(codec.encode(x[i, j], axis=0))
                                     for j in range(L)]) for i in range(2)])
    assert torch.equal(dst.tensor, want)  # exactly eccokv's own decode, bit for bit
    est = serde.estimate_serialized_size(MemoryLayoutDesc([x.shape], [dtype]))
    assert len(data) <= est <= len(data) + 1024  # an upper bound, and a tight one
    assert len(data) < 0.27 * x.numel() * 2  # vs LMCache's naive fp16 bytes


def test_corrupt_foreign_or_misplaced_objects_fail_the_load(serde):
    x = kv(seed=1)

    def flip(d):
        m = bytearray(d)
        m[len(m) // 2] ^= 0x10
        return bytes(m)

    cases = {
        "bit flip": dict(damage=flip),
        "truncated": dict(damage=lambda d: d[: len(d) - 100]),
        "other chunk key": dict(k_load=key(b"\x02" * 16)),
        "other model": dict(k_load=key(model="llama")),
        "not eccokv": dict(damage=lambda d: b"\0" * len(d)),
        "other dtype": dict(dst_dtype=torch.float16),
    }
    for name, kw in cases.items():
        k_load = kw.pop("k_load", key())
        ok_s, ok_l, _, dst = store_and_load(serde, x, key(), k_load, **kw)
        assert ok_s is True, name
        assert ok_l is False, name  # LMCache reports a failed load: a miss
        assert not dst.raw_data.any(), name  # nothing was written into the KV buffer


def test_other_codec_config_is_refused():
    a = create_serde_processor(SerdeConfig(type="eccokv", kwargs={"codec": "ecco4"}))
    b = create_serde_processor(SerdeConfig(type="eccokv", kwargs={"codec": "ecco2"}))
    x = kv(seed=2)
    src = memobj(x.shape, x.dtype)
    src.tensor.copy_(x)
    lay = serialized_layout_desc(MemoryLayoutDesc([x.shape], [x.dtype]), a)
    tmp = memobj(lay.shapes[0], torch.uint8)
    n = E.EccoSerializer(E._Codecs("ecco4")).serialize(src, tmp, key())
    with pytest.raises(E.LMCacheSerdeError, match="codec"):
        E.parse(memoryview(tmp.raw_data.numpy())[:n], E._Codecs("ecco2"), key(), x.shape,
                x.dtype)
    a.close()
    b.close()


def test_layout_errors_name_the_problem():
    s = E.EccoSerializer(E._Codecs())
    with pytest.raises(E.LMCacheSerdeError, match=r"\[2, layers, tokens, hidden\]"):
        s.estimate_serialized_size(MemoryLayoutDesc([torch.Size([3, L, T, HID])],
                                                    [torch.bfloat16]))
    with pytest.raises(E.LMCacheSerdeError, match="one object group"):
        s.estimate_serialized_size(MemoryLayoutDesc([torch.Size([2, L, T, HID])] * 2,
                                                    [torch.bfloat16] * 2))
