"""bench multihop: chains built by hand, node containment by hand, the command on tiny-gpt2."""

from __future__ import annotations

import pytest

from bench.lre import load_relation
from bench.multihop import CHAINS, build_chains, contained, contained_edges
from circuits.circuit import Circuit
from tests.helpers import analysis_report, write_relation


@pytest.fixture
def lre_root(tmp_path):
    root = tmp_path / "lre"
    write_relation(root / "factual", "landmark_in_country", "{} is in the country of",
                   [("Eiffel Tower", "France"), ("Colosseum", "Italy"), ("Big Ben", "United Kingdom"),
                    ("Brandenburg Gate", "Germany"), ("Mount Fuji", "Japan")])
    write_relation(root / "factual", "country_capital_city", "The capital of {} is",
                   [("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
                    ("Spain", "Madrid")])
    return root


def test_chains_join_the_first_objects_to_the_second_subjects(lre_root):
    r1 = load_relation(str(lre_root / "factual" / "landmark_in_country.json"))
    r2 = load_relation(str(lre_root / "factual" / "country_capital_city.json"))
    template = CHAINS[("landmark_in_country", "country_capital_city")]
    chains = build_chains(r1, r2, template, limit=10)
    assert {(c.subject, c.bridge, c.answer) for c in chains} == {
        ("Eiffel Tower", "France", "Paris"), ("Colosseum", "Italy", "Rome"),
        ("Brandenburg Gate", "Germany", "Berlin"), ("Mount Fuji", "Japan", "Tokyo")}  # no UK capital in r2
    eiffel = next(c for c in chains if c.subject == "Eiffel Tower")
    assert eiffel.two_hop == "The capital city of the country where Eiffel Tower is located is"
    assert eiffel.hop1 == "Eiffel Tower is in the country of" and eiffel.hop2 == "The capital of France is"
    assert ("Colosseum", "Rome") in eiffel.samples1


def test_contained_by_hand():
    def c(nodes):
        return Circuit("eap", "x", {}, nodes, 10)
    assert contained(c(["input", "a0.h1", "m2", "logits"]), c(["input", "a0.h1", "m3", "logits"])) == 0.5
    part = Circuit("eap", "x", {"input->a0.h1": 1.0, "a0.h1->m2": 1.0, "m2->logits": 1.0}, [], 10)
    whole = Circuit("eap", "x", {"input->a0.h1": 1.0, "m2->logits": 1.0, "m3->logits": 1.0}, [], 10)
    assert contained_edges(part, whole) == pytest.approx(2 / 3)


def test_multihop_command_on_tiny_gpt2(lre_root, tmp_path, one_thread):
    out = tmp_path / "mh"
    report = analysis_report("multihop", "tiny-gpt2", lre_root, out, "--known-top-k", "100000", "--n-facts", "2",
                             "--top-n", "30")
    assert report["n_chains"] == 2 and report["chain_types"] == ["landmark_in_country → country_capital_city"]
    row = report["chains"][0]
    assert len(row["lens"]["bridge_rank"]) == 4 and row["lens"]["answer_rank"][-1] == row["two_hop_rank"]
    assert (out / "multihop.png").exists()
