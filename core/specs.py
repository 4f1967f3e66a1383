"""The wire contract: frozen specs that travel as JSON between producer and workers."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from clipbatch.core.config import DEFAULT_QUEUE

KINDS = ("embed", "score")
INPUT_FORMATS = ("auto", "webdataset", "parquet", "folder", "manifest")
# What an embed job embeds: image-caption pairs (both towers, clip_score), images only, or captions only.
MODALITIES = ("pairs", "image", "text")
JSON_FIELD_PREFIX = "json:"  # --caption-col json:FIELD on tars: the caption is a field of the json sidecar
# Batch sizes the worker picks for a job that gives none, by its device: a CUDA worker starts
# at the larger one and halves it on out-of-memory (workers/compute.py BatchLimit).
DEFAULT_BATCH_SIZE = 256
DEFAULT_CUDA_BATCH_SIZE = 1024
# Samples per shard task of a folder or manifest input (img2dataset's shard size).
DEFAULT_SAMPLES_PER_INPUT_SHARD = 10000
DEFAULT_SAMPLES_PER_TRAIN_SHARD = 10000
# Pairs per dedup task on average (k-means clusters = selected pairs / this); at most this many
# selected pairs are deduped exactly, in one task (core/curation.py).
DEFAULT_CLUSTER_SIZE = 2000
MAX_BATCH_SIZE = 65536
_QUEUE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
# Model names: an open_clip name (letters, digits, _ . + @ -), or open_clip's hf-hub:ORG/REPO and
# local-dir:/PATH forms; never '..', and a separator only in those forms, so a name cannot be a path.
_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+@-]{0,199}")  # each one whole (fullmatch)
_MODEL_SCHEMES = {"hf-hub:": re.compile(r"[A-Za-z0-9][\w.-]{0,99}/[A-Za-z0-9][\w.-]{0,99}"),
                  "local-dir:": re.compile(r"/[^\x00-\x1f]{1,1000}")}


class SpecError(ValueError):
    """A job spec a user got wrong; ``field`` is the CLI option to fix."""

    def __init__(self, field_name: str, message: str) -> None:
        self.field = field_name
        super().__init__(f"{option_name(field_name)}: {message}")


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


@dataclass(frozen=True)
class ModelSpec:
    """Which network to run: an open_clip name plus a tag, a checkpoint path or an s3:// URI."""

    name: str
    pretrained: str | None = None
    config: dict[str, Any] | None = None  # the JSON of --model-config, shipped to the workers

    @property
    def scheme(self) -> str | None:
        """The open_clip name schema (``hf-hub:``, ``local-dir:``) the name starts with, if any."""
        return next((scheme for scheme in _MODEL_SCHEMES if self.name.startswith(scheme)), None)

    def validate(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise SpecError("model", "give an open_clip model name, e.g. ViT-B-32 or clipbatch-tiny")
        self._validate_name()
        if self.pretrained is not None and not self.pretrained.strip():
            raise SpecError("pretrained", "is empty; give a tag, a checkpoint path or an s3:// URI")
        if self.config is not None:
            if not isinstance(self.config, dict):
                raise SpecError("model_config", "must be a JSON object")
            missing = [k for k in _CONFIG_KEYS if k not in self.config]
            if missing:
                raise SpecError("model_config", f"not an open_clip model config (missing {', '.join(missing)})")
            if self.scheme:
                raise SpecError("model_config", f"names a new architecture: give it a plain --model name, "
                                                f"not {self.name!r}")

    def _validate_name(self) -> None:
        """A model name is a name, never a path: workers must not be steered outside their folders."""
        scheme = self.scheme
        rest = self.name[len(scheme):] if scheme else self.name
        pattern = _MODEL_SCHEMES[scheme] if scheme else _MODEL_NAME_RE
        if not pattern.fullmatch(rest) or ".." in rest.split("/") or (not scheme and ".." in rest):
            raise SpecError("model", f"{self.name!r} is not a model name (letters, digits, _ . + @ -, no '..'; "
                                     "or hf-hub:ORG/REPO, local-dir:/PATH)")


@dataclass(frozen=True)
class JobSpec:
    """An embed or score job: every input shard becomes one shard task.

    Both kinds embed images and captions and score each pair; ``embeddings=False`` (score
    jobs only) skips writing the embedding arrays. ``modality`` (embed jobs) may instead embed
    images only or captions only: each tower runs only for what it needs. ``fingerprint``
    identifies the model (name, weights, preprocessing, and a modality other than pairs); the
    producer sets it at submit. ``input_format`` is resolved from ``auto`` at submit; the column
    names apply to parquet and manifest inputs (on tars, ``image_col``/``caption_col`` name the
    member extension, or ``json:FIELD`` of the json sidecar for the caption), ``samples_per_shard``
    to folder and manifest inputs (and splits parquet files by row group).
    """

    input: str
    output: str
    model: ModelSpec
    batch_size: int | None = None  # None: the worker chooses for its device (batch_size_on)
    queue: str = DEFAULT_QUEUE
    kind: str = "embed"
    embeddings: bool = True
    fingerprint: str | None = None
    input_format: str = "auto"
    image_col: str | None = None
    caption_col: str | None = None
    key_col: str | None = None
    samples_per_shard: int | None = None
    modality: str = "pairs"

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise SpecError("kind", f"{self.kind!r} is not one of {', '.join(KINDS)}")
        if self.modality not in MODALITIES:
            raise SpecError("modality", f"{self.modality!r} is not one of {', '.join(MODALITIES)}")
        if self.kind == "score" and self.modality != "pairs":
            raise SpecError("modality", "a score job scores image-caption pairs; embed images or captions alone "
                                        "with an embed job")
        if not self.embeddings and self.kind != "score":
            raise SpecError("no_embeddings", "only a score job may skip writing embeddings")
        if not self.input or not self.input.strip():
            raise SpecError("input", "give a shard path, brace pattern, folder or s3:// prefix")
        if not self.output or not self.output.strip():
            raise SpecError("output", "give an output folder or s3://bucket/prefix")
        if self.output.startswith("s3://") and not self.output[5:].split("/")[0]:
            raise SpecError("output", f"{self.output!r} has no bucket name")
        n = self.batch_size
        if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
            raise SpecError("batch_size", f"{n!r} is not an integer")
        if n is not None and not 1 <= n <= MAX_BATCH_SIZE:
            raise SpecError("batch_size", f"{self.batch_size} must be between 1 and {MAX_BATCH_SIZE}")
        if not _QUEUE_RE.match(self.queue or ""):
            raise SpecError("queue", f"{self.queue!r} is not a queue name (letters, digits, _ . : -)")
        self._validate_input_options()
        self.model.validate()

    def _validate_input_options(self) -> None:
        if self.input_format not in INPUT_FORMATS:
            raise SpecError("input_format", f"{self.input_format!r} is not one of {', '.join(INPUT_FORMATS)}")
        for name in ("image_col", "caption_col", "key_col"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise SpecError(name, f"{value!r} is not a column name")
        caption = self.caption_col or ""
        if caption.startswith(JSON_FIELD_PREFIX) and not caption[len(JSON_FIELD_PREFIX):].strip():
            raise SpecError("caption_col", "json: names a field of the json sidecar, e.g. json:caption")
        n = self.samples_per_shard
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise SpecError("samples_per_shard", f"{n!r} must be a positive integer")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def batch_size_on(self, device_type: str) -> int:
        """The batch the worker collates: the job's, or the default for ``device_type``."""
        if self.batch_size is not None:
            return self.batch_size
        return DEFAULT_CUDA_BATCH_SIZE if device_type == "cuda" else DEFAULT_BATCH_SIZE

    def marker_fields(self) -> dict[str, Any]:
        """What every commit marker of this job records about how it was made."""
        return {"model": {"name": self.model.name, "pretrained": self.model.pretrained},
                "fingerprint": self.fingerprint, "modality": self.modality}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        known = {f.name for f in fields(cls)}
        args = {k: v for k, v in data.items() if k in known}
        args["model"] = ModelSpec(**data["model"])
        return cls(**args)


@dataclass(frozen=True)
class TrainShardsSpec:
    """Curate open_clip-ready training shards from a scored output: select, dedup, write.

    ``dedup_exact`` drops pairs whose image bytes equal a kept pair's; ``dedup_cosine`` those whose
    image embedding is this close to a kept pair's, within k-means clusters of about
    ``cluster_size`` selected pairs (one cluster, the exact greedy, when there are no more). A dedup task
    takes ``clusters_per_task`` consecutive clusters (None: about 100,000 selected pairs' worth).
    """

    scored: str
    output: str
    min_score: float | None = None
    top_fraction: float | None = None
    dedup_cosine: float | None = None
    samples_per_shard: int = DEFAULT_SAMPLES_PER_TRAIN_SHARD
    queue: str = DEFAULT_QUEUE
    kind: str = "shards"
    dedup_exact: bool = False
    cluster_size: int = DEFAULT_CLUSTER_SIZE
    clusters_per_task: int | None = None

    def validate(self) -> None:
        if not self.scored or not self.scored.strip():
            raise SpecError("scored", "give the output of a score (or embed) job")
        if not self.output or not self.output.strip():
            raise SpecError("output", "give an output folder or s3://bucket/prefix")
        if (self.min_score is None) == (self.top_fraction is None):
            raise SpecError("min_score", "give exactly one of --min-score and --top-fraction")
        if self.min_score is not None and not -1.0 <= self.min_score <= 1.0:
            raise SpecError("min_score", f"{self.min_score} is not a cosine in [-1, 1]")
        if self.top_fraction is not None and not 0.0 < self.top_fraction <= 1.0:
            raise SpecError("top_fraction", f"{self.top_fraction} must be in (0, 1]")
        if self.dedup_cosine is not None and not 0.0 < self.dedup_cosine <= 1.0:
            raise SpecError("dedup_cosine", f"{self.dedup_cosine} must be in (0, 1]")
        if isinstance(self.samples_per_shard, bool) or not isinstance(self.samples_per_shard, int) \
                or self.samples_per_shard < 1:
            raise SpecError("samples_per_shard", f"{self.samples_per_shard!r} must be a positive integer")
        if isinstance(self.cluster_size, bool) or not isinstance(self.cluster_size, int) or self.cluster_size < 2:
            raise SpecError("cluster_size", f"{self.cluster_size!r} must be an integer of at least 2")
        if self.clusters_per_task is not None and (isinstance(self.clusters_per_task, bool) or not isinstance(
                self.clusters_per_task, int) or self.clusters_per_task < 1):
            raise SpecError("clusters_per_task", f"{self.clusters_per_task!r} must be a positive integer")
        if not isinstance(self.dedup_exact, bool):
            raise SpecError("dedup_exact", f"{self.dedup_exact!r} must be true or false")
        if not _QUEUE_RE.match(self.queue or ""):
            raise SpecError("queue", f"{self.queue!r} is not a queue name (letters, digits, _ . : -)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def marker_fields(self) -> dict[str, Any]:
        return {"scored": self.scored}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainShardsSpec:
        return cls(**{k: v for k, v in data.items() if k in {f.name for f in fields(cls)}})


PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class FinetuneSpec:
    """Contrastive fine-tuning as a chain of shard steps: step ``k`` trains on ``shards[k % len]``."""

    train: str
    output: str
    model: ModelSpec
    epochs: int = 1
    lr: float = 5e-4
    batch_size: int = 64
    lock_image: bool = False
    precision: str = "fp32"
    weight_decay: float = 0.1
    seed: int = 0
    queue: str = DEFAULT_QUEUE
    shards: tuple[str, ...] = ()  # the expanded training shards, set by the producer
    kind: str = "finetune"

    @property
    def steps(self) -> int:
        return self.epochs * len(self.shards)

    def validate(self) -> None:
        if not self.train or not self.train.strip():
            raise SpecError("train", "give training shards, e.g. 's3://bkt/train/{00000..00099}.tar'")
        if not self.output or not self.output.strip():
            raise SpecError("output", "give an output folder or s3://bucket/prefix")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(name, f"{value!r} must be a positive integer")
        if not 0 < self.lr < 1:
            raise SpecError("lr", f"{self.lr} must be in (0, 1)")
        if self.precision not in PRECISIONS:
            raise SpecError("precision", f"{self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if not _QUEUE_RE.match(self.queue or ""):
            raise SpecError("queue", f"{self.queue!r} is not a queue name (letters, digits, _ . : -)")
        self.model.validate()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shards": list(self.shards)}

    def marker_fields(self) -> dict[str, Any]:
        return {"model": {"name": self.model.name, "pretrained": self.model.pretrained}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneSpec:
        args = {k: v for k, v in data.items() if k in {f.name for f in fields(cls)}}
        return cls(**{**args, "model": ModelSpec(**data["model"]), "shards": tuple(data.get("shards", ()))})


def job_from_dict(data: dict[str, Any]) -> JobSpec | TrainShardsSpec | FinetuneSpec:
    kinds: dict[str, type[TrainShardsSpec] | type[FinetuneSpec]] = {"shards": TrainShardsSpec,
                                                                     "finetune": FinetuneSpec}
    return kinds.get(data.get("kind", ""), JobSpec).from_dict(data)


@dataclass(frozen=True)
class ShardSpec:
    """One message on the queue: shard ``index`` of a job, read from ``input``.

    A folder, manifest or row-group shard carries its range in ``input`` as a fragment
    (``data.jsonl#rows=0-10000``, see core/inputs.py): that string is its identity.

    On the wire a message carries the shard's identity only, ``[job_id, index, input, version]``
    (:meth:`message`); the job's spec is stored once, in its Redis record, and a worker looks it
    up by job id (:meth:`from_message`). This is the one wire format (docs/reliability.md, "Wire
    format"): no other is read.
    """

    job_id: str
    index: int
    input: str
    job: JobSpec | TrainShardsSpec | FinetuneSpec
    # The input's version (ETag or range digest) the plan saw; a commit found at the index must
    # be of it. None where the plan has no versions (training shards, fine-tune steps).
    input_etag: str | None = None

    def message(self) -> list[Any]:
        """The message's arguments: the shard's identity, not its job's spec."""
        return [self.job_id, self.index, self.input, self.input_etag]

    @classmethod
    def from_message(cls, args: list[Any], job: JobSpec | TrainShardsSpec | FinetuneSpec) -> ShardSpec:
        job_id, index, uri, *version = args
        return cls(job_id, int(index), uri, job, version[0] if version else None)
