"""The producer's public API: plan, record and enqueue a job; watch, wait for or cancel it.

    from orchestration import Client
    job = Client().submit_embed(input="s3://bkt/shards/{00000..00099}.tar", output="s3://bkt/emb/run1",
                                model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    job.wait(progress=True)

The CLI is a thin layer over this module. Nothing here imports torch.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import redis

from orchestration import commit
from orchestration.config import Settings, redact
from orchestration.inputs import expand_input, InputError
from orchestration.jobs import JobStore
from orchestration.keys import JobState
from orchestration.models import check_model
from orchestration.storage import FILE_SCHEME, is_s3, open_storage
from tasks.app import EMBED_SHARD, make_app
from tasks.specs import EmbedJobSpec, ModelSpec, ShardSpec, SpecError

JOB_FILE = "_job.json"
PROBE_DIR = "_probe"


class BrokerUnavailable(RuntimeError):
    """Redis does not answer at the configured URL."""


class UnknownJob(LookupError):
    """No record of the job in Redis (never existed, expired, or Redis lost its state)."""


def _absolute(uri: str) -> str:
    """Local paths travel as absolute paths: a worker does not share the producer's cwd."""
    if is_s3(uri):
        return uri
    path = uri[len(FILE_SCHEME):] if uri.startswith(FILE_SCHEME) else uri
    return str(Path(path).expanduser().absolute())


class Client:
    """Talks to Redis (queue + job records); storage is read only to plan and check."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.redis = redis.Redis.from_url(self.settings.broker_url, decode_responses=True)
        self.jobs = JobStore(self.redis, self.settings.job_ttl_s)
        self.app = make_app(self.settings)

    def ping(self) -> None:
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            raise BrokerUnavailable(
                f"cannot reach Redis at {redact(self.settings.broker_url)} ({exc}); set CLIPBATCH_BROKER_URL"
            ) from None

    def submit_embed(
        self,
        input: str,
        output: str,
        model: str,
        pretrained: str | None = None,
        model_config: dict[str, Any] | None = None,
        batch_size: int | None = None,
        queue: str | None = None,
    ) -> Job:
        extra = {k: v for k, v in (("batch_size", batch_size), ("queue", queue)) if v is not None}
        spec = EmbedJobSpec(input, output, ModelSpec(model, pretrained, model_config), **extra)
        return self.submit(spec)

    def submit(self, spec: EmbedJobSpec) -> Job:
        """Validate, plan, write the job record, then enqueue one message per uncommitted shard."""
        spec.validate()
        spec = _normalise(spec)
        check_model(spec.model)
        try:
            shards = expand_input(spec.input)
        except InputError as exc:
            raise SpecError("input", str(exc)) from None
        committed = _committed_shards(spec, shards)
        self.ping()
        job_id = uuid.uuid4().hex[:16]
        self.jobs.create(job_id, spec.to_dict(), len(shards), committed)
        todo = [i for i in range(len(shards)) if i not in committed]
        with self.app.producer_or_acquire() as producer:
            for i in todo:
                message = ShardSpec(job_id, i, shards[i], spec).to_dict()
                self.app.send_task(EMBED_SHARD, args=[message], queue=spec.queue, producer=producer)
        job = Job(self, job_id)
        if not todo:
            finalize(self.jobs, job_id)
        return job

    def job(self, job_id: str) -> Job:
        return Job(self, job_id)

    def list_jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        return [s for s in (self.jobs.get(j) for j in self.jobs.list_ids(limit)) if s is not None]


def _normalise(spec: EmbedJobSpec) -> EmbedJobSpec:
    pretrained = spec.model.pretrained
    if pretrained and not is_s3(pretrained) and (os.sep in pretrained or Path(pretrained).suffix):
        if not Path(pretrained).expanduser().is_file():
            raise SpecError("pretrained", f"{pretrained!r}: no such checkpoint file")
        pretrained = _absolute(pretrained)
    elif pretrained and is_s3(pretrained):
        bucket_root, _, name = pretrained.rpartition("/")
        if not open_storage(bucket_root).exists(name):
            raise SpecError("pretrained", f"{pretrained!r}: no such object")
    model = ModelSpec(spec.model.name, pretrained, spec.model.config)
    return EmbedJobSpec(_absolute(spec.input) if "{" not in spec.input else spec.input,
                        _absolute(spec.output), model, spec.batch_size, spec.queue)


def _committed_shards(spec: EmbedJobSpec, shards: list[str]) -> dict[int, dict[str, Any]]:
    """Markers already in the output; refuse an output that is not writable or holds another job's shards."""
    try:
        storage = open_storage(spec.output)
        probe = f"{PROBE_DIR}/{uuid.uuid4().hex}"
        storage.write(probe, b"")
        storage.delete(probe)
        markers = commit.list_markers(storage)
    except Exception as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code")
        if code or isinstance(exc, OSError):
            raise SpecError("output", f"{spec.output!r} is not writable: {code or exc}") from None
        raise
    model = {"name": spec.model.name, "pretrained": spec.model.pretrained}
    for index, marker in markers.items():
        same_input = index < len(shards) and marker.get("input") == shards[index]
        if not same_input or marker.get("model") != model:
            raise SpecError(
                "output",
                f"{spec.output} already holds shard {index} of another job (input {marker.get('input')}, "
                f"model {marker.get('model')}); use a new output or the same input and model",
            )
    return markers


def finalize(jobs: JobStore, job_id: str) -> dict[str, Any] | None:
    """When every shard is accounted for: write ``_job.json`` to the output, then end the job."""
    status = jobs.get(job_id)
    if status is None or not jobs.is_complete(status) or JobState(status["state"]).terminal:
        return status
    final = JobState.FAILED if status["shards_failed"] else JobState.SUCCEEDED
    record = {"spec": jobs.spec(job_id), **status, "state": final.value, "finished_at": time.time()}
    open_storage(status["output"]).write(JOB_FILE, json.dumps(record, indent=2, sort_keys=True).encode())
    jobs.set_state(job_id, final)
    return jobs.get(job_id)


class Job:
    """A handle on one submitted job."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client, self.job_id = client, job_id

    def status(self) -> dict[str, Any]:
        status = self.client.jobs.get(self.job_id)
        if status is None:
            raise UnknownJob(
                f"job {self.job_id!r} is unknown to Redis at {redact(self.client.settings.broker_url)} "
                "(expired, or Redis lost its state); resubmit with the same --output: committed shards are skipped"
            )
        if self.client.jobs.is_complete(status) and not JobState(status["state"]).terminal:
            status = finalize(self.client.jobs, self.job_id) or status
        return status

    def cancel(self) -> bool:
        """Stop a job: queued shards are skipped by the workers; committed outputs stay valid."""
        self.status()
        return self.client.jobs.set_state(self.job_id, JobState.CANCELLED)

    def wait(
        self, progress: bool = False, timeout_s: float | None = None, check: Callable[[], None] | None = None
    ) -> dict[str, Any]:
        """Block until the job ends; with ``progress`` draw a live bar on stderr.

        ``check`` runs at every poll and may raise to stop waiting (e.g. when workers died).
        """
        from orchestration.progress import watch

        return watch(self, live=progress, timeout_s=timeout_s, check=check)
