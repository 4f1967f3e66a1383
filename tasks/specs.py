"""The wire contract: frozen specs that travel as JSON between producer and workers."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from orchestration.config import DEFAULT_QUEUE

KINDS = ("embed", "score")
DEFAULT_BATCH_SIZE = 256
MAX_BATCH_SIZE = 65536
_QUEUE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


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

    def validate(self) -> None:
        if not self.name or not self.name.strip():
            raise SpecError("model", "give an open_clip model name, e.g. ViT-B-32 or clipbatch-tiny")
        if self.pretrained is not None and not self.pretrained.strip():
            raise SpecError("pretrained", "is empty; give a tag, a checkpoint path or an s3:// URI")
        if self.config is not None:
            if not isinstance(self.config, dict):
                raise SpecError("model_config", "must be a JSON object")
            missing = [k for k in _CONFIG_KEYS if k not in self.config]
            if missing:
                raise SpecError("model_config", f"not an open_clip model config (missing {', '.join(missing)})")


@dataclass(frozen=True)
class JobSpec:
    """An embed or score job: every input shard becomes one shard task.

    Both kinds embed images and captions and score each pair; ``embeddings=False`` (score
    jobs only) skips writing the embedding arrays. ``fingerprint`` identifies the model
    (name, weights, preprocessing); the producer sets it at submit.
    """

    input: str
    output: str
    model: ModelSpec
    batch_size: int = DEFAULT_BATCH_SIZE
    queue: str = DEFAULT_QUEUE
    kind: str = "embed"
    embeddings: bool = True
    fingerprint: str | None = None

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise SpecError("kind", f"{self.kind!r} is not one of {', '.join(KINDS)}")
        if not self.embeddings and self.kind != "score":
            raise SpecError("no_embeddings", "only a score job may skip writing embeddings")
        if not self.input or not self.input.strip():
            raise SpecError("input", "give a shard path, brace pattern, folder or s3:// prefix")
        if not self.output or not self.output.strip():
            raise SpecError("output", "give an output folder or s3://bucket/prefix")
        if self.output.startswith("s3://") and not self.output[5:].split("/")[0]:
            raise SpecError("output", f"{self.output!r} has no bucket name")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise SpecError("batch_size", f"{self.batch_size!r} is not an integer")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise SpecError("batch_size", f"{self.batch_size} must be between 1 and {MAX_BATCH_SIZE}")
        if not _QUEUE_RE.match(self.queue or ""):
            raise SpecError("queue", f"{self.queue!r} is not a queue name (letters, digits, _ . : -)")
        self.model.validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        known = {f.name for f in fields(cls)}
        args = {k: v for k, v in data.items() if k in known}
        args["model"] = ModelSpec(**data["model"])
        return cls(**args)


@dataclass(frozen=True)
class ShardSpec:
    """One message on the queue: shard ``index`` of a job, read from ``input``."""

    job_id: str
    index: int
    input: str
    job: JobSpec

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "index": self.index, "input": self.input, "job": self.job.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardSpec:
        return cls(data["job_id"], int(data["index"]), data["input"], JobSpec.from_dict(data["job"]))
