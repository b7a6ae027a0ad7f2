"""ACDC (circuits/acdc.py) on the tiny models: against a naive loop over edge names, its thresholds at the
extremes, its final metric re-evaluated from scratch, and `bench circuit --setting kc` end to end."""

from __future__ import annotations

import argparse
import json
import math
import re

import pytest
import torch

from bench.cli import main
from bench.cmd_circuit import add_arguments, circuit_setting, setting_variant
from bench.relation_circuits import make_fact, pair_rows
from circuits.acdc import acdc, incoming_order, visit_order
from circuits.evaluate import circuit_metrics, patched_logits
from circuits.graph import Graph
from circuits.relation import KC_SETTING, ScoringSet, batches, graph_of
from tests.helpers import write_relation

THRESHOLD = 0.01
CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Spain", "Madrid"), ("Italy", "Rome"),
            ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Peru", "Lima"), ("Chile", "Santiago")]
TEMPLATE = "The capital of {} is"


@pytest.fixture(scope="module")
def kc_rows(tiny_model):
    facts = [make_fact(TEMPLATE, s, o, CAPITALS, 0, seed=0) for s, o in CAPITALS[:4]]
    rows, _ = pair_rows(tiny_model.tokenizer, facts, CAPITALS, seed=0, need_partner=False)
    return rows


def scoring_set(bundle, rows) -> ScoringSet:
    one_batch = batches(rows, bundle.tokenizer, bundle.device, chunk=len(rows))
    return ScoringSet(bundle, graph_of(bundle.arch), one_batch, KC_SETTING)


def mean_metric(scoring: ScoringSet):
    return lambda keep: float(scoring.with_edges(keep).value.mean())


# --- the naive reference: edge names, a metric recomputed from scratch for every test ---------------------------

def _layer(node: str) -> int:
    return int(re.match(r"[am](\d+)", node).group(1))


def naive_receivers(n_layers: int, n_heads: int) -> list[tuple[str, bool]]:
    """(receiver name, whole-receiver test) in the reference's order: the logits, then per layer from the last
    the MLP input, the v/k/q of every head from the last head down, then the v/k/q inputs likewise."""
    order = [("logits", False)]
    for layer in range(n_layers - 1, -1, -1):
        order.append((f"m{layer}", False))
        for whole in (True, False):
            order += [(f"a{layer}.h{h}<{port}>", whole) for port in "vkq" for h in range(n_heads - 1, -1, -1)]
    return order


def naive_sender_key(sender: str) -> tuple[int, int]:
    """The reference's sender order: latest layer first, its MLP before its heads (increasing), input last."""
    if sender == "input":
        return (1, 0)
    head = re.match(r"a\d+\.h(\d+)", sender)
    return (-_layer(sender) - 1, 0 if head is None else 1 + int(head.group(1)))


def answer_logprobs(logits: torch.Tensor, rows) -> torch.Tensor:
    return torch.stack([logits[i, len(row.clean) - 1].float().log_softmax(-1)[row.answer] for i, row in enumerate(rows)])


def naive_acdc(bundle, rows, threshold: float) -> set[str]:
    """Edges as names; every test is one patched forward of the kept names, match-nll computed here."""
    graph = graph_of(bundle.arch)
    batch = batches(rows, bundle.tokenizer, bundle.device, chunk=len(rows))[0]
    zeros = torch.zeros(graph.n_upstream, *batch.clean_ids.shape, bundle.arch.d_model, device=bundle.device)
    with torch.no_grad():
        clean = answer_logprobs(bundle.bridge().run_with_hooks(batch.clean_ids, attention_mask=batch.attention_mask), rows)
    present = {graph.edge_name(u, r) for u, r in graph.edge_mask.nonzero().tolist()}

    def metric(edges: set[str]) -> float:
        keep = graph.mask_of(edges)
        logits = patched_logits(bundle.bridge(), bundle.model, bundle.arch, graph, batch, keep, zeros)
        return float((clean - answer_logprobs(logits, rows)).mean())

    current = metric(present)
    for receiver, whole in naive_receivers(bundle.arch.n_layers, bundle.arch.n_heads):
        incoming = sorted((e for e in present if e.split("->")[1] == receiver),
                          key=lambda e: naive_sender_key(e.split("->")[0]))
        node = receiver.split("<")[0]
        if receiver != "logits" and not any(e.split("->")[0] == node for e in present):
            present -= set(incoming)  # the node feeds nothing left: dropped untested
            continue
        if whole and incoming:
            value = metric(present - set(incoming))
            if value - current < threshold:
                present, current = present - set(incoming), value
            continue
        for edge in incoming:
            value = metric(present - {edge})
            if value - current < threshold:
                present.discard(edge)
                current = value
    return present


# --- tests ------------------------------------------------------------------------------------------------

def test_order_follows_the_reference():
    graph = Graph(n_layers=2, n_heads=2, n_kv_heads=2)
    names = [(graph.receiver_names[v.receiver], v.whole) for v in visit_order(graph)]
    assert names == naive_receivers(2, 2)
    q = graph.q_index(1, 0)
    assert [graph.upstream_names[u] for u in incoming_order(graph, q)] == ["m0", "a0.h0", "a0.h1", "input"]
    mlp = graph.mlp_in_index(1)
    assert [graph.upstream_names[u] for u in incoming_order(graph, mlp)] == ["a1.h0", "a1.h1", "m0", "a0.h0",
                                                                            "a0.h1", "input"]
    logits = [graph.upstream_names[u] for u in incoming_order(graph, graph.logits_index)]
    assert logits == sorted(graph.upstream_names, key=naive_sender_key)


def test_acdc_matches_a_naive_loop_over_edges(tiny_model, kc_rows, one_thread):
    scoring = scoring_set(tiny_model, kc_rows)
    graph = scoring.graph
    found = acdc(mean_metric(scoring), graph, THRESHOLD, progress=False)
    kept = {graph.edge_name(u, r) for u, r in found.keep.nonzero().tolist()}
    assert kept == naive_acdc(tiny_model, kc_rows, THRESHOLD)
    assert 0 < len(kept) < graph.n_edges
    assert found.n_forward == 1 + found.n_edge_tests + found.n_receiver_tests


def test_threshold_zero_keeps_every_edge_whose_removal_raises_the_metric(tiny_model, kc_rows, one_thread):
    scoring = scoring_set(tiny_model, kc_rows)
    found = acdc(mean_metric(scoring), scoring.graph, 0.0, progress=False)
    tested = ~found.effects.isnan()
    assert int(tested.sum()) == found.n_edge_tests > 0
    rises = found.effects >= 0  # the reference removes an edge when the rise is below the threshold (strict <)
    assert torch.equal(found.keep & tested, rises & tested)
    assert found.n_edges > 0


def test_infinite_threshold_removes_every_edge(tiny_model, kc_rows, one_thread):
    scoring = scoring_set(tiny_model, kc_rows)
    graph = scoring.graph
    found = acdc(mean_metric(scoring), graph, math.inf, progress=False)
    assert found.n_edges == 0
    assert found.n_forward == 1 + int(graph.edge_mask[:, graph.logits_index].sum())  # then every node is dropped
    assert found.metric_final == pytest.approx(float(scoring.corrupted.value.mean()), abs=1e-5)


def test_final_metric_equals_the_kept_edges_evaluated_from_scratch(tiny_model, kc_rows, one_thread):
    scoring = scoring_set(tiny_model, kc_rows)
    graph = scoring.graph
    found = acdc(mean_metric(scoring), graph, THRESHOLD, progress=False)
    batch = batches(kc_rows, tiny_model.tokenizer, tiny_model.device, chunk=len(kc_rows))[0]
    fresh = circuit_metrics(tiny_model.bridge(), tiny_model.model, tiny_model.arch, graph, batch,
                            found.keep.to(tiny_model.device), "match-nll", "zero")
    assert fresh["metric_circuit"] == pytest.approx(found.metric_final, abs=1e-5)
    assert fresh["metric_clean"] == pytest.approx(found.metric_full, abs=1e-5)


# --- speculative batches of tests (--acdc-batch) ----------------------------------------------------------------

def test_mean_values_of_stacked_circuits_equal_one_at_a_time(tiny_model, kc_rows, one_thread):
    """Several circuits in one forward pass (prompts repeated, variant-major) give each one's own metric."""
    scoring = scoring_set(tiny_model, kc_rows)
    graph = scoring.graph
    generator = torch.Generator().manual_seed(0)
    keeps = [graph.edge_mask & (torch.rand(graph.edge_mask.shape, generator=generator) < share)
             for share in (1.0, 0.9, 0.5, 0.1, 0.0)]
    alone = [float(scoring.with_edges(keep).value.mean()) for keep in keeps]
    assert len(set(alone)) == len(alone)  # five different circuits
    assert scoring.mean_values(keeps) == pytest.approx(alone, abs=1e-5)
    assert scoring.mean_values(keeps[:1]) == pytest.approx(alone[:1], abs=1e-6)


def synthetic_measure(graph: Graph, seed: int):
    """A metric with no model: the sum of fixed random costs of the removed edges (some above the threshold),
    so that every decision is exact and known."""
    costs = torch.rand(graph.edge_mask.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    costs = torch.where(costs > 0.97, costs, costs * 1e-4)  # about 3% of the edges cost more than the threshold
    removed = graph.edge_mask.double()

    def measure(keep: torch.Tensor) -> float:
        return float(((removed - keep.double()).clamp(min=0) * costs).sum())

    return measure, lambda keeps: [measure(keep) for keep in keeps]


@pytest.mark.parametrize("speculate", [2, 7, 64])
def test_speculative_acdc_decides_as_one_at_a_time(tiny_model, speculate):
    """Exact on a model-free metric: the same kept edges, effects and test count; fewer forward passes, and
    the discarded tests are the ones after an edge that stayed."""
    graph = graph_of(tiny_model.arch)
    measure, many = synthetic_measure(graph, seed=1)
    calls: list[int] = []
    one = acdc(measure, graph, THRESHOLD, progress=False)
    fast = acdc(measure, graph, THRESHOLD, measure_many=lambda keeps: calls.append(len(keeps)) or many(keeps),
                speculate=speculate, progress=False)
    assert torch.equal(fast.keep, one.keep) and 0 < one.n_edges < graph.n_edges
    assert torch.equal(fast.effects.isnan(), one.effects.isnan())
    assert torch.allclose(fast.effects.nan_to_num(), one.effects.nan_to_num(), atol=1e-12)
    assert (fast.n_forward, fast.n_edge_tests, fast.metric_final) == (one.n_forward, one.n_edge_tests, one.metric_final)
    assert one.n_passes == one.n_forward and fast.n_passes < one.n_passes
    assert max(calls) <= speculate
    assert fast.n_edge_tests + fast.n_discarded == sum(calls) + (fast.n_passes - 1 - fast.n_receiver_tests - len(calls))


def test_speculative_acdc_on_the_model_matches_one_at_a_time(tiny_model, kc_rows, one_thread):
    scoring = scoring_set(tiny_model, kc_rows)
    graph = scoring.graph
    one = acdc(mean_metric(scoring), graph, THRESHOLD, progress=False)
    fast = acdc(mean_metric(scoring), graph, THRESHOLD, measure_many=scoring.mean_values, speculate=8, progress=False)
    assert torch.equal(fast.keep, one.keep)
    assert fast.n_forward == one.n_forward and fast.n_passes < one.n_passes
    assert fast.metric_final == pytest.approx(one.metric_final, abs=1e-5)


def test_circuit_command_kc_is_acdc(tmp_path, capsys):
    write_relation(tmp_path, "capitals", TEMPLATE, CAPITALS)
    relation = str(tmp_path / "capitals.json")
    out = tmp_path / "kc"
    base = ["circuit", "--model", "tiny-gpt2", "--relation", relation, "--setting", "kc", "--known-top-k", "0",
            "--device", "cpu", "--no-curve", "--random-draws", "1"]
    assert main(base + ["--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    s = report["setting"]
    assert (s["name"], s["method"], s["ablation"], s["metric"]) == ("kc", "acdc", "zero", "match-nll")
    assert s["acdc_threshold"] == 0.01 and s["split"].startswith("KC:")
    found = report["acdc"]
    assert found["threshold"] == 0.01 and found["n_edges"] == report["circuit"]["n_edges"]
    assert found["n_forward"] == 1 + found["n_edge_tests"] + found["n_receiver_tests"] and found["seconds"] > 0
    assert found["speculate"] == 1 and found["n_passes"] == found["n_forward"]  # CPU default: one test per pass
    assert report["faithfulness"]["validation"]["circuit"] == pytest.approx(found["metric_final"], abs=1e-5)
    circuit = json.loads((out / "circuit.json").read_text())
    assert len(circuit["edges"]) == found["n_edges"] and circuit["selection"] == "acdc-threshold"
    assert all(score >= 0.01 for score in circuit["edges"].values())  # kept: removing it cost >= the threshold

    eap = tmp_path / "kc-eap"
    assert main(base + ["--method", "eap", "--top-n", "20", "--output", str(eap)]) == 0
    s = json.loads((eap / "report.json").read_text())["setting"]
    assert s["name"] == "kc (variant: method=eap)" and s["method"] == "eap" and "acdc_threshold" not in s
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    loose = parser.parse_args(["--relation", relation, "--setting", "kc", "--acdc-threshold", "0.5"])
    assert setting_variant(loose) == ["acdc_threshold=0.5"] and circuit_setting(loose).acdc_threshold == 0.5
    capsys.readouterr()

    assert main(base + ["--acdc-threshold", "-0.1"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--acdc-threshold" in err and "Traceback" not in err
    assert main(base + ["--top-n", "20"]) == 2  # ACDC's threshold sets the size
    assert main(base + ["--acdc-batch", "0"]) == 2
    assert main(base + ["--method", "eap", "--top-n", "20", "--acdc-batch", "4"]) == 2
    assert main(base + ["--method", "eap", "--acdc-threshold", "0.1"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 4 and "--acdc-batch" in err and "Traceback" not in err
