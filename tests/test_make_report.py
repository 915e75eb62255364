"""python/experiments/make_report.py: the README results section is rebuilt from result files only."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("make_report", REPO / "python/experiments/make_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_results(tmp_path: Path) -> tuple[Path, Path]:
    res, bench = tmp_path / "results", tmp_path / "bench"
    res.mkdir()
    bench.mkdir()
    (res / "compare_methods.md").write_text("### fake table\n\n| method | acc |\n|---|---|\n| x | 81.37 ± 0.42 |\n")
    (res / "compare_methods-quick-cpu.md").write_text("### smoke table 55.55\n")  # shadowed by the full one
    (res / "noisy_labels.md").write_text("### noisy\n\nflipped share 12.9%\n")
    ranks = [{"step": s, "budget": 4, "ranks": {"enc.layer.0.query": 2 + (s > 0), "enc.layer.0.value": 2 - (s > 0)}}
             for s in (0, 10)]

    def method(m, s):
        return {"test_accuracy": [m, s]}
    summary = {"command": "python python/experiments/compare_methods.py --device cuda --jobs 8",
               "seeds": [0, 1, 2],
               "tasks": {"toy": {"methods": {"tsqlora": method(0.8, 0.01), "quality@0.1": method(0.7, 0.02),
                                             "quality@0.3": method(0.75, 0.01), "random@0.1": method(0.69, 0.03),
                                             "random@0.3": method(0.74, 0.02)},
                                 "rank_history": ranks, "rank_history_run": "toy|tsqlora|lr=0.001|seed=0"}}}
    (res / "compare_methods.json").write_text(json.dumps(summary))
    (bench / "bench_x-cpu.json").write_text(json.dumps({
        "bench": "bench_x", "machine": "cpu", "date": "2026-11-30", "torch": "2.13", "notes": "",
        "goals": [{"goal": "faster than peer", "measured": 3.217, "unit": "x", "direction": ">=",
                   "target": 1.0, "met": True}],
        "rows": [{"shape": "a", "ratio": 3.217}, {"shape": "b", "ratio": 2.5},
                 {"set": "realloc 100k", "realloc_ms": 0.4321}]}))
    return res, bench


def test_section_rebuilt_from_files(tmp_path):
    mr = _load()
    res, bench = _fake_results(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nintro\n\n## Results\n\n{mr.BEGIN}\nstale 99.99\n{mr.END}\n\n## Tests\nend\n")
    assert mr.main(["--readme", str(readme), "--results", str(res), "--bench", str(bench)]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n\n## Results\n\n") and text.endswith(f"{mr.END}\n\n## Tests\nend\n")
    body = text[text.index(mr.BEGIN):text.index(mr.END)]
    assert "stale 99.99" not in body
    assert "81.37 ± 0.42" in body and "flipped share 12.9%" in body  # every table, verbatim
    assert "55.55" not in body  # the smoke table yields to the full one
    assert "3.217" in body and "bench_x" in body  # benchmark ratios come from the JSON
    # rows of another kind get their own header instead of losing their fields
    assert "| shape | ratio |\n|---|---|\n| a | 3.217 |\n| b | 2.5 |\n\n| set | realloc_ms |\n" in body
    assert "| realloc 100k | 0.4321 |" in body
    assert body.index("fake table") < body.index("noisy")
    for png in ("accuracy_vs_fraction.png", "rank_heatmap_toy.png"):
        assert (res / png).stat().st_size > 1000
        assert f"(results/{png})" in body
    assert body.count("Reproduce: `python python/experiments/compare_methods.py --device cuda --jobs 8 && "
                      "python python/experiments/make_report.py`") == 2
    # A number changed in a results file changes the README; nothing else moves.
    (res / "compare_methods.md").write_text("### fake table\n\n| x | 82.00 ± 0.10 |\n")
    mr.main(["--readme", str(readme), "--results", str(res), "--bench", str(bench)])
    again = readme.read_text()
    assert "82.00 ± 0.10" in again and "81.37" not in again
    assert again.replace("82.00 ± 0.10", "").count(mr.BEGIN) == 1


def test_quick_table_used_when_alone_and_labelled(tmp_path):
    mr = _load()
    res = tmp_path / "results"
    res.mkdir()
    (res / "compare_methods-quick-cpu.md").write_text("### Smoke run (NOT a result)\n\n| x | 50.00 |\n")
    body = mr.build_body(res, tmp_path / "no-bench", tmp_path / "README.md")
    assert "Smoke run (NOT a result)" in body and "50.00" in body and "### Benchmarks" not in body


def test_fraction_plot_from_a_tagged_grid_when_the_main_one_has_none(tmp_path):
    """Fraction arms run elsewhere (--tag cpu-rt) still give the plot, captioned with their own
    command; once no summary holds fraction arms, a stale plot is removed, not left captionless."""
    mr = _load()
    res, bench = _fake_results(tmp_path)
    main = json.loads((res / "compare_methods.json").read_text())
    (res / "compare_methods-cpu-rt.json").write_text(json.dumps(
        {**main, "command": "python python/experiments/compare_methods.py --device cpu --tag cpu-rt"}))
    main["tasks"]["toy"]["methods"] = {"tsqlora": main["tasks"]["toy"]["methods"]["tsqlora"]}
    (res / "compare_methods.json").write_text(json.dumps(main))
    body = mr.build_body(res, bench, tmp_path / "README.md")
    plot = body[body.index("![accuracy against data fraction]"):]
    assert "Reproduce: `python python/experiments/compare_methods.py --device cpu --tag cpu-rt && " in plot
    assert (res / "accuracy_vs_fraction.png").stat().st_size > 1000
    # A smaller grid (another quality preference, one fraction) named first does not take it over.
    one = {**main, "command": "python python/experiments/compare_methods.py --tag cpu-moderate"}
    one["tasks"] = {"toy": {**main["tasks"]["toy"], "methods": {
        "quality@0.3": {"test_accuracy": [0.7, 0.01]}, "random@0.3": {"test_accuracy": [0.7, 0.01]}}}}
    (res / "compare_methods-cpu-moderate.json").write_text(json.dumps(one))
    body = mr.build_body(res, bench, tmp_path / "README.md")
    assert "--tag cpu-rt && " in body[body.index("![accuracy against data fraction]"):]
    (res / "compare_methods-cpu-moderate.json").unlink()
    (res / "compare_methods-cpu-rt.json").unlink()
    body = mr.build_body(res, bench, tmp_path / "README.md")
    assert "accuracy_vs_fraction" not in body and not (res / "accuracy_vs_fraction.png").exists()
    assert "rank_heatmap_toy.png" in body


@pytest.mark.parametrize("text, what", [
    ("# no markers\n", "exactly one"),
    ("<!-- results:begin -->\n<!-- results:begin -->\n<!-- results:end -->\n", "found 2 and 1"),
    ("<!-- results:end -->\n<!-- results:begin -->\n", "comes before"),
])
def test_bad_markers_leave_readme_untouched(tmp_path, text, what):
    mr = _load()
    readme = tmp_path / "README.md"
    readme.write_text(text)
    with pytest.raises(ValueError, match=what) as err:
        mr.main(["--readme", str(readme), "--results", str(tmp_path / "r"), "--bench", str(tmp_path / "b")])
    assert str(readme) in str(err.value)
    assert readme.read_text() == text


def test_bench_quick_run_goes_under_quick_and_is_labelled(tmp_path, monkeypatch):
    """A benchmark's --quick smoke run must not overwrite results/<bench>-<device>.json (which
    the report renders): it defaults to results/quick/, records "quick": true, and the rendered
    table says it is no result."""
    pytest.importorskip("torch")
    import sys
    monkeypatch.syspath_prepend(str(REPO / "python/bench"))
    for name in ("common", "summarize"):
        sys.modules.pop(name, None)
    import common
    import summarize

    quick = common.parse_args("x", argv=["--quick"])
    assert quick.out == common.RESULTS_DIR / "quick"
    path = common.write_results("bench_x", "cpu", tmp_path, [{"a": 1.0}], [])
    assert json.loads(path.read_text())["quick"] is True
    assert "smoke run (--quick), NOT a result" in summarize.render(tmp_path)
    assert common.parse_args("x", argv=[]).out == common.RESULTS_DIR
    path = common.write_results("bench_x", "cpu", tmp_path, [{"a": 1.0}], [])
    assert json.loads(path.read_text())["quick"] is False
    assert "NOT a result" not in summarize.render(tmp_path)


def test_round_robin_timing_rotates_the_order_of_the_calls(monkeypatch):
    """A fixed order gave one implementation the first place of every round (right after the
    previous round's last); each must take every place in turn."""
    pytest.importorskip("torch")
    import sys
    monkeypatch.syspath_prepend(str(REPO / "python/bench"))
    sys.modules.pop("common", None)
    import common

    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    ms = common.round_robin_ms(fns, "cpu", repeats=6, warmup=0)
    assert set(ms) == set("abc") and all(v >= 0 for v in ms.values())
    rounds = [calls[i:i + 3] for i in range(0, 18, 3)]
    assert rounds[:3] == [list("abc"), list("bca"), list("cab")]
    for k in "abc":  # every place, twice over six rounds
        assert sorted(r.index(k) for r in rounds) == [0, 0, 1, 1, 2, 2]
