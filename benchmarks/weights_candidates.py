"""How many Ecco patterns to try exactly per weight group (`candidates`): SmolLM2
perplexity on 4 x 512 Wikipedia tokens with activation-aware ecco4 weights (moments from
4 x 512 news tokens), and the encode time, per candidate count.

    .venv/bin/python benchmarks/weights_candidates.py  # -> benchmarks/weights_candidates.md
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import eccokv  # noqa: F401  (runtime settings before torch)

sys.path.insert(0, str(Path(__file__).parent))

import weights_profile as B  # noqa: E402

from eccokv import codecs, data, models, provenance  # noqa: E402
from eccokv.weights import activation_moments, linear_layers  # noqa: E402


def main() -> int:
    env = provenance.environment()
    smol, tok = models.load("smollm2")
    names = linear_layers(smol)
    mom = activation_moments(smol, B._smol_calib(tok), names)
    win = data.token_windows(tok, "wiki", window=512, n=4)
    rows = [("float", B.ppl(smol, win), 0.0)]
    for cand in (2, 8, 32):
        cod = codecs.get({"id": "ecco", "variant": "ecco4", "profile": "weights",
                          "candidates": cand})
        m = copy.deepcopy(smol)
        t = time.perf_counter()
        ws, _ = B.compress_weights(m, cod, names, mom)
        te = time.perf_counter() - t
        B.set_weights(m, ws)
        rows.append((f"ecco4, {cand} candidates", B.ppl(m, win), te))
        print(rows[-1], flush=True)
    out = ["# Ecco weights: exact pattern candidates per group", "",
           "Command: `.venv/bin/python benchmarks/weights_candidates.py`  ",
           provenance.header_line(env),
           "SmolLM2 perplexity on 4 x 512 Wikipedia tokens (the dequantised float model is "
           "the reference), activation-aware ecco4 weights with the shipped weights profile; "
           "encode seconds for all 210 Linear layers on this 2-core machine.", "",
           "| weights | ppl | encode s |", "|---|---|---|"]
    out += [f"| {n} | {p:.3f} | {t:.1f} |" for n, p, t in rows]
    Path(__file__).with_name("weights_candidates.md").write_text("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
