"""`eccokv eval needle`: retrieve a seeded fact hidden in long Wikipedia text.

A needle sentence ("The secret passcode is 483920.") is inserted at a sentence boundary
at several depths of one long Wikipedia article cut to about 2K, 4K and 7K tokens; the
chat-templated prompt ends with a question. Protocol per (context, depth):

1. the context (system prompt, start of the user turn, haystack with the needle) is
   prefilled exactly once through a DynamicCache in chunks of `chunk` tokens;
2. for each cache its K/V are loaded into the cache (`common.replay`: the same per-layer
   `update` calls a prefill makes; the cache compresses everything older than its exact
   window, which always includes the needle);
3. the question and the assistant header are read through the cache in one forward (so
   the question attends to the compressed haystack), then up to `max_new` tokens are
   generated greedily through it.

retrieved = the answer contains the fact (case, spaces and punctuation ignored).
`prefill="chunked"` instead prefills every cache itself, chunk by chunk, so later chunks
also read earlier ones compressed (stricter, and ~codecs x slower).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from eccokv.eval import common as E

DEFAULT_CODECS = ("none", "ecco4", "ecco3", "ecco2", "kivi4", "kivi2", "int4")
DEFAULT_CONTEXTS = (2048, 4096, 7168)
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)  # 0.1..0.9 in steps of 0.2 doubles the run time
NEEDLE = "The secret passcode is {fact}."
QUESTION = "What is the secret passcode mentioned in the text above? Answer with the number only."
ANSWER_PREFIX = "The secret passcode is"  # starts the assistant turn: the number comes next
REFERENCE = "none"


def compressed_span(name: str, config: Any, residual: int, head_tokens: int
                    ) -> tuple[int, int] | None:
    """Token range [start, end) that cache `name` holds compressed right after a prefill of
    `head_tokens` tokens (None for caches other than EccoCache), read from a real cache
    layer fed zeros of that length."""
    if E.is_hf(name) or name == "dynamic":
        return None
    c = E.make_cache(name, config, residual)
    text = config.get_text_config(decoder=True)
    H = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    D = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    z = torch.zeros(1, H, head_tokens, D)
    c.layers[0].update(z, z)
    rep = c.layers[0].memory_report()["key"]
    start = rep.get("sink_tokens", 0)
    return start, start + rep["compressed_tokens"]


def make_fact(seed: int, index: int) -> str:
    """A seeded 6-digit number (no leading zero), different per case index."""
    return str(random.Random(seed * 100_003 + index).randint(100_000, 999_999))


def insert_needle(text: str, needle: str, depth: float) -> tuple[str, int]:
    """Insert `needle` after the first sentence end at or after `depth` of the text.

    Returns the new text and the character position of the needle."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    p = int(depth * len(text))
    m = re.compile(r"[.!?](\s)").search(text, p)
    pos = m.start(1) if m else len(text)
    return text[:pos] + " " + needle + text[pos:], pos + 1


def cut_tokens(tokenizer: Any, text: str, n: int) -> str:
    """The longest prefix of `text` holding at most `n` tokens (cut on a token boundary)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                    verbose=False)
    offs = enc["offset_mapping"]
    return text if len(offs) <= n else text[: offs[n - 1][1]]


def build_cases(tokenizer: Any, contexts: Sequence[int], depths: Sequence[float],
                seed: int, haystack: str) -> list[dict[str, Any]]:
    """One case per (context, depth): prompt token ids split at the end of the context."""
    cases = []
    probe_head, probe_tail = E.chat_split(tokenizer, "", QUESTION, answer_prefix=ANSWER_PREFIX)
    overhead = len(probe_head) + len(probe_tail) + 16  # template, question, needle
    for ctx in contexts:
        hay = cut_tokens(tokenizer, haystack, ctx - overhead)
        for depth in depths:
            fact = make_fact(seed, len(cases))
            text, pos = insert_needle(hay, NEEDLE.format(fact=fact), depth)
            head, tail = E.chat_split(tokenizer, text, QUESTION, answer_prefix=ANSWER_PREFIX)
            cases.append({"context": ctx, "depth": depth, "fact": fact, "head": head,
                          "tail": tail, "tokens": len(head) + len(tail),
                          "needle_char": pos, "needle_token_depth": None})
            pre = tokenizer(text[:pos], add_special_tokens=False)["input_ids"]
            ndl = tokenizer(NEEDLE.format(fact=fact), add_special_tokens=False)["input_ids"]
            start = len(probe_head) + len(pre)  # template before the context + text before
            cases[-1].update(needle_token_depth=round(start / max(1, len(head)), 3),
                             needle_tokens=[start, start + len(ndl)], head_tokens=len(head))
    return cases


@torch.no_grad()
def answer(model: Any, tokenizer: Any, case: dict[str, Any], cache: Any,
           prefill: tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor] | None,
           chunk: int, max_new: int, stop: Sequence[int]) -> list[int]:
    """Generated token ids for one case through `cache` (see the module docstring)."""
    head = torch.tensor([case["head"]])
    if prefill is not None:
        E.replay(cache, prefill[0])
    else:
        for s in range(0, head.shape[1], chunk):
            model(head[:, s:s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    first = E.forward_last(model, torch.tensor([case["tail"]]), cache)
    return E.greedy(model, cache, first, max_new, stop)


def run(model_name: str = "smollm2", codecs: Sequence[str] = DEFAULT_CODECS,
        contexts: Sequence[int] = DEFAULT_CONTEXTS, depths: Sequence[float] = DEFAULT_DEPTHS,
        residual: int = 128, seed: int = 0, chunk: int = 1024, max_new: int = 10,
        prefill: str = "shared", out_dir: str | Path | None = "benchmarks",
        show_progress: bool = True, command: str | None = None, model: Any = None,
        tokenizer: Any = None, haystack: tuple[str, str] | None = None) -> dict[str, Any]:
    """Run every case with every cache; write needle.{json,md} into out_dir."""
    from eccokv import data, models

    if prefill not in ("shared", "chunked"):
        raise ValueError(f"prefill must be 'shared' or 'chunked', got {prefill!r}")
    t0 = time.perf_counter()
    env = E.environment()
    if model is None:
        model, tokenizer = models.load(model_name)
    if haystack is None:
        haystack = data.long_document(tokenizer, min_tokens=max(contexts))
    title, hay = haystack
    cases = build_cases(tokenizer, contexts, depths, seed, hay)
    names = list(dict.fromkeys([REFERENCE, *codecs]))
    stop = E.stop_token_ids(tokenizer)
    rows: list[dict[str, Any]] = []
    jobs = [(i, n) for i in range(len(cases)) for n in names]
    pre = None
    current = -1
    for i, n in E.progress(jobs, total=len(jobs), desc="eval needle", enabled=show_progress):
        case = cases[i]
        if prefill == "shared" and i != current:
            pre = E.exact_prefill(model, torch.tensor([case["head"]]), chunk)
            current = i
        t1 = time.perf_counter()
        cache = E.make_cache(n, model.config, residual)
        ids = answer(model, tokenizer, case, cache, pre if prefill == "shared" else None,
                     chunk, max_new, stop)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        span = compressed_span(n, model.config, residual, case["head_tokens"])
        a, b = case["needle_tokens"]
        rows.append({"codec": n, "context": case["context"], "depth": case["depth"],
                     "fact": case["fact"], "answer": text, "answer_ids": ids,
                     "compressed_span": span,
                     "needle_compressed": None if span is None else span[0] <= a and b <= span[1],
                     "retrieved": E.contains_fact(text, case["fact"]),
                     "prompt_tokens": case["tokens"], "seconds": time.perf_counter() - t1})
    result: dict[str, Any] = {
        "evaluation": "needle",
        "command": command or "eccokv eval needle",
        "model": E.model_block(model),
        "data": {"article": title, "contexts": list(contexts), "depths": list(depths),
                 "seed": seed,
                 "description": f"Wikipedia article {title!r} (eccokv.data.long_document) cut "
                                f"to {list(contexts)} tokens; needle at depths {list(depths)}"},
        "protocol": {"needle": NEEDLE, "question": QUESTION, "answer_prefix": ANSWER_PREFIX,
                     "prefill": prefill,
                     "chunk": chunk, "max_new": max_new, "residual": residual,
                     "reference": REFERENCE, "text": __doc__},
        "codecs": {n: E.describe_cache(n, residual) for n in names},
        "environment": env,
        "cases": [{k: c[k] for k in ("context", "depth", "fact", "tokens",
                                     "needle_token_depth", "needle_tokens", "head_tokens")}
                  for c in cases],
        "rows": rows,
    }
    result.update(summarise(rows, names, list(contexts)))
    result["seconds"] = time.perf_counter() - t0
    if out_dir is not None:
        E.write_reports(result, to_markdown(result), out_dir, "needle")
    return result


def summarise(rows: list[dict[str, Any]], names: Sequence[str], contexts: Sequence[int]
              ) -> dict[str, Any]:
    """Accuracy per codec and context; cases where a codec differs from the reference."""
    acc: dict[str, dict[str, float]] = {}
    for n in names:
        acc[n] = {}
        for c in [*contexts, "all"]:
            sel = [r for r in rows if r["codec"] == n and (c == "all" or r["context"] == c)]
            acc[n][str(c)] = sum(r["retrieved"] for r in sel) / len(sel) if sel else float("nan")
    ref = {(r["context"], r["depth"]): r["retrieved"] for r in rows if r["codec"] == REFERENCE}
    diffs = [{"codec": r["codec"], "context": r["context"], "depth": r["depth"],
              "retrieved": r["retrieved"], "reference_retrieved": ref.get((r["context"],
                                                                           r["depth"])),
              "answer": r["answer"]}
             for r in rows if r["codec"] != REFERENCE
             and ref.get((r["context"], r["depth"])) is not None
             and r["retrieved"] != ref[(r["context"], r["depth"])]]
    e4 = [d for d in diffs if d["codec"] == "ecco4"]
    target = {"target": "ecco4 retrieval equals the uncompressed cache in every case",
              "met": (not e4) if "ecco4" in names else None,
              "detail": "identical in every case" if not e4 else
              f"{len(e4)} case(s) differ: " + "; ".join(
                  f"ctx {d['context']} depth {d['depth']}: ecco4 "
                  f"{'yes' if d['retrieved'] else 'no'} vs none "
                  f"{'yes' if d['reference_retrieved'] else 'no'}" for d in e4)}
    return {"accuracy": acc, "differences": diffs, "targets": [target]}


def to_markdown(result: dict[str, Any]) -> str:
    """needle.md: accuracy table, per-case grid, differences, target."""
    ctxs = [str(c) for c in result["data"]["contexts"]]
    depths = result["data"]["depths"]
    p = result["protocol"]
    lines = ["# Needle in a haystack (`eccokv eval needle`)", "", *E.provenance_lines(result),
             "", "## Protocol", "",
             f"Needle: \"{p['needle']}\" (a seeded 6-digit number per case); question: "
             f"\"{p['question']}\" in the model's chat template, the assistant turn starting "
             f"with \"{p['answer_prefix']}\". The context (system prompt, "
             f"haystack with the needle) is prefilled exactly (chunks of {p['chunk']} "
             f"tokens); each cache then holds it compressed except its {p['residual']}-token "
             "exact window (plus up to a group of tokens) and its exact sink tokens; the "
             f"question is read through the cache, and up to {p['max_new']} tokens are "
             "generated greedily. "
             f"Prefill mode: {p['prefill']}. Retrieved = the answer contains the number.", "",
             "## Accuracy", ""]
    lines += E.md_table(["cache", *[f"{c} tokens" for c in ctxs], "all"],
                        [[n, *[f"{100 * a[c]:.0f}%" for c in ctxs], f"{100 * a['all']:.0f}%"]
                         for n, a in result["accuracy"].items()])
    lines += ["", "## Per case (Y = retrieved; * = the needle was in the cache's exact "
              "window, not compressed)", ""]
    rows = result["rows"]
    grid = []
    for n in result["accuracy"]:
        cells = []
        for c in result["data"]["contexts"]:
            cells.append(" ".join(("Y" if r["retrieved"] else ".")
                                  + ("*" if r.get("needle_compressed") is False else "")
                                  for d in depths for r in rows
                                  if r["codec"] == n and r["context"] == c and r["depth"] == d))
        grid.append([n, *cells])
    lines += E.md_table(["cache", *[f"{c}: depths {', '.join(str(d) for d in depths)}"
                                    for c in ctxs]], grid)
    lines += ["", "## Answers of the reference (none)", ""]
    lines += E.md_table(["context", "depth", "fact", "answer"],
                        [[r["context"], r["depth"], r["fact"], repr(r["answer"])]
                         for r in rows if r["codec"] == REFERENCE])
    lines += ["", "## Cases where a cache differs from the reference", ""]
    if result["differences"]:
        lines += E.md_table(["cache", "context", "depth", "retrieved", "none retrieved",
                             "answer"],
                            [[d["codec"], d["context"], d["depth"], d["retrieved"],
                              d["reference_retrieved"], repr(d["answer"])]
                             for d in result["differences"]])
    else:
        lines.append("None.")
    lines += ["", "## Target", ""]
    lines += E.md_table(["target", "met", "detail"],
                        [[t["target"], {True: "met", False: "NOT met", None: "-"}[t["met"]],
                          t["detail"]] for t in result["targets"]])
    return "\n".join(lines) + "\n"
