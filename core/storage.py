"""One small storage interface: a local directory or any S3-compatible bucket.

Chosen by URI scheme: ``s3://bucket/prefix`` uses boto3 (endpoint and credentials from
boto3's own environment variables: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
...), ``file:///path`` or a plain path uses the local filesystem. Keys are '/'-separated and
relative to the root the storage was opened on.
"""
from __future__ import annotations

import io
import os
import posixpath
import shutil
import stat
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"
_S3_RETRIES = {"mode": "standard", "max_attempts": 8}
# Unconditional writes above MULTIPART_THRESHOLD (training shards, large staging bundles) go up in
# parts of MULTIPART_PART_BYTES (boto3 enlarges them past 10,000 parts), _MULTIPART_THREADS at a
# time: a failed part is retried alone, and one PUT's 5 GiB cap does not apply.
MULTIPART_THRESHOLD = 64 << 20
MULTIPART_PART_BYTES = 16 << 20
_MULTIPART_THREADS = 4
_PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


class StorageError(Exception):
    """A storage location that cannot be used, with the URI in the message.

    Both backends raise the project's errors only: ``FileNotFoundError`` (no such object or
    bucket), ``Forbidden``, ``PreconditionFailed`` and ``StorageUnavailable`` (worth a retry).
    """


class Forbidden(StorageError, PermissionError):
    """The credentials may not do this: permanent until someone changes a policy."""


class PreconditionFailed(StorageError):
    """A conditional write lost (the object exists)."""


class StorageUnavailable(StorageError):
    """The endpoint failed or could not be reached: worth another try later."""


# A task that meets one of these will meet it again: retrying only delays the failure.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (FileNotFoundError, PermissionError)


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str
    modified: float = 0.0  # seconds since the epoch, when the backend says (orphan sweeps use it)


class Storage(Protocol):
    uri: str

    def read(self, key: str) -> bytes: ...
    def open_read(self, key: str) -> BinaryIO: ...
    def write(self, key: str, data: bytes) -> None: ...
    def create_exclusive(self, key: str, data: bytes) -> bool: ...
    def exists(self, key: str) -> bool: ...
    def info(self, key: str) -> ObjectInfo | None: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def list_info(self, prefix: str = "") -> dict[str, ObjectInfo]: ...
    def copy(self, src: str, dst: str) -> None: ...
    def delete(self, key: str) -> None: ...


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name.lstrip("/")


def split(uri: str) -> tuple[str, str]:
    """``s3://b/p/x.tar`` -> (``s3://b/p``, ``x.tar``); the same for local paths."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    if not name:
        raise StorageError(f"{uri!r} does not name an object")
    if not parent:
        parent = "."
    if parent.endswith(":/") or parent == "s3:":
        raise StorageError(f"{uri!r} does not name an object inside a bucket")
    return parent, name


def canonical(uri: str) -> str:
    """One name per storage location, for what there must be one of per output (its lease): an S3 URI as
    its bucket and its prefix with empty, ``.`` and ``..`` segments resolved (a trailing slash, doubled
    slashes); a local path or ``file://`` URI as its real path (``~``, ``..`` and symlinks resolved, as far
    as the path exists). Two URIs with one canonical form are one output; a canonical URI is its own."""
    if is_s3(uri):
        bucket, _, prefix = uri[len(S3_SCHEME):].partition("/")
        return f"{S3_SCHEME}{bucket}/{posixpath.normpath('/' + prefix).lstrip('/')}".rstrip("/")
    path = uri[len(FILE_SCHEME):] if uri.startswith(FILE_SCHEME) else uri
    return os.path.realpath(os.path.expanduser(path))


def open_storage(uri: str) -> Storage:
    """Return the storage rooted at ``uri`` (``s3://``, ``file://`` or a plain path)."""
    if is_s3(uri):
        bucket, _, prefix = uri[len(S3_SCHEME):].partition("/")
        if not bucket:
            raise StorageError(f"{uri!r}: an s3:// URI needs a bucket name")
        return S3Storage(bucket, prefix.strip("/"))
    if "://" in uri and not uri.startswith(FILE_SCHEME):
        raise StorageError(f"{uri!r}: unsupported scheme (use s3://, file:// or a plain path)")
    return LocalStorage(uri[len(FILE_SCHEME):] if uri.startswith(FILE_SCHEME) else uri)


class LocalStorage:
    """A directory; writes are atomic (temp file + rename), exclusive create uses link()."""

    def __init__(self, root: str) -> None:
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        if not key:
            return self.root
        if key.startswith("/") or ".." in key.split("/"):
            raise StorageError(f"key {key!r} would escape {self.root}")
        return self.root / key

    def _tmp_beside(self, path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        return tmp

    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def open_read(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._tmp_beside(path)
        Path(tmp).write_bytes(data)
        os.replace(tmp, path)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        tmp = self._tmp_beside(path)
        try:
            Path(tmp).write_bytes(data)
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def info(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return ObjectInfo(size=st.st_size, etag=f"{st.st_mtime_ns:x}-{st.st_size:x}", modified=st.st_mtime)

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file() and not p.name.endswith(".part")
        )

    def list_info(self, prefix: str = "") -> dict[str, ObjectInfo]:
        infos = {key: self.info(key) for key in self.list(prefix)}
        return {k: v for k, v in infos.items() if v is not None}

    def copy(self, src: str, dst: str) -> None:
        path = self._path(dst)
        tmp = self._tmp_beside(path)
        shutil.copyfile(self._path(src), tmp)
        os.replace(tmp, path)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        for parent in path.parents:  # drop folders left empty, like keys vanishing from a prefix
            if parent == self.root or self.root not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:
                break


_S3_POOL_CONNECTIONS = 32  # threads of one process share the client: commit I/O, readers, marker reads
_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_client_lock = threading.Lock()
_clients: dict[str, object] = {}  # by endpoint (what boto3 reads from the environment)


def _reset_after_fork() -> None:
    global _client_lock, _clients
    # a fresh lock (the parent's may have been held by another thread) and no clients: a child
    # must not share its parent's connections
    _client_lock, _clients = threading.Lock(), {}


os.register_at_fork(after_in_child=_reset_after_fork)


def s3_client():
    """The process's boto3 S3 client, built once (one costs ~0.1 s of CPU) and shared by its threads.

    A client is thread-safe, a session is not: the session lives only while the lock is held. One
    client per endpoint the environment names (a test may point the process at a proxy); a forked
    child builds its own.
    """
    endpoint = next((os.environ[v] for v in _ENDPOINT_VARS if os.environ.get(v)), "")
    client = _clients.get(endpoint)
    if client is None:
        with _client_lock:
            client = _clients.get(endpoint)
            if client is None:
                client = _clients[endpoint] = _build_s3_client()
    return client


def clients_built() -> int:
    """How many S3 clients this process holds (tests check it stays one per endpoint)."""
    return len(_clients)


def _build_s3_client():
    import boto3
    from botocore.config import Config

    config = Config(retries=_S3_RETRIES, max_pool_connections=_S3_POOL_CONNECTIONS)
    return boto3.session.Session().client("s3", config=config)


_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}
_FORBIDDEN_CODES = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "AllAccessDisabled", "AccountProblem"}


@contextmanager
def _s3_errors(uri: str):
    """Turn botocore's errors into the project's own, once, here at the edge."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        message = f"{uri}: {code}: {exc.response.get('Error', {}).get('Message') or exc}"
        if code in _NOT_FOUND_CODES:  # the builtin, as the local backend raises: one type on both
            raise FileNotFoundError(message) from None
        if code in _FORBIDDEN_CODES:
            raise Forbidden(message) from None
        if code in _PRECONDITION_CODES:
            raise PreconditionFailed(message) from None
        raise StorageUnavailable(message) from None
    except BotoCoreError as exc:  # no credentials, endpoint unreachable, read timeouts, ...
        raise StorageUnavailable(f"{uri}: {exc}") from None


class S3Storage:
    """A bucket prefix on any S3-compatible endpoint."""

    def __init__(self, bucket: str, prefix: str) -> None:
        self.bucket, self.prefix = bucket, prefix
        self.uri = f"{S3_SCHEME}{bucket}/{prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def read(self, key: str) -> bytes:
        body = self.open_read(key)
        with _s3_errors(join(self.uri, key)):
            return body.read()

    def open_read(self, key: str) -> BinaryIO:
        with _s3_errors(join(self.uri, key)):
            return s3_client().get_object(Bucket=self.bucket, Key=self._key(key))["Body"]

    def write(self, key: str, data: bytes) -> None:
        with _s3_errors(join(self.uri, key)):
            if len(data) <= MULTIPART_THRESHOLD:
                s3_client().put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
            else:
                self._put_parts(self._key(key), data)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """One PutObject with If-None-Match: * at any size (up to S3's 5 GiB): racing multipart
        completions with If-None-Match can all succeed on SeaweedFS 4.48 and moto 5.2 (docs/reliability.md),
        racing PUTs cannot. Large files are staged unconditionally and committed by a small marker."""
        try:
            with _s3_errors(join(self.uri, key)):
                s3_client().put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
            return True
        except PreconditionFailed:
            return False

    def _put_parts(self, key: str, data: bytes) -> None:
        """boto3's managed upload: parts in parallel, and on any failure the upload is aborted, so no
        parts are left behind (an open upload keeps them, billed and invisible to LIST, until aborted)."""
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_PART_BYTES,
                                max_concurrency=_MULTIPART_THREADS, preferred_transfer_client="classic")
        s3_client().upload_fileobj(io.BytesIO(data), self.bucket, key, Config=config)

    def exists(self, key: str) -> bool:
        return self.info(key) is not None

    def info(self, key: str) -> ObjectInfo | None:
        try:
            with _s3_errors(join(self.uri, key)):
                head = s3_client().head_object(Bucket=self.bucket, Key=self._key(key))
        except FileNotFoundError:
            return None
        return ObjectInfo(size=head["ContentLength"], etag=head["ETag"].strip('"'),
                          modified=head["LastModified"].timestamp())

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self.list_info(prefix))

    def list_info(self, prefix: str = "") -> dict[str, ObjectInfo]:
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        found: dict[str, ObjectInfo] = {}
        with _s3_errors(join(self.uri, prefix)):
            pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                for obj in page.get("Contents", []):
                    found[obj["Key"][strip:]] = ObjectInfo(size=obj["Size"], etag=obj["ETag"].strip('"'),
                                                           modified=obj["LastModified"].timestamp())
        return found

    def copy(self, src: str, dst: str) -> None:
        with _s3_errors(join(self.uri, src)):
            s3_client().copy_object(
                Bucket=self.bucket, Key=self._key(dst), CopySource={"Bucket": self.bucket, "Key": self._key(src)}
            )

    def delete(self, key: str) -> None:
        with _s3_errors(join(self.uri, key)):
            s3_client().delete_object(Bucket=self.bucket, Key=self._key(key))
