"""Signed messages (opt-in): every task message is signed with its sender's key, and a worker runs
only messages whose signer's certificate is in its store; any other message is dead-lettered (a
record in ``clipbatch dead-letters``), never run, and no job's state changes for it.

A message names a job and one of its shards; what the worker does with it is decided by the job's
spec and the shard's entry, and both are signed too (docs/security.md, "What signing covers"):

* the producer signs the spec as it stores it in the job's record (:meth:`Signer.spec`, the field
  ``spec_signature`` beside ``spec``), bound to the job id; a worker verifies it whenever it loads
  the spec (tasks/context.py);
* the producer signs every shard entry it plans, ``(job_id, index, input, version)``
  (:meth:`Signer.entries`); the signature travels as the entry's fourth element, in the pending list
  and in the message. A worker runs, and publishes as a successor, only an entry whose signature
  verifies with the key that signed the job's spec, or one derivable from that spec
  (:func:`derivable`: a curation job's stage tasks, a fine-tune's steps, which workers create).

Set on producers and workers alike (Celery's ``auth`` serializer, RSA keys):

* ``CLIPBATCH_SIGNING_KEY``: this process's private key (PEM);
* ``CLIPBATCH_SIGNING_CERT``: its certificate;
* ``CLIPBATCH_SIGNING_CERT_STORE``: a folder (or glob) of the certificates whose signatures are
  accepted. Workers sign the messages they send on (successor shards, finalisation), so their
  certificates belong in it beside the producers'.
"""
from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from celery import Celery
from celery.exceptions import SecurityError
from celery.security.certificate import Certificate, FSCertStore
from celery.security.key import PrivateKey
from celery.security.serialization import DEFAULT_SEPARATOR
from celery.security.utils import get_digest_algorithm
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import padding

from clipbatch.core import curation
from clipbatch.core.specs import FinetuneSpec, JobSpec, TrainShardsSpec
from clipbatch.core.storage import open_storage

SIGNING_ENV = ("CLIPBATCH_SIGNING_KEY", "CLIPBATCH_SIGNING_CERT", "CLIPBATCH_SIGNING_CERT_STORE")
DIGEST = "sha256"
# The worker's consumer (loaded by the worker only): dead-letters what it refuses.
REFUSING_CONSUMER = "clipbatch.tasks.refused:DeadLetteringConsumer"
SPEC_SIGNATURE = "spec_signature"  # the job hash's field beside ``spec``
SIGNED_CONTENT_TYPE = "application/data"  # what Celery's auth serializer calls a signed body
# What each signature covers starts with its purpose: an entry's signature is never a spec's.
_SPEC_PURPOSE, _ENTRY_PURPOSE = "clipbatch-spec", "clipbatch-entry"

Spec = JobSpec | TrainShardsSpec | FinetuneSpec


class Refused(Exception):
    """A job spec or shard entry no trusted key vouches for; the message says which and why."""


@dataclass(frozen=True)
class Signing:
    """Where this process's key and certificate, and the trusted certificates, are."""

    key: str
    cert: str
    store: str

    @classmethod
    def from_env(cls) -> Signing | None:
        """The signing settings, None when none is set; all three or a ValueError naming the missing."""
        values = [os.environ.get(name, "") for name in SIGNING_ENV]
        if not any(values):
            return None
        missing = [name for name, value in zip(SIGNING_ENV, values) if not value]
        if missing:
            raise ValueError(f"{', '.join(missing)}: message signing needs all of {', '.join(SIGNING_ENV)}")
        return cls(*values)


def enable(app: Celery, signing: Signing) -> None:
    """Sign every task message this app sends and accept only signed ones (events stay JSON)."""
    app.conf.update(
        task_serializer="auth",
        accept_content=["auth"],
        security_key=signing.key,
        security_certificate=signing.cert,
        security_cert_store=signing.store,
        security_digest=DIGEST,
        worker_consumer=REFUSING_CONSUMER,
    )
    app.setup_security(allowed_serializers=["json"], serializer="json")  # "auth" is registered by it


def _spec_bytes(job_id: str, spec_json: str) -> bytes:
    return json.dumps([_SPEC_PURPOSE, job_id, spec_json]).encode()


def _entry_bytes(job_id: str, index: int, uri: str, version: str | None) -> bytes:
    return json.dumps([_ENTRY_PURPOSE, job_id, index, uri, version]).encode()


class Signer:
    """The producer's side: signs a job's spec and its planned entries with this process's key."""

    def __init__(self, signing: Signing) -> None:
        self._key = PrivateKey(Path(signing.key).read_text())
        self._id = Certificate(Path(signing.cert).read_text()).get_id()
        self._digest = get_digest_algorithm(DIGEST)

    @classmethod
    def from_env(cls) -> Signer | None:
        signing = Signing.from_env()
        return None if signing is None else cls(signing)

    def _sign(self, data: bytes) -> str:
        return base64.b64encode(self._key.sign(data, self._digest)).decode()

    def spec(self, job_id: str, spec_json: str) -> str:
        """The ``spec_signature`` field for the record's ``spec`` string: the signer's id and signature."""
        return json.dumps({"signer": self._id, "signature": self._sign(_spec_bytes(job_id, spec_json))})

    def entries(self, job_id: str, entries: Iterable[tuple[int, str, str | None]]) -> list[tuple]:
        """Each ``(index, input, version)`` with its signature appended."""
        return [(index, uri, version, self._sign(_entry_bytes(job_id, index, uri, version)))
                for index, uri, version in entries]


class Verifier:
    """The worker's side: a spec signed by a trusted key, an entry signed by its spec's signer."""

    def __init__(self, signing: Signing) -> None:
        self._store = FSCertStore(signing.store)
        self._digest = get_digest_algorithm(DIGEST)

    @classmethod
    def from_env(cls) -> Verifier | None:
        signing = Signing.from_env()
        return None if signing is None else cls(signing)

    def spec(self, job_id: str, spec_json: str, signature: str | None) -> str:
        """The id of the trusted key that signed the job's ``spec`` string, or Refused."""
        if not signature:
            raise Refused(f"job {job_id}: its spec carries no signature ({SPEC_SIGNATURE}); "
                          "submit it with CLIPBATCH_SIGNING_* set")
        try:
            record = json.loads(signature)
            signer = record["signer"]
            self._verify(signer, _spec_bytes(job_id, spec_json), record["signature"])
        except (ValueError, KeyError, TypeError) as exc:
            raise Refused(f"job {job_id}: its spec's signature is unreadable ({type(exc).__name__}: {exc})") from None
        except (InvalidSignature, SecurityError) as exc:
            raise Refused(f"job {job_id}: its spec's signature does not verify{_detail(exc)}") from None
        return signer

    def entry(self, signer: str, spec: Spec, job_id: str, entry: tuple) -> None:
        """Refused unless ``entry`` (index, input, version[, signature]) is signed by ``signer`` (the key
        that signed the job's spec) or, unsigned, derivable from the spec."""
        if len(entry) not in (3, 4):
            raise Refused(f"entry {str(list(entry))[:300]} of job {job_id}: not [index, input, version(, signature)]")
        index, uri, version, *signature = entry
        what = f"entry {json.dumps([index, uri, version])[:2000]} of job {job_id}"
        if not signature or signature[0] is None:
            why = derivable(spec, index, uri, version)
            if why is not None:
                raise Refused(f"{what}: not signed, and not derivable from the job's signed spec: {why}")
            return
        try:
            self._verify(signer, _entry_bytes(job_id, index, uri, version), signature[0])
        except (ValueError, TypeError) as exc:
            raise Refused(f"{what}: its signature is unreadable ({type(exc).__name__}: {exc})") from None
        except (InvalidSignature, SecurityError) as exc:
            raise Refused(f"{what}: its signature does not verify with the key that signed the job's spec"
                          f"{_detail(exc)}") from None

    def _verify(self, signer: str, data: bytes, signature: str) -> None:
        """InvalidSignature unless ``signature`` (base64) is ``signer``'s over ``data``; SecurityError for
        a signer not in the store, or expired; ValueError for a signature that is not base64."""
        cert = self._store[signer]
        if cert.has_expired():
            raise SecurityError(f"expired certificate: {signer!r}")
        raw = base64.b64decode(signature, validate=True)
        cert.get_pubkey().verify(raw, data, padding.PSS(padding.MGF1(self._digest), padding.PSS.MAX_LENGTH),
                                 self._digest)


def _detail(exc: Exception) -> str:
    """An InvalidSignature says nothing; a SecurityError names the certificate."""
    return f": {exc}" if str(exc) else ""


def derivable(spec: Spec, index: Any, uri: Any, version: Any) -> str | None:
    """Why an unsigned entry is not one the verified ``spec`` itself calls for; None when it is.

    A fine-tune's step ``k`` trains on ``spec.shards[k % len]``, ``0 <= k < steps``. A curation job's task
    is ``{spec.output}#{stage}={n}`` at the index the plan saved in that output puts it, once every task
    of the stages before it is committed there (curation.planned_input). Nothing else is derivable.
    """
    if version is not None or not isinstance(index, int) or isinstance(index, bool) or not isinstance(uri, str):
        return "a derived entry is [index, input, null]"
    if isinstance(spec, FinetuneSpec):
        if 0 <= index < spec.steps and uri == spec.shards[index % len(spec.shards)]:
            return None
        return f"not step {index} of the fine-tune"
    if isinstance(spec, TrainShardsSpec):
        try:
            planned = curation.planned_input(open_storage(spec.output), spec.output, index)
        except FileNotFoundError as exc:
            return f"the curation plan is not in the job's output ({exc})"
        if planned is None:
            return f"the curation plan runs no task at index {index} now (none there, or a stage before its own " \
                   "is not committed yet)"
        return None if uri == planned else f"the curation plan runs {planned!r} at index {index}"
    return f"the entries of {spec.kind} jobs are planned, and signed, by their producer"


def signed_body(body: bytes) -> bytes:
    """The serialized body inside a body signed by Celery's auth serializer (its signature unchecked:
    for telling which job a queued message names, e.g. to purge it)."""
    return base64.b64decode(body).split(DEFAULT_SEPARATOR, 4)[4]
