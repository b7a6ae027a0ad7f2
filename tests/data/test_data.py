"""Tests for bench.data: the built-in fact set, loaders and validation (no model)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from bench.data import DATASETS, load_dataset
from bench.data.builtin import facts_split_of, load_builtin
from bench.data.counterfact import load_counterfact
from bench.data.records import LoadedDataset
from lmview.case import DatasetError, EditCase, validate_case
from tests.helpers import FACTS_FILE, SHARED_DATA

FACTS = FACTS_FILE
COUNTERFACT_SAMPLE = SHARED_DATA / "counterfact" / "counterfact-val.json"

needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir() or not COUNTERFACT_SAMPLE.is_file(),
    reason=f"CounterFact sample not available at {COUNTERFACT_SAMPLE}",
)


def make_case(**overrides) -> EditCase:
    fields = dict(
        case_id="c1", relation="r", subject="France", prompt="The capital of {} is",
        target_true="Paris", target_new="Rome", paraphrases=("France's capital is",),
        neighborhood=(("The capital of Germany is", "Berlin"),),
    )
    fields.update(overrides)
    return EditCase(**fields)


def fact_record(**overrides) -> dict:
    rec = {
        "case_id": "capital-france", "relation": "country_capital", "subject": "France",
        "prompt": "The capital of {} is", "target_true": "Paris", "target_new": "Rome",
        "paraphrases": ["The capital city of France is", "France has its capital in"],
        "neighborhood": [{"prompt": "The capital of Germany is", "answer": "Berlin"}],
    }
    rec.update(overrides)
    return rec


def write_facts(tmp_path: Path, records: list, name: str = "facts.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"name": "tiny", "version": 1, "cases": records}), "utf-8")
    return path


# ---------------------------------------------------------------- facts.json


@pytest.fixture(scope="module")
def facts() -> LoadedDataset:
    return load_builtin(FACTS)


def test_facts_size_and_relations(facts: LoadedDataset) -> None:
    assert facts.name == "kebench-facts"
    assert len(facts.cases) >= 160
    assert len({c.relation for c in facts.cases}) >= 9
    assert facts.rejected == []
    assert facts.sha256 == hashlib.sha256(FACTS.read_bytes()).hexdigest()


def test_facts_header() -> None:
    doc = json.loads(FACTS.read_text("utf-8"))
    assert doc["name"] == "kebench-facts"
    assert doc["version"] == 1
    assert isinstance(doc["description"], str) and doc["description"]


def test_facts_every_case_well_formed(facts: LoadedDataset) -> None:
    ids = [c.case_id for c in facts.cases]
    assert len(ids) == len(set(ids))
    for c in facts.cases:
        assert validate_case(c) is None, c.case_id
        assert c.prompt.count("{}") == 1, c.case_id
        assert not c.prompt.endswith(" "), c.case_id
        for target in (c.target_true, c.target_new):
            assert target == target.strip() and target, c.case_id
        assert c.target_new.lower() != c.target_true.lower(), c.case_id
        assert len(c.paraphrases) >= 2, c.case_id
        for p in c.paraphrases:
            assert c.subject in p, (c.case_id, p)
            assert "{}" not in p and not p.endswith(" "), (c.case_id, p)
        assert len(c.neighborhood) >= 5, c.case_id
        for prompt, answer in c.neighborhood:
            assert answer and answer == answer.strip(), c.case_id
            assert "{}" not in prompt and not prompt.endswith(" "), c.case_id
            assert c.subject not in prompt, (c.case_id, prompt)


def test_facts_neighbors_do_not_answer_target_new(facts: LoadedDataset) -> None:
    # a neighbour whose true answer is the new target would confound locality
    for c in facts.cases:
        assert all(a != c.target_new for _, a in c.neighborhood), c.case_id
        assert len({p for p, _ in c.neighborhood}) == len(c.neighborhood), c.case_id


def test_facts_known_example(facts: LoadedDataset) -> None:
    case = next(c for c in facts.cases if c.case_id == "capital-france")
    assert case.rewrite_prompt == "The capital city of France is"
    assert case.target_true == "Paris"


def test_facts_registry_default(facts: LoadedDataset) -> None:
    assert "facts" in DATASETS and "counterfact" in DATASETS
    loaded = load_dataset("facts")
    assert loaded.name == "facts"
    split = facts_split_of(facts.cases)  # `facts` is the file's test split (bench tune uses facts:dev)
    assert [c.case_id for c in loaded.cases] == [c.case_id for c in facts.cases if split[c.case_id] == "test"]


# ---------------------------------------------------------------- EditCase


def test_rewrite_prompt_keeps_braces_in_subject() -> None:
    case = make_case(subject="A{0}B", prompt="Say {} now")
    assert case.rewrite_prompt == "Say A{0}B now"


def test_to_dict_round_trip(tmp_path: Path) -> None:
    case = make_case(case_id="capital-france")
    assert case.to_dict()["neighborhood"] == [
        {"prompt": "The capital of Germany is", "answer": "Berlin"}]
    path = write_facts(tmp_path, [case.to_dict()])
    assert load_builtin(path).cases == [case]


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("overrides, fragment", [
    ({"prompt": "The capital of Spain is"}, "subject 'France' not found in prompt"),
    ({"prompt": "The capital of France is"}, "no '{}' placeholder"),
    ({"subject": " "}, "subject is empty"),
    ({"target_true": "  "}, "target_true is empty"),
    ({"target_new": ""}, "target_new is empty"),
    ({"target_new": " paris "}, "target_new equals target_true"),
])
def test_validate_case_reasons(overrides: dict, fragment: str) -> None:
    reason = validate_case(make_case(**overrides))
    assert reason is not None and fragment in reason


def test_validate_case_accepts_good_case() -> None:
    assert validate_case(make_case()) is None


def test_semantic_problems_are_rejected_not_raised(tmp_path: Path) -> None:
    path = write_facts(tmp_path, [
        fact_record(),
        fact_record(case_id="bad-subject", prompt="The capital of Spain is"),
        fact_record(case_id="bad-empty", target_new=" "),
        fact_record(case_id="bad-same", target_new="PARIS"),
    ])
    loaded = load_builtin(path)
    assert [c.case_id for c in loaded.cases] == ["capital-france"]
    rejected = dict(loaded.rejected)
    assert set(rejected) == {"bad-subject", "bad-empty", "bad-same"}
    assert "not found" in rejected["bad-subject"]
    assert "target_new is empty" in rejected["bad-empty"]
    assert "equals target_true" in rejected["bad-same"]


def test_builtin_strips_leading_space_from_targets(tmp_path: Path) -> None:
    path = write_facts(tmp_path, [fact_record(target_true=" Paris", target_new=" Rome")])
    case = load_builtin(path).cases[0]
    assert (case.target_true, case.target_new) == ("Paris", "Rome")


# ---------------------------------------------------------------- malformed records


def test_missing_field_names_file_record_and_field(tmp_path: Path) -> None:
    bad = fact_record(case_id="x")
    del bad["target_new"]
    path = write_facts(tmp_path, [fact_record(), fact_record(case_id="y"), bad])
    with pytest.raises(DatasetError) as err:
        load_builtin(path)
    msg = str(err.value)
    assert msg == f"{path}: record 2 (case_id 'x'): field 'target_new' is missing"
    assert "\n" not in msg


def test_wrong_type_field(tmp_path: Path) -> None:
    path = write_facts(tmp_path, [fact_record(paraphrases=[1, 2])])
    with pytest.raises(DatasetError, match=r"record 0 .*'paraphrases\[0\]'.*expected str"):
        load_builtin(path)


def test_bad_neighborhood_item(tmp_path: Path) -> None:
    path = write_facts(tmp_path, [fact_record(neighborhood=[{"prompt": "x"}])])
    with pytest.raises(DatasetError, match=r"field 'neighborhood\[0\]\.answer' is missing"):
        load_builtin(path)


def test_record_not_an_object(tmp_path: Path) -> None:
    path = write_facts(tmp_path, [fact_record(), "oops"])
    with pytest.raises(DatasetError, match=r"record 1: expected a JSON object, got str"):
        load_builtin(path)


def test_invalid_json_and_duplicate_ids(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", "utf-8")
    with pytest.raises(DatasetError, match="broken.json: invalid JSON"):
        load_builtin(broken)
    dup = write_facts(tmp_path, [fact_record(), fact_record()], "dup.json")
    with pytest.raises(DatasetError, match="duplicate case_id 'capital-france'"):
        load_builtin(dup)


# ---------------------------------------------------------------- CounterFact


@needs_shared
def test_counterfact_sample_record_zero() -> None:
    loaded = load_counterfact(COUNTERFACT_SAMPLE)
    assert len(loaded.cases) + len(loaded.rejected) == 1919
    assert len(loaded.cases) > 1800
    case = loaded.cases[0]
    assert case.case_id == "10"
    assert case.relation == "counterfact"
    assert case.subject == "BBC One"
    assert case.prompt == "{}, by"
    assert case.rewrite_prompt == "BBC One, by"
    assert case.target_new == "Sega"
    assert case.target_true == "BBC"
    assert case.paraphrases == ("BBC One is my favorite product out of everything owned by",)
    assert case.neighborhood == (("BBC Radio, by", "BBC"),)
    assert loaded.sha256 == hashlib.sha256(COUNTERFACT_SAMPLE.read_bytes()).hexdigest()


@needs_shared
def test_counterfact_via_registry_and_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEBENCH_COUNTERFACT", str(COUNTERFACT_SAMPLE))
    by_name = load_dataset("counterfact")
    assert by_name.name == "counterfact"
    by_path = load_dataset(str(COUNTERFACT_SAMPLE))
    assert by_path.sha256 == by_name.sha256
    assert by_path.cases[0] == by_name.cases[0]


def test_counterfact_flattened_variants(tmp_path: Path) -> None:
    records = [
        {"case_id": 1, "prompt": "Danielle Darrieux's mother tongue is", "subject": "Danielle Darrieux",
         "target_new": " English", "ground_truth": " French",
         "rephrase_prompt": ["Where Danielle Darrieux is from, people speak",
                             "Danielle Darrieux grew up speaking"],
         "locality_prompt": ["Michel Rocard's mother tongue is", "Thomas Joannes's mother tongue is"],
         "locality_ground_truth": ["French", "Dutch"], "relation_id": "P103"},
        {"case_id": 2, "prompt": "The mother tongue of X is", "subject": "Y",
         "target_new": "A", "ground_truth": "B", "rephrase_prompt": "p",
         "locality_prompt": "q", "locality_ground_truth": "r"},
    ]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(records), "utf-8")
    loaded = load_counterfact(path)
    case = loaded.cases[0]
    assert case.relation == "P103"
    assert case.prompt == "{}'s mother tongue is"
    assert (case.target_true, case.target_new) == ("French", "English")
    assert len(case.paraphrases) == 2
    assert case.neighborhood[1] == ("Thomas Joannes's mother tongue is", "Dutch")
    assert [cid for cid, _ in loaded.rejected] == ["2"]
    assert "placeholder" in loaded.rejected[0][1]


def test_counterfact_original_rome_layout(tmp_path: Path) -> None:
    record = {
        "case_id": 0, "pararel_idx": 2796,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is", "relation_id": "P103",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": " French", "id": "Q150"},
            "subject": "Danielle Darrieux",
        },
        "paraphrase_prompts": ["Shayna does this and Yossel goes still. Danielle Darrieux, a native"],
        "neighborhood_prompts": [
            "The mother tongue of Léon Blum is",
            {"prompt": "Michel Rocard is a native speaker of", "target": " French"},
        ],
        "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
    }
    path = tmp_path / "rome.jsonl"
    path.write_text(json.dumps(record) + "\n", "utf-8")
    loaded = load_dataset(str(path))  # .jsonl with ROME records -> counterfact loader
    assert loaded.rejected == []
    case = loaded.cases[0]
    assert case.case_id == "0"
    assert case.relation == "P103"
    assert case.prompt == "The mother tongue of {} is"
    assert case.subject == "Danielle Darrieux"
    assert (case.target_true, case.target_new) == ("French", "English")
    assert case.paraphrases == (record["paraphrase_prompts"][0],)
    assert case.neighborhood == (("The mother tongue of Léon Blum is", "French"),
                                 ("Michel Rocard is a native speaker of", "French"))


def test_counterfact_nested_missing_field(tmp_path: Path) -> None:
    record = {"case_id": 5, "requested_rewrite": {"prompt": "{} is", "subject": "S",
                                                  "target_true": {"str": "a"}}}
    path = tmp_path / "rome.json"
    path.write_text(json.dumps([record]), "utf-8")
    with pytest.raises(DatasetError, match=r"record 0 \(case_id '5'\): field "
                                           r"'requested_rewrite\.target_new' is missing"):
        load_counterfact(path)


# ---------------------------------------------------------------- load_dataset dispatch


def test_load_dataset_detects_builtin_file(tmp_path: Path) -> None:
    path = write_facts(tmp_path, [fact_record()])
    loaded = load_dataset(str(path))
    assert loaded.name == "tiny"
    assert loaded.cases[0].case_id == "capital-france"
    jsonl = tmp_path / "facts.jsonl"
    jsonl.write_text(json.dumps(fact_record()) + "\n\n", "utf-8")
    assert load_dataset(str(jsonl)).cases == loaded.cases


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(DatasetError) as err:
        load_dataset("no-such-dataset")
    assert str(err.value) == ("unknown dataset 'no-such-dataset'; valid: counterfact, facts, facts:all, facts:dev, "
                              "facts:test, knowedit, mquake, zsre, lre:<relation>, or a path to a .json/.jsonl file "
                              "(layout detected)")


def test_registered_dataset_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "absent.json"
    monkeypatch.setenv("KEBENCH_COUNTERFACT", str(missing))
    with pytest.raises(DatasetError, match="file not found at .*absent.json.*KEBENCH_COUNTERFACT"):
        load_dataset("counterfact")
