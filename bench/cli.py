"""`python -m bench`: run, leaderboard, list."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bench.models import DEFAULT_MODEL

log = logging.getLogger("bench")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Knowledge-editing benchmark harness")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="edit facts, score them, and find their circuits before and after")
    run.add_argument("--editor", required=True, help="registered editor name (see `list editors`)")
    run.add_argument("--model", default=DEFAULT_MODEL, help=f"model name, hub id or HF directory (default {DEFAULT_MODEL})")
    run.add_argument("--dataset", default="facts", help="dataset name or path (default: the built-in facts)")
    run.add_argument("--n", type=int, default=None, help="number of cases to edit")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="auto", help="auto, cpu or cuda")
    run.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    run.add_argument("--output", default="runs", help="folder for run folders (default runs/)")
    run.add_argument("--hparams", default=None, help="a YAML file overriding the editor's default hyperparameters")
    run.add_argument("--no-circuits", action="store_true", help="skip circuit discovery")
    run.add_argument("--top-n", type=int, default=None, help="edges kept in each circuit")
    run.add_argument("--all-cases", action="store_true", help="also edit facts the model does not know")

    board = sub.add_parser("leaderboard", help="render the leaderboard from run folders")
    board.add_argument("--runs", default="runs")
    board.add_argument("--output", default=None, help="write markdown here instead of stdout")

    lister = sub.add_parser("list", help="list editors, models or datasets")
    lister.add_argument("what", choices=["editors", "models", "datasets"])
    for name, module in plugin_commands().items():
        module.add_arguments(sub.add_parser(name, help=module.HELP))
    return parser


def plugin_commands() -> dict:
    """Commands in `bench/cmd_<name>.py` modules: each defines NAME, HELP, add_arguments(parser) and main(args)."""
    import importlib
    import pkgutil

    import bench

    found = {}
    for info in sorted(pkgutil.iter_modules(bench.__path__), key=lambda i: i.name):
        if info.name.startswith("cmd_"):
            module = importlib.import_module(f"bench.{info.name}")
            found[module.NAME] = module
    return found


def _cmd_run(args: argparse.Namespace) -> int:
    from bench.leaderboard import render
    from bench.run import RunConfig, run
    from circuits.circuit import DEFAULT_TOP_N

    if args.n is not None and args.n < 1:
        raise ValueError("--n must be at least 1")
    cfg = RunConfig(editor=args.editor, model=args.model, dataset=args.dataset, n=args.n, seed=args.seed,
                    device=args.device, dtype=args.dtype, output=args.output, hparams=args.hparams,
                    circuits=not args.no_circuits, top_n=args.top_n or DEFAULT_TOP_N, only_known=not args.all_cases)
    run_dir, summary = run(cfg)
    print(f"results: {run_dir}")
    print(render([summary]))
    return 0 if summary["n_cases"] > 0 else 1


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from bench.leaderboard import leaderboard

    runs = Path(args.runs)
    if not runs.is_dir():
        raise ValueError(f"runs folder '{runs}' does not exist")
    text = leaderboard(runs)
    if args.output:
        command = f"python -m bench leaderboard --runs {args.runs} --output {args.output}"
        header = (f"# Leaderboard\n\nGenerated from the run folders in `{args.runs}` by `{command}`. "
                  "Each row is the latest run of an (editor, model, dataset); the columns are defined in "
                  "the README's Metrics section.\n\n")
        Path(args.output).write_text(header + text + "\n")
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    if args.what == "editors":
        from editors.base import registry

        for name, cls in registry().items():
            doc = (cls.__doc__ or "").strip().splitlines()
            print(f"{name:12s} {doc[0] if doc else ''}")
    elif args.what == "models":
        from bench.models import MODELS_HELP

        for name, text in MODELS_HELP.items():
            print(f"{name:22s} {text}")
    else:
        from bench.data import DATASETS

        for name in DATASETS:
            print(name)
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    from bench.cache import FetchError
    from bench.data import DatasetError
    from bench.models import ModelError
    from editors.base import EditorError

    errors: list[type[BaseException]] = [FetchError, DatasetError, ModelError, EditorError, ValueError, OSError]
    try:
        from bench.corpus import CorpusError

        errors.append(CorpusError)
    except ImportError:
        pass
    return tuple(errors)


def _interrupt_on_sigterm() -> None:
    """SIGTERM (a CI timeout, `kill`) stops a run like Ctrl-C: the finished cases are summarised."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        _interrupt_on_sigterm()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "transformer_lens", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    commands = {"run": _cmd_run, "leaderboard": _cmd_leaderboard, "list": _cmd_list}
    commands.update({name: module.main for name, module in plugin_commands().items()})
    try:
        return commands[args.command](args)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
