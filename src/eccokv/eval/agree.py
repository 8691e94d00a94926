"""`eccokv eval agree`: greedy generation through a compressed cache vs the uncompressed one.

Prompts: the first `prompt_tokens` tokens of Wikipedia articles (the shortest articles that
are long enough, in a fixed order) followed by an instruction (summarise, explain, ...),
in the model's chat template. Per prompt and cache:

1. the article part is prefilled exactly once through a DynamicCache (chunks of `chunk`
   tokens) and loaded into each cache (`common.replay`: the cache compresses everything
   older than its exact window);
2. the instruction and the assistant header are read through the cache, then up to
   `max_new` tokens are generated greedily through it (stopping at end of turn).

Agreement with the `none` run (identical to DynamicCache): the fraction of positions with
the same token (over the longer of the two outputs) and the tokens before the first
divergence.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eccokv.eval import common as E
from eccokv.eval.needle import cut_tokens

DEFAULT_CODECS = ("none", "ecco4", "ecco3", "kivi4", "kivi3", "int4")
DEFAULT_PROMPTS = 3  # 128 decode steps per prompt and cache: ~1 min each on 2 busy cores
INSTRUCTIONS = (
    "Summarise the text above in detail.",
    "Explain the topic of the text above to a student, in several paragraphs.",
    "What are the main points of the text above? Answer in detail.",
    "Write a detailed overview of the subject of the text above.",
)
REFERENCE = "none"


def pick_articles(tokenizer: Any, n: int, min_tokens: int) -> list[tuple[str, str]]:
    """`n` Wikipedia articles with at least `min_tokens` tokens: the shortest ones, in order
    of length (deterministic)."""
    from eccokv import data

    counts = data.article_token_counts(tokenizer)
    arts = dict(data.wiki_articles())
    fit = sorted((c, i, t) for i, (t, c) in enumerate(counts) if c >= min_tokens)
    if len(fit) < n:
        raise ValueError(f"only {len(fit)} Wikipedia articles have {min_tokens} tokens; "
                         f"asked for {n}")
    return [(t, arts[t]) for _, _, t in fit[:n]]


def run(model_name: str = "smollm2", codecs: Sequence[str] = DEFAULT_CODECS,
        prompts: int = DEFAULT_PROMPTS, prompt_tokens: int = 2048, max_new: int = 128,
        residual: int = 128, chunk: int = 1024, out_dir: str | Path | None = "benchmarks",
        show_progress: bool = True,
        command: str | None = None, model: Any = None, tokenizer: Any = None,
        articles: Sequence[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Generate for every prompt with every cache; write agree.{json,md} into out_dir."""
    from eccokv import models

    t0 = time.perf_counter()
    env = E.environment()
    if model is None:
        model, tokenizer = models.load(model_name)
    if articles is None:
        articles = pick_articles(tokenizer, prompts, prompt_tokens)
    names = list(dict.fromkeys([REFERENCE, *codecs]))
    stop = E.stop_token_ids(tokenizer)
    probe_head, probe_tail = E.chat_split(tokenizer, "", INSTRUCTIONS[0])
    budget = prompt_tokens - len(probe_head) - len(probe_tail)
    cases = []
    for i, (title, text) in enumerate(articles[:prompts]):
        instr = INSTRUCTIONS[i % len(INSTRUCTIONS)]
        head, tail = E.chat_split(tokenizer, cut_tokens(tokenizer, text, budget), instr)
        cases.append({"article": title, "instruction": instr, "head": head, "tail": tail})
    jobs = [(i, n) for i in range(len(cases)) for n in names]
    outs: dict[tuple[int, str], list[int]] = {}
    secs: dict[tuple[int, str], float] = {}
    tf: dict[tuple[int, str], float] = {}
    pre = None
    current = -1
    for i, n in E.progress(jobs, total=len(jobs), desc="eval agree", enabled=show_progress):
        case = cases[i]
        if i != current:
            pre = E.exact_prefill(model, torch.tensor([case["head"]]), chunk)
            current = i
        assert pre is not None
        t1 = time.perf_counter()
        cache = E.replay(E.make_cache(n, model.config, residual), pre[0])
        first = E.forward_last(model, torch.tensor([case["tail"]]), cache)
        outs[(i, n)] = E.greedy(model, cache, first, max_new, stop)
        secs[(i, n)] = time.perf_counter() - t1
        if n != REFERENCE:  # the reference runs first for every prompt
            tf[(i, n)] = teacher_forced(model, E.make_cache(n, model.config, residual), pre,
                                        case["tail"], outs[(i, REFERENCE)])
    rows = []
    for (i, n), ids in outs.items():
        a = E.agreement(outs[(i, REFERENCE)], ids)
        rows.append({"codec": n, "prompt": i, "article": cases[i]["article"],
                     "generated": len(ids), **a, "seconds": secs[(i, n)],
                     "teacher_forced_top1": tf.get((i, n), 1.0),
                     "text": tokenizer.decode(ids, skip_special_tokens=True), "ids": ids})
    result: dict[str, Any] = {
        "evaluation": "agree",
        "command": command or "eccokv eval agree",
        "model": E.model_block(model),
        "data": {"articles": [c["article"] for c in cases], "prompt_tokens": prompt_tokens,
                 "description": f"{len(cases)} Wikipedia articles cut to ~{prompt_tokens} "
                                "prompt tokens (chat template included) + an instruction"},
        "protocol": {"max_new": max_new, "residual": residual, "chunk": chunk,
                     "reference": REFERENCE, "instructions": [c["instruction"] for c in cases],
                     "prompt_lengths": [len(c["head"]) + len(c["tail"]) for c in cases],
                     "text": __doc__},
        "codecs": {n: E.describe_cache(n, residual) for n in names},
        "environment": env,
        "rows": rows,
    }
    result["summary"] = summarise(rows, names)
    result["targets"] = check_targets(result["summary"], max_new)
    result["seconds"] = time.perf_counter() - t0
    if out_dir is not None:
        E.write_reports(result, to_markdown(result), out_dir, "agree")
    return result


@torch.no_grad()
def teacher_forced(model: Any, cache: Any, prefill: Any, tail: Sequence[int],
                   ref: Sequence[int]) -> float:
    """Fraction of the reference's generated tokens that are also this cache's greedy
    choice when fed the reference's own history (teacher forcing): the prefill is replayed
    into `cache`, then the instruction and the reference tokens go through it in one
    forward. Unlike free-running agreement, one early divergence does not decide the rest.
    (With <= residual_length generated tokens, none of them would have been compressed
    during step-by-step decoding either.)"""
    if not ref:
        return 1.0
    E.replay(cache, prefill[0])
    ids = torch.tensor([list(tail) + list(ref[:-1])])
    logits = model(ids, past_key_values=cache, use_cache=True).logits[0, len(tail) - 1:]
    pred = logits.argmax(-1).tolist()
    return sum(int(p == r) for p, r in zip(pred, ref, strict=True)) / len(ref)


def summarise(rows: list[dict[str, Any]], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per codec: agreement pooled over prompts (identical / compared positions), the mean
    and min per prompt, and tokens before the first divergence (mean, min)."""
    out = {}
    for n in names:
        sel = [r for r in rows if r["codec"] == n]
        if not sel:
            continue
        out[n] = {"agreement": sum(r["identical"] for r in sel) / max(1, sum(r["length"]
                                                                             for r in sel)),
                  "agreement_mean": float(np.mean([r["fraction"] for r in sel])),
                  "agreement_min": float(min(r["fraction"] for r in sel)),
                  "tokens_before_divergence_mean": float(np.mean(
                      [r["tokens_before_divergence"] for r in sel])),
                  "tokens_before_divergence_min": int(min(r["tokens_before_divergence"]
                                                          for r in sel)),
                  "identical_outputs": sum(r["first_divergence"] is None for r in sel),
                  "teacher_forced_top1": float(np.mean([r.get("teacher_forced_top1", np.nan)
                                                        for r in sel])),
                  "prompts": len(sel), "seconds_mean": float(np.mean([r["seconds"]
                                                                        for r in sel]))}
    return out


def check_targets(summary: dict[str, dict[str, Any]], max_new: int) -> list[dict[str, Any]]:
    """ecco4 agreement >= 90%."""
    s = summary.get("ecco4")
    return [{"target": f"ecco4 agreement >= 90% over {max_new} tokens",
             "met": None if s is None else s["agreement"] >= 0.9,
             "detail": "ecco4 not run" if s is None else
             f"ecco4 {100 * s['agreement']:.1f}% (per prompt min {100 * s['agreement_min']:.1f}%)"}]


def to_markdown(result: dict[str, Any]) -> str:
    """agree.md: summary per codec, per-prompt table, target."""
    p = result["protocol"]
    lines = ["# Greedy agreement with the uncompressed cache (`eccokv eval agree`)", "",
             *E.provenance_lines(result), "", "## Protocol", "",
             f"Prompts: Wikipedia articles ({', '.join(result['data']['articles'])}) cut so "
             f"that each chat prompt has ~{result['data']['prompt_tokens']} tokens "
             f"({p['prompt_lengths']}), then an instruction. The article is prefilled exactly "
             f"(chunks of {p['chunk']}); each cache then holds it compressed except its "
             f"{p['residual']}-token exact window; the instruction is read through the cache "
             f"and up to {p['max_new']} tokens are generated greedily (stop at end of turn). "
             "Agreement: identical positions / compared positions (the longer output's "
             "length), pooled over prompts.", "", "## Summary", ""]
    lines += E.md_table(
        ["cache", "agreement", "per-prompt mean / min", "tokens before divergence mean / min",
         "identical outputs", "teacher-forced top-1 agreement"],
        [[n, f"{100 * s['agreement']:.1f}%",
          f"{100 * s['agreement_mean']:.1f}% / {100 * s['agreement_min']:.1f}%",
          f"{s['tokens_before_divergence_mean']:.1f} / {s['tokens_before_divergence_min']}",
          f"{s['identical_outputs']}/{s['prompts']}",
          E.fmt(None if s.get("teacher_forced_top1") is None else
                100 * s["teacher_forced_top1"], ".1f")] for n, s in result["summary"].items()])
    lines += ["", "Teacher-forced top-1 agreement: the reference's generated tokens fed through "
              "the compressed cache in one forward; the fraction of positions where the "
              "cache's greedy choice equals the reference's next token (one early divergence "
              "no longer decides all later positions)."]
    lines += ["", "## Per prompt", ""]
    lines += E.md_table(["cache", "prompt", "article", "generated", "agreement",
                         "first divergence"],
                        [[r["codec"], r["prompt"], r["article"], r["generated"],
                          f"{100 * r['fraction']:.1f}%",
                          "-" if r["first_divergence"] is None else r["first_divergence"]]
                         for r in result["rows"]])
    lines += ["", "## Target", ""]
    lines += E.md_table(["target", "met", "detail"],
                        [[t["target"], {True: "met", False: "NOT met", None: "-"}[t["met"]],
                          t["detail"]] for t in result["targets"]])
    ref = [r for r in result["rows"] if r["codec"] == REFERENCE]
    if ref:
        lines += ["", "## Reference output (none), prompt 0", "", "```",
                  ref[0]["text"].strip(), "```"]
    return "\n".join(lines) + "\n"
