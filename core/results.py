"""What one shard attempt produced, as the shard life cycle (tasks/lifecycle.py) commits and counts it.

Every kind of shard compute returns a :class:`ShardResult`: embedding, a training-shard tar, a
curation stage, a fine-tuning step. It lives in the core so a task gets the type without loading
the compute that makes it (torch, open_clip, faiss).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Files = dict[str, bytes]  # an attempt's output files: key under the output -> bytes


@dataclass
class ShardResult:
    """Everything one attempt produced: output files by key, and the counts for the marker."""

    files: Files
    samples_ok: int
    samples_failed: int
    input_size: int
    input_etag: str
    record: dict[str, Any] = field(default_factory=dict)  # extra fields for the commit marker
