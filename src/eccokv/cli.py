"""Command-line interface: `eccokv {codecs,calibrate,bench,demo,eval}`.

Every subcommand that reports numbers takes `--json` (machine-readable output on stdout).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from typing import Any


def _command_line() -> str:
    return "eccokv " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, default=float))


def cmd_codecs(args: argparse.Namespace) -> int:
    from eccokv import codecs

    rows = [{"name": n, "config": codecs.get(n).get_config()} for n in codecs.available()]
    if args.json:
        _print_json(rows)
    else:
        for r in rows:
            print(f"{r['name']:8s} {json.dumps(r['config'])}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    if getattr(args, "sensitivity", False):
        from eccokv.allocation import run_cli

        return run_cli(args)
    if getattr(args, "weights", False):
        from pathlib import Path

        from eccokv.weights.profile import calibrate_weights

        text = (Path(args.calibration_text).read_text(encoding="utf-8")
                if args.calibration_text else None)
        prof, report = calibrate_weights(
            args.model, args.out, calibration_text=text, corpus=args.corpus,
            tokens=args.tokens, windows=args.windows,
            activation_weighted=args.activation_weighting,
            variants=args.variants.split(","), seed=args.seed, synthetic=args.synthetic,
            command=_command_line(), progress=not args.json,
        )
        if args.json:
            _print_json(report)
        else:
            print(f"wrote {args.out} (weights profile {prof.hash}) from {report['groups']} "
                  f"groups in {report['seconds']:.1f} s")
        return 0
    from eccokv.calibration import calibrate_model

    prof, report = calibrate_model(
        args.model, corpus=args.corpus, tokens=args.tokens, windows=args.windows,
        variants=args.variants.split(","), seed=args.seed, progress=not args.json,
        command=_command_line(), synthetic=args.synthetic,
    )
    prof.save(args.out)
    report["out"] = str(args.out)
    report["hash"] = prof.hash
    if args.json:
        _print_json(report)
    else:
        print(f"wrote {args.out} (profile {prof.hash}) from {report['groups']} groups "
              f"in {report['seconds']:.1f} s")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    import eccokv.weights as W
    from eccokv import data, models

    t0 = time.perf_counter()
    model, tok = models.load(args.model)
    calib = None
    if args.calibration > 0:
        calib = list(data.token_windows(tok, args.calibration_corpus, window=args.tokens,
                                        n=args.calibration))
    W.compress_model(model, args.codec, calibration=calib,
                     skip=_csv(args.skip) if args.skip is not None else None)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    rep = W.memory_report(model)
    rep.pop("per_layer")
    rep.update(out=str(args.out), codec=args.codec, seconds=time.perf_counter() - t0,
               calibration_tokens=0 if calib is None else sum(c.numel() for c in calib))
    if args.json:
        _print_json(rep)
    else:
        print(f"wrote {args.out}: {rep['layers']} Linear layers with {args.codec}, "
              f"{rep['bits_per_weight']:.3f} bits/weight, {rep['linear_bytes'] / 2**20:.1f} MiB "
              f"(fp16 {rep['linear_fp16_bytes'] / 2**20:.1f} MiB, ratio "
              f"{rep['linear_ratio_vs_fp16']:.3f}); activation-aware layers "
              f"{rep['activation_aware_layers']} ({rep['calibration_tokens']} calibration "
              f"tokens); load it with AutoModelForCausalLM.from_pretrained(DIR) after "
              "`import eccokv.weights`")
    return 0


def cmd_bench_codec(args: argparse.Namespace) -> int:
    from eccokv.bench import codec as bc

    res = bc.run(model_name=args.model, tokens=args.tokens,
                 codec_names=args.codecs.split(","),
                 threads=[int(t) for t in args.threads.split(",")], repeats=args.repeats,
                 with_synthetic=not args.no_synthetic, out_dir=args.out_dir,
                 progress=not args.json, command=_command_line())
    if args.json:
        _print_json(res)
    else:
        print(bc.to_markdown(res))
        if args.out_dir:
            print(f"wrote {args.out_dir}/codec.json and {args.out_dir}/codec.md")
    return 0


def cmd_bench_profiles(args: argparse.Namespace) -> int:
    from eccokv.bench import profiles

    res = profiles.run(out_dir=args.out_dir, command=_command_line(),
                       say=(lambda m: None) if args.json else print)
    if args.json:
        _print_json(res)
    else:
        print(profiles.to_markdown(res))
    return 0


def cmd_bench_attention(args: argparse.Namespace) -> int:
    from eccokv.bench import attention as ba

    res = ba.run(contexts=[int(c) for c in args.context.split(",")],
                 threads=[int(t) for t in args.threads.split(",")],
                 shapes=args.shapes.split(","), repeats=args.repeats, chunk=args.chunk,
                 residual=args.residual, out_dir=args.out_dir or None,
                 progress=not args.json, command=_command_line())
    if args.json:
        _print_json(res)
    else:
        print(ba.to_markdown(res))
        if args.out_dir:
            print(f"wrote {args.out_dir}/attention.json, attention.md and attention.png")
    return 0


def cmd_bench_generate(args: argparse.Namespace) -> int:
    from eccokv.bench import generate as bg

    res = bg.run(model_name=args.model, prompt_tokens=bg.parse_prompts(args.prompt_tokens),
                 new_tokens=args.new_tokens, kinds=_csv(args.kinds), repeats=args.repeats,
                 verbose=not args.json, command=_command_line(), out_dir=args.out_dir or None)
    if args.json:
        _print_json(res)
    else:
        print(bg.to_markdown(res))
        if args.out_dir:
            print(f"wrote {args.out_dir}/generate.json and {args.out_dir}/generate.md")
    return 0


def cmd_bench_weights(args: argparse.Namespace) -> int:
    from eccokv.bench import weights as bw

    res = bw.run(shapes=_csv(args.shapes) if args.shapes else tuple(bw.SHAPES),
                 tokens=[int(t) for t in _csv(args.tokens)], codec=args.codec,
                 repeats=args.repeats, out_dir=args.out_dir or None,
                 progress=not args.json, command=_command_line())
    if args.json:
        _print_json(res)
    else:
        print(bw.to_markdown(res))
    return 0


def cmd_warmup(args: argparse.Namespace) -> int:
    from eccokv import warmup

    res = warmup.run(tuple(_csv(args.parts)), say=(lambda m: None) if args.json else print,
                     if_needed=args.if_needed)
    if args.json:
        _print_json(res)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from eccokv.demo import run_demo

    res = run_demo(model_name=args.model, codec_names=args.codecs.split(","),
                   min_tokens=args.min_tokens, verbose=not args.json, qa_codec=args.qa_codec,
                   max_new_tokens=args.new_tokens, weights_codec=args.weights or None)
    if args.json:
        _print_json(res)
    return 0


# ------------------------------------------------------------------ eval (quality of codecs)


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _eval_done(res: dict, stem: str, out_dir: str | None, json_out: bool, md: Any) -> int:
    if json_out:
        _print_json(res)
    else:
        print(md(res))
        if out_dir:
            print(f"wrote {out_dir}/{stem}.json and {out_dir}/{stem}.md")
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from eccokv.eval import ppl

    if getattr(args, "weights", None):
        from eccokv.eval import weights

        return weights.run_ppl_cli(args)
    if args.sweep or args.families is not None:
        from eccokv.eval import rd

        return rd.run_cli(args)

    res = ppl.run(model_name=args.model, corpus=args.corpus, codecs=_csv(args.codecs),
                  context=args.context, score=args.score, windows=args.windows,
                  residuals=[int(r) for r in _csv(args.residual)], seed=args.seed,
                  prefill=args.prefill, out_dir=args.out_dir or None,
                  show_progress=not args.no_progress, command=_command_line())
    return _eval_done(res, "quality", args.out_dir, args.json, ppl.to_markdown)


def cmd_eval_needle(args: argparse.Namespace) -> int:
    from eccokv.eval import needle

    res = needle.run(model_name=args.model, codecs=_csv(args.codecs),
                     contexts=[int(c) for c in _csv(args.contexts)],
                     depths=[float(d) for d in _csv(args.depths)], residual=args.residual,
                     seed=args.seed, chunk=args.chunk, max_new=args.max_new,
                     prefill=args.prefill, out_dir=args.out_dir or None,
                     show_progress=not args.no_progress, command=_command_line())
    return _eval_done(res, "needle", args.out_dir, args.json, needle.to_markdown)


def cmd_eval_agree(args: argparse.Namespace) -> int:
    from eccokv.eval import agree

    res = agree.run(model_name=args.model, codecs=_csv(args.codecs), prompts=args.prompts,
                    prompt_tokens=args.prompt_tokens, max_new=args.new_tokens,
                    residual=args.residual, chunk=args.chunk, out_dir=args.out_dir or None,
                    show_progress=not args.no_progress, command=_command_line())
    return _eval_done(res, "agree", args.out_dir, args.json, agree.to_markdown)


def cmd_eval_memory(args: argparse.Namespace) -> int:
    from eccokv.eval import memory

    res = memory.run(model_name=args.model, kinds=_csv(args.codecs),
                     prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                     chunk=args.chunk, residual=args.residual, out_dir=args.out_dir or None,
                     show_progress=not args.no_progress, command=_command_line())
    return _eval_done(res, "memory", args.out_dir, args.json, memory.to_markdown)


def _add_eval_parsers(sub: Any) -> None:
    """`eccokv eval {ppl,needle,agree,memory,weights}` (see eccokv.eval)."""
    from eccokv.eval import agree, memory, needle, ppl, rd, weights

    e = sub.add_parser("eval", help="quality of KV-cache and weight codecs on real models"
                       ).add_subparsers(
        dest="eval", required=True)

    def common(s: argparse.ArgumentParser, codecs: str, residual: bool = True) -> None:
        s.add_argument("--model", default="smollm2", help="'smollm2' or a local HF model folder")
        s.add_argument("--codecs", default=codecs, help="comma-separated caches to compare")
        if residual:
            s.add_argument("--residual", type=int, default=128, help="EccoCache exact window")
        s.add_argument("--out-dir", default="benchmarks", help="'' to write nothing")
        s.add_argument("--no-progress", action="store_true")
        s.add_argument("--json", action="store_true")

    s = e.add_parser("ppl", help="perplexity with a compressed context (-> quality.{json,md,png})")
    common(s, ",".join(ppl.DEFAULT_CODECS), residual=False)
    s.add_argument("--corpus", default="wiki", help="wiki or news")
    s.add_argument("--context", type=int, default=ppl.DEFAULT_CONTEXT,
                   help="prefilled tokens per window (default: 4 sink tokens + 1024)")
    s.add_argument("--score", type=int, default=256, help="scored tokens per window")
    s.add_argument("--windows", type=int, default=ppl.DEFAULT_WINDOWS)
    s.add_argument("--residual", default=",".join(str(r) for r in ppl.DEFAULT_RESIDUALS),
                   help="EccoCache exact window(s), comma-separated: one table each")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--prefill", default="shared", choices=("shared", "forward"),
                   help="shared: one exact prefill per window replayed into each cache")
    rd.add_cli(s)
    weights.add_ppl_cli(s)  # eval ppl --weights CODEC
    s.set_defaults(fn=cmd_eval_ppl)

    s = e.add_parser("needle", help="needle-in-a-haystack retrieval (-> needle.{json,md})")
    common(s, ",".join(needle.DEFAULT_CODECS))
    s.add_argument("--contexts", default=",".join(str(c) for c in needle.DEFAULT_CONTEXTS))
    s.add_argument("--depths", default=",".join(str(d) for d in needle.DEFAULT_DEPTHS))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--chunk", type=int, default=1024, help="prefill chunk (tokens)")
    s.add_argument("--max-new", type=int, default=10)
    s.add_argument("--prefill", default="shared", choices=("shared", "chunked"))
    s.set_defaults(fn=cmd_eval_needle)

    s = e.add_parser("agree", help="greedy agreement with the uncompressed cache "
                                   "(-> agree.{json,md})")
    common(s, ",".join(agree.DEFAULT_CODECS))
    s.add_argument("--prompts", type=int, default=agree.DEFAULT_PROMPTS)
    s.add_argument("--prompt-tokens", type=int, default=2048)
    s.add_argument("--new-tokens", type=int, default=128)
    s.add_argument("--chunk", type=int, default=1024)
    s.set_defaults(fn=cmd_eval_agree)

    s = e.add_parser("memory", help="peak RSS, EccoCache vs DynamicCache (-> memory.{json,md})")
    common(s, ",".join(memory.DEFAULT_KINDS))
    s.add_argument("--prompt-tokens", type=int, default=7000)
    s.add_argument("--new-tokens", type=int, default=32)
    s.add_argument("--chunk", type=int, default=1024)
    s.set_defaults(fn=cmd_eval_memory)

    weights.add_cli(e)  # eval weights (compressed weights: ppl, MiniLM, memory and speed)


def cmd_fuzz(a: argparse.Namespace) -> int:
    from eccokv import fuzz
    from eccokv.provenance import environment

    if a.n < 1:
        raise ValueError(f"--n must be at least 1, got {a.n}")
    env = environment() if a.out_dir else None
    r = fuzz.run_campaign(a.n, seed=a.seed, kinds=a.targets, start=a.start, hang_s=a.hang_s,
                          progress=None if a.json else lambda m: print(m, file=sys.stderr))
    r["command"] = "eccokv fuzz " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["fuzz"]
                                              else [f"--n {a.n} --seed {a.seed}"])
    if a.out_dir:
        fuzz.write_results(r, a.out_dir, env)
    if a.json:
        print(json.dumps(r, indent=1))
    else:
        print(fuzz.to_markdown(r))
        for f in r["failures"][:10]:
            print(f"FAIL entry {f['entry']} {f['target']} {f['mutation']}: {f['outcome']} "
                  f"{f['detail']}")
    return 0 if r["ok"] else 1


def cmd_store(args: argparse.Namespace) -> int:
    from eccokv import store as S

    st = S.open(args.url)
    if args.action == "stats":
        res: dict[str, Any] = st.stats()
        rc = 0 if res.get("available") else 1
    elif args.action == "clear":
        res = {"url": args.url, "deleted": st.clear()}
        rc = 0
    else:
        res = st.verify(delete=args.delete)
        res["url"] = args.url
        rc = 0 if not res["bad"] else 1
    if args.json:
        _print_json(res)
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
    return rc


def cmd_bench_store(args: argparse.Namespace) -> int:
    from eccokv.bench import store as bs

    res = bs.run(model_name=args.model, prompts=[int(t) for t in args.prompt_tokens.split(",")],
                 chunk_tokens=tuple(int(t) for t in args.chunk_tokens.split(",")),
                 out_dir=args.out_dir, command=_command_line(),
                 say=(lambda m: None) if args.json else print)
    if args.json:
        _print_json(res)
    else:
        print(bs.to_markdown(res))
    return 0


def _add_store_parsers(sub: Any, bench: Any) -> None:
    s = sub.add_parser("store", help="inspect a prefix store: stats, clear, verify")
    s.add_argument("action", choices=("stats", "clear", "verify"))
    s.add_argument("--url", required=True, help="dir:///abs/path or redis://host:port/db")
    s.add_argument("--delete", action="store_true", help="verify: delete the bad entries")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_store)

    s = bench.add_parser("store", help="time to first token from a warm prefix (dir, Redis) "
                         "vs cold prefill, stored bytes/token, put/get MB/s (-> store.{json,md})")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--prompt-tokens", default="1024,4096,8000")
    s.add_argument("--chunk-tokens", default="256,128", help="store chunk sizes to measure")
    s.add_argument("--out-dir", default="benchmarks", help="'' to write nothing")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_bench_store)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eccokv", description=(
        "Entropy-coded KV-cache compression (Ecco block codec) for transformers models."))
    p.add_argument("--version", action="version",
                   version=f"eccokv {__import__('eccokv').__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("codecs", help="list the registered codecs and their configs")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_codecs)

    s = sub.add_parser("calibrate", help="learn an Ecco profile from a model's real K/V")
    s.add_argument("--model", default="smollm2", help="'smollm2' or a local HF model folder")
    s.add_argument("--out", required=True, help="output profile (.safetensors)")
    s.add_argument("--corpus", default="wiki+news", help="wiki, news or wiki+news")
    s.add_argument("--tokens", type=int, default=1024, help="tokens per window")
    s.add_argument("--windows", type=int, default=4, help="windows per corpus")
    s.add_argument("--variants", default="ecco4,ecco3,ecco2")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--synthetic", type=float, default=0.0,
                   help="fraction of synthetic groups mixed in (generic profiles)")
    s.add_argument("--weights", action="store_true",
                   help="learn a weights profile (eccokv.weights) from the model's Linear "
                        "weights instead of K/V")
    s.add_argument("--calibration-text", default=None, metavar="FILE",
                   help="--weights: text for the activation moments (default: --corpus)")
    s.add_argument("--activation-weighting", action="store_true",
                   help="--weights: draw the k-means groups by activation importance E[x^2]")
    s.add_argument("--json", action="store_true")
    __import__("eccokv.allocation", fromlist=["x"]).add_cli(s)
    s.set_defaults(fn=cmd_calibrate)

    s = sub.add_parser("compress", help="compress a model's Linear weights and write a "
                       "checkpoint that from_pretrained loads (with eccokv.weights imported)")
    s.add_argument("--model", default="smollm2", help="'smollm2' or a local HF model folder")
    s.add_argument("--codec", default="ecco4", help="weight codec (ecco4, ecco3, int4, ...)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--calibration", type=int, default=4,
                   help="windows of calibration text for activation-aware encoding (0: none)")
    s.add_argument("--calibration-corpus", default="news")
    s.add_argument("--tokens", type=int, default=256, help="tokens per calibration window")
    s.add_argument("--skip", default=None,
                   help="fnmatch patterns of Linear layers to keep (default: the LM head)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_compress)

    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    s = b.add_parser("codec", help="bits/value, error and speed of every codec")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--tokens", type=int, default=2048)
    s.add_argument("--codecs", default=",".join(
        __import__("eccokv.bench.codec", fromlist=["x"]).DEFAULT_CODECS))
    s.add_argument("--threads", default="1,2")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--no-synthetic", action="store_true")
    s.add_argument("--out-dir", default="benchmarks")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_bench_codec)

    s = b.add_parser("profiles", help="generic vs model-specific Ecco profile error")
    s.add_argument("--out-dir", default="benchmarks")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_bench_profiles)

    s = b.add_parser("attention", help="decode-step attention: fused kernels on the compressed "
                     "cache vs decode-then-SDPA vs torch (-> attention.{json,md,png})")
    s.add_argument("--context", default="1024,4096,16384,32768", help="context lengths")
    s.add_argument("--threads", default="1,2")
    s.add_argument("--shapes", default="smollm2,llama3-8b")
    s.add_argument("--repeats", type=int, default=7)
    s.add_argument("--chunk", type=int, default=1024, help="tokens per compressed chunk")
    s.add_argument("--residual", type=int, default=128, help="exact window (tokens)")
    s.add_argument("--out-dir", default="benchmarks", help="'' to write nothing")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_bench_attention)

    bgen = __import__("eccokv.bench.generate", fromlist=["x"])
    s = b.add_parser("generate", help="decode tokens/s, prefill and KV bytes of generate() "
                     "with EccoCache vs DynamicCache and QuantizedCache (fresh process per "
                     "run; -> generate.{json,md})")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--prompt-tokens", default=",".join(map(str, bgen.DEFAULT_PROMPTS)),
                   help="prompt lengths, comma-separated")
    s.add_argument("--new-tokens", type=int, default=bgen.DEFAULT_NEW_TOKENS)
    s.add_argument("--kinds", default=",".join(bgen.DEFAULT_KINDS),
                   help="caches, comma-separated: " + ", ".join(bgen.KINDS))
    s.add_argument("--repeats", type=int, default=bgen.DEFAULT_REPEATS)
    s.add_argument("--out-dir", default="benchmarks", help="'' to write nothing")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_bench_generate)

    s = b.add_parser("weights", help="compressed Linear kernels (fused decode-GEMV, tiled "
                     "decode + matmul) vs fp32/bf16 torch per token count "
                     "(-> weights-kernel.{json,md})")
    s.add_argument("--shapes", default="", help="shape names (default: all)")
    s.add_argument("--tokens", default="1,2,4,8,16,32,64")
    s.add_argument("--codec", default="ecco4")
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--out-dir", default="benchmarks", help="'' to write nothing")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_bench_weights)

    s = sub.add_parser("demo", help="answer a question about a long article with a "
                       "compressed KV cache, next to the plain cache; per-codec table")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--qa-codec", default="ecco4", help="codec/preset of the EccoCache run")
    s.add_argument("--weights", default="ecco4",
                   help="codec of the compressed-weights run ('' to skip it)")
    s.add_argument("--new-tokens", type=int, default=48)
    s.add_argument("--codecs", default="fp8,int4,kivi4,int2,ecco4,ecco3,ecco2")
    s.add_argument("--min-tokens", type=int, default=3000)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("warmup", help="compile (or load from the cache) every numba kernel "
                       "signature the public paths use; `make setup` runs it")
    s.add_argument("--parts", default="codecs,attention,generate,weights")
    s.add_argument("--if-needed", action="store_true",
                   help="skip if a full warm-up already ran for the current kernel sources")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_warmup)

    s = sub.add_parser("fuzz", help="fuzz campaign over untrusted bytes: mutated codec "
                       "blobs, cache files and store entries (docs/untrusted.md)")
    s.add_argument("--n", type=int, default=10000, help="mutated entries")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--start", type=int, default=0, help="first entry index (replay: --n 1)")
    s.add_argument("--targets", default="codec,cache,store")
    s.add_argument("--hang-s", type=float, default=1.0, help="an entry slower than this hangs")
    s.add_argument("--out-dir", default="", help="write fuzz.{json,md} there ('' = nothing)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_fuzz)

    _add_store_parsers(sub, b)
    _add_eval_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        rc = args.fn(args)
    except (ValueError, RuntimeError, FileNotFoundError, KeyError) as e:
        print(f"eccokv: error: {e}", file=sys.stderr)
        return 2
    if not getattr(args, "json", False):
        print(f"[{time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
