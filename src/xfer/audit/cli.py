"""The flags of `xfer audit` and the call they make (kept out of :mod:`xfer.cli`).

xfer audit DATASET [--config FILE] [--out URI] [--folds 5] [--phash-distance 6]
                   [--cosine 0.95] [key=value ...]
"""

from __future__ import annotations

import argparse
from typing import Any

DESCRIPTION = (
    "Finds exact and near-duplicate images within and across splits and suspected label "
    "errors (confident learning on out-of-fold probabilities of the configured base's "
    "features). Writes issues.parquet, issues.csv and then audit.html under --out. The "
    "lists' key column makes them data.exclude lists, but they hold every finding: filter "
    "them to the rows you checked before training with data.exclude=<uri>."
)


def run(args: argparse.Namespace) -> int:
    from xfer.audit.collect import AuditSettings, run_audit
    from xfer.config import load_config, with_overrides
    from xfer.store.retry import budget

    # As given, not through YAML: a dataset named 2024 stays the string "2024".
    cfg = with_overrides(
        load_config(args.config, args.overrides), {"data": {"dataset": args.dataset}}
    )
    cfg.apply_storage_env()
    settings = AuditSettings(
        folds=args.folds, phash_distance=args.phash_distance, cosine=args.cosine, out=args.out
    )
    with budget(cfg.storage.outage_seconds):
        result = run_audit(cfg, cfg.dataset_uri(), settings)
    print(result.describe())
    return 0


def add_audit_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "audit",
        parents=[common],
        help="duplicate images and suspected label errors: an HTML page and a list",
        description=DESCRIPTION,
    )
    p.add_argument("dataset", help="dataset name under <storage.root>/datasets/, or its URI")
    p.add_argument("--config", help="YAML config (storage, model.base/weights, data.image_size)")
    p.add_argument(
        "--out", help="output prefix (default <storage.root>/audits/<dataset>/<UTC time>-<token>)"
    )
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument(
        "--phash-distance",
        type=int,
        default=6,
        help="near duplicates: at most this many of pHash's 64 bits differ (default 6; -1: off)",
    )
    p.add_argument(
        "--cosine",
        type=float,
        default=0.95,
        help="near duplicates: cosine of the centred base features at least this (default "
        "0.95, for ImageNet bases; above 1: off)",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (model.weights=...)")
    p.set_defaults(func=run)
