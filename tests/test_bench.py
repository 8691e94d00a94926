"""The benchmarks' pure parts: ratios, targets, report formatting, argument parsing and
provenance; no timing is asserted."""

from __future__ import annotations

import pytest
import torch

from eccokv import provenance
from eccokv.bench import attention as ba
from eccokv.bench import generate as bg
from eccokv.cli import build_parser

ENV = {"cpu": "test cpu", "cpu_count": 2, "numba_threading_layer": "omp",
       "OMP_WAIT_POLICY": None, "load_average_start": [0.5, 0, 0], "load_average_end": [0.7],
       "packages": {"torch": "t", "numba": "n", "numpy": "np", "transformers": "tr",
                    "optimum-quanto": "q"},
       "python": "3.11", "sources": {"a.py": "00", "b.py": "11"}, "source_digest": "abcd1234"}


# ------------------------------------------------------------------ provenance


def test_source_digests_cover_every_package_and_module():
    d = provenance.source_digests()
    for name in ("bench/attention.py", "bench/generate.py", "entropy/huffman.py",
                 "kernels/attention.py", "codecs/ecco.py", "hf/cache.py", "eval/common.py",
                 "cli.py", "models.py", "data.py", "provenance.py", "profiles/default.ecprof"):
        assert name in d, name
    assert not any("__pycache__" in k for k in d)
    assert provenance.source_digest() == provenance.combined_digest(d)


def test_combined_digest_depends_on_names_and_digests_not_order():
    a = {"x.py": "01", "y.py": "02"}
    assert provenance.combined_digest(a) == provenance.combined_digest(dict(reversed(a.items())))
    assert provenance.combined_digest(a) != provenance.combined_digest({"x.py": "01",
                                                                       "y.py": "03"})
    assert provenance.combined_digest(a) != provenance.combined_digest({"x.py": "01",
                                                                       "z.py": "02"})
    assert len(provenance.combined_digest(a)) == 16


def test_header_line_prints_the_digest():
    line = provenance.header_line(ENV)
    assert "abcd1234" in line and "2 eccokv source files" in line


# ------------------------------------------------------------------ bench attention


def _row(shape: str, context: int, ecco: float, int4: float, kivi4: float, torch_ms: float,
         quanto: float) -> dict:
    ms = {"fused_ecco4": ecco, "fused_eb3": 1.3 * ecco, "fused_int4": int4,
          "fused_kivi4": kivi4, "fused_kivi2": kivi4,
          "decode_sdpa_ecco4": 3 * ecco, "quanto_int4": quanto, "quanto_int4_step": quanto,
          "quanto_int4_flush": 2 * quanto, "sdpa_fp32": 2 * torch_ms, "sdpa_bf16": torch_ms,
          "eager_bf16": 3 * torch_ms}
    return {"shape": shape, "kv_heads": 3, "head_dim": 64, "q_heads": 9, "context": context,
            "threads": 1, "ms": ms, "floor_ms": {"fused_ecco4": 0.1, "sdpa_fp32": 0.5},
            "fastest_torch": "sdpa_bf16",
            "fused_ecco4_over_fastest_torch": ecco / torch_ms,
            "fused_int4_over_fastest_torch": int4 / torch_ms,
            "fused_kivi4_over_fastest_torch": kivi4 / torch_ms,
            "fused_ecco4_over_quanto_int4": ecco / quanto,
            "fused_kivi4_over_quanto_int4": kivi4 / quanto,
            "fused_eb3_over_fused_ecco4": 1.3,
            "decode_sdpa_over_fused_ecco4": 3.0,
            "fused_ecco4_vs_decode_sdpa_max_rel_diff": 1e-6,
            "quanto_int4_vs_sdpa_fp32_max_rel_diff": 0.1,
            "fused_ecco4_Gvalues_per_s": 0.5}


def test_target_text():
    assert ba.target_text(0.5, 0.7, 0.8) == "0.50 .. 0.70 (target <= 0.8: met)"
    t = ba.target_text(1.2, 3.0, 1.5, goal=1.0)
    assert "target <= 1.5: missed, by 0.8x .. 2.0x" in t and "goal <= 1: missed" in t
    assert "goal <= 1: met" in ba.target_text(0.5, 0.9, 1.5, goal=1.0)
    assert "target >= 2: met" in ba.target_text(2.5, 3.0, 2.0, at_least=True)
    assert "target >= 2: missed" in ba.target_text(1.0, 3.0, 2.0, at_least=True)


def test_attention_targets_use_long_contexts_only():
    rows = [_row("smollm2", 1024, 50.0, 50.0, 50.0, 1.0, 10.0),  # ignored: < 4096
            _row("smollm2", 4096, 1.2, 0.6, 0.9, 1.0, 2.0),
            _row("llama3-8b", 16384, 1.4, 0.7, 0.7, 1.0, 2.8)]
    text = "\n".join(ba.target_lines(rows))
    assert "fused ecco4 / fastest uncompressed torch path: 1.20 .. 1.40 (target <= 1.5: met; " \
           "goal <= 1: missed)" in text
    assert "fused int4 / fastest uncompressed torch path: 0.60 .. 0.70 (target <= 0.8: met)" \
        in text
    assert "fused kivi4 / fastest uncompressed torch path: 0.70 .. 0.90 (target <= 0.8: " \
           "missed" in text
    assert "fused ecco4 / transformers QuantizedCache (quanto int4, step + flush/128): " \
           "0.50 .. 0.60" in text
    assert ba.target_lines(rows[:1]) == []


def test_attention_markdown_has_quanto_column_and_digest():
    rows = [_row("smollm2", 4096, 1.2, 0.6, 0.9, 1.0, 2.0)]
    result = {"command": "eccokv bench attention", "environment": ENV, "what": "w", "data": "d",
              "cache_layout": {"chunk_tokens": 1024, "exact_window_tokens": 128},
              "read_bandwidth_GBps": {"1": 5.0}, "rows": rows}
    md = ba.to_markdown(result)
    assert "Source digest: `abcd1234`" in md
    header = next(line for line in md.splitlines() if line.startswith("| shape"))
    assert "quanto_int4" in header and "fused int4 / fastest torch" in header
    row = next(line for line in md.splitlines() if line.startswith("| smollm2"))
    assert row.count("|") == header.count("|")


def test_quanto_step_leaves_the_layer_as_it_was():
    K, V = ba.kv_like(2, 200, 16, seed=0)
    layer, k, v = ba.quanto_layer(K, V)
    assert layer.cumulative_length == 199 and layer.keys.shape[-2] == ba.QUANTO_FILL
    q4 = torch.randn(1, 2, 3, 16)
    out1 = ba.quanto_step(layer, k, v, q4, 0.25)
    out2 = ba.quanto_step(layer, k, v, q4, 0.25)
    assert out1.shape == (1, 2, 3, 16) and torch.equal(out1, out2)
    assert layer.cumulative_length == 199 and layer.keys.shape[-2] == ba.QUANTO_FILL
    assert ba.quanto_nbytes(layer) > 0


# ------------------------------------------------------------------ bench generate


def _run(kind: str, p: int, tps: float, prefill: float, kv: float, fp16: float = 100.0) -> dict:
    return {"kind": kind, "prompt_tokens": p, "decode_tokens_per_s": tps, "prefill_s": prefill,
            "kv_bytes": kv, "fp16_kv_bytes": fp16, "kv_vs_fp16": kv / fp16,
            "decode_step_median_s": 1 / tps, "peak_rss_bytes": 1e9, "peak_growth_bytes": 1e8,
            "total_s": 10.0, "warmup_s": 1.0, "torch_threads": 2, "numba_threads": 2,
            "numba_threading_layer": "omp" if kind != "dynamic" else None,
            "warmup_numba": {"signatures": 3, "cache_hits": 3, "cache_misses": 0},
            "timed_numba": {"signatures": 0, "cache_hits": 0, "cache_misses": 0},
            "model_dtype": "torch.float32",
            "exact_dtype": "torch.bfloat16" if kind.startswith("ecco") else None}


def _runs() -> list[dict]:
    out = []
    for p in (1024, 4096, 8000):
        out += [_run("dynamic", p, 10.0, 2.0, 200.0), _run("dynamic", p, 12.0, 2.2, 200.0),
                _run("ecco4", p, 9.5, 2.2, 27.0), _run("ecco4", p, 9.7, 2.4, 27.0),
                _run("quanto-int4", p, 7.0, 3.0, 35.0), _run("quanto-int4", p, 7.0, 3.0, 35.0)]
    return out


def test_run_order_interleaves_and_rotates():
    order = bg.run_order([1024, 4096], ["a", "b", "c"], 2)
    assert len(order) == 12
    assert order[:3] == [(0, 1024, "a"), (0, 1024, "b"), (0, 1024, "c")]
    assert [k for r, p, k in order if r == 1 and p == 1024] == ["b", "c", "a"]
    assert [r for r, _, _ in order] == [0] * 6 + [1] * 6


def test_child_env_strips_thread_settings():
    env = bg.child_env({"OMP_WAIT_POLICY": "passive", "NUMBA_THREADING_LAYER": "workqueue",
                        "PATH": "/bin", "OMP_NUM_THREADS": "2"})
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "2"}


def test_summary_medians_and_ratios():
    s = bg.summarise(_runs(), [1024, 4096, 8000], ["dynamic", "ecco4", "quanto-int4"])
    e = s["4096"]["ecco4"]
    assert e["decode_tokens_per_s"] == 9.6
    assert abs(e["tokens_per_s_vs_dynamic"] - 9.6 / 11.0) < 1e-12
    assert abs(e["tokens_per_s_vs_quanto"] - 9.6 / 7.0) < 1e-12
    assert abs(e["prefill_vs_dynamic"] - 2.3 / 2.1) < 1e-12
    assert abs(e["kv_vs_dynamic"] - 27.0 / 200.0) < 1e-12
    assert s["4096"]["dynamic"]["tokens_per_s_vs_dynamic"] == 1.0


def test_generate_targets_from_given_numbers():
    s = bg.summarise(_runs(), [1024, 4096, 8000], ["dynamic", "ecco4", "quanto-int4"])
    tg = bg.targets(s)
    by = {(t["what"], t["prompt_tokens"], t["kind"]): t for t in tg}
    # 9.6 / 11 = 0.873 < 0.9 at 4K and 8K; goals at every length
    assert not by[("decode tok/s vs DynamicCache", 4096, "target")]["met"]
    assert ("decode tok/s vs DynamicCache", 1024, "target") not in by
    assert {k[1] for k in by if k[2] == "goal"} == {1024, 4096, 8000}
    assert by[("decode tok/s vs QuantizedCache", 8000, "target")]["met"]  # 1.37 >= 1.3
    assert by[("prefill time vs DynamicCache", 4096, "target")]["met"]  # 1.095 <= 1.15
    assert ("prefill time vs DynamicCache", 8000, "target") not in by
    assert by[("KV bytes vs fp16", 4096, "target")]["met"]  # 0.27 <= 0.28
    assert bg.targets({"4096": {"dynamic": {"decode_tokens_per_s": 1.0}}}) == []
    assert bg.k_label(8000) == 8 and bg.k_label(4096) == 4 and bg.k_label(1024) == 1


def test_generate_markdown():
    runs = _runs()
    prompts = [1024, 4096, 8000]
    kinds = ["dynamic", "ecco4", "quanto-int4"]
    s = bg.summarise(runs, prompts, kinds)
    res = {"command": "eccokv bench generate", "environment": ENV, "model": "smollm2",
           "prompt_tokens": prompts, "new_tokens": 64, "repeats": 2, "runs": runs,
           "summary": s, "targets": bg.targets(s), "warmup": {"prompt_tokens": 512,
                                                             "new_tokens": 8},
           "stripped_env": list(bg.STRIPPED_ENV), "seconds": 100.0}
    md = bg.to_markdown(res)
    assert "Source digest: `abcd1234`" in md
    assert "none in a timed run" in md
    assert "| 4096 | ecco4 | 9.60 | 0.87 | 1.37 | 2.30 | 1.10 |" in md
    assert "target: decode tok/s vs DynamicCache at 4096 tokens >= 0.9: **NOT met** (0.873)" in md
    assert "Note: the machine was shared" not in md
    runs[0]["timed_numba"] = {"signatures": 1, "cache_hits": 0, "cache_misses": 1}
    assert "1 timed run(s) compiled kernels" in bg.to_markdown(res)


def test_generate_arguments():
    a = build_parser().parse_args(["bench", "generate", "--prompt-tokens", "1024,4096,8000",
                                   "--new-tokens", "32", "--repeats", "3", "--out-dir", ""])
    assert bg.parse_prompts(a.prompt_tokens) == [1024, 4096, 8000]
    assert a.new_tokens == 32 and a.repeats == 3 and a.out_dir == ""
    d = build_parser().parse_args(["bench", "generate"])
    assert bg.parse_prompts(d.prompt_tokens) == list(bg.DEFAULT_PROMPTS)
    assert d.kinds.split(",") == list(bg.DEFAULT_KINDS)
    for bad in ("", "4k", "1024,,x"):
        try:
            bg.parse_prompts(bad)
        except ValueError:
            continue
        raise AssertionError(bad)
    try:
        bg.run(kinds=["nope"], verbose=False)
    except ValueError as e:
        assert "unknown kind" in str(e)
    else:
        raise AssertionError("unknown kind accepted")


def test_attention_plot_draws_every_path(tmp_path):
    """Every timed path (PATH_ORDER, fused eb3 included) has a line style in the plot."""
    pytest.importorskip("matplotlib")
    rows = [_row("smollm2", t, 1.2, 0.6, 0.9, 1.0, 2.0) for t in (4096, 32768)]
    ba.plot({"rows": rows}, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 0
