"""The `xfer` command (also `python -m xfer`).

    xfer s3-server [--data-dir D] [--port P]
    xfer synth OUT [--classes a,b] [--per-class N] [--size PX]
    xfer shard SRC DEST [--config FILE] [--max-side PX] [--split 0.8,0.1,0.1] ... [key=value ...]
    xfer train [--config FILE] [key=value ...]
    xfer score [--model URI] [--input URI] [--output URI] [--date D] [--config FILE] [key=value ...]
    xfer audit DATASET [--config FILE] [--out URI] [--folds 5] ... [key=value ...]
    xfer runs list|show RUN|compare RUN RUN|promote RUN|rollback MODEL [--config FILE] [k=v ...]
    xfer demo [--workdir D] [--keep] [--weights source|imagenet]
    xfer --version

Each subcommand parses its flags and calls one library function. Exit status, the
same for every command (`jobs/*.py` run `main` too): 0 success; 2 a problem the user
can fix (XferError: config, input, credentials); 75 (EX_TEMPFAIL: try again later) a
store that stayed unreachable past its retry budget, or a night of `xfer score` held
by another run; 1 the job failed (JobFailed: a worker error; or a bug, with Python's
traceback); 130 Ctrl-C and 143 SIGTERM, after every process the command started (S3
server, local Ray) has been stopped. An error is one line on stderr: `xfer: error: ...`.

A config key that the command does not read (config.READS) is named in a warning.
`xfer score`'s --model, --input, --output and --date win over score.model, score.input,
score.output and score.date, so that a deployment's config file can carry them.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from xfer import console
from xfer.errors import (
    EXIT_JOB_FAILED,
    EXIT_STORE_UNAVAILABLE,
    EXIT_USER_ERROR,
    JobFailed,
    StoreUnavailable,
    XferError,
    one_line,
)

if TYPE_CHECKING:
    from xfer.config import XferConfig

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is: unwinds like Ctrl-C, so every
    ``finally`` runs and the processes a command started are stopped."""


_signals: list[int] = []  # received, for the exit status (libraries re-raise their own)


def _on_sigterm(signum: int, frame: object) -> None:
    _signals.append(signum)
    raise Terminated


def _s3_server(args: argparse.Namespace) -> int:
    from xfer.store.s3server import serve

    buckets = tuple(b for b in (args.bucket or "").split(",") if b)
    return serve(args.data_dir, args.port, buckets)


def _synth(args: argparse.Namespace) -> int:
    from xfer.data.synth import synthesize

    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    n = synthesize(args.out, classes, per_class=args.per_class, size=args.size, seed=args.seed)
    print(f"wrote {n} images in {len(classes)} classes to {args.out}")
    return 0


# `xfer shard` flags, as the shard: keys they set (a flag wins over the config file).
SHARD_FLAGS = {
    "split": "split_fractions",
    "shard_size_mb": "target_shard_mb",
    "max_side": "max_side",
    "quality": "jpeg_quality",
    "max_pixels": "max_pixels",
    "max_rejected_fraction": "max_rejected_fraction",
    "tasks": "num_tasks",
    "name": "name",
}


def _load_config(args: argparse.Namespace, command: str, flags: tuple[str, ...] = ()) -> XferConfig:
    """The config of ``--config`` and the overrides; a warning for each section of it
    that ``command`` does not read (shipped configs are shared between commands)."""
    from xfer.config import load_config
    from xfer.configreads import unread_settings

    cfg = load_config(args.config, [*flags, *args.overrides])
    for line in unread_settings(cfg, command):
        console.warn(line)
    return cfg


def _shard(args: argparse.Namespace) -> int:
    import json

    from xfer.data.shard import shard_dataset
    from xfer.store.retry import budget

    flags = []
    for flag, key in SHARD_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            if flag == "split":
                with contextlib.suppress(ValueError):  # else the config names the bad value
                    value = [float(x) for x in value.split(",")]
            flags.append(f"shard.{key}={json.dumps(value)}")
    cfg = _load_config(args, "shard", tuple(flags))
    cfg.apply_storage_env()
    with budget(cfg.storage.outage_seconds):  # run_tasks passes it to every task
        summary = shard_dataset(args.src, args.dest, cfg.shard)
    print(summary.describe())
    return 0


def _train(args: argparse.Namespace) -> int:
    from xfer.train.driver import train

    cfg = _load_config(args, "train")
    result = train(cfg)
    print(result.describe())
    return 0


def _score(args: argparse.Namespace) -> int:
    from xfer.scoring.score import score
    from xfer.scoring.scorelock import NightBusy

    cfg = _load_config(args, "score")
    night = cfg.score.target(cfg.storage.root, args.model, args.input, args.output, args.date)
    try:
        result = score(
            cfg, model=night.model, input_uri=night.input, output=night.output, date=night.date
        )
    except NightBusy as exc:  # another run holds the night: try again later
        return _error(exc, EXIT_STORE_UNAVAILABLE)
    print(result.describe())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from xfer.demo import DemoSettings, run_demo

    settings = DemoSettings(
        workdir=args.workdir, keep=args.keep, weights=args.weights, quick=args.quick
    )
    return run_demo(settings)


class _VersionAction(argparse.Action):
    """--version, computed only when asked (it reads the installed packages' metadata)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help=str(kwargs.get("help", "")))

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from xfer.registry.provenance import version_line

        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xfer",
        description="Transfer-learning image classifiers on Ray Train, data and models in S3.",
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="the code's version and commit, and the stack"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's and TensorFlow's output too (default: in the log file only)",
    )

    p = sub.add_parser("s3-server", help="run the embedded S3 server (SeaweedFS) on 127.0.0.1")
    p.add_argument(
        "--data-dir", default=".xfer/s3", help="where objects are kept (default .xfer/s3)"
    )
    p.add_argument("--port", type=int, default=None, help="S3 port (default: a free one)")
    p.add_argument(
        "--bucket", default="xfer", help="comma-separated buckets to create (default xfer)"
    )
    p.set_defaults(func=_s3_server)

    p = sub.add_parser(
        "synth", parents=[common], help="write a generated, learnable class-per-folder image set"
    )
    p.add_argument("out", help="output directory or s3:// prefix")
    p.add_argument(
        "--classes", default="circle,square,triangle", help="comma-separated class names"
    )
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_synth)

    p = sub.add_parser(
        "shard", parents=[common], help="images (folder tree or uri,label list) -> Parquet shards"
    )
    p.add_argument("src", help="class-per-folder tree, or a CSV/Parquet list of uri,label")
    p.add_argument("dest", help="dataset prefix, e.g. s3://bucket/datasets/name")
    p.add_argument("--config", help="YAML config file with a shard: section (local path or s3://)")
    p.add_argument("--split", help="train,val,test fractions (by key hash); default 0.8,0.1,0.1")
    p.add_argument("--shard-size-mb", type=float, help="target shard size; default 96")
    p.add_argument("--max-side", type=int, help="pre-resize: longest side in pixels")
    p.add_argument("--quality", type=int, help="JPEG quality when re-encoding; default 90")
    p.add_argument("--max-pixels", type=int, help="reject larger images; default 50,000,000")
    p.add_argument(
        "--max-rejected-fraction",
        type=float,
        help="fail, committing nothing, if more inputs than this are rejected; default 0.05",
    )
    p.add_argument("--tasks", type=int, help="parallel Ray tasks (default: CPUs)")
    p.add_argument("--name", help="dataset name in the manifest (default: DEST's)")
    p.add_argument("overrides", nargs="*", help="shard.key=value (or storage.*) overrides")
    p.set_defaults(func=_shard)

    p = sub.add_parser(
        "train", parents=[common], help="head training then fine-tuning on Ray Train"
    )
    p.add_argument("--config", help="YAML config file (local path or s3://)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "score", parents=[common], help="batch scoring with Ray Data; Parquet predictions"
    )
    p.add_argument("--model", help=".../runs/<run_id> or .../models/<name> (default: score.model)")
    p.add_argument(
        "--input",
        help="dataset prefix, image prefix, CSV/Parquet list, or an S3 Inventory manifest.json "
        "(default: score.input)",
    )
    p.add_argument(
        "--output", help="predictions prefix, dt=<date>/ is added (default: score.output)"
    )
    p.add_argument(
        "--date",
        default=None,
        help="partition date YYYY-MM-DD or YYYYMMDD (default: score.date, else today, UTC, "
        "plus score.date_offset_days)",
    )
    p.add_argument("--config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=_score)

    from xfer.audit.cli import add_audit_parser  # light: flags only

    add_audit_parser(sub, common)
    from xfer.registry.cli import add_runs_parser  # light: flags only

    add_runs_parser(sub)

    p = sub.add_parser(
        "demo", parents=[common], help="the quickstart: S3 + synth + shard + train + score, locally"
    )
    p.add_argument("--workdir", default="xfer-demo", help="where the S3 data and images go")
    p.add_argument("--keep", action="store_true", help="leave the S3 server running at the end")
    p.add_argument(
        "--weights",
        default="source",
        choices=["source", "imagenet"],
        help="source: pretrain on a generated source task (no internet); imagenet: download",
    )
    p.add_argument("--quick", action="store_true", help="fewer images and epochs (for tests)")
    p.set_defaults(func=_demo)
    return parser


def _stop_ray() -> None:
    """Disconnect from Ray (stopping a local instance), so that the workers' last log
    lines come out before the error line, which is then the last thing printed."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        with contextlib.suppress(Exception):  # the error being reported matters more
            ray.shutdown()


def exit_status(exc: XferError) -> int:
    """75 for a store away past its budget (transient: a scheduler may run the job again
    later), 1 for a job that failed, else 2: a problem the user can fix."""
    if isinstance(exc, StoreUnavailable):
        return EXIT_STORE_UNAVAILABLE
    return EXIT_JOB_FAILED if isinstance(exc, JobFailed) else EXIT_USER_ERROR


def _error(exc: XferError, status: int) -> int:
    """The error as one line on stderr, the last thing the command prints."""
    _stop_ray()
    print(f"xfer: error: {one_line(str(exc))}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may also follow a flag (`promote RUN --force storage.root=...`),
    # which a positional list after the positionals cannot take.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    console.set_verbose(getattr(args, "verbose", False))
    if argv is None:  # the command line itself, not a caller in the same process
        console.capture_native_output()
    func: Callable[[argparse.Namespace], int] = args.func
    # Kubernetes, `timeout` and job schedulers stop a command with SIGTERM, whose
    # default action ends the process at once, leaving its S3 server and Ray running.
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return func(args)
    except XferError as exc:
        return _error(exc, exit_status(exc))
    except KeyboardInterrupt as exc:
        _stop_ray()
        if isinstance(exc, Terminated) or signal.SIGTERM in _signals:
            print("xfer: stopped (SIGTERM)", file=sys.stderr)
            return EXIT_TERMINATED
        print("xfer: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
