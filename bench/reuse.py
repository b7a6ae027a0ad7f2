"""Component reuse across relation circuits (Knowledge Circuits §4.1, "reused components").

Given one circuit per relation (built here with `bench.relation_circuits`, or read from `bench circuit`
folders), the report holds:

- the pairwise overlap matrices, edge Jaccard and node Jaccard (nodes: heads "a<l>.h<h>", MLPs "m<l>",
  the input and the logits);
- the components most relations share: every node and edge in at least `min_share` of the circuits, with
  the relations that use it;
- by knowledge type (the relation file's folder: factual, commonsense, linguistic, bias): the mean overlap
  within a type and across two types.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

from circuits.circuit import Circuit, jaccard

DEFAULT_MIN_SHARE = 0.5
ALWAYS = {"input", "logits"}  # in every circuit by construction: not listed as shared


def overlap_matrix(circuits: dict[str, Circuit], what: str) -> list[list[float]]:
    """Jaccard of every pair's edge (what="edges") or node (what="nodes") sets; the diagonal is 1."""
    names = list(circuits)
    return [[jaccard(getattr(circuits[a], what), getattr(circuits[b], what)) for b in names] for a in names]


def shared_components(circuits: dict[str, Circuit], what: str, min_share: float) -> list[dict[str, Any]]:
    """Components in at least min_share of the circuits, most shared first (ties by name)."""
    users: dict[str, list[str]] = {}
    for name, circuit in circuits.items():
        for item in set(getattr(circuit, what)) - ALWAYS:
            users.setdefault(item, []).append(name)
    need = min_share * len(circuits)
    rows = [{"component": item, "n_relations": len(by), "share": len(by) / len(circuits), "relations": sorted(by)}
            for item, by in users.items() if len(by) >= need]
    return sorted(rows, key=lambda r: (-r["n_relations"], r["component"]))


def by_kind(circuits: dict[str, Circuit], kinds: dict[str, str], what: str) -> dict[str, Any]:
    """Mean pairwise Jaccard within each knowledge type and across each pair of types."""
    groups: dict[str, list[float]] = {}
    for a, b in combinations(circuits, 2):
        ka, kb = sorted((kinds[a], kinds[b]))
        key = ka if ka == kb else f"{ka} × {kb}"
        groups.setdefault(key, []).append(jaccard(getattr(circuits[a], what), getattr(circuits[b], what)))
    return {key: {"mean": sum(v) / len(v), "n_pairs": len(v)} for key, v in sorted(groups.items())}


def reuse_report(circuits: dict[str, Circuit], kinds: dict[str, str], min_share: float = DEFAULT_MIN_SHARE
                 ) -> dict[str, Any]:
    names = list(circuits)
    off_diagonal = [jaccard(circuits[a].edges, circuits[b].edges) for a, b in combinations(names, 2)]
    return {"relations": names, "kinds": kinds, "n_edges": {n: len(c.edges) for n, c in circuits.items()},
            "edge_jaccard": overlap_matrix(circuits, "edges"), "node_jaccard": overlap_matrix(circuits, "nodes"),
            "mean_edge_jaccard": sum(off_diagonal) / len(off_diagonal) if off_diagonal else None,
            "min_share": min_share,
            "shared_nodes": shared_components(circuits, "nodes", min_share),
            "shared_edges": shared_components(circuits, "edges", min_share),
            "by_kind_edge_jaccard": by_kind(circuits, kinds, "edges"),
            "by_kind_node_jaccard": by_kind(circuits, kinds, "nodes")}
