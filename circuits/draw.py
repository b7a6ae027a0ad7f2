"""Drawing circuits with Graphviz `dot`: one circuit, or two circuits on one figure (kept, lost and new edges).

Layout: the input at the top, then for each layer its attention heads on one rank and its MLP on the next,
the logits at the bottom. Edge width grows with |score| (relative to the largest in the figure). The
receiver's port is shown by colour and line style: q blue solid, k green dashed, v red dotted, the
residual stream (MLP and logits inputs) grey solid. Under grouped-query attention a key/value group's
k/v receiver is its own node `a{l}.kv{g}` on the heads' rank. In a diff figure colour shows the status
(kept dark grey, lost red, new green) and line style the port.

When `dot` is not on PATH the figures are skipped with one warning per process; callers still write JSON.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bench")

PORT_COLOURS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#d62728", "": "#555555"}
PORT_STYLES = {"q": "solid", "k": "dashed", "v": "dotted", "": "solid"}
STATUS_COLOURS = {"kept": "#444444", "lost": "#d62728", "new": "#2ca02c"}
_NODE = re.compile(r"^a(\d+)\.(h|kv)(\d+)$|^m(\d+)$")
_warned_missing_dot = False


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


def dot_available() -> bool:
    return shutil.which("dot") is not None


def render(source: str, outputs: list[Path], timeout: float = 300.0) -> bool:
    """Writes each output (format from its suffix: .svg, .png, .pdf) with `dot`; False when dot is missing."""
    global _warned_missing_dot
    if not dot_available():
        if not _warned_missing_dot:
            log.warning("graphviz 'dot' is not on PATH: circuit figures are skipped (JSON files are still "
                        "written); install the OS package graphviz to draw them")
            _warned_missing_dot = True
        return False
    for path in outputs:
        fmt = path.suffix.lstrip(".") or "svg"
        extra = ["-Gdpi=72", "-Gsize=30,30"] if fmt == "png" else []  # raster capped at 2160 px; SVG is exact
        done = subprocess.run(["dot", f"-T{fmt}", *extra, "-o", str(path)], input=source, text=True,
                              capture_output=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"dot failed on {path.name}: {done.stderr.strip()[:300]}")
    return True
