"""Observability with a real worker: its Prometheus endpoint scraped during and after a job, and
the Celery task events Flower consumes."""
from __future__ import annotations

import json
import threading
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clipbatch.orchestration.client import Client
from clipbatch.core.config import Settings
from clipbatch.core.broker import EMBED_SHARD, make_app
from clipbatch.core.specs import JobSpec, ModelSpec
from clipbatch.tasks.metrics import OTHER_REASON, reason_category
from tests.conftest import free_port, service_env, wait_for
from clipbatch.sample_data import build_collection

pytestmark = pytest.mark.integration
SHARDS, SAMPLES_PER_SHARD = 3, 150


@pytest.fixture(scope="module")
def metric_shards(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """Shards long enough (seconds each) that a scrape lands while one is running."""
    folder = tmp_path_factory.mktemp("metric-shards")
    return folder, build_collection(folder, shards=SHARDS, samples_per_shard=SAMPLES_PER_SHARD, seed=5)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """One scrape as {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class EventLog:
    """Captures Celery events from the broker, as Flower does, in a thread."""

    def __init__(self, redis_url: str) -> None:
        self.app = make_app(Settings(**{**Settings.from_env().__dict__, "broker_url": redis_url}))
        self.events: list[dict] = []
        self.ready = threading.Event()
        self._receiver = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self.ready.wait(30), "event receiver did not start"

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            self._receiver = self.app.events.Receiver(conn, handlers={"*": self.events.append})
            self.ready.set()
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def stop(self) -> None:
        self._receiver.should_stop = True
        self._thread.join(timeout=10)


def test_worker_metrics_scraped_during_a_job_and_flower_events(redis_url, metric_shards, checkpoint, tmp_path,
                                                               start_worker):
    # given: a worker serving metrics on a free port, and an event receiver like Flower's
    folder, built = metric_shards
    port, queue, out = free_port(), f"metrics-{uuid.uuid4().hex[:8]}", tmp_path / "out"
    worker = start_worker(queue, service_env(redis_url, CLIPBATCH_METRICS_PORT=str(port)))
    before = scrape(port)
    assert value(before, "clipbatch_shards_in_flight") == 0
    assert value(before, "clipbatch_samples_processed_total") == 0
    events = EventLog(redis_url)

    # when: a job runs, scraped every 50 ms until a scrape sees a shard in flight
    client = Client(Settings(**{**Settings.from_env().__dict__, "broker_url": redis_url}))
    job = client.submit(JobSpec(str(folder), str(out), ModelSpec("clipbatch-tiny", str(checkpoint)), batch_size=16,
                                queue=queue))
    during: dict = {}

    def in_flight() -> bool:
        nonlocal during
        during = scrape(port)
        return value(during, "clipbatch_shards_in_flight") == 1

    wait_for(in_flight, 120, "a scrape with a shard in flight", interval_s=0.05)
    status = job.wait(timeout_s=300)
    wait_for(lambda: value(scrape(port), "clipbatch_shards_total", outcome="committed") == SHARDS, 30,
             "the last shard's metrics")
    after = scrape(port)
    events.stop()

    # then: mid-job the endpoint showed the running shard; at the end the counts equal the job's
    assert status["state"] == "succeeded"
    print(f"\n[metrics] mid-job: in_flight={value(during, 'clipbatch_shards_in_flight')}, "
          f"samples so far={value(during, 'clipbatch_samples_processed_total')}; "
          f"after: samples={value(after, 'clipbatch_samples_processed_total')}, "
          f"samples/s={value(after, 'clipbatch_samples_per_second'):.1f}")
    assert value(during, "clipbatch_samples_processed_total") < built["good"]
    assert value(after, "clipbatch_samples_processed_total") == built["good"] == status["samples_done"]
    assert value(after, "clipbatch_shards_in_flight") == 0
    reasons: dict[str, int] = {}
    for i in range(SHARDS):
        for reason, n in json.loads((out / f"stats/{i}.json").read_text())["error_reasons"].items():
            reasons[reason_category(reason)] = reasons.get(reason_category(reason), 0) + n
    exported = {dict(labels)["reason"]: v for (name, labels), v in after.items() if name == "clipbatch_sample_errors_total"}
    assert exported == reasons and sum(exported.values()) == built["corrupt"] and OTHER_REASON not in exported
    assert value(after, "clipbatch_shard_duration_seconds_count", phase="total") == SHARDS
    assert value(after, "clipbatch_shard_duration_seconds_count", phase="compute") == SHARDS
    assert value(after, "clipbatch_shard_duration_seconds_sum", phase="compute") > 0
    assert value(after, "clipbatch_samples_per_second") > 0
    assert value(after, "clipbatch_model_load_seconds_count") == 1
    assert not any(name.startswith("clipbatch_gpu_memory") for name, _ in after)  # a CPU worker has no GPU series
    assert "Signal handler" not in worker.log()  # Celery logs a failing metrics hook this way
    # the commit log line carries the overhead split
    assert worker.log().count("shard committed") == SHARDS
    assert all(f" {k}=" in line for line in worker.log().splitlines() if "shard committed" in line
               for k in ("seconds", "setup_s", "compute_s", "commit_s"))
    # Flower's feed: the task events of every shard arrived through the broker
    types = [e["type"] for e in events.events]
    succeeded = [e for e in events.events if e["type"] == "task-succeeded"]
    received = [e for e in events.events if e["type"] == "task-received" and e.get("name") == EMBED_SHARD]
    assert len(received) == SHARDS and len(succeeded) == SHARDS, types
    assert "worker-heartbeat" in types
