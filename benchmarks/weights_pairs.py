"""Head-to-head paired comparisons of weight configurations from `eccokv eval weights`
result files: ppl of A relative to B over the same windows (paired bootstrap 5-95%,
`eccokv.eval.common.paired_rel_change`), lossless KV cache.

    .venv/bin/python benchmarks/weights_pairs.py  # -> benchmarks/weights_pairs.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from eccokv.eval.common import paired_rel_change

HERE = Path(__file__).parent
FILES = {"8 windows": HERE / "weights.json", "32 windows": HERE / "weights-32windows/weights.json"}
PAIRS = [("ecco4+cal", "hqq4"), ("ecco4+cal", "int4"), ("ecco4", "int4"), ("ecco4", "hqq4"),
         ("ecco4+cal", "quanto-int4"), ("ecco3+cal", "int4")]


def main() -> int:
    out = ["# Compressed weights: paired head-to-head comparisons", "",
           "Command: `.venv/bin/python benchmarks/weights_pairs.py` (from the committed "
           "result files named below; SmolLM2, lossless KV cache). Change of A's perplexity "
           "relative to B's on the same windows; paired bootstrap over windows, 5-95%.", "",
           "| windows | A | B | A vs B | 5-95% | source digest |", "|---|---|---|---|---|---|"]
    for label, path in FILES.items():
        if not path.is_file():
            continue
        res = json.loads(path.read_text())
        rows = {r["weights"]: r for r in res["ppl"]["rows"] if r["kv"] == "none"}
        digest = res["environment"]["source_digest"]
        for a, b in PAIRS:
            if a in rows and b in rows:
                d = paired_rel_change(rows[a]["window_nll"], rows[b]["window_nll"])
                out.append(f"| {label} ({path.relative_to(HERE)}) | {a} | {b} | "
                           f"{d['rel_change_pct']:+.1f}% | {d['ci_low_pct']:+.1f} .. "
                           f"{d['ci_high_pct']:+.1f} | `{digest}` |")
    (HERE / "weights_pairs.md").write_text("\n".join(out) + "\n")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
