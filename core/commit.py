"""Exactly-once shard output on at-least-once delivery.

An attempt stages its files under ``_tmp/{attempt}/``, then tries to create the shard's marker
``_commits/{index}.json`` with a conditional put (If-None-Match: * on S3, an exclusive link
locally). The marker names the winning attempt. Only then are the winner's files written to
their final names, so a late or concurrent attempt, whose bytes may differ, never overwrites the
winner. Anyone who finds a marker whose temporaries are still there finishes the move with the
winner's staged bytes (idempotent); losers delete their own temporaries.

Staging is one object, a tar of every file (``_tmp/{attempt}/_bundle.tar``): the winner writes
its files from memory and deletes the bundle, 3 + n writes for n files. Commits over
``BUNDLE_MAX_BYTES`` stage each file on its own and
move it with a server-side copy (1 + 3n writes). The marker says which (``staging``).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from clipbatch.core import layout
from clipbatch.core.storage import Storage

_IO_THREADS = 8
BUNDLE_MAX_BYTES = 256 << 20  # above this a commit stages file by file: a bundle is held in memory twice
STAGING_BUNDLE, STAGING_FILES = "bundle", "files"
_TAR_BLOCK = 512


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
    markers = _parallel(lambda i: read_marker(storage, i), indices)
    return {i: m for i, m in zip(indices, markers) if m is not None}


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None  # one per process: a forked child starts its own


def _reset_after_fork() -> None:
    global _pool_lock, _pool
    _pool_lock, _pool = threading.Lock(), None  # the parent's threads do not exist in the child


os.register_at_fork(after_in_child=_reset_after_fork)


def _executor() -> ThreadPoolExecutor:
    """The process's pool for storage I/O, started once: a pool per call started threads per call."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(_IO_THREADS, thread_name_prefix="clipbatch-io")
    return _pool


def _parallel(fn, items) -> list:
    """``fn`` over ``items`` on the process's I/O pool; the results in order, the first error raised.
    ``fn`` must not itself wait on the pool (the pool is shared and bounded)."""
    items = list(items)
    if len(items) <= 1:
        return [fn(item) for item in items]
    return list(_executor().map(fn, items))


def pack(files: dict[str, bytes]) -> bytes:
    """One tar of ``files``, byte-for-byte the same for the same files (sorted, no times, no owners)."""
    parts: list[bytes] = []
    for name in sorted(files):
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(files[name]), 0o644, 0
        parts += [info.tobuf(tarfile.PAX_FORMAT), files[name], b"\0" * (-len(files[name]) % _TAR_BLOCK)]
    return b"".join([*parts, b"\0" * (2 * _TAR_BLOCK)])


def unpack(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return {m.name: f.read() for m in tar.getmembers() if m.isfile() and (f := tar.extractfile(m)) is not None}


def _staged_keys(marker: dict[str, Any]) -> list[str]:
    """Where the marker's attempt staged its files."""
    attempt = marker["attempt"]
    if marker.get("staging") == STAGING_BUNDLE:
        return [layout.bundle(attempt)]
    return [layout.staged(attempt, name) for name in marker["files"]]


def finish(storage: Storage, marker: dict[str, Any]) -> None:
    """Drop the files the marker retires, put its attempt's files at their final names, then drop
    the temporaries (so a marker with no temporaries left is finished). Only the bytes the marker's
    attempt staged are written, so finishing is idempotent whoever does it."""
    _finish(storage, marker, None)


def _finish(storage: Storage, marker: dict[str, Any], files: dict[str, bytes] | None) -> None:
    """``files``: the winner's own bytes, when the winner finishes (no need to read them back)."""
    _parallel(storage.delete, marker.get("retired", []))
    if marker.get("staging") != STAGING_BUNDLE:
        return _finish_by_copy(storage, marker)
    key = layout.bundle(marker["attempt"])
    if files is None:
        try:
            files = unpack(storage.read(key))
        except FileNotFoundError:
            return  # the bundle goes only after every file is in place: done
    if sorted(files) != marker["files"]:
        raise CommitError(f"shard {marker['index']}: {key} holds {sorted(files)}, the marker names {marker['files']}")
    _parallel(lambda name: storage.write(name, files[name]), marker["files"])
    storage.delete(key)


def _finish_by_copy(storage: Storage, marker: dict[str, Any]) -> None:
    attempt = marker["attempt"]

    def move(name: str) -> None:
        try:
            storage.copy(layout.staged(attempt, name), name)
        except FileNotFoundError:
            # Temporaries go only after every file is in place, so the move was done.
            if not storage.exists(name):
                raise CommitError(f"shard {marker['index']}: {name} missing for attempt {attempt}") from None

    _parallel(move, marker["files"])
    _parallel(storage.delete, _staged_keys(marker))


def is_finished(storage: Storage, marker: dict[str, Any]) -> bool:
    """No temporaries of the marker's attempt are left (one HEAD for a bundle)."""
    return not any(_parallel(storage.exists, _staged_keys(marker)))


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
    storage: Storage, index: int, attempt: str, files: dict[str, bytes], record: dict[str, Any],
    before_marker: Callable[[], None] | None = None,
) -> tuple[bool, dict[str, Any]]:
    """Stage ``files``, race for the marker and finish the winner's move.

    ``before_marker`` runs once the files are staged, just before the marker's conditional put (the
    staging upload can take long: the caller checks its job is still live there); whatever it raises
    aborts the commit, with this attempt's staged files deleted first, and propagates.
    Returns (won, marker): ``marker`` is the winner's, whoever that is.
    """
    staging = STAGING_BUNDLE if sum(map(len, files.values())) <= BUNDLE_MAX_BYTES else STAGING_FILES
    marker = {**record, "index": index, "attempt": attempt, "files": sorted(files), "staging": staging}
    if staging == STAGING_BUNDLE:
        storage.write(layout.bundle(attempt), pack(files))
    else:
        _parallel(lambda name: storage.write(layout.staged(attempt, name), files[name]), files)
    if before_marker is not None:
        try:
            before_marker()
        except Exception:
            _parallel(storage.delete, _staged_keys(marker))
            raise
    won = storage.create_exclusive(layout.marker(index), json.dumps(marker, sort_keys=True).encode())
    if not won:
        seen = read_marker(storage, index)
        if seen is None:
            raise CommitError(f"shard {index}: conditional put refused but no marker is readable")
        # A retried PUT whose first try landed is refused too: then the marker is our own.
        won = seen["attempt"] == attempt
        if not won:
            _parallel(storage.delete, _staged_keys(marker))
        marker = seen
    _finish(storage, marker, files if won else None)
    return won, marker
