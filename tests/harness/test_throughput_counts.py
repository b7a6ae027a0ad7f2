"""benchmarks/throughput.py part 5: the operator and FLOP counts of one case, by phase."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.throughput import OperatorCounter, edit_seconds_and_flops, operator_calls_of_a_case, setup


def test_operator_counter_counts_each_aten_call() -> None:
    a, b, c = torch.randn(3, 4), torch.randn(4, 5), torch.randn(3, 5)
    counter = OperatorCounter()
    with counter:
        torch.mm(a, b).add(c)  # two aten calls by hand: mm, add
        counter.phase = "edit"
        a.sum()
    assert dict(counter.calls) == {"other": 2, "edit": 1}


def test_a_cases_edit_flops_equal_the_edit_measured_alone() -> None:
    bundle, editor, data, cases = setup("tiny-gpt2", "rome", 2, 1)
    counts = operator_calls_of_a_case(bundle, editor, data, cases[1], "tiny-gpt2", "rome")
    _, edit_flops = edit_seconds_and_flops(bundle, editor, [cases[1], cases[1]])
    assert counts["flops"]["edit"] == edit_flops  # the same edit, counted apart from its case
    assert counts["flops_total"] == sum(counts["flops"].values())
    assert counts["operator_calls"]["edit"] > 0 and counts["operator_calls"]["held-out perplexity"] > 0
    with FlopCounterMode(display=False) as alone:
        torch.mm(torch.randn(8, 16), torch.randn(16, 4))
    assert alone.get_total_flops() == 2 * 8 * 16 * 4  # the counter the benchmark relies on, by hand
