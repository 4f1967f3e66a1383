"""Signed messages (opt-in): every task message is signed with its sender's key, and a worker runs
only messages whose signer's certificate is in its store; any other message is dead-lettered (a
record in ``clipbatch dead-letters``), never run, and no job's state changes for it.

Set on producers and workers alike (Celery's ``auth`` serializer, RSA keys):

* ``CLIPBATCH_SIGNING_KEY``: this process's private key (PEM);
* ``CLIPBATCH_SIGNING_CERT``: its certificate;
* ``CLIPBATCH_SIGNING_CERT_STORE``: a folder (or glob) of the certificates whose signatures are
  accepted. Workers sign the messages they send on (successor shards, finalisation), so their
  certificates belong in it beside the producers'.
"""
from __future__ import annotations

import base64
import os
from dataclasses import dataclass

from celery import Celery
from celery.security.serialization import DEFAULT_SEPARATOR

SIGNING_ENV = ("CLIPBATCH_SIGNING_KEY", "CLIPBATCH_SIGNING_CERT", "CLIPBATCH_SIGNING_CERT_STORE")
DIGEST = "sha256"
# The worker's consumer (loaded by the worker only): dead-letters what it refuses.
REFUSING_CONSUMER = "clipbatch.tasks.refused:DeadLetteringConsumer"
SIGNED_CONTENT_TYPE = "application/data"  # what Celery's auth serializer calls a signed body


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


def signed_body(body: bytes) -> bytes:
    """The serialized body inside a body signed by Celery's auth serializer (its signature unchecked:
    for telling which job a queued message names, e.g. to purge it)."""
    return base64.b64decode(body).split(DEFAULT_SEPARATOR, 4)[4]
