"""clipbatch's producer side: plan, submit and watch jobs. Never imports torch.

``from orchestration import Client`` loads the client on first use, so that importing a
small module of this package (config, keys, storage) does not pull in the whole producer.
"""
from __future__ import annotations

from typing import Any

__all__ = ["Client", "Job"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from orchestration import client

        return getattr(client, name)
    raise AttributeError(f"module 'orchestration' has no attribute {name!r}")
