"""Faithfulness curves and their areas, as in the MIB circuit-localization track (Mueller et al. 2025).

Normalised faithfulness of a circuit C (MIB, eq. for f; the Knowledge Circuits code has no such
normalisation, it reports Hit@10 and the metric itself):

    f(C) = (m(C) - m(corrupted)) / (m(clean) - m(corrupted))

where m is the attribution metric averaged over the prompts: 1 for the full model, 0 for the corrupted run.

The curve evaluates f on the top-k edges for k = floor(p * |E|), p in 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50 and
100 % of the graph's edges (MIB's percentages). Its areas use MIB's convention: the x axis is the fraction
of edges on a linear scale (0.001 ... 1, no point added at 0), and each interval is a trapezoid:

    CPR = sum_i (x_{i+1} - x_i) * (f_i + f_{i+1}) / 2              (higher is better)
    CMD = sum_i (x_{i+1} - x_i) * (|1 - f_i| + |1 - f_{i+1}|) / 2  (lower is better)

The x range is 0.999 wide, so a perfect circuit at every size has CPR 0.999 and CMD 0, as in MIB.

Edge selection per area, as MIB's code (MIB-circuit-track `run_evaluation.py --absolute`, `print_results.py`
keeps the abs-False results for CPR and the abs-True ones for CMD; `evaluate_area_under_curve` calls
`apply_topn(k, absolute, prune=True)`): CPR's circuits are the top-k edges by SIGNED score, CMD's the top-k by
|score|, each pruned to input -> logits paths before it is evaluated (`mib_curves`). `faithfulness_curve`
evaluates whatever top-k circuit its callback builds (a single curve for both areas).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from circuits.graph import Graph
from circuits.selection import prune, top_edges

EDGE_PERCENTAGES: tuple[float, ...] = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)


MIN_GAP = 0.1  # per-case reports: |clean - corrupted| below this (nats, or logits for logit-diff) is undefined


def normalized_faithfulness(circuit: float, clean: float, corrupted: float, min_gap: float = 1e-9) -> float:
    """(circuit - corrupted) / (clean - corrupted); NaN (undefined) when |clean - corrupted| < min_gap."""
    gap = clean - corrupted
    return (circuit - corrupted) / gap if abs(gap) >= min_gap and gap != 0 else math.nan


def reported_faithfulness(metrics: dict[str, float], min_gap: float = MIN_GAP) -> float | None:
    """A circuit's faithfulness for a per-case report: None (undefined, left out of means) when clean and
    ablated differ by less than min_gap, where the ratio of two near-equal numbers is noise."""
    if not metrics or "metric_clean" not in metrics:
        return None
    value = normalized_faithfulness(metrics["metric_circuit"], metrics["metric_clean"], metrics["metric_corrupted"],
                                    min_gap)
    return None if math.isnan(value) else value


def edges_at(percent: float, n_edges: int) -> int:
    """How many edges `percent` % of the graph is: floor, as MIB's int(p * n)."""
    return int(percent / 100 * n_edges)


@dataclass(frozen=True)
class CurvePoint:
    percent: float
    n_edges: int
    faithfulness: float


def curve_areas(fractions: Sequence[float], faithfulness: Sequence[float]) -> dict[str, float]:
    """CPR and CMD by the trapezoid rule over `fractions` (increasing, in [0, 1])."""
    if len(fractions) != len(faithfulness) or len(fractions) < 2:
        raise ValueError("a curve needs at least two points, as many x as y values")
    if any(b <= a for a, b in zip(fractions, fractions[1:])):
        raise ValueError("curve x values must increase")
    cpr = cmd = 0.0
    for i in range(len(fractions) - 1):
        width = fractions[i + 1] - fractions[i]
        left, right = faithfulness[i], faithfulness[i + 1]
        cpr += width * (left + right) / 2
        cmd += width * (abs(1 - left) + abs(1 - right)) / 2
    return {"cpr": cpr, "cmd": cmd}


def faithfulness_curve(faithfulness_of_top: Callable[[int], float], n_edges: int,
                       percentages: Sequence[float] = EDGE_PERCENTAGES) -> dict:
    """Evaluates f on the top-k edges at each percentage; returns the points and their CPR/CMD."""
    points = []
    for percent in percentages:
        k = edges_at(percent, n_edges)
        points.append(CurvePoint(percent, k, float(faithfulness_of_top(k))))
    areas = curve_areas([p.percent / 100 for p in points], [p.faithfulness for p in points])
    return {"x_axis": "fraction of the graph's edges (linear), trapezoid rule, as MIB",
            "points": [asdict(p) for p in points], **areas}


def mib_curves(scores: torch.Tensor, graph: Graph, faithfulness_of: Callable[[torch.Tensor], float],
               percentages: Sequence[float] = EDGE_PERCENTAGES) -> dict:
    """MIB's CPR (top-k by signed score) and CMD (top-k by |score|) from two curves of pruned circuits;
    faithfulness_of(keep) evaluates a boolean [n_upstream, n_receivers] edge mask."""
    out: dict = {"x_axis": "fraction of the graph's edges (linear), trapezoid rule, as MIB",
                 "selection": {"cpr": "top-k edges by signed score, pruned (MIB abs-False)",
                               "cmd": "top-k edges by |score|, pruned (MIB abs-True)"}}
    for area, absolute in (("cpr", False), ("cmd", True)):
        points = []
        for percent in percentages:
            k = edges_at(percent, graph.n_edges)
            keep = prune(top_edges(scores, graph, k, absolute=absolute), graph)
            points.append(CurvePoint(percent, k, float(faithfulness_of(keep))))
        out[area] = curve_areas([p.percent / 100 for p in points], [p.faithfulness for p in points])[area]
        out[f"{area}_points"] = [asdict(p) for p in points]
    return out
