"""The files of an audit: ``issues.parquet``, ``issues.csv``, then ``audit.html``.

The list has one row per finding (an image can have two: a duplicate with a doubtful
label), most suspect first within each reason. Its ``key`` column is the dataset's
row key, so a filtered copy of the list is a ``data.exclude`` list as it is.
``audit.html`` is written last: it marks the audit complete (:mod:`xfer.audit.collect`).
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from xfer.audit.find import Finding
from xfer.data.manifest import Manifest
from xfer.store import storage

COLUMNS = (
    "key",
    "split",
    "given_label",
    "suggested_label",
    "score",
    "reason",
    "duplicate_of",
    "duplicate_split",
    "detail",
)
HTML_PER_REASON = 200  # thumbnails per reason on the page; the lists hold all
THUMB_PX = 112
REASONS = (
    "label_issue",
    "exact_duplicate_across_splits",
    "near_duplicate_across_splits",
    "exact_duplicate",
    "near_duplicate",
)


def rows(dataset: Manifest, images: Any, findings: list[Finding]) -> list[dict[str, Any]]:
    fp, classes = images.fingerprints, dataset.classes
    out = []
    order = {r: n for n, r in enumerate(REASONS)}
    for f in sorted(findings, key=lambda f: (order.get(f.reason, 99), -f.score)):
        given = classes[int(fp.labels[f.index])]
        out.append(
            {
                "key": fp.keys[f.index],
                "split": fp.splits[f.index],
                "given_label": given,
                "suggested_label": classes[f.suggested] if f.suggested is not None else given,
                "score": round(f.score, 4),
                "reason": f.reason,
                "duplicate_of": fp.keys[f.other] if f.other is not None else None,
                "duplicate_split": fp.splits[f.other] if f.other is not None else None,
                "detail": f.detail,
            }
        )
    return out


def write_outputs(
    out: str,
    dataset: Manifest,
    images: Any,
    findings: list[Finding],
    settings: dict[str, Any],
) -> dict[str, str]:
    """Write the lists, then the page (last: its presence marks a complete audit)."""
    import pyarrow as pa

    page = storage.join(out, "audit.html")
    if storage.exists(page):  # an older audit here: it must not vouch for the new lists
        storage.delete(page)
    table = pa.Table.from_pylist(rows(dataset, images, findings), schema=pa.schema(_schema(pa)))
    files = {
        "issues.parquet": storage.join(out, "issues.parquet"),
        "issues.csv": storage.join(out, "issues.csv"),
        "audit.html": page,
    }
    storage.write_parquet(table, files["issues.parquet"])
    found = table.to_pylist()
    storage.write_bytes(files["issues.csv"], _csv(found).encode(), "text/csv")
    body = page_html(dataset, images, found, settings, files)
    storage.write_bytes(page, body.encode(), "text/html")
    return files


def _csv(found: list[dict[str, Any]]) -> str:
    """Quoted only where a value needs it: the header reads ``key,split,...``, which any
    list reader (``data.exclude``'s among them) takes for a CSV with a key column."""
    import csv

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(found)
    return buffer.getvalue()


def _schema(pa: Any) -> list[tuple[str, Any]]:
    return [(c, pa.float64() if c == "score" else pa.string()) for c in COLUMNS]


def thumbnail(data: bytes) -> str:
    """A small inline JPEG (a data: URI) of an encoded image."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    img.thumbnail((THUMB_PX, THUMB_PX))
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


_STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px 8px;vertical-align:top;font-size:13px}
img{display:block;max-width:112px;max-height:112px}th{background:#f4f4f4;text-align:left}
.k{font-family:monospace}"""


def page_html(
    dataset: Manifest,
    images: Any,
    table: list[dict[str, Any]],
    settings: dict[str, Any],
    files: dict[str, str],
) -> str:
    index = {k: i for i, k in enumerate(images.fingerprints.keys)}
    counts: dict[str, int] = {}
    for row in table:
        counts[row["reason"]] = counts.get(row["reason"], 0) + 1
    esc = html.escape
    parts = [
        f"<!doctype html><meta charset=utf-8><title>audit of {esc(dataset.name)}</title>",
        f"<style>{_STYLE}</style><h1>Audit of {esc(dataset.uri or dataset.name)}</h1>",
        f"<p>{len(index)} images; {len(table)} finding(s). Settings: "
        + ", ".join(f"{esc(k)}={esc(str(v))}" for k, v in settings.items())
        + "</p><table><tr><th>reason</th><th>findings</th></tr>",
        *(f"<tr><td>{esc(r)}</td><td>{n}</td></tr>" for r, n in counts.items()),
        "</table><p>The full lists: "
        + ", ".join(f"<span class=k>{esc(u)}</span>" for n, u in files.items() if n != "audit.html")
        + ". Filtered to the rows you checked, either works as <span class=k>data.exclude</span>."
        "</p>",
    ]
    if not table:
        parts.append("<p>Nothing found: no duplicates and no suspected label errors.</p>")
    for reason in counts:
        chosen = [r for r in table if r["reason"] == reason]
        parts.append(_section(reason, chosen, images.encoded, index))
    return "\n".join(parts) + "\n"


def _section(
    reason: str, chosen: list[dict[str, Any]], encoded: list[bytes], index: dict[str, int]
) -> str:
    esc = html.escape
    shown = chosen[:HTML_PER_REASON]
    more = f" (the first {len(shown)} shown)" if len(chosen) > len(shown) else ""
    head = (
        f"<h2>{esc(reason)}: {len(chosen)}{more}</h2><table><tr><th>image</th><th>other</th>"
        "<th>key</th><th>split</th><th>label</th><th>suggested</th><th>score</th><th>why</th></tr>"
    )
    lines = [head]
    for r in shown:
        other = r["duplicate_of"]
        other_cell = f"<img src='{thumbnail(encoded[index[other]])}'>" if other else ""
        lines.append(
            f"<tr><td><img src='{thumbnail(encoded[index[r['key']]])}'></td><td>{other_cell}</td>"
            f"<td class=k>{esc(r['key'])}</td><td>{esc(r['split'])}</td>"
            f"<td>{esc(r['given_label'])}</td><td>{esc(r['suggested_label'])}</td>"
            f"<td>{r['score']:.3f}</td><td>{esc(r['detail'])}</td></tr>"
        )
    return "\n".join(lines) + "</table>"
