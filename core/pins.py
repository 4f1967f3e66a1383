"""The scored commits a curation job pins: what its plan read, checked by every stage that reads them.

The plan reads the scored output's commits once; ``pins.json`` records each scored shard's committed
attempt. A stage task that reads a scored shard checks the pin before and after its reads
(:func:`check_pins`): a score job that rescored the shard in between (new marker, new attempt) makes
the task fail for good, naming the shard, instead of mixing two selections (a later stage reading
rows an earlier one never selected). The commit protocol writes a shard's marker before moving its
new files into place, so an attempt unchanged after the reads means the reads saw the pinned bytes.
"""
from __future__ import annotations

import json
from typing import Any, Iterable

from clipbatch.core import commit, layout
from clipbatch.core.specs import SpecError
from clipbatch.core.storage import Storage, open_storage


def pins(scored_markers: dict[int, dict[str, Any]], parts: Iterable[int]) -> dict[str, str]:
    """What the plan read: scored shard -> the attempt of its commit."""
    return {str(p): scored_markers[p]["attempt"] for p in parts}


def check_pins_unchanged(output: Storage, uri: str, pinned: dict[str, str]) -> None:
    """A resubmit over tasks planned from other scored commits is refused, naming the first changed one."""
    try:
        before = json.loads(output.read(layout.CURATION_PINS))
    except FileNotFoundError:
        return
    if before != pinned:
        changed = min((set(before.items()) ^ set(pinned.items())), key=lambda kv: int(kv[0]))[0]
        raise SpecError("scored", f"scored shard {changed} was rescored since {uri} was planned, and its stages "
                                  "read the old scores; use a new --output")


def check_pins(output: Storage, scored: str, parts: Iterable[int]) -> None:
    """Each of ``parts`` is still the scored commit the plan read; else a SpecError naming it."""
    pinned = json.loads(output.read(layout.CURATION_PINS))
    source = open_storage(scored)
    for part in parts:
        marker = commit.read_marker(source, part)
        found = None if marker is None else marker.get("attempt")
        if found != pinned[str(part)]:
            raise SpecError("scored", f"scored shard {part} of {scored} changed while this job ran (commit "
                                      f"{pinned[str(part)]} planned, {found} now: a score job rescored it); "
                                      "resubmit to a new --output")
