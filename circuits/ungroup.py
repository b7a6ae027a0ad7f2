"""Running a grouped-query model as the multi-head model it equals, for the ungrouped graph.

A grouped-query layer with n_kv_heads key/value heads computes exactly what a multi-head layer computes
whose key and value projections repeat each key/value head's rows for the n_heads / n_kv_heads query heads
that read it (Hugging Face `repeat_kv`: query head h reads group h // (n_heads / n_kv_heads)). Inside
`kv_layout(model, arch, graph)` with an ungrouped graph of a grouped model, each layer's k/v projection
weights are those repeated copies and the attention's `num_key_value_groups` is 1, so `hook_k` / `hook_v`
carry one head per query head: each head's k and v input is its own receiver, with its own gradient and
its own patched value, as in EAP-IG and MIB (TransformerLens's `ungroup_grouped_query_attention`).
The original parameter objects come back on exit. Nested uses are no-ops.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch

from circuits.graph import Graph

if TYPE_CHECKING:  # the architecture description lives in lmview/arch.py
    from lmview.arch import ArchSpec


def _attention(arch: ArchSpec, model: torch.nn.Module, layer: int) -> Any:
    return arch.blocks(model)[layer].self_attn


def needs_ungrouping(arch: ArchSpec, graph: Graph) -> bool:
    """True when the graph has a k/v receiver per query head but the model groups its key/value heads."""
    if graph.n_kv_heads == arch.n_kv_heads:
        return False
    if graph.n_kv_heads != arch.n_heads:
        raise ValueError(f"a graph with {graph.n_kv_heads} k/v receivers per layer does not fit a model with "
                         f"{arch.n_heads} query and {arch.n_kv_heads} key/value heads")
    return True


def _repeated(param: torch.Tensor, n_rep: int, d_head: int) -> torch.nn.Parameter:
    """Rows of each key/value head (d_head rows per head) repeated n_rep times, in repeat_kv order."""
    per_head = param.detach().unflatten(0, (-1, d_head))
    return torch.nn.Parameter(per_head.repeat_interleave(n_rep, dim=0).flatten(0, 1),
                              requires_grad=param.requires_grad)


@contextmanager
def kv_layout(model: torch.nn.Module, arch: ArchSpec, graph: Graph) -> Iterator[None]:
    """The model's key/value heads laid out as the graph's k/v receivers for the duration."""
    if not needs_ungrouping(arch, graph):
        yield
        return
    first = _attention(arch, model, 0).k_proj
    if first.weight.shape[0] == arch.n_heads * arch.d_head:  # already ungrouped by an outer kv_layout
        yield
        return
    saved: list[tuple[Any, str, Any]] = []
    try:
        for layer in range(arch.n_layers):
            attn = _attention(arch, model, layer)
            for name in ("k_proj", "v_proj"):
                proj = getattr(attn, name)
                saved.append((proj, "weight", proj.weight))
                proj.weight = _repeated(proj.weight, arch.heads_per_kv, arch.d_head)
                if proj.bias is not None:
                    saved.append((proj, "bias", proj.bias))
                    proj.bias = _repeated(proj.bias, arch.heads_per_kv, arch.d_head)
            saved.append((attn, "num_key_value_groups", attn.num_key_value_groups))
            attn.num_key_value_groups = 1
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)
