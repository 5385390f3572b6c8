"""The flags of `xfer runs` and the calls they make (kept out of :mod:`xfer.cli`).

xfer runs list [--model NAME] [--limit N | --all] [--config FILE] [key=value ...]
xfer runs show RUN | compare RUN RUN | promote RUN [--force] | rollback MODEL [--force]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of runs >= 1")
    return int(text)


def run(args: argparse.Namespace) -> int:
    """Load the config for its storage settings (no warning for the other sections: a
    training config serves), then list, show, compare, promote or roll back, riding out
    a store that is away for ``storage.outage_seconds`` like every command."""
    from xfer.config import load_config
    from xfer.store.retry import budget

    cfg = load_config(args.config, args.overrides)
    cfg.apply_storage_env()
    with budget(cfg.storage.outage_seconds):
        if args.verb in ("list", "show", "compare"):
            return _look_at_runs(args, cfg.storage.root)
        return _publish(args, cfg.storage.root)


def _look_at_runs(args: argparse.Namespace, root: str) -> int:
    from xfer.registry import runs

    if args.verb == "list":
        found = runs.find_runs(root, args.model, None if args.all else args.limit)
        print(runs.format_table(found.runs) if found.runs else f"no runs under {root}/runs")
        if runs.not_shown(found):  # on stderr: stdout stays one line per run
            print(runs.not_shown(found), file=sys.stderr)
    elif args.verb == "show":
        print(runs.show(root, args.run))
    else:
        print(runs.compare(root, args.run, args.other))
    return 0


def _publish(args: argparse.Namespace, root: str) -> int:
    """``promote RUN`` or ``rollback MODEL``: move the model's latest.json."""
    from xfer.registry import runs

    if args.verb == "promote":
        p = runs.promote(root, args.run, force=args.force)
        if p.get("unchanged"):
            print(f"run {p['run_id']} is already the published {p['model_name']}: nothing changed")
        else:
            print(
                f"published run {p['run_id']} as {p['model_name']} (previous: {p['previous_run_id']})"
            )
    else:
        p = runs.rollback(root, args.model_name, force=args.force)
        print(f"rolled {p['model_name']} back to run {p['run_id']} (from {p['rolled_back_from']})")
    return 0


def add_runs_parser(sub: Any) -> None:
    p = sub.add_parser("runs", help="list, show, compare, promote and roll back runs")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    storage_args = argparse.ArgumentParser(add_help=False)
    storage_args.add_argument("--config", help="YAML config file (its storage settings)")
    for verb, help_text, positional in (
        ("list", "one line per run, newest first", []),
        ("show", "metrics, lineage, failures and where everything is", ["run"]),
        ("compare", "the settings that differ and the metrics side by side", ["run", "other"]),
        ("promote", "publish a complete run whose gate passed", ["run"]),
        ("rollback", "publish again the run published before the current one", ["model_name"]),
    ):
        v = verbs.add_parser(verb, help=help_text, parents=[storage_args])
        for name in positional:
            v.add_argument(name, help="run id or run URI" if name != "model_name" else "model name")
        if verb == "list":
            v.add_argument("--model", help="only the runs of this model name")
            v.add_argument(
                "--limit", type=_positive, default=50, help="the newest N runs (default 50)"
            )
            v.add_argument("--all", action="store_true", help="every run (instead of --limit)")
        if verb in ("promote", "rollback"):
            v.add_argument("--force", action="store_true", help="publish even past a failed gate")
        v.add_argument(
            "overrides", nargs="*", help="section.key=value overrides (storage.root=...)"
        )
    p.set_defaults(func=run)
