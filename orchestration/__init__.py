"""clipbatch's producer side: plan, submit and watch jobs. Never imports torch."""
from __future__ import annotations

from orchestration.client import Client, Job

__all__ = ["Client", "Job"]
