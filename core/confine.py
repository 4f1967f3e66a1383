"""Confined inputs: what a manifest or parquet row, or an image folder's entry, may make a worker read.

A job reads only under its input. A row's relative path resolves under its manifest's (or parquet
file's) folder and may not climb out; an absolute path, a ``file://`` URI or an ``s3://`` URI
elsewhere (another bucket or prefix) is refused unless it lies under a root the operator allows
(CLIPBATCH_INPUT_ROOTS); other schemes are refused. A local file is opened without following a
symlink out of its root, and only a regular file is read (a device or FIFO never is). A refusal is
an InputRefused whose message states the rule; the reader makes it that sample's error row.
"""
from __future__ import annotations

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

    The path is resolved once and the resolved file opened with O_NOFOLLOW and O_NONBLOCK (a FIFO
    does not block the open); anything but a regular file (a device, a FIFO, a socket) is refused.
    """
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if not _under(real, real_root):
        raise InputRefused(f"is a symlink that leads out of the input's folder; {_ALLOW}")
    if not stat.S_ISREG(os.stat(real).st_mode):
        raise InputRefused(_NOT_REGULAR)
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between the check and the open
        os.close(fd)
        raise InputRefused(_NOT_REGULAR)
    return os.fdopen(fd, "rb")
