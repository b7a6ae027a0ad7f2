"""bench reuse: overlap matrices and shared components against hand counts; the command on tiny-gpt2."""

from __future__ import annotations

import json

import pytest

from bench.reuse import reuse_report
from circuits.circuit import Circuit
from tests.helpers import analysis_report, capitals_root, write_relation


def circuit(edges: list[str]) -> Circuit:
    nodes = sorted({n for e in edges for n in e.split("->")})
    return Circuit(method="eap", answer="x", edges={e: 1.0 for e in edges}, nodes=nodes, n_graph_edges=100)


def test_matrix_shared_components_and_kinds_by_hand():
    circuits = {"a": circuit(["input->a0.h1", "a0.h1->m1", "m1->logits"]),
                "b": circuit(["input->a0.h1", "a0.h1->m1", "m2->logits"]),
                "c": circuit(["input->m2", "m2->logits"])}
    kinds = {"a": "factual", "b": "factual", "c": "bias"}
    r = reuse_report(circuits, kinds, min_share=0.6)
    # a∩b = {input->a0.h1, a0.h1->m1}, a∪b = 4 edges; a∩c = {}, b∩c = {m2->logits} of 4
    assert r["edge_jaccard"][0] == [1.0, 0.5, 0.0]
    assert r["edge_jaccard"][1][2] == pytest.approx(1 / 4)
    assert r["mean_edge_jaccard"] == pytest.approx((0.5 + 0.0 + 0.25) / 3)
    # nodes: a {input,a0.h1,m1,logits}, b {input,a0.h1,m1,m2,logits}, c {input,m2,logits}
    assert r["node_jaccard"][0][1] == pytest.approx(4 / 5)
    shared = {row["component"]: row["n_relations"] for row in r["shared_nodes"]}
    assert shared == {"a0.h1": 2, "m1": 2, "m2": 2}  # input and logits are in every circuit: not listed
    assert {row["component"] for row in r["shared_edges"]} == {"input->a0.h1", "a0.h1->m1", "m2->logits"}
    assert r["by_kind_edge_jaccard"]["factual"] == {"mean": 0.5, "n_pairs": 1}
    assert r["by_kind_edge_jaccard"]["bias × factual"]["mean"] == pytest.approx(0.125)


def test_reuse_command_on_tiny_gpt2_resumes_from_saved_circuits(tmp_path, one_thread, capsys):
    root = capitals_root(tmp_path / "lre")
    write_relation(root / "commonsense", "color", "The color of {} is",
                   [("grass", "green"), ("snow", "white"), ("sky", "blue"), ("coal", "black"), ("blood", "red")])
    out = tmp_path / "reuse"
    options = ("--known-top-k", "100000", "--n-facts", "4", "--top-n", "30")
    report = analysis_report("reuse", "tiny-gpt2", root, out, *options)
    assert report["relations"] == ["capital", "color"] and report["kinds"] == {"capital": "factual", "color": "commonsense"}
    saved = {name: set(json.loads((out / "circuits" / f"{name}.json").read_text())["edges"]) for name in report["relations"]}
    expected = len(saved["capital"] & saved["color"]) / len(saved["capital"] | saved["color"])
    assert report["edge_jaccard"][0][1] == pytest.approx(expected)
    assert (out / "reuse-matrix.png").exists() and (out / "reuse-shared.png").exists()
    again = analysis_report("reuse", "tiny-gpt2", root, out, *options)  # reads the saved circuits
    assert all("source" in d for d in again["circuits"].values())
