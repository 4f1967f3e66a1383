"""The workers' Celery app: the shared configuration with every task module and worker hook loaded.

``celery -A clipbatch.tasks.app`` (inspect, flower) and ``clipbatch worker`` use this app.
"""
from __future__ import annotations

from clipbatch.core.broker import make_app

TASK_MODULES = ("clipbatch.tasks.embed", "clipbatch.tasks.training_shards", "clipbatch.tasks.curation",
                "clipbatch.tasks.finetune", "clipbatch.tasks.finalize", "clipbatch.tasks.hooks")

app = make_app(include=TASK_MODULES)
