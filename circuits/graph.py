"""The edge-level computation graph of a transformer, after EAP-IG and the Knowledge Circuits code.

Upstream nodes (senders) are the input embedding, every attention head (one per
query head) and every MLP. Receivers are each head's q, k and v inputs, each
MLP's input and the logits. An edge joins a sender to every receiver that reads
the residual stream after it. A node-level view (heads and MLPs as units) is the
sender rows of this graph: a node's score is the sum of its outgoing edges' scores.

Grouped-query attention (Llama, SmolLM2, TinyLlama) has two graphs (`GRAPHS`):

- `ungrouped` (the default, EAP-IG's and MIB's graph): one k and one v receiver per query
  head, `a{l}.h{h}<k>` / `a{l}.h{h}<v>`. Head h's k receiver is the copy of the shared key
  projection's input that head h alone reads; the model is run with its key/value projections
  repeated per query head (`circuits/ungroup.py`), which leaves its outputs unchanged.
- `grouped` (a labelled variant): ONE k and v receiver per key/value group,
  `a{l}.kv{g}<k>` / `a{l}.kv{g}<v>`. Query head h belongs to group h // (n_heads / n_kv_heads)
  (the Hugging Face `repeat_kv` layout). The receiver's gradient is the sum over the group's
  query heads, so its score is the sum of the ungrouped graph's scores over the group. For
  pruning and node-level circuits it belongs to every query head of its group (`receiver_owners`).

With ordinary multi-head attention the two graphs are the same and `kind` is "ungrouped".

Edge counts (formula in `n_edges`): with S(l) = 1 + l (H + 1) senders before layer l, each
layer's q receivers have S(l) incoming edges each, its K k and K v receivers (K = H ungrouped,
n_kv_heads grouped) S(l) each, its MLP S(l) + H, and the logits S(L). GPT-2 small: 32,491 edges;
GPT-2 medium 231,877; SmolLM2-135M 123,211 ungrouped (70,651 grouped); TinyLlama-1.1B 742,996
ungrouped (314,876 grouped).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

GRAPHS = ("ungrouped", "grouped")
DEFAULT_GRAPH = "ungrouped"


def check_graph(kind: str) -> str:
    if kind not in GRAPHS:
        raise ValueError(f"unknown graph '{kind}'; choose from {', '.join(GRAPHS)}")
    return kind


@dataclass(frozen=True)
class Graph:
    n_layers: int
    n_heads: int
    n_kv_heads: int  # k/v receivers per layer: n_heads (ungrouped) or the model's key/value heads (grouped)

    @property
    def kind(self) -> str:
        """'ungrouped' (one k/v receiver per query head, EAP-IG's and MIB's graph) or 'grouped'."""
        return "ungrouped" if self.n_kv_heads == self.n_heads else "grouped"

    @classmethod
    def of(cls, arch, kind: str = DEFAULT_GRAPH) -> "Graph":
        """The graph of an architecture (anything with n_layers, n_heads, n_kv_heads)."""
        kv = arch.n_heads if check_graph(kind) == "ungrouped" else arch.n_kv_heads
        return cls(arch.n_layers, arch.n_heads, kv)

    # --- senders ---------------------------------------------------------------
    @property
    def n_upstream(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    def head_index(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_index(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    @cached_property
    def upstream_names(self) -> list[str]:
        names = ["input"]
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}" for h in range(self.n_heads)] + [f"m{layer}"]
        return names

    # --- receivers -----------------------------------------------------------------
    @property
    def receivers_per_layer(self) -> int:
        return self.n_heads + 2 * self.n_kv_heads + 1

    @property
    def n_receivers(self) -> int:
        return self.n_layers * self.receivers_per_layer + 1

    def q_index(self, layer: int, head: int) -> int:
        return layer * self.receivers_per_layer + head

    def k_index(self, layer: int, group: int) -> int:
        return layer * self.receivers_per_layer + self.n_heads + group

    def v_index(self, layer: int, group: int) -> int:
        return layer * self.receivers_per_layer + self.n_heads + self.n_kv_heads + group

    def mlp_in_index(self, layer: int) -> int:
        return layer * self.receivers_per_layer + self.receivers_per_layer - 1

    @property
    def logits_index(self) -> int:
        return self.n_receivers - 1

    def group_of(self, head: int) -> int:
        """The key/value group that query head `head` reads (Hugging Face repeat_kv layout)."""
        return head // (self.n_heads // self.n_kv_heads)

    def kv_node(self, layer: int, group: int) -> str:
        return f"a{layer}.h{group}" if self.n_kv_heads == self.n_heads else f"a{layer}.kv{group}"

    @cached_property
    def receiver_names(self) -> list[str]:
        names: list[str] = []
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}<q>" for h in range(self.n_heads)]
            names += [f"{self.kv_node(layer, g)}<k>" for g in range(self.n_kv_heads)]
            names += [f"{self.kv_node(layer, g)}<v>" for g in range(self.n_kv_heads)]
            names.append(f"m{layer}")
        return names + ["logits"]

    @cached_property
    def receiver_nodes(self) -> list[str]:
        """The node each receiver belongs to (strips the <q>/<k>/<v> port)."""
        return [name.split("<")[0] for name in self.receiver_names]

    @cached_property
    def receiver_owners(self) -> torch.Tensor:
        """[n_receivers, n_upstream + 1] bool: the node(s) a receiver feeds; column n_upstream is the logits.

        A q receiver and the MLP input belong to one node; a grouped k/v receiver belongs to
        every query head of its group."""
        owners = torch.zeros(self.n_receivers, self.n_upstream + 1, dtype=torch.bool)
        for layer in range(self.n_layers):
            for head in range(self.n_heads):
                node = self.head_index(layer, head)
                group = self.group_of(head)
                owners[[self.q_index(layer, head), self.k_index(layer, group), self.v_index(layer, group)], node] = True
            owners[self.mlp_in_index(layer), self.mlp_index(layer)] = True
        owners[self.logits_index, self.n_upstream] = True
        return owners

    def senders_before(self, receiver: int) -> int:
        """How many senders (a prefix of the sender order) can feed `receiver`."""
        if receiver == self.logits_index:
            return self.n_upstream
        layer = receiver // self.receivers_per_layer
        return self.mlp_index(layer) if receiver == self.mlp_in_index(layer) else self.head_index(layer, 0)

    @classmethod
    def from_config(cls, config, kind: str = DEFAULT_GRAPH) -> "Graph":
        """The graph of a Hugging Face config (no weights needed)."""
        from types import SimpleNamespace

        from lmview.arch import arch_of

        return cls.of(arch_of(SimpleNamespace(config=config)), kind)

    # --- edges ---------------------------------------------------------------------
    @cached_property
    def edge_mask(self) -> torch.Tensor:
        """[n_upstream, n_receivers] bool: True where the sender precedes the receiver."""
        sender_layer = torch.full((self.n_upstream,), -1)
        sender_is_mlp = torch.zeros(self.n_upstream, dtype=torch.bool)
        for layer in range(self.n_layers):
            sender_layer[self.head_index(layer, 0): self.mlp_index(layer) + 1] = layer
            sender_is_mlp[self.mlp_index(layer)] = True
        recv_layer = torch.arange(self.n_receivers) // self.receivers_per_layer
        recv_is_mlp = torch.zeros(self.n_receivers, dtype=torch.bool)
        recv_is_mlp[[self.mlp_in_index(layer) for layer in range(self.n_layers)]] = True
        recv_layer[self.logits_index] = self.n_layers
        earlier = sender_layer[:, None] < recv_layer[None, :]
        same_layer_head_to_mlp = (sender_layer[:, None] == recv_layer[None, :]) & ~sender_is_mlp[:, None] & recv_is_mlp[None, :]
        return earlier | same_layer_head_to_mlp

    @property
    def n_edges(self) -> int:
        return int(self.edge_mask.sum())

    def edge_name(self, upstream: int, receiver: int) -> str:
        return f"{self.upstream_names[upstream]}->{self.receiver_names[receiver]}"

    @cached_property
    def _positions(self) -> tuple[dict[str, int], dict[str, int]]:
        return ({n: i for i, n in enumerate(self.upstream_names)}, {n: j for j, n in enumerate(self.receiver_names)})

    def parse_edge(self, name: str) -> tuple[int, int]:
        up, recv = name.split("->")
        senders, receivers = self._positions
        if up not in senders or recv not in receivers:
            raise ValueError(f"edge '{name}' is not in the {self.kind} graph of this model")
        return senders[up], receivers[recv]

    def mask_of(self, edge_names) -> torch.Tensor:
        """[n_upstream, n_receivers] bool mask of the named edges."""
        keep = torch.zeros(self.n_upstream, self.n_receivers, dtype=torch.bool)
        for name in edge_names:
            keep[self.parse_edge(name)] = True
        return keep
