"""`eccokv eval ppl --sweep` (eccokv.eval.rd): families, the below-curve check, the eb cache
names, the reports, on tiny random models (tests/test_eval.py's) and synthetic rows."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from eccokv.eval import common, ppl, rd
from test_eval import tiny_llama, windows


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def row(bits, chg, lo=None, hi=None, nll=None, error=None):
    r = {"bits": {"compressed_bits_per_value": bits}, "rel_change_pct": chg,
         "ci_low_pct": lo, "ci_high_pct": hi, "error": error}
    if nll is not None:
        r["window_nll"] = nll
    return r


# ------------------------------------------------------------------ families and names


def test_families_selection_and_names():
    assert list(rd.select(None)) == ["ecco", "eb", "kivi", "int", "hf"]
    assert rd.select("") == rd.FAMILIES
    assert list(rd.select("hf, ecco")) == ["ecco", "hf"]  # FAMILIES order
    assert rd.select(["kivi"]) == {"kivi": ("KIVI (int g32)", ("kivi2", "kivi3", "kivi4"))}
    with pytest.raises(ValueError, match="ecco, eb, kivi, int, hf"):
        rd.select("ecco,bogus")
    assert rd.cache_names(rd.select("ecco,eb")) == [
        "ecco2", "ecco3", "ecco4", "eb2", "eb2.5", "eb3", "eb3.5", "eb4", "eb5"]
    assert rd.FAMILIES["int"][1] == ("int2", "int3", "int4")
    assert rd.FAMILIES["hf"][1] == ("hf-quanto-int2", "hf-quanto-int4")
    for n in rd.cache_names(rd.FAMILIES):  # every name parses (or is a QuantizedCache row)
        assert common.is_hf(n) or common.parse_name(n)


def test_eb_names_parse_and_describe():
    assert common.parse_name("eb2.5") == ("eb2.5", {"target_bits": 2.5})
    assert common.parse_name("eb3@fp32+decode") == (
        "eb3", {"target_bits": 3.0, "exact_dtype": torch.float32, "fused": False})
    assert common.parse_name("eb@bound=0.05") == ("eb", {"bound": 0.05})
    assert common.is_eb("eb4") and common.is_eb("eb@bound=0.05") and not common.is_eb("ecco4")
    assert common.family("eb2.5") == "ecco-eb" and common.family("ecco2") == "ecco"
    d = common.describe_cache("eb3.5", 128)
    assert d["arguments"] == {"target_bits": 3.5} and d["residual_length"] == 128
    assert common.describe_cache("ecco4", 0)["codec"] == "ecco4"  # unchanged for the rest
    for bad in ("eb", "eb@fp32", "eb@bound=x", "eb@bound=1@bound=2", "eb3@fp8",
                "eb3@residual_length=4", "ecco4@bound=0.05", "ecco4@fp32@fp16"):
        with pytest.raises(ValueError, match="cache name"):
            common.parse_name(bad)


def test_eb_make_cache_calls_eccocache_with_target_bits(model, monkeypatch):
    import eccokv.hf.cache as C

    calls = []

    class Recorder:
        def __init__(self, *a, **kw):
            calls.append((a, kw))

    monkeypatch.setattr(C, "EccoCache", Recorder)
    common.make_cache("eb2.5", model.config, 128)
    common.make_cache("eb@bound=0.05", model.config, 0)
    assert calls == [((model.config,), {"residual_length": 128, "target_bits": 2.5}),
                     ((model.config,), {"residual_length": 0, "bound": 0.05})]


def _eb_error(model):
    """What EccoCache does with target_bits today: None if it takes it, else its error."""
    from eccokv.hf.cache import EccoCache

    try:
        EccoCache(model.config, target_bits=3.0, residual_length=16)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


# ------------------------------------------------------------------ interpolation and checks


def test_interpolate():
    pts = rd.curve({"a": row(2.0, 10.0), "b": row(4.0, 2.0), "c": row(3.0, 4.0),
                    "bad": row(3.5, 1.0, error="boom")}, ["a", "b", "c", "bad"])
    assert [p["name"] for p in pts] == ["a", "c", "b"]  # sorted by bits, errors left out
    at = rd.interpolate(pts, 2.5)
    assert at["rel_change_pct"] == pytest.approx(7.0) and at["lo"] == "a" and at["hi"] == "c"
    assert rd.interpolate(pts, 3.5)["rel_change_pct"] == pytest.approx(3.0)
    assert rd.interpolate(pts, 4.0)["rel_change_pct"] == pytest.approx(2.0)
    assert rd.interpolate(pts, 4.03)["rel_change_pct"] == pytest.approx(2.0)  # within 1%
    assert rd.interpolate(pts, 1.99)["rel_change_pct"] == pytest.approx(10.0)
    assert rd.interpolate(pts, 4.2) is None and rd.interpolate(pts, 1.9) is None  # no extrapolation
    assert rd.interpolate([], 3.0) is None
    one = rd.curve({"x": row(3.0, 1.0)}, ["x"])
    assert rd.interpolate(one, 3.0)["rel_change_pct"] == 1.0 and rd.interpolate(one, 3.5) is None


def synthetic(eb: dict[str, tuple[float, float]]) -> dict[str, dict]:
    rows = {"none": row(None, 0.0), "ecco2": row(2.01, 20.0), "ecco3": row(3.01, 2.0),
            "ecco4": row(4.01, 0.4), "kivi2": row(3.0, 6.0), "kivi3": row(4.0, 0.3),
            "kivi4": row(5.0, 0.05), "int2": row(2.25, 40.0), "int3": row(3.25, 5.0),
            "int4": row(4.25, 0.1), "hf-quanto-int2": row(3.0, 300.0),
            "hf-quanto-int4": row(5.0, 0.5)}
    rows.update({n: row(b, c) for n, (b, c) in eb.items()})
    return rows


def test_check_met_when_eb_lies_below_everything():
    eb = {"eb2": (2.0, 15.0), "eb2.5": (2.5, 5.0), "eb3": (3.0, 1.5), "eb3.5": (3.5, 0.5),
          "eb4": (4.0, 0.1), "eb5": (5.0, 0.0)}
    chk = rd.check_setting(synthetic(eb), rd.FAMILIES, residual=128)
    assert [c["met"] for c in chk["points"]] == [True] * 6
    assert chk["target"]["met"] is True and "(residual 128)" in chk["target"]["target"]
    e2 = chk["points"][0]
    # at 2.0 bits only ecco (2.01, within 1%) reaches: int starts at 2.25, kivi at 3
    assert list(e2["compared"]) == ["ecco (fixed rate)"]
    assert set(e2["not_reaching"]) == {"KIVI (int g32)", "int g128", "transformers QuantizedCache"}
    e35 = chk["points"][3]
    assert e35["compared"]["KIVI (int g32)"]["curve_change_pct"] == pytest.approx(3.15)
    assert e35["compared"]["KIVI (int g32)"]["between"] == ["kivi2", "kivi3"]
    assert not any(c["below_variable"] for c in chk["others"])
    assert {c["name"] for c in chk["others"]} >= {"int4", "kivi4", "ecco3"}


def test_check_not_met_names_the_curve_below():
    # eb4 at 4.0 bits: +0.35%; kivi3 (4.0 bits) is at +0.3%, int interpolated at 4.0 bits
    # between int3 (3.25, 5.0) and int4 (4.25, 0.1) gives +1.325%, ecco at 4.0: ~+0.416%
    eb = {"eb2": (2.0, 15.0), "eb2.5": (2.5, 5.0), "eb3": (3.0, 1.5), "eb3.5": (3.5, 0.5),
          "eb4": (4.0, 0.35), "eb5": (5.0, 0.0)}
    chk = rd.check_setting(synthetic(eb), rd.FAMILIES)
    e4 = next(c for c in chk["points"] if c["name"] == "eb4")
    assert e4["met"] is False and e4["below"] == ["KIVI (int g32)"]
    assert e4["compared"]["int g128"]["curve_change_pct"] == pytest.approx(1.325)
    assert e4["compared"]["KIVI (int g32)"]["difference_pct"] == pytest.approx(0.05)
    assert chk["target"]["met"] is False and "eb4" in chk["target"]["detail"]
    assert [c["met"] for c in chk["points"] if c["name"] != "eb4"] == [True] * 5


def test_check_not_met_between_eb_points():
    # every eb point is below every curve, but int4 (4.25 bits, +0.1%) lies below the eb
    # curve there (between eb4 +0.3% and eb5 +0.0%: +0.225%)
    eb = {"eb2": (2.0, 15.0), "eb2.5": (2.5, 5.0), "eb3": (3.0, 1.5), "eb3.5": (3.5, 0.5),
          "eb4": (4.0, 0.3), "eb5": (5.0, 0.0)}
    rows = synthetic(eb)
    rows["kivi3"] = row(4.0, 0.35)
    chk = rd.check_setting(rows, rd.FAMILIES)
    assert all(c["met"] for c in chk["points"])
    low = [c for c in chk["others"] if c["below_variable"]]
    assert [c["name"] for c in low] == ["int4"]
    assert low[0]["variable_change_pct"] == pytest.approx(0.225)
    assert low[0]["difference_pct"] == pytest.approx(0.125)  # eb minus int4
    assert chk["target"]["met"] is False and "int4 of int g128" in chk["target"]["detail"]


def test_check_unmeasured_and_out_of_range():
    rows = synthetic({"eb2": (2.0, 15.0)})
    rows["eb3"] = row(None, None, error="TypeError: no target_bits")
    chk = rd.check_setting(rows, rd.FAMILIES)
    by = {c["name"]: c for c in chk["points"]}
    assert by["eb2"]["met"] is True
    assert by["eb3"]["met"] is None and "TypeError" in by["eb3"]["detail"]
    assert by["eb4"]["met"] is None and "not run" in by["eb4"]["detail"]
    # one measured eb point: its curve reaches only ecco2 (2.01 bits), which lies above it
    assert [c["name"] for c in chk["others"]] == ["ecco2"]
    assert chk["target"]["met"] is None and "TypeError" in chk["target"]["detail"]
    far = synthetic({"eb5": (5.1, 0.0)})
    far["kivi4"] = row(5.2, 0.05)
    far = rd.check_setting(far, rd.FAMILIES)
    e5 = next(c for c in far["points"] if c["name"] == "eb5")
    assert e5["met"] is None and "outside 2-5 bits, not judged" in e5["detail"]
    assert list(e5["compared"]) == ["KIVI (int g32)"]  # compared, for information
    assert far["others"] == [] and far["target"]["met"] is None
    no_eb = rd.check_setting(rows, rd.select("ecco,kivi"))
    assert no_eb["points"] == [] and no_eb["target"]["met"] is None


def test_check_paired_interval_of_the_difference():
    g = torch.Generator().manual_seed(0)
    ref = (2 + torch.rand(8, generator=g, dtype=torch.float64)).tolist()

    def measured(shift):
        nll = [x + shift for x in ref]
        return {**row(None, None), "window_nll": nll,
                **common.paired_rel_change(nll, ref, n_boot=200)}

    rows = {"none": {"window_nll": ref}}
    for n, b, s in (("ecco2", 2.0, 0.05), ("ecco3", 3.0, 0.02), ("eb2.5", 2.5, 0.01)):
        rows[n] = measured(s)
        rows[n]["bits"] = {"compressed_bits_per_value": b}
    fams = rd.select("ecco,eb")
    chk = rd.check_setting(rows, fams, n_boot=200)
    c = next(p for p in chk["points"] if p["name"] == "eb2.5")["compared"]["ecco (fixed rate)"]
    # the same shift in every window: the difference has no spread and is clearly negative
    want = 100 * math.expm1(0.01) - (100 * math.expm1(0.05) + 100 * math.expm1(0.02)) / 2
    assert c["difference_pct"] == pytest.approx(want)
    assert c["difference_ci_pct"] == pytest.approx([want, want])
    assert c["outside_spread"] is True and c["curve_below"] is False


# ------------------------------------------------------------------ the sweep, reports, CLI


def test_sweep_tiny_writes_reports(model, tmp_path):
    res = rd.run(model=model, token_windows=windows(2, 192), families="ecco,eb,int",
                 context=160, residuals=(16, 0), n_boot=200, out_dir=tmp_path,
                 show_progress=False, command="eccokv eval ppl --sweep (test)")
    assert [s["residual"] for s in res["sweep"]] == [16, 0]
    assert list(res["families"]) == ["ecco", "eb", "int"]
    s = res["sweep"][0]
    assert [c["label"] for c in s["curves"]] == ["ecco (fixed rate)", "ecco-eb (variable rate)",
                                                 "int g128"]
    ecco = s["curves"][0]["points"]
    assert [p["name"] for p in ecco] == ["ecco2", "ecco3", "ecco4"]  # sorted by bits
    assert all(p["measured"] for p in ecco)
    assert [p["bits_per_value"] for p in ecco] == sorted(p["bits_per_value"] for p in ecco)
    rows = {r["name"]: r for r in res["settings"][0]["rows"]}
    assert ecco[1]["rel_change_pct"] == rows["ecco3"]["rel_change_pct"]  # summarise's numbers
    assert ecco[1]["bits_per_value"] == rows["ecco3"]["bits"]["compressed_bits_per_value"]
    err = _eb_error(model)
    for p in s["curves"][1]["points"]:  # eb: measured if EccoCache takes target_bits ...
        assert p["measured"] is (err is None)
        if err is not None:  # ... else exactly the error EccoCache raises, never skipped
            assert p["error"] == err
    if err is not None:
        assert all(c["met"] is None for c in s["check"]["points"])
        assert res["targets"][0]["met"] is None
    j = json.loads((tmp_path / "rd.json").read_text())
    assert j["evaluation"] == "ppl-sweep" and j["environment"]["source_digest"]
    assert j["sweep"][1]["residual"] == 0 and j["data"]["windows"] == 2
    md = (tmp_path / "rd.md").read_text()
    assert "Command: `eccokv eval ppl --sweep (test)`" in md
    assert f"Source digest: `{j['environment']['source_digest']}`" in md
    assert "## Residual window 16 tokens" in md and "## Residual window 0 tokens" in md
    assert "| int g128 | int3 |" in md and "### Variable-rate points" in md
    pytest.importorskip("matplotlib")
    png = (tmp_path / "rd.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert j["plot"].endswith("rd.png")


def _ppl_parser():
    """The real `eccokv eval ppl` parser, with rd's arguments added unless cli.py has them."""
    from eccokv.cli import build_parser

    def sub(p, name):
        act = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        return act.choices[name]

    p = build_parser()
    s = sub(sub(p, "eval"), "ppl")
    if "--sweep" not in s._option_string_actions:
        rd.add_cli(s)
    return p


def test_cli_arguments_and_usage_errors(capsys):
    p = _ppl_parser()
    a = p.parse_args(["eval", "ppl", "--sweep", "--families", "ecco,kivi", "--windows", "32",
                      "--residual", "128,0"])
    assert a.sweep is True and a.families == "ecco,kivi" and a.windows == 32
    d = p.parse_args(["eval", "ppl"])
    assert d.sweep is False and d.families is None and d.windows == ppl.DEFAULT_WINDOWS
    bad = [p.parse_args(["eval", "ppl", "--families", "ecco"]),  # no --sweep
           p.parse_args(["eval", "ppl", "--sweep", "--codecs", "ecco4"]),
           p.parse_args(["eval", "ppl", "--sweep", "--families", "ecco,nope"])]
    for b in bad:  # refused before any model loads
        assert rd.run_cli(b) == 2
    err = capsys.readouterr().err
    assert "--families needs --sweep" in err and "--codecs does not apply" in err
    assert "unknown families ['nope']" in err


@pytest.mark.slow
def test_sweep_smollm2_one_window(tmp_path, capsys):
    a = _ppl_parser().parse_args(["eval", "ppl", "--sweep", "--families", "ecco,kivi",
                                  "--windows", "1", "--out-dir", str(tmp_path),
                                  "--no-progress"])
    assert rd.run_cli(a) == 0
    j = json.loads((tmp_path / "rd.json").read_text())
    assert j["data"]["windows"] == 1 and j["data"]["context"] == ppl.DEFAULT_CONTEXT
    assert [s["residual"] for s in j["sweep"]] == list(ppl.DEFAULT_RESIDUALS)
    for s in j["sweep"]:
        for c in s["curves"]:
            assert [p["measured"] for p in c["points"]] == [True] * 3
            bits = [p["bits_per_value"] for p in c["points"]]
            assert 1.9 < bits[0] < bits[1] < bits[2] < 5.2
        assert s["check"]["target"]["met"] is None  # no eb family in this run
    assert (tmp_path / "rd.png").stat().st_size > 1000
    assert "# Rate-distortion sweep" in capsys.readouterr().out
