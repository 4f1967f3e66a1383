"""Plan a job's input: a shard, a brace pattern, or a folder/prefix -> sorted shard URIs."""
from __future__ import annotations

from dataclasses import dataclass

from braceexpand import braceexpand

from orchestration.storage import ObjectInfo, StorageError, join, open_storage, split

SHARD_SUFFIX = ".tar"
_SHOW_MISSING = 3


class InputError(ValueError):
    """An --input that names no readable shard."""


@dataclass(frozen=True)
class ShardInput:
    """One input shard as planned: its URI, and size/ETag to notice when it is rewritten."""

    uri: str
    size: int
    etag: str


def expand_input(pattern: str) -> list[ShardInput]:
    """Return the shards named by ``pattern``, sorted by URI; raise InputError if there are none."""
    if pattern.count("{") != pattern.count("}"):
        raise InputError(f"{pattern!r}: malformed brace pattern (unbalanced braces); e.g. 'shards/{{00000..00099}}.tar'")
    try:
        if "{" in pattern:
            return _expand_braces(pattern)
        return _expand_plain(pattern)
    except StorageError as exc:
        raise InputError(str(exc)) from None
    except PermissionError as exc:
        raise InputError(f"{pattern!r}: permission denied ({exc})") from None
    except Exception as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code")
        if code:  # botocore ClientError: NoSuchBucket, AccessDenied, ...
            raise InputError(f"{pattern!r}: {code}: {exc}") from None
        raise


def _shard(uri: str, info: ObjectInfo) -> ShardInput:
    return ShardInput(uri, info.size, info.etag)


def _expand_braces(pattern: str) -> list[ShardInput]:
    wanted = sorted(set(braceexpand(pattern)))
    # List the folder/prefix above the first brace once instead of probing every shard.
    base = pattern.split("{", 1)[0].rpartition("/")[0]
    storage = open_storage(base or ".")
    present = storage.list_info("")
    relative = [u[len(base) + 1:] if base else u for u in wanted]
    missing = [u for u, rel in zip(wanted, relative) if rel not in present]
    if missing:
        more = f" and {len(missing) - _SHOW_MISSING} more" if len(missing) > _SHOW_MISSING else ""
        shown = ", ".join(missing[:_SHOW_MISSING])
        raise InputError(f"{len(missing)} of {len(wanted)} shards do not exist: {shown}{more}")
    return [_shard(join(storage.uri, rel), present[rel]) for rel in relative]


def _expand_plain(uri: str) -> list[ShardInput]:
    try:
        parent, name = split(uri)
    except StorageError:  # a bucket root: list it
        parent, name = "", ""
    info = open_storage(parent).info(name) if name else None
    if info is not None:
        return [_shard(join(open_storage(parent).uri, name), info)]
    storage = open_storage(uri)
    shards = [_shard(join(storage.uri, k), i) for k, i in sorted(storage.list_info("").items()) if k.endswith(SHARD_SUFFIX)]
    if not shards:
        raise InputError(f"{uri!r}: no {SHARD_SUFFIX} shards there (give a shard, a brace pattern or a folder)")
    return shards
