"""Circuit-discovery benchmark: time of EAP and EAP-IG as a multiple of one plain forward+backward pass
on the same batch, and their peak extra memory, on one relation's known facts.

Times are taken as both wall time and process CPU time, with the methods interleaved per repeat; the
reported ratios use CPU time, which on a single thread is the compute the method does and is not inflated
when other jobs share the machine (wall-time ratios are recorded too).

    OMP_NUM_THREADS=1 python benchmarks/circuits.py --model smollm2-135m --relation country_capital_city \
        --n 32 --json benchmarks/results/circuits-cpu.json

Prompts: the relation's templates (prompt_templates, then prompt_templates_zs) filled with its subjects, kept when the model's top next token is the
object's first token ("known"), each paired with a corrupted prompt that swaps in another subject of the
relation with the same token length (bench/corrupt.py). The forward+backward baseline is the Hugging Face
model on the clean batch with the attribution metric backpropagated to the input embeddings. Peak memory is
measured in a forked child per method: its ru_maxrss minus its resident size when it started, so the model
and the parent's allocations are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.corrupt import corrupted_prompt  # noqa: E402
from bench.lre import load_relation  # noqa: E402
from circuits.activations import PairBatch, answer_logprob  # noqa: E402
from circuits.attribute import eap_ig_scores, eap_scores  # noqa: E402
from circuits.graph import Graph  # noqa: E402
from lmview.io import write_json  # noqa: E402
from lmview.models import load_model  # noqa: E402
from lmview.tokens import prompt_ids, target_ids  # noqa: E402


def relation_batch(bundle, relation_name: str, n: int, seed: int, known_only: bool = True) -> tuple[PairBatch, dict]:
    """Up to n known facts of the relation (every fact with known_only False, e.g. for a tiny random model)
    with equal-length corruptions, as one right-padded batch."""
    relation = load_relation(relation_name)
    tok = bundle.tokenizer
    templates = [*relation.prompt_templates, *relation.prompt_templates_zs]
    facts = [(s, o, t.replace("{}", s)) for t in templates for s, o in relation.samples]
    known = []
    with torch.no_grad():
        for subject, obj, prompt in facts:
            ids = torch.tensor([prompt_ids(tok, prompt)], device=bundle.device)
            top = int(bundle.model(input_ids=ids).logits[0, -1].argmax())
            if top == target_ids(tok, obj)[0] or not known_only:
                known.append((subject, obj, prompt))
    rows = []
    for subject, obj, prompt in known:
        pool = sorted({s for s, o in relation.samples if o != obj and s != subject})
        corrupt = corrupted_prompt(tok, prompt, subject, pool, random.Random(f"{seed}:{prompt}"))
        if corrupt is not None:
            rows.append((prompt_ids(tok, prompt), corrupt, target_ids(tok, obj)[0]))
    if not rows:
        raise SystemExit(f"error: no {'known ' if known_only else ''}fact of {relation_name} has an equal-length "
                         "corruption")
    rows = rows[:n]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    info = {"relation": relation_name, "facts": len(facts), "known" if known_only else "kept (no known filter)": len(known),
            "used": len(rows)}
    return PairBatch.from_rows(rows, pad, bundle.device), info


def forward_backward(bundle, batch: PairBatch) -> None:
    """One HF forward on the clean batch and one backward of the metric to the input embeddings."""
    embeds = bundle.model.get_input_embeddings()(batch.clean_ids).detach().requires_grad_(True)
    with torch.enable_grad():
        logits = bundle.model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
        answer_logprob(logits, batch).sum().backward()


def seconds(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): with one thread, CPU time is robust to a shared machine.
    On CUDA the wall time is taken between device synchronisations."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def cuda_peak_extra_mib(fn: Callable[[], object]) -> float:
    """Peak CUDA memory that fn allocates above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - start) / 2**20


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def peak_extra_mib(fn: Callable[[], object]) -> float:
    """Peak resident memory that fn adds, measured in a forked child (Linux)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        start = rss_kib()
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        os.write(write, str(max(peak - start, 0)).encode())
        os._exit(0)
    os.close(write)
    data = os.read(read, 64)
    os.waitpid(pid, 0)
    return int(data) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--relation", default="country_capital_city")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG steps m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    bundle = load_model(args.model, args.device)
    batch, info = relation_batch(bundle, args.relation, args.n, args.seed)
    arch, bridge = bundle.arch, bundle.bridge()
    graph = Graph(arch.n_layers, arch.n_heads, arch.n_kv_heads)
    runs = {
        "forward_backward": lambda: forward_backward(bundle, batch),
        "eap": lambda: eap_scores(bridge, bundle.model, arch, graph, batch),
        "eap_ig": lambda: eap_ig_scores(bridge, bundle.model, arch, graph, batch, steps=args.steps),
    }
    for fn in runs.values():  # warm-up
        fn()
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit every method alike
        for name, fn in runs.items():
            w, c = seconds(fn, bundle.device)
            wall[name].append(w)
            cpu[name].append(c)
    ratios = {kind: {name: [t / f for t, f in zip(times[name], times["forward_backward"])] for name in ("eap", "eap_ig")}
              for kind, times in (("cpu", cpu), ("wall", wall))}
    basis = "wall" if bundle.device.type == "cuda" else "cpu"  # on a GPU the CPU time is only launch overhead
    delta_mib = graph.n_upstream * batch.clean_ids.numel() * arch.d_model * 4 / 2**20
    results = {
        "command": "OMP_NUM_THREADS=1 python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "model": args.model, "device": str(bundle.device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "data": info,
        "batch_shape": list(batch.clean_ids.shape), "n_graph_edges": graph.n_edges, "ig_steps": args.steps,
        "cpu_seconds": {name: {"median": statistics.median(t), "all": t} for name, t in cpu.items()},
        "wall_seconds": {name: {"median": statistics.median(t), "all": t} for name, t in wall.items()},
        "eap_over_forward_backward": statistics.median(ratios[basis]["eap"]),
        "eap_ig_over_forward_backward": statistics.median(ratios[basis]["eap_ig"]),
        "ratio_basis": (f"median of per-repeat {basis}-time ratios"
                        + (" (OMP_NUM_THREADS=1)" if basis == "cpu" else " (synchronised)") + "; both under ratios_all"),
        "ratios_all": ratios,
        "targets": {"eap": 2.5, "eap_ig": (args.steps + 1) * 1.3},
        "delta_tensor_mib": delta_mib,
    }
    if not args.no_memory and bundle.device.type == "cuda":  # forking after CUDA starts is unsafe
        results["peak_extra_cuda_mib"] = {name: cuda_peak_extra_mib(fn) for name, fn in runs.items()}
    elif not args.no_memory:
        results["peak_extra_rss_mib"] = {name: peak_extra_mib(fn) for name, fn in runs.items()}
    results["peak_rss_process_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(results, indent=2))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
