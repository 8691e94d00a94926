"""numba threading layers x OpenMP wait policy on this machine (-> threading_layers.json).

python benchmarks/threading_layers.py [--rounds 3]

Each configuration runs in a fresh process (the layer and libgomp's wait policy are fixed
at start), in interleaved rounds; figures are medians. Per configuration:
- launch_us: one launch of a trivial 2-iteration parallel kernel;
- attn_ms: fused_attention, ecco4 cache [3, 4096, 64] (4 chunks of 1024), 9 query heads;
- step_ms: a decode-step-like mix: a [1, 576] x [576, 1536] torch matmul (torch's own OpenMP
  threads) then the same fused_attention, 30 times;
- two_threads: two Python threads calling fused_attention at once ("ok" or how it died).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "workqueue": {"NUMBA_THREADING_LAYER": "workqueue"},
    "workqueue+passive": {"NUMBA_THREADING_LAYER": "workqueue", "OMP_WAIT_POLICY": "PASSIVE"},
    "omp": {"NUMBA_THREADING_LAYER": "omp"},
    "omp+passive": {"NUMBA_THREADING_LAYER": "omp", "OMP_WAIT_POLICY": "PASSIVE"},
    "tbb": {"NUMBA_THREADING_LAYER": "tbb"},
    "tbb+passive": {"NUMBA_THREADING_LAYER": "tbb", "OMP_WAIT_POLICY": "PASSIVE"},
    "eccokv default (no env)": {},
    "eccokv default (torch imported first)": {"BENCH_TORCH_FIRST": "1"},
    "omp 1 thread": {"NUMBA_THREADING_LAYER": "omp", "BENCH_THREADS": "1"},
}


def child() -> None:
    if os.environ.get("BENCH_TORCH_FIRST"):
        import torch  # noqa: F401  (libgomp initialised before eccokv can choose)
    # eccokv first, as the `eccokv` commands do: it chooses the settings
    eccokv = importlib.import_module("eccokv")
    import numpy as np
    import torch
    from numba import njit, prange

    from eccokv.kernels.attention import fused_attention

    @njit(parallel=True, cache=True)
    def tiny(a):
        for i in prange(a.shape[0]):
            a[i] += 1.0

    nt = int(os.environ.get("BENCH_THREADS", "2"))
    import numba

    numba.set_num_threads(nt)
    a = np.zeros(2)
    tiny(a)
    res: dict = {"layer": numba.threading_layer(), "threads": nt,
                 "omp_wait_policy": eccokv.runtime.info()["omp_wait_policy"]}
    laps = []
    for _ in range(15):
        t = time.perf_counter()
        for _ in range(200):
            tiny(a)
        laps.append((time.perf_counter() - t) / 200 * 1e6)
    res["launch_us"] = statistics.median(laps)

    codec = eccokv.codecs.get("ecco4")
    g = torch.Generator().manual_seed(0)
    k = torch.randn(3, 4096, 64, generator=g)
    v = torch.randn(3, 4096, 64, generator=g)
    kc = [codec.encode(k[:, i:i + 1024], axis=1) for i in range(0, 4096, 1024)]
    vc = [codec.encode(v[:, i:i + 1024], axis=1) for i in range(0, 4096, 1024)]
    q = torch.randn(9, 1, 64, generator=g)

    def attn():
        return fused_attention(q, kc, None, vc, None, scaling=0.125, num_threads=nt)

    ref = attn()
    laps = []
    for _ in range(21):
        t = time.perf_counter()
        attn()
        laps.append((time.perf_counter() - t) * 1e3)
    res["attn_ms"] = statistics.median(laps)

    x = torch.randn(1, 576)
    w = torch.randn(576, 1536)
    laps = []
    for _ in range(30):
        t = time.perf_counter()
        for _ in range(4):
            x @ w
        attn()
        laps.append((time.perf_counter() - t) * 1e3)
    res["step_ms"] = statistics.median(laps)

    print("RESULT " + json.dumps(res), flush=True)
    import threading

    errs = []

    def worker():
        try:
            for _ in range(20):
                if not torch.equal(attn(), ref):
                    errs.append("wrong result")
        except Exception as e:  # noqa: BLE001
            errs.append(repr(e))

    ts = [threading.Thread(target=worker) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print("THREADS " + ("ok" if not errs else errs[0]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default=str(Path(__file__).with_name("threading_layers.json")))
    args = ap.parse_args()
    names = args.configs.split(",")
    base = {k: v for k, v in os.environ.items()
            if k not in ("NUMBA_THREADING_LAYER", "OMP_WAIT_POLICY", "BENCH_THREADS",
                         "BENCH_TORCH_FIRST")}
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names:
            env = dict(base, **CONFIGS[n])
            p = subprocess.run([sys.executable, __file__, "--child"], env=env,
                               capture_output=True, text=True, timeout=600)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if line:
                runs[n].append(json.loads(line[0][7:]))
                th = [x for x in p.stdout.splitlines() if x.startswith("THREADS ")]
                runs[n][-1]["two_threads"] = th[0][8:] if th else (
                    f"died (rc {p.returncode}): " + p.stderr.strip().splitlines()[-1][:120]
                    if p.stderr.strip() else f"died (rc {p.returncode})")
            else:
                runs[n].append({"error": f"rc {p.returncode}: {p.stderr.strip()[-300:]}"})
            print(r, n, runs[n][-1], flush=True)
    summary = {}
    for n, rs in runs.items():
        ok = [x for x in rs if "error" not in x]
        summary[n] = {"env": CONFIGS[n], "runs": len(rs), "failed": len(rs) - len(ok)}
        if ok:
            summary[n]["layer"] = ok[0]["layer"]
            for m in ("launch_us", "attn_ms", "step_ms"):
                summary[n][m] = statistics.median(x[m] for x in ok)
            summary[n]["two_threads"] = sorted({x["two_threads"] for x in ok})
        else:
            summary[n]["error"] = rs[0]["error"]
    Path(args.out).write_text(json.dumps({
        "command": "python benchmarks/threading_layers.py " + " ".join(sys.argv[1:]),
        "load_average": os.getloadavg(), "summary": summary, "runs": runs}, indent=1) + "\n")
    for n, s in summary.items():
        print(f"{n:26s} {json.dumps({k: v for k, v in s.items() if k != 'env'})}")


if __name__ == "__main__":
    if "--child" in sys.argv:
        child()
    else:
        main()
