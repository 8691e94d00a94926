"""Compile (or load from numba's cache) every kernel signature users hit: `eccokv warmup`.

`make setup` runs it, so the first `make demo` / `make test` / generate() loads compiled
kernels instead of compiling them for a minute. It drives only the public paths, with
tiny inputs, so it keeps working whatever the kernels look like inside:

- every registered codec: encode of float32/bfloat16/float16 tensors (contiguous and not,
  3-D and 2-D, both grouping axes), decode into a new tensor and into `out=` of each
  dtype (contiguous and not), and decode of a `Compressed` read back from bytes (read-only
  arrays);
- `fused_attention` over every codec/axis with a fused kernel: float32/bfloat16/float16
  queries, no mask / bool mask / additive float mask, 1 and several query tokens, GQA and
  plain multi-head, with and without an exact tail (in each dtype), chunks read back from
  bytes;
- generate() of a tiny transformers model with EccoCache (fused and decoding paths, a few
  codecs, float32 and bfloat16, batch 1 and a padded batch 2), if transformers is present;
- EccoLinear (compressed weights): activation-aware encoding, the fused decode-GEMV and
  the tiled decode + matmul, float32 and bfloat16 inputs.

`compile_counts()` reads numba's dispatcher statistics, so a caller can check that a run
compiled nothing (`cache_misses`), whatever the kernels are called.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from eccokv import codecs

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Cache presets with a fused path in EccoCache generate() runs (and its decode path).
GENERATE_CODECS = ("ecco4", "kivi2", "int4")


# ----------------------------------------------------------------------- compile statistics


def _dispatchers() -> dict[str, Any]:
    """Every numba dispatcher defined in a loaded eccokv module: 'module.name' -> it."""
    try:
        from numba.core.dispatcher import Dispatcher
    except ImportError:  # pragma: no cover
        return {}
    seen: dict[int, str] = {}
    out: dict[str, Any] = {}
    for modname, mod in list(sys.modules.items()):
        if not (modname == "eccokv" or modname.startswith("eccokv.")) or mod is None:
            continue
        for attr, obj in list(vars(mod).items()):
            if isinstance(obj, Dispatcher) and id(obj) not in seen:
                name = f"{getattr(obj.py_func, '__module__', modname)}.{attr}"
                seen[id(obj)] = name
                out[name] = obj
    return out


def compile_counts() -> dict[str, dict[str, int]]:
    """Per eccokv numba function: signatures loaded from the cache ("hits"), compiled
    ("misses": compiled now, not found in the cache) and held ("overloads")."""
    out = {}
    for name, d in sorted(_dispatchers().items()):
        st = d.stats
        misses = sum(st.cache_misses.values())
        hits = sum(st.cache_hits.values())
        n = len(d.overloads)
        if not d._cache.__class__.__name__.startswith("Null"):
            out[name] = {"hits": hits, "misses": misses, "overloads": n}
        else:  # not cached: everything it holds was compiled in this process
            out[name] = {"hits": 0, "misses": n, "overloads": n}
    return out


def compiled_since(before: dict[str, dict[str, int]]) -> dict[str, int]:
    """Functions that compiled a signature since the `compile_counts()` snapshot `before`:
    name -> number of signatures compiled."""
    now = compile_counts()
    return {k: v["misses"] - before.get(k, {}).get("misses", 0) for k, v in now.items()
            if v["misses"] > before.get(k, {}).get("misses", 0)}


# ----------------------------------------------------------------------------- the paths


def _skip(fn: Callable[[], Any], skipped: list[str], what: str) -> Any:
    """Run fn; a TypeError/ValueError means the public API rejects this combination (not
    every codec takes every input): note it and go on."""
    try:
        return fn()
    except (TypeError, ValueError) as e:
        skipped.append(f"{what}: {type(e).__name__}: {e}"[:200])
        return None


def _inputs(dtype: torch.dtype, gen: torch.Generator) -> list[tuple[str, torch.Tensor, int]]:
    """Tensors of the layouts users pass: [H, T, D] with T not a multiple of 128, the cache's
    [H, n * D] token-major flattening, a non-contiguous view, and a 4-D batch."""
    x = torch.randn(2, 136, 64, generator=gen).to(dtype)
    big = torch.randn(1, 2, 300, 64, generator=gen).to(dtype)
    return [
        ("3d", x, 1), ("3d", x, 2),
        ("2d-flat", x.reshape(2, -1), 1),
        ("view", big[0, :, 10:266], 1),  # a slice of the cache window: not contiguous
        ("view", big[0].transpose(1, 2)[:, :, :130], -1),
        ("4d", big, 2),
    ]


def warm_codecs(names: list[str] | None = None, skipped: list[str] | None = None) -> int:
    """Encode and decode tiny tensors through every codec `names` (default: all registered);
    returns the number of calls made."""
    skipped = [] if skipped is None else skipped
    gen = torch.Generator().manual_seed(0)
    n = 0
    for name in names or codecs.available():
        codec = codecs.get(name)
        for dtype in DTYPES:
            for what, x, axis in _inputs(dtype, gen):
                tag = f"{name} {dtype} {what} axis {axis}"
                c = _skip(lambda x=x, axis=axis, codec=codec: codec.encode(x, axis=axis), skipped,
                          tag)
                n += 1
                if c is None:
                    continue
                for fn in _decode_variants(codec, c):
                    _skip(fn, skipped, f"decode {tag}")
                    n += 1
    return n


def _decode_variants(codec: codecs.Codec, c: Any) -> list[Callable[[], Any]]:
    shape = tuple(c.shape)
    calls: list[Callable[[], Any]] = [lambda: codec.decode(c)]
    for dt in DTYPES:
        calls.append(lambda dt=dt: codec.decode(c, out=torch.empty(shape, dtype=dt)))
    if len(shape) >= 2 and shape[-1] > 1:  # a strided destination (a slice of the cache)
        calls.append(lambda: codec.decode(c, out=torch.empty(
            (*shape[:-1], shape[-1] + 3), dtype=c.dtype)[..., :shape[-1]]))
    calls.append(lambda: codecs.decode_bytes(c.to_bytes()))  # read-only arrays
    calls.append(lambda: codec.decode(codecs.from_bytes(c.to_bytes()),
                                      out=torch.empty(shape, dtype=torch.bfloat16)))
    return calls


def fused_streams() -> list[tuple[str, int]]:
    """(codec name, axis of [Hkv, T, D] chunks) pairs that have a fused attention kernel."""
    from eccokv.kernels.attention import fused_supported

    return [(n, a) for n in codecs.available() for a in (1, 2) if fused_supported(n, a)]


def _masks(lq: int, t: int) -> list[torch.Tensor | None]:
    allow = torch.ones(lq, t, dtype=torch.bool).tril(t - lq)
    allow[:, :3] = False  # left padding
    bias = torch.zeros(lq, t).masked_fill(~allow, float("-inf"))
    return [None, allow, bias[None, None], bias.to(torch.bfloat16)]


def warm_attention(skipped: list[str] | None = None) -> int:
    """fused_attention over every fused codec/axis with tiny caches; returns the calls made."""
    from eccokv.kernels.attention import fused_attention

    skipped = [] if skipped is None else skipped
    gen = torch.Generator().manual_seed(1)
    hkv, d, tc = 2, 64, 256
    n = 0
    for name, axis in fused_streams():
        codec = codecs.get(name)
        for cdt in (torch.float32, torch.bfloat16):
            k = torch.randn(hkv, tc, d, generator=gen).to(cdt)
            v = torch.randn(hkv, tc, d, generator=gen).to(cdt)
            kc = [codec.encode(k[:, :128], axis=axis), codec.encode(k[:, 128:], axis=axis)]
            vc = [codec.encode(v[:, :128], axis=axis), codec.encode(v[:, 128:], axis=axis)]
            if cdt == torch.float32:  # chunks read back from bytes: read-only arrays
                kc = [codecs.from_bytes(c.to_bytes()) for c in kc]
                vc = [codecs.from_bytes(c.to_bytes()) for c in vc]
            f32 = torch.float32
            cases = [(qdt, 1, None, f32, 2) for qdt in DTYPES]  # query dtypes
            cases += [(f32, lq, None, f32, 2) for lq in (5, 40)]  # several query tokens, tiles
            cases += [(qdt, 5, m, f32, 2) for m in _masks(5, tc + 7)[1:]
                      for qdt in (f32, torch.bfloat16)]  # bool / additive masks
            cases += [(f32, 1, None, edt, 2) for edt in (None, torch.bfloat16, torch.float16)]
            cases += [(f32, 1, None, f32, rep) for rep in (1, 3)]  # MHA, GQA 3:1
            cases += [(torch.bfloat16, 5, None, torch.bfloat16, 3)]
            for qdt, lq, mask, edt, rep in cases:
                q = torch.randn(hkv * rep, lq, d, generator=gen).to(qdt)
                if edt is None:
                    ke = ve = None
                    kk, vv, m = kc[:1], vc[:1], None if mask is None else mask[..., :128]
                else:
                    ke = torch.randn(hkv, 7, d, generator=gen).to(edt)
                    ve = torch.randn(hkv, 7, d, generator=gen).to(edt)
                    kk, vv, m = kc, vc, mask
                _skip(lambda q=q, kk=kk, ke=ke, vv=vv, ve=ve, m=m: fused_attention(
                    q, kk, ke, vv, ve, scaling=d ** -0.5, mask=m), skipped,
                    f"fused {name}/{axis} q {qdt} lq {lq}")
                n += 1
        # exact tokens only (before the first chunk is compressed); a non-contiguous query
        q = torch.randn(hkv * 2, 3, d, generator=gen).transpose(0, 1).contiguous().transpose(0, 1)
        ke = torch.randn(hkv, 9, d, generator=gen)
        _skip(lambda q=q, ke=ke: fused_attention(q, None, ke, [], ke, scaling=0.1), skipped,
              f"fused {name}/{axis} exact only")
        n += 1
    return n


def warm_generate(skipped: list[str] | None = None) -> int:
    """generate() of a tiny random Llama with EccoCache; returns the generate calls made
    (0 without transformers)."""
    try:
        import transformers
    except ImportError:
        return 0
    from eccokv.hf.cache import EccoCache

    skipped = [] if skipped is None else skipped
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=32,
                                   max_position_embeddings=1024)
    torch.manual_seed(0)
    n = 0
    for mdt in (torch.float32, torch.bfloat16):
        model = transformers.LlamaForCausalLM(cfg).eval().to(mdt)
        ids = torch.randint(3, 128, (2, 180), generator=torch.Generator().manual_seed(2))
        mask = torch.ones_like(ids)
        mask[1, :9] = 0
        for name, fused, batch in itertools.product(GENERATE_CODECS, (True, False), (1, 2)):
            cache = EccoCache(model.config, name, residual_length=16, fused=fused)
            if not fused:
                model.config._attn_implementation = "sdpa"

            def run(batch=batch, cache=cache, model=model, ids=ids, mask=mask) -> Any:
                with torch.no_grad():
                    return model.generate(ids[:batch], attention_mask=mask[:batch],
                                          past_key_values=cache, max_new_tokens=3,
                                          do_sample=False, pad_token_id=0)
            _skip(run, skipped, f"generate {name} fused={fused} batch {batch} {mdt}")
            n += 1
    return n


def warm_weights(skipped: list[str] | None = None) -> int:
    """EccoLinear forward (fused decode-GEMV and tiled decode + matmul) in float32 and
    bfloat16, and activation-aware encoding; returns the calls made."""
    from torch import nn

    from eccokv.weights import EccoLinear

    skipped = [] if skipped is None else skipped
    gen = torch.Generator().manual_seed(3)
    n = 0
    for name in ("ecco4", "ecco3", "ecco2"):
        for dt in (torch.float32, torch.bfloat16):
            lin = nn.Linear(200, 40).to(dt)
            imp = torch.rand(200, generator=gen)
            m = _skip(lambda lin=lin, imp=imp, name=name: EccoLinear.from_linear(
                lin, name, importance=imp), skipped, f"weights {name} {dt}")
            n += 1
            if m is None:
                continue
            for tokens in (1, 3, 40):
                x = torch.randn(tokens, 200, generator=gen).to(dt)
                _skip(lambda m=m, x=x: m(x), skipped, f"weights {name} {dt} x{tokens}")
                n += 1
    return n


ALL_PARTS = ("codecs", "attention", "generate", "weights")
MARKER = "warmup.json"  # in the keyed cache folder once a full warm-up has finished


def done() -> bool:
    """True if a full warm-up already ran for the current kernel sources (cache key)."""
    from eccokv import runtime

    runtime.configure()
    d = runtime.info()["cache_dir"]
    return d is not None and (Path(d) / MARKER).is_file()


def run(parts: tuple[str, ...] = ALL_PARTS, say: Callable[[str], Any] = print,
        if_needed: bool = False) -> dict[str, Any]:
    """Drive every public path (`parts`) once; returns calls, skipped combinations, the
    functions that compiled (not found in numba's cache) and the seconds taken.
    if_needed: do nothing if a full warm-up already ran for these kernel sources."""
    from eccokv import runtime

    runtime.configure()
    if if_needed and done():
        say(f"warm-up: already done for these kernel sources ({runtime.info()['cache_dir']})")
        return {"skipped_run": True, "runtime": runtime.info()}
    steps = {"codecs": warm_codecs, "attention": warm_attention, "generate": warm_generate,
             "weights": warm_weights}
    unknown = set(parts) - set(steps)
    if unknown:
        raise ValueError(f"unknown warm-up parts {sorted(unknown)}; choose from {list(steps)}")
    before = compile_counts()
    skipped: list[str] = []
    res: dict[str, Any] = {"calls": {}, "seconds": {}}
    t0 = time.perf_counter()
    for part in parts:
        t = time.perf_counter()
        res["calls"][part] = steps[part](skipped=skipped)
        res["seconds"][part] = time.perf_counter() - t
        say(f"warm-up {part}: {res['calls'][part]} calls, {res['seconds'][part]:.1f} s")
    res["total_s"] = time.perf_counter() - t0
    res["compiled"] = compiled_since(before)
    res["skipped"] = skipped
    res["runtime"] = runtime.info()
    n = sum(res["compiled"].values())
    d = res["runtime"]["cache_dir"]
    if d is not None and set(ALL_PARTS) <= set(parts):
        from eccokv._paths import write_json_atomic

        write_json_atomic(Path(d) / MARKER, {k: res[k] for k in (
            "calls", "seconds", "total_s", "compiled")} | {"date": time.ctime()})
    say(f"warm-up done in {res['total_s']:.1f} s: {n} kernel signatures compiled "
        f"({len(res['compiled'])} functions), the rest loaded from {res['runtime']['cache_dir']}"
        f"; {len(skipped)} combinations rejected by the API")
    return res
