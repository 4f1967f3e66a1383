"""clipbatch's producer side: plan, submit and watch jobs. Never imports torch.

``from clipbatch.orchestration import Client`` loads the client on first use, so that importing a
small module of this package does not pull in the whole client.
"""
from __future__ import annotations

from typing import Any

__all__ = ["Client", "Job"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from clipbatch.orchestration import client

        return getattr(client, name)
    raise AttributeError(f"module 'clipbatch.orchestration' has no attribute {name!r}")
