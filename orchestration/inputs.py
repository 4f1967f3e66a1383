"""Plan a job's input: a shard, a brace pattern, or a folder/prefix -> sorted shard URIs."""
from __future__ import annotations

from braceexpand import braceexpand

from orchestration.storage import StorageError, join, open_storage, split

SHARD_SUFFIX = ".tar"
_SHOW_MISSING = 3


class InputError(ValueError):
    """An --input that names no readable shard."""


def expand_input(pattern: str) -> list[str]:
    """Return the sorted shard URIs named by ``pattern``; raise InputError if there are none."""
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


def _expand_braces(pattern: str) -> list[str]:
    wanted = sorted(set(braceexpand(pattern)))
    # List the folder/prefix above the first brace once instead of probing every shard.
    base = pattern.split("{", 1)[0].rpartition("/")[0]
    storage = open_storage(base or ".")
    present = set(storage.list(""))
    relative = [u[len(base) + 1:] if base else u for u in wanted]
    missing = [u for u, rel in zip(wanted, relative) if rel not in present]
    if missing:
        more = f" and {len(missing) - _SHOW_MISSING} more" if len(missing) > _SHOW_MISSING else ""
        shown = ", ".join(missing[:_SHOW_MISSING])
        raise InputError(f"{len(missing)} of {len(wanted)} shards do not exist: {shown}{more}")
    return [join(storage.uri, rel) for rel in relative]


def _expand_plain(uri: str) -> list[str]:
    try:
        parent, name = split(uri)
    except StorageError:  # a bucket root: list it
        parent, name = "", ""
    if name and open_storage(parent).exists(name):
        return [join(open_storage(parent).uri, name)]
    storage = open_storage(uri)
    shards = [join(storage.uri, k) for k in storage.list("") if k.endswith(SHARD_SUFFIX)]
    if not shards:
        raise InputError(f"{uri!r}: no {SHARD_SUFFIX} shards there (give a shard, a brace pattern or a folder)")
    return shards
