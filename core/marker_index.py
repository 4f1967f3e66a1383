"""A checked index of an output's commit markers, so a plan reads O(new markers), not one GET each.

The markers stay the truth. ``_index/markers.jsonl.gz`` caches, per marker, its index, its JSON
text and the ETag a LIST of ``_commits/`` reported for it. Reading the markers is one
GET of the index, the LIST (pages of 1,000), and one GET per marker that the index lacks or whose
listed ETag differs from the cached one; an entry whose marker is no longer listed is dropped. An
index that is missing, unreadable, or of an unknown version is ignored and rebuilt from the
markers. The planner writes it back (one PUT) when it changed, under the output's lease; so does an
embed or score job's end, from its LIST of the output and its own commits' markers (``after_job``), so
that the plan after a job reads none of that job's markers.

S3's ETag of a small PUT changes with the bytes; a local folder's is its mtime and size, so a
marker rewritten with as many bytes in the same clock tick keeps its ETag. A marker modified
within ``RACY_S`` of the LIST is therefore cached without an ETag and read again next time
(git's "racily clean" entries).
"""
from __future__ import annotations

import gzip
import json
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from clipbatch.core import layout
from clipbatch.core.storage import ObjectInfo, Storage, is_s3

FORMAT = "clipbatch-marker-index"
VERSION = 1
RACY_S = 2.0
_IO_THREADS = 8
_UNTRUSTED = ""  # the ETag cached for a racy entry: never equal to a listed one

Entries = dict[int, tuple[str, str]]  # index -> (the marker's listed ETag, the marker as JSON text)


def read_markers(storage: Storage) -> dict[int, dict[str, Any]]:
    """What ``commit.list_markers`` returns, read through the index (which this does not write)."""
    return _markers(_read(storage)[0])


def refresh(storage: Storage) -> dict[int, dict[str, Any]]:
    """``read_markers``, then the index written back when it changed (call it under the output's lease)."""
    entries, changed = _read(storage)
    if changed:
        storage.write(layout.MARKER_INDEX, dump(entries))
    return _markers(entries)


def after_job(storage: Storage, listing: dict[str, ObjectInfo], listed_at: float,
              markers: dict[int, dict[str, Any]]) -> None:
    """At a job's end, under the output's lease: the index written from a LIST of the output taken before
    ``markers`` were read (the job's own commits, as counted) and the stored index, whose entries the LIST
    shows unchanged are kept; a marker in neither is left out, for the next plan to read. One GET, and one
    PUT when the index changed: the next plan reads no marker the job committed."""
    cached = load(storage) or {}
    entries: Entries = {}
    for index, info in _markers_in(listing).items():
        if index in markers:
            entries[index] = (_trusted_etag(storage, info, listed_at), json.dumps(markers[index], sort_keys=True))
        elif index in cached and cached[index][0] == info.etag:
            entries[index] = cached[index]
    if entries != cached:
        storage.write(layout.MARKER_INDEX, dump(entries))


def _read(storage: Storage) -> tuple[Entries, bool]:
    """The markers' entries as storage holds them now, and whether they differ from the stored index."""
    cached = load(storage)
    listed_at = time.time()
    listed = _listed(storage)
    stale = [i for i, info in listed.items() if cached is None or cached.get(i, (None,))[0] != info.etag]
    fetched = _fetch(storage, stale)
    entries: Entries = {}
    for index, info in listed.items():
        raw = fetched[index] if cached is None or index in stale else cached[index][1]
        if raw is not None:
            entries[index] = (_trusted_etag(storage, info, listed_at), raw)
    return entries, entries != cached


def _listed(storage: Storage) -> dict[int, ObjectInfo]:
    """The markers LIST reports, by index."""
    return _markers_in(storage.list_info(layout.MARKER_DIR + "/"))


def _markers_in(listing: dict[str, ObjectInfo]) -> dict[int, ObjectInfo]:
    """The markers of a listing, by index (keys that are not a marker's own name are not markers)."""
    found = {}
    for key, info in listing.items():
        index = layout.marker_index(key)
        if index is not None and key == layout.marker(index):
            found[index] = info
    return found


def _trusted_etag(storage: Storage, info: ObjectInfo, listed_at: float) -> str:
    if is_s3(storage.uri) or info.modified < listed_at - RACY_S:
        return info.etag
    return _UNTRUSTED


def _fetch(storage: Storage, indices: list[int]) -> dict[int, str | None]:
    """The markers' bytes as text (None for one deleted since the LIST), in parallel."""
    def get(index: int) -> str | None:
        try:
            return storage.read(layout.marker(index)).decode()
        except FileNotFoundError:
            return None

    if not indices:
        return {}
    with ThreadPoolExecutor(min(_IO_THREADS, len(indices))) as pool:
        return dict(zip(indices, pool.map(get, indices)))


def _markers(entries: Entries) -> dict[int, dict[str, Any]]:
    return {index: json.loads(raw) for index, (_, raw) in sorted(entries.items())}


def dump(entries: Entries) -> bytes:
    """The index file: a header line, then one ``[index, etag, marker text]`` line per marker."""
    lines = [json.dumps({"format": FORMAT, "version": VERSION, "count": len(entries)})]
    lines += [json.dumps([index, etag, raw]) for index, (etag, raw) in sorted(entries.items())]
    return gzip.compress("\n".join(lines).encode(), compresslevel=5, mtime=0)


def load(storage: Storage) -> Entries | None:
    """The stored index, or None when it is missing, unreadable, or not one this code wrote."""
    try:
        return parse(storage.read(layout.MARKER_INDEX))
    except FileNotFoundError:
        return None


def parse(data: bytes) -> Entries | None:
    """The entries of an index file, or None for anything but a well-formed index of this version."""
    try:
        header, *lines = gzip.decompress(data).decode().split("\n")
        meta = json.loads(header)
        if meta != {"format": FORMAT, "version": VERSION, "count": len(lines)}:
            return None
        entries = {}
        for line in lines:
            index, etag, raw = json.loads(line)
            marker = json.loads(raw)
            if type(index) is not int or not isinstance(etag, str) or not isinstance(marker, dict) \
                    or marker.get("index", index) != index or index in entries:
                return None
            entries[index] = (etag, raw)
        return entries
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError, TypeError):
        return None
