"""Architecture knowledge, in one place.

Everything that depends on how a model family names and shapes its modules lives
here: layer lists, the MLP output projection that locate-then-edit methods
rewrite, the per-head attention matrices used by circuit discovery, and the
norms. Supported families: GPT-2 (Conv1D weights stored [in, out]) and Llama
(SmolLM2, TinyLlama; Linear weights stored [out, in]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    family: str  # "gpt2" or "llama"
    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    d_head: int

    # --- module access -------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.transformer.h if self.family == "gpt2" else model.model.layers

    def mlp_out_proj(self, model: nn.Module, layer: int) -> nn.Module:
        """The MLP output projection: GPT-2 `mlp.c_proj` (Conv1D), Llama `mlp.down_proj` (Linear)."""
        block = self.blocks(model)[layer]
        return block.mlp.c_proj if self.family == "gpt2" else block.mlp.down_proj

    def mlp_out_weight_name(self, layer: int) -> str:
        if self.family == "gpt2":
            return f"transformer.h.{layer}.mlp.c_proj.weight"
        return f"model.layers.{layer}.mlp.down_proj.weight"

    def mlp_out_weight(self, model: nn.Module, layer: int) -> nn.Parameter:
        return self.mlp_out_proj(model, layer).weight

    def mlp_out_matrix(self, model: nn.Module, layer: int) -> torch.Tensor:
        """The projection as a [d_model, d_mlp] matrix W with value = W @ key (a view)."""
        w = self.mlp_out_weight(model, layer)
        return w.T if self.family == "gpt2" else w

    def ln_attn(self, model: nn.Module, layer: int) -> nn.Module:
        block = self.blocks(model)[layer]
        return block.ln_1 if self.family == "gpt2" else block.input_layernorm

    def ln_mlp(self, model: nn.Module, layer: int) -> nn.Module:
        block = self.blocks(model)[layer]
        return block.ln_2 if self.family == "gpt2" else block.post_attention_layernorm

    def ln_final(self, model: nn.Module) -> nn.Module:
        return model.transformer.ln_f if self.family == "gpt2" else model.model.norm

    # --- per-head attention matrices -------------------------------------
    def qkv_weights(self, model: nn.Module, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """W_Q [n_heads, d_model, d_head], W_K and W_V [n_kv_heads, d_model, d_head], acting as x @ W."""
        attn = self.blocks(model)[layer].attn if self.family == "gpt2" else self.blocks(model)[layer].self_attn
        d, dh = self.d_model, self.d_head
        if self.family == "gpt2" and not hasattr(attn, "q"):
            w = attn.c_attn.weight  # [d_model, 3 * d_model]
            q, k, v = w.split(d, dim=1)
            return tuple(m.reshape(d, -1, dh).permute(1, 0, 2) for m in (q, k, v))  # type: ignore[return-value]
        if self.family == "gpt2":
            # TransformerLens's bridge splits GPT-2's fused c_attn into q, k, v Linear copies and runs
            # those: read the weights the forward pass actually uses
            return tuple(
                lin.weight.reshape(-1, dh, d).permute(0, 2, 1) for lin in (attn.q, attn.k, attn.v)
            )  # type: ignore[return-value]
        return tuple(
            lin.weight.reshape(-1, dh, d).permute(0, 2, 1) for lin in (attn.q_proj, attn.k_proj, attn.v_proj)
        )  # type: ignore[return-value]

    def o_weight(self, model: nn.Module, layer: int) -> torch.Tensor:
        """W_O as [n_heads, d_head, d_model], acting as z_h @ W_O[h]."""
        if self.family == "gpt2":
            w = self.blocks(model)[layer].attn.c_proj.weight  # [n_heads * d_head, d_model]
            return w.reshape(self.n_heads, self.d_head, self.d_model)
        w = self.blocks(model)[layer].self_attn.o_proj.weight  # [d_model, n_heads * d_head]
        return w.T.reshape(self.n_heads, self.d_head, self.d_model)

    @property
    def heads_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads


def parameter(model: nn.Module, name: str) -> torch.Tensor:
    """A parameter by its Hugging Face dotted name, also once the bridge has wrapped the modules."""
    obj = model
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def backup(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Detached copies of the named parameters, to restore bitwise after an edit."""
    return {name: parameter(model, name).detach().clone() for name in names}


def arch_of(model: nn.Module) -> ArchSpec:
    """Reads the ArchSpec from a Hugging Face causal LM's config."""
    cfg = model.config
    kind = cfg.model_type
    if kind == "gpt2":
        return ArchSpec(
            family="gpt2",
            n_layers=cfg.n_layer,
            d_model=cfg.n_embd,
            d_mlp=cfg.n_inner or 4 * cfg.n_embd,
            n_heads=cfg.n_head,
            n_kv_heads=cfg.n_head,
            d_head=cfg.n_embd // cfg.n_head,
        )
    if kind in ("llama", "mistral", "qwen2"):
        n_heads = cfg.num_attention_heads
        return ArchSpec(
            family="llama",
            n_layers=cfg.num_hidden_layers,
            d_model=cfg.hidden_size,
            d_mlp=cfg.intermediate_size,
            n_heads=n_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
            d_head=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads,
        )
    raise ValueError(f"unsupported architecture '{kind}'; supported: gpt2, llama-family (llama, mistral, qwen2)")
