"""`eccokv bench generate`: tokens/s and peak RSS of generate() with EccoCache vs the plain
DynamicCache, measured in the same run.

Each (cache, repeat) runs in its own fresh Python process, so its peak RSS
(`ru_maxrss`) is its own: the process loads the model, reads RSS, builds a prompt of
`--prompt-tokens` Wikipedia tokens, and runs `model.generate` greedily for exactly
`--new-tokens` tokens with a streamer that timestamps every token. Reported per run:
prefill time (prompt in, first token out), decode tokens/s (the other tokens), peak RSS
and its growth over the loaded model, and the KV bytes the cache holds at the end
(EccoCache: `memory_report()`; DynamicCache: its tensors' bytes) next to the same tokens
in fp16. Runs alternate between caches to spread machine noise; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

KINDS = {
    "dynamic": {"cache": "DynamicCache"},
    "ecco4": {"cache": "EccoCache", "codec": "ecco4", "fused": True},
    "ecco4-decode": {"cache": "EccoCache", "codec": "ecco4", "fused": False},
    "ecco4-w16": {"cache": "EccoCache", "codec": "ecco4", "fused": True, "exact_dtype": "float16"},
    "kivi4": {"cache": "EccoCache", "codec": "kivi4", "fused": True},
}
DEFAULT_KINDS = ("dynamic", "ecco4", "ecco4-w16", "ecco4-decode")


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(kind: str, model_name: str, prompt_tokens: int, new_tokens: int) -> dict[str, Any]:
    """One measured generate() in this process (call in a fresh process)."""
    import resource

    import torch
    from transformers import DynamicCache
    from transformers.generation.streamers import BaseStreamer

    from eccokv import data, models
    from eccokv.hf.cache import EccoCache, kv_bytes

    spec = KINDS[kind]
    model, tok = models.load(model_name)
    title, text = data.long_document(tok, min_tokens=prompt_tokens)
    ids = tok(text, return_tensors="pt").input_ids[:, :prompt_tokens]
    rss_model = _rss_now()
    if spec["cache"] == "DynamicCache":
        model.config._attn_implementation = "sdpa"
        cache = DynamicCache(config=model.config)
    else:
        xd = spec.get("exact_dtype")
        cache = EccoCache(model.config, spec["codec"], fused=spec["fused"],
                          exact_dtype=None if xd is None else getattr(torch, xd))
        if not spec["fused"]:
            model.config._attn_implementation = "sdpa"

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.t: list[float] = []

        def put(self, value: Any) -> None:
            self.t.append(time.perf_counter())

        def end(self) -> None:
            pass

    clock = Clock()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             past_key_values=cache, streamer=clock,
                             pad_token_id=tok.eos_token_id)
    total = time.perf_counter() - t0
    gen = clock.t[1:]  # the first put() is the prompt
    kb = kv_bytes(cache)
    kv, fp16 = kb["kv_bytes"], kb["fp16_bytes"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "kind": kind, "spec": spec, "article": title, "prompt_tokens": int(ids.shape[1]),
        "new_tokens": int(out.shape[1] - ids.shape[1]), "total_s": total,
        "prefill_s": gen[0] - t0, "decode_tokens_per_s": (len(gen) - 1) / (gen[-1] - gen[0]),
        "peak_rss_bytes": peak, "rss_after_model_bytes": rss_model,
        "peak_growth_bytes": peak - rss_model, "kv_bytes": kv, "fp16_kv_bytes": fp16,
        "kv_vs_fp16": kv / fp16, "torch_threads": torch.get_num_threads(),
    }


def run(model_name: str = "smollm2", prompt_tokens: int = 4096, new_tokens: int = 64,
        kinds: Sequence[str] = DEFAULT_KINDS, repeats: int = 2,
        verbose: bool = True) -> dict[str, Any]:
    """Alternate fresh-process runs of every kind `repeats` times; medians per kind."""
    from eccokv.provenance import environment

    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown kind {k!r}; known: {', '.join(KINDS)}")
    runs: list[dict[str, Any]] = []
    for r in range(repeats):
        for k in kinds:
            cmd = [sys.executable, "-m", "eccokv.bench.generate", "--worker", k, "--model",
                   model_name, "--prompt-tokens", str(prompt_tokens), "--new-tokens",
                   str(new_tokens)]
            p = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if p.returncode != 0:
                raise RuntimeError(f"worker {k} failed:\n{p.stderr[-3000:]}")
            res = json.loads(p.stdout.strip().splitlines()[-1])
            res["repeat"] = r
            runs.append(res)
            if verbose:
                print(f"[{r + 1}/{repeats}] {k:13s} prefill {res['prefill_s']:6.2f} s  decode "
                      f"{res['decode_tokens_per_s']:6.2f} tok/s  peak RSS "
                      f"{res['peak_rss_bytes'] / 2**20:7.1f} MiB  KV "
                      f"{res['kv_bytes'] / 2**20:7.2f} MiB", file=sys.stderr)
    summary = {}
    for k in kinds:
        mine = [x for x in runs if x["kind"] == k]
        summary[k] = {f: statistics.median(x[f] for x in mine) for f in (
            "prefill_s", "decode_tokens_per_s", "peak_rss_bytes", "peak_growth_bytes",
            "kv_bytes", "fp16_kv_bytes", "kv_vs_fp16", "total_s")}
    base = summary.get("dynamic")
    if base:
        for s in summary.values():
            s["tokens_per_s_vs_dynamic"] = s["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            s["peak_rss_vs_dynamic"] = s["peak_rss_bytes"] / base["peak_rss_bytes"]
            s["kv_vs_dynamic"] = s["kv_bytes"] / base["kv_bytes"]
    return {"benchmark": "generate", "model": model_name, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "repeats": repeats, "kinds": {k: KINDS[k] for k in kinds},
            "summary": summary, "runs": runs, "environment": environment(),
            "command": "eccokv " + " ".join(sys.argv[1:]) if sys.argv else ""}


def to_markdown(res: dict[str, Any]) -> str:
    mib = 2.0 ** 20
    lines = [
        "# generate(): EccoCache vs DynamicCache",
        "",
        f"Command: `{res['command']}`  ",
        f"Model {res['model']}, prompt {res['prompt_tokens']} Wikipedia tokens, "
        f"{res['new_tokens']} new tokens (greedy), {res['repeats']} fresh-process runs per "
        f"cache, alternating; medians. CPU: {res['environment']['cpu']}, torch threads "
        f"{res['environment']['torch_threads']}.",
        "",
        "| cache | decode tok/s | vs dynamic | prefill s | peak RSS MiB | vs dynamic | "
        "RSS growth over model MiB | KV MiB | KV vs fp16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k, s in res["summary"].items():
        lines.append(
            f"| {k} | {s['decode_tokens_per_s']:.2f} | {s.get('tokens_per_s_vs_dynamic', 1):.2f}"
            f" | {s['prefill_s']:.2f} | {s['peak_rss_bytes'] / mib:.0f} | "
            f"{s.get('peak_rss_vs_dynamic', 1):.3f} | {s['peak_growth_bytes'] / mib:.0f} | "
            f"{s['kv_bytes'] / mib:.2f} | {s['kv_vs_fp16']:.3f} |")
    s = res["summary"]
    if "dynamic" in s and "ecco4" in s:
        e = s["ecco4"]
        lines += [
            "",
            "Targets (issue 4): decode tokens/s with EccoCache(ecco4) >= 0.8x DynamicCache: "
            f"**{'met' if e['tokens_per_s_vs_dynamic'] >= 0.8 else 'NOT met'}** "
            f"({e['tokens_per_s_vs_dynamic']:.2f}x); KV bytes <= 0.28x of the fp16 cache: "
            f"**{'met' if e['kv_vs_fp16'] <= 0.28 else 'NOT met'}** ({e['kv_vs_fp16']:.3f}x).",
            "",
            "KV bytes count everything EccoCache holds: compressed chunks, their metadata, "
            "the exact sink (4 tokens) and window (128-255 tokens) in the model's dtype "
            "(float32 here, so the window costs 32 bits/value; `ecco4-w16` stores them in "
            "float16: `exact_dtype=torch.float16`); 'fp16' is the same tokens at 2 bytes "
            "per value. DynamicCache holds float32. `ecco4-decode` decodes the compressed "
            "cache for every step instead of fused attention.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eccokv bench generate")
    p.add_argument("--worker", default=None)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--prompt-tokens", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=64)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.model, a.prompt_tokens, a.new_tokens)))
        return 0
    p.error("run it as `eccokv bench generate`")
    return 2


if __name__ == "__main__":
    sys.exit(main())
