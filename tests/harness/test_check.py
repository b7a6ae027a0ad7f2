"""The regression gate: a baseline made by --update-baseline, an unchanged editor passes, an editor whose
update is scaled to zero fails with a line naming editor, metric, value, baseline and tolerance, and a
missing or gone editor is reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.check import (DEFAULT_BASELINE, DEFAULT_SUITE, Suite, build_baseline, load_suite, metric_failures,
                         tolerance, write_slice)
from bench.cli import main
from editors import base
from editors.ft import FineTuneL
from lmview.arch import parameter
from lmview.registry import Entry

TINY_SUITE = """\
model: tiny-gpt2
dataset: facts
cases: [capital-france, language-france, currency-japan]
seed: 0
device: cpu
circuits: false
editors: [ft-l]
run: {ppl_texts: 0}
metrics:
  efficacy_score: {min_tolerance: 0.01}
  log_p_new_lift: {min_tolerance: 0.25}
  drift_kl: {min_tolerance: 0.01}
"""


class ZeroedFT(FineTuneL):
    """FT-L with its weight change multiplied by zero: a deliberately broken editor."""

    name = "ft-l"

    def apply(self, cases):
        model = self.bundle.model
        names = self.parameters_to_touch(cases)
        before = {n: parameter(model, n).detach().clone() for n in names}
        outcome = super().apply(cases)
        with torch.no_grad():
            for n in names:
                weight = parameter(model, n)
                weight.copy_(before[n] + 0.0 * (weight - before[n]))
        return outcome


@pytest.fixture(scope="module")
def gate(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny-gpt2 suite for ft and its baseline, written by `bench check --update-baseline`."""
    folder = tmp_path_factory.mktemp("gate")
    suite, baseline = folder / "suite.yaml", folder / "baseline.json"
    suite.write_text(TINY_SUITE)
    assert main(["check", "--suite", str(suite), "--baseline", str(baseline), "--update-baseline"]) == 0
    return suite, baseline


def check(suite: Path, baseline: Path, *extra: str) -> int:
    return main(["check", "--suite", str(suite), "--baseline", str(baseline), *extra])


def test_update_baseline_writes_every_gated_metric_with_its_tolerance(gate):
    suite, baseline = gate
    data = json.loads(baseline.read_text())
    assert data["suite"]["cases"] == ["capital-france", "language-france", "currency-japan"]
    entry = data["editors"]["ft-l"]
    assert entry["n_cases"] == 3 and set(entry["metrics"]) == {"efficacy_score", "log_p_new_lift", "drift_kl"}
    lift = entry["metrics"]["log_p_new_lift"]
    low, high = lift["ci"]
    assert low <= lift["value"] <= high and lift["higher_is_better"] is True
    assert lift["tolerance"] == pytest.approx(max(0.25, lift["value"] - low))
    kl = entry["metrics"]["drift_kl"]
    assert kl["higher_is_better"] is False and kl["tolerance"] == pytest.approx(max(0.01, kl["ci"][1] - kl["value"]))


def test_unchanged_editor_passes(gate, capsys):
    assert check(*gate) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "check: passed" in out


def test_update_scaled_to_zero_fails_with_a_clear_line(gate, capsys, monkeypatch):
    monkeypatch.setitem(base.EDITORS._entries, "ft-l", Entry("ft-l", ZeroedFT))  # break ft-l for this test
    assert check(*gate) == 1
    out = capsys.readouterr().out
    baseline = json.loads(gate[1].read_text())["editors"]["ft-l"]["metrics"]["log_p_new_lift"]
    expected = (f"FAIL ft-l: log_p_new_lift = 0, below baseline {baseline['value']:.4g} by more than the tolerance "
                f"{baseline['tolerance']:.4g}")
    assert expected in out, out
    assert "check: FAILED" in out


def test_missing_and_gone_editors_are_reported(gate, tmp_path, capsys):
    suite, baseline = gate
    data = json.loads(baseline.read_text())
    data["editors"] = {"ghost-editor": data["editors"]["ft-l"]}
    renamed = tmp_path / "baseline.json"
    renamed.write_text(json.dumps(data))
    assert check(suite, renamed) == 1
    out = capsys.readouterr().out
    assert f"FAIL ft-l: registered but missing from the baseline {renamed}" in out
    assert f"FAIL ghost-editor: in the baseline {renamed} but no longer registered" in out


def test_bad_suite_and_unknown_editor_exit_2(gate, tmp_path, capsys):
    suite, baseline = gate
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_SUITE.replace("drift_kl:", "no_such_metric:"))
    assert check(bad, baseline) == 2
    assert "error:" in capsys.readouterr().err
    assert check(suite, baseline, "--editors", "nope") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --editors") and "Traceback" not in err


def test_tolerance_is_the_interval_half_width_on_the_regression_side():
    up = {"mean": 0.8, "ci_low": 0.5, "ci_high": 0.9, "higher_is_better": True}
    down = {"mean": 0.2, "ci_low": 0.15, "ci_high": 0.6, "higher_is_better": False}
    assert tolerance(up, 0.01, 1.0) == pytest.approx(0.3)
    assert tolerance(down, 0.01, 1.0) == pytest.approx(0.4)
    assert tolerance(up, 0.01, 0.5) == pytest.approx(0.15)
    constant = {"mean": 1.0, "ci_low": 1.0, "ci_high": 1.0, "higher_is_better": True}
    assert tolerance(constant, 0.05, 1.0) == 0.05
    single = {"mean": 1.0, "ci_low": None, "ci_high": None, "higher_is_better": True}
    assert tolerance(single, 0.05, 1.0) == 0.05


def test_metric_failures_cover_direction_missing_metrics_and_lost_cases():
    entry = {"n_cases": 3, "metrics": {
        "efficacy_magnitude": {"value": 0.9, "ci": [0.8, 1.0], "n": 3, "higher_is_better": True, "tolerance": 0.1},
        "drift_kl": {"value": 0.1, "ci": [0.0, 0.2], "n": 3, "higher_is_better": False, "tolerance": 0.1},
        "locality": {"value": 0.9, "ci": [0.8, 1.0], "n": 3, "higher_is_better": True, "tolerance": 0.1}}}
    ok = {"n_cases": 3, "metrics": {"efficacy_magnitude": {"mean": 0.81}, "drift_kl": {"mean": 0.19},
                                    "locality": {"mean": 0.85}}}
    assert metric_failures("rome", entry, ok) == []
    bad = {"n_cases": 2, "n_failed": 1, "metrics": {"efficacy_magnitude": {"mean": 0.79}, "drift_kl": {"mean": 0.21}}}
    lines = [f.line() for f in metric_failures("rome", entry, bad)]
    assert lines[0].startswith("FAIL rome: n_cases = 2, below baseline 3")
    assert "FAIL rome: efficacy_magnitude = 0.79, below baseline 0.9 by more than the tolerance 0.1" in lines
    assert "FAIL rome: drift_kl = 0.21, above baseline 0.1 by more than the tolerance 0.1 (lower is better)" in lines
    assert any(line.startswith("FAIL rome: locality = none") and "missing" in line for line in lines)


def test_subset_update_keeps_the_other_editors_entries(tmp_path):
    suite = Suite(path=tmp_path / "s.yaml", model="m", dataset="facts", cases=["a"], metrics={"efficacy_score": 0.01})
    previous = {"editors": {"rome": {"n_cases": 3, "metrics": {}}, "old": {"n_cases": 3, "metrics": {}}}}
    summary = {"n_cases": 1, "metrics": {"efficacy_score": {"mean": 1.0, "ci_low": None, "ci_high": None, "n": 1,
                                                            "higher_is_better": True}}}
    new = build_baseline(suite, {"ft-l": summary}, "sha", previous, keep={"rome"})
    assert set(new["editors"]) == {"ft-l", "rome"}
    assert new["editors"]["ft-l"]["metrics"]["efficacy_score"]["tolerance"] == 0.01


def test_committed_suite_is_valid_and_its_cases_exist(tmp_path):
    suite = load_suite(DEFAULT_SUITE)
    assert suite.model == "smollm2-135m" and suite.device == "cpu" and not suite.circuits and suite.editors is None
    path, sha = write_slice(suite, tmp_path)
    assert [c["case_id"] for c in json.loads(path.read_text())["cases"]] == suite.cases and len(sha) == 64
    if DEFAULT_BASELINE.exists():
        baseline = json.loads(DEFAULT_BASELINE.read_text())
        assert baseline["suite"]["cases"] == suite.cases and baseline["suite"]["model"] == suite.model
        for entry in baseline["editors"].values():
            for metric in entry["metrics"].values():
                assert {"value", "ci", "n", "tolerance", "higher_is_better"} <= set(metric)
