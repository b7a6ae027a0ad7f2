"""`python -m bench trace`: causal tracing (Meng et al. 2022, §2.1) of facts, to choose the layers to edit.

Writes to --output: trace.json (every fact's indirect-effect array per kind, the per-token-group averages
and the per-layer curve of the last subject token), heatmap-<kind>.png per kind, and
last-subject-by-layer.png. See bench/tracing.py for the method.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from bench.plotting import pyplot, save_figure
from lmview.models import DEFAULT_MODEL

NAME = "trace"
HELP = "causal tracing: indirect effect of each (token, layer) state, as heatmaps and a per-layer curve"
COLORMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
LABELS = {"hidden": "hidden state (block output)", "mlp": "MLP output", "attn": "attention output"}

log = logging.getLogger("bench")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model name, hub id or HF directory (default {DEFAULT_MODEL})")
    parser.add_argument("--dataset", default="facts", help="facts to trace: dataset name or path (default facts)")
    parser.add_argument("--prompt", default=None,
                        help="trace this prompt instead of a dataset (needs --subject and --answer)")
    parser.add_argument("--subject", default=None, help="with --prompt: the subject, as it appears in the prompt")
    parser.add_argument("--answer", default=None, help="with --prompt: the answer whose probability is traced")
    parser.add_argument("--n", type=int, default=4, help="facts the model knows to trace from --dataset (default 4)")
    parser.add_argument("--samples", type=int, default=10, help="noise samples per fact (default 10, as the paper)")
    parser.add_argument("--window", type=int, default=10, help="layers restored together for mlp/attn (default 10)")
    parser.add_argument("--kinds", default="hidden,mlp,attn", help="comma-separated: hidden, mlp, attn")
    parser.add_argument("--noise-texts", type=int, default=100,
                        help="Wikipedia texts whose token embeddings set the noise level ν = 3·std (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--output", default=None, help="output folder (default traces/<model>)")


def _facts(args: argparse.Namespace, bundle) -> list[tuple[str, str, str]]:
    """(prompt, subject, answer) triples: the --prompt one, or the first --n known facts of --dataset."""
    if args.prompt is not None:
        return [(args.prompt, args.subject, args.answer)]
    from bench.data import load_dataset
    from bench.run import select_cases

    cases, _ = select_cases(bundle, load_dataset(args.dataset), args.n, only_known=True)
    if not cases:
        raise ValueError(f"the model knows none of the facts in '{args.dataset}' (greedy answer ≠ target_true)")
    return [(c.rewrite_prompt, c.subject, c.target_true) for c in cases]


def _check(args: argparse.Namespace) -> tuple[str, ...]:
    from bench.tracing import KINDS

    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown --kinds {','.join(bad) or '(none)'}; valid: {', '.join(KINDS)}")
    if args.prompt is not None:
        if not args.subject or not args.answer:
            raise ValueError("--prompt needs --subject and --answer")
        if args.subject not in args.prompt:
            raise ValueError(f"--subject {args.subject!r} does not occur in --prompt {args.prompt!r}")
    elif args.subject or args.answer:
        raise ValueError("--subject and --answer go with --prompt")
    for flag, value in (("--n", args.n), ("--samples", args.samples), ("--window", args.window),
                        ("--noise-texts", args.noise_texts)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1")
    return kinds


def main(args: argparse.Namespace) -> int:
    from bench.tracing import (CATEGORIES, NOISE_SCALE, average_by_category, embedding_noise_std,
                               last_subject_curve, trace_fact)
    from lmview.corpus import wiki_texts
    from lmview.models import load_model

    kinds = _check(args)
    bundle = load_model(args.model, args.device)
    facts = _facts(args, bundle)
    noise_std = embedding_noise_std(bundle.model, bundle.tokenizer, wiki_texts()[0][: args.noise_texts])
    out = Path(args.output or Path("traces") / args.model.rstrip("/").split("/")[-1])
    out.mkdir(parents=True, exist_ok=True)
    log.info("trace: %d fact(s) on %s, %d noise samples, ν = %.4f", len(facts), args.model, args.samples, noise_std)
    start = time.perf_counter()
    traces = []
    for prompt, subject, answer in facts:
        traces.append(trace_fact(bundle.model, bundle.arch, bundle.tokenizer, prompt, subject, answer, noise_std,
                                 args.samples, args.window, args.seed, kinds))
        log.info("trace: %r -> %r  P clean %.3f, corrupted %.3f", prompt, answer, traces[-1].p_clean,
                 traces[-1].p_corrupted)
    curves = {kind: last_subject_curve(traces, kind) for kind in kinds}
    report = {
        "model": bundle.provenance, "method": "causal tracing, Meng et al. 2022 §2.1",
        "noise_std": noise_std, "noise_rule": f"{NOISE_SCALE} x std of token embeddings of {args.noise_texts} "
                                              "Wikipedia texts", "samples": args.samples, "window": args.window,
        "seed": args.seed, "seconds": round(time.perf_counter() - start, 1), "kinds": list(kinds),
        "facts": [t.to_dict() for t in traces],
        "average_by_token_group": {"groups": list(CATEGORIES),
                                   **{kind: average_by_category(traces, kind) for kind in kinds}},
        "last_subject_by_layer": curves,
        "peak_layers": {kind: sorted(range(len(c)), key=lambda layer: -c[layer])[:3] for kind, c in curves.items()},
    }
    (out / "trace.json").write_text(json.dumps(report, indent=1) + "\n")
    for kind in kinds:
        _heatmap(out / f"heatmap-{kind}.png", traces, kind, report["average_by_token_group"][kind], args.model)
    _curves(out / "last-subject-by-layer.png", curves, args.model, len(traces))
    print(f"wrote {out}/trace.json, heatmaps and last-subject-by-layer.png")
    for kind, layers in report["peak_layers"].items():
        curve = curves[kind]
        print(f"{kind:6s} last-subject AIE peaks at layers {layers}: "
              + ", ".join(f"{layer}: {curve[layer]:.4g}" for layer in layers))
    return 0


def _heatmap(path: Path, traces, kind: str, grouped: list[list[float] | None], model: str) -> None:
    """One fact: its tokens by layers. Several facts: the paper's token groups by layers (AIE)."""
    import matplotlib.ticker
    import numpy as np

    from bench.tracing import CATEGORIES

    if len(traces) == 1:
        trace = traces[0]
        matrix = np.array(trace.effects[kind])
        start, end = trace.subject_range
        labels = [f"{tok!r}*" if start <= i < end else repr(tok) for i, tok in enumerate(trace.tokens)]
        title = f"IE of {LABELS[kind]}: {trace.prompt!r} -> {trace.answer!r}"
    else:
        keep = [i for i, row in enumerate(grouped) if row is not None]
        matrix = np.array([grouped[i] for i in keep])
        labels = [CATEGORIES[i] for i in keep]
        title = f"AIE of {LABELS[kind]} over {len(traces)} facts"
    fig, ax = pyplot().subplots(figsize=(max(6.0, 0.25 * matrix.shape[1] + 3), 0.4 * len(labels) + 1.8))
    image = ax.imshow(matrix, cmap=COLORMAPS[kind], aspect="auto", vmin=min(0.0, float(matrix.min())))
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.colorbar(image, ax=ax, label="P(answer) restored − corrupted")
    xlabel = "layer" + ("" if kind == "hidden" else " (centre of a window of restored layers)")
    save_figure(fig, path, ax=ax, xlabel=xlabel, title=f"{model}: {title}", title_size=9, dpi=120)


def _curves(path: Path, curves: dict[str, list[float]], model: str, n_facts: int) -> None:
    import matplotlib.ticker

    fig, ax = pyplot().subplots(figsize=(7, 3.5))
    colours = {"hidden": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}
    for kind, curve in curves.items():
        ax.plot(range(len(curve)), curve, marker=".", color=colours[kind], label=LABELS[kind])
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    save_figure(fig, path, ax=ax, xlabel="layer", ylabel="AIE at the last subject token",
                title=f"{model}: average indirect effect, last subject token ({n_facts} facts)", title_size=9,
                legend_size=8, dpi=120)
