"""The scheduler: Celery beat submits each dataset's score job at its cron time.

Beat runs embedded in a small worker on its own queue; that worker runs the submit task
(producer code, no torch), so a scheduled submission goes through the ordinary Client.
"""
from __future__ import annotations

import logging
from typing import Any

from celery import Celery, shared_task
from celery.schedules import crontab

from clipbatch.orchestration.schedule_file import cron_fields, dataset_spec
from clipbatch.core.broker import make_app

SUBMIT_DATASET = "clipbatch.submit_dataset"
SCHEDULER_QUEUE = "clipbatch-scheduler"
log = logging.getLogger("clipbatch.scheduler")


@shared_task(name=SUBMIT_DATASET)
def submit_dataset(dataset: dict[str, Any]) -> str | None:
    """Submit one run; a run refused (say, the last one has not ended: one job per output) is logged
    and skipped, and the next cron time submits again."""
    from clipbatch.core.specs import SpecError
    from clipbatch.orchestration.client import Client

    try:
        job = Client().submit(dataset_spec(dataset))
    except SpecError as exc:
        log.warning("scheduled job not submitted dataset=%s reason=%s", dataset["name"], exc)
        return None
    log.info("scheduled job submitted dataset=%s job=%s", dataset["name"], job.job_id)
    return job.job_id


def make_scheduler_app(datasets: list[dict[str, Any]]) -> Celery:
    app = make_app(include=("clipbatch.orchestration.scheduler",))
    app.conf.timezone = "UTC"
    app.conf.beat_schedule = {
        d["name"]: {"task": SUBMIT_DATASET, "schedule": crontab(**cron_fields(d["cron"])), "args": [d],
                    "options": {"queue": SCHEDULER_QUEUE}}
        for d in datasets
    }
    return app
