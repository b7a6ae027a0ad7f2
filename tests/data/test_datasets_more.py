"""Tests for the zsRE, KnowEdit, MQuAKE and LRE loaders, layout detection, and verified downloads (no model)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest

import bench.data as data
import bench.data.sources as sources
from bench.data import dataset_descriptions, detect_layout, load_dataset
from bench.data.builtin import load_builtin
from bench.data.knowedit import load_knowedit
from bench.data.mquake import load_mquake
from bench.data.zsre import load_zsre
from lmview.case import DatasetError, EditCase, validate_case
from tests.helpers import SHARED_DATA

ZSRE_SAMPLE = SHARED_DATA / "zsre" / "zsre_mend_train-1k.json"
LRE_CAPITALS = SHARED_DATA / "lre" / "factual" / "country_capital_city.json"
LRE_INSTRUMENTS = SHARED_DATA / "lre" / "factual" / "person_plays_instrument.json"

needs_zsre = pytest.mark.skipif(not ZSRE_SAMPLE.is_file(), reason=f"zsRE sample not available at {ZSRE_SAMPLE}")
needs_lre = pytest.mark.skipif(not LRE_CAPITALS.is_file(), reason=f"LRE relations not available at {LRE_CAPITALS}")


def write_json(tmp_path: Path, name: str, doc) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc), "utf-8")
    return path


# ---------------------------------------------------------------- zsRE


def zsre_record(**overrides) -> dict:
    rec = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
           "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft", "answers": ["uniform"],
           "loc": "nq question: john goodman's character in the big lebowski", "loc_ans": "Walter Sobchak",
           "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?"}
    rec.update(overrides)
    return rec


@needs_zsre
def test_zsre_shared_sample() -> None:
    loaded = load_dataset("zsre")
    assert loaded.name == "zsre"
    assert len(loaded.cases) + len(loaded.rejected) == 1000
    # counted independently over the raw file: 17 records have alt == answers[0], 2 have an empty alt
    reasons = [why for _, why in loaded.rejected]
    assert sum("equals target_true" in why for why in reasons) == 17
    assert sorted(cid for cid, why in loaded.rejected if why == "target_new is empty") == ["534", "723"]
    assert len(reasons) == 19
    case = loaded.cases[0]
    assert case.case_id == "0" and case.scoring == "zsre"
    assert case.prompt == "What is the product made by {}?"
    assert case.rewrite_prompt == "What is the product made by UniFirst?"
    assert (case.target_true, case.target_new) == ("uniform", "unmanned aircraft")
    assert case.paraphrases == ("What will be the product of UniFirst?",)
    assert case.neighborhood == (("nq question: john goodman's character in the big lebowski", "Walter Sobchak"),)
    assert all(c.neighborhood[0][0].startswith("nq question: ") for c in loaded.cases)
    assert loaded.sha256 == hashlib.sha256(ZSRE_SAMPLE.read_bytes()).hexdigest()
    assert load_dataset(str(ZSRE_SAMPLE)).cases == loaded.cases  # by path, layout detected


def test_zsre_leading_spaces_and_multi_answers(tmp_path: Path) -> None:
    path = write_json(tmp_path, "z.json", [zsre_record(alt=" drones ", answers=[" uniforms", "workwear"],
                                                       loc_ans=" Walter")])
    case = load_zsre(path).cases[0]
    assert (case.target_true, case.target_new, case.neighborhood[0][1]) == ("uniforms", "drones", "Walter")


def test_zsre_first_bad_record_names_index_and_field(tmp_path: Path) -> None:
    bad = zsre_record()
    del bad["alt"]
    path = write_json(tmp_path, "z.json", [zsre_record(), bad, zsre_record(answers=[])])
    with pytest.raises(DatasetError) as err:
        load_dataset(str(path))
    assert str(err.value) == f"{path}: record 1: field 'alt' is missing"
    path = write_json(tmp_path, "z2.json", [zsre_record(), zsre_record(answers=[])])
    with pytest.raises(DatasetError, match=r"record 1: field 'answers' is an empty list"):
        load_zsre(path)


def test_zsre_subject_missing_from_question_is_rejected(tmp_path: Path) -> None:
    path = write_json(tmp_path, "z.json", [zsre_record(), zsre_record(subject="Nobody")])
    loaded = load_zsre(path)
    assert [c.case_id for c in loaded.cases] == ["0"]
    assert loaded.rejected[0][0] == "1" and "not found in prompt" in loaded.rejected[0][1]


# ---------------------------------------------------------------- KnowEdit

KNOWEDIT_CF = {  # WikiData_counterfact record, as in EasyEdit's KnowEdit.md
    "subject": "Frederic Piesch",
    "prompt": "The name of the position held by Frederic Piesch is",
    "target_new": "Archbishop of León, Mexico",
    "ground_truth": "mayor of Vienna",
    "portability": {"Subject_Aliasing": [
        {"prompt": "The name of the position held by Frederic of Pieschen is",
         "ground_truth": "Archbishop of León, Mexico"}]},
    "locality": {
        "Relation_Specificity": [{"prompt": "The gender of Frederic Piesch is", "ground_truth": "male"}],
        "Forgetfulness": [{"prompt": "The name of the position held by Frederic Piesch, which is not Archbishop "
                                     "of León, Mexico, is", "ground_truth": "mayor of Vienna"}]},
}
KNOWEDIT_RECENT = {  # WikiData_recent: knowledge insertion, no ground_truth; alias lists
    "subject": "Leo Arons", "prompt": "The place of death of Leo Arons is", "target_new": "Berlin",
    "portability": {"Reasoning": [{"prompt": "The name of the continent which the place of death of Leo Arons is "
                                             "part of is", "ground_truth": [["Europe", "European continent"]]}]},
    "locality": {"Relation_Specificity": [{"prompt": "The name of the father of Leo Arons is",
                                           "ground_truth": [["Albert Arons"]]}]},
}
KNOWEDIT_ZSRE = {
    "subject": "Epaspidoceras", "target_new": "Noctuidae", "prompt": "Which family does Epaspidoceras belong to?",
    "ground_truth": ["Aspidoceratidae"], "rephrase_prompt": "What family are Epaspidoceras?",
    "locality": {"Relation_Specificity": [
        {"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": ["genus"]},
        {"prompt": ["Epaspidoceras taxon rank", "Epaspidoceras rank"], "ground_truth": [["genus"], ["genus2"]]}]},
    "portability": {"Reasoning": [{"prompt": "What is the common name for the family Epaspidoceras belongs to?",
                                   "ground_truth": "Owlet moths"}]},
}


def test_knowedit_layouts(tmp_path: Path) -> None:
    path = write_json(tmp_path, "ke.json", [KNOWEDIT_CF, KNOWEDIT_RECENT, KNOWEDIT_ZSRE])
    assert detect_layout(KNOWEDIT_CF) == "knowedit"
    loaded = load_dataset(str(path))
    assert [c.case_id for c in loaded.cases] == ["0", "2"]
    assert loaded.rejected[0][0] == "1" and "no ground_truth" in loaded.rejected[0][1]
    cf, zsre = loaded.cases
    assert cf.prompt == "The name of the position held by {} is"
    assert (cf.target_true, cf.target_new) == ("mayor of Vienna", "Archbishop of León, Mexico")
    assert cf.portability == (("The name of the position held by Frederic of Pieschen is",
                               "Archbishop of León, Mexico"),)
    assert [a for _, a in cf.neighborhood] == ["male", "mayor of Vienna"]
    assert cf.locality_pairs == cf.neighborhood and cf.scoring == "zsre"
    assert zsre.target_true == "Aspidoceratidae" and zsre.paraphrases == ("What family are Epaspidoceras?",)
    assert zsre.neighborhood == (("The taxon rank of Epaspidoceras is", "genus"),
                                 ("Epaspidoceras taxon rank", "genus"), ("Epaspidoceras rank", "genus2"))
    assert zsre.portability == (("What is the common name for the family Epaspidoceras belongs to?", "Owlet moths"),)


def test_knowedit_alias_lists_take_the_first_alias(tmp_path: Path) -> None:
    record = dict(KNOWEDIT_RECENT, ground_truth=[["Bonn", "Bonn am Rhein"]])
    case = load_knowedit(write_json(tmp_path, "ke.json", [record])).cases[0]
    assert case.target_true == "Bonn"
    assert case.portability[0][1] == "Europe" and case.neighborhood == (
        ("The name of the father of Leo Arons is", "Albert Arons"),)


def test_knowedit_bad_group_item(tmp_path: Path) -> None:
    record = json.loads(json.dumps(KNOWEDIT_CF))
    record["locality"]["Forgetfulness"][0]["ground_truth"] = 3
    path = write_json(tmp_path, "ke.json", [KNOWEDIT_CF, record])
    with pytest.raises(DatasetError, match=r"record 1: field 'locality\.Forgetfulness\[0\]\.ground_truth' has type "
                                           r"int, expected str or list"):
        load_knowedit(path)


# ---------------------------------------------------------------- MQuAKE


def mquake_record(case_id: int, subject: str, n_rewrites: int = 1, hops: int = 2, new_answer: str = "Tripoli",
                  answer: str = "Washington, D.C.") -> dict:
    rewrite = {"prompt": "{} is a citizen of", "relation_id": "P27", "subject": subject,
               "target_new": {"str": "Libya", "id": "Q1016"},
               "target_true": {"str": "United States of America", "id": "Q30"},
               "question": f"What is the country of citizenship of {subject}?"}
    return {
        "case_id": case_id, "requested_rewrite": [rewrite] * n_rewrites,
        "questions": [f"What is the capital of the country of citizenship of {subject}?",
                      f"Which city is the capital of the country {subject} is a citizen of?"],
        "answer": answer, "new_answer": new_answer,
        "single_hops": [{"question": "q", "cloze": f"{subject} fact {case_id}-{i} is", "answer": f"A{case_id}{i}"}
                        for i in range(hops)],
    }


def test_mquake_single_edit_two_hop_cases(tmp_path: Path) -> None:
    records = [mquake_record(1, "Vince McMahon"), mquake_record(2, "Triple H", n_rewrites=2),
               mquake_record(3, "Ada", hops=3), mquake_record(4, "Bob", new_answer="Washington, D.C."),
               mquake_record(5, "Carol"), mquake_record(6, "Dan")]
    records[5]["single_hops"][0]["answer"] = "Libya"  # a neighbour that answers target_new must not be used
    path = write_json(tmp_path, "mq.json", records)
    assert detect_layout(records[0]) == "mquake"
    loaded = load_dataset(str(path))
    assert [c.case_id for c in loaded.cases] == ["1", "5", "6"]
    reasons = dict(loaded.rejected)
    assert "2 requested rewrites" in reasons["2"] and "3-hop" in reasons["3"]
    assert "does not change" in reasons["4"]
    case = loaded.cases[0]
    assert case.prompt == "{} is a citizen of" and case.subject == "Vince McMahon" and case.relation == "P27"
    assert (case.target_true, case.target_new) == ("United States of America", "Libya")
    assert case.paraphrases == ("What is the country of citizenship of Vince McMahon?",)
    assert case.portability == tuple((q, "Tripoli") for q in records[0]["questions"])
    assert len(case.neighborhood) == 5
    for prompt, answer in case.neighborhood:
        assert "Vince McMahon" not in prompt and answer != "Libya"
    assert load_mquake(path, seed=0).cases == loaded.cases  # deterministic for a seed


def test_mquake_bad_rewrite_field(tmp_path: Path) -> None:
    record = mquake_record(1, "X")
    record["requested_rewrite"] = [{k: v for k, v in record["requested_rewrite"][0].items() if k != "target_new"}]
    with pytest.raises(DatasetError, match=r"record 0 \(case_id '1'\): field 'requested_rewrite\[0\]\.target_new' "
                                           r"is missing"):
        load_mquake(write_json(tmp_path, "mq.json", [record]))


# ---------------------------------------------------------------- LRE


@needs_lre
def test_lre_country_capitals() -> None:
    loaded = load_dataset("lre:country_capital_city")
    relation = json.loads(LRE_CAPITALS.read_text("utf-8"))
    # objects decoded independently: a second JSON pass turns the file's literal "\u00e1" into "á"
    capital = {s["subject"]: json.loads(f'"{s["object"]}"') for s in relation["samples"]}
    assert loaded.name == "lre:country_capital_city" and len(loaded.cases) == 24 and loaded.rejected == []
    for case in loaded.cases:
        assert validate_case(case) is None
        assert case.prompt == "The capital city of {} is"
        assert case.target_true == capital[case.subject]
        assert case.target_new in capital.values() and case.target_new != case.target_true
        assert case.paraphrases == tuple(t.replace("{}", case.subject) for t in
                                         ["The capital of {} is", "The capital of {} is the city of",
                                          "What is the capital of {}? It is the city of"])
        assert len(case.neighborhood) == 5
        for prompt, answer in case.neighborhood:
            other = prompt.removeprefix("The capital city of ").removesuffix(" is")
            assert other != case.subject and capital[other] == answer and answer != case.target_new
    again = load_dataset("lre:country_capital_city")
    other_seed = load_dataset("lre:country_capital_city", seed=1)
    assert again.cases == loaded.cases
    assert [c.target_new for c in other_seed.cases] != [c.target_new for c in loaded.cases]
    assert load_dataset(str(LRE_CAPITALS)).cases == loaded.cases  # a relation file by path


@needs_lre
def test_lre_repeated_subjects_give_one_case_each() -> None:
    relation = json.loads(LRE_INSTRUMENTS.read_text("utf-8"))
    objects: dict[str, set[str]] = {}
    for sample in relation["samples"]:
        objects.setdefault(sample["subject"].strip(), set()).add(sample["object"].strip())
    loaded = load_dataset("lre:person_plays_instrument")
    assert len(loaded.cases) == len(objects)
    assert len({c.case_id for c in loaded.cases}) == len(loaded.cases)
    for case in loaded.cases:
        assert case.target_new not in objects[case.subject]  # never one of the subject's true objects


@needs_lre
def test_lre_unknown_relation() -> None:
    with pytest.raises(DatasetError, match=r"unknown relation 'no_such'; known: city_in_country"):
        load_dataset("lre:no_such")


# ---------------------------------------------------------------- CounterFact original layout, new fields


def test_counterfact_rome_layout_keeps_generation_and_attribute_prompts(tmp_path: Path) -> None:
    record = {
        "case_id": 0,
        "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                              "target_new": {"str": "English"}, "target_true": {"str": "French"},
                              "subject": "Danielle Darrieux"},
        "paraphrase_prompts": ["Danielle Darrieux, a native"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
        "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is", "Where Danielle Darrieux is from, people speak"],
    }
    case = load_dataset(str(write_json(tmp_path, "cf.json", [record]))).cases[0]
    assert case.generation_prompts == tuple(record["generation_prompts"])
    assert case.attribute_prompts == tuple(record["attribute_prompts"])
    assert case.scoring == "counterfact" and case.portability == () and case.locality == ()
    facts = write_json(tmp_path, "facts.json", {"cases": [case.to_dict()]})
    assert load_builtin(facts).cases == [case]  # every new field survives the built-in format


def test_editcase_defaults_keep_old_constructor_working() -> None:
    case = EditCase("c", "r", "S", "{} is", "a", "b", ("S is",), (("T is", "c"),))
    assert case.locality_pairs == (("T is", "c"),)
    assert validate_case(dataclasses.replace(case, scoring="bleu")).startswith("scoring 'bleu'")
    assert "portability[0]" in validate_case(dataclasses.replace(case, portability=(("p", " "),)))
    assert validate_case(dataclasses.replace(case, neighborhood=())).startswith("no neighbourhood prompts")


# ---------------------------------------------------------------- registry, download, offline


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture()
def file_server(tmp_path: Path):
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Files, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def zsre_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The zsre registry entry pointed at a test URL, with no shared sample and an empty cache."""
    monkeypatch.setenv("KEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KEBENCH_ZSRE", raising=False)
    monkeypatch.delenv(sources.OFFLINE_ENV, raising=False)

    def point_at(url: str) -> sources.DatasetSource:
        source = dataclasses.replace(sources.SOURCES["zsre"], url=url, shared=None)
        monkeypatch.setitem(sources.SOURCES, "zsre", source)
        return source
    return point_at


def test_download_once_then_verified_cache(file_server, zsre_source, tmp_path: Path) -> None:
    root, base = file_server
    body = json.dumps([zsre_record()]).encode()
    (root / "zsre.json").write_bytes(body)
    source = zsre_source(f"{base}/zsre.json")
    loaded = load_dataset("zsre")
    cached = source.cache_path()
    assert loaded.path == str(cached) and cached.read_bytes() == body
    digest = hashlib.sha256(body).hexdigest()
    assert cached.with_name(cached.name + ".sha256").read_text().split()[0] == digest
    (root / "zsre.json").unlink()  # the second load must come from the cache
    assert load_dataset("zsre").cases == loaded.cases
    cached.write_bytes(body + b" ")
    with pytest.raises(DatasetError, match=f"has sha256 .*, expected {digest}; delete it to download again"):
        load_dataset("zsre")


def test_pinned_hash_mismatch_rejects_download(file_server, zsre_source, monkeypatch: pytest.MonkeyPatch) -> None:
    root, base = file_server
    (root / "zsre.json").write_text(json.dumps([zsre_record()]))
    source = dataclasses.replace(zsre_source(f"{base}/zsre.json"), sha256="0" * 64)
    monkeypatch.setitem(sources.SOURCES, "zsre", source)
    with pytest.raises(DatasetError, match="expected 0000"):
        load_dataset("zsre")
    assert not source.cache_path().exists()


def test_offline_error_says_where_to_put_the_file(zsre_source, monkeypatch: pytest.MonkeyPatch) -> None:
    source = zsre_source("http://127.0.0.1:9/zsre.json")  # nothing listens on the discard port
    with pytest.raises(DatasetError) as err:
        load_dataset("zsre")
    msg = str(err.value)
    assert "\n" not in msg and str(source.cache_path()) in msg and "KEBENCH_ZSRE" in msg
    monkeypatch.setenv(sources.OFFLINE_ENV, "1")
    with pytest.raises(DatasetError, match="not available offline .*KEBENCH_OFFLINE.*KEBENCH_ZSRE"):
        load_dataset("zsre")


def test_env_var_wins_and_missing_env_file_is_an_error(zsre_source, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    zsre_source("http://127.0.0.1:9/zsre.json")
    path = write_json(tmp_path, "mine.json", [zsre_record(alt="drones")])
    monkeypatch.setenv("KEBENCH_ZSRE", str(path))
    assert load_dataset("zsre").cases[0].target_new == "drones"
    monkeypatch.setenv("KEBENCH_ZSRE", str(tmp_path / "absent.json"))
    with pytest.raises(DatasetError, match="file not found at .*absent.json .*KEBENCH_ZSRE"):
        load_dataset("zsre")


def test_dataset_descriptions_cover_every_name() -> None:
    described = dataset_descriptions()
    assert set(data.DATASETS) | {"lre:<relation>"} == set(described)
    assert "rome.baulab.info" in described["counterfact"] or "shared" in described["counterfact"]


def test_lre_small_relation_rejects_with_reasons(tmp_path: Path) -> None:
    relation = {"name": "tiny", "prompt_templates": ["{} is in"], "prompt_templates_zs": [],
                "properties": {}, "samples": [{"subject": "Paris", "object": "France"},
                                              {"subject": "Lyon", "object": "France"}]}
    loaded = load_dataset(str(write_json(tmp_path, "tiny.json", relation)))
    # both subjects share the only object: no other object can be the new target
    assert loaded.cases == [] and [r for _, r in loaded.rejected] == [
        "the relation has no other object to use as the new target"] * 2
    relation["samples"].append({"subject": "Rome", "object": "Italy"})
    loaded = load_dataset(str(write_json(tmp_path, "tiny.json", relation)))
    by_subject = {c.subject: c for c in loaded.cases}
    assert by_subject["Paris"].target_new == "Italy"
    assert by_subject["Paris"].neighborhood == (("Lyon is in", "France"),)  # Rome answers Italy: left out
    # Rome's new target is France, which both other subjects answer: no neighbour is left
    assert "Rome" not in by_subject
    assert loaded.rejected == [("tiny-2", "no neighbourhood prompts (NS and the drift KL need at least one)")]


@needs_lre
def test_lre_literal_unicode_escapes_are_decoded() -> None:
    raw = LRE_CAPITALS.read_text("utf-8")
    assert "Bogot\\\\u00e1" in raw  # the shared file double-escapes two capitals
    objects = {c.target_true for c in load_dataset("lre:country_capital_city").cases}
    assert {"Bogotá", "Brasília"} <= objects and not any("\\u" in o for o in objects)
