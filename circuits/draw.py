"""Drawing circuits with matplotlib (a project dependency): one circuit, or two circuits on one figure
(kept, lost and new edges). The same figures as Graphviz DOT source (`circuit_dot`, `diff_dot`) for
anyone who wants to lay them out with `dot`; nothing here needs it.

Layout: the input at the top, then for each layer its attention heads on one row and its MLP on the next,
the logits at the bottom. Edge width grows with |score| (relative to the largest in the figure). The
receiver's port is shown by colour and line style: q blue solid, k green dashed, v red dotted, the
residual stream (MLP and logits inputs) grey solid. In the grouped k/v graph a key/value group's k/v
receiver is its own node `a{l}.kv{g}` on the heads' row. In a diff figure colour shows the status
(kept dark grey, lost red, new green) and line style the port.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

PORT_COLOURS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#d62728", "": "#555555"}
PORT_STYLES = {"q": "solid", "k": "dashed", "v": "dotted", "": "solid"}
STATUS_COLOURS = {"kept": "#444444", "lost": "#d62728", "new": "#2ca02c"}
_NODE = re.compile(r"^a(\d+)\.(h|kv)(\d+)$|^m(\d+)$")
NODE_COLOURS = {"io": "#fff2cc", "mlp": "#dae8fc", "head": "#e1f5e1", "kv": "#f4f4f4"}
MPL_STYLES = {"solid": "-", "dashed": "--", "dotted": ":"}


@dataclass(frozen=True)
class EdgeParts:
    sender: str
    receiver: str  # node name, port stripped
    port: str  # "q", "k", "v" or "" (MLP / logits input)


def split_edge(name: str) -> EdgeParts:
    """'a3.h1->a5.kv0<k>' -> EdgeParts('a3.h1', 'a5.kv0', 'k')."""
    sender, _, receiver = name.partition("->")
    if not receiver:
        raise ValueError(f"edge name {name!r} has no '->'")
    port = ""
    if receiver.endswith(">") and "<" in receiver:
        receiver, port = receiver[:-1].split("<", 1)
    return EdgeParts(sender, receiver, port)


def node_rank(node: str) -> tuple[int, int]:
    """(layer, 0 for attention / 1 for MLP); the input is (-1, 1), the logits (10**6, 0)."""
    if node == "input":
        return (-1, 1)
    if node == "logits":
        return (10**6, 0)
    match = _NODE.match(node)
    if not match:
        raise ValueError(f"unknown node name {node!r}")
    return (int(match.group(1)), 0) if match.group(1) is not None else (int(match.group(4)), 1)


def _node_attrs(node: str) -> str:
    if node in ("input", "logits"):
        shape = "invhouse" if node == "input" else "house"
        return f'shape={shape}, style=filled, fillcolor="#fff2cc"'
    if node.startswith("m"):
        return 'shape=box, style=filled, fillcolor="#dae8fc"'
    if ".kv" in node:
        return 'shape=ellipse, style="filled,dashed", fillcolor="#f4f4f4"'
    return 'shape=ellipse, style=filled, fillcolor="#e1f5e1"'


def _width(score: float, largest: float) -> float:
    return 0.6 + 5.4 * abs(score) / largest if largest > 0 else 1.0


def _rank_label(key: tuple[int, int]) -> str:
    layer, part = key
    if layer < 0:
        return "input"
    if layer == 10**6:
        return "logits"
    return f"L{layer} {'mlp' if part else 'attn'}"


def _rank_blocks(nodes: set[str]) -> list[str]:
    """`{rank=same; ...}` groups in layer order, each with a label node on a chain of invisible edges,
    so that dot keeps the layers top to bottom even where no drawn edge links them."""
    groups: dict[tuple[int, int], list[str]] = {}
    for node in nodes:
        groups.setdefault(node_rank(node), []).append(node)
    keys = sorted(groups)
    lines = []
    for i, key in enumerate(keys):
        lines.append(f'  "rank{i}" [shape=plaintext, fontcolor="#888888", label="{_rank_label(key)}"];')
        lines.append(f'  {{rank=same; "rank{i}"; ' + " ".join(f'"{n}";' for n in sorted(groups[key])) + "}")
    lines += [f'  "rank{i}" -> "rank{i + 1}" [style=invis];' for i in range(len(keys) - 1)]
    return lines


def _header(title: str) -> list[str]:
    return ["digraph circuit {", '  graph [rankdir=TB, ranksep=0.35, nodesep=0.15, fontname="Helvetica", '
            f'labelloc=t, label="{title}"];', '  node [fontname="Helvetica", fontsize=10, height=0.3];',
            "  edge [arrowsize=0.5];"]


def _nodes_of(edge_names) -> set[str]:
    nodes = set()
    for name in edge_names:
        parts = split_edge(name)
        nodes |= {parts.sender, parts.receiver}
    return nodes


def circuit_dot(edges: dict[str, float], title: str = "circuit") -> str:
    """DOT source for one circuit: edge width by |score|, port by colour and style."""
    largest = max((abs(s) for s in edges.values()), default=0.0)
    nodes = _nodes_of(edges)
    lines = _header(title) + [f'  "{n}" [{_node_attrs(n)}];' for n in sorted(nodes, key=node_rank)]
    lines += _rank_blocks(nodes)
    for name, score in sorted(edges.items(), key=lambda item: abs(item[1])):
        p = split_edge(name)
        lines.append(f'  "{p.sender}" -> "{p.receiver}" [color="{PORT_COLOURS[p.port]}", '
                     f'style={PORT_STYLES[p.port]}, penwidth={_width(score, largest):.2f}, '
                     f'tooltip="{name}: {score:.4g}"];')
    lines.append(_legend([(f"{port or 'resid'} input", PORT_COLOURS[port], PORT_STYLES[port])
                          for port in ("q", "k", "v", "")]))
    return "\n".join(lines + ["}"])


def diff_edges(before: dict[str, float], after: dict[str, float]) -> dict[str, list[str]]:
    """Edges in both circuits (kept), only in the first (lost) and only in the second (new)."""
    return {"kept": sorted(before.keys() & after.keys()), "lost": sorted(before.keys() - after.keys()),
            "new": sorted(after.keys() - before.keys())}


def diff_dot(before: dict[str, float], after: dict[str, float], title: str = "circuit diff") -> str:
    """DOT source for two circuits on one figure; colour = kept/lost/new, line style = port."""
    groups = diff_edges(before, after)
    score = {**before, **after}
    largest = max((abs(s) for s in score.values()), default=0.0)
    nodes = _nodes_of(score)
    lines = _header(title) + [f'  "{n}" [{_node_attrs(n)}];' for n in sorted(nodes, key=node_rank)]
    lines += _rank_blocks(nodes)
    for status in ("kept", "lost", "new"):
        for name in groups[status]:
            p = split_edge(name)
            lines.append(f'  "{p.sender}" -> "{p.receiver}" [color="{STATUS_COLOURS[status]}", '
                         f'style={PORT_STYLES[p.port]}, penwidth={_width(score[name], largest):.2f}, '
                         f'tooltip="{status} {name}"];')
    legend = [(f"{status} ({len(groups[status])})", STATUS_COLOURS[status], "solid") for status in groups]
    legend += [(f"{port} input", "#444444", PORT_STYLES[port]) for port in ("q", "k", "v")]
    lines.append(_legend(legend))
    return "\n".join(lines + ["}"])


def _legend(entries: list[tuple[str, str, str]]) -> str:
    """A small legend cluster: one labelled edge per entry."""
    out = ['  subgraph cluster_legend { label="legend"; fontsize=10; style=dashed;']
    for i, (label, colour, style) in enumerate(entries):
        out.append(f'    "legend{i}a" [shape=point, width=0.05]; "legend{i}b" [shape=plaintext, label="{label}"];')
        out.append(f'    "legend{i}a" -> "legend{i}b" [color="{colour}", style={style}, penwidth=2, arrowhead=none];')
    return "\n".join(out + ["  }"])


# --- matplotlib ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DrawnEdge:
    sender: str
    receiver: str
    colour: str
    style: str  # "solid", "dashed" or "dotted"
    width: float


def _node_order(node: str) -> tuple[int, int]:
    """Within a row: heads by index, then k/v group nodes; the row's single node otherwise."""
    match = _NODE.match(node)
    if not match or match.group(1) is None:
        return (0, 0)
    return (0 if match.group(2) == "h" else 1, int(match.group(3)))


def node_positions(nodes: set[str]) -> dict[str, tuple[float, float]]:
    """(x, y) per node: one row per `node_rank` from the top (y = -row), nodes centred along the row."""
    rows: dict[tuple[int, int], list[str]] = {}
    for node in nodes:
        rows.setdefault(node_rank(node), []).append(node)
    positions = {}
    for row, key in enumerate(sorted(rows)):
        members = sorted(rows[key], key=_node_order)
        for i, node in enumerate(members):
            positions[node] = (i - (len(members) - 1) / 2, -float(row))
    return positions


def _node_kind(node: str) -> str:
    if node in ("input", "logits"):
        return "io"
    return "mlp" if node.startswith("m") else "kv" if ".kv" in node else "head"


def draw_figure(edges: Sequence[DrawnEdge], paths: Sequence[Path], title: str,
                legend: Sequence[tuple[str, str, str]]) -> None:
    """Writes the figure to each path (format from its suffix: .svg, .png or .pdf)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    nodes = {e.sender for e in edges} | {e.receiver for e in edges}
    pos = node_positions(nodes)
    widest = max((abs(x) for x, _ in pos.values()), default=0.0)
    n_rows = 1 - min((y for _, y in pos.values()), default=0.0)
    fig, ax = plt.subplots(figsize=(min(40.0, max(6.0, 1.1 * (2 * widest + 1) + 2)),
                                    min(60.0, max(4.0, 0.45 * n_rows + 1.5))))
    groups: dict[tuple[str, str], list[DrawnEdge]] = {}
    for edge in edges:
        groups.setdefault((edge.colour, edge.style), []).append(edge)
    for (colour, style), members in groups.items():
        segments = [[pos[e.sender], pos[e.receiver]] for e in members]
        ax.add_collection(LineCollection(segments, colors=colour, linestyles=MPL_STYLES[style],
                                         linewidths=[e.width for e in members], alpha=0.7, zorder=1))
    for kind, colour in NODE_COLOURS.items():
        members = [n for n in nodes if _node_kind(n) == kind]
        if members:
            marker = {"io": "D", "mlp": "s", "head": "o", "kv": "o"}[kind]
            ax.scatter([pos[n][0] for n in members], [pos[n][1] for n in members], s=260, marker=marker,
                       c=colour, edgecolors="#555555", linewidths=0.6, zorder=2)
    for node, (x, y) in pos.items():
        ax.text(x, y, node, ha="center", va="center", fontsize=6, zorder=3)
    rows = sorted({node_rank(n) for n in nodes})
    for row, key in enumerate(rows):
        ax.text(-widest - 1.2, -row, _rank_label(key), ha="right", va="center", fontsize=7, color="#888888")
    ax.set_xlim(-widest - 3.0, widest + 1.0)
    ax.set_ylim(-n_rows, 1.0)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    handles = [Line2D([0], [0], color=c, linestyle=MPL_STYLES[s], linewidth=2, label=label) for label, c, s in legend]
    ax.legend(handles=handles, loc="upper right", fontsize=7, frameon=True)
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, format=Path(path).suffix.lstrip(".") or "svg", dpi=72)
    plt.close(fig)


def draw_circuit(edges: dict[str, float], paths: Sequence[Path], title: str = "circuit") -> None:
    """One circuit: edge width by |score|, port by colour and style."""
    largest = max((abs(s) for s in edges.values()), default=0.0)
    drawn = []
    for name, score in sorted(edges.items(), key=lambda item: abs(item[1])):
        p = split_edge(name)
        drawn.append(DrawnEdge(p.sender, p.receiver, PORT_COLOURS[p.port], PORT_STYLES[p.port],
                               _width(score, largest) / 2))
    legend = [(f"{port or 'resid'} input", PORT_COLOURS[port], PORT_STYLES[port]) for port in ("q", "k", "v", "")]
    draw_figure(drawn, paths, title, legend)


def draw_diff(before: dict[str, float], after: dict[str, float], paths: Sequence[Path],
              title: str = "circuit diff") -> None:
    """Two circuits on one figure; colour = kept/lost/new, line style = port."""
    groups = diff_edges(before, after)
    score = {**before, **after}
    largest = max((abs(s) for s in score.values()), default=0.0)
    drawn = []
    for status in ("kept", "lost", "new"):
        for name in groups[status]:
            p = split_edge(name)
            drawn.append(DrawnEdge(p.sender, p.receiver, STATUS_COLOURS[status], PORT_STYLES[p.port],
                                   _width(score[name], largest) / 2))
    legend = [(f"{status} ({len(groups[status])})", STATUS_COLOURS[status], "solid") for status in groups]
    legend += [(f"{port} input", "#444444", PORT_STYLES[port]) for port in ("q", "k", "v")]
    draw_figure(drawn, paths, title, legend)
