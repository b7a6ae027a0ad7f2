"""`python -m bench tune --editor E --model M`: a small declared grid searched on the built-in facts' dev split.

Every grid point is the editor's hyperparameters (its file for the model, or --hparams) with the point's values
substituted; each point edits the same dev cases (`facts:dev`, disjoint from the `facts` test split that
`bench run` and the leaderboard report; see bench/data.py SPLIT_RULE), one at a time (or in groups of --batch-size) with a restore in
between, and is scored with `bench run`'s post-edit CounterFact scores (ES, PS, NS, and ROME's score S, their
harmonic mean; a failed case counts 0) and the held-out perplexity before and after. A point collapses when the mean perplexity ratio after/before exceeds
COLLAPSE_PPL_RATIO or is not finite. The chosen point is the non-collapsed one with the highest S (ties: the
higher ES, then grid order); when every point collapses the highest S is still written, marked so.

The grid is a YAML mapping of hyperparameter -> list of values (--grid, else editors/hparams/<editor>/
tune-grid.yaml). `--trace-layer` instead takes the edited layer from a causal trace of the dev facts (the MLP
curve's peak at the last subject token, as the ROME paper picks its layer) and adds it as `layers: [[L]]`.

The output YAML holds the chosen hyperparameters; its comment header records the command, the model, the
split, the grid and every point's scores.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import shlex
from pathlib import Path
from typing import Any

import yaml

from lmview.models import DEFAULT_MODEL

NAME = "tune"
HELP = "search a small hyperparameter grid on the dev split of the built-in facts and write the chosen YAML"
COLLAPSE_PPL_RATIO = 10.0
MAX_POINTS = 64
DEV_DATASET = "facts:dev"

log = logging.getLogger("bench")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--editor", required=True, help="registered editor name")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL})")
    parser.add_argument("--grid", default=None,
                        help="YAML mapping hyperparameter -> list of values (default editors/hparams/<editor>/tune-grid.yaml)")
    parser.add_argument("--hparams", default=None, help="the base YAML (default: the editor's file for the model)")
    parser.add_argument("--n", type=int, default=6, help="dev cases edited per grid point (default 6)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="dev cases edited together, one apply per group (batched editors; default 1: each alone)")
    parser.add_argument("--ppl-texts", type=int, default=4,
                        help="held-out Wikipedia texts for the perplexity ratio (default 4; 0: off)")
    parser.add_argument("--trace-layer", action="store_true",
                        help="add the MLP causal-trace peak layer of the dev facts to the grid's `layers`")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="the YAML to write (default tuned/<editor>-<model>.yaml)")


def read_grid(path: Path) -> dict[str, list[Any]]:
    if not path.is_file():
        raise ValueError(f"grid file {path} does not exist")
    try:
        grid = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"{path}: a grid is a mapping of hyperparameter -> non-empty list of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: grid entry '{key}' must be a non-empty list of values")
    return grid


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    if len(points) > MAX_POINTS:
        raise ValueError(f"the grid has {len(points)} points; at most {MAX_POINTS}")
    return points


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def point_scores(records: list[dict[str, Any]]) -> dict[str, Any]:
    """ES, PS, NS (a failed case counts 0), ROME's S, and the perplexity ratio, over one point's cases."""
    from bench.scoring import harmonic_mean

    def rate(key: str) -> float:
        return mean([float((r.get("post") or {}).get(key) or 0.0) if r.get("status") == "ok" else 0.0
                     for r in records]) or 0.0

    out: dict[str, Any] = {"ES": rate("efficacy_score"), "PS": rate("paraphrase_score"),
                           "NS": rate("neighborhood_score"),
                           "n_failed": sum(r.get("status") != "ok" for r in records)}
    out["S"] = harmonic_mean([out["ES"], out["PS"], out["NS"]])
    ratios = [r["ppl_post"] / r["ppl_pre"] for r in records if r.get("ppl_pre") and r.get("ppl_post") is not None]
    out["ppl_ratio"] = mean(ratios)
    failed_weights = any("NaN" in str(r.get("reason", "")) for r in records)
    out["collapsed"] = failed_weights or (out["ppl_ratio"] is not None and
                                          not (math.isfinite(out["ppl_ratio"]) and out["ppl_ratio"] <= COLLAPSE_PPL_RATIO))
    return out


def choose(scored: list[dict[str, Any]]) -> int:
    """Index of the chosen point: the best S among the non-collapsed ones (all, when every one collapses)."""
    eligible = [i for i, s in enumerate(scored) if not s["collapsed"]] or list(range(len(scored)))
    return min(eligible, key=lambda i: (-scored[i]["S"], -scored[i]["ES"], i))


def trace_peak_layer(bundle, cases, seed: int) -> int:
    """The layer where the dev facts' average MLP indirect effect at the last subject token peaks."""
    from bench.tracing import embedding_noise_std, last_subject_curve, trace_fact
    from lmview.corpus import wiki_texts

    noise = embedding_noise_std(bundle.model, bundle.tokenizer, wiki_texts()[0][:100])
    traces = [trace_fact(bundle.model, bundle.arch, bundle.tokenizer, c.rewrite_prompt, c.subject, c.target_true,
                         noise, 10, 10, seed, ("mlp",)) for c in cases]
    curve = last_subject_curve(traces, "mlp")
    return max(range(len(curve)), key=lambda layer: curve[layer])


def evaluate_point(bundle, editor, cases, texts, ppl_pre: float | None, batch_size: int = 1) -> list[dict[str, Any]]:
    """The cases edited in groups of `batch_size` (one apply per group; 1: each alone), restored after each
    group: every case's post-edit CounterFact scores (as `bench run` computes them) and the held-out perplexity
    after its group's edit. The pre-edit, generation and circuit measurements of `bench run` are skipped: the
    objective does not use them."""
    from bench.run import all_finite, apply_edits, held_out_perplexity, restore, touched_parameters
    from bench.scoring import case_target_nll, counterfact_scores
    from lmview.arch import backup

    model, tok, dev = bundle.model, bundle.tokenizer, bundle.device
    records = []
    for start in range(0, len(cases), batch_size):
        group = cases[start: start + batch_size]
        names = touched_parameters(editor, group)
        saved = backup(model, names)
        try:
            apply_edits(editor, group)
            if not all_finite(model, names):
                records += [{"case_id": c.case_id, "status": "failed", "reason": "NaN or inf weights"} for c in group]
                continue
            ppl_post = held_out_perplexity(bundle, texts)
            for case in group:
                post = counterfact_scores(case_target_nll(model, tok, editor.evaluation_case(case), dev))
                records.append({"case_id": case.case_id, "status": "ok", "post": post, "ppl_pre": ppl_pre,
                                "ppl_post": ppl_post})
        except (RuntimeError, ValueError, FloatingPointError) as exc:
            records += [{"case_id": c.case_id, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
                        for c in group]
        finally:
            restore(model, saved)
            editor.undo()
    return records


def command_line(args: argparse.Namespace) -> str:
    parts = ["python", "-m", "bench", "tune", "--editor", args.editor, "--model", args.model]
    batch = [("--batch-size", args.batch_size)] if args.batch_size != 1 else []
    for flag, value in (("--grid", args.grid), ("--hparams", args.hparams), ("--n", args.n), *batch,
                        ("--ppl-texts", args.ppl_texts), ("--seed", args.seed)):
        if value is not None:
            parts += [flag, str(value)]
    parts += ["--trace-layer"] if args.trace_layer else []
    return " ".join(shlex.quote(p) if " " in p else p for p in parts)


def header(args: argparse.Namespace, base_file: str, grid: dict[str, list[Any]], split: dict[str, Any],
           cases: list[str], points: list[dict[str, Any]], scored: list[dict[str, Any]], chosen: int) -> str:
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3g}"

    lines = [f"Tuned by: {command_line(args)}",
             f"Editor {args.editor} on model {args.model}; base hyperparameters: {base_file}.",
             f"Split: {DEV_DATASET} ({split.get('rule')}); {batching(args)}{len(cases)} dev cases: {', '.join(cases)}.",
             f"Grid ({len(points)} point{'' if len(points) == 1 else 's'}): {yaml.safe_dump(grid, default_flow_style=True).strip()}",
             f"Objective: ROME's S = harmonic mean of ES, PS, NS; a point collapses when ppl_post/ppl_pre > "
             f"{COLLAPSE_PPL_RATIO:g} ({args.ppl_texts} held-out texts) or the weights are not finite.",
             "Scores per point (ES PS NS S ppl_ratio):"]
    for i, (point, s) in enumerate(zip(points, scored)):
        mark = " <- chosen" if i == chosen else ""
        lines.append(f"  {yaml.safe_dump(point, default_flow_style=True).strip()}: {fmt(s['ES'])} {fmt(s['PS'])} "
                     f"{fmt(s['NS'])} {fmt(s['S'])} {fmt(s['ppl_ratio'])}{' collapsed' if s['collapsed'] else ''}{mark}")
    if all(s["collapsed"] for s in scored):
        lines.append("Every grid point collapses the model: the highest S is written, and it is a collapse.")
    if scored[chosen]["ES"] == 0:
        lines.append("The chosen point does not edit (ES 0 on the dev cases).")
    return "".join(f"# {line}\n" for line in lines)


def batching(args: argparse.Namespace) -> str:
    return f"edited in groups of {args.batch_size} (one apply each), " if args.batch_size > 1 else ""


def _check(args: argparse.Namespace) -> None:
    if args.n < 1:
        raise ValueError("--n must be at least 1")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if args.ppl_texts < 0:
        raise ValueError("--ppl-texts cannot be negative")


def main(args: argparse.Namespace) -> int:
    from bench.data import load_dataset
    from bench.run import held_out_perplexity, heldout_for_ppl, select_cases
    from editors.base import HPARAMS_DIR, HPARAMS_FOLDERS, get_editor, load_hparams, shown_path
    from lmview.models import load_model

    _check(args)
    cls = get_editor(args.editor)
    method = args.editor.split(":")[-1]
    grid_path = Path(args.grid) if args.grid else HPARAMS_DIR / HPARAMS_FOLDERS.get(method, method) / "tune-grid.yaml"
    if not args.grid and not grid_path.is_file():
        raise ValueError(f"no grid for '{args.editor}': pass --grid FILE (a YAML mapping hyperparameter -> values)")
    grid = read_grid(grid_path)
    data = load_dataset(DEV_DATASET)
    bundle = load_model(args.model, args.device)
    base, base_file = load_hparams(args.editor, args.model, bundle.arch.family, args.hparams)
    base_file = shown_path(base_file)
    cases, _ = select_cases(bundle, data, args.n, only_known=False)
    if args.trace_layer:
        layer = trace_peak_layer(bundle, cases, args.seed)
        log.info("tune: causal trace puts the MLP peak of the dev facts at layer %d", layer)
        layers = list(grid.get("layers", []))
        grid = {**grid, "layers": layers + [[layer]] if [layer] not in layers else layers}
    points = grid_points(grid)
    for point in points:  # bad values fail here, before any edit
        cls(bundle, {**base, **point})
    texts = heldout_for_ppl(args.ppl_texts)
    ppl_pre = held_out_perplexity(bundle, texts)
    scored = []
    for i, point in enumerate(points):
        editor = cls(bundle, {**base, **point})
        editor.observe_dataset(list(data.cases))
        scored.append(point_scores(evaluate_point(bundle, editor, cases, texts, ppl_pre, args.batch_size)))
        s = scored[-1]
        log.info("tune: point %d/%d %s: ES %.2f PS %.2f NS %.2f S %.2f ppl x%s%s", i + 1, len(points), point, s["ES"],
                 s["PS"], s["NS"], s["S"], "-" if s["ppl_ratio"] is None else f"{s['ppl_ratio']:.3g}",
                 " collapsed" if s["collapsed"] else "")
    chosen = choose(scored)
    out = Path(args.output or Path("tuned") / f"{args.editor.replace(':', '_')}-{args.model.rstrip('/').split('/')[-1]}.yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = header(args, base_file, grid, data.split or {}, [c.case_id for c in cases], points, scored, chosen)
    body = {**base, **points[chosen]}
    out.write_text(text + yaml.safe_dump(body, sort_keys=False, default_flow_style=None))
    print(text, end="")
    print(f"wrote {out}")
    return 0
