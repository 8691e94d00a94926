"""Command-line interface: `eccokv {codecs,calibrate,bench,demo}`.

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


def cmd_demo(args: argparse.Namespace) -> int:
    from eccokv.demo import run_demo

    res = run_demo(model_name=args.model, codec_names=args.codecs.split(","),
                   min_tokens=args.min_tokens, verbose=not args.json)
    if args.json:
        _print_json(res)
    return 0


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
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_calibrate)

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

    s = sub.add_parser("demo", help="compress the real KV cache of a Wikipedia article")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--codecs", default="fp8,int4,kivi4,int2,ecco4,ecco3,ecco2")
    s.add_argument("--min-tokens", type=int, default=3000)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_demo)
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
