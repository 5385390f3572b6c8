"""The paired gate: a challenger is published over the champion only on evidence.

The statistics are scipy's (McNemar's exact test as a binomial test on the
discordant images, a bootstrap interval of the accuracy difference); the tests check
that the gate computes exactly those on the counts it reports, and that a real
champion (the session's trained model, scored by the gate's own code on the real
test split) against a challenger differing by a few images is "no evidence" — not
published in ``better`` mode, published in ``not_worse`` — while clear differences
are decided the right way.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from scipy.stats import binomtest

from xfer.config import load_config
from xfer.data.manifest import load_manifest
from xfer.errors import ConfigError
from xfer.raycluster import ensure_ray
from xfer.registry import layout
from xfer.registry.paired import compare, decide
from xfer.registry.runs import paired_lines
from xfer.store import storage
from xfer.train.gate import gate_and_publish, paired_verdict
from xfer.train.outputs import versus_text

MODEL = "gate-paired"


def outcomes_with(
    b: int, c: int, both_right: int, both_wrong: int
) -> tuple[np.ndarray, np.ndarray]:
    challenger = [True] * b + [False] * c + [True] * both_right + [False] * both_wrong
    champion = [False] * b + [True] * c + [True] * both_right + [False] * both_wrong
    return np.array(challenger), np.array(champion)


@pytest.mark.parametrize(
    ("b", "c", "mode", "passes", "verdict"),
    [
        (3, 1, "better", False, "no evidence"),  # a few images: noise
        (3, 1, "not_worse", True, "no evidence"),
        (0, 0, "better", False, "no evidence"),  # identical models
        (0, 0, "not_worse", True, "no evidence"),
        (15, 2, "better", True, "better"),
        (2, 15, "not_worse", False, "worse"),
        (2, 15, "better", False, "worse"),
    ],
)
def test_the_decision_is_mcnemars_exact_test_on_the_discordant_images(b, c, mode, passes, verdict):
    right, champion = outcomes_with(b, c, both_right=180, both_wrong=3)
    cmp = compare(right, champion, alpha=0.05)
    assert (cmp.challenger_only, cmp.champion_only, cmp.pairs) == (b, c, b + c + 183)
    if b + c:
        assert cmp.p_better == pytest.approx(binomtest(b, b + c, 0.5, alternative="greater").pvalue)
        assert cmp.p_worse == pytest.approx(binomtest(b, b + c, 0.5, alternative="less").pvalue)
        assert cmp.p_two_sided == pytest.approx(binomtest(b, b + c, 0.5).pvalue)
    assert decide(cmp, mode, 0.05) == (passes, verdict)
    lo, hi = cmp.interval
    assert lo <= cmp.difference <= hi and cmp.difference == pytest.approx((b - c) / cmp.pairs)
    if b == c == 0:
        assert (lo, hi) == (0.0, 0.0)
    # The bootstrap interval is seeded: the same predictions always give the same figures.
    assert compare(right, champion, alpha=0.05).interval == cmp.interval


def test_the_interval_is_scipys_bootstrap_and_excludes_zero_only_on_clear_differences():
    from scipy.stats import bootstrap

    right, champion = outcomes_with(20, 4, both_right=170, both_wrong=6)
    cmp = compare(right, champion, alpha=0.05)
    d = right.astype(float) - champion.astype(float)
    ref = bootstrap(
        (d,), np.mean, n_resamples=9999, method="percentile", rng=np.random.default_rng(0)
    ).confidence_interval
    assert cmp.interval == pytest.approx((ref.low, ref.high))
    assert cmp.interval[0] > 0
    few = compare(*outcomes_with(3, 1, both_right=190, both_wrong=6))
    assert few.interval[0] < 0 < few.interval[1]


def test_a_retired_margin_says_what_replaced_it():
    with pytest.raises(ConfigError, match=r"output.gate.margin.*output.gate.mode"):
        load_config(None, ["output.gate.margin=0.01"])


# ------------------------------------------------------------ on a real champion


def champion_predictions(trained_run) -> pa.Table:
    """The session model's own test predictions: what the gate scores it to, too."""
    return storage.read_parquet(f"{trained_run.run_uri}/{layout.PREDICTIONS}/test.parquet")


def flipped(table: pa.Table, rows: list[int]) -> pa.Table:
    """The table with these rows' predictions turned to the other class (binary)."""
    predicted = table.column("predicted_index").to_pylist()
    for r in rows:
        predicted[r] = 1 - predicted[r]
    column = table.schema.get_field_index("predicted_index")
    return table.set_column(column, "predicted_index", pa.array(predicted, pa.int32()))


def right_rows(table: pa.Table) -> list[int]:
    ok = pc.equal(table.column("true_index"), table.column("predicted_index")).to_pylist()
    return [i for i, r in enumerate(ok) if r]


def gate_a_challenger(bucket, trained_run, target_dataset, challenger: pa.Table, mode: str):
    """A challenger whose test predictions are ``challenger``, gated against the session's
    model published as the champion of a fresh root: the gate scores the champion itself."""
    root = f"{bucket}/xfer"
    cfg = load_config(
        None,
        [
            f"storage.root={root}",
            f"output.model_name={MODEL}",
            "output.gate.vs_published=true",
            f"output.gate.mode={mode}",
        ],
    )
    seen = layout.read_pointer_for_update(cfg.model_uri())
    layout.publish_pointer(
        cfg.model_uri(), MODEL, trained_run.run_id, trained_run.run_uri, "test_accuracy", 1.0, seen
    )
    run = layout.run_uri(root, "challenger")
    storage.write_parquet(challenger, f"{run}/{layout.PREDICTIONS}/test.parquet")
    accuracy = len(right_rows(challenger)) / challenger.num_rows
    test = {"accuracy": accuracy, "accuracy_from_predictions": accuracy}
    manifest = load_manifest(target_dataset)
    ensure_ray(num_cpus=2)  # the gate scores the champion; a CLI test may have stopped Ray
    gate = gate_and_publish(cfg, manifest, "challenger", run, test, "test_accuracy", accuracy)
    return gate, storage.read_json(f"{cfg.model_uri()}/{layout.LATEST}")["run_id"]


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "published"), [("better", False), ("not_worse", True)])
def test_a_challenger_a_few_images_apart_is_no_evidence(
    bucket, trained_run, target_dataset, ray_local, mode, published, capsys
):
    champion = champion_predictions(trained_run)
    challenger = flipped(champion, right_rows(champion)[:2])  # two images worse
    gate, latest = gate_a_challenger(bucket, trained_run, target_dataset, challenger, mode)
    vs = gate["vs_published"]
    assert (vs["challenger_only"], vs["champion_only"]) == (0, 2)
    assert vs["verdict"] == "no evidence" and vs["p_value"] == pytest.approx(
        binomtest(0, 2, 0.5, alternative="greater" if mode == "better" else "less").pvalue
    )
    assert vs["pairs"] == champion.num_rows
    assert gate["published"] is published
    assert latest == ("challenger" if published else trained_run.run_id)
    out = capsys.readouterr().out
    assert f"gate vs the published run {trained_run.run_id} ({mode}" in out and "no evidence" in out
    assert "0 images only this run right, 2 only the champion" in versus_text(vs)


@pytest.mark.slow
def test_a_challenger_clearly_worse_is_not_published_even_as_not_worse(
    bucket, trained_run, target_dataset, ray_local
):
    champion = champion_predictions(trained_run)
    worse = flipped(champion, right_rows(champion)[:8])
    gate, latest = gate_a_challenger(bucket, trained_run, target_dataset, worse, "not_worse")
    vs = gate["vs_published"]
    assert vs["verdict"] == "worse" and vs["champion_only"] == 8 and vs["interval"][1] < 0
    assert not gate["published"] and latest == trained_run.run_id


@pytest.mark.slow
def test_a_challenger_clearly_better_is_published_in_better_mode(trained_run):
    # The champion's side as the gate reads it, with eight of its right answers turned
    # wrong: the real challenger is better on exactly those eight images.
    mine = champion_predictions(trained_run)
    theirs = flipped(mine, right_rows(mine)[:8])
    vs = paired_verdict(mine, theirs, "better", 0.05, "champion")
    assert vs["verdict"] == "better" and vs["beaten"]
    assert (vs["challenger_only"], vs["champion_only"]) == (8, 0)
    assert vs["p_value"] == pytest.approx(binomtest(8, 8, 0.5, alternative="greater").pvalue)
    assert vs["interval"][0] > 0


@pytest.mark.slow
def test_runs_compare_shows_the_paired_figures(trained_run, session_root, tmp_path):
    other = f"{session_root}/runs/paired-other"
    champion = champion_predictions(trained_run)
    storage.write_parquet(
        flipped(champion, right_rows(champion)[:3]), f"{other}/{layout.PREDICTIONS}/test.parquet"
    )
    lines = "\n".join(paired_lines(trained_run.run_uri, other))
    assert (
        f"{champion.num_rows} images both scored; only the second right 0, only the first right 3"
        in lines
    )
    assert f"McNemar exact p = {binomtest(0, 3, 0.5).pvalue:.3g} (two-sided)" in lines
