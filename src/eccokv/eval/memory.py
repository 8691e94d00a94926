"""`eccokv eval memory`: peak RSS of a long generation, EccoCache vs DynamicCache.

Each cache ("dynamic", a codec such as "ecco4": EccoCache as users get it, fused
attention and a 16-bit exact window, or "ecco4+decode": the decode-then-attend path; any
name `common.make_cache` takes) runs in its own fresh Python process (`python -m
eccokv.eval.memory --worker ...`): load the model, prefill a ~7K-token Wikipedia prompt
through the cache in chunks of 1024 tokens, generate `new_tokens` greedily, then report

- peak RSS = `resource.getrusage(RUSAGE_SELF).ru_maxrss` of that process (whole run,
  model loading included);
- the peak during prefill + generation alone: the kernel's high-water mark (VmHWM) reset
  through /proc/self/clear_refs right after the model is loaded (None where unsupported);
- the RSS after loading, and the KV bytes held at the end (EccoCache: `memory_report()`
  total_bytes; DynamicCache: the nbytes of every layer's keys and values) with their fp16
  equivalent.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eccokv.eval import common as E
from eccokv.hf.cache import kv_bytes

DEFAULT_KINDS = ("dynamic", "ecco4", "ecco4+decode")  # ecco4: the default, fused attention


def _rss_status() -> dict[str, int | None]:
    out: dict[str, int | None] = {"VmRSS": None, "VmHWM": None}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            k = line.split(":", 1)[0]
            if k in out:
                out[k] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # Linux reports KiB



def worker(kind: str, model_name: str, prompt_tokens: int, new_tokens: int, chunk: int,
           residual: int) -> dict[str, Any]:
    """One measurement in this process (call it in a fresh process)."""
    import torch

    from eccokv import data, models

    t0 = time.perf_counter()
    model, tok = models.load(model_name)
    title, text = data.long_document(tok, min_tokens=prompt_tokens)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:prompt_tokens]])
    loaded = {"maxrss_after_load": _maxrss_bytes(), **{f"{k}_after_load": v
                                                       for k, v in _rss_status().items()}}
    reset = _reset_hwm()
    t1 = time.perf_counter()
    cache = E.make_cache(kind, model.config, residual)
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            logits = E.forward_last(model, ids[:, s:s + chunk], cache)
        t2 = time.perf_counter()
        out = E.greedy(model, cache, logits, new_tokens)
    t3 = time.perf_counter()
    st = _rss_status()
    cfg = dict(E.describe_cache(kind, residual),
               attn_implementation=getattr(model.config, "_attn_implementation", None))
    return {"kind": kind, "config": cfg, "article": title,
            "prompt_tokens": int(ids.shape[1]), "new_tokens": len(out),
            "peak_rss_bytes": _maxrss_bytes(),
            "peak_rss_after_load_bytes": st["VmHWM"] if reset else None,
            "rss_end_bytes": st["VmRSS"], **loaded, **kv_bytes(cache),
            "cache_tokens": cache.get_seq_length(), "prefill_s": t2 - t1,
            "decode_s_per_token": (t3 - t2) / max(1, len(out) - 1), "total_s": t3 - t0,
            "generated_ids": out}


def run(model_name: str = "smollm2", kinds: Sequence[str] = DEFAULT_KINDS,
        prompt_tokens: int = 7000, new_tokens: int = 32, chunk: int = 1024,
        residual: int = 128, out_dir: str | Path | None = "benchmarks",
        show_progress: bool = True, command: str | None = None) -> dict[str, Any]:
    """Run each kind in a fresh subprocess; write memory.{json,md} into out_dir."""
    t0 = time.perf_counter()
    env = E.environment()
    rows = []
    for kind in E.progress(kinds, total=len(kinds), desc="eval memory", enabled=show_progress):
        cmd = [sys.executable, "-m", "eccokv.eval.memory", "--worker", kind, "--model",
               model_name, "--prompt-tokens", str(prompt_tokens), "--new-tokens",
               str(new_tokens), "--chunk", str(chunk), "--residual", str(residual)]
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            raise RuntimeError(f"memory worker {kind!r} failed ({p.returncode}): "
                               f"{p.stderr.strip()[-2000:]}")
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    result: dict[str, Any] = {
        "evaluation": "memory",
        "command": command or "eccokv eval memory",
        "model": {"name": model_name},
        "data": {"article": rows[0]["article"] if rows else None,
                 "prompt_tokens": prompt_tokens,
                 "description": f"first {prompt_tokens} tokens of the Wikipedia article "
                                f"{rows[0]['article'] if rows else '?'!r} "
                                "(eccokv.data.long_document)"},
        "protocol": {"chunk": chunk, "new_tokens": new_tokens, "residual": residual,
                     "text": __doc__},
        "environment": env,
        "rows": rows,
    }
    by = {r["kind"]: r for r in rows}
    if "dynamic" in by:
        base = by["dynamic"]
        for r in rows:
            r["peak_rss_minus_dynamic_bytes"] = r["peak_rss_bytes"] - base["peak_rss_bytes"]
            if r["peak_rss_after_load_bytes"] and base["peak_rss_after_load_bytes"]:
                r["run_peak_minus_dynamic_bytes"] = (r["peak_rss_after_load_bytes"]
                                                     - base["peak_rss_after_load_bytes"])
            r["same_output_as_dynamic"] = r["generated_ids"] == base["generated_ids"]
    result["targets"] = check_targets(by)
    result["seconds"] = time.perf_counter() - t0
    if out_dir is not None:
        E.write_reports(result, to_markdown(result), out_dir, "memory")
    return result


def check_targets(by: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Peak RSS with ecco4 (each variant measured) measurably lower than with DynamicCache."""
    d = by.get("dynamic")
    kinds = [k for k in by if E.parse_name(k)[0] == "ecco4"]
    if d is None or not kinds:
        return [{"target": "peak RSS with ecco4 lower than DynamicCache", "met": None,
                 "detail": "needs both ecco4 and dynamic"}]
    out = []
    for k in kinds:
        e = by[k]
        diff = e["peak_rss_bytes"] - d["peak_rss_bytes"]
        # "measurably": more than 2% of the DynamicCache peak
        out.append({"target": f"peak RSS with {k} measurably (> 2%) lower than DynamicCache",
                    "met": diff < -0.02 * d["peak_rss_bytes"],
                    "detail": f"{k} {e['peak_rss_bytes'] / 2**20:.0f} MiB vs DynamicCache "
                              f"{d['peak_rss_bytes'] / 2**20:.0f} MiB ({diff / 2**20:+.0f} MiB, "
                              f"{100 * diff / d['peak_rss_bytes']:+.1f}%)"})
    return out


def to_markdown(result: dict[str, Any]) -> str:
    """memory.md."""
    p = result["protocol"]
    mib = lambda b: "-" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    lines = ["# Peak memory of a long generation (`eccokv eval memory`)", "",
             *E.provenance_lines(result), "", "## Protocol", "",
             f"Each cache in its own fresh process: load the model, prefill "
             f"{result['data']['prompt_tokens']} Wikipedia tokens through the cache in chunks "
             f"of {p['chunk']}, generate {p['new_tokens']} tokens greedily. Peak RSS = "
             "getrusage(RUSAGE_SELF).ru_maxrss (whole process, model load included); 'run "
             "peak' = the kernel's RSS high-water mark reset after the model load (prefill + "
             "generation only). KV bytes at the end: EccoCache memory_report() total_bytes; "
             "DynamicCache: keys + values nbytes (float32 model).", "", "## Results", ""]
    lines += E.md_table(
        ["cache", "peak RSS MiB", "vs dynamic MiB", "run peak MiB (after load)",
         "RSS after load MiB", "KV MiB", "KV fp16-equiv MiB", "KV vs fp16", "prefill s",
         "s/token", "same tokens as dynamic"],
        [[r["kind"], mib(r["peak_rss_bytes"]), mib(r.get("peak_rss_minus_dynamic_bytes")),
          mib(r["peak_rss_after_load_bytes"]), mib(r.get("VmRSS_after_load")),
          mib(r["kv_bytes"]), mib(r["fp16_bytes"]), f"{r['kv_bytes'] / r['fp16_bytes']:.3f}",
          f"{r['prefill_s']:.1f}", f"{r['decode_s_per_token']:.2f}",
          r.get("same_output_as_dynamic", "-")] for r in result["rows"]])
    lines += ["", "## Target", ""]
    lines += E.md_table(["target", "met", "detail"],
                        [[t["target"], {True: "met", False: "NOT met", None: "-"}[t["met"]],
                          t["detail"]] for t in result["targets"]])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: `python -m eccokv.eval.memory --worker KIND ...` prints JSON."""
    ap = argparse.ArgumentParser(prog="python -m eccokv.eval.memory")
    ap.add_argument("--worker", required=True)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompt-tokens", type=int, default=7000)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--residual", type=int, default=128)
    a = ap.parse_args(argv)
    res = worker(a.worker, a.model, a.prompt_tokens, a.new_tokens, a.chunk, a.residual)
    print(json.dumps(res, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
