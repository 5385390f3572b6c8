"""Which settings each command reads, so that a key that does nothing says so.

    for line in unread_settings(cfg, "score"):   # the CLI, after loading the config
        console.warn(line)

``output.model_name is set but xfer score does not read the output section``: a key set
in the file or an override that the command ignores is named, one line per section.
A warning, not an error: configs are shared between commands (a training config carries
the shard: section its dataset was sharded with, and the score: settings its test split
is scored with).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from xfer.configbase import keys_set

if TYPE_CHECKING:
    from xfer.config import XferConfig


@dataclass(frozen=True)
class Reads:
    """What a command reads of the config: ``sections`` (or single keys), except ``not_keys``;
    ``carried``: sections a config shared with another command holds for it (no warning)."""

    sections: tuple[str, ...]
    not_keys: tuple[str, ...] = ()
    carried: tuple[str, ...] = ()

    def unread(self, key: str) -> bool:
        return not _under(key, self.sections) or _under(key, self.not_keys)


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


# A key set (file or override) that its command does not read is named in a warning, not
# refused: configs are shared (a training config's shard: section shards its dataset).
# `xfer audit` and `xfer runs` read a training config for its data/model and storage
# settings only, by design, and say so in their --config help: they do not warn.
_TRAINING = ("storage", "data", "model", "train", "cluster", "output", "fault", "score")
_STORE = ("storage.endpoint_url", "storage.region", "storage.outage_seconds")
READS = {
    "train": Reads(
        _TRAINING,
        not_keys=tuple(
            f"score.{k}" for k in ("model", "input", "output", "date", "date_offset_days")
        ),
        carried=("shard",),
    ),
    # storage.root too: {root} in score.model, score.input and score.output.
    "score": Reads(("storage", "score", "cluster.address", "cluster.local_num_cpus")),
    # `xfer shard --config <a training config>` reads its shard: section.
    "shard": Reads(("shard", *_STORE), carried=_TRAINING),
}


def unread_settings(cfg: XferConfig, command: str) -> list[str]:
    """One line per section with keys set that ``xfer <command>`` does not read."""
    reads = READS.get(command)
    if reads is None:
        return []
    unread: dict[str, list[str]] = {}
    for key in keys_set(cfg):
        section = key.split(".")[0]
        if reads.unread(key) and section not in reads.carried:
            unread.setdefault(section, []).append(key)
    lines = []
    for section, keys in unread.items():
        verb, it = ("is", "it") if len(keys) == 1 else ("are", "them")
        what = (
            it if any(_under(r, (section,)) for r in reads.sections) else f"the {section} section"
        )
        lines.append(f"{', '.join(keys)} {verb} set but xfer {command} does not read {what}")
    return lines
