"""Per-case circuit measures of `bench run`: nodes after pruning, the edited MLP's rank and share, corrupting
subjects that never share an answer, disjoint prompt sets, noise floor, old-answer control and held-out
faithfulness. Hand-built circuits and a tiny-model run."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from bench.corrupt import CorruptionPool, corrupted_prompt, prompt_pairs, prompt_sets
from bench.run import CaseCircuits, RunConfig, circuit_fields, run_case
from circuits.circuit import Circuit, circuit_nodes, mlp_rank_and_share, node_attribution
from circuits.curve import reported_faithfulness
from circuits.graph import Graph
from editors.base import get_editor, load_hparams
from lmview.case import EditCase


def circuit_of(edges: dict[str, float], nodes: list[str] | None = None, metrics=None) -> Circuit:
    senders = sorted({name.split("->")[0] for name in edges})
    return Circuit("eap", "x", edges, nodes if nodes is not None else senders, 100, metrics or {}, graph="ungrouped")


def test_nodes_count_only_on_input_to_logits_paths():
    g = Graph(2, 2, 2)
    keep = torch.zeros(g.n_upstream, g.n_receivers, dtype=torch.bool)
    for name in ("input->a0.h1<q>", "a0.h1->a1.h0<k>", "a1.h0->logits",  # a path
                 "input->m1",  # m1 reaches nothing: input counts (it has the path above), m1 does not
                 "m0->a1.h1<v>"):  # m0 has no input edge and a1.h1 no output: neither counts
        keep[g.parse_edge(name)] = True
    assert circuit_nodes(keep, g) == ["a0.h1", "a1.h0", "input"]


def test_mlp_rank_and_share_by_hand():
    c = circuit_of({"input->m0": 1.0, "m0->a1.h0<q>": -3.0, "a1.h0->logits": 4.0, "m0->logits": 2.0})
    # |score| sums per sender: input 1, m0 3 + 2 = 5, a1.h0 4; total 10
    assert node_attribution(c) == pytest.approx({"input": 0.1, "m0": 0.5, "a1.h0": 0.4})
    assert mlp_rank_and_share(c, [0]) == (1, pytest.approx(0.5))
    assert mlp_rank_and_share(c, [1]) == (None, 0.0)
    assert mlp_rank_and_share(c, [0, 1]) == (1, pytest.approx(0.5))


def test_reported_faithfulness_leaves_tiny_gaps_undefined():
    assert reported_faithfulness({"metric_clean": -1.0, "metric_corrupted": -5.0, "metric_circuit": -2.0}) == 0.75
    assert reported_faithfulness({"metric_clean": -1.0, "metric_corrupted": -1.05, "metric_circuit": -3.0}) is None
    assert reported_faithfulness({}) is None


def a_case(**kw) -> EditCase:
    base = dict(case_id="c1", relation="capital", subject="France", prompt="The capital of {} is",
                target_true="Paris", target_new="Rome",
                paraphrases=("France's capital is", "The capital city of France is", "France has its capital in"),
                neighborhood=(("The capital of Spain is", "Madrid"),))
    base.update(kw)
    return EditCase(**base)


def test_prompt_sets_are_disjoint_and_cover_every_prompt():
    a, b = prompt_sets(a_case())
    assert a == ["The capital of France is", "The capital city of France is"]
    assert b == ["France's capital is", "France has its capital in"]


def test_corrupting_subjects_never_share_either_answer(tiny_model):
    tok = tiny_model.tokenizer
    cases = [a_case(), a_case(case_id="c2", subject="Italy", target_true="Rome"),
             a_case(case_id="c3", subject="Japan", target_true="Tokyo"),
             a_case(case_id="c4", subject="Frankia", target_true="Paris")]
    pool = CorruptionPool.from_cases(cases)
    assert pool.candidates("The capital of France is", "France", ("Paris", "Rome")) == ["Japan"]
    for seed in range(5):
        ids = corrupted_prompt(tok, "The capital of France is", "France", pool, random.Random(seed),
                               forbidden=("Paris", "Rome"))
        assert ids is None or "Japan" in tok.decode(ids)
    # the model check: a candidate whose corrupted prompt the model answers with a banned token is skipped
    never = corrupted_prompt(tok, "The capital of France is", "France", ["Spain", "Italy"], random.Random(0),
                             accept=lambda ids: False)
    assert never is None
    pairs = prompt_pairs(tok, a_case(), ["The capital of France is"], ["Spain", "Italy", "Chile", "Peru"], seed=0,
                         prefer=["Peru"], avoid=["Chile"])
    assert pairs.swapped in (["Peru"], ["Spain"], ["Italy"], [None])
    if pairs.swapped[0] is not None:
        assert pairs.swapped[0] != "Chile"


def test_circuit_fields_from_hand_built_circuits():
    metrics = {"metric_clean": -1.0, "metric_corrupted": -5.0, "metric_circuit": -2.0}
    pre = CaseCircuits(main=circuit_of({"input->m0": 1.0, "m0->logits": 3.0}, metrics=metrics),
                       floor=circuit_of({"input->m0": 1.0, "input->logits": 1.0}),
                       held_out={"metric_clean": -1.0, "metric_corrupted": -1.01, "metric_circuit": 0.0})
    post = CaseCircuits(main=circuit_of({"input->m1": 1.0, "m1->logits": 3.0, "input->logits": 0.5}, metrics=metrics),
                        old_answer=circuit_of({"input->m0": 1.0, "m0->logits": 3.0, "m1->logits": 1.0}),
                        held_out=metrics)
    f = circuit_fields(pre, post, layers=[1])
    assert f["circuit_edge_jaccard"] == 0.0 and f["circuit_edge_jaccard_floor"] == pytest.approx(1 / 3)
    assert f["circuit_edge_jaccard_beyond_floor"] == pytest.approx(1 / 3)
    assert f["circuit_edge_jaccard_old_answer"] == pytest.approx(2 / 3)
    assert f["circuit_old_answer_beyond_floor"] == pytest.approx(1 / 3 - 2 / 3)
    assert f["circuit_faithfulness_pre"] == 0.75 and f["circuit_faithfulness_oos_post"] == 0.75
    assert f["circuit_faithfulness_oos_pre"] is None  # gap 0.01: undefined
    assert f["circuit_mlp_rank_pre"] is None and f["circuit_mlp_share_pre"] == 0.0
    assert f["circuit_mlp_rank_post"] == 1 and f["circuit_mlp_share_post"] == pytest.approx(3 / 4.5)
    assert f["circuit_graph"] == "ungrouped"


def test_run_case_writes_every_circuit_column(tiny_model, tmp_path):
    pool = CorruptionPool.from_cases([a_case()] + [a_case(case_id=f"o{i}", subject=s, target_true=t)
                                                   for i, (s, t) in enumerate([("Spain", "Madrid"), ("Chile", "Lima"),
                                                                               ("Italy", "Milan"), ("Peru", "Quito")])])
    hparams, _ = load_hparams("ft-m", tiny_model.name, tiny_model.arch.family)
    editor = get_editor("ft-m")(tiny_model, dict(hparams, num_steps=2))
    record = run_case(tiny_model, editor, a_case(), pool, RunConfig(editor="ft-m", top_n=30, ppl_texts=0), tmp_path)
    assert record["status"] == "ok", record.get("reason")
    if "circuit_note" in record:
        pytest.skip(f"no corrupted partner on this tiny tokenizer: {record['circuit_note']}")
    for key in ("circuit_edge_jaccard", "circuit_edge_jaccard_floor", "circuit_edge_jaccard_beyond_floor",
                "circuit_edge_jaccard_old_answer", "circuit_mlp_share_post", "circuit_mlp_in_circuit_post"):
        assert key in record and (record[key] is None or math.isfinite(record[key])), key
    assert record["circuit_graph"] == "ungrouped"
    assert {p.name.split(".", 1)[1] for p in tmp_path.glob("*.json")} >= {"pre.json", "post.json",
                                                                          "pre-floor.json", "post-old-answer.json"}


# --- MIB: CPR/CMD edge selection and the export format -------------------------------------------------


def eap_ig_edge_names(n_layers: int, n_heads: int) -> set[str]:
    """EAP-IG's `Graph.from_model` edge list for a sequential (not parallel) model, enumerated here from its
    rules: every earlier residual node feeds each head's q, k and v and the MLP; all of them feed the logits."""
    residual, names = ["input"], set()
    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        names |= {f"{u}->{h}<{p}>" for u in residual for h in heads for p in "qkv"}
        residual += heads
        names |= {f"{u}->m{layer}" for u in residual}
        residual.append(f"m{layer}")
    return names | {f"{u}->logits" for u in residual}


def test_mib_export_has_eap_igs_edges_scores_and_membership(tiny_model, tmp_path):
    from bench.cli import main
    from circuits.circuit import discover, scores_path
    from circuits.mib import mib_graph
    from tests.helpers import circuit_batch

    arch = tiny_model.arch
    c = discover(tiny_model.bridge(), tiny_model.model, arch, circuit_batch(tiny_model), " Paris", top_n=25)
    exported = mib_graph(c, c.scores)
    assert set(exported["edges"]) == eap_ig_edge_names(arch.n_layers, arch.n_heads)
    assert {n for n, e in exported["edges"].items() if e["in_graph"]} == set(c.edges)
    g = Graph.of(arch)
    some = next(iter(c.edges))
    assert exported["edges"][some]["score"] == pytest.approx(float(c.scores[g.parse_edge(some)]))
    assert {n for n, v in exported["nodes"].items() if v["in_graph"]} == set(c.nodes) | {"logits"}
    assert exported["cfg"] == {"n_layers": arch.n_layers, "n_heads": arch.n_heads, "parallel_attn_mlp": False,
                               "d_model": arch.d_model}
    path = tmp_path / "c.json"
    c.save(path, with_scores=True)
    assert scores_path(path).is_file()
    assert main(["circuit-export", str(path), "--output", str(tmp_path / "mib.json")]) == 0
    assert json.loads((tmp_path / "mib.json").read_text()) == exported
    grouped = discover(tiny_model.bridge(), tiny_model.model, arch, circuit_batch(tiny_model), " Paris", top_n=5,
                       graph="grouped", evaluate=False)
    if arch.n_kv_heads != arch.n_heads:
        with pytest.raises(ValueError, match="ungrouped"):
            mib_graph(grouped, grouped.scores)
    (tmp_path / "bare.json").write_text(path.read_text())
    assert main(["circuit-export", str(tmp_path / "bare.json")]) == 2  # no scores file: a one-line error


def test_mib_curves_select_signed_for_cpr_and_absolute_for_cmd():
    from circuits.curve import EDGE_PERCENTAGES, curve_areas, edges_at, mib_curves
    from circuits.selection import prune

    g = Graph(2, 2, 2)
    edges = g.edge_mask.nonzero()
    scores = torch.zeros(g.n_upstream, g.n_receivers)
    values = torch.linspace(-1.0, 0.5, len(edges))  # the largest |score| are negative
    scores[edges[:, 0], edges[:, 1]] = values[torch.randperm(len(edges), generator=torch.Generator().manual_seed(0))]

    def faithfulness_of(keep: torch.Tensor) -> float:  # a stand-in evaluation: the kept signed mass
        return float(scores[keep].sum())

    out = mib_curves(scores, g, faithfulness_of)
    for area, absolute in (("cpr", False), ("cmd", True)):
        ranked = (scores.abs() if absolute else scores).masked_fill(~g.edge_mask, -float("inf")).flatten()
        ys = []
        for p in EDGE_PERCENTAGES:
            keep = torch.zeros(ranked.numel(), dtype=torch.bool)
            keep[ranked.argsort(descending=True)[: edges_at(p, g.n_edges)]] = True
            ys.append(faithfulness_of(prune(keep.view_as(scores), g)))
        assert [pt["faithfulness"] for pt in out[f"{area}_points"]] == pytest.approx(ys)
        assert out[area] == pytest.approx(curve_areas([p / 100 for p in EDGE_PERCENTAGES], ys)[area])
    assert out["cpr_points"] != out["cmd_points"]  # the two rules pick different circuits here


def test_circuit_diff_refuses_circuits_of_different_graphs(tmp_path):
    from bench.cli import main

    a = circuit_of({"input->logits": 1.0})
    b = Circuit("eap", "x", {"input->logits": 1.0}, ["input"], 70_651, {}, graph="grouped")
    a.n_graph_edges = 123_211
    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    assert main(["circuit-diff", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                 "--output", str(tmp_path / "d.svg")]) == 2
