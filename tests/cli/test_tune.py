"""`bench tune` (a grid on the dev split), `bench hparams`, and the facts' dev/test split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from bench.cli import main
from bench.cmd_tune import choose, evaluate_point, point_scores
from bench.data import load_dataset
from bench.data.builtin import DEV_EVERY
from bench.run import RunConfig, apply_edits, restore, run_case, select_cases
from bench.scoring import case_target_nll, counterfact_scores
from lmview.arch import backup
from editors.base import HPARAMS_DIR, get_editor
from lmview.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread", "cache")


# --- the split --------------------------------------------------------------------------------------

def test_dev_and_test_splits_are_disjoint_and_cover_the_file() -> None:
    every = load_dataset("facts:all").cases
    test, dev = load_dataset("facts").cases, load_dataset("facts:dev").cases
    test_ids, dev_ids = {c.case_id for c in test}, {c.case_id for c in dev}
    assert not test_ids & dev_ids and test_ids | dev_ids == {c.case_id for c in every}
    for relation in {c.relation for c in every}:
        in_file = [c.case_id for c in every if c.relation == relation]
        assert [cid for cid in in_file if cid in dev_ids] == in_file[DEV_EVERY - 1::DEV_EVERY]
    assert load_dataset("facts").split["name"] == "test" and load_dataset("facts:dev").split["n_cases"] == len(dev)


def test_bench_run_on_facts_edits_test_cases_and_records_the_split(tmp_path: Path) -> None:
    assert main(["run", "--editor", "ike", "--model", "tiny-gpt2", "--n", "12", "--no-circuits", "--ppl-texts", "0",
                 "--output", str(tmp_path)]) == 0
    run_dir = next(tmp_path.iterdir())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["dataset"]["split"]["name"] == "test"
    edited = {json.loads(line)["case_id"] for line in (run_dir / "cases.jsonl").read_text().splitlines()}
    assert len(edited) == 12 and not edited & {c.case_id for c in load_dataset("facts:dev").cases}


# --- bench tune ---------------------------------------------------------------------------------------

def header_lines(text: str) -> list[str]:
    return [line[2:] for line in text.splitlines() if line.startswith("# ")]


def test_tune_writes_the_chosen_yaml_with_grid_split_and_scores(tmp_path: Path, capsys) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text("norm_constraint: [1.0e-9, 0.05]\nlr: [0.01]\n")
    out = tmp_path / "tuned.yaml"
    assert main(["tune", "--editor", "ft-l", "--model", "tiny-gpt2", "--grid", str(grid), "--n", "2",
                 "--ppl-texts", "0", "--output", str(out)]) == 0
    text = out.read_text()
    lines = header_lines(text)
    assert any(line.startswith("Grid (2 points): {lr: [0.01], norm_constraint: [1.0e-09, 0.05]}") for line in lines)
    split = next(line for line in lines if line.startswith("Split: facts:dev"))
    dev_ids = {c.case_id for c in load_dataset("facts:dev").cases}
    named = split.split("dev cases: ")[1].rstrip(".").split(", ")
    assert len(named) == 2 and set(named) <= dev_ids
    rows = [line for line in lines if line.startswith("  {")]
    assert len(rows) == 2 and sum("<- chosen" in row for row in rows) == 1
    scores = [[float(x) for x in row.rsplit("}: ", 1)[1].split()[:4]] for row in rows]  # ES PS NS S
    chosen = next(i for i, row in enumerate(rows) if "<- chosen" in row)
    assert scores[chosen][3] == max(s[3] for s in scores)
    body = yaml.safe_load(text)
    base = yaml.safe_load((HPARAMS_DIR / "ft-l" / "tiny-gpt2.yaml").read_text())
    point = [{"norm_constraint": 1e-9, "lr": 0.01}, {"norm_constraint": 0.05, "lr": 0.01}][chosen]
    assert body == {**base, **point}
    # the recorded ES of the loose point is what bench run's per-case scoring gives on those cases
    bundle = load_model("tiny-gpt2", "cpu")
    data = load_dataset("facts:dev")
    cases, _ = select_cases(bundle, data, 2, only_known=False)
    assert [c.case_id for c in cases] == named
    editor = get_editor("ft-l")(bundle, {**base, "norm_constraint": 0.05, "lr": 0.01})
    records = [run_case(bundle, editor, c, [], RunConfig(editor="ft-l", circuits=False, ppl_texts=0), tmp_path)
               for c in cases]
    es = sum(r["post"]["efficacy_score"] for r in records) / 2
    assert scores[1][0] == pytest.approx(es, abs=1e-3)


def test_batch_size_edits_each_group_with_one_apply_and_restores() -> None:
    """`--batch-size 2` on a batched editor: one apply per group of 2, each case scored after its group's edit
    (checked against the same group applied and scored by hand), the weights restored bitwise after each."""
    bundle = load_model("tiny-llama", "cpu")
    cases, _ = select_cases(bundle, load_dataset("facts:dev"), 4, only_known=False)
    hparams = yaml.safe_load((HPARAMS_DIR / "ultraedit" / "tiny-llama.yaml").read_text())
    editor = get_editor("ultraedit")(bundle, hparams)
    groups: list[list[str]] = []
    apply = editor.apply
    editor.apply = lambda batch: groups.append([c.case_id for c in batch]) or apply(batch)
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    records = evaluate_point(bundle, editor, cases, None, None, batch_size=2)
    assert groups == [[c.case_id for c in cases[:2]], [c.case_id for c in cases[2:]]]
    assert all(torch.equal(v, before[k]) for k, v in bundle.model.state_dict().items())
    by_hand = get_editor("ultraedit")(bundle, hparams)
    saved = backup(bundle.model, [n for n, _ in bundle.model.named_parameters()])
    apply_edits(by_hand, cases[2:])
    for record, case in zip(records[2:], cases[2:]):
        expected = counterfact_scores(case_target_nll(bundle.model, bundle.tokenizer, by_hand.evaluation_case(case), "cpu"))
        scalars = [k for k, v in expected.items() if isinstance(v, float)]
        assert record["status"] == "ok" and len(scalars) >= 4
        assert {k: record["post"][k] for k in scalars} == pytest.approx({k: expected[k] for k in scalars}, abs=1e-6)
    restore(bundle.model, saved)
    alone = evaluate_point(bundle, get_editor("ultraedit")(bundle, hparams), cases[2:], None, None, batch_size=1)
    # a group edit is not two single edits
    assert [r["post"]["log_p_new"] for r in alone] != pytest.approx([r["post"]["log_p_new"] for r in records[2:]], abs=1e-6)


def test_failed_cases_count_zero_and_collapse_is_not_chosen() -> None:
    ok = {"status": "ok", "post": {"efficacy_score": 1.0, "paraphrase_score": 1.0, "neighborhood_score": 1.0},
          "ppl_pre": 10.0, "ppl_post": 11.0}
    failed = {"status": "failed", "reason": "RuntimeError: x"}
    s = point_scores([ok, failed])
    assert (s["ES"], s["PS"], s["NS"], s["n_failed"], s["collapsed"]) == (0.5, 0.5, 0.5, 1, False)
    blown = point_scores([{**ok, "ppl_post": 1e3}])
    assert blown["collapsed"] and blown["S"] == 1.0
    assert choose([blown, s]) == 1 and choose([blown, blown]) == 0


@pytest.mark.parametrize("args, message", [
    (["--editor", "nope"], "error: unknown editor 'nope'"),
    (["--editor", "rome"], "error: no grid for 'rome'"),
    (["--editor", "ft-l", "--n", "0"], "error: --n must be at least 1"),
])
def test_tune_bad_input_is_one_error_line(args: list[str], message: str, capsys) -> None:
    assert main(["tune", "--model", "tiny-gpt2", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)


def test_tune_rejects_a_grid_that_is_not_lists(tmp_path: Path, capsys) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text("lr: 0.1\n")
    assert main(["tune", "--editor", "ft-l", "--model", "tiny-gpt2", "--grid", str(grid)]) == 2
    assert "grid entry 'lr' must be a non-empty list" in capsys.readouterr().err


# --- bench hparams ---------------------------------------------------------------------------------------

def test_hparams_sources_and_differences_from_the_published_file(capsys) -> None:
    assert main(["hparams", "ft-l", "--model", "tiny-gpt2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    ours = yaml.safe_load((HPARAMS_DIR / "ft-l" / "tiny-gpt2.yaml").read_text())
    published = yaml.safe_load((HPARAMS_DIR / "ft-l" / "gpt2-xl.yaml").read_text())
    sources = {row["key"]: row["source"] for row in report["hparams"]}
    assert {k for k, v in sources.items() if v == "editors/hparams/ft-l/tiny-gpt2.yaml"} == set(ours)
    assert sources["batch_size"] == "default (editors.ft)" and sources["train_bias"] == "default (editors.ft)"
    differing = {k for k in set(ours) | set(published) if ours.get(k) != published.get(k)}
    assert {d["key"] for d in report["published"]["differences"]} == differing and differing
    assert report["published"]["reference"] == "kmeng01/rome hparams/FT/gpt2-xl_constr.json"


def test_hparams_table_and_errors(capsys) -> None:
    assert main(["hparams", "ft-l", "--model", "gpt2-xl"]) == 0  # offline: the GPT-2 sizes are known
    out = capsys.readouterr().out
    assert "(kmeng01/rome hparams/FT/gpt2-xl_constr.json): identical" in out
    assert "  batch_size" in out and "default (editors.ft)" in out
    assert main(["hparams", "nope", "--model", "tiny-gpt2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown editor 'nope'")
