"""The producer's public API: plan, record and enqueue a job; watch, wait for or cancel it.

    from clipbatch.orchestration import Client
    job = Client().submit_embed(input="s3://bkt/shards/{00000..00099}.tar", output="s3://bkt/emb/run1",
                                model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    job.wait(progress=True)

The CLI is a thin layer over this module. Nothing here imports torch.
"""
from __future__ import annotations

import time
import uuid
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Iterator

import redis

from clipbatch.core import feed, submits
from clipbatch.core.config import Settings, redact
from clipbatch.core.jobs import JobStore
from clipbatch.core.keys import JobState
from clipbatch.core.inputs import InputError, expand_input
from clipbatch.orchestration.planner import absolute, normalise_model, own_markers, plan
from clipbatch.core.leases import OutputLeases
from clipbatch.core.curation import plan_curation, resume
from clipbatch.core.storage import open_storage
from clipbatch.core.broker import FINALIZE_JOB, make_app
from clipbatch.core.signing import Signer
from clipbatch.core.stages import Engine, Stage
from clipbatch.core.specs import FinetuneSpec, JobSpec, ModelSpec, SpecError, TrainShardsSpec

# Called while a submit enqueues: (shards enqueued so far, shards to enqueue).
SubmitProgress = Callable[[int, int], None]


class BrokerUnavailable(RuntimeError):
    """Redis does not answer at the configured URL."""


class UnknownJob(LookupError):
    """No record of the job in Redis (never existed, expired, or Redis lost its state)."""


class Client:
    """Talks to Redis (queue + job records); storage is read only to plan and check."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.redis = redis.Redis.from_url(self.settings.broker_url, decode_responses=True)
        self.jobs = JobStore(self.redis, self.settings.job_ttl_s, submit_stale_s=self.settings.submit_stale_s)
        self.leases = OutputLeases(self.redis, self.settings.job_ttl_s)
        self.feed = feed.Feed(self.redis, self.settings.job_ttl_s)
        self.app = make_app(self.settings)
        self.engine = Engine(self.redis, self.settings.job_ttl_s, self.app, self.settings.queue_window)
        self.signer = Signer.from_env()  # with signing on, each job's spec and entries are signed
        self.progress: SubmitProgress | None = None  # set by the CLI to draw the submit's progress

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
        **input_options: Any,
    ) -> Job:
        """Embed every pair (and score it): embeddings plus a ``clip_score`` metadata column.

        ``input_options`` are JobSpec's input fields: ``input_format`` (auto, webdataset,
        parquet, folder, manifest), ``image_col``, ``caption_col``, ``key_col``, ``samples_per_shard``.
        """
        extra = {k: v for k, v in (("batch_size", batch_size), ("queue", queue)) if v is not None}
        return self.submit(JobSpec(input, output, ModelSpec(model, pretrained, model_config), **extra,
                                   **input_options))

    def submit_score(self, input: str, output: str, model: str, pretrained: str | None = None,
                     embeddings: bool = True, **kwargs: Any) -> Job:
        """Score every pair; incremental: only shards without a result for this model run."""
        job = JobSpec(input, output, ModelSpec(model, pretrained, kwargs.pop("model_config", None)), kind="score",
                      embeddings=embeddings, **kwargs)
        return self.submit(job)

    def submit(self, spec: JobSpec | TrainShardsSpec | FinetuneSpec) -> Job:
        """Submit any kind of job: embed/score, training shards, or a fine-tune."""
        if isinstance(spec, TrainShardsSpec):
            return self.submit_shards(spec)
        if isinstance(spec, FinetuneSpec):
            return self.submit_finetune(spec)
        return self._submit_job(spec)

    def _submit_job(self, spec: JobSpec) -> Job:
        """Validate and plan, write the job record, then enqueue one message per shard to run."""
        spec.validate()
        self.ping()
        with self._leased(absolute(spec.output)) as job_id:
            planned = plan(spec)
            messages = [(i, planned.shards[i], planned.versions.get(i)) for i in planned.todo]
            return self._launch(job_id, planned.spec, len(planned.shards), planned.committed, messages,
                                len(planned.rescored))

    def submit_shards(self, spec: TrainShardsSpec) -> Job:
        """Curate training shards on the workers (core/curation.py): plan the stages, then enqueue the
        first stage not complete in storage; the stage engine launches each next one (core/stages.py)."""
        spec.validate()
        spec = replace(spec, scored=absolute(spec.scored), output=absolute(spec.output))
        self.ping()
        with self._leased(spec.output) as job_id:
            output = open_storage(spec.output)
            planned, markers = plan_curation(spec, output)
            start = resume(planned, spec.output, output, markers)
            todo = [(index, uri, None) for index, uri in start.todo]
            # the stages before the first unfinished one are complete in storage (all of them, with none left)
            first = Stage(start.stage, planned.base(start.stage), 0) if start.stage else Stage("end", start.total, 0)
            return self._launch(job_id, spec, start.total, markers, todo, seed=(first, start.committed))

    def submit_finetune(self, spec: FinetuneSpec) -> Job:
        """Plan the step chain over the training shards and enqueue its first uncommitted step."""
        spec = replace(spec, output=absolute(spec.output))
        spec.validate()
        self.ping()
        try:
            shards = tuple(s.uri for s in expand_input(spec.train))
        except InputError as exc:
            raise SpecError("train", str(exc)) from None
        spec = replace(spec, shards=shards, model=normalise_model(spec.model))
        with self._leased(spec.output) as job_id:
            steps = [shards[k % len(shards)] for k in range(spec.steps)]
            markers = own_markers(open_storage(spec.output), "finetune", steps)
            resume = next(k for k in range(spec.steps + 1) if k not in markers)  # committed steps are a prefix
            committed = {k: markers[k] for k in range(resume)}
            # Only the first missing step is sent: the stage engine launches each next one once it commits.
            messages = [(resume, steps[resume], None)] if resume < spec.steps else []
            return self._launch(job_id, spec, spec.steps, committed, messages,
                                seed=(Stage(f"step{resume}", resume, 1), []))

    @contextmanager
    def _leased(self, output: str) -> Iterator[str]:
        """A new job id holding ``output``'s lease (core/leases.py); given back if the submit fails."""
        job_id = uuid.uuid4().hex[:16]
        holder = self.leases.acquire(output, job_id)
        if holder is not None and self._submit_died(holder):
            holder = self.leases.acquire(output, job_id)
        if holder is not None:
            state = (self.jobs.get(holder) or {"state": "planning"})["state"]
            raise SpecError("output", f"{output} is in use by job {holder} ({state}); one job per output at a "
                                      f"time: wait for it (clipbatch status {holder} --watch) or cancel it")
        try:
            yield job_id
        except BaseException:
            # A submit stopped half-way (Ctrl-C, an error while enqueueing): what it enqueued must
            # not run beside the next submit's plan, so the job is cancelled before the lease goes.
            if self.jobs.get(job_id) is not None:
                self.job(job_id).cancel()
            self.leases.release(output, job_id)
            raise
        self.leases.hold(output)

    def _submit_died(self, holder: str) -> bool:
        """End ``holder`` ``failed`` if its submit died half-way (core/submits.py: its producer's
        heartbeat lapsed over CLIPBATCH_SUBMIT_STALE_S ago): the next submit replans and completes the work."""
        return submits.end_if_dead(self.jobs, holder, self.settings.submit_stale_s)

    def _launch(self, job_id: str, spec: JobSpec | TrainShardsSpec | FinetuneSpec, total: int,
                committed: dict[int, dict[str, Any]], entries: list[feed.Entry], rescored: int = 0,
                seed: tuple[Stage, list[int]] | None = None) -> Job:
        """Write the job record, then the first stage's messages through the stage engine: the first
        CLIPBATCH_QUEUE_WINDOW go to the broker, the rest to the job's pending list, which finished
        tasks draw their successors from (core/feed.py). A message carries the task's identity (job
        id, index, input, version); the spec is stored once, in the record. ``seed``: a resubmit that
        starts inside a stage, and that stage's tasks already committed.

        A job with nothing to run gets one finalise message instead: a worker ends it (writes
        ``_job.json`` and the report), so the producer never writes to the output.
        """
        entries = self._signed(job_id, entries)
        self.jobs.create(job_id, spec.to_dict(), total, committed, rescored, signer=self.signer)
        if seed is not None:
            self.engine.seed(job_id, *seed)
        done = 0

        def advance(count: int) -> None:
            nonlocal done
            done += count
            self.jobs.mark_submitting(job_id)
            if self.progress is not None:
                self.progress(done, len(entries))

        if entries:
            self.engine.publish(job_id, spec.kind, spec.queue, entries, advance)
        else:
            self.app.send_task(FINALIZE_JOB, args=[job_id], queue=spec.queue)
        self.jobs.mark_submitted(job_id)
        return Job(self, job_id)

    def _signed(self, job_id: str, entries: list[feed.Entry]) -> list[feed.Entry]:
        """The entries with their signatures (signing on), else as they are."""
        return entries if self.signer is None else self.signer.entries(job_id, entries)

    def job(self, job_id: str) -> Job:
        return Job(self, job_id)

    def list_jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest jobs still in Redis, each with ``progress`` (shards accounted for, 0-1) and ``age_s``."""
        now = time.time()
        found = [s for s in (self.jobs.get(j) for j in self.jobs.list_ids(limit)) if s is not None]
        return [{**s, "age_s": now - s["created_at"],
                 "progress": (s["shards_done"] + s["shards_failed"]) / s["shards_total"] if s["shards_total"] else 1.0}
                for s in found]


class Job:
    """A handle on one submitted job."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client, self.job_id = client, job_id

    def status(self) -> dict[str, Any]:
        """The job's record as Redis holds it; a read with no side effects (workers end jobs)."""
        status = self.client.jobs.get(self.job_id)
        if status is None:
            raise UnknownJob(
                f"job {self.job_id!r} is unknown to Redis at {redact(self.client.settings.broker_url)} "
                "(expired, or Redis lost its state); resubmit with the same --output: committed shards are skipped"
            )
        return status

    def cancel(self) -> bool:
        """Stop a job: its pending shards are dropped and its queued messages removed from the
        broker (so queue-length autoscaling stops counting them); committed outputs stay valid.

        Its output's lease goes with it; a shard already running checks for the cancel again
        just before it commits, and drops its work if it finds one.
        """
        status = self.status()
        moved = self.client.jobs.set_state(self.job_id, JobState.CANCELLED)
        if moved:
            self.client.feed.drop(self.job_id)
            feed.purge(self.client.redis, status["queue"], self.job_id)
            self.client.leases.release(status["output"], self.job_id)
        return moved

    def wait(
        self, progress: bool = False, timeout_s: float | None = None, check: Callable[[], None] | None = None
    ) -> dict[str, Any]:
        """Block until the job ends; with ``progress`` draw a live bar on stderr.

        ``check`` runs at every poll and may raise to stop waiting (e.g. when workers died).
        """
        from clipbatch.orchestration.progress import watch

        return watch(self, live=progress, timeout_s=timeout_s, check=check)
