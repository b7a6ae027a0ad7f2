"""Circuit discovery on the tiny models, checked against independent computations."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr

from circuits.activations import PairBatch, answer_logprob, run_capture
from circuits.attribute import eap_scores
from circuits.circuit import Circuit, jaccard, overlap, top_edges
from circuits.evaluate import circuit_metrics, patched_logits
from circuits.graph import Graph


def make_batch(bundle) -> PairBatch:
    """Two prompts of different lengths (so right padding is exercised), corrupted at the subject tokens."""
    tok = bundle.tokenizer
    rows = []
    for text in ("The capital of France is", "The official language of Germany is the"):
        ids = tok(text).input_ids
        corrupt = list(ids)
        corrupt[len(ids) - 2] = (ids[len(ids) - 2] + 11) % len(tok)
        corrupt[1] = (ids[1] + 5) % len(tok)
        rows.append((ids, corrupt, tok(" Paris", add_special_tokens=False).input_ids[0]))
    return PairBatch.from_rows(rows, tok.pad_token_id, bundle.device)


def graph_of(bundle) -> Graph:
    return Graph.of(bundle.arch)  # ungrouped: one k and v receiver per query head


def test_edge_count_matches_hand_count(tiny_model):
    g = graph_of(tiny_model)
    L, H, K = g.n_layers, g.n_heads, g.n_kv_heads
    senders_before = lambda layer: 1 + layer * (H + 1)  # noqa: E731
    expected = sum(senders_before(l) * (H + 2 * K) + senders_before(l) + H for l in range(L)) + senders_before(L)
    assert g.n_edges == expected
    assert len(g.upstream_names) == g.n_upstream and len(g.receiver_names) == g.n_receivers
    assert not g.edge_mask[g.mlp_index(0), g.q_index(0, 0)]  # an MLP does not feed its own layer's heads
    assert g.edge_mask[g.head_index(0, 1), g.mlp_in_index(0)]  # a head feeds its own layer's MLP


def test_faithfulness_is_one_with_all_edges_and_zero_with_none(tiny_model):
    bundle = tiny_model
    g, batch = graph_of(bundle), make_batch(bundle)
    bridge = bundle.bridge()
    all_edges = torch.ones(g.n_upstream, g.n_receivers, dtype=torch.bool)
    full = circuit_metrics(bridge, bundle.model, bundle.arch, g, batch, all_edges)
    empty = circuit_metrics(bridge, bundle.model, bundle.arch, g, batch, ~all_edges)
    assert full["faithfulness"] == pytest.approx(1.0, abs=1e-5)
    assert empty["faithfulness"] == pytest.approx(0.0, abs=1e-4)
    # independent: the plain HF model on the corrupted prompts
    with torch.no_grad():
        logits = bundle.model(input_ids=batch.corrupt_ids, attention_mask=batch.attention_mask).logits
    assert empty["metric_circuit"] == pytest.approx(answer_logprob(logits, batch).mean().item(), abs=1e-5)


def _hf_receiver_derivative(bundle, batch, module, use_input: bool = True) -> float:
    """(corrupted - clean input of `module`) . d metric / d input, via plain PyTorch hooks on the HF model."""
    seen = {}

    def grab(mod, args):
        seen["x"] = args[0]

    handle = module.register_forward_pre_hook(grab)
    with torch.no_grad():
        bundle.model(input_ids=batch.corrupt_ids, attention_mask=batch.attention_mask)
    corrupt = seen["x"].detach()

    def leaf(mod, args):
        x = args[0].detach().requires_grad_(True)
        seen["x"] = x
        return (x, *args[1:])

    handle.remove()
    handle = module.register_forward_pre_hook(leaf)
    with torch.enable_grad():
        logits = bundle.model(input_ids=batch.clean_ids, attention_mask=batch.attention_mask).logits
        answer_logprob(logits, batch).sum().backward()
    handle.remove()
    x = seen["x"]
    mask = batch.attention_mask[..., None]
    return float(((corrupt - x.detach()) * x.grad * mask).sum())


def test_eap_column_sums_equal_directional_derivatives(tiny_model):
    """Summed over senders, a receiver's EAP scores are (corrupted - clean input) . gradient, per receiver."""
    bundle = tiny_model
    g, batch, arch = graph_of(bundle), make_batch(bundle), bundle.arch
    scores = eap_scores(bundle.bridge(), bundle.model, arch, g, batch)
    layer = arch.n_layers - 1
    checks = [
        (scores[:, g.logits_index].sum(), arch.ln_final(bundle.model)),
        (scores[:, g.mlp_in_index(layer)].sum(), arch.ln_mlp(bundle.model, layer)),
        (scores[:, g.q_index(layer, 0): g.mlp_in_index(layer)].sum(), arch.ln_attn(bundle.model, layer)),
    ]
    for ours, module in checks:
        expected = _hf_receiver_derivative(bundle, batch, module)
        assert ours.item() == pytest.approx(expected, rel=1e-3, abs=1e-6)


@torch.no_grad()
def _exact_edge_effects(bundle, g: Graph, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch one edge at a time with its corrupted value; the change in the summed metric (80 sampled edges)."""
    edges = g.edge_mask.nonzero()
    edges = edges[torch.randperm(len(edges), generator=torch.Generator().manual_seed(0))[:80]]
    bridge = bundle.bridge()
    args = (bridge, bundle.model, bundle.arch, g, batch)
    clean_logits, _ = run_capture(bridge, g, bundle.arch, bundle.model, batch.clean_ids, batch.attention_mask)
    _, corrupt = run_capture(bridge, g, bundle.arch, bundle.model, batch.corrupt_ids, batch.attention_mask)
    base = answer_logprob(clean_logits, batch).sum()
    effects = []
    for u, r in edges.tolist():
        keep = g.edge_mask.clone()
        keep[u, r] = False
        effects.append(answer_logprob(patched_logits(*args, keep, corrupt), batch).sum() - base)
    return edges, torch.stack(effects)


def test_eap_correlates_with_exact_edge_patching(tiny_model):
    bundle = tiny_model
    g, batch = graph_of(bundle), make_batch(bundle)
    scores = eap_scores(bundle.bridge(), bundle.model, bundle.arch, g, batch)
    edges, exact = _exact_edge_effects(bundle, g, batch)
    approx = scores[edges[:, 0], edges[:, 1]]
    rho = spearmanr(approx.cpu().numpy(), exact.cpu().numpy()).statistic
    assert rho > 0.8, f"Spearman rho between EAP and exact patching is {rho:.3f}"


def test_top_edges_and_overlap():
    g = Graph(2, 2, 1)
    scores = torch.zeros(g.n_upstream, g.n_receivers)
    scores[0, g.logits_index] = -5.0  # largest by magnitude
    scores[g.head_index(0, 1), g.mlp_in_index(0)] = 3.0
    scores[g.mlp_index(1), g.q_index(0, 0)] = 99.0  # not an edge: a later MLP cannot feed an earlier head
    keep = top_edges(scores, g, 2)
    assert keep.sum() == 2 and keep[0, g.logits_index] and keep[g.head_index(0, 1), g.mlp_in_index(0)]
    assert g.receiver_names[g.k_index(1, 0)] == "a1.kv0<k>"
    assert jaccard({"a", "b", "c"}, {"b", "c", "d"}) == pytest.approx(0.5)
    pre = Circuit("eap", "x", {"input->logits": 1.0, "a0.h1->m0": 2.0}, ["input", "a0.h1", "m0", "logits"], 10)
    post = Circuit("eap", "y", {"input->logits": 1.0}, ["input", "logits"], 10)
    assert overlap(pre, post) == {"edge_jaccard": 0.5, "node_jaccard": 0.5}
