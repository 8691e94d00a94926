"""`eccokv bench store`: the prefix store on a real model (-> benchmarks/store.{json,md}).

Per prompt length (Wikipedia text, SmolLM2 by default, ecco4, chunks of 256 tokens):

- cold: time to first token of `model.generate(ids, past_key_values=EccoCache(config))`
  (one prefill, no store), and of `eccokv.store.generate` with an empty store (the prompt's
  full chunks computed one per forward and written, then generate);
- warm: time to first token of `EccoCache.from_store` + `generate` when the store holds the
  prompt's chunks, from a directory store and from a Valkey server started on loopback
  (median of `repeats`); every hit is validated (checksums, token ids, a full decode);
- stored bytes per token (every byte of the entries: arrays, chunk headers, entry headers,
  token ids, the sink) against the same tokens in fp16;
- put and get MB/s of the entries (get: fetch alone, and fetch + validate).

All in one process after an untimed warm-up; the machine may be shared (load averages are
recorded).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_PROMPTS = (1024, 4096, 8000)
TARGET_TTFT = 0.1
TARGET_BYTES = 0.27


def _timed(fn: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def run(model_name: str = "smollm2", prompts: list[int] | tuple[int, ...] = DEFAULT_PROMPTS,
        codec: str = "ecco4", repeats: int = 3, chunk_tokens: tuple[int, ...] = (256, 128),
        out_dir: str | None = "benchmarks",
        command: str = "", say: Any = print) -> dict[str, Any]:
    import torch

    import eccokv.store as S
    from eccokv import data, models
    from eccokv.hf.cache import EccoCache
    from eccokv.hf.persist import kv_shape
    from eccokv.provenance import environment
    from eccokv.store.entry import decode_entry
    from eccokv.store.prefix import _Plan, chain_keys
    from eccokv.store.server import Server

    env = environment()
    env["load_average_start"] = list(os.getloadavg())
    t_start = time.perf_counter()
    model, tok = models.load(model_name)
    cfg = model.config
    _, text = data.long_document(tok, min_tokens=max(prompts))
    all_ids = tok(text, return_tensors="pt").input_ids
    if all_ids.shape[1] < max(prompts):
        raise ValueError(f"the document has {all_ids.shape[1]} tokens, fewer than {max(prompts)}")
    kv, hd = kv_shape(cfg)
    nl = cfg.num_hidden_layers
    fp16_per_token = nl * 2 * kv * hd * 2

    def gen1(ids: Any, cache: Any) -> Any:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                  max_new_tokens=1, do_sample=False,
                                  pad_token_id=tok.eos_token_id)

    def warmup() -> None:  # every path timed below, on a short prompt, untimed
        gen1(all_ids[:, :300], EccoCache(cfg, codec))
        for C in chunk_tokens:
            S.generate(model, all_ids[:, :2 * C + 40], None, cache_kwargs={"codec": codec},
                       chunk_tokens=C, max_new_tokens=1, do_sample=False,
                       attention_mask=torch.ones_like(all_ids[:, :2 * C + 40]),
                       pad_token_id=tok.eos_token_id)

    t, _ = _timed(warmup)
    say(f"warm-up {t:.1f} s")
    rows: list[dict[str, Any]] = []
    dtype = next(model.parameters()).dtype

    def one(tmp: str, srv: Any, ids: Any, p: int, C: int, cold_s: float,
            cold_out: Any) -> dict[str, Any]:
        row: dict[str, Any] = {"prompt_tokens": p, "chunk_tokens": C, "cold_s": cold_s}
        dstore = S.open(f"dir://{tmp}/d{p}_{C}?max_bytes=0")
        row["cold_store_s"], (store_out, _) = _timed(lambda: S.generate(
            model, ids, dstore, cache_kwargs={"codec": codec}, chunk_tokens=C,
            max_new_tokens=1, do_sample=False, attention_mask=torch.ones_like(ids),
            pad_token_id=tok.eos_token_id))
        plan = _Plan(EccoCache(cfg, codec), cfg, dtype, C)
        n = max(0, (p - 1 - plan.sink) // C)
        tl = ids[0].tolist()
        keys = chain_keys(plan.root, tl, plan.sink, C, n)
        blobs = dstore.get_many(keys)
        assert len(blobs) == n and all(b is not None for b in blobs)
        total = sum(len(b) for b in blobs)
        stored_tokens = plan.sink + n * C
        row.update(stored_tokens=stored_tokens, entries=n, stored_bytes=total,
                   bytes_per_token=total / stored_tokens,
                   fp16_bytes_per_token=fp16_per_token,
                   vs_fp16=total / stored_tokens / fp16_per_token)
        items = list(zip(keys, blobs, strict=True))
        expects = [plan.expect(j, keys[j - 1] if j else "", plan.chunk_ids(tl, j))
                   for j in range(n)]
        mb = total / 1e6
        urls = {"dir": f"dir://{tmp}/p{p}_{C}?max_bytes=0",
                "redis": f"{srv.url}?prefix=b{p}_{C}:&timeout=30"}
        for name, url in urls.items():  # put / get of the encoded entries
            st = S.open(url)
            st.clear()
            tp, landed = _timed(lambda st=st: st.put_many(items))
            assert landed == n, f"{name}: {landed} of {n} entries landed"
            tg, got = _timed(lambda st=st: st.get_many(keys))
            tv, _ = _timed(lambda got=got: [
                decode_entry(b, key=k, expect=e)
                for k, b, e in zip(keys, got, expects, strict=True)])
            row[f"{name}_put_MBps"] = mb / tp
            row[f"{name}_get_MBps"] = mb / tg
            row[f"{name}_get_validate_MBps"] = mb / (tg + tv)
        for name, url in urls.items():
            times = []
            for _ in range(repeats):
                st = S.open(url)

                def warm(st: Any = st, C: int = C) -> Any:
                    cache = EccoCache.from_store(st, model, ids, chunk_tokens=C, codec=codec)
                    return cache, gen1(ids, cache)

                t, (_, out) = _timed(warm)
                assert st.stats()["hits"] == n and st.stats()["corrupt"] == 0
                times.append(t)
            row[f"warm_{name}_s"] = statistics.median(times)
            row[f"warm_{name}_runs_s"] = times
            row[f"warm_{name}_vs_cold"] = row[f"warm_{name}_s"] / cold_s
            row[f"warm_{name}_same_token_as_store_run"] = bool(
                torch.equal(out[0, -1], store_out[0, -1]))
        row["cold_token_equals_store_run"] = bool(torch.equal(cold_out[0, -1],
                                                              store_out[0, -1]))
        say(f"prompt {p} chunk {C}: cold {cold_s:.2f} s, cold+store "
            f"{row['cold_store_s']:.2f} s, warm dir {row['warm_dir_s']:.3f} s "
            f"({row['warm_dir_vs_cold']:.3f}x), warm redis {row['warm_redis_s']:.3f} s "
            f"({row['warm_redis_vs_cold']:.3f}x), {row['vs_fp16']:.4f}x fp16 bytes/token")
        return row

    def measure(tmp: str, srv: Any, p: int, chunks: list[int]) -> list[dict[str, Any]]:
        ids = all_ids[:, :p]
        cold_s, cold_out = _timed(lambda: gen1(ids, EccoCache(cfg, codec)))
        out_rows = []
        for C in chunks:
            out_rows.append(one(tmp, srv, ids, p, C, cold_s, cold_out))
        return out_rows

    with tempfile.TemporaryDirectory(prefix="eccokv-bench-store-") as tmp, Server() as srv:
        for p in prompts:
            rows += measure(tmp, srv, p, list(chunk_tokens))
    env["load_average_end"] = list(os.getloadavg())
    def at(p: int, C: int, key: str) -> bool | None:
        r = [x for x in rows if x["prompt_tokens"] == p and x["chunk_tokens"] == C]
        return None if not r else r[0][key] <= TARGET_TTFT

    targets = {f"warm_ttft_4k_{b}_chunk{C}": at(4096, C, f"warm_{b}_vs_cold")
               for C in chunk_tokens for b in ("dir", "redis")}
    targets["bytes_per_token"] = all(r["vs_fp16"] <= TARGET_BYTES for r in rows)
    res = {"benchmark": "store", "model": model_name, "codec": codec,
           "chunk_tokens": list(chunk_tokens),
           "repeats": repeats, "rows": rows, "targets": targets, "environment": env,
           "seconds": time.perf_counter() - t_start,
           "command": command or ("eccokv " + " ".join(sys.argv[1:]))}
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "store.json").write_text(json.dumps(res, indent=1, default=float))
        (out / "store.md").write_text(to_markdown(res))
    return res


def to_markdown(res: dict[str, Any]) -> str:
    from eccokv.provenance import header_line

    env = res["environment"]
    t = res["targets"]

    def ok(v: Any) -> str:
        return "-" if v is None else ("met" if v else "**not met**")

    lines = [
        "# Prefix store: warm time to first token, stored bytes, throughput",
        "",
        f"Command: `{res['command']}`  ",
        header_line(env),
        f"Model {res['model']}, codec {res['codec']}, chunks of "
        f"{' and '.join(map(str, res['chunk_tokens']))} tokens (256: the default); "
        f"Wikipedia prompts; warm runs: median of {res['repeats']}; one process, wall time "
        f"{res['seconds']:.0f} s; load average {env['load_average_start'][0]:.2f} at the start, "
        f"{env['load_average_end'][0]:.2f} at the end (the machine is shared).  ",
        f"CPU: {env['cpu']} ({env['cpu_count']} logical CPUs); torch "
        f"{env['packages'].get('torch')}, transformers {env['packages'].get('transformers')}.",
        "",
        "Time to first token (s). cold: `generate()` with a fresh EccoCache (one prefill). "
        "cold+store: `eccokv.store.generate` on an empty store (full chunks computed one per "
        "forward and written, then generate). warm: `EccoCache.from_store` (every entry "
        "validated: checksums, token ids, full decode) + `generate()`.",
        "",
        "| prompt | chunk | stored tokens | cold | cold+store | warm dir | vs cold | warm Redis | "
        "vs cold |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['prompt_tokens']} | {r['chunk_tokens']} | {r['stored_tokens']} | "
                     f"{r['cold_s']:.2f} | "
                     f"{r['cold_store_s']:.2f} | {r['warm_dir_s']:.3f} | "
                     f"{r['warm_dir_vs_cold']:.3f}x | {r['warm_redis_s']:.3f} | "
                     f"{r['warm_redis_vs_cold']:.3f}x |")
    lines += ["", "Stored bytes per token (every byte of the entries) against fp16 K/V "
              "(LMCache's naive serde):", "",
              "| prompt | chunk | entries | stored bytes | bytes/token | fp16 bytes/token | "
              "vs fp16 |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['prompt_tokens']} | {r['chunk_tokens']} | {r['entries']} | "
                     f"{r['stored_bytes']} | "
                     f"{r['bytes_per_token']:.0f} | {r['fp16_bytes_per_token']} | "
                     f"{r['vs_fp16']:.4f}x |")
    lines += ["", "Throughput (MB/s of entry bytes; get+validate includes parsing, checks and "
              "a full decode):", "",
              "| prompt | chunk | dir put | dir get | dir get+validate | Redis put | Redis get | "
              "Redis get+validate |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['prompt_tokens']} | {r['chunk_tokens']} | {r['dir_put_MBps']:.0f} | "
                     f"{r['dir_get_MBps']:.0f}"
                     f" | {r['dir_get_validate_MBps']:.0f} | {r['redis_put_MBps']:.0f} | "
                     f"{r['redis_get_MBps']:.0f} | {r['redis_get_validate_MBps']:.0f} |")
    lines += ["", "Targets:", "",
              *[f"- warm time to first token at 4K <= {TARGET_TTFT}x cold, chunks of {C}: "
                f"directory {ok(t.get(f'warm_ttft_4k_dir_chunk{C}'))}, Redis "
                f"{ok(t.get(f'warm_ttft_4k_redis_chunk{C}'))}" for C in res["chunk_tokens"]],
              f"- stored bytes per token <= {TARGET_BYTES}x fp16 (ecco4, everything counted): "
              f"{ok(t['bytes_per_token'])}", ""]
    same = [(r["prompt_tokens"], r["chunk_tokens"]) for r in res["rows"]
            if not r["cold_token_equals_store_run"]]
    lines.append("First token of the store run equals the plain run's at every length." if not
                 same else f"First token of the store run differs from the plain run's at "
                 f"(prompt, chunk) {same} (the store run's chunked prefill attends to the "
                 "compressed earlier chunks, the plain prefill to exact values).")
    lines.append("")
    return "\n".join(lines)
