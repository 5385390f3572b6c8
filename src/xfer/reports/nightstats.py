"""A night's figures, streamed: the driver holds counts, never the night's rows.

    stats = read_stats(part_uris)        # every part, one at a time, in order
    figures(stats.scored, classes)       # per class, shares, confidence histogram

Each part is read in one retried step (one GET, as before) and reduced batch by batch
from only the columns the report needs (key, predicted_label, probability, error);
what is kept across parts is counts, the confidence histogram, a sum, the error
reasons and the first examples. So the driver's memory is one part's, whatever the
night's size (issue 24: the report used to concatenate every part and turn the
columns into Python lists).

The figures are the ones computed from the whole table: counts and the histogram add
up exactly, and error reasons keep their first-seen order (``most_common`` breaks
ties by it); only the mean confidence is a sum in another order, equal to within
float rounding.
"""

from __future__ import annotations

from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xfer.scoring.predictions import ERROR, KEY, PREDICTED_LABEL, PROBABILITY
from xfer.store import storage
from xfer.store.s3 import translate_errors

COLUMNS = [KEY, PREDICTED_LABEL, PROBABILITY, ERROR]
BINS = 10
LOW_CONFIDENCE = 0.6  # a confidence below this counts in low_confidence_share
EXAMPLES = 20  # error rows shown in the report
BATCH_ROWS = 65536
READERS = 4  # parts read at once: the driver holds at most this many


@dataclass
class Scored:
    """What the figures need of the rows with a predicted label."""

    n: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    histogram: Any = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))
    total: float = 0.0  # sum of confidences
    low: int = 0  # confidences below LOW_CONFIDENCE

    def add(self, labels: Any, probabilities: Any) -> None:
        import pyarrow.compute as pc

        ok = pc.is_valid(labels)
        for item in pc.value_counts(pc.filter(labels, ok)).to_pylist():
            self.counts[item["values"]] += item["counts"]
        conf = pc.filter(probabilities, ok).to_numpy(zero_copy_only=False)  # a null is NaN
        self.n += len(conf)
        self.histogram += np.histogram(conf, bins=BINS, range=(0.0, 1.0))[0]
        self.total += float(conf.sum())
        self.low += int((conf < LOW_CONFIDENCE).sum())

    def merge(self, other: Scored) -> None:
        self.n += other.n
        self.counts.update(other.counts)
        self.histogram += other.histogram
        self.total += other.total
        self.low += other.low


@dataclass
class NightStats:
    """A night's (or a test split's) rows, reduced: counts, errors, the first examples."""

    rows: int = 0
    scored: Scored = field(default_factory=Scored)
    errors: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, str]] = field(default_factory=list)

    def add(self, batch: Any) -> None:
        """One record batch of :data:`COLUMNS`."""
        import pyarrow.compute as pc

        self.rows += batch.num_rows
        self.scored.add(batch.column(PREDICTED_LABEL), batch.column(PROBABILITY))
        error = batch.column(ERROR)
        failed = pc.and_(pc.is_valid(error), pc.not_equal(error, ""))  # a non-empty reason
        messages = pc.filter(error, failed).to_pylist()
        self.errors += len(messages)
        self.reasons.update(reason(m) for m in messages)
        wanted = EXAMPLES - len(self.examples)
        if wanted > 0 and messages:
            keys = pc.filter(batch.column(KEY), failed).slice(0, wanted).to_pylist()
            self.examples += [{"key": k, "error": e} for k, e in zip(keys, messages, strict=False)]

    def merge(self, other: NightStats) -> None:
        """Add a later part's figures (the order of parts is the order of rows)."""
        self.rows += other.rows
        self.scored.merge(other.scored)
        self.errors += other.errors
        self.reasons.update(other.reasons)
        self.examples += other.examples[: EXAMPLES - len(self.examples)]


def reason(message: str) -> str:
    """An error row's reason without its details: "cannot decode (x.jpg): ..." -> "cannot decode"."""
    return message.split(":")[0].split(" (")[0]


def read_stats(uris: list[str]) -> NightStats:
    """The figures of these Parquet files, merged in order; :data:`READERS` parts are read
    at once (a part's GET is mostly waiting), so the driver holds at most that many."""
    stats = NightStats()
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        pending: deque[Future[NightStats]] = deque()
        for uri in uris:
            pending.append(pool.submit(part_stats, uri))
            if len(pending) == READERS:
                stats.merge(pending.popleft().result())
        while pending:
            stats.merge(pending.popleft().result())
    return stats


def part_stats(uri: str) -> NightStats:
    """One part's figures: its bytes in one GET (retried), the needed columns decoded a
    batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = storage.read_bytes(uri)
    stats = NightStats()
    with translate_errors(uri):
        parquet = pq.ParquetFile(pa.BufferReader(pa.py_buffer(data)))
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=COLUMNS):
            stats.add(batch)
    return stats


def figures(scored: Scored, classes: list[str]) -> dict[str, Any]:
    """The report's figures of the scored rows: per class, shares, confidence."""
    n, counts = scored.n, scored.counts
    return {
        "scored": n,
        "per_class": {c: counts.get(c, 0) for c in classes},
        "shares": {c: counts.get(c, 0) / n if n else 0.0 for c in classes},
        "confidence_histogram": scored.histogram.tolist(),
        "mean_confidence": scored.total / n if n else None,
        "low_confidence_share": scored.low / n if n else None,
    }
