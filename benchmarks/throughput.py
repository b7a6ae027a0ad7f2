"""Throughput: scoring cost, where one case's time goes, one edit against its FLOP floor, workers against threads.

    python -m benchmarks.throughput --model smollm2-135m --editor rome --cases 2 \
        --json benchmarks/results/throughput-cpu.json

0. Scoring: one case's CounterFact scoring batch from the full logits against the target positions only;
   and one case's greedy generations (the prompts of bench.metrics.generation_metrics) with a KV cache against
   re-running the whole sequence at every step (what a hooked editor needs), and whether their tokens agree.
1. Phases of one `bench run` case (the run's own code, bench.run.run_case, timed per phase by wrapping the
   functions it calls): pre-scores, edit, post-scores, circuits, held-out perplexity.
2. The edit against its floor: the floating-point operations the edit executes (torch's FlopCounterMode,
   matmuls and convolutions) divided by this machine's measured float32 matmul rate, at the same thread
   count; the ratio seconds / floor says how far the edit is from pure matmul arithmetic.
3. Workers against threads, side by side in one invocation: the same cases edited by 2 processes with 1
   torch thread each (each half the cases), then by 1 process with 2 threads; cases per second of each.
4. Packing (`--packing 1,4,10 --device cuda`): k processes on one device, each running whole `bench run`
   cases (pre-scores, edit, post-scores, held-out perplexity, restore; circuits off, as the CounterFact
   suite) on its share of the cases, started together after one warm-up case each; cases per second for
   every k and its ratio to k = 1. This is what `bench sweep --workers-per-gpu k` packs on a GPU.
5. Operator calls (`--operator-calls`): one such whole case (the packing case) under a dispatch counter,
   the aten operator calls and matmul FLOPs of each phase. Operator calls are device-independent, so a
   CPU count says how many kernel launches a GPU case pays for, and the FLOPs what its arithmetic costs.

    python -m benchmarks.throughput --device cuda --packing 1,4,10 --packing-cases 4 --only-packing \
        --json benchmarks/results/packing-cuda.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import bench.run as run_module
from bench.data import load_dataset
from bench.run import RunConfig, restore, select_cases, sync
from editors.base import get_editor, load_hparams
from lmview.arch import backup
from lmview.io import write_json
from lmview.models import load_model

PHASES = {"measure_before": "pre-scores (+ pre circuits)", "apply_edits": "edit",
          "measure_after": "post-scores (+ post circuits)", "find_circuit": "circuits (inside the scores)",
          "held_out_perplexity": "held-out perplexity"}


def matmul_rate(threads: int, n: int = 1024, repeats: int = 40) -> dict[str, float]:
    """Float32 n x n matmul rates at `threads` torch threads: FLOPs per CPU second of this process (what
    the edit's CPU time is compared with; other jobs on the machine do not change it) and per wall
    second of the fastest single product."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best, cpu = float("inf"), time.process_time()
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    cpu = time.process_time() - cpu
    torch.set_num_threads(saved)
    return {"per_cpu_second": 2 * n ** 3 * repeats / cpu, "per_wall_second_best": 2 * n ** 3 / best}


@contextmanager
def around_phases(around: Callable[[str, Callable[[], Any]], Any]) -> Iterator[None]:
    """Routes every call of the PHASES functions of bench.run through around(phase name, the call)."""
    originals = {name: getattr(run_module, name) for name in PHASES}

    def wrap(name: str, fn: Any) -> Any:
        return lambda *args, **kwargs: around(name, lambda: fn(*args, **kwargs))

    for name, fn in originals.items():
        setattr(run_module, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(run_module, name, fn)


def phase_timer(totals: dict[str, float]) -> Any:
    """Adds the process CPU time of every call of the PHASES functions of bench.run to totals."""
    def timed(name: str, call: Callable[[], Any]) -> Any:
        start = time.process_time()
        try:
            return call()
        finally:
            totals[name] += time.process_time() - start
    return around_phases(timed)


def whole_case_runner(bundle: Any, editor: Any, data: Any, model: str, editor_name: str) -> Callable[[Any], dict]:
    """run(case): one whole case as a packed worker runs it (no circuits, 8 perplexity texts), its record."""
    cfg = RunConfig(editor=editor_name, model=model, device=str(bundle.device), circuits=False, ppl_texts=8)
    pool = run_module.CorruptionPool.from_cases(data.cases)
    folder = Path(tempfile.mkdtemp(prefix="whole-case-"))
    return lambda case: run_module.run_case(bundle, editor, case, pool, cfg, folder)


class OperatorCounter(TorchDispatchMode):
    """Counts aten operator calls, by the phase currently set."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "other"
        self.calls: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls[self.phase] += 1
        return func(*args, **(kwargs or {}))


def operator_calls_of_a_case(bundle: Any, editor: Any, data: Any, case: Any, model: str,
                             editor_name: str) -> dict[str, Any]:
    """One whole case as a packed worker runs it (no circuits, 8 perplexity texts): operator calls and
    matmul FLOPs per phase of bench.run.run_case."""
    run = whole_case_runner(bundle, editor, data, model, editor_name)
    run(case)  # warm-up: statistics and caches
    counter, flops = OperatorCounter(), FlopCounterMode(display=False)
    flops_by_phase: dict[str, int] = defaultdict(int)

    def counted(name: str, call: Callable[[], Any]) -> Any:
        counter.phase, before = PHASES[name], flops.get_total_flops()
        try:
            return call()
        finally:
            flops_by_phase[PHASES[name]] += flops.get_total_flops() - before
            counter.phase = "other"

    with around_phases(counted), flops, counter:
        run(case)
    return {"operator_calls": dict(counter.calls), "operator_calls_total": sum(counter.calls.values()),
            "flops": dict(flops_by_phase), "flops_total": flops.get_total_flops()}


def scoring_full_against_target_positions(bundle: Any, cases: list) -> dict[str, Any]:
    """case_target_nll's batch scored from HF's full logits and from the target positions only
    (bench.scoring.target_token_logprobs): process CPU seconds of each, and whether they agree bitwise."""
    from bench.scoring import case_prompts, paired_prompts, target_token_logprobs
    from lmview.tokens import build_batch, target_token_logprobs_from_logits

    cpu_full = cpu_targets = 0.0
    equal, worst = 0, 0.0
    for case in cases:
        batch = build_batch(bundle.tokenizer, *paired_prompts(case_prompts(case), case.target_new), bundle.device)
        with torch.no_grad():
            start = time.process_time()
            logits = bundle.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            full = target_token_logprobs_from_logits(logits.float(), batch)
            middle = time.process_time()
            only = target_token_logprobs(bundle.model, batch)
            cpu_targets += time.process_time() - middle
        cpu_full += middle - start
        equal += bool(torch.equal(full, only))
        worst = max(worst, float((full - only).abs().max()))
    return {"cases": len(cases), "bitwise_equal": equal, "max_abs_difference": worst,
            "cpu_seconds_full_logits": cpu_full, "cpu_seconds_target_positions": cpu_targets}


def generation_cached_against_recomputed(bundle: Any, cases: list) -> dict[str, Any]:
    """Each case's generation prompts decoded greedily both ways: process CPU seconds and token agreement."""
    from bench import metrics

    cpu = {"cached": 0.0, "recomputed": 0.0}
    equal = 0
    for case in cases:
        rows = [case.rewrite_prompt, *case.paraphrases, *case.generation_prompts]
        texts = {}
        for name, decode in (("cached", metrics._greedy_tokens_cached),
                             ("recomputed", metrics._greedy_tokens_recomputed)):
            start = time.process_time()
            texts[name] = metrics.greedy_generate(bundle.model, bundle.tokenizer, rows, bundle.device,
                                                      decode=decode)
            cpu[name] += time.process_time() - start
        equal += texts["cached"] == texts["recomputed"]
    return {"cases": len(cases), "texts_equal": equal, "max_new_tokens": metrics.GENERATION_MAX_NEW_TOKENS,
            "cpu_seconds_cached": cpu["cached"], "cpu_seconds_recomputed": cpu["recomputed"],
            "recomputed_over_cached": cpu["recomputed"] / cpu["cached"]}


def setup(model: str, editor_name: str, n: int, threads: int, device: str = "cpu"):
    torch.set_num_threads(threads)
    bundle = load_model(model, device)
    hparams, _ = load_hparams(editor_name, model, bundle.arch.family)
    editor = get_editor(editor_name)(bundle, hparams)
    data = load_dataset("facts")
    cases, _ = select_cases(bundle, data, n, only_known=False)
    return bundle, editor, data, cases


def edit_seconds_and_flops(bundle: Any, editor: Any, cases: list) -> tuple[list[tuple[float, float]], int]:
    """(wall, process CPU) seconds of each edit, after a warm-up edit that samples the context prefixes
    and loads the statistics, and the FLOPs of one edit. With one thread, CPU seconds are what the edit
    itself costs even when other jobs share the machine."""
    def one(case: Any) -> tuple[float, float]:
        saved = backup(bundle.model, editor.parameters_to_touch([case]))
        start, cpu = time.perf_counter(), time.process_time()
        editor.apply([case])
        sync(bundle.device)
        seconds = (time.perf_counter() - start, time.process_time() - cpu)
        restore(bundle.model, saved)
        return seconds

    one(cases[0])  # warm-up
    seconds = [one(case) for case in cases]
    counter = FlopCounterMode(display=False)
    saved = backup(bundle.model, editor.parameters_to_touch([cases[0]]))
    with counter:
        editor.apply([cases[0]])
    restore(bundle.model, saved)
    return seconds, counter.get_total_flops()


def _worker(model: str, editor_name: str, n: int, threads: int, offset: int, share: int, out: Any) -> None:
    bundle, editor, _, cases = setup(model, editor_name, n, threads)
    mine = cases[offset: offset + share]
    one_edit = mine[0]
    saved = backup(bundle.model, editor.parameters_to_touch([one_edit]))
    editor.apply([one_edit])  # warm-up outside the timed window
    restore(bundle.model, saved)
    out.put(("ready", os.getpid()))
    start = time.perf_counter()
    for case in mine:
        saved = backup(bundle.model, editor.parameters_to_touch([case]))
        editor.apply([case])
        restore(bundle.model, saved)
    out.put(("done", time.perf_counter() - start, len(mine)))


def cases_per_second(model: str, editor_name: str, n: int, processes: int, threads: int) -> dict[str, Any]:
    """n edits shared by `processes` processes of `threads` threads, started together after their warm-up."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    share = n // processes
    workers = [ctx.Process(target=_worker, args=(model, editor_name, n, threads, i * share, share, queue))
               for i in range(processes)]
    for w in workers:
        w.start()
    results = [queue.get() for _ in range(2 * processes)]
    for w in workers:
        w.join()
    spans = [r[1] for r in results if r[0] == "done"]
    done = sum(r[2] for r in results if r[0] == "done")
    return {"processes": processes, "threads": threads, "edits": done, "seconds": max(spans),
            "cases_per_second": done / max(spans)}


def _case_worker(model: str, editor_name: str, n: int, device: str, offset: int, share: int, start: Any,
                 out: Any) -> None:
    bundle, editor, data, cases = setup(model, editor_name, n + 1, 1, device)
    run = whole_case_runner(bundle, editor, data, model, editor_name)
    run(cases[n])  # warm-up: statistics, kernels, caches
    start.wait()
    began = time.perf_counter()
    records = [run(case) for case in cases[offset: offset + share]]
    sync(bundle.device)
    out.put((time.perf_counter() - began, sum(r.get("status") == "ok" for r in records), len(records)))


def packed_cases_per_second(model: str, editor_name: str, per_worker: int, workers: int,
                            device: str) -> dict[str, Any]:
    """`workers` processes on one device, `per_worker` whole cases each, timed from a common start."""
    ctx = mp.get_context("spawn")
    queue, start = ctx.Queue(), ctx.Barrier(workers)
    n = per_worker * workers
    procs = [ctx.Process(target=_case_worker, args=(model, editor_name, n, device, i * per_worker, per_worker,
                                                   start, queue)) for i in range(workers)]
    for proc in procs:
        proc.start()
    results = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    span = max(r[0] for r in results)
    done = sum(r[2] for r in results)
    return {"workers": workers, "cases": done, "ok": sum(r[1] for r in results), "seconds": span,
            "cases_per_second": done / span}


def packing(model: str, editor_name: str, ks: list[int], per_worker: int, device: str) -> dict[str, Any]:
    rows = [packed_cases_per_second(model, editor_name, per_worker, k, device) for k in ks]
    base = rows[0]["cases_per_second"]
    for row in rows:
        row["over_first"] = row["cases_per_second"] / base
    name = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else device
    return {"device": name, "editor": editor_name, "cases_per_worker": per_worker, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--editor", default="rome")
    parser.add_argument("--cases", type=int, default=2, help="edits timed per measurement (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for parts 1 and 2 (default 1)")
    parser.add_argument("--scoring-cases", type=int, default=10, help="facts for the scoring comparison (default 10)")
    parser.add_argument("--only-scoring", action="store_true", help="part 0 only (scoring and generation)")
    parser.add_argument("--only-matmul", action="store_true", help="part 0 and the matmul rates only")
    parser.add_argument("--skip-phases", action="store_true", help="skip part 1 (a full case with circuits)")
    parser.add_argument("--skip-scaling", action="store_true", help="skip part 3 (workers against threads)")
    parser.add_argument("--packing", default=None, help="part 4: worker counts on one device, e.g. 1,4,10")
    parser.add_argument("--packing-cases", type=int, default=4, help="whole cases per packed worker (default 4)")
    parser.add_argument("--only-packing", action="store_true", help="part 4 only")
    parser.add_argument("--operator-calls", action="store_true", help="part 5 only: operator calls of one case")
    parser.add_argument("--device", default="cpu", help="device of parts 4 and 5 (default cpu)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    ks = [int(k) for k in (args.packing or "1,4,10").split(",")]
    if args.operator_calls:
        bundle, editor, data, cases = setup(args.model, args.editor, 2, args.threads, args.device)
        result = {"model": args.model, "editor": args.editor, "torch": torch.__version__, "device": args.device,
                  "case": cases[1].case_id,
                  **operator_calls_of_a_case(bundle, editor, data, cases[1], args.model, args.editor)}
        write(result, args.json)
        return
    if args.only_packing:
        result = {"model": args.model, "torch": torch.__version__,
                  "packing": packing(args.model, args.editor, ks, args.packing_cases, args.device)}
        print(json.dumps(result, indent=2), flush=True)
        write(result, args.json)
        return

    result: dict[str, Any] = {"model": args.model, "editor": args.editor, "torch": torch.__version__,
                              "cpu_count": os.cpu_count(), "threads": args.threads}
    bundle, editor, data, cases = setup(args.model, args.editor, max(args.cases + 1, args.scoring_cases),
                                        args.threads)
    result["scoring"] = scoring_full_against_target_positions(bundle, cases[:args.scoring_cases])
    print(json.dumps(result["scoring"], indent=2), flush=True)
    result["generation"] = generation_cached_against_recomputed(bundle, cases[:args.scoring_cases])
    print(json.dumps(result["generation"], indent=2), flush=True)
    if args.only_scoring:
        write(result, args.json)
        return
    cases = cases[:args.cases + 1]
    rates = result["matmul_flops"] = matmul_rate(args.threads)
    if args.only_matmul:
        write(result, args.json)
        return
    timings, flops = edit_seconds_and_flops(bundle, editor, cases[1:])
    floor = flops / rates["per_cpu_second"]  # CPU seconds of pure matmul arithmetic
    wall, cpu = statistics.median(t[0] for t in timings), statistics.median(t[1] for t in timings)
    result.update(edit_wall_seconds=[t[0] for t in timings], edit_cpu_seconds=[t[1] for t in timings],
                  edit_flops=flops, edit_floor_cpu_seconds=floor, edit_cpu_over_floor=cpu / floor,
                  edit_wall_over_best_wall_floor=wall / (flops / rates["per_wall_second_best"]))
    print(json.dumps(result, indent=2), flush=True)
    if not args.skip_phases:
        totals: dict[str, float] = defaultdict(float)
        cfg = RunConfig(editor=args.editor, model=args.model, device="cpu", ppl_texts=8)
        pool = run_module.CorruptionPool.from_cases(data.cases)
        start = time.process_time()
        with phase_timer(totals):
            run_module.run_case(bundle, editor, cases[1], pool, cfg, Path(tempfile.mkdtemp(prefix="throughput-")))
        result["case_cpu_seconds"] = time.process_time() - start
        result["phase_cpu_seconds"] = {PHASES[k]: round(v, 2) for k, v in totals.items()}
        print(json.dumps(result["phase_cpu_seconds"], indent=2), flush=True)
    if not args.skip_scaling:
        n = 2 * args.cases
        result["scaling"] = [cases_per_second(args.model, args.editor, n, 2, 1),
                             cases_per_second(args.model, args.editor, n, 1, 2)]
        result["two_workers_over_two_threads"] = (result["scaling"][0]["cases_per_second"]
                                                  / result["scaling"][1]["cases_per_second"])
    if args.packing:
        result["packing"] = packing(args.model, args.editor, ks, args.packing_cases, args.device)
    write(result, args.json)


def write(result: dict[str, Any], path: str | None) -> None:
    print(json.dumps(result, indent=2))
    if path:
        write_json(path, result)


if __name__ == "__main__":
    main()
