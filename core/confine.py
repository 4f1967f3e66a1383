"""Confined inputs: what a manifest or parquet row, or an image folder's entry, may make a worker read.

A job reads only under its input. A row's relative path resolves under its manifest's (or parquet
file's) folder and may not climb out; an absolute path, a ``file://`` URI or an ``s3://`` URI
elsewhere (another bucket or prefix) is refused unless it lies under a root the operator allows
(CLIPBATCH_INPUT_ROOTS); other schemes are refused. A local file is opened without following a
symlink out of its root (walked one component at a time from the root, so a folder swapped for a
symlink meanwhile is not followed), and only a regular file is read (a device or FIFO never is). A
refusal is an InputRefused whose message states the rule; the reader makes it that sample's error row.
"""
from __future__ import annotations

import errno
import os
import posixpath
import stat
from typing import BinaryIO

from clipbatch.core.storage import FILE_SCHEME, S3_SCHEME, is_s3, join


class InputRefused(ValueError):
    """A path a row or folder names that the job may not read; its message states the rule broken."""


INPUT_ROOTS_ENV = "CLIPBATCH_INPUT_ROOTS"
_ALLOW = f"allow it with {INPUT_ROOTS_ENV}"
_NOT_REGULAR = "is not a regular file (a device, FIFO or socket is never read)"
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO does not block the open
_MAX_LINKS = 40  # symlinks followed in one path, as the kernel allows (ELOOP past it)


def input_roots() -> tuple[str, ...]:
    """Extra roots an operator allows rows to name: CLIPBATCH_INPUT_ROOTS, comma-separated local
    folders and s3:// prefixes. Read at each call, so workers and tests see the current value."""
    raw = os.environ.get(INPUT_ROOTS_ENV, "")
    return tuple(_normal(r.strip()) for r in raw.split(",") if r.strip())


def _normal(uri: str) -> str:
    """A root or URI in one spelling: ``s3://bucket/prefix`` or an absolute local path, no trailing slash."""
    if is_s3(uri):
        return S3_SCHEME + posixpath.normpath(uri[len(S3_SCHEME):]).lstrip("/")
    return os.path.abspath(os.path.expanduser(uri[len(FILE_SCHEME):] if uri.startswith(FILE_SCHEME) else uri))


def _under(uri: str, root: str) -> bool:
    return uri == root or uri.startswith(root.rstrip("/") + "/")


def confine(path: str, base_dir: str) -> tuple[str, str]:
    """The URI a row's image path names and the root that holds it, or InputRefused naming the rule.

    A relative path resolves under ``base_dir`` (the manifest's or parquet file's folder) and may not
    climb out of it; an absolute path, file:// or s3:// URI must lie under ``base_dir`` or under an
    allowed root (CLIPBATCH_INPUT_ROOTS); any other scheme is refused.
    """
    base = _normal(base_dir)
    if "://" not in path and not os.path.isabs(path):
        rel = posixpath.normpath(path)
        if rel == ".." or rel.startswith("../") or rel.startswith("/"):
            raise InputRefused("climbs out of the input's folder (relative paths stay under it)")
        return join(base, rel), base
    if "://" in path and not (is_s3(path) or path.startswith(FILE_SCHEME)):
        raise InputRefused("has an unsupported scheme (use a path relative to the input, or s3://)")
    if ".." in path.split("/"):
        raise InputRefused("climbs with '..' (name the file directly)")
    uri = _normal(path)
    root = next((r for r in (base, *input_roots()) if _under(uri, r)), None)
    if root is None:
        where = "another bucket or prefix" if is_s3(path) else "an absolute path"
        raise InputRefused(f"is {where} outside the input's folder; {_ALLOW}")
    return uri, root


def open_confined(path: str, root: str) -> BinaryIO:
    """A local regular file under ``root``, opened for reading without following a symlink out of it.

    The path is walked from an open descriptor of ``root``, one component at a time, each opened
    relative to the folder before it with O_NOFOLLOW (a folder swapped for a symlink meanwhile is
    seen, never followed blindly); a symlink met on the way is read and its target walked the same
    way, so one that leads inside the root is followed and one that leads out is refused. The file is
    checked to be regular before it is opened (a device is never opened) and again after (O_NONBLOCK:
    a FIFO swapped in does not block the open).
    """
    root = os.path.abspath(root)
    rel = os.path.relpath(os.path.abspath(path), root)
    if rel == ".." or rel.startswith("../"):
        raise InputRefused(f"is outside the input's folder; {_ALLOW}")
    fd = _walk(root, [p for p in rel.split("/") if p not in ("", ".")])
    if fd is None:
        raise InputRefused(_NOT_REGULAR)
    return os.fdopen(fd, "rb")


def _walk(root: str, parts: list[str]) -> int | None:
    """The descriptor of the regular file ``parts`` names under ``root`` (None when it is something
    else), resolving symlinks within the root; InputRefused when one leads out."""
    folders = [os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]  # the root, then each folder below
    links = 0
    try:
        while parts:
            name = parts.pop(0)
            if name == "..":  # only from a symlink's target: the path itself was normalised
                if len(folders) == 1:
                    raise InputRefused(f"is a symlink that leads out of the input's folder; {_ALLOW}")
                os.close(folders.pop())
                continue
            opened = _step(name, folders[-1], last=not parts)
            if isinstance(opened, str):  # a symlink: walk its target instead
                links += 1
                if links > _MAX_LINKS:
                    raise InputRefused("is a symlink loop (too many symlinks)")
                if os.path.isabs(opened):
                    while len(folders) > 1:
                        os.close(folders.pop())
                    opened = _inside(opened, root)
                parts[:0] = [p for p in opened.split("/") if p not in ("", ".")]
            elif parts and opened is not None:  # a folder's descriptor (None comes for the last component only)
                folders.append(opened)
            else:
                return opened
        return None  # the root itself, or a link to it: a folder
    finally:
        for fd in folders:
            os.close(fd)


def _step(name: str, folder: int, last: bool) -> int | str | None:
    """``name`` in ``folder``, never following a symlink: a folder's descriptor (the last component:
    a regular file's, checked before the open and after it), a symlink's target, or None when the
    last component is no regular file."""
    try:
        if not last:
            return os.open(name, _FOLDER_FLAGS, dir_fd=folder)
        mode = os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):
            return os.readlink(name, dir_fd=folder)
        if not stat.S_ISREG(mode):
            return None
        fd = os.open(name, _FILE_FLAGS, dir_fd=folder)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        try:
            return os.readlink(name, dir_fd=folder)  # a symlink (or swapped for one since the check)
        except OSError:
            raise exc from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between the check and the open
        os.close(fd)
        return None
    return fd


def _inside(target: str, root: str) -> str:
    """An absolute symlink target as a path relative to ``root`` (either spelling of it), or InputRefused."""
    target = os.path.normpath(target)
    for spelling in dict.fromkeys((root, os.path.realpath(root))):
        if _under(target, spelling):
            return os.path.relpath(target, spelling)
    raise InputRefused(f"is a symlink that leads out of the input's folder; {_ALLOW}")
