"""The metrics that circuit discovery attributes and evaluation measures, per prompt row.

- `logprob`: log p(answer's first token) at the answer position (Yao et al. 2024's target probability,
  in log space).
- `logit-diff`: logit(answer) - logit(corrupted answer) at the answer position (Wang et al. 2023;
  EAP-IG's `logit_diff`). The corrupted answer is the batch's `corrupt_answer_ids` when given, else the
  corrupted prompt's own greedy prediction (its runner-up when that equals the clean answer).
- `match-nll`: the Knowledge Circuits code's `match_nll` metric (acdc/acdc_utils.py, MatchNLLMetric):
  the NLL of the answer under the model being measured minus its NLL under the unpatched model on the
  clean prompt, i.e. logprob_clean - logprob. It is 0 for the clean run and grows as the answer is lost.
  Differs: we read it at the answer position only (their shift=True averages the label positions, which
  in their knowledge data is the answer position as well). Its gradient is minus logprob's; the clean
  baseline only shifts its value, so attribution may run without it (baseline 0).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from circuits.activations import PairBatch, answer_logprob

METRICS = ("logprob", "logit-diff", "match-nll")
LEGACY_NAMES = {"nll-diff": "match-nll"}  # the name circuit files written before the rename carry


def answer_logits(logits: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """[B, vocab] logits at each row's answer position."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, batch.answer_pos].float()


def corrupted_answers(corrupt_logits: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """The corrupted prompt's top token per row, or its runner-up where that is the clean answer."""
    top2 = answer_logits(corrupt_logits, batch).topk(2, dim=-1).indices
    return torch.where(top2[:, 0] == batch.answer_ids, top2[:, 1], top2[:, 0])


@dataclass
class Metric:
    """A per-row metric m(logits) -> [B]; `prepare` fills in what it needs from clean/corrupted runs."""

    name: str = "logprob"
    corrupt_answer_ids: torch.Tensor | None = None  # logit-diff
    clean_logprob: torch.Tensor | None = None  # match-nll baseline

    def __post_init__(self) -> None:
        self.name = LEGACY_NAMES.get(self.name, self.name)
        if self.name not in METRICS:
            raise ValueError(f"unknown metric '{self.name}'; choose from {', '.join(METRICS)}")

    def prepare(self, batch: PairBatch, clean_logits: torch.Tensor | None = None,
                corrupt_logits: torch.Tensor | None = None) -> Metric:
        if self.name == "logit-diff" and self.corrupt_answer_ids is None:
            if batch.corrupt_answer_ids is not None:
                self.corrupt_answer_ids = batch.corrupt_answer_ids
            elif corrupt_logits is not None:
                self.corrupt_answer_ids = corrupted_answers(corrupt_logits, batch)
        if self.name == "match-nll" and self.clean_logprob is None and clean_logits is not None:
            self.clean_logprob = answer_logprob(clean_logits, batch).detach()
        return self

    def __call__(self, logits: torch.Tensor, batch: PairBatch) -> torch.Tensor:
        if self.name == "logprob":
            return answer_logprob(logits, batch)
        if self.name == "match-nll":
            baseline = self.clean_logprob if self.clean_logprob is not None else 0.0
            return baseline - answer_logprob(logits, batch)
        if self.corrupt_answer_ids is None:
            raise ValueError("logit-diff needs the corrupted answers: call prepare() with the corrupted logits")
        at_answer = answer_logits(logits, batch)
        rows = torch.arange(at_answer.shape[0], device=at_answer.device)
        return at_answer[rows, batch.answer_ids] - at_answer[rows, self.corrupt_answer_ids.to(at_answer.device)]


def as_metric(metric: str | Metric) -> Metric:
    """A fresh Metric (a given one is copied, so preparing it for one batch leaves the caller's alone)."""
    return replace(metric) if isinstance(metric, Metric) else Metric(metric)


def prepared_metric(bridge: Any, batch: PairBatch, metric: str | Metric, clean_logits: torch.Tensor | None = None,
                    corrupt_logits: torch.Tensor | None = None) -> Metric:
    """The metric with its corrupted answers (logit-diff) and clean baseline (match-nll) filled in."""
    metric = as_metric(metric)
    needs_corrupt = metric.name == "logit-diff" and metric.corrupt_answer_ids is None and batch.corrupt_answer_ids is None
    if needs_corrupt and corrupt_logits is None:
        with torch.no_grad():
            corrupt_logits = bridge.run_with_hooks(batch.corrupt_ids, fwd_hooks=[], attention_mask=batch.attention_mask)
    return metric.prepare(batch, clean_logits=clean_logits, corrupt_logits=corrupt_logits)
