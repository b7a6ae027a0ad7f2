"""Circuits in the MIB circuit track's file format, so that MIB's own evaluation can score them.

MIB (Mueller et al. 2025; hannamw/MIB-circuit-track) reads a circuit as EAP-IG's `Graph.from_json`: a JSON
object with
- "cfg": {"n_layers", "n_heads", "parallel_attn_mlp", "d_model"};
- "nodes": {name: {"in_graph": bool}} for "input", "a{l}.h{h}", "m{l}" and "logits";
- "edges": {name: {"score": float, "in_graph": bool}} for EVERY edge of the graph, named
  "input->a0.h1<q>", "a0.h1->a1.h0<k>", "a0.h1->m0", "m0->logits" (one q, k and v receiver per query head).

MIB re-selects its own top-k edges from the scores for CPR and CMD, so the export needs every edge's score
(the `<circuit>.scores.pt` file a circuit is saved with); "in_graph" marks this circuit's edges and nodes.
Only the ungrouped graph has MIB's edge names: a grouped circuit cannot be exported.
"""

from __future__ import annotations

from typing import Any

import torch

from circuits.graph import Graph


def mib_graph(circuit: Any, scores: torch.Tensor) -> dict[str, Any]:
    """The MIB/EAP-IG JSON object of a circuit (circuits.circuit.Circuit) and its full score matrix."""
    shape = circuit.settings.get("shape")
    if circuit.graph != "ungrouped":
        raise ValueError(f"only ungrouped circuits have MIB's edge names; this one is {circuit.graph} "
                         "(rebuild it with --graph ungrouped)")
    if not shape:
        raise ValueError("the circuit file does not record the model's shape (n_layers, n_heads, d_model)")
    graph = Graph(shape["n_layers"], shape["n_heads"], shape["n_heads"])
    if tuple(scores.shape) != (graph.n_upstream, graph.n_receivers):
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not fit the graph "
                         f"({graph.n_upstream} x {graph.n_receivers})")
    keep = graph.mask_of(circuit.edges)
    edges = {}
    for up, recv in graph.edge_mask.nonzero().tolist():
        edges[graph.edge_name(up, recv)] = {"score": float(scores[up, recv]), "in_graph": bool(keep[up, recv])}
    in_circuit = set(circuit.nodes)
    nodes = {name: {"in_graph": name in in_circuit} for name in graph.upstream_names}
    nodes["logits"] = {"in_graph": True}
    cfg = {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "parallel_attn_mlp": False,
           "d_model": shape["d_model"]}
    return {"cfg": cfg, "nodes": nodes, "edges": edges}
