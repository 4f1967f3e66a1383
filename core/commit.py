"""Exactly-once shard output on at-least-once delivery.

An attempt writes its files under ``_tmp/{attempt}/``, then tries to create the shard's
marker ``_commits/{index}.json`` with a conditional put (If-None-Match: * on S3, an
exclusive link locally). The marker names the winning attempt. Only then are the winner's
files copied to their final names, so a late or concurrent attempt, whose bytes may differ,
never overwrites the winner. Anyone who finds a marker whose files are not all in place
finishes the move (idempotent); losers delete their own temporaries.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from clipbatch.core import layout
from clipbatch.core.storage import Storage

_IO_THREADS = 8


class CommitError(RuntimeError):
    """A marker names files that exist neither in place nor in the attempt's temporaries."""


class IndexConflict(CommitError):
    """The shard's index holds another input's commit, or another version of this input's: two plans
    disagreed, or a stale attempt committed after a replan (never count it as this job's)."""


def check_input(marker: dict[str, Any], index: int, input_uri: str, versions: tuple[str | None, ...] = ()) -> None:
    """A marker found at ``index`` must be for ``input_uri`` and, when ``versions`` are given, of one
    of them (the version the plan saw, or the one this attempt read): counting another input's or
    another version's commit loses samples. A resubmit replans the index from the input as it is."""
    if marker.get("input") != input_uri:
        raise IndexConflict(f"shard {index} of the output holds {marker.get('input')!r}, not {input_uri!r} "
                            "(two jobs planned this output at once); resubmit: the plan gives each input its index")
    known = [v for v in versions if v]
    if known and marker.get("input_etag") not in known:
        raise IndexConflict(f"shard {index} of the output holds version {marker.get('input_etag')!r} of "
                            f"{input_uri!r}, not the planned {known[0]!r} (a stale attempt committed after a replan); "
                            "resubmit: the plan supersedes it")


def read_marker(storage: Storage, index: int) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read(layout.marker(index)))
    except FileNotFoundError:
        return None


def list_markers(storage: Storage) -> dict[int, dict[str, Any]]:
    """Every committed shard of an output, by index (one LIST plus parallel GETs)."""
    found = (layout.marker_index(k) for k in storage.list(layout.MARKER_DIR + "/"))
    indices = [i for i in found if i is not None]
    with ThreadPoolExecutor(_IO_THREADS) as pool:
        markers = list(pool.map(lambda i: read_marker(storage, i), indices))
    return {i: m for i, m in zip(indices, markers) if m is not None}


def _parallel(fn, items) -> None:
    items = list(items)
    if items:
        with ThreadPoolExecutor(min(_IO_THREADS, len(items))) as pool:
            list(pool.map(fn, items))


def finish(storage: Storage, marker: dict[str, Any]) -> None:
    """Drop the files the marker retires, move its attempt's files into their final names, then drop
    the temporaries (so a marker with no temporaries left is finished)."""
    attempt = marker["attempt"]
    _parallel(storage.delete, marker.get("retired", []))

    def move(name: str) -> None:
        try:
            storage.copy(layout.staged(attempt, name), name)
        except FileNotFoundError:
            # Temporaries go only after every file is in place, so the move was done.
            if not storage.exists(name):
                raise CommitError(f"shard {marker['index']}: {name} missing for attempt {attempt}") from None

    _parallel(move, marker["files"])
    _parallel(lambda name: storage.delete(layout.staged(attempt, name)), marker["files"])


def is_finished(storage: Storage, marker: dict[str, Any]) -> bool:
    return not any(storage.exists(layout.staged(marker["attempt"], n)) for n in marker["files"])


def committed_twice(markers: dict[int, dict[str, Any]]) -> dict[str, list[int]]:
    """Inputs committed at more than one index (plans that overlapped), with their indices in order."""
    by_input: dict[str, list[int]] = {}
    for index, marker in sorted(markers.items()):
        by_input.setdefault(marker["input"], []).append(index)
    return {uri: indices for uri, indices in by_input.items() if len(indices) > 1}


def retire(storage: Storage, marker: dict[str, Any]) -> None:
    """Remove a commit: its files first, then its marker (a crash between leaves a marker whose
    files are gone, which the next check reports and the next retire finishes)."""
    _parallel(storage.delete, marker["files"])
    storage.delete(layout.marker(marker["index"]))


def staged_attempts(storage: Storage) -> dict[str, list[tuple[str, float]]]:
    """Every attempt with files under ``_tmp/``: attempt -> [(key, modified)] (one LIST)."""
    found: dict[str, list[tuple[str, float]]] = {}
    for key, info in storage.list_info(layout.TMP_DIR + "/").items():
        parts = key.split("/", 2)
        if len(parts) == 3:
            found.setdefault(parts[1], []).append((key, info.modified))
    return found


def unfinished(markers: dict[int, dict[str, Any]], staged: dict[str, Any]) -> set[int]:
    """Markers whose attempt still has temporaries: their move into place is not done."""
    return {i for i, m in markers.items() if m["attempt"] in staged}


def missing_files(storage: Storage, markers: dict[int, dict[str, Any]]) -> dict[int, list[str]]:
    """Per marker, the files it names that are not in place (one LIST of the output)."""
    present = set(storage.list(""))
    gaps = {i: sorted(set(m["files"]) - present) for i, m in markers.items()}
    return {i: names for i, names in gaps.items() if names}


def sweep_orphans(storage: Storage, markers: dict[int, dict[str, Any]], older_than: float) -> int:
    """Delete the temporaries of attempts no marker names (killed or losing attempts) once every
    file of the attempt is older than ``older_than`` (epoch seconds); returns how many went."""
    named = {m["attempt"] for m in markers.values()}
    doomed = [key for attempt, files in staged_attempts(storage).items() if attempt not in named
              and all(modified < older_than for _, modified in files) for key, _ in files]
    _parallel(storage.delete, doomed)
    return len(doomed)


def honours_conditional_puts(storage: Storage, key: str) -> bool:
    """Probe the store: a second exclusive create of one key must be refused (If-None-Match: *)."""
    try:
        first = storage.create_exclusive(key, b"1")
        second = storage.create_exclusive(key, b"2")
    finally:
        storage.delete(key)
    return first and not second


def commit(
    storage: Storage, index: int, attempt: str, files: dict[str, bytes], record: dict[str, Any]
) -> tuple[bool, dict[str, Any]]:
    """Stage ``files``, race for the marker and finish the winner's move.

    Returns (won, marker): ``marker`` is the winner's, whoever that is.
    """
    _parallel(lambda item: storage.write(layout.staged(attempt, item[0]), item[1]), files.items())
    marker = {**record, "index": index, "attempt": attempt, "files": sorted(files)}
    won = storage.create_exclusive(layout.marker(index), json.dumps(marker, sort_keys=True).encode())
    if not won:
        marker = read_marker(storage, index)
        if marker is None:
            raise CommitError(f"shard {index}: conditional put refused but no marker is readable")
        # A retried PUT whose first try landed is refused too: then the marker is our own.
        won = marker["attempt"] == attempt
        if not won:
            _parallel(lambda name: storage.delete(layout.staged(attempt, name)), files)
    finish(storage, marker)
    return won, marker
