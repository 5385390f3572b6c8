"""Two models on the same images: is one better, beyond noise?

Both models' predictions are joined by key, so each image is a pair of outcomes
(right/wrong, right/wrong). Images both get right or both get wrong say nothing about
which is better; the decision rests on the discordant pairs:

- ``b``: the challenger right, the champion wrong;
- ``c``: the champion right, the challenger wrong.

Under "no difference" each discordant image is a fair coin, so ``b ~ Binomial(b + c,
1/2)``: McNemar's exact test is a binomial test on ``b`` (``scipy.stats.binomtest``).
The accuracy difference ``(b - c) / n`` gets a percentile bootstrap interval over
images (``scipy.stats.bootstrap`` on the per-image differences, which resamples pairs
together). On 47 images at 94%, one image is 2.1 points: this is what tells a +2.1
from noise. Both are computed by scipy, seeded, so the same predictions always give
the same decision.

Modes (``output.gate.mode``):

- ``better``: publish only if the challenger is better beyond noise (one-sided
  ``p < alpha``, alternative: the challenger is right more often);
- ``not_worse``: publish unless it is worse beyond noise (for a retrain on fresh data,
  where equal is good enough).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 9999
SEED = 0


@dataclass(frozen=True)
class PairedComparison:
    pairs: int
    both_right: int
    both_wrong: int
    challenger_only: int  # b: the challenger right, the champion wrong
    champion_only: int  # c: the champion right, the challenger wrong
    challenger_accuracy: float
    champion_accuracy: float
    difference: float  # challenger - champion accuracy
    interval: tuple[float, float]  # bootstrap, at ``confidence``
    confidence: float
    p_better: float  # one-sided McNemar exact: the challenger is better
    p_worse: float  # one-sided: the challenger is worse
    p_two_sided: float

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["interval"] = list(self.interval)
        return out


def compare(challenger_right: Any, champion_right: Any, alpha: float = 0.05) -> PairedComparison:
    """McNemar's exact test and a bootstrap interval for two aligned right/wrong arrays."""
    from scipy.stats import binomtest

    a = np.asarray(challenger_right, dtype=bool)
    z = np.asarray(champion_right, dtype=bool)
    if a.shape != z.shape:
        raise ValueError(f"unpaired outcomes: {a.shape} against {z.shape}")
    n = int(a.size)
    b, c = int((a & ~z).sum()), int((~a & z).sum())
    if b + c:
        p_better = binomtest(b, b + c, 0.5, alternative="greater").pvalue
        p_worse = binomtest(b, b + c, 0.5, alternative="less").pvalue
        p_two = binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
    else:
        p_better = p_worse = p_two = 1.0
    return PairedComparison(
        pairs=n,
        both_right=int((a & z).sum()),
        both_wrong=int((~a & ~z).sum()),
        challenger_only=b,
        champion_only=c,
        challenger_accuracy=float(a.mean()) if n else float("nan"),
        champion_accuracy=float(z.mean()) if n else float("nan"),
        difference=(b - c) / n if n else 0.0,
        interval=difference_interval(a.astype(float) - z.astype(float), 1 - alpha),
        confidence=1 - alpha,
        p_better=float(p_better),
        p_worse=float(p_worse),
        p_two_sided=float(p_two),
    )


def difference_interval(d: Any, confidence: float) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean per-image difference (seeded)."""
    from scipy.stats import bootstrap

    d = np.asarray(d, dtype=float)
    if d.size == 0:
        return (float("nan"), float("nan"))
    if np.all(d == d[0]):  # no discordant pair (or all the same): nothing to resample
        return (float(d[0]), float(d[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bootstrap(
            (d,),
            np.mean,
            confidence_level=confidence,
            n_resamples=BOOTSTRAP_RESAMPLES,
            method="percentile",
            vectorized=True,
            rng=np.random.default_rng(SEED),
        )
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def decide(cmp: PairedComparison, mode: str, alpha: float) -> tuple[bool, str]:
    """``(passes, verdict)``: verdict is ``better``, ``worse`` or ``no evidence``."""
    if cmp.p_better < alpha:
        verdict = "better"
    elif cmp.p_worse < alpha:
        verdict = "worse"
    else:
        verdict = "no evidence"
    passes = verdict == "better" if mode == "better" else verdict != "worse"
    return passes, verdict


def outcomes(challenger: Any, champion: Any) -> tuple[Any, Any, dict[str, int]]:
    """Right/wrong per image of two prediction tables, joined by ``key``.

    Rows that failed to score on either side, or without a true label, are left
    out and counted; so are keys only one side has (their test splits differ).
    """
    import pyarrow.compute as pc

    from xfer.scoring.predictions import ERROR, KEY, PREDICTED_INDEX, TRUE_INDEX

    def right(table: Any) -> dict[str, bool]:
        table = table.filter(
            pc.and_(pc.is_null(table.column(ERROR)), pc.is_valid(table.column(TRUE_INDEX)))
        )
        keys = table.column(KEY).to_pylist()
        ok = pc.equal(table.column(TRUE_INDEX), table.column(PREDICTED_INDEX)).to_pylist()
        return dict(zip(keys, ok, strict=True))

    ra, rz = right(challenger), right(champion)
    common = sorted(ra.keys() & rz.keys())
    left_out = {
        "challenger_only_keys": len(ra.keys() - rz.keys()),
        "champion_only_keys": len(rz.keys() - ra.keys()),
        "unscored": challenger.num_rows + champion.num_rows - len(ra) - len(rz),
    }
    return (
        np.array([ra[k] for k in common], dtype=bool),
        np.array([rz[k] for k in common], dtype=bool),
        left_out,
    )


def summary_line(cmp: PairedComparison) -> str:
    """``45 vs 46 right of 47 paired images; discordant 1/2 (p = 0.50); +… points [lo, hi]``."""
    lo, hi = cmp.interval
    return (
        f"{100 * cmp.challenger_accuracy:.1f}% against {100 * cmp.champion_accuracy:.1f}% on "
        f"{cmp.pairs} paired images; discordant: {cmp.challenger_only} only this run right, "
        f"{cmp.champion_only} only the champion (McNemar exact p = {_p(cmp.p_better)} better, "
        f"{_p(cmp.p_worse)} worse); difference {100 * cmp.difference:+.1f} points, "
        f"{100 * cmp.confidence:.0f}% interval [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    )


def _p(p: float) -> str:
    return f"{p:.3g}"
