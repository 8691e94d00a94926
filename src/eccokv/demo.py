"""`make demo` / `eccokv demo`: compress the real KV cache of a long Wikipedia article.

SmolLM2 reads a real article (>= 3K tokens); its K/V of every layer are compressed by each
codec; the demo prints bits/value (all bytes counted), the KV-cache size against fp16,
relative error of K and V, and encode/decode speed, measured in this run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from eccokv import codecs

# Grouping axis of K and V per codec family (dim 2 = tokens, -1 = channels of one token).
# Keys are always grouped per channel over tokens (outlier channels); Ecco groups values
# the same way; int/KIVI group values per token as KIVI does.
AXES = {"ecco": (2, 2)}
DEFAULT_AXES = (2, -1)


def _encode_all(codec: codecs.Codec, kv: list[tuple[torch.Tensor, torch.Tensor]],
                axes: tuple[int, int]) -> tuple[list[Any], float]:
    t0 = time.perf_counter()
    out = [(codec.encode(k, axis=axes[0]), codec.encode(v, axis=axes[1])) for k, v in kv]
    return out, time.perf_counter() - t0


def run_demo(model_name: str = "smollm2", codec_names: Sequence[str] = ("ecco4",),
             min_tokens: int = 3000, verbose: bool = True) -> dict[str, Any]:
    from eccokv import data, models
    from eccokv.hf.capture import capture_kv

    say = print if verbose else (lambda *a, **k: None)
    t0 = time.perf_counter()
    model, tok = models.load(model_name)
    title, text = data.long_document(tok, min_tokens=min_tokens)
    ids = tok(text, return_tensors="pt").input_ids
    say(f"Model {model_name}; article '{title}' ({ids.shape[1]} tokens); loading took "
        f"{time.perf_counter() - t0:.1f} s")
    t1 = time.perf_counter()
    kv = capture_kv(model, ids)
    prefill = time.perf_counter() - t1
    fp16_bytes = sum(2 * (k.numel() + v.numel()) for k, v in kv)
    say(f"Prefill (forward pass, fills the KV cache): {prefill:.2f} s; fp16 KV cache: "
        f"{fp16_bytes / 2**20:.2f} MiB ({len(kv)} layers x K,V {tuple(kv[0][0].shape)})")
    rows = []
    for name in codec_names:
        codec = codecs.get(name)
        axes = AXES.get(codec.codec_id, DEFAULT_AXES)
        comp, te = _encode_all(codec, kv, axes)
        td = 0.0
        err_k = err_v = sig_k = sig_v = 0.0
        for (ck, cv), (k, v) in zip(comp, kv, strict=True):
            t2 = time.perf_counter()
            dk, dv = codec.decode(ck), codec.decode(cv)
            td += time.perf_counter() - t2
            err_k += (dk.double() - k.double()).pow(2).sum().item()
            err_v += (dv.double() - v.double()).pow(2).sum().item()
            sig_k += k.double().pow(2).sum().item()
            sig_v += v.double().pow(2).sum().item()
        nbytes = sum(ck.nbytes + cv.nbytes for ck, cv in comp)
        numel = sum(k.numel() + v.numel() for k, v in kv)
        st = codec.stats()
        rows.append({
            "codec": name, "bits_per_value": 8 * nbytes / numel, "kv_bytes": nbytes,
            "vs_fp16": nbytes / fp16_bytes, "rel_rmse_K": (err_k / sig_k) ** 0.5,
            "rel_rmse_V": (err_v / sig_v) ** 0.5, "encode_s": te, "decode_s": td,
            "encode_fraction_of_prefill": te / prefill,
            "fallback_rate": st.get("fallback_rate"),
        })
    say("")
    say(f"{'codec':8s} {'bits/val':>8s} {'KV MiB':>8s} {'vs fp16':>8s} {'relerr K':>9s} "
        f"{'relerr V':>9s} {'enc s':>7s} {'dec s':>7s} {'enc/prefill':>11s}")
    say(f"{'fp16':8s} {16.0:8.3f} {fp16_bytes / 2**20:8.2f} {1.0:8.3f} {0:9.4f} {0:9.4f}")
    for r in rows:
        say(f"{r['codec']:8s} {r['bits_per_value']:8.3f} {r['kv_bytes'] / 2**20:8.2f} "
            f"{r['vs_fp16']:8.3f} {r['rel_rmse_K']:9.4f} {r['rel_rmse_V']:9.4f} "
            f"{r['encode_s']:7.2f} {r['decode_s']:7.2f} "
            f"{100 * r['encode_fraction_of_prefill']:10.1f}%")
    say("")
    say("bits/value counts every byte of the self-contained compressed form (metadata "
        "included). Errors are relative RMSE against the uncompressed K and V.")
    n = int(ids.shape[1])
    if n % 128:
        say(f"Groups of 128 tokens: {n} tokens = {n // 128} x 128 + {n % 128}, so the last "
            "group of each channel is padded (fixed-size Ecco blocks); the KV cache keeps "
            "such recent tokens exact instead.")
    return {"model": model_name, "article": title, "tokens": int(ids.shape[1]),
            "prefill_s": prefill, "fp16_bytes": fp16_bytes, "rows": rows}
