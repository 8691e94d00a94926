"""`make demo` / `eccokv demo`: a real model answers a question about a long article
with a compressed KV cache and compressed weights, next to the plain model.

1. SmolLM2 reads a Wikipedia article (>= 3K tokens) and answers a question about it three
   times: the plain model with transformers' DynamicCache, the plain model with
   EccoCache(ecco4), and the model with ecco4-compressed Linear weights
   (`eccokv.weights`, activation-aware) and EccoCache(ecco4). Printed: the answers, how
   many answer tokens agree with the plain run, the model and KV bytes of each, and the
   time each run took, all measured in this run.
2. The same article's K/V of every layer compressed by each codec: bits/value (all bytes
   counted), size against fp16, relative error of K and V, encode/decode speed.

No timing includes numba compilation: before the timed runs, every path they take runs
once untimed on a short input (`warm_paths`); if a kernel had to be compiled there (not
found in the cache `make setup` fills), the demo says which and how long it took.
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


# A question per article whose answer is in the compressed part of the cache (early in
# the article); other articles get a generic question.
QUESTIONS = {
    "Android (robot)": "From which language's root was the word android coined, and what "
                       "does the suffix -oid mean?",
}
GENERIC_QUESTION = "In two sentences, what is the article above about?"


def warm_paths(model: Any, ids: torch.Tensor, codec: str, codec_names: Sequence[str],
               kv_axes: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """Run what the timed parts run, once, untimed and short: generate() with DynamicCache
    and EccoCache(codec) on the first 400 tokens (3 new: the fused decode steps), and an
    encode/decode of one layer's K/V slice per codec. Returns the seconds taken and the
    numba functions that compiled ({} when everything came from the cache)."""
    from transformers import DynamicCache

    from eccokv import warmup
    from eccokv.hf.cache import EccoCache
    from eccokv.hf.capture import capture_kv

    before = warmup.compile_counts()
    t0 = time.perf_counter()
    short = ids[:, :400]
    for cache in (DynamicCache(config=model.config), EccoCache(model.config, codec)):
        with torch.no_grad():
            model.generate(short, attention_mask=torch.ones_like(short), do_sample=False,
                           max_new_tokens=3, past_key_values=cache, pad_token_id=0)
    k, v = capture_kv(model, short[:, :256])[0]
    for name in codec_names:
        c = codecs.get(name)
        ak, av = (kv_axes or {}).get(c.codec_id, AXES.get(c.codec_id, DEFAULT_AXES))
        ck, cv = c.encode(k, axis=ak), c.encode(v, axis=av)
        c.decode(ck), c.decode(cv)
    return {"seconds": time.perf_counter() - t0, "compiled": warmup.compiled_since(before)}


def _say_warm(w: dict[str, Any], say: Any) -> None:
    n = sum(w["compiled"].values())
    if n:
        names = ", ".join(sorted(k.rsplit(".", 1)[-1] for k in w["compiled"]))
        say(f"Compiled {n} numba kernel signature(s) first ({names}): {w['seconds']:.1f} s, "
            "not included in any time below (run `eccokv warmup` once to fill the cache).")
    else:
        say(f"Kernels loaded from the compiled cache (untimed check run {w['seconds']:.1f} s; "
            "nothing compiled).")



def compress_weights(model: Any, tok: Any, weights_codec: str, say: Any = print) -> Any:
    """A copy of `model` with its Linear layers compressed by `weights_codec`,
    activation-aware on eight news windows (text the question's article is not part of)."""
    import copy

    from eccokv import data
    from eccokv.weights import compress_model

    t0 = time.perf_counter()
    calib = list(data.token_windows(tok, "news", window=512, n=8))
    cm = compress_model(copy.deepcopy(model), weights_codec, calibration=calib)
    say(f"Compressed the Linear weights with {weights_codec} (activation-aware, 8 x 512 "
        f"calibration tokens of news text) in {time.perf_counter() - t0:.1f} s")
    return cm


def model_bytes(model: Any) -> int:
    """Every byte of the model's parameters and buffers (compressed weights included)."""
    seen, n = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


def answer_question(model: Any, tok: Any, title: str, text: str, codec: str = "ecco4",
                    max_new_tokens: int = 48, say: Any = print,
                    cmodel: Any = None, weights_codec: str | None = None) -> dict[str, Any]:
    """Answer QUESTIONS[title] about `text` with DynamicCache, with EccoCache(codec), and
    (if `cmodel`, the model with compressed weights, is given) with both compressed."""
    from transformers import DynamicCache

    from eccokv.hf.cache import EccoCache, kv_bytes

    question = QUESTIONS.get(title, GENERIC_QUESTION)
    msgs = [{"role": "user", "content": f"{text}\n\n{question}"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    n = int(ids.shape[1])
    say(f"Question ({n} prompt tokens): {question}")
    dt0 = str(next(iter(model.parameters())).dtype).replace("torch.", "")
    plan = [("plain", f"plain ({dt0})", model, None),
            (codec, f"KV {codec}", model, codec)]
    if cmodel is not None:
        plan.append(("weights+kv", f"weights {weights_codec} + KV {codec}", cmodel, codec))
    runs = {}
    for name, label, m, kvc in plan:
        cache = DynamicCache(config=m.config) if kvc is None else EccoCache(m.config, kvc)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = m.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, past_key_values=cache,
                             pad_token_id=tok.eos_token_id)
        dt = time.perf_counter() - t0
        gen = out[0, n:]
        kb = kv_bytes(cache)
        if kvc is not None:
            rep = cache.memory_report()
        runs[name] = {"label": label, "answer": tok.decode(gen, skip_special_tokens=True).strip(),
                      "tokens": gen.tolist(), "seconds": dt, "kv_bytes": kb["kv_bytes"],
                      "fp16_bytes": kb["fp16_bytes"], "new_tokens": int(gen.numel()),
                      "model_bytes": model_bytes(m)}
    a = runs["plain"]["tokens"]
    for r in runs.values():
        r["same_tokens"] = sum(x == y for x, y in zip(a, r["tokens"], strict=False))
    for r in runs.values():
        say(f"\n[{r['label']}] {r['answer']}")
    p = runs["plain"]
    mib = 2.0 ** 20
    say("")
    say(f"{'run':30s} {'model MiB':>9s} {'KV MiB':>8s} {'KV/plain':>8s} {'time s':>7s} "
        f"{'tok/s':>6s} {'same tokens':>11s}")
    for r in runs.values():
        say(f"{r['label']:30s} {r['model_bytes'] / mib:9.1f} {r['kv_bytes'] / mib:8.2f} "
            f"{r['kv_bytes'] / p['kv_bytes']:8.3f} {r['seconds']:7.2f} "
            f"{r['new_tokens'] / r['seconds']:6.1f} {r['same_tokens']:>5d}/{len(a)}")
    say(f"fp16 equivalent of the KV: {p['fp16_bytes'] / mib:.2f} MiB; model MiB counts every "
        "parameter and buffer (the tied embedding / LM head stays uncompressed).")
    k0 = rep["layers"][0]["key"]
    say(f"EccoCache kept {k0['sink_tokens']} first and {k0['exact_tokens']} most recent tokens "
        f"exact (model dtype) and compressed {k0['compressed_tokens']}; attention reads the "
        "compressed tokens straight from their blocks, and compressed Linear layers decode "
        "their blocks inside the matmul (fused decode-GEMV per generated token). Time and "
        "tok/s cover the whole generate() call, prefill included.")
    e = runs[codec]
    return {"question": question, "prompt_tokens": n, "runs": runs,
            "agreement": e["same_tokens"] / max(len(a), 1),
            "kv_ratio_vs_plain": e["kv_bytes"] / p["kv_bytes"],
            "kv_ratio_vs_fp16": e["kv_bytes"] / e["fp16_bytes"]}


def run_demo(model_name: str = "smollm2", codec_names: Sequence[str] = ("ecco4",),
             min_tokens: int = 3000, verbose: bool = True, qa_codec: str = "ecco4",
             max_new_tokens: int = 48, weights_codec: str | None = "ecco4") -> dict[str, Any]:
    from eccokv import data, models
    from eccokv.hf.capture import capture_kv

    say = print if verbose else (lambda *a, **k: None)
    t0 = time.perf_counter()
    model, tok = models.load(model_name)
    title, text = data.long_document(tok, min_tokens=min_tokens)
    ids = tok(text, return_tensors="pt").input_ids
    say(f"Model {model_name}; article '{title}' ({ids.shape[1]} tokens); loading took "
        f"{time.perf_counter() - t0:.1f} s")
    warm = warm_paths(model, ids, qa_codec, codec_names)
    _say_warm(warm, say)
    say("")
    say("== 1. Question answering with a compressed KV cache (and compressed weights) ==")
    cmodel = compress_weights(model, tok, weights_codec, say) if weights_codec else None
    qa = answer_question(model, tok, title, text, qa_codec, max_new_tokens, say, cmodel,
                         weights_codec)
    say("")
    say("== 2. The article's KV cache compressed by each codec ==")
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
            "warmup": warm, "qa": qa, "prefill_s": prefill, "fp16_bytes": fp16_bytes, "rows": rows}
