"""Spine benchmark: key-statistics build time, seconds per ROME edit, seconds per EAP circuit, and
EAP's wall time as a multiple of one plain forward+backward pass on the same batch.

    python benchmarks/spine.py --model smollm2-135m --device cpu --n 5 --json benchmarks/results/spine-cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.corrupt import circuit_batch
from bench.data import load_dataset
from bench.run import restore, select_cases, sync
from circuits.activations import answer_logprob
from circuits.attribute import eap_scores
from circuits.circuit import discover
from circuits.graph import Graph
from editors.base import get_editor, load_hparams
from editors.keystats import _cache_path, second_moment
from lmview.arch import backup
from lmview.io import write_json
from lmview.models import load_model


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def plain_forward_backward(bundle, batch) -> None:
    """One HF forward on the clean batch and one backward of the same metric to the embeddings."""
    embeds = bundle.model.get_input_embeddings()(batch.clean_ids).detach().requires_grad_(True)
    with torch.enable_grad():
        logits = bundle.model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
        answer_logprob(logits, batch).sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-stats", action="store_true", help="reuse cached statistics instead of timing a rebuild")
    parser.add_argument("--skip-edits", action="store_true", help="time circuits only (no ROME edits)")
    parser.add_argument("--all-cases", action="store_true", help="do not filter to known facts (random-init models)")
    parser.add_argument("--stats-samples", type=int, default=None, help="override mom2_n_samples")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    bundle = load_model(args.model, args.device)
    dev = bundle.device
    hparams, _ = load_hparams("rome", args.model, bundle.arch.family)
    layer = hparams["layers"][0]
    if args.stats_samples:
        hparams["mom2_n_samples"] = args.stats_samples
    stats_args = dict(corpus=hparams.get("mom2_dataset", "wikipedia"), n_samples=hparams["mom2_n_samples"],
                      max_len=hparams.get("mom2_max_len", 128))
    results: dict = {"model": args.model, "device": str(dev), "torch": torch.__version__,
                     "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                     "threads": torch.get_num_threads()}

    if not args.skip_stats:
        from lmview.corpus import load_corpus

        _, identity = load_corpus(stats_args["corpus"])
        cached = _cache_path(bundle, layer, identity, stats_args["n_samples"], stats_args["max_len"])
        cached.unlink(missing_ok=True)
        results["stats_seconds"] = timed(lambda: second_moment(bundle, layer, **stats_args), dev)
        results["stats_meta"] = json.loads(cached.with_suffix(".json").read_text())

    data = load_dataset("facts")
    cases, _ = select_cases(bundle, data, args.n, only_known=not args.all_cases)
    editor = get_editor("rome")(bundle, hparams)
    edit_times = []
    for i, case in enumerate([] if args.skip_edits else cases):
        saved = backup(bundle.model, editor.parameters_to_touch([case]))
        seconds = timed(lambda: editor.apply([case]), dev)
        restore(bundle.model, saved)
        if i > 0 or len(cases) == 1:  # the first edit also samples the context prefixes and loads C
            edit_times.append(seconds)
    results["rome_seconds_per_edit"] = statistics.median(edit_times) if edit_times else None

    graph = Graph(bundle.arch.n_layers, bundle.arch.n_heads, bundle.arch.n_kv_heads)
    pool = sorted({c.subject for c in data.cases})
    bridge = bundle.bridge()
    eap_t, fb_t, circuit_t, shapes = [], [], [], []
    for case in cases:
        batch = circuit_batch(bundle.tokenizer, case, case.target_true, pool, dev)
        if batch is None:
            continue
        shapes.append(list(batch.clean_ids.shape))
        eap_scores(bridge, bundle.model, bundle.arch, graph, batch)  # warm-up
        plain_forward_backward(bundle, batch)
        eap_t.append(statistics.median(timed(lambda: eap_scores(bridge, bundle.model, bundle.arch, graph, batch), dev)
                                       for _ in range(args.repeats)))
        fb_t.append(statistics.median(timed(lambda: plain_forward_backward(bundle, batch), dev)
                                      for _ in range(args.repeats)))
        circuit_t.append(timed(lambda: discover(bridge, bundle.model, bundle.arch, batch, case.target_true), dev))
    ratios = [e / f for e, f in zip(eap_t, fb_t)]
    results.update(
        batch_shapes=shapes, n_graph_edges=graph.n_edges,
        eap_seconds=statistics.median(eap_t), forward_backward_seconds=statistics.median(fb_t),
        eap_over_forward_backward=statistics.median(ratios),
        circuit_seconds_with_faithfulness=statistics.median(circuit_t),
    )
    print(json.dumps(results, indent=2))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
