"""Circuit methods, ablations, metrics, levels and selection, checked against independent computations.

The independent references are plain PyTorch hooks on the Hugging Face modules (not the bridge, not our
patcher), hand computations, and exact patching. Spearman rho of EAP / EAP-IG vs exact patching over all
edges of the tiny models is printed (pytest -s) and asserted above a floor.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from scipy.stats import spearmanr
from transformers import GPT2Config, LlamaConfig

from circuits.activations import PairBatch, answer_logprob
from lmview.arch import parameter
import circuits.attribute as attribute_module
from circuits.attribute import attribute, eap_ig_scores, eap_scores, node_scores, norm_parameters, norm_vjp
from circuits.circuit import Circuit, discover
from circuits.evaluate import circuit_metrics
from circuits.exact import exact_edge_scores, exact_node_scores
from circuits.graph import Graph
from circuits.metrics import Metric, corrupted_answers
from circuits.selection import greedy_edges, node_circuit, prune, select_edges, threshold_edges
from tests.helpers import circuit_batch, circuit_rows

def graph_of(bundle, kind: str = "ungrouped") -> Graph:
    return Graph.of(bundle.arch, kind)


# --- graph ---------------------------------------------------------------------------------------------


SMOLLM2_135M = dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                    intermediate_size=1536)
TINYLLAMA_1B = dict(num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, hidden_size=2048,
                    intermediate_size=5632)


def test_edge_counts_from_configs():
    """The issue's reference counts (EAP-IG's and MIB's ungrouped graph), from configs alone."""
    assert Graph.from_config(GPT2Config()).n_edges == 32_491
    assert Graph.from_config(GPT2Config(), "grouped").n_edges == 32_491  # no grouped-query attention
    assert Graph.from_config(GPT2Config(n_layer=24, n_head=16, n_embd=1024)).n_edges == 231_877
    assert Graph.from_config(LlamaConfig(**SMOLLM2_135M)).n_edges == 123_211
    assert Graph.from_config(LlamaConfig(**TINYLLAMA_1B)).n_edges == 742_996
    assert Graph.from_config(LlamaConfig(**SMOLLM2_135M), "grouped").n_edges == 70_651
    grouped = Graph.from_config(LlamaConfig(**TINYLLAMA_1B), "grouped")
    L, H, K = 22, 32, 4
    senders = lambda layer: 1 + layer * (H + 1)  # noqa: E731
    assert grouped.n_edges == sum(senders(l) * (H + 2 * K + 1) + H for l in range(L)) + senders(L) == 314_876
    assert (grouped.kind, Graph.from_config(LlamaConfig(**TINYLLAMA_1B)).kind) == ("grouped", "ungrouped")
    with pytest.raises(ValueError):
        Graph.from_config(GPT2Config(), "regrouped")


def test_grouped_kv_receivers_belong_to_their_query_heads():
    g = Graph(2, 6, 2)  # 3 query heads per key/value group
    owners = g.receiver_owners
    k1 = g.k_index(1, 1)
    assert g.receiver_names[k1] == "a1.kv1<k>"
    assert owners[k1].nonzero().flatten().tolist() == [g.head_index(1, h) for h in (3, 4, 5)]
    assert owners[g.q_index(1, 4)].nonzero().flatten().tolist() == [g.head_index(1, 4)]
    assert owners[g.logits_index, g.n_upstream] and owners.sum(1).max() == 3


def _port_directional_derivative(bundle, batch, layer: int, port: str, index: int) -> float:
    """d metric / dt where only projection `port`'s output slice `index` (a q head or a k/v group) reads
    norm(x + t (x_corrupt - x_clean)), x the layer's pre-norm residual; plain HF hooks."""
    model, arch = bundle.model, bundle.arch
    attn = arch.blocks(model)[layer].attn if arch.family == "gpt2" else arch.blocks(model)[layer].self_attn
    proj = getattr(attn, f"{port}_proj") if arch.family == "llama" else getattr(attn, port)
    norm = arch.ln_attn(model, layer)
    seen: dict[str, torch.Tensor] = {}
    grab = norm.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0].detach()))
    with torch.no_grad():
        model(input_ids=batch.corrupt_ids, attention_mask=batch.attention_mask)
        corrupt_x = seen["x"]
        model(input_ids=batch.clean_ids, attention_mask=batch.attention_mask)
        clean_x = seen["x"]
    grab.remove()
    t = torch.zeros((), requires_grad=True)
    direction = (corrupt_x - clean_x) * batch.attention_mask[..., None]
    cols = slice(index * arch.d_head, (index + 1) * arch.d_head)

    def moved(mod, args, out):
        shifted = torch.nn.functional.linear(norm(clean_x + t * direction), mod.weight[cols],
                                             None if mod.bias is None else mod.bias[cols])
        return torch.cat([out[..., : cols.start], shifted, out[..., cols.stop:]], dim=-1)

    handle = proj.register_forward_hook(moved)
    with torch.enable_grad():
        logits = model(input_ids=batch.clean_ids, attention_mask=batch.attention_mask).logits
        (grad,) = torch.autograd.grad(answer_logprob(logits, batch).sum(), t)
    handle.remove()
    return float(grad)


def test_gqa_receiver_scores_equal_their_projection_derivatives(tiny_model):
    """A grouped k (or v) receiver's EAP column is the derivative through that group's shared projection."""
    bundle = tiny_model
    g, batch = graph_of(bundle, "grouped"), circuit_batch(bundle)
    scores = eap_scores(bundle.bridge(), bundle.model, bundle.arch, g, batch)
    layer = 1
    checks = [("q", 1, g.q_index(layer, 1)), ("k", g.n_kv_heads - 1, g.k_index(layer, g.n_kv_heads - 1)),
              ("v", 0, g.v_index(layer, 0))]
    for port, index, receiver in checks:
        expected = _port_directional_derivative(bundle, batch, layer, port, index)
        assert scores[:, receiver].sum().item() == pytest.approx(expected, rel=1e-3, abs=1e-6), port


def multi_head_copy(bundle):
    """An independent ungrouped model: a fresh Hugging Face Llama with one key/value head per query head,
    its k/v projection rows copied from the grouped model's (repeat_kv order)."""
    import copy
    from types import SimpleNamespace

    arch = bundle.arch
    config = copy.deepcopy(bundle.model.config)
    config.num_key_value_heads = config.num_attention_heads
    mha = type(bundle.model)(config).to(bundle.device).eval()
    state = {}
    for name in mha.state_dict():
        value = parameter(bundle.model, name).detach()
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            value = value.unflatten(0, (-1, arch.d_head)).repeat_interleave(arch.heads_per_kv, 0).flatten(0, 1)
        state[name] = value
    mha.load_state_dict(state)
    return SimpleNamespace(model=mha, arch=dataclasses.replace(arch, n_kv_heads=arch.n_heads))


def test_ungrouped_receiver_scores_equal_derivatives_in_an_independent_multi_head_copy(tiny_model):
    """Each query head's own k and v receiver (ungrouped graph) scores the derivative through that head's
    copy of the key/value projection alone, measured on a separately built multi-head model."""
    bundle = tiny_model
    if bundle.arch.n_kv_heads == bundle.arch.n_heads:
        pytest.skip("no grouped-query attention: the two graphs are the same")
    g, batch = graph_of(bundle), circuit_batch(bundle)
    assert g.kind == "ungrouped" and g.n_kv_heads == bundle.arch.n_heads
    scores = eap_scores(bundle.bridge(), bundle.model, bundle.arch, g, batch)
    mha = multi_head_copy(bundle)
    with torch.no_grad():
        same = mha.model(input_ids=batch.clean_ids, attention_mask=batch.attention_mask).logits
        ours = bundle.model(input_ids=batch.clean_ids, attention_mask=batch.attention_mask).logits
    assert torch.allclose(same, ours, atol=1e-5)
    layer, heads = 1, range(bundle.arch.n_heads)
    per_head = {h: _port_directional_derivative(mha, batch, layer, "k", h) for h in heads}
    assert len({round(v, 6) for v in per_head.values()}) > 1  # heads of one group do differ
    for h in heads:
        assert scores[:, g.k_index(layer, h)].sum().item() == pytest.approx(per_head[h], rel=1e-3, abs=1e-6)
    v_head = bundle.arch.n_heads - 1
    expected_v = _port_directional_derivative(mha, batch, layer, "v", v_head)
    assert scores[:, g.v_index(layer, v_head)].sum().item() == pytest.approx(expected_v, rel=1e-3, abs=1e-6)
    # the grouped graph's k receiver is the sum of its query heads' ungrouped receivers
    grouped = eap_scores(bundle.bridge(), bundle.model, bundle.arch, graph_of(bundle, "grouped"), batch)
    gg = graph_of(bundle, "grouped")
    members = [h for h in heads if gg.group_of(h) == 0]
    assert grouped[:, gg.k_index(layer, 0)].sum().item() == pytest.approx(
        sum(scores[:, g.k_index(layer, h)].sum().item() for h in members), rel=1e-4, abs=1e-7)
    assert bundle.arch.qkv_weights(bundle.model, layer)[1].shape[0] == bundle.arch.n_kv_heads  # restored


def _autograd_vjp(norm, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    leaf = x.expand_as(grad).clone().requires_grad_(True)
    with torch.enable_grad():
        (out,) = torch.autograd.grad(norm(leaf), leaf, grad)
    return out


def test_closed_form_norm_vjp_matches_autograd(tiny_model):
    """The receivers' layer-norm VJP in closed form equals autograd through the model's own norm modules
    (bridge-wrapped LayerNorm for GPT-2, RMSNorm for Llama), with and without the weight folded in."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    model, arch, device = tiny_model.model, tiny_model.arch, tiny_model.device
    gen = torch.Generator().manual_seed(0)
    norms = [arch.ln_attn(model, l) for l in range(arch.n_layers)] + [arch.ln_mlp(model, 0), arch.ln_final(model)]
    plain = [torch.nn.LayerNorm(arch.d_model).to(device), LlamaRMSNorm(arch.d_model, eps=1e-6).to(device)]
    for module in plain:
        with torch.no_grad():
            module.weight.copy_(torch.randn(arch.d_model, generator=gen).to(device))
    for norm in norms + plain:
        params = norm_parameters(norm)
        assert params is not None, type(norm)
        weight, eps, centered = params
        x = (3 * torch.randn(2, 5, arch.d_model, generator=gen) + 0.5).to(device)
        grad = torch.randn(4, 2, 5, arch.d_model, generator=gen).to(device)
        expected = _autograd_vjp(norm, x, grad)
        torch.testing.assert_close(norm_vjp(x, grad, eps, centered, weight), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(norm_vjp(x, grad * weight.detach(), eps, centered), expected, rtol=1e-4, atol=1e-5)
    assert norm_parameters(torch.nn.Identity()) is None


def test_eap_scores_equal_with_the_autograd_norm_vjp(tiny_model, monkeypatch):
    """The closed-form path and the autograd fallback (any other norm) give the same edge scores."""
    bundle = tiny_model
    g, batch, bridge = graph_of(bundle), circuit_batch(bundle), bundle.bridge()
    args = (bridge, bundle.model, bundle.arch, g, batch)
    closed = eap_ig_scores(*args, steps=2)
    monkeypatch.setattr(attribute_module, "norm_parameters", lambda norm: None)
    fallback = eap_ig_scores(*args, steps=2)
    torch.testing.assert_close(closed, fallback, rtol=1e-4, atol=1e-6 * float(closed.abs().max()))


# --- EAP: completeness ---------------------------------------------------------------------------------


def _all_receivers_directional_derivative(bundle, batch, metric) -> float:
    """sum over every norm input x (ln_1, ln_2 of each layer, ln_f) of d metric / dt_x, where x is replaced
    by x + t_x (x_corrupt - x_clean) in its norm only: the sum of every receiver's directional derivative."""
    model, arch = bundle.model, bundle.arch
    norms = [arch.ln_attn(model, l) for l in range(arch.n_layers)] + [arch.ln_mlp(model, l) for l in range(arch.n_layers)]
    norms.append(arch.ln_final(model))
    corrupt: dict[int, torch.Tensor] = {}
    handles = [n.register_forward_pre_hook(lambda mod, args, i=i: corrupt.__setitem__(i, args[0].detach()))
               for i, n in enumerate(norms)]
    with torch.no_grad():
        model(input_ids=batch.corrupt_ids, attention_mask=batch.attention_mask)
    for h in handles:
        h.remove()
    ts = [torch.zeros((), requires_grad=True) for _ in norms]
    mask = batch.attention_mask[..., None]

    def shift(i):
        def fn(mod, args):
            x = args[0]
            return (x + ts[i] * (corrupt[i] - x.detach()) * mask, *args[1:])

        return fn

    handles = [n.register_forward_pre_hook(shift(i)) for i, n in enumerate(norms)]
    with torch.enable_grad():
        logits = model(input_ids=batch.clean_ids, attention_mask=batch.attention_mask).logits
        grads = torch.autograd.grad(metric(logits, batch).sum(), ts)
    for h in handles:
        h.remove()
    return float(sum(grads))


@pytest.mark.parametrize("metric", ["logprob", "logit-diff"])
def test_eap_total_equals_directional_derivative(tiny_model, metric):
    """No edge double-counted or missed: the sum over all edges equals the sum of all receivers' derivatives."""
    bundle = tiny_model
    g = graph_of(bundle)
    batch = circuit_batch(bundle, corrupt_answers=[7, 8, 9])
    scores = eap_scores(bundle.bridge(), bundle.model, bundle.arch, g, batch, metric=metric)
    expected = _all_receivers_directional_derivative(bundle, batch, Metric(metric, torch.tensor([7, 8, 9])))
    assert scores.sum().item() == pytest.approx(expected, rel=1e-3, abs=1e-5)
    assert (scores[~g.edge_mask] == 0).all()


# --- EAP / EAP-IG vs exact patching -------------------------------------------------------------------


def test_eap_and_eap_ig_track_exact_patching(tiny_model):
    bundle = tiny_model
    g, batch, bridge = graph_of(bundle), circuit_batch(bundle), bundle.bridge()
    args = (bridge, bundle.model, bundle.arch, g, batch)
    exact = exact_edge_scores(*args)[g.edge_mask].cpu().numpy()
    rho = {}
    for name, scores in (("eap", eap_scores(*args)), ("eap-ig", eap_ig_scores(*args, steps=5)),
                         ("eap-ig-activations", attribute(*args, method="eap-ig-activations"))):
        rho[name] = spearmanr(scores[g.edge_mask].cpu().numpy(), exact).statistic
    print(f"\n{bundle.name}: Spearman rho vs exact patching over {g.n_edges} edges: "
          + ", ".join(f"{k} {v:.3f}" for k, v in rho.items()))
    assert rho["eap"] > 0.8
    # on the tiny random models EAP-IG tracks exact patching about as well as EAP (grouped tiny-llama: 0.88
    # vs 0.84; ungrouped: 0.89 vs 0.91), not always better
    assert rho["eap-ig"] >= rho["eap"] - 0.03
    assert rho["eap-ig-activations"] > 0.8


def test_eap_ig_with_many_steps_matches_a_hand_riemann_sum(tiny_model):
    """EAP-IG's input interpolation, recomputed for one receiver (the logits) with plain HF hooks."""
    bundle = tiny_model
    g, batch = graph_of(bundle), circuit_batch(bundle)
    model, steps = bundle.model, 3
    scores = eap_ig_scores(bundle.bridge(), model, bundle.arch, g, batch, steps=steps)
    emb = model.get_input_embeddings()
    norm = bundle.arch.ln_final(model)
    seen: dict[str, torch.Tensor] = {}
    grab = norm.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
    with torch.no_grad():
        model(input_ids=batch.corrupt_ids, attention_mask=batch.attention_mask)
        corrupt_x = seen["x"].detach()
        model(input_ids=batch.clean_ids, attention_mask=batch.attention_mask)
        clean_x = seen["x"].detach()
    mask = batch.attention_mask[..., None]
    total = 0.0
    for k in range(1, steps + 1):
        embeds = emb(batch.corrupt_ids) + k / steps * (emb(batch.clean_ids) - emb(batch.corrupt_ids))
        with torch.enable_grad():
            logits = model(inputs_embeds=embeds.detach().requires_grad_(True), attention_mask=batch.attention_mask).logits
            (grad,) = torch.autograd.grad(answer_logprob(logits, batch).sum(), seen["x"])
        total += float(((corrupt_x - clean_x) * grad * mask).sum()) / steps
    grab.remove()
    assert scores[:, g.logits_index].sum().item() == pytest.approx(total, rel=1e-3, abs=1e-5)


# --- ablations and evaluation --------------------------------------------------------------------------


def _ablated_final_metric(bundle, batch, final_input: torch.Tensor) -> float:
    """Mean log-prob when the final norm reads `final_input` (broadcast) at every position: plain HF hooks."""
    norm = bundle.arch.ln_final(bundle.model)
    handle = norm.register_forward_pre_hook(lambda mod, args: (final_input.expand_as(args[0]), *args[1:]))
    try:  # a hook left behind would corrupt every later test on the session's shared model
        with torch.no_grad():
            logits = bundle.model(input_ids=batch.clean_ids, attention_mask=batch.attention_mask).logits
    finally:
        handle.remove()
    return answer_logprob(logits, batch).mean().item()


def _attention_output_biases(bundle) -> torch.Tensor:
    """The attention output biases (GPT-2's c_proj.bias) that no head sender carries; zero for Llama."""
    arch = bundle.arch
    if arch.family != "gpt2":
        return torch.zeros(arch.d_model, device=bundle.device)
    return sum(arch.blocks(bundle.model)[l].attn.c_proj.bias.detach() for l in range(arch.n_layers))


@pytest.mark.parametrize("ablation", ["corrupted", "mean", "zero"])
def test_faithfulness_one_with_all_edges_zero_with_none(tiny_model, ablation):
    bundle = tiny_model
    g, batch, bridge = graph_of(bundle), circuit_batch(bundle), bundle.bridge()
    everything = torch.ones(g.n_upstream, g.n_receivers, dtype=torch.bool)
    full = circuit_metrics(bridge, bundle.model, bundle.arch, g, batch, everything, ablation=ablation)
    empty = circuit_metrics(bridge, bundle.model, bundle.arch, g, batch, ~everything, ablation=ablation)
    assert full["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    assert empty["faithfulness"] == pytest.approx(0.0, abs=1e-4)
    # the fully ablated run, independently: the final norm reads the ablated residual stream
    if ablation == "zero":
        expected = _ablated_final_metric(bundle, batch, _attention_output_biases(bundle))
    elif ablation == "mean":
        norm = bundle.arch.ln_final(bundle.model)
        seen = {}
        handle = norm.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0].detach()))
        with torch.no_grad():
            bundle.model(input_ids=batch.clean_ids, attention_mask=batch.attention_mask)
        handle.remove()
        mask = batch.attention_mask[..., None].float()
        expected = _ablated_final_metric(bundle, batch, (seen["x"] * mask).sum((0, 1)) / mask.sum())
    else:
        with torch.no_grad():
            logits = bundle.model(input_ids=batch.corrupt_ids, attention_mask=batch.attention_mask).logits
        expected = answer_logprob(logits, batch).mean().item()
    assert empty["metric_corrupted"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_eap_under_mean_and_zero_ablation_tracks_exact(tiny_model, ablation):
    bundle = tiny_model
    g, batch, bridge = graph_of(bundle), circuit_batch(bundle), bundle.bridge()
    args = (bridge, bundle.model, bundle.arch, g, batch)
    edges = g.edge_mask.nonzero()[torch.randperm(g.n_edges, generator=torch.Generator().manual_seed(1))[:60]]
    exact = exact_edge_scores(*args, ablation=ablation, edges=edges)[edges[:, 0], edges[:, 1]]
    approx = eap_scores(*args, ablation=ablation)[edges[:, 0], edges[:, 1]]
    rho = spearmanr(approx.cpu().numpy(), exact.cpu().numpy()).statistic
    print(f"\n{bundle.name} {ablation} ablation: EAP vs exact rho {rho:.3f}")
    assert rho > 0.6


# --- padding -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_padded_batch_scores_equal_the_sum_of_single_prompts(tiny_model, padding_side, method):
    bundle = tiny_model
    g, bridge, rows = graph_of(bundle), bundle.bridge(), circuit_rows(bundle)
    batch = circuit_batch(bundle, rows, padding_side)
    assert (batch.attention_mask == 0).any()
    together = attribute(bridge, bundle.model, bundle.arch, g, batch, method, steps=3)
    alone = sum(attribute(bridge, bundle.model, bundle.arch, g, circuit_batch(bundle, [row]), method, steps=3) for row in rows)
    torch.testing.assert_close(together, alone, rtol=1e-3, atol=1e-5)


# --- node level ----------------------------------------------------------------------------------------


def test_exact_node_score_equals_replacing_the_module_output(tiny_model):
    """Node level: ablating all of an MLP's outgoing edges = replacing its output (plain HF forward hook)."""
    bundle = tiny_model
    g, batch, bridge = graph_of(bundle), circuit_batch(bundle), bundle.bridge()
    layer = 1
    nodes = exact_node_scores(bridge, bundle.model, bundle.arch, g, batch)
    mlp = bundle.arch.blocks(bundle.model)[layer].mlp
    seen = {}
    handle = mlp.register_forward_hook(lambda mod, args, out: seen.__setitem__("out", out.detach()))
    with torch.no_grad():
        bundle.model(input_ids=batch.corrupt_ids, attention_mask=batch.attention_mask)
    handle.remove()
    with torch.no_grad():
        clean = bundle.model(input_ids=batch.clean_ids, attention_mask=batch.attention_mask).logits
        handle = mlp.register_forward_hook(lambda mod, args, out: seen["out"])
        patched = bundle.model(input_ids=batch.clean_ids, attention_mask=batch.attention_mask).logits
        handle.remove()
    expected = (answer_logprob(patched, batch) - answer_logprob(clean, batch)).sum().item()
    assert nodes[g.mlp_index(layer)].item() == pytest.approx(expected, rel=1e-3, abs=1e-5)
    edges = eap_scores(bridge, bundle.model, bundle.arch, g, batch)
    rho = spearmanr(node_scores(edges).cpu().numpy(), nodes.cpu().numpy()).statistic
    print(f"\n{bundle.name}: node-level EAP vs exact rho {rho:.3f}")
    assert rho > 0.7


def test_node_level_discovery(tiny_model):
    bundle = tiny_model
    batch = circuit_batch(bundle)
    c = discover(bundle.bridge(), bundle.model, bundle.arch, batch, " Paris", top_n=3, level="node")
    heads_and_mlps = [n for n in c.node_scores if n != "input"]
    kept = [n for n in c.nodes if n in heads_and_mlps]
    assert len(kept) == 3 and c.level == "node"
    top3 = sorted(heads_and_mlps, key=lambda n: -abs(c.node_scores[n]))[:3]
    assert sorted(kept) == sorted(top3)
    g = graph_of(bundle)
    all_nodes = circuit_metrics(bundle.bridge(), bundle.model, bundle.arch, g, batch,
                                node_circuit(torch.ones(g.n_upstream), g, g.n_upstream))
    assert all_nodes["faithfulness"] == pytest.approx(1.0, abs=1e-4)


# --- metrics -------------------------------------------------------------------------------------------


def test_metrics_by_hand():
    logits = torch.randn(2, 4, 10)
    batch = PairBatch(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long),
                      torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), torch.tensor([2, 3]), torch.tensor([5, 1]))
    at = torch.stack([logits[0, 2], logits[1, 3]])
    logp = at.log_softmax(-1)
    assert torch.allclose(Metric("logprob")(logits, batch), logp[[0, 1], [5, 1]])
    diff = Metric("logit-diff", corrupt_answer_ids=torch.tensor([3, 4]))(logits, batch)
    assert torch.allclose(diff, torch.stack([at[0, 5] - at[0, 3], at[1, 1] - at[1, 4]]))
    clean = torch.randn(2, 4, 10)
    nll = Metric("match-nll").prepare(batch, clean_logits=clean)(logits, batch)
    clean_logp = torch.stack([clean[0, 2], clean[1, 3]]).log_softmax(-1)[[0, 1], [5, 1]]
    assert torch.allclose(nll, -logp[[0, 1], [5, 1]] - (-clean_logp))  # NLL(patched) - NLL(clean model)
    corrupt = torch.zeros(2, 4, 10)
    corrupt[0, 2, 5], corrupt[0, 2, 7] = 9.0, 8.0  # top is the clean answer: the runner-up is taken
    corrupt[1, 3, 2] = 4.0
    assert corrupted_answers(corrupt, batch).tolist() == [7, 2]
    with pytest.raises(ValueError):
        Metric("accuracy")


# --- selection -----------------------------------------------------------------------------------------


def _chain_graph_scores() -> tuple[Graph, torch.Tensor]:
    g = Graph(2, 2, 1)
    scores = torch.zeros(g.n_upstream, g.n_receivers)
    scores[g.head_index(1, 0), g.logits_index] = 5.0  # a1.h0 -> logits
    scores[g.head_index(0, 1), g.k_index(1, 0)] = -4.0  # a0.h1 -> a1.kv0<k> (shared by a1.h0 and a1.h1)
    scores[0, g.q_index(0, 1)] = 3.0  # input -> a0.h1<q>
    scores[0, g.mlp_in_index(1)] = 9.0  # input -> m1: m1 has no way to the logits
    scores[g.mlp_index(0), g.q_index(1, 1)] = 2.0  # m0 -> a1.h1<q>: a1.h1 does not reach the logits
    return g, scores


def test_greedy_grows_from_the_logits():
    g, scores = _chain_graph_scores()
    keep = greedy_edges(scores, g, 3)
    chosen = {g.edge_name(u, r) for u, r in keep.nonzero().tolist()}
    assert chosen == {"a1.h0->logits", "a0.h1->a1.kv0<k>", "input->a0.h1<q>"}  # skips input->m1 (9.0)
    assert select_edges(scores, g, "top-n", n=1).nonzero().tolist() == [[0, g.mlp_in_index(1)]]
    assert threshold_edges(scores, g, 3.0).sum() == 4
    with pytest.raises(ValueError):
        select_edges(scores, g, "threshold")


def test_prune_drops_edges_off_input_to_logits_paths():
    g, scores = _chain_graph_scores()
    keep = scores != 0
    pruned = {g.edge_name(u, r) for u, r in prune(keep, g).nonzero().tolist()}
    assert pruned == {"a1.h0->logits", "a0.h1->a1.kv0<k>", "input->a0.h1<q>"}
    # without input -> a0.h1<q>, a0.h1 is unreachable from the input and everything but a1.h0 -> logits goes
    keep[0, g.q_index(0, 1)] = False
    assert {g.edge_name(u, r) for u, r in prune(keep, g).nonzero().tolist()} == set()
    keep[0, g.k_index(1, 0)] = True  # input -> a1.kv0<k> feeds a1.h0, which reaches the logits
    assert {g.edge_name(u, r) for u, r in prune(keep, g).nonzero().tolist()} == {"a1.h0->logits", "input->a1.kv0<k>"}


# --- discover and the circuit file ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["eap", "eap-ig-activations"])  # eap-ig (inputs) needs corrupted patching
def test_discover_records_its_choices_and_round_trips(tiny_model, method, tmp_path):
    bundle = tiny_model
    batch = circuit_batch(bundle)
    c = discover(bundle.bridge(), bundle.model, bundle.arch, batch, " Paris", top_n=20, method=method,
                 metric="match-nll", ablation="mean", selection="greedy", prune_dead=True)
    assert (c.method, c.metric, c.ablation, c.selection, c.level) == (method, "match-nll", "mean", "greedy", "edge")
    assert c.settings["pruned"] and 0 < len(c.edges) <= 20
    assert c.metrics["metric_clean"] == pytest.approx(0.0, abs=1e-6)  # match-nll is 0 on the clean run
    c.save(tmp_path / "c.json")
    import json

    assert Circuit.from_json(json.loads((tmp_path / "c.json").read_text())) == c
    old = {k: v for k, v in c.to_json().items() if k in ("method", "answer", "edges", "nodes", "n_graph_edges", "metrics")}
    assert Circuit.from_json(old).ablation == "corrupted"  # spine-era files still load
    with pytest.raises(ValueError):
        discover(bundle.bridge(), bundle.model, bundle.arch, batch, " Paris", method="acdc")
    with pytest.raises(ValueError, match="needs --ablation corrupted"):  # as EAP-IG: inputs IG needs corrupted
        discover(bundle.bridge(), bundle.model, bundle.arch, batch, " Paris", method="eap-ig", ablation="mean")


def test_ungrouped_patching_of_a_whole_group_equals_grouped_patching(tiny_model):
    """A grouped circuit and its ungrouped expansion (each k/v group edge as all of its query heads' edges)
    are the same intervention, so they must measure the same; a subset of a group's heads must not."""
    bundle = tiny_model
    if bundle.arch.n_kv_heads == bundle.arch.n_heads:
        pytest.skip("no grouped-query attention: the two graphs are the same")
    gg, gu, batch = graph_of(bundle, "grouped"), graph_of(bundle), circuit_batch(bundle)
    scores = eap_scores(bundle.bridge(), bundle.model, bundle.arch, gg, batch)
    grouped = select_edges(scores, gg, "top-n", 60)
    expanded = torch.zeros(gu.n_upstream, gu.n_receivers, dtype=torch.bool)
    for up, recv in grouped.nonzero().tolist():
        name = gg.receiver_names[recv]
        if ".kv" in name:  # a{l}.kv{g}<k>: every query head of group g
            layer, group, port = int(name[1:name.index(".")]), int(name.split("kv")[1].split("<")[0]), name[-2]
            for head in (h for h in range(gg.n_heads) if gg.group_of(h) == group):
                expanded[gu.parse_edge(f"{gg.upstream_names[up]}->a{layer}.h{head}<{port}>")] = True
        else:
            expanded[gu.parse_edge(gg.edge_name(up, recv))] = True
    args = (bundle.bridge(), bundle.model, bundle.arch)
    a = circuit_metrics(*args, gg, batch, grouped)["metric_circuit"]
    b = circuit_metrics(*args, gu, batch, expanded)["metric_circuit"]
    assert a == pytest.approx(b, abs=1e-5)
    kv = [j for j in range(gu.n_receivers) if gu.receiver_names[j].endswith(("<k>", "<v>"))]
    half = expanded.clone()
    half[:, kv[0::2]] = False
    assert circuit_metrics(*args, gu, batch, half)["metric_circuit"] != pytest.approx(b, abs=1e-5)
