"""`python -m bench`: one registry of subcommands (run, leaderboard, list, and every `bench/cmd_<name>.py`)."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bench.signals import interrupt_on_sigterm, signal_name
from lmview.models import DEFAULT_MODEL
from lmview.registry import Registry

log = logging.getLogger("bench")


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one `error:` line (exit 2), like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {self.prog.removeprefix('python -m ')}: {message}", file=sys.stderr)
        raise SystemExit(2)


# (smallest, largest) allowed value of every numeric option, by its dest; None: unbounded
NUMERIC_RANGES: dict[str, tuple[float | None, float | None]] = {
    "n": (1, None), "seed": (0, 2**32 - 1), "top_n": (1, None), "batch_size": (1, None), "eval_every": (1, None),
    "eval_sample": (0, None), "ppl_texts": (0, None), "known_top_k": (0, None), "validation_fraction": (0.0, 1.0),
    "max_validation": (1, None), "max_test": (1, None), "random_draws": (1, None), "samples": (1, None),
    "window": (1, None), "noise_texts": (1, None), "shots": (0, None), "workers": (1, None),
    "workers_per_gpu": (1, None), "threads_per_worker": (1, None), "start_timeout": (1, None),
    "n_facts": (1, None), "scan": (1, None), "min_share": (0.0, 1.0), "min_attention": (0.0, 1.0),
    "min_dla_fraction": (0.0, 1.0), "acdc_threshold": (0.0, None), "acdc_batch": (1, None),
}


def check_ranges(args: argparse.Namespace) -> None:
    """Every numeric option within its range, or one error naming the option and its range."""
    for dest, value in vars(args).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or dest not in NUMERIC_RANGES:
            continue
        low, high = NUMERIC_RANGES[dest]
        if (low is not None and value < low) or (high is not None and value > high) or value != value:
            bounds = (f"between {low} and {high}" if low is not None and high is not None
                      else f"at least {low}" if low is not None else f"at most {high}")
            raise ValueError(f"--{dest.replace('_', '-')} must be {bounds}; got {value}")


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m bench", description="Knowledge-editing benchmark harness")
    sub = parser.add_subparsers(dest="command", required=True)
    for entry in COMMANDS.entries():
        COMMANDS.get(entry.name).add_arguments(sub.add_parser(entry.name, help=entry.description))
    return parser


def _run_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--editor", default=None, help="registered editor name (see `list editors`); required")
    run.add_argument("--resume", default=None, metavar="RUN_DIR",
                     help="continue a killed or interrupted run in RUN_DIR (its manifest gives the configuration)")
    run.add_argument("--model", default=DEFAULT_MODEL, help=f"model name, hub id or HF directory (default {DEFAULT_MODEL})")
    run.add_argument("--dataset", default="facts", help="dataset name or path (default: the built-in facts)")
    run.add_argument("--n", type=int, default=None, help="number of cases to edit")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="auto", help="auto, cpu or cuda")
    run.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    run.add_argument("--output", default="runs", help="folder for run folders (default runs/)")
    run.add_argument("--hparams", default=None, help="a YAML file overriding the editor's default hyperparameters")
    run.add_argument("--no-circuits", action="store_true", help="skip circuit discovery")
    run.add_argument("--no-generation", action="store_true",
                     help="skip the free-generation metrics (greedy continuations: most of a case's scoring time on "
                          "a CPU), e.g. for long --sequential streams, whose curve does not use them")
    run.add_argument("--top-n", type=int, default=None, help="edges kept in each circuit")
    run.add_argument("--known-only", action="store_true",
                     help="edit only facts whose greedy first token is target_true before the edit (the harness's "
                          "filter; reported as its own leaderboard row). Default: every valid record, as ROME, "
                          "MEMIT and EasyEdit evaluate")
    run.add_argument("--all-cases", action="store_true",
                     help="every valid record is edited by default; accepted for older scripts, no effect")
    run.add_argument("--graph", choices=["ungrouped", "grouped"], default="ungrouped",
                     help="circuit graph: one k/v receiver per query head as EAP-IG and MIB (ungrouped, default) "
                          "or one per key/value group (grouped)")
    run.add_argument("--ablation", choices=["corrupted", "zero", "mean"], default="corrupted",
                     help="what edges outside a circuit carry: the corrupted prompt's activations (default), zero, "
                          "or the mean over the case's clean prompts")
    run.add_argument("--metric", choices=["logprob", "logit-diff", "match-nll"], default="logprob",
                     help="circuit metric: log-prob of the answer (default), logit difference to the corrupted "
                          "answer, or KC's match-NLL")
    run.add_argument("--save-scores", action="store_true",
                     help="also save every edge's score beside the pre/post circuits (<case>.pre.scores.pt, ~1 MB "
                          "each on SmolLM2), for `bench circuit-export` to MIB's format")
    run.add_argument("--relation-circuits", action="store_true",
                     help="also rediscover each case's relation circuit after the edit: overlap and Hit@10 change")
    run.add_argument("--batch-size", type=int, default=1,
                     help="cases edited together: one apply for batched editors, one per case otherwise (default 1)")
    run.add_argument("--sequential", action="store_true",
                     help="edits accumulate over the run (no restore between cases); writes sequential.jsonl")
    run.add_argument("--eval-every", type=int, default=None,
                     help="with --sequential: re-score all edits so far after every k edits (default 5)")
    run.add_argument("--eval-sample", type=int, default=0,
                     help="with --sequential: each curve point re-scores a fixed seeded sample of K cases, those "
                          "of them edited so far (default 0: every case so far)")
    run.add_argument("--ppl-texts", type=int, default=8,
                     help="held-out Wikipedia texts for the per-case ppl_pre/ppl_post (0: off; default 8)")


def _leaderboard_arguments(board: argparse.ArgumentParser) -> None:
    board.add_argument("--runs", default="runs")
    board.add_argument("--output", default=None, help="write the leaderboard here instead of stdout")
    board.add_argument("--format", choices=["md", "json", "csv"], default="md", help="output format (default md)")
    board.add_argument("--plots", default=None, help="also write PNG charts to this folder")
    board.add_argument("--include-partial", action="store_true",
                       help="also show interrupted, failed and killed runs, marked partial (default: complete runs only)")


def _list_arguments(lister: argparse.ArgumentParser) -> None:
    lister.add_argument("what", choices=["editors", "models", "datasets"])


RUN_DEFAULTS = {"model": DEFAULT_MODEL, "dataset": "facts", "n": None, "seed": 0, "device": "auto",
                "dtype": "float32", "hparams": None, "top_n": None, "batch_size": 1, "eval_every": None,
                "eval_sample": 0, "ppl_texts": 8, "graph": "ungrouped", "ablation": "corrupted", "metric": "logprob"}


def _run_config(args: argparse.Namespace):
    from bench.run import RunConfig
    from circuits.circuit import DEFAULT_TOP_N

    if args.editor is None:
        raise ValueError("run needs --editor NAME (or --resume RUN_DIR)")
    if args.eval_every is not None and not args.sequential:
        raise ValueError("--eval-every needs --sequential")
    if args.eval_sample and not args.sequential:
        raise ValueError("--eval-sample needs --sequential")
    return RunConfig(editor=args.editor, model=args.model, dataset=args.dataset, n=args.n, seed=args.seed,
                     device=args.device, dtype=args.dtype, output=args.output, hparams=args.hparams,
                     circuits=not args.no_circuits, generation=not args.no_generation,
                     top_n=args.top_n or DEFAULT_TOP_N, only_known=args.known_only,
                     batch_size=args.batch_size, sequential=args.sequential, relation_circuits=args.relation_circuits,
                     eval_every=5 if args.eval_every is None else args.eval_every, eval_sample=args.eval_sample,
                     ppl_texts=args.ppl_texts,
                     graph=args.graph, ablation=args.ablation, metric=args.metric, save_scores=args.save_scores)


def _given_options(args: argparse.Namespace) -> dict:
    """The run options set on the command line (not left at their defaults), as RunConfig fields."""
    given = {key: getattr(args, key) for key, default in RUN_DEFAULTS.items() if getattr(args, key) != default}
    given.update({"editor": args.editor} if args.editor else {})
    flags = {"no_circuits": ("circuits", False), "no_generation": ("generation", False),
             "known_only": ("only_known", True), "sequential": ("sequential", True),
             "relation_circuits": ("relation_circuits", True), "save_scores": ("save_scores", True)}
    given.update({name: value for flag, (name, value) in flags.items() if getattr(args, flag)})
    return given


def _cmd_run(args: argparse.Namespace) -> int:
    from bench.leaderboard import render
    from bench.run import run

    if args.resume:
        from bench.run import resume_config

        run_dir, summary = run(resume_config(Path(args.resume), _given_options(args)), resume=Path(args.resume))
    else:
        run_dir, summary = run(_run_config(args))
    print(f"results: {run_dir}")
    status = summary.get("status", "complete")
    if status == "failed":
        print(f"error: run failed: {summary.get('error')} (run folder {run_dir})", file=sys.stderr)
        return 1
    print(render([summary]))
    if status == "interrupted":
        stopped_by = summary.get("signal", "SIGINT")
        print(f"interrupted by {stopped_by}: the summary covers {summary.get('n_cases', 0) + summary.get('n_failed', 0)} "
              f"of {summary.get('n_planned')} cases (partial); continue with: python -m bench run --resume {run_dir}",
              file=sys.stderr)
        return 143 if stopped_by == "SIGTERM" else 130
    return 0


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from bench.leaderboard import main as leaderboard_main

    return leaderboard_main(args)


def _cmd_list(args: argparse.Namespace) -> int:
    if args.what == "editors":
        from editors.base import EDITORS
        from lmview.registry import first_doc_line

        for entry in EDITORS.entries():
            text = (first_doc_line(EDITORS.get(entry.name)) if entry.installed else
                    f"{entry.description}: not installed (needs {', '.join(entry.missing())}); {entry.install}")
            print(f"{entry.name:16s} {text}")
    elif args.what == "models":
        from lmview.models import MODELS, OTHER_MODELS

        for entry in MODELS.entries():
            print(f"{entry.name:22s} {entry.description}")
        print(f"{'<hub id or local dir>':22s} {OTHER_MODELS}")
    else:
        from bench.data import dataset_descriptions
        from bench.lre import relation_names

        for name, text in dataset_descriptions().items():
            print(f"{name:16s} {text}")
        relations = relation_names()
        print(f"{'':16s} relations: {', '.join(relations) if relations else '(none found under ../shared/data/lre)'}")
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    from editors.base import EditorError
    from lmview.cache import FetchError
    from lmview.case import DatasetError
    from lmview.models import ModelError

    errors: list[type[BaseException]] = [FetchError, DatasetError, ModelError, EditorError, ValueError, OSError]
    try:
        from lmview.corpus import CorpusError

        errors.append(CorpusError)
    except ImportError:
        pass
    return tuple(errors)


@dataclass(frozen=True)
class Command:
    """A subcommand: what a `bench/cmd_<name>.py` module defines (NAME, HELP, add_arguments, main)."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    main: Callable[[argparse.Namespace], int]


def _discover_commands(registry: Registry[Any]) -> None:
    """The built-in commands, then every `bench/cmd_<name>.py` module."""
    import bench

    registry.add("run", Command(_run_arguments, _cmd_run),
                 "edit facts, score them, and find their circuits before and after")
    registry.add("leaderboard", Command(_leaderboard_arguments, _cmd_leaderboard),
                 "render the leaderboard from run folders")
    registry.add("list", Command(_list_arguments, _cmd_list), "list editors, models or datasets")
    for info in pkgutil.iter_modules(bench.__path__):
        if info.name.startswith("cmd_"):
            module = importlib.import_module(f"bench.{info.name}")
            registry.add(module.NAME, module, module.HELP)


COMMANDS: Registry[Any] = Registry("command", discover=_discover_commands)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        check_ranges(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command in ("run", "sweep"):
        interrupt_on_sigterm()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "transformer_lens", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return COMMANDS.get(args.command).main(args)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        stopped_by = signal_name(exc)
        print(f"interrupted by {stopped_by}", file=sys.stderr)
        return 143 if stopped_by == "SIGTERM" else 130


if __name__ == "__main__":
    raise SystemExit(main())
