"""What an ablated edge carries: the value each sender's output takes when it is knocked out.

- `corrupted` (default): the sender's output on the corrupted prompt (interchange / activation
  patching; Yao et al. 2024, EAP-IG's 'patching').
- `mean`: the sender's output averaged over every real token position of a reference set of prompts
  (EAP-IG's 'mean'; not per position, since prompts differ in length).
- `zero`: zero (the Knowledge Circuits ACDC runs' zero ablation).

The result has the batch's shape [n_upstream, B, P, D], so attribution uses
delta = ablated - clean and evaluation patches edges with it, for every kind alike.
Where the batch has an `ablate_mask` (few-shot prompts: only the query's positions), the other positions
take the clean outputs, so their edges are never ablated.
"""

from __future__ import annotations

from typing import Any

import torch

from circuits.activations import PairBatch, run_capture
from circuits.graph import Graph
from lmview.arch import ArchSpec

ABLATIONS = ("corrupted", "mean", "zero")


def check_ablation(ablation: str) -> None:
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation '{ablation}'; choose from {', '.join(ABLATIONS)}")


@torch.no_grad()
def mean_sender_outputs(bridge: Any, graph: Graph, arch: ArchSpec, model: torch.nn.Module,
                        ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """[n_upstream, D]: each sender's output averaged over the real positions of the reference prompts
    (only over `positions` [B, P] bool when given: the queries of few-shot prompts)."""
    _, outputs = run_capture(bridge, graph, arch, model, ids, mask)
    weights = (mask if positions is None else positions).to(outputs.dtype)[None, :, :, None]
    return (outputs * weights).sum((1, 2)) / weights.sum()


@torch.no_grad()
def ablated_outputs(bridge: Any, graph: Graph, arch: ArchSpec, model: torch.nn.Module, batch: PairBatch,
                    ablation: str = "corrupted", reference: PairBatch | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ablated sender outputs [n_upstream, B, P, D], corrupted-run logits or None).

    `reference` is the mean ablation's reference set (its clean prompts); by default the batch itself."""
    check_ablation(ablation)
    if ablation == "corrupted":
        logits, outputs = run_capture(bridge, graph, arch, model, batch.corrupt_ids, batch.attention_mask)
        return _clean_outside_mask(bridge, graph, arch, model, batch, outputs), logits
    shape = (graph.n_upstream, *batch.clean_ids.shape, arch.d_model)
    dtype = next(model.parameters()).dtype
    if ablation == "zero":
        outputs = torch.zeros(shape, device=batch.clean_ids.device, dtype=dtype)
    else:
        ref = reference if reference is not None else batch
        means = mean_sender_outputs(bridge, graph, arch, model, ref.clean_ids, ref.attention_mask, ref.ablate_mask)
        outputs = means[:, None, None, :].expand(shape)
    return _clean_outside_mask(bridge, graph, arch, model, batch, outputs), None


def _clean_outside_mask(bridge: Any, graph: Graph, arch: ArchSpec, model: torch.nn.Module, batch: PairBatch,
                        ablated: torch.Tensor) -> torch.Tensor:
    """The ablated outputs at the batch's ablate_mask positions, the clean run's outputs elsewhere."""
    if batch.ablate_mask is None:
        return ablated
    _, clean = run_capture(bridge, graph, arch, model, batch.clean_ids, batch.attention_mask)
    return torch.where(batch.ablate_mask[None, :, :, None], ablated, clean)
