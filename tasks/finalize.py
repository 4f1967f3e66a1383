"""Ending a job, once, on the worker side: ``_job.json`` and the kind's report go to the output.

Whoever accounts for the last shard finalises inline; a job with nothing to run, or one whose
last shard was dead-lettered, gets a ``FINALIZE_JOB`` message instead. Both paths take a
Redis lease first, so two processes never write the same job's files at once; a finaliser
that dies mid-way leaves its message unacked, and the redelivery (after the visibility
timeout, by which time the lease has lapsed) finishes the job. ``status`` never writes.

An embed or score job's end does not grow with its output: each shard's stats were merged into the
job's Redis totals as it was counted (``report_committed``), and the end adds them to the totals the
last job's end saved (core/merged.py), checked against one LIST of the output. When those do not
add up (none saved, Redis lost, a failed shard, anything else) it reads every marker and stats file.

An embed or score job in which every sample is an error row ends ``failed`` with a ``problem``
line (how many, the commonest reasons, a hint), not ``succeeded``: it embedded nothing.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from clipbatch.core import commit, layout, merged
from clipbatch.core.marker_index import after_job as write_marker_index
from clipbatch.core.broker import FINALIZE_JOB
from clipbatch.core.jobs import Counted, JobStore
from clipbatch.core.keys import JobState
from clipbatch.core.leases import OutputLeases
from clipbatch.core.report import build_report, finish_finetune, full_totals, nothing_embedded
from clipbatch.core.selection import finish_train_shards
from clipbatch.core.signing import Refused
from clipbatch.core.specs import ShardSpec
from clipbatch.core.storage import Storage, open_storage
from clipbatch.tasks.app import app
from clipbatch.tasks.context import SETTINGS, job_spec, job_store

log = logging.getLogger("clipbatch.finalize")


EMBED_KINDS = ("embed", "score")


@dataclass
class _End:
    """What a job's end found: storage problems (index -> what), the commits no orphan sweep may touch
    (index -> marker, the attempt at least), the inputs of the markers it read, and the report."""

    problems: dict[int, str]
    named: dict[int, dict[str, Any]]
    inputs: dict[int, str] = field(default_factory=dict)
    summary: dict[str, Any] | None = None
    how: str = "full"


def finalize(jobs: JobStore, job_id: str) -> dict[str, Any] | None:
    """When every shard is accounted for: write ``_job.json`` and the report, then end the job."""
    status = jobs.get(job_id)
    if status is None or not jobs.is_complete(status) or JobState(status["state"]).terminal:
        return status
    spec = job_spec(jobs, job_id)  # verified with signing on: where the job writes is the signed output
    # Shorter than the visibility timeout: a redelivered message can claim what a dead finaliser held.
    if spec is None or not jobs.claim_finalize(job_id, max(1, SETTINGS.visibility_timeout_s // 2)):
        return status
    storage = open_storage(spec.output)
    record = {"spec": spec.to_dict(), **status, "output": spec.output, "kind": spec.kind, "finished_at": time.time()}
    end = _end_embed(jobs, storage, record) if spec.kind in EMBED_KINDS else _end_other(jobs, storage, record)
    final = JobState.FAILED if status["shards_failed"] or end.problems else JobState.SUCCEEDED
    record.update(state=final.value, failures={**record["failures"], **end.problems})
    if end.summary is not None:
        empty = nothing_embedded(status["samples_done"], status["samples_failed"], end.summary)
        if empty and final is JobState.SUCCEEDED:
            final, record["state"], record["problem"] = JobState.FAILED, JobState.FAILED.value, empty
            jobs.set_problem(job_id, empty)
    storage.write(layout.JOB_FILE, json.dumps(record, indent=2, sort_keys=True).encode())
    for index, problem in end.problems.items():
        jobs.dead_letter(job_id, index, end.inputs.get(index, ""), problem)
    swept = commit.sweep_orphans(storage, end.named, time.time() - SETTINGS.visibility_timeout_s)
    jobs.set_state(job_id, final)
    jobs.drop_counted(job_id)
    OutputLeases(jobs.r, jobs.ttl_s).release(spec.output, job_id)
    log.info("job finalized job=%s state=%s incomplete=%d orphans_swept=%d merged=%s", job_id, final.value,
             len(end.problems), swept, end.how)
    return jobs.get(job_id)


def _end_other(jobs: JobStore, storage: Storage, record: dict[str, Any]) -> _End:
    """A training-shards or fine-tune job's end (no score report to merge)."""
    markers = commit.list_markers(storage)
    end = _End(_incomplete(jobs, record["job_id"], storage, markers, record["kind"]), markers)
    if record["shards_failed"] or end.problems:  # ended at a stage that did not complete: nothing to sum up
        return end
    if record["kind"] == "shards":
        finish_train_shards(storage)
    else:
        finish_finetune(storage, record)
    return end


def _end_embed(jobs: JobStore, storage: Storage, record: dict[str, Any]) -> _End:
    """An embed or score job's end: the saved totals advanced by this job's shards (a bounded number of
    requests), or, when they cannot be trusted, every marker and stats file read as before. The marker
    index (core/marker_index.py) is written from the end's one LIST of the output and the markers it knows (the
    job's own commits, kept in Redis as they were counted), so the next plan reads none of them."""
    job = jobs.job_shards(record["job_id"], record)
    listed_at = time.time()
    listing = storage.list_info("")  # before any marker is read: a marker rewritten since then is read again
    try:
        totals, replaced = _advance(storage, record, job, set(listing))
        end = _End({}, {i: {"attempt": c[merged.ATTEMPT]} for i, c in totals.covers.items()}, how="bounded")
        known = {i: rec["marker"] for i, rec in job.counted.items() if rec.get("marker")}
    except merged.Stale as why:
        log.warning("job end merges every shard's stats job=%s reason=%s", record["job_id"], why)
        markers, totals = full_totals(storage)
        end = _End(_incomplete(jobs, record["job_id"], storage, markers, record["kind"]), markers,
                   {i: m["input"] for i, m in markers.items()})
        replaced = [layout.replaced_stats(i) for i in _replaced_kept(storage)]
        known = markers
    write_marker_index(storage, listing, listed_at, known)
    end.summary = build_report(storage, record, totals)
    if end.problems:  # the next job's end must not trust totals over an output found incomplete
        _delete(storage, [layout.MERGED])
    else:
        merged.save(storage, totals)
        _delete(storage, replaced)
    return end


def _advance(storage: Storage, record: dict[str, Any], job: merged.JobShards,
             present: set[str]) -> tuple[merged.Totals, list[str]]:
    """Saved totals − the rescored shards' old stats + this job's, checked against ``present`` (one LIST of
    the output)."""
    if record["shards_failed"]:
        raise merged.Stale("the job has failed shards")
    saved = _saved(storage, job)
    kept = {i: layout.replaced_stats(i) for i in merged.replaced(saved, job.counted)}
    old = {i: _json(storage, key) for i, key in kept.items()}
    modality = (record.get("spec") or {}).get("modality", "pairs")
    totals = merged.advance(saved, job, {i: s for i, s in old.items() if s is not None}, modality)
    _check_listing(totals, present)
    return totals, list(kept.values())


def _saved(storage: Storage, job: merged.JobShards) -> merged.Totals:
    """The totals the last job's end saved; none at all for a job that kept no commit from before it
    (a fresh output: the LIST then proves there are no others)."""
    try:
        return merged.load(storage)
    except merged.Stale:
        if job.done == set(job.counted) and not any(rec["before"] for rec in job.counted.values()):
            return merged.Totals()
        raise


def _check_listing(totals: merged.Totals, present: set[str]) -> None:
    """Storage holds exactly the markers the totals cover, and each one's files: else ``Stale`` (the
    full check then names what is wrong)."""
    listed = {i for i in map(layout.marker_index, present) if i is not None}
    if listed != set(totals.covers):
        raise merged.Stale(f"{len(listed ^ set(totals.covers))} markers differ from the shards the totals cover")
    for index, cover in totals.covers.items():
        if cover[merged.FILES] < 0 or not set(merged.mask_files(index, cover[merged.FILES])) <= present:
            raise merged.Stale(f"shard {index}: files are not all in place")


def report_committed(jobs: JobStore, shard: ShardSpec, marker: dict[str, Any], result: Any,
                     storage: Storage) -> bool:
    """Count a committed shard once (``JobStore.report_done``); an embed or score shard's stats go into
    the job's totals in the same step. True when every shard of the job is now accounted for."""
    counted = _counted(shard, marker, result, storage) if shard.job.kind in EMBED_KINDS else None
    return jobs.report_done(shard.job_id, shard.index, marker["samples_ok"], marker["samples_failed"], counted)


def _counted(shard: ShardSpec, marker: dict[str, Any], result: Any, storage: Storage) -> Counted | None:
    """The committed attempt's stats: this attempt's own bytes when it won, else (a lost race, a
    redelivery that found the marker) one GET of ``stats/{i}.json``. None when that file is missing
    or another attempt's: the shard is counted without them, and the job's end, finding its totals
    short, reads every marker and file and fails the job naming what is missing."""
    name = layout.stats(shard.index)
    stats = json.loads(result.files[name]) if result is not None and name in result.files else None
    if stats is None or stats.get("attempt") != marker["attempt"]:
        stats = _json(storage, name)
        if stats is None or stats.get("attempt") != marker["attempt"]:
            log.warning("shard counted without its stats job=%s shard=%d: %s is missing or not of attempt %s",
                        shard.job_id, shard.index, name, marker["attempt"])
            return None
    return Counted(merged.shard_record(marker, stats), stats, marker.get("job_id") != shard.job_id, marker)


def _json(storage: Storage, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read(key))
    except FileNotFoundError:
        return None
    except ValueError:
        log.warning("unreadable %s in %s", key, storage.uri)
        return None


def _replaced_kept(storage: Storage) -> list[int]:
    keys = storage.list(layout.MERGED_DIR + "/replaced/")
    return [int(k.rsplit("/", 1)[1].split(".")[0]) for k in keys if k.endswith(".json")]


def _delete(storage: Storage, keys: list[str]) -> None:
    for key in keys:
        try:
            storage.delete(key)
        except FileNotFoundError:
            pass


def _incomplete(jobs: JobStore, job_id: str, storage: Storage, markers: dict[int, dict[str, Any]],
                kind: str) -> dict[int, str]:
    """What storage says is wrong with a job's output: shards counted done whose marker is missing,
    and markers whose files are not all in place. A job with any of these has not succeeded."""
    if kind == "finetune":  # a chain: each step resumes from the last one's checkpoint, checked then
        return {}
    done = jobs.done_indices(job_id)
    problems = {i: "counted as committed, but storage holds no marker" for i in sorted(done - set(markers))}
    for index, names in commit.missing_files(storage, markers).items():
        problems[index] = f"committed, but files are missing: {', '.join(names)}"
    for uri, indices in commit.committed_twice(markers).items():
        for index in indices[1:]:
            problems[index] = f"{uri} is committed at shard {indices[0]} too (a resubmit keeps one)"
    return problems


@app.task(name=FINALIZE_JOB)
def finalize_job(job_id: str) -> str | None:
    try:
        status = finalize(job_store(), job_id)
    except Refused as why:  # signing on, and the job's spec does not verify: nothing is written
        log.error("job end refused job=%s reason=%s", job_id, why)
        job_store().record_refused(job_id, -1, "", f"refused, not run: {why}")
        return "refused"
    return None if status is None else status["state"]
