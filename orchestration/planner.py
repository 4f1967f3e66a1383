"""Plan a job: normalise the spec, list the input shards, and match them against the output.

Output file ``i`` keeps its input shard for good: shards already in the output keep their
index (matched by input URI); a new shard takes its position in the sorted input if that
index is free, else the next index past the end. On a fresh output index ``i`` is the
``i``-th input shard. A shard whose input changed since its
commit (size or ETag) is planned again; an output holding another model's results, or another
modality's (pairs, image-only, text-only), is refused. A shard of another model or modality that
embedded nothing (every sample an error row) holds no results to mix with: it is planned again.

The output's markers are read through their index (core/marker_index.py): a plan over C committed and D
new or changed shards costs a few requests, the LISTs' pages and O(D) GETs, not a GET per marker.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from clipbatch.core import commit, layout
from clipbatch.core.marker_index import refresh as indexed_markers
from clipbatch.core.inputs import InputError, plan_inputs
from clipbatch.core.report import keep_replaced_stats
from clipbatch.orchestration.models import check_model, fingerprint
from clipbatch.core.storage import FILE_SCHEME, Storage, StorageError, is_s3, open_storage
from clipbatch.core.specs import JobSpec, ModelSpec, SpecError

EMBED_KINDS = ("embed", "score")  # one output may take both: the same files, scores always written
MODALITY_WORDS = {"pairs": "pair embeddings and scores", "image": "image-only embeddings",
                  "text": "text-only embeddings"}


@dataclass
class Plan:
    spec: JobSpec  # normalised, with its model fingerprint
    shards: dict[int, str]  # output index -> input URI, for every input shard
    committed: dict[int, dict[str, Any]]  # index -> marker, for shards with nothing to do
    todo: list[int]  # indices to enqueue
    rescored: list[int]  # indices whose input changed since their commit (their markers were dropped)
    versions: dict[int, str] = field(default_factory=dict)  # index -> the input's ETag the plan saw


def absolute(uri: str) -> str:
    """Local paths travel as absolute paths: a worker does not share the producer's cwd."""
    if is_s3(uri):
        return uri
    path = uri[len(FILE_SCHEME):] if uri.startswith(FILE_SCHEME) else uri
    return str(Path(path).expanduser().absolute())


def normalise(spec: JobSpec) -> JobSpec:
    """Check what can be checked here, make local paths absolute, stamp the model fingerprint."""
    spec.validate()
    model = normalise_model(spec.model)
    spec = replace(spec, input=spec.input if "{" in spec.input else absolute(spec.input),
                   output=absolute(spec.output), model=model)
    return replace(spec, fingerprint=fingerprint(model, spec.modality))


def normalise_model(model: ModelSpec) -> ModelSpec:
    """Refuse an unknown model or a missing checkpoint; local checkpoint paths become absolute."""
    check_model(model)
    pretrained = model.pretrained
    if pretrained and is_s3(pretrained):
        parent, _, name = pretrained.rpartition("/")
        if not open_storage(parent).exists(name):
            raise SpecError("pretrained", f"{pretrained!r}: no such object")
    elif pretrained and (os.sep in pretrained or Path(pretrained).suffix):
        if not Path(pretrained).expanduser().is_file():
            raise SpecError("pretrained", f"{pretrained!r}: no such checkpoint file")
        pretrained = absolute(pretrained)
        _check_checkpoint_bytes(pretrained)
    return ModelSpec(model.name, pretrained, model.config)


def _check_checkpoint_bytes(path: str) -> None:
    """Refuse a file that cannot be a checkpoint (torch zip or pickle, safetensors, npz) before any worker tries."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise SpecError("pretrained", f"{path!r} is not readable ({exc})") from None
    torch_file = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"  # torch's zip format, or its legacy one
    safetensors = path.endswith(".safetensors") and head[8:9] == b"{"
    if not (torch_file or safetensors):
        raise SpecError("pretrained", f"{path!r} is not a checkpoint (not a torch, safetensors or npz file)")


def _writable(spec: JobSpec) -> Storage:
    try:
        storage = open_storage(spec.output)
        # two exclusive creates of one key: the first proves the output writable, the second must be refused
        honoured = commit.honours_conditional_puts(storage, f"{layout.PROBE_DIR}/{uuid.uuid4().hex}")
    except (StorageError, OSError) as exc:
        raise SpecError("output", f"{spec.output!r} is not writable: {exc}") from None
    if not honoured:
        raise SpecError("output", f"{spec.output!r}: the store ignores conditional writes (If-None-Match: *), so "
                                  "two attempts at one shard could both commit; use a store that honours them "
                                  "(AWS S3, MinIO, moto, a local folder)")
    return storage


def own_markers(storage: Storage, kind: str, inputs: list[str]) -> dict[int, dict[str, Any]]:
    """The output's markers, each checked to be this plan's: of ``kind``, index ``j`` holding ``inputs[j]``.

    An output that holds another kind of job's results, or another plan's, is refused: counting
    those markers as this job's would report shards done that this job never wrote.
    """
    markers = indexed_markers(storage)  # under the output's lease: the index may be written
    for index, marker in sorted(markers.items()):
        theirs = marker.get("kind")
        if theirs != kind or index >= len(inputs) or marker.get("input") != inputs[index]:
            raise SpecError("output", f"{storage.uri} holds other results (shard {index}: a {theirs} job's, of "
                                      f"{marker.get('input')}); use a separate output for each job of this kind")
    return markers


def _superseded(storage: Storage, markers: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The superseded markers of indices that hold no marker now (a plan that rescored them crashed
    before their new commit): one LIST, and a GET only for those, not for every shard ever rescored."""
    found = {}
    for key in storage.list(layout.SUPERSEDED_DIR + "/"):
        i = layout.superseded_index(key)
        if i is not None and i not in markers:
            found[i] = json.loads(storage.read(key))
    return found


def _free_index(position: int, taken: set[int]) -> int:
    """A new shard's index: its sorted position if free (always, on a fresh output), else past the end."""
    if position not in taken:
        return position
    return max(taken) + 1


def _check_markers(spec: JobSpec, markers: dict[int, dict[str, Any]]) -> set[int]:
    """Refuse an output holding another kind's, model's or modality's results; return the indices of
    other-fingerprint shards that embedded nothing (planned again under this job's)."""
    empty = set()
    for index, marker in markers.items():
        if marker.get("kind", "embed") not in EMBED_KINDS:
            raise SpecError("output", f"{spec.output} holds a {marker['kind']} job's results (shard {index}); "
                                      "use a separate output")
        if marker.get("fingerprint") == spec.fingerprint:
            continue
        if not marker.get("samples_ok"):
            empty.add(index)
            continue
        theirs = marker.get("modality", "pairs")
        if theirs != spec.modality:
            option = "modality" if spec.kind == "embed" else "output"
            raise SpecError(option, f"{spec.output} holds {MODALITY_WORDS[theirs]} (shard {index}, --modality "
                                    f"{theirs}); this {spec.kind} job makes {MODALITY_WORDS[spec.modality]}: use a "
                                    "separate output per modality")
        raise SpecError(
            "output",
            f"{spec.output} holds results of another model (shard {index}: {marker.get('model')}, "
            f"fingerprint {marker.get('fingerprint')}; this job: {spec.model.name}, {spec.fingerprint}); "
            "use a separate output per model",
        )
    return empty


def plan(spec: JobSpec) -> Plan:
    spec = normalise(spec)
    try:
        input_format, inputs = plan_inputs(spec)
    except InputError as exc:
        raise SpecError("input", str(exc)) from None
    spec = replace(spec, input_format=input_format)  # workers get the resolved format
    storage = _writable(spec)
    markers = indexed_markers(storage)  # under the output's lease: the index may be written
    empty_elsewhere = _check_markers(spec, markers)
    unfinished = commit.unfinished(markers, commit.staged_attempts(storage))
    for indices in commit.committed_twice(markers).values():  # left by overlapping plans: keep the first
        for index in indices[1:]:
            commit.retire(storage, markers.pop(index))
    superseded = _superseded(storage, markers)
    by_input = {m["input"]: (i, None) for i, m in superseded.items() if i not in markers}
    by_input.update({m["input"]: (i, m) for i, m in markers.items()})
    taken = {i for i, _ in by_input.values()}
    shards: dict[int, str] = {}
    versions: dict[int, str] = {}
    committed: dict[int, dict[str, Any]] = {}
    todo: list[int] = []
    rescored: list[int] = []
    for position, shard in enumerate(inputs):
        if shard.uri in by_input:
            index, marker = by_input[shard.uri]
            keep = marker is not None and index not in empty_elsewhere \
                and (marker.get("input_size"), marker.get("input_etag")) == (shard.size, shard.etag)
            if keep:
                if index in unfinished:  # committed, files not all in place: a worker finishes the move
                    todo.append(index)
                else:
                    committed[index] = marker
            else:
                if marker is not None:
                    storage.write(layout.superseded(index), json.dumps(marker).encode())
                    keep_replaced_stats(storage, index)  # the job's end takes them out of the report
                    storage.delete(layout.marker(index))
                rescored.append(index)
                todo.append(index)
        else:
            index = _free_index(position, taken)
            todo.append(index)
        taken.add(index)
        shards[index] = shard.uri
        versions[index] = shard.etag
    return Plan(spec, shards, committed, todo, rescored, versions)
