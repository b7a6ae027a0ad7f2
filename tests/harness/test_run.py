"""The run contract: folders and files, bitwise restore, failed edits, bad input, the leaderboard."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench.cli import main
from bench.run import RunConfig, run_case
from editors.base import EditOutcome, Editor, register, registry
from lmview.case import EditCase
from tests.helpers import tiny_rome_hparams


SUMMARY_KEYS = {
    "n_cases", "efficacy_score", "paraphrase_score", "neighborhood_score", "score", "efficacy_magnitude",
    "drift_kl", "circuit_edge_jaccard", "circuit_node_jaccard", "circuit_faithfulness_pre",
    "circuit_faithfulness_post", "edit_layer_in_circuit", "seconds_per_edit", "editor", "model", "dataset",
}


@register("test-nan")
class NanEditor(Editor):
    """Test-only: writes NaN into one MLP weight."""

    def parameters_to_touch(self, cases):
        return [self.bundle.arch.mlp_out_weight_name(0)]

    def apply(self, cases):
        with torch.no_grad():
            self.bundle.arch.mlp_out_weight(self.bundle.model, 0)[0, 0] = float("nan")
        return EditOutcome(layers=[0])


def a_case() -> EditCase:
    return EditCase(
        case_id="t-1", relation="country_capital", subject="France", prompt="The capital of {} is",
        target_true="Paris", target_new="Rome",
        paraphrases=("France's capital is", "The capital city of France is"),
        neighborhood=tuple((f"The capital of {c} is", a) for c, a in
                           [("Germany", "Berlin"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Italy", "Rome"),
                            ("Egypt", "Cairo")]),
    )


def test_nan_edit_fails_the_case_and_restores_bitwise(tiny_model, tmp_path):
    tiny_model.bridge()  # the bridge wraps the HF modules (and renames parameters) once, up front
    before = {n: p.detach().clone() for n, p in tiny_model.model.named_parameters()}
    editor = NanEditor(tiny_model, {})
    cfg = RunConfig(editor="test-nan", circuits=False)
    record = run_case(tiny_model, editor, a_case(), ["France", "Spain"], cfg, tmp_path)
    assert record["status"] == "failed" and "NaN" in record["reason"]
    after = dict(tiny_model.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_rome_case_restores_bitwise_and_scores(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("KEBENCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"Paragraph {i} about the city of Paris and France." for i in range(40)))
    from editors.base import get_editor, load_hparams

    hparams, _ = load_hparams("rome", tiny_model.name, tiny_model.arch.family)
    hparams.update(mom2_dataset=str(tmp_path / "corpus.txt"), mom2_n_samples=40)
    editor = get_editor("rome")(tiny_model, hparams)
    tiny_model.bridge()
    before = {n: p.detach().clone() for n, p in tiny_model.model.named_parameters()}
    cfg = RunConfig(editor="rome", top_n=50)
    record = run_case(tiny_model, editor, a_case(), ["France", "Spain", "Italy", "Japan"], cfg, tmp_path / "c")
    after = dict(tiny_model.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert record["status"] == "ok", record
    # a random-init model is no test of efficacy (the SmolLM2 test is); the edit must change the outputs
    assert record["post"]["p_new"] != record["pre"]["p_new"]
    assert record["drift_kl"] > 0.0
    assert 0.0 <= record["circuit_edge_jaccard"] <= 1.0
    # None where clean and corrupted differ by under 0.1 nats, as on this random model (circuits/curve.py)
    assert "circuit_faithfulness_pre" in record


def test_cli_bad_names_exit_2_with_valid_names(capsys):
    assert main(["run", "--editor", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown editor 'nope'") and "rome" in err and "Traceback" not in err
    assert main(["run", "--editor", "rome", "--dataset", "no-such-data"]) == 2
    assert "unknown dataset 'no-such-data'; valid: counterfact, facts" in capsys.readouterr().err
    assert main(["run", "--editor", "rome", "--model", "./no/such/dir"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_registry_lists_spine_editors():
    assert {"rome", "ft-l"} <= set(registry())


def test_end_to_end_tiny_run_writes_the_contract(tmp_path, monkeypatch, device):
    """A full `bench run` on tiny-gpt2 with every case kept (a random model knows no facts)."""
    hp = tiny_rome_hparams(tmp_path, "capitals, languages and currencies")
    monkeypatch.setenv("KEBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    code = main(["run", "--editor", "rome", "--model", "tiny-gpt2", "--n", "2", "--all-cases", "--output", str(out),
                 "--hparams", str(hp), "--device", device, "--top-n", "40"])
    assert code == 0
    (run_dir,) = out.iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {"editor", "model", "dataset", "hparams", "seed", "versions", "device", "commit", "started", "finished"} <= set(manifest)
    assert manifest["model"]["sha256"] and manifest["dataset"]["sha256"]
    lines = (run_dir / "cases.jsonl").read_text().splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    ok = [r for r in records if r["status"] == "ok"]
    assert summary["n_cases"] == len(ok)
    expected_es = sum(r["post"]["efficacy_score"] for r in ok) / len(ok)
    assert summary["efficacy_score"] == pytest.approx(expected_es)
    es = summary["metrics"]["efficacy_score"]
    assert es["family"] == "counterfact" and es["n"] == len(ok) and es["mean"] == pytest.approx(expected_es)
    circuit_files = run_dir / "circuits"
    assert len(list(circuit_files.glob("*.pre.json"))) == len(list(circuit_files.glob("*.post.json"))) == len(ok)
    assert len(list(circuit_files.glob("*.json"))) == 4 * len(ok)  # + noise floor, old-answer control
    assert main(["leaderboard", "--runs", str(out), "--output", str(tmp_path / "lb.md")]) == 0
    board = (tmp_path / "lb.md").read_text()
    assert "| rome" in board and "tiny-gpt2" in board
    assert not math.isnan(summary["drift_kl"])


def test_interleave_relations_round_robin():
    from bench.run import interleave_relations

    def case(cid: str, rel: str) -> EditCase:
        return EditCase(cid, rel, "S", "{} is", "a", "b", (), ())

    cases = [case("c1", "cap"), case("c2", "cap"), case("c3", "cap"), case("l1", "lang"), case("m1", "cur")]
    assert [c.case_id for c in interleave_relations(cases)] == ["c1", "l1", "m1", "c2", "c3"]
