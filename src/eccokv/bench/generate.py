"""`eccokv bench generate`: decode tokens/s, prefill time and KV bytes of generate() with
EccoCache (ecco4, kivi4) against transformers' DynamicCache and QuantizedCache (quanto
int4, residual 128), all measured in the same run.

Each case (prompt length, cache, repeat) runs in its own fresh Python process, started as
a user starts one: the benchmark removes OMP_WAIT_POLICY and NUMBA_THREADING_LAYER from
the child's environment, so the library's own threading choices apply (each child records
what it ended up with). A child loads the model, then runs one untimed warm-up
generate() (a short prompt, a few tokens, its own fresh cache of the same kind) so that
compiling or loading the numba kernels, and torch's first-call costs, stay outside the
timed region; it records how many kernel signatures the warm-up compiled and checks that
the timed run compiled none. Then it builds a prompt of `prompt_tokens` Wikipedia tokens
and runs `model.generate` greedily for exactly `new_tokens` tokens with a streamer that
timestamps every token.

Reported per run: prefill time (prompt in, first token out), decode tokens/s (the other
tokens), the KV bytes the cache holds at the end (every byte: EccoCache's
`memory_report()`, QuantizedCache's packed codes, scales, shifts and float32 residual,
DynamicCache's tensors) next to the same tokens in fp16, and peak RSS. Runs are
interleaved (repeat, then prompt length, then cache, the cache order rotating each
repeat) to spread machine noise; medians per (prompt length, cache); ratios against
DynamicCache and QuantizedCache at the same prompt length.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

KINDS: dict[str, dict[str, Any]] = {
    "dynamic": {"cache": "DynamicCache"},
    "ecco4": {"cache": "EccoCache", "codec": "ecco4", "fused": True},
    "kivi4": {"cache": "EccoCache", "codec": "kivi4", "fused": True},
    "quanto-int4": {"cache": "QuantizedCache", "backend": "quanto", "nbits": 4,
                    "q_group_size": 64, "axis_key": 0, "axis_value": 0,
                    "residual_length": 128},
    "ecco4-w16": {"cache": "EccoCache", "codec": "ecco4", "fused": True, "exact_dtype": "float16"},
    "ecco4-decode": {"cache": "EccoCache", "codec": "ecco4", "fused": False},
}
DEFAULT_KINDS = ("dynamic", "ecco4", "kivi4", "quanto-int4")
DEFAULT_PROMPTS = (1024, 4096, 8000)
DEFAULT_NEW_TOKENS = 64
DEFAULT_REPEATS = 2
# the child's environment is the user's, less these (the library chooses them itself)
STRIPPED_ENV = ("OMP_WAIT_POLICY", "NUMBA_THREADING_LAYER")
WARMUP_PROMPT = 512  # warm-up generate(): prompt tokens (at most the measured prompt) ...
WARMUP_NEW = 8  # ... and new tokens
SUMMARY_FIELDS = ("prefill_s", "decode_tokens_per_s", "decode_step_median_s", "peak_rss_bytes",
                  "peak_growth_bytes", "kv_bytes", "fp16_kv_bytes", "kv_vs_fp16", "total_s",
                  "warmup_s")


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def numba_counts() -> dict[str, int]:
    """Compiled signatures of eccokv's numba functions loaded now, and numba's cache hits
    and misses for them (a miss is a compile)."""
    from numba.core.dispatcher import Dispatcher

    seen: dict[int, Any] = {}
    for name, mod in list(sys.modules.items()):
        if name.startswith("eccokv") and mod is not None:
            for v in vars(mod).values():
                if isinstance(v, Dispatcher):
                    seen[id(v)] = v
    ds = list(seen.values())
    return {"signatures": sum(len(d.overloads) for d in ds),
            "cache_hits": sum(sum(d._cache_hits.values()) for d in ds),
            "cache_misses": sum(sum(d._cache_misses.values()) for d in ds)}


def _count_delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def make_cache(kind: str, model: Any) -> Any:
    """A fresh cache of `kind` for `model`; sets the model's attention implementation the
    cache needs (EccoCache(fused=True) switches it to eccokv's itself)."""
    import torch
    from transformers import DynamicCache

    from eccokv.hf.cache import EccoCache

    spec = KINDS[kind]
    if spec["cache"] == "DynamicCache":
        model.config._attn_implementation = "sdpa"
        return DynamicCache(config=model.config)
    if spec["cache"] == "QuantizedCache":
        from transformers.cache_utils import QuantizedCache

        model.config._attn_implementation = "sdpa"
        kw = {k: v for k, v in spec.items() if k not in ("cache", "backend")}
        return QuantizedCache(spec["backend"], model.config, **kw)
    xd = spec.get("exact_dtype")
    if not spec["fused"]:
        model.config._attn_implementation = "sdpa"
    return EccoCache(model.config, spec["codec"], fused=spec["fused"],
                     exact_dtype=None if xd is None else getattr(torch, xd))


def cache_kv_bytes(cache: Any) -> dict[str, int]:
    """{"kv_bytes", "fp16_bytes"}: every byte a cache holds for K/V and the same tokens at
    2 bytes per value. QuantizedCache: its quantised tensors' inner tensors (packed codes,
    scales, shifts) plus its residual; other caches: `eccokv.hf.cache.kv_bytes`."""
    from eccokv.hf.cache import kv_bytes

    if any(getattr(lay, "_quantized_keys", None) is not None for lay in cache.layers):
        from eccokv.eval.common import cache_bits

        b = cache_bits(cache, values_per_token=1)
        return {"kv_bytes": b.compressed_bytes + b.exact_bytes,
                "fp16_bytes": 2 * (b.compressed_values + b.exact_values)}
    return kv_bytes(cache)


def worker(kind: str, model_name: str, prompt_tokens: int, new_tokens: int) -> dict[str, Any]:
    """Warm-up, then one measured generate() in this process (call in a fresh process)."""
    import resource

    import numba
    import torch
    from transformers.generation.streamers import BaseStreamer

    from eccokv import data, models

    model, tok = models.load(model_name)
    title, text = data.long_document(tok, min_tokens=prompt_tokens)
    ids = tok(text, return_tensors="pt").input_ids[:, :prompt_tokens]
    rss_model = _rss_now()

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.t: list[float] = []

        def put(self, value: Any) -> None:
            self.t.append(time.perf_counter())

        def end(self) -> None:
            pass

    def generate(x: torch.Tensor, n: int, streamer: Any = None) -> tuple[Any, torch.Tensor]:
        cache = make_cache(kind, model)
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=n, min_new_tokens=n, past_key_values=cache,
                                 streamer=streamer, pad_token_id=tok.eos_token_id)
        return cache, out

    c0 = numba_counts()
    tw = time.perf_counter()
    generate(ids[:, :min(prompt_tokens, WARMUP_PROMPT)], WARMUP_NEW)
    warmup_s = time.perf_counter() - tw
    c1 = numba_counts()

    clock = Clock()
    t0 = time.perf_counter()
    cache, out = generate(ids, new_tokens, clock)
    total = time.perf_counter() - t0
    c2 = numba_counts()
    gen = clock.t[1:]  # the first put() is the prompt
    steps = [b - a for a, b in zip(gen[:-1], gen[1:], strict=True)]
    kb = cache_kv_bytes(cache)
    stream = getattr(cache.layers[0], "k", None)  # EccoCache's exact storage dtype, if any
    exact_dtype = getattr(stream, "exact_dtype", None)
    kv, fp16 = kb["kv_bytes"], kb["fp16_bytes"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel numba function ran (DynamicCache, QuantizedCache)
        layer = None
    return {
        "kind": kind, "spec": KINDS[kind], "article": title, "prompt_tokens": int(ids.shape[1]),
        "new_tokens": int(out.shape[1] - ids.shape[1]), "total_s": total,
        "prefill_s": gen[0] - t0, "decode_tokens_per_s": len(steps) / (gen[-1] - gen[0]),
        "decode_step_median_s": statistics.median(steps),
        "decode_step_max_s": max(steps),
        "peak_rss_bytes": peak, "rss_after_model_bytes": rss_model,
        "peak_growth_bytes": peak - rss_model, "kv_bytes": kv, "fp16_kv_bytes": fp16,
        "kv_vs_fp16": kv / fp16, "warmup_s": warmup_s,
        "warmup_numba": _count_delta(c1, c0), "timed_numba": _count_delta(c2, c1),
        "torch_threads": torch.get_num_threads(), "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": layer, "model_dtype": str(next(model.parameters()).dtype),
        "exact_dtype": None if exact_dtype is None else str(exact_dtype),
        "env": {k: os.environ.get(k) for k in STRIPPED_ENV + ("OMP_NUM_THREADS",
                                                              "NUMBA_NUM_THREADS")},
    }


def child_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The worker's environment: the caller's, less `STRIPPED_ENV`."""
    env = dict(os.environ if environ is None else environ)
    for k in STRIPPED_ENV:
        env.pop(k, None)
    return env


def run_order(prompts: Sequence[int], kinds: Sequence[str],
              repeats: int) -> list[tuple[int, int, str]]:
    """(repeat, prompt tokens, kind) in run order: repeats outermost, then prompt lengths,
    then caches, the cache order rotated by one each repeat."""
    order = []
    for r in range(repeats):
        ks = list(kinds[r % len(kinds):]) + list(kinds[:r % len(kinds)])
        order += [(r, p, k) for p in prompts for k in ks]
    return order


def summarise(runs: Sequence[dict[str, Any]], prompts: Sequence[int],
              kinds: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{prompt tokens (str): {kind: medians of SUMMARY_FIELDS, ratios}}. Ratios against
    "dynamic" (decode tok/s, prefill, KV bytes, peak RSS) and "quanto-int4" (decode tok/s)
    at the same prompt length, where those were run."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for p in prompts:
        s: dict[str, dict[str, float]] = {}
        for k in kinds:
            mine = [x for x in runs if x["kind"] == k and x["prompt_tokens"] == p]
            if mine:
                s[k] = {f: float(statistics.median(x[f] for x in mine)) for f in SUMMARY_FIELDS}
        base, quanto = s.get("dynamic"), s.get("quanto-int4")
        for v in s.values():
            if base:
                v["tokens_per_s_vs_dynamic"] = (v["decode_tokens_per_s"]
                                                / base["decode_tokens_per_s"])
                v["prefill_vs_dynamic"] = v["prefill_s"] / base["prefill_s"]
                v["kv_vs_dynamic"] = v["kv_bytes"] / base["kv_bytes"]
                v["peak_rss_vs_dynamic"] = v["peak_rss_bytes"] / base["peak_rss_bytes"]
            if quanto:
                v["tokens_per_s_vs_quanto"] = (v["decode_tokens_per_s"]
                                               / quanto["decode_tokens_per_s"])
        out[str(p)] = s
    return out


def k_label(prompt_tokens: int) -> int:
    """The prompt length in K as the targets name it (8000 -> 8, 4096 -> 4)."""
    return round(prompt_tokens / 1024)


def targets(summary: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """Issue #7's targets (and goals) for EccoCache(ecco4), evaluated on a summary:
    decode tok/s >= 0.9x DynamicCache at 4K and 8K (goal >= 1.0x at every length),
    >= 1.3x QuantizedCache at 4K and 8K, prefill <= 1.15x DynamicCache at 4K, KV bytes at
    4K <= 0.28x fp16. Each: {"what", "prompt_tokens", "value", "op", "limit", "kind"
    ("target" or "goal"), "met"}; a measurement this run lacks gives no entry."""
    out: list[dict[str, Any]] = []

    def add(what: str, p: str, value: float | None, op: str, limit: float, kind: str) -> None:
        if value is None:
            return
        met = value >= limit if op == ">=" else value <= limit
        out.append({"what": what, "prompt_tokens": int(p), "value": value, "op": op,
                    "limit": limit, "kind": kind, "met": bool(met)})

    for p, s in summary.items():
        e = s.get("ecco4")
        if e is None:
            continue
        kl = k_label(int(p))
        tps = e.get("tokens_per_s_vs_dynamic")
        if kl in (4, 8):
            add("decode tok/s vs DynamicCache", p, tps, ">=", 0.9, "target")
            add("decode tok/s vs QuantizedCache", p, e.get("tokens_per_s_vs_quanto"), ">=", 1.3,
                "target")
        add("decode tok/s vs DynamicCache", p, tps, ">=", 1.0, "goal")
        if kl == 4:
            add("prefill time vs DynamicCache", p, e.get("prefill_vs_dynamic"), "<=", 1.15,
                "target")
            add("KV bytes vs fp16", p, e["kv_vs_fp16"], "<=", 0.28, "target")
    return out


def run(model_name: str = "smollm2", prompt_tokens: Sequence[int] | int = DEFAULT_PROMPTS,
        new_tokens: int = DEFAULT_NEW_TOKENS, kinds: Sequence[str] = DEFAULT_KINDS,
        repeats: int = DEFAULT_REPEATS, verbose: bool = True, command: str | None = None,
        out_dir: str | Path | None = None) -> dict[str, Any]:
    """Fresh-process runs of every (prompt length, kind), `repeats` times, interleaved;
    returns the result (medians per prompt length and kind) and writes
    generate.{json,md} into `out_dir` if given."""
    from eccokv.provenance import environment

    prompts = [prompt_tokens] if isinstance(prompt_tokens, int) else list(prompt_tokens)
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown kind {k!r}; known: {', '.join(KINDS)}")
    if not prompts or min(prompts) < 2 or new_tokens < 3 or repeats < 1:
        raise ValueError("prompt tokens must be >= 2, new tokens >= 3, repeats >= 1")
    env = environment()
    env["load_average_start"] = list(os.getloadavg())
    t_start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    order = run_order(prompts, kinds, repeats)
    for i, (r, p, k) in enumerate(order):
        cmd = [sys.executable, "-m", "eccokv.bench.generate", "--worker", k, "--model",
               model_name, "--prompt-tokens", str(p), "--new-tokens", str(new_tokens)]
        load = os.getloadavg()[0]
        tw = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=child_env())
        if proc.returncode != 0:
            raise RuntimeError(f"worker {k} (prompt {p}) failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res.update(repeat=r, worker_wall_s=time.perf_counter() - tw, load_average_start=load)
        runs.append(res)
        if verbose:
            print(f"[{i + 1}/{len(order)}] prompt {p:5d} {k:12s} prefill {res['prefill_s']:6.2f} s"
                  f"  decode {res['decode_tokens_per_s']:6.2f} tok/s  KV "
                  f"{res['kv_bytes'] / 2**20:7.2f} MiB  warm-up {res['warmup_s']:5.1f} s "
                  f"(compiled {res['warmup_numba']['cache_misses']})  "
                  f"[{time.perf_counter() - t_start:.0f} s]", file=sys.stderr, flush=True)
    summary = summarise(runs, prompts, kinds)
    env["load_average_end"] = list(os.getloadavg())
    result = {
        "benchmark": "generate", "model": model_name, "prompt_tokens": prompts,
        "new_tokens": new_tokens, "repeats": repeats, "kinds": {k: KINDS[k] for k in kinds},
        "warmup": {"prompt_tokens": WARMUP_PROMPT, "new_tokens": WARMUP_NEW},
        "stripped_env": list(STRIPPED_ENV), "summary": summary, "targets": targets(summary),
        "runs": runs, "environment": env, "seconds": time.perf_counter() - t_start,
        "command": command or ("eccokv " + " ".join(sys.argv[1:]) if sys.argv else ""),
    }
    if out_dir:
        write_reports(result, Path(out_dir))
    return result


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def to_markdown(res: dict[str, Any]) -> str:
    """The Markdown report of a `run()` result."""
    from eccokv.provenance import header_line

    mib = 2.0 ** 20
    env = res["environment"]
    runs = res["runs"]
    layers = sorted({str(x.get("numba_threading_layer")) for x in runs
                     if x.get("numba_threading_layer")})
    threads = sorted({(x["torch_threads"], x["numba_threads"]) for x in runs})
    xd = sorted({f"{x['kind']} {x['exact_dtype']}" for x in runs if x.get("exact_dtype")})
    compiled = sum(x["warmup_numba"]["cache_misses"] for x in runs)
    timed = [x for x in runs if x["timed_numba"]["signatures"] or x["timed_numba"]["cache_misses"]]
    prompts = ", ".join(str(p) for p in res["prompt_tokens"])
    lines = [
        "# generate(): EccoCache vs DynamicCache and QuantizedCache",
        "",
        f"Command: `{res['command']}`  ",
        header_line(env),
        f"Model {res['model']}, prompts of {prompts} Wikipedia tokens, {res['new_tokens']} new "
        f"tokens (greedy), {res['repeats']} fresh-process runs per case, interleaved; medians; "
        f"wall time {res.get('seconds', 0):.0f} s.  ",
        f"CPU: {env['cpu']} ({env['cpu_count']} logical CPUs); packages: torch "
        f"{env['packages']['torch']}, transformers {env['packages']['transformers']}, numba "
        f"{env['packages']['numba']}, optimum-quanto {env['packages'].get('optimum-quanto')}.  ",
        f"Workers: plain `python` processes with {', '.join(res['stripped_env'])} removed from "
        f"their environment; they ran with numba threading layer {', '.join(layers) or '-'}, "
        "(torch, numba) threads " + ", ".join(f"{a}/{b}" for a, b in threads)
        + f"; model dtype {runs[0].get('model_dtype') if runs else '-'}, exact dtype "
        + (", ".join(xd) or "-") + ".  ",
        f"Warm-up: one untimed generate() ({res['warmup']['prompt_tokens']}-token prompt, "
        f"{res['warmup']['new_tokens']} new tokens) per worker before the measured one; "
        f"numba compiled {compiled} kernel signature(s) in warm-ups (0: all loaded from its "
        "cache), "
        + ("none in a timed run." if not timed else
           f"**{len(timed)} timed run(s) compiled kernels** (their times include compiling)."),
        "",
        "| prompt | cache | decode tok/s | vs dynamic | vs QuantizedCache | prefill s | "
        "vs dynamic | KV MiB | fp16 MiB | KV vs fp16 | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p, s in res["summary"].items():
        for k, v in s.items():
            lines.append(
                f"| {p} | {k} | {v['decode_tokens_per_s']:.2f} | "
                f"{_fmt(v.get('tokens_per_s_vs_dynamic'))} | "
                f"{_fmt(v.get('tokens_per_s_vs_quanto'))} | {v['prefill_s']:.2f} | "
                f"{_fmt(v.get('prefill_vs_dynamic'))} | {v['kv_bytes'] / mib:.2f} | "
                f"{v['fp16_kv_bytes'] / mib:.2f} | {v['kv_vs_fp16']:.3f} | "
                f"{v['peak_rss_bytes'] / mib:.0f} |")
    load = max([x.get("load_average_start", 0.0) for x in runs]
               + env.get("load_average_end", [0.0])[:1])
    if load > env["cpu_count"]:
        lines += ["", f"Note: the machine was shared (1-minute load average up to {load:.1f} on "
                  f"{env['cpu_count']} CPUs while workers started): multi-threaded torch and "
                  "numba steps then wait for descheduled threads, so absolute figures and "
                  "ratios are noisy; re-run on an idle machine."]
    lines += ["", "## Targets (EccoCache(ecco4), issue #7)", ""]
    tg = res.get("targets") or targets(res["summary"])
    if not tg:
        lines.append("No target applies to this run (needs ecco4 and dynamic / quanto-int4 at "
                     "4K or 8K prompts).")
    for t in tg:
        lines.append(f"- {t['kind']}: {t['what']} at {t['prompt_tokens']} tokens "
                     f"{t['op']} {t['limit']:g}: **{'met' if t['met'] else 'NOT met'}** "
                     f"({t['value']:.3f})")
    lines += [
        "",
        "Decode tok/s: the new tokens after the first over the time from the first to the "
        "last. Prefill: prompt in, first token out. KV bytes count everything a cache holds "
        "at the end: EccoCache's compressed chunks, their metadata, the exact sink (4 tokens) "
        "and window (128-255 tokens) in their storage dtype (`exact dtype` above: EccoCache's "
        "default is 16 bits; `ecco4-w16` asks for float16); QuantizedCache's packed int4 "
        "codes, scales and shifts (groups of 64) and its float32 residual (up to 128 "
        "tokens); DynamicCache's float32 tensors. "
        "'fp16' is the same tokens at 2 bytes per value. Every 128 tokens EccoCache "
        "compresses one more group and QuantizedCache re-quantises its whole history; with "
        "fewer than 128 new tokens a run may or may not contain such a step.",
    ]
    return "\n".join(lines) + "\n"


def write_reports(result: dict[str, Any], out_dir: Path) -> None:
    """generate.json and generate.md in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "generate.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    (out_dir / "generate.md").write_text(to_markdown(result))


def parse_prompts(text: str) -> list[int]:
    """'1024,4096,8000' -> [1024, 4096, 8000]."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"prompt tokens must be comma-separated integers, got {text!r}") from None
    if not out:
        raise ValueError("no prompt length given")
    return out


def main(argv: list[str] | None = None) -> int:
    """The worker entry point (`python -m eccokv.bench.generate --worker KIND ...`)."""
    p = argparse.ArgumentParser(prog="eccokv bench generate")
    p.add_argument("--worker", default=None)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--prompt-tokens", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.model, a.prompt_tokens, a.new_tokens)))
        return 0
    p.error("run it as `eccokv bench generate`")
    return 2


if __name__ == "__main__":
    sys.exit(main())
