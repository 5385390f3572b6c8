"""`make bench`: every benchmark, one after the other, results committed.

    python benchmarks/run_all.py --images ../shared/data/cats_vs_dogs \\
        --weights ../shared/weights/mobilenet_v2_1.0_224_imagenet_no_top.h5 [--only input,shard]

Figures go to benchmarks/results/results.json and benchmarks/results/README.md
(plots next to them). Takes about half an hour on 2 CPUs (plus the scale benchmark's
~25 minutes on a busy 2-CPU machine: `--only scale`), plus about an hour for
the cross-validation of fine-tuning choices (`--only cv`; `bench_cv.py --resume`
continues an interrupted one). The real photos and
weights are not part of the repository: without --images/--weights only the
benchmarks that can use generated data run.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_cv
import bench_decisions
import bench_input
import bench_quality
import bench_rowgroups
import bench_scale
import bench_score
import bench_shard
from common import environment

ALL = ("input", "shard", "rowgroups", "scale", "quality", "score", "decisions", "cv")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--images", help="class-per-folder photos (e.g. ../shared/data/cats_vs_dogs)"
    )
    parser.add_argument("--weights", help="MobileNetV2 ImageNet .h5 (no top)")
    parser.add_argument(
        "--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}"
    )
    args = parser.parse_args()
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    have_photos = bool(
        args.images and os.path.isdir(args.images) and args.weights and os.path.isfile(args.weights)
    )
    if not have_photos:
        print("no --images/--weights found: skipping the real-photo benchmarks (quality, score)")
    if "input" in chosen:
        bench_input.run(args.images if args.images and os.path.isdir(args.images) else None)
    if "shard" in chosen:
        bench_shard.run()
    if "rowgroups" in chosen:  # the one row-group read against the three it replaced
        bench_rowgroups.main()
    if "scale" in chosen:  # generated images: no --images/--weights needed
        bench_scale.run(list(bench_scale.SIZES), list(bench_scale.RUNS), list(bench_scale.ORDER))
    if have_photos and ("quality" in chosen or "score" in chosen):
        with environment():
            if "quality" in chosen:
                bench_quality.run_in(args.images, args.weights)
            if "score" in chosen:
                # Always the quick model (one head epoch), whose figures the scoring notes describe.
                bench_score.run_in(args.images, bench_score.quick_model(args.images, args.weights))
    if have_photos and "decisions" in chosen:
        with environment():  # its own store: a 60/20/20 split of the photos
            bench_decisions.run_in(args.images, args.weights)
    if have_photos and "cv" in chosen:
        with environment():  # its own store: the folds are datasets of their own
            bench_cv.run_in(args.images, args.weights, list(bench_cv.DEFAULT_CONFIGS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
