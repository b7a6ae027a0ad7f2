"""Aggregates with bootstrap intervals (checked against a hand-rolled bootstrap and a coverage
experiment), metric families, and the leaderboard in its three formats with plots."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench.cli import main
from bench.leaderboard import grouped, interval_cell, latest_rows, load_runs, number, to_markdown
from bench.results import FAMILIES, bootstrap_interval, harmonic_of_means, summarize


def hand_percentile_bootstrap(columns: list[np.ndarray], statistic, resamples: int, seed: int) -> tuple[float, float]:
    """Resample case indices with replacement (jointly for all columns), take the 2.5/97.5 percentiles."""
    rng = np.random.default_rng(seed)
    n = len(columns[0])
    values = np.empty(resamples)
    for i in range(resamples):
        idx = rng.integers(0, n, n)
        values[i] = statistic(*[c[idx] for c in columns])
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def test_interval_matches_a_hand_rolled_percentile_bootstrap():
    data = np.random.default_rng(7).normal(0.4, 1.0, size=25)
    ours = bootstrap_interval([data], np.mean)
    hand = hand_percentile_bootstrap([data], np.mean, 20000, seed=123)
    # Monte Carlo error of each endpoint is ~0.006 here (9,999 and 20,000 resamples)
    assert ours == pytest.approx(hand, abs=0.03)
    assert ours[0] < data.mean() < ours[1]


def test_score_interval_resamples_cases_jointly():
    rng = np.random.default_rng(3)
    es, ps, ns = (rng.uniform(0.2, 1.0, size=15) for _ in range(3))

    def s_of_means(a, b, c):
        means = [a.mean(), b.mean(), c.mean()]
        return 3 / sum(1 / m for m in means)

    ours = bootstrap_interval([es, ps, ns], harmonic_of_means)
    hand = hand_percentile_bootstrap([es, ps, ns], s_of_means, 20000, seed=5)
    # endpoint Monte Carlo error ~0.002; a 90% interval would differ by ~0.02
    assert ours == pytest.approx(hand, abs=0.008)


def test_interval_covers_a_known_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(11)
    trials, hits = 300, 0
    for _ in range(trials):
        low, high = bootstrap_interval([rng.normal(2.0, 1.0, size=40)], np.mean, n_resamples=1999)
        hits += low <= 2.0 <= high
    # the percentile bootstrap at n=40 covers ~94%; three binomial standard errors either side
    assert 0.89 <= hits / trials <= 0.99


def test_degenerate_samples():
    assert bootstrap_interval([[0.7]], np.mean) is None
    assert bootstrap_interval([[1.0, 1.0, 1.0]], np.mean) == (1.0, 1.0)
    summary = summarize([{"status": "ok", "drift_kl": 0.5}])
    assert summary["metrics"]["drift_kl"] == {
        "family": "drift", "label": "KL", "mean": 0.5, "n": 1, "ci_low": None, "ci_high": None,
        "higher_is_better": False, "protocol": "next-token distribution", "comparable_group": "drift.next_token_kl",
        "scorer": "KL(pre || post) of the next token after each neighbourhood prompt", "reference": "harness"}


def prompt_nlls(rate: float, new_should_win: bool) -> list[dict]:
    """Per-prompt NLL pairs whose success rate is rate (0, 0.5 or 1; NaN: no prompts)."""
    new_wins, true_wins = {"target_new": 0.5, "target_true": 2.0}, {"target_new": 2.0, "target_true": 0.5}
    good, bad = (new_wins, true_wins) if new_should_win else (true_wins, new_wins)
    return {0.0: [bad], 0.5: [good, bad], 1.0: [good]}.get(rate, [])


def record(es: float, ps: float, ns: float, p_pre: float, p_post: float, **extra) -> dict:
    post = {"rewrite_prompts_nll": prompt_nlls(es, True), "paraphrase_prompts_nll": prompt_nlls(ps, True),
            "neighborhood_prompts_nll": prompt_nlls(ns, False), "p_new": p_post, "p_true": 0.1}
    return {"status": "ok", "pre": {"p_new": p_pre}, "post": post, "drift_kl": 0.1 * es, "seconds_edit": 2.0, **extra}


def test_summarize_families_hand_computed():
    cases = [
        record(1.0, 0.5, 1.0, 0.01, 0.9, post_easyedit={"reliability": 1.0, "locality": 0.75,
                                                       "portability": {"reasoning": 0.5, "aliasing": 1.0}},
               post_generation={"generation_success": 1.0, "generation_entropy": 5.5},
               ppl_pre=20.0, ppl_post=21.5, circuit_edge_jaccard=0.4, circuit_extra_overlap=0.3, circuit_note="x"),
        record(0.0, 0.5, 0.5, 0.02, 0.02, post_easyedit={"reliability": 0.5, "locality": 1.0},
               ppl_pre=20.0, ppl_post=20.5, circuit_edge_jaccard=0.2),
        record(1.0, float("nan"), 1.0, 0.0, 0.5),  # NaN and an unusable p_pre are skipped
        {"status": "failed", "reason": "boom"},
    ]
    s = summarize(cases)
    m = s["metrics"]
    assert s["n_cases"] == 3 and s["n_failed"] == 1
    # the failed case counts as 0 in the success rates
    assert m["efficacy_score"]["mean"] == pytest.approx(2 / 4) and m["efficacy_score"]["n"] == 4
    assert m["paraphrase_score"]["n"] == 3 and m["paraphrase_score"]["mean"] == pytest.approx(1 / 3)
    assert m["reliability"]["mean"] == pytest.approx(1.5 / 3) and m["generation_success"]["mean"] == 0.5
    # S is the harmonic mean of the means, over the cases that report all three (and the failed one)
    es, ps, ns = 1 / 3, 1 / 3, 0.5
    assert m["score"]["mean"] == pytest.approx(3 / (1 / es + 1 / ps + 1 / ns)) and m["score"]["n"] == 3
    assert m["log_p_new_lift"]["mean"] == pytest.approx((math.log(0.9 / 0.01) + 0.0) / 2)
    assert m["portability"]["mean"] == pytest.approx(0.75) and m["portability"]["n"] == 1
    assert m["locality"]["mean"] == pytest.approx(0.875)
    assert m["ppl_delta"]["mean"] == pytest.approx((1.5 + 0.5) / 2) and m["ppl_delta"]["higher_is_better"] is False
    assert m["generation_success"]["family"] == "generation" and m["generation_entropy"]["family"] == "generation"
    assert "reference_score" not in m
    assert m["circuit_extra_overlap"]["family"] == "circuit" and "circuit_note" not in m
    assert s["efficacy_score"] == m["efficacy_score"]["mean"] and s["circuit_node_jaccard"] is None
    # every aggregate belongs to exactly one family and nothing is averaged across families
    assert {agg["family"] for agg in m.values()} <= set(FAMILIES)
    assert not {"overall", "mean_score", "average"} & set(s)


def test_interval_cell_format():
    agg = {"mean": 0.9, "ci_low": 0.78, "ci_high": 1.0, "n": 5}
    assert interval_cell(agg, 5) == "0.90 [0.78, 1.00]"
    assert interval_cell(dict(agg, n=3), 5) == "0.90 [0.78, 1.00] (n=3)"
    assert interval_cell({"mean": 206.4, "ci_low": None, "ci_high": None, "n": 1}, 1) == "206"
    assert interval_cell(None, 5) == "–"


# --- the leaderboard over run folders ---------------------------------------------------------

def write_run(runs: Path, run_id: str, editor: str, model: str, dataset: str, finished: str,
              cases: list[dict], sequential: list[dict] | None = None) -> None:
    folder = runs / run_id
    folder.mkdir(parents=True)
    manifest = {"editor": editor, "model": {"name": model, "sha256": "ab" * 32}, "seed": 0, "device": "cpu",
                "dataset": {"name": dataset, "sha256": "cd" * 32}, "commit": "0123456789abcdef" * 2 + "01234567",
                "finished": finished, "mode": {"name": "sequential" if sequential else "single", "batch_size": 1}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "cases.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cases))
    summary = dict(summarize(cases), editor=editor, model=model, dataset=dataset)
    (folder / "summary.json").write_text(json.dumps(summary))
    if sequential:
        (folder / "sequential.jsonl").write_text("".join(json.dumps(p) + "\n" for p in sequential))


@pytest.fixture
def runs(tmp_path) -> Path:
    runs = tmp_path / "runs"
    good = [record(1.0, 1.0, 1.0, 0.01, 0.9, circuit_edge_jaccard=0.3),
            record(1.0, 0.5, 0.5, 0.01, 0.8, circuit_edge_jaccard=0.5),
            record(0.0, 0.5, 1.0, 0.01, 0.05, circuit_edge_jaccard=0.4)]
    write_run(runs, "r1-rome-old", "rome", "m1", "facts", "2026-01-01T00:00:00", [record(0.0, 0.0, 0.0, 0.1, 0.1)])
    write_run(runs, "r2-rome-new", "rome", "m1", "facts", "2026-01-02T00:00:00", good)
    write_run(runs, "r3-ft", "ft", "m1", "facts", "2026-01-02T00:00:00", [record(0.0, 0.0, 1.0, 0.1, 0.2)] * 2)
    write_run(runs, "r4-ft-cf", "ft", "m1", "counterfact", "2026-01-03T00:00:00", [record(1.0, 1.0, 1.0, 0.1, 0.5)])
    curve = [{"n_edits": k, "efficacy": 1.0 - 0.1 * k, "neighborhood": 0.9, "ppl": 20.0 + k} for k in (0, 1, 2)]
    write_run(runs, "r5-rome-seq", "rome", "m1", "facts", "2026-01-04T00:00:00", good[:1], sequential=curve)
    return runs


def test_latest_run_per_editor_and_sequential_runs_are_not_rows(runs):
    rows = latest_rows(load_runs(runs))
    assert sorted((r.dataset, r.run_id) for r in rows) == [("counterfact", "r4-ft-cf"), ("facts", "r2-rome-new"),
                                                          ("facts", "r3-ft")]


def test_markdown_groups_intervals_and_provenance(runs, tmp_path, capsys):
    out = tmp_path / "LB.md"
    assert main(["leaderboard", "--runs", str(runs), "--output", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Leaderboard\n\nGenerated from the run folders in")
    assert f"`python -m bench leaderboard --runs {runs} --output {out}`" in text
    assert "## m1 · facts" in text and "## m1 · counterfact" in text
    expected = summarize([json.loads(line) for line in (runs / "r2-rome-new" / "cases.jsonl").read_text().splitlines()])
    es = expected["metrics"]["efficacy_score"]
    headline, rome_line = [line for line in text.splitlines() if line.startswith("| rome [2]")][:2]
    assert headline.split("|")[2].strip() == f"{es['mean']:.2f}"  # the headline table: means only
    assert f"{es['mean']:.2f} [{es['ci_low']:.2f}, {es['ci_high']:.2f}]" in rome_line
    assert "| 3 " in rome_line  # n
    assert "run `r2-rome-new`: model sha256 `abababababab`, dataset sha256 `cdcdcdcdcdcd`, harness commit " \
           "`0123456789abcd`, device cpu" in text
    assert "r1-rome-old" not in text
    # the sequential run is no row of the main table, only of the sequential table (its last curve point)
    assert "run `r5-rome-seq`" in text and text.index("r5-rome-seq") > text.index("Sequential editing")
    seq_line = next(line for line in text.splitlines() if line.startswith("| rome [") and "| 2 " in line)
    cells = [c.strip() for c in seq_line.strip("|").split("|")]
    assert cells[1:] == ["2", "0.80", "–", "0.90", "–", "20.0", "22.0", "2.00", "–"]  # no unedited reference: no column
    assert "#### CounterFact: sequence log-likelihood comparison" in text and "#### Drift" in text
    legend = text[text.index("## Metric legend"):]
    assert "| ES " in legend and "`counterfact.mean_token_nll.success`" in legend and "experiments/summarize.py" in legend


def test_json_and_csv(runs, capsys):
    assert main(["leaderboard", "--runs", str(runs), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    groups = {(g["model"], g["dataset"]): g for g in data["groups"]}
    rome = next(r for r in groups[("m1", "facts")]["rows"] if r["editor"] == "rome")
    assert rome["provenance"]["run_id"] == "r2-rome-new" and rome["metrics"]["score"]["n"] == 3
    assert data["interval"]["confidence_level"] == 0.95
    assert main(["leaderboard", "--runs", str(runs), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    es = [r for r in rows if r["editor"] == "rome" and r["metric"] == "efficacy_score"]
    assert len(es) == 1 and float(es[0]["mean"]) == pytest.approx(2 / 3) and es[0]["family"] == "counterfact"
    assert {r["run_id"] for r in rows} == {"r2-rome-new", "r3-ft", "r4-ft-cf"}


def test_plots_are_written(runs, tmp_path, capsys):
    plots = tmp_path / "plots"
    assert main(["leaderboard", "--runs", str(runs), "--plots", str(plots)]) == 0
    names = {p.name for p in plots.iterdir()}
    assert {"m1__facts__counterfact.png", "m1__facts__drift.png", "m1__facts__efficacy_vs_circuit.png",
            "m1__facts__sequential.png", "m1__counterfact__counterfact.png"} <= names
    assert "m1__counterfact__efficacy_vs_circuit.png" not in names  # no circuit fields there
    assert all((plots / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)


def test_a_variant_hparams_file_gets_its_own_row(runs):
    write_run(runs, "r6-r-rome", "r-rome", "m1", "facts", "2026-01-05T00:00:00", [record(1.0, 1.0, 1.0, 0.1, 0.5)])
    write_run(runs, "r7-r-rome-orig", "r-rome", "m1", "facts", "2026-01-06T00:00:00", [record(0.0, 0.0, 1.0, 0.1, 0.5)])
    for run_id, hparams in (("r6-r-rome", "/repo/editors/hparams/r-rome/m1.yaml"),
                            ("r7-r-rome-orig", "/repo/benchmarks/hparams/rome-original.yaml")):
        manifest = json.loads((runs / run_id / "manifest.json").read_text())
        (runs / run_id / "manifest.json").write_text(json.dumps(dict(manifest, hparams_file=hparams)))
    labels = {r.run_id: r.label for r in latest_rows(load_runs(runs))}
    assert labels["r6-r-rome"] == "r-rome" and labels["r7-r-rome-orig"] == "r-rome [rome-original]"


def test_missing_runs_folder_exits_2(tmp_path, capsys):
    assert main(["leaderboard", "--runs", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: runs folder")


def test_relation_circuit_fields_are_aggregated_in_the_circuit_family() -> None:
    from bench.results import summarize

    cases = [{"status": "ok", "relation_circuit_edge_jaccard": j, "relation_circuit_source": "lre:x"}
             for j in (0.8, 0.9, 0.4)]
    metric = summarize(cases)["metrics"]["relation_circuit_edge_jaccard"]
    assert metric["family"] == "circuit" and metric["n"] == 3
    assert metric["mean"] == pytest.approx((0.8 + 0.9 + 0.4) / 3)
    assert "relation_circuit_source" not in summarize(cases)["metrics"]


# --- readability: significant figures and collapsed rows ------------------------------------------

def significant_figures(text: str) -> int:
    """Significant digits of a number as printed (mantissa only for scientific notation)."""
    mantissa = text.lstrip("-").split("e")[0].replace(".", "").lstrip("0")
    return len(mantissa)


@pytest.mark.parametrize("value", [0.0, 0.9, 0.123456, 0.0123456, 0.00123456, 1.23456e-5, 1.0, 9.87654, 12.3456,
                                   206.4, 999.9, 1234.5, 98765.4, 3.2e46, -20.93, -0.049, -3.2e46])
def test_numbers_have_at_most_four_significant_figures(value):
    text = number(value)
    assert significant_figures(text) <= 4, text
    assert float(text) == pytest.approx(value, rel=0.01, abs=0.0051)  # rounded, never truncated to another scale


def test_non_finite_numbers_are_printed_as_such():
    assert (number(float("inf")), number(float("-inf")), number(float("nan"))) == ("inf", "-inf", "nan")


def test_a_collapsed_run_is_marked_and_no_cell_exceeds_four_significant_figures(tmp_path, capsys):
    runs = tmp_path / "runs"
    healthy = [record(1.0, 1.0, 1.0, 0.01, 0.9, ppl_pre=20.0, ppl_post=20.5)] * 2
    broken = [record(0.0, 0.0, 1.0, 0.01, 0.02, ppl_pre=20.0, ppl_post=3.24e46),
              record(0.0, 0.0, 1.0, 0.01, 0.02, ppl_pre=20.0, ppl_post=None),  # non-finite, stored as null
              record(1.0, 0.0, 1.0, 0.01, 0.5, ppl_pre=20.0, ppl_post=150.0)]  # 7.5x: not collapsed
    write_run(runs, "r1-rome", "rome", "m1", "facts", "2026-01-01T00:00:00", healthy)
    write_run(runs, "r2-kn", "kn", "m1", "facts", "2026-01-01T00:00:00", broken)
    out = tmp_path / "LB.md"
    assert main(["leaderboard", "--runs", str(runs), "--output", str(out), "--plots", str(tmp_path / "plots")]) == 0
    text = out.read_text()
    kn_lines = [line for line in text.splitlines() if line.startswith("| kn")]
    rome_lines = [line for line in text.splitlines() if line.startswith("| rome")]
    assert kn_lines and all("⚠ collapsed (2/3)" in line for line in kn_lines)
    assert rome_lines and not any("collapsed" in line for line in rome_lines)
    assert "1.62e+46" in kn_lines[0]  # the headline ΔPPL: (3.24e46 - 20 + 130) / 2 over the finite cases
    table_cells = [cell.strip() for line in text.splitlines() if line.startswith("|") and not line.startswith("|--")
                   for cell in line.strip("|").split("|")]
    numbers = [tok for cell in table_cells for tok in cell.replace("[", " ").replace("]", " ").replace(",", " ").split()
               if tok.lstrip("-").replace(".", "", 1).replace("e+", "", 1).replace("e-", "", 1).isdigit()]
    assert numbers and all(significant_figures(n) <= 4 for n in numbers), [n for n in numbers if significant_figures(n) > 4]
    assert (tmp_path / "plots" / "m1__facts__drift.png").exists()
    capsys.readouterr()
    assert main(["leaderboard", "--runs", str(runs), "--format", "json"]) == 0
    rows = {r["editor"]: r for g in json.loads(capsys.readouterr().out)["groups"] for r in g["rows"]}
    assert rows["kn"]["n_collapsed"] == 2 and rows["rome"]["n_collapsed"] == 0


def test_a_curve_is_marked_at_its_first_collapsed_point_even_if_it_recovers():
    from bench.leaderboard import collapsed_at

    def curve(*ppls):
        return [{"n_edits": 5 * i, "ppl": p} for i, p in enumerate(ppls)]

    assert collapsed_at(curve(20.0, 150.0, 210.0)) == 10  # 7.5x, then 10.5x
    assert collapsed_at(curve(20.0, 150.0, 200.0)) is None  # exactly 10x is not past the threshold
    assert collapsed_at(curve(20.0, 250.0, 40.0)) == 5  # a point past 10x, then back
    assert collapsed_at(curve(20.0, None)) == 5  # a non-finite perplexity is stored as null
    assert collapsed_at(curve(None, 1e9)) is None  # no base perplexity: no criterion


def test_a_partial_sequential_run_is_plotted_only_with_include_partial(tmp_path, capsys):
    runs = tmp_path / "runs"
    curve = [{"n_edits": k, "efficacy": 1.0, "neighborhood": 0.9, "ppl": 20.0} for k in (0, 5)]
    write_run(runs, "r1-rome-seq", "rome", "m1", "facts", "2026-01-04T00:00:00", [record(1.0, 1.0, 1.0, 0.0, 0.9)],
              sequential=curve)
    manifest = json.loads((runs / "r1-rome-seq" / "manifest.json").read_text())
    (runs / "r1-rome-seq" / "manifest.json").write_text(json.dumps(dict(manifest, status="interrupted")))
    for flag, expected in (([], False), (["--include-partial"], True)):
        plots = tmp_path / f"plots{len(flag)}"
        assert main(["leaderboard", "--runs", str(runs), "--plots", str(plots), *flag]) == 0
        assert (plots / "m1__facts__sequential.png").exists() == expected


def test_curve_points_are_tabulated_with_the_accumulated_update_norm(tmp_path, capsys):
    runs = tmp_path / "runs"
    weights = [{"tensor": "l5", "layer": 5, "delta_norm": 3.0, "norm": 10.0, "norm_0": 9.0},
               {"tensor": "l6", "layer": 6, "delta_norm": 4.0, "norm": 11.0, "norm_0": 10.0}]
    curve = [{"n_edits": 0, "n_scored": 0, "ppl": 20.0, "ppl_ratio": 1.0, "collapsed": False},
             {"n_edits": 10, "n_scored": 4, "efficacy": 0.75, "paraphrase": 0.5, "neighborhood": 1.0, "score": 0.6667,
              "unedited": {"efficacy": 0.25, "neighborhood": 0.875}, "ppl": 250.0, "ppl_ratio": 12.5,
              "collapsed": True, "weights": weights}]
    write_run(runs, "r1-memit-seq", "memit", "m1", "counterfact", "2026-01-04T00:00:00",
              [record(1.0, 1.0, 1.0, 0.0, 0.9)], sequential=curve)
    out = tmp_path / "LB.md"
    assert main(["leaderboard", "--runs", str(runs), "--output", str(out)]) == 0
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in out.read_text().splitlines()
             if line.startswith("| memit [")]
    last, *points = lines
    # the summary row: ‖W_t − W_0‖ = sqrt(3² + 4²) over both edited tensors, collapse marked at 10 edits
    assert last == ["memit [1] ⚠ collapsed at 10 edits", "10", "0.75", "0.50", "1.00", "0.67", "0.25 / 0.88", "20.0",
                    "250", "230", "5.00"]
    assert points == [["memit [1]", "0", "0", "–", "–", "–", "–", "–", "20.0", "1.00", "0.00", "no"],
                      ["memit [1]", "10", "4", "0.75", "0.50", "1.00", "0.67", "0.25 / 0.88", "250", "12.5", "5.00",
                       "yes"]]


def pre_scored_case(case_id: str, es: float, ps: float, ns: float, edited_es: float = 1.0) -> dict:
    """A case record with the given pre-edit ES / PS / NS (the unedited model's scores)."""
    row = record(edited_es, 1.0, 1.0, 0.01, 0.9, case_id=case_id)
    row["pre"] = {"p_new": 0.01, "efficacy_score": es, "paraphrase_score": ps, "neighborhood_score": ns}
    return row


def test_the_unedited_models_scores_come_from_the_cases_pre_edit_scores(tmp_path):
    runs = tmp_path / "runs"
    case = pre_scored_case

    # two editors on overlapping cases: each case counts once; "c" only in the second run
    write_run(runs, "r1-rome", "rome", "m1", "counterfact", "2026-01-01T00:00:00",
              [case("a", 0.0, 0.5, 1.0), case("b", 1.0, 0.0, 0.5)])
    write_run(runs, "r2-ft", "ft", "m1", "counterfact", "2026-01-01T00:00:00",
              [case("a", 0.0, 0.5, 1.0), case("c", 0.5, 0.25, 0.0)])
    text = to_markdown(grouped(latest_rows(load_runs(runs))), None, runs)
    es, ps, ns = 1.5 / 3, 0.75 / 3, 1.5 / 3
    s = 3 / (1 / es + 1 / ps + 1 / ns)
    assert (f"Unedited model, the pre-edit scores of the same 3 cases: ES {es:.2f}, PS {ps:.2f}, NS {ns:.2f}, "
            f"S {s:.2f}.") in text


def test_known_only_rows_have_their_own_unedited_line_and_rank_after_every_record(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "r1-rome", "rome", "m1", "counterfact", "2026-01-01T00:00:00",
              [pre_scored_case(c, es, 0.5, 1.0, edited_es=0.0) for c, es in (("a", 1.0), ("b", 0.0))])
    write_run(runs, "r2-rome-known", "rome", "m1", "counterfact", "2026-01-02T00:00:00",
              [pre_scored_case(c, 0.0, 0.5, 1.0) for c in ("k1", "k2", "k3")])
    summary_path = runs / "r2-rome-known" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps(dict(summary, case_selection="known-only")))
    text = to_markdown(grouped(latest_rows(load_runs(runs))), None, runs)
    # each line covers its own cases: (1 + 0) / 2 on every record, 0 / 3 on the known ones
    assert "Unedited model, the pre-edit scores of the same 2 cases: ES 0.50, PS 0.50, NS 1.00" in text
    assert "Unedited model, the pre-edit scores of the `[known-only]` rows' 3 cases: ES 0.00, PS 0.50, NS 1.00" in text
    headline = [line for line in text.splitlines() if line.startswith("| rome")]
    # the known-only row scores higher but is listed after the row of every record
    assert [line.split("|")[1].strip() for line in headline[:2]] == ["rome [1]", "rome [known-only] [2]"]
