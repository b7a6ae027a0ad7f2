"""Tokenising prompts with multi-token targets, and their log-probabilities under a model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


def target_ids(tokenizer: PreTrainedTokenizerBase, target: str) -> list[int]:
    """Token ids of a target answer as it follows a prompt: with its leading space."""
    ids = tokenizer(" " + target.strip(), add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    return ids


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of a prompt, with the model's own special-token convention (BOS or none)."""
    return tokenizer(prompt).input_ids


def right_padded(rows: list[list[int]], pad: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one right-padded id tensor and its attention mask (1 on real tokens)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


@dataclass
class TargetBatch:
    """Right-padded prompt+target sequences.

    `logit_pos[i, j]` is the position whose logits predict target token j of row i.
    """

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    target_ids: torch.Tensor  # [B, J] (pad 0)
    target_mask: torch.Tensor  # [B, J] bool
    logit_pos: torch.Tensor  # [B, J]
    prompt_len: torch.Tensor  # [B]

    @property
    def last_prompt_pos(self) -> torch.Tensor:
        return self.prompt_len - 1


def build_batch(tokenizer: PreTrainedTokenizerBase, prompts: list[str], targets: list[str],
                device: torch.device | str = "cpu") -> TargetBatch:
    rows = [(prompt_ids(tokenizer, p), target_ids(tokenizer, t)) for p, t in zip(prompts, targets, strict=True)]
    width = max(len(p) + len(t) for p, t in rows)
    n_tgt = max(len(t) for _, t in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    tgt = torch.zeros((len(rows), n_tgt), dtype=torch.long)
    tmask = torch.zeros((len(rows), n_tgt), dtype=torch.bool)
    pos = torch.zeros((len(rows), n_tgt), dtype=torch.long)
    plen = torch.zeros(len(rows), dtype=torch.long)
    for i, (p, t) in enumerate(rows):
        seq = p + t
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        tgt[i, : len(t)] = torch.tensor(t)
        tmask[i, : len(t)] = True
        pos[i, : len(t)] = torch.arange(len(p) - 1, len(p) - 1 + len(t))
        plen[i] = len(p)
    return TargetBatch(ids.to(device), mask.to(device), tgt.to(device), tmask.to(device), pos.to(device),
                       plen.to(device))


def target_token_logprobs_from_logits(logits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """log p(target token j | prompt, target tokens < j) for each row: [B, J], 0 at padded positions."""
    index = batch.logit_pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    picked = logits.gather(1, index).log_softmax(-1)  # [B, J, V]
    token_lp = picked.gather(-1, batch.target_ids.unsqueeze(-1)).squeeze(-1)
    return token_lp * batch.target_mask


def target_logprob_from_logits(logits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """Sequence log-probability: the sum over target tokens of log p(token | prefix): [B]."""
    return target_token_logprobs_from_logits(logits, batch).sum(-1)


def target_logprobs(model: torch.nn.Module, batch: TargetBatch) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return target_logprob_from_logits(logits.float(), batch)


def next_token_logprobs(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                        device: torch.device | str) -> torch.Tensor:
    """log-softmax of the next-token distribution after each prompt: [B, V] (right padding)."""
    rows = [prompt_ids(tokenizer, p) for p in prompts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    last = mask.sum(1) - 1
    return logits[torch.arange(len(rows), device=device), last].float().log_softmax(-1)
