"""clipbatch: batch CLIP embedding, scoring and fine-tuning over image-text shards.

The namespace holds four parts (see README "Architecture"): ``clipbatch.core`` (shared by both
sides), ``clipbatch.orchestration`` (the producer), ``clipbatch.tasks`` (Celery, where tasks
run) and ``clipbatch.workers`` (the compute). This package itself holds only the entry points
that join the two sides: the ``clipbatch`` command, the demo and the sample-data builders.

``from clipbatch import Client`` loads the producer's client on first use.
"""
from __future__ import annotations

from typing import Any

__all__ = ["Client", "Job"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from clipbatch.orchestration import client

        return getattr(client, name)
    raise AttributeError(f"module 'clipbatch' has no attribute {name!r}")
