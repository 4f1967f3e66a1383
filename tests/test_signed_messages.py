"""Signed messages (opt-in): with CLIPBATCH_SIGNING_* set, a job's signed messages run on a real
worker, while a message injected straight into the queue unsigned, or signed by a key the worker
does not trust, is refused, dead-lettered and never run. So is what an attacker with Redis write
access and no key changes behind the messages: an entry pushed onto a job's pending list, a job's
spec rewritten in its record. Cancel removes a job's signed messages from the queue."""
from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from clipbatch.core import commit, feed, keys
from clipbatch.core.broker import EMBED_SHARD, make_app
from clipbatch.core.config import Settings
from clipbatch.core.curation import load_plan, task_input
from clipbatch.core.signing import Refused, Signer, Signing, Verifier, derivable
from clipbatch.core.specs import FinetuneSpec, JobSpec, ModelSpec
from clipbatch.core.storage import open_storage
from tests.conftest import run_cli, service_env, wait_for
from tests.curation_data import plant, write_scored

pytestmark = pytest.mark.integration


def make_identity(folder: Path, name: str) -> tuple[Path, Path]:
    """An RSA key and a self-signed certificate for ``name`` (Celery's auth serializer signs with RSA)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    key_path, cert_path = folder / f"{name}.key", folder / f"{name}.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def signing_env(key: Path, cert: Path, store: Path) -> dict[str, str]:
    return {"CLIPBATCH_SIGNING_KEY": str(key), "CLIPBATCH_SIGNING_CERT": str(cert),
            "CLIPBATCH_SIGNING_CERT_STORE": str(store)}


def added_dead_letters(r: redis.Redis, since: int) -> list[dict]:
    """The dead-letter records added since the list held ``since`` (newest first)."""
    added = r.llen(keys.DEAD_LETTERS) - since
    return [json.loads(x) for x in r.lrange(keys.DEAD_LETTERS, 0, added - 1)] if added > 0 else []


SEND_SIGNED = """
import sys
from clipbatch.core.broker import EMBED_SHARD, make_app
make_app().send_task(EMBED_SHARD, args=[sys.argv[1], 0], queue=sys.argv[2])
"""


def test_only_messages_signed_by_a_trusted_key_run(redis_url, photo_shards, checkpoint, tmp_path, start_worker):
    # given: a producer and a worker identity, both trusted; an intruder whose certificate is not
    pki = tmp_path / "pki"
    store = pki / "trusted"
    store.mkdir(parents=True)
    producer, worker_id = make_identity(pki, "producer"), make_identity(pki, "worker")
    intruder = make_identity(pki, "intruder")
    for _, cert in (producer, worker_id):
        (store / cert.name).write_bytes(cert.read_bytes())
    queue = f"signed-{uuid.uuid4().hex[:8]}"
    worker = start_worker(queue, service_env(redis_url, **signing_env(*worker_id, store)))
    producer_env = service_env(redis_url, **signing_env(*producer, store))
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    dead_before = r.llen("clipbatch:dead_letters")

    # when: a job is submitted with signing on
    folder, _ = photo_shards
    result = run_cli("submit", "embed", "--input", str(folder / "00000.tar"), "--output", str(tmp_path / "out"),
                     "--model", "clipbatch-tiny", "--pretrained", str(checkpoint), "--queue", queue, "--wait",
                     "--json", env=producer_env)

    # then: its signed messages ran
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["state"] == "succeeded"
    starts = worker.log().count("shard start")

    # when: an unsigned message and one signed by the untrusted key go straight into the queue
    make_app(Settings(redis_url, 3600, 2, 3600)).send_task(EMBED_SHARD, args=[status["job_id"], 0], queue=queue)
    subprocess.run([sys.executable, "-c", SEND_SIGNED, status["job_id"], queue], check=True, timeout=120,
                   env=service_env(redis_url, **signing_env(*intruder, pki / "intruder.pem")))

    # then: both are dead-lettered with their reason, neither ran, and the job is untouched
    def refused() -> list[dict]:
        return [d for d in added_dead_letters(r, dead_before) if d["reason"].startswith("message refused, not run")]

    wait_for(lambda: len(refused()) >= 2, 60, "both messages to be dead-lettered")
    reasons = " ".join(d["reason"] for d in refused())
    assert "ContentDisallowed: Refusing to deserialize untrusted content of type json" in reasons, reasons
    assert "SecurityError(\"Unknown certificate: b'intruder" in reasons, reasons
    assert worker.log().count("shard start") == starts
    again = json.loads(run_cli("status", status["job_id"], "--json", env=producer_env).stdout)
    assert (again["state"], again["shards_done"], again["shards_failed"]) == ("succeeded", status["shards_done"], 0)


def test_partial_signing_settings_are_refused(monkeypatch):
    monkeypatch.setenv("CLIPBATCH_SIGNING_KEY", "/k.pem")
    with pytest.raises(ValueError, match="CLIPBATCH_SIGNING_CERT, CLIPBATCH_SIGNING_CERT_STORE"):
        Signing.from_env()


@pytest.fixture(scope="module")
def trusted(tmp_path_factory) -> tuple[dict[str, str], dict[str, str]]:
    """The signing settings of a producer and of a worker, each trusting both."""
    pki = tmp_path_factory.mktemp("pki")
    store = pki / "trusted"
    store.mkdir()
    producer, worker_id = make_identity(pki, "producer"), make_identity(pki, "worker")
    for _, cert in (producer, worker_id):
        (store / cert.name).write_bytes(cert.read_bytes())
    return signing_env(*producer, store), signing_env(*worker_id, store)


def submit(folder: Path, out: Path, checkpoint: Path, queue: str, env: dict[str, str]) -> str:
    """Submit an embed job of the three photo shards without waiting; its job id."""
    result = run_cli("submit", "embed", "--input", f"{folder}/{{00000..00002}}.tar", "--output", str(out), "--model",
                     "clipbatch-tiny", "--pretrained", str(checkpoint), "--queue", queue, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["job_id"]


def refusals(r: redis.Redis, since: int) -> list[dict]:
    """The dead-letter records of refused specs and entries added since the list held ``since``."""
    return [d for d in added_dead_letters(r, since) if d["reason"].startswith("refused, not run")]


def test_an_entry_pushed_onto_the_pending_list_without_the_producers_signature_never_runs(
        redis_url, photo_shards, checkpoint, tmp_path, start_worker, trusted):
    # given: a job of three shards submitted with signing on and a window of one message: two signed
    # entries wait in its pending list; a tar of photos outside the job's input
    producer, worker_env = trusted
    folder, _ = photo_shards
    secret = tmp_path / "secret" / "private.tar"
    secret.parent.mkdir()
    shutil.copy(folder / "00000.tar", secret)
    queue, out = f"signed-{uuid.uuid4().hex[:8]}", tmp_path / "out"
    env = service_env(redis_url, CLIPBATCH_QUEUE_WINDOW="1", **producer)
    job = submit(folder, out, checkpoint, queue, env)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    genuine = feed.decode(r.lindex(keys.job_pending(job), 0))  # with its signature, the fourth element
    assert r.llen(keys.job_pending(job)) == 2
    dead_before = r.llen(keys.DEAD_LETTERS)

    # when: an attacker with Redis write access and no key pushes, ahead of them, an unsigned entry
    # naming the secret tar at an index of its own, one with a genuine entry's signature but the
    # secret tar as its input, and one that is no entry at all; then a signing worker runs the job
    forged = [[9, str(secret), None], [genuine[0], str(secret), *genuine[2:]], "not an entry"]
    for entry in reversed(forged):  # the first is taken first
        r.lpush(keys.job_pending(job), json.dumps(entry))
    worker = start_worker(queue, service_env(redis_url, **worker_env))
    output = open_storage(str(out))

    def ended_or_read() -> bool:
        state = json.loads(run_cli("status", job, "--json", env=env).stdout)["state"]
        return state in ("succeeded", "failed") or commit.read_marker(output, 9) is not None

    wait_for(ended_or_read, 300, "the job to end")

    # then: it read nothing but its own three shards, counted three of three and succeeded
    markers = commit.list_markers(output)
    assert sorted(markers) == [0, 1, 2] and str(secret) not in {m["input"] for m in markers.values()}
    assert not [line for line in worker.log().splitlines() if "shard start" in line and str(secret) in line]
    status = json.loads(run_cli("status", job, "--json", env=env).stdout)
    assert (status["state"], status["shards_done"], status["shards_total"]) == ("succeeded", 3, 3), status
    # and: each forged entry was refused, dead-lettered and logged with its reason
    reasons = [d["reason"] for d in refusals(r, dead_before)]
    assert len(reasons) == 3, reasons
    assert any("[9, " in x and "not signed, and not derivable from the job's signed spec" in x for x in reasons)
    assert any("its signature does not verify with the key that signed the job's spec" in x for x in reasons)
    assert any("'\"not an entry\"' is not [index, input, version(, signature)]" in x for x in reasons)
    assert worker.log().count("shard refused") == 3


def test_a_spec_rewritten_in_redis_is_refused_and_nothing_is_written(
        redis_url, photo_shards, checkpoint, tmp_path, start_worker, trusted):
    # given: a job submitted with signing on, its three messages queued
    producer, worker_env = trusted
    folder, _ = photo_shards
    queue, out, elsewhere = f"signed-{uuid.uuid4().hex[:8]}", tmp_path / "out", tmp_path / "elsewhere"
    env = service_env(redis_url, **producer)
    job = submit(folder, out, checkpoint, queue, env)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    dead_before = r.llen(keys.DEAD_LETTERS)

    # when: an attacker rewrites the job's spec with HSET to write to another folder; a worker runs
    spec = json.loads(r.hget(keys.job(job), "spec"))
    r.hset(keys.job(job), mapping={"spec": json.dumps({**spec, "output": str(elsewhere)}), "output": str(elsewhere)})
    worker = start_worker(queue, service_env(redis_url, **worker_env))
    wait_for(lambda: len(refusals(r, dead_before)) >= 3 or elsewhere.exists(), 300,
             "the job's three messages to be refused")

    # then: nothing was written, nothing ran, every message was refused naming the spec, the job is as it was
    assert not elsewhere.exists() and commit.list_markers(open_storage(str(out))) == {}
    assert "shard start" not in worker.log()
    assert all(f"job {job}: its spec's signature does not verify" in d["reason"] for d in refusals(r, dead_before))
    status = json.loads(run_cli("status", job, "--json", env=env).stdout)
    assert (status["state"], status["shards_done"], status["shards_failed"]) == ("queued", 0, 0)


def test_cancel_with_signing_on_removes_the_jobs_signed_messages_from_the_queue(
        redis_url, photo_shards, checkpoint, tmp_path, trusted):
    # given: two jobs' signed messages queued in one queue, no worker
    producer, _ = trusted
    folder, _ = photo_shards
    queue = f"signed-{uuid.uuid4().hex[:8]}"
    env = service_env(redis_url, **producer)
    doomed = submit(folder, tmp_path / "a", checkpoint, queue, env)
    other = submit(folder, tmp_path / "b", checkpoint, queue, env)
    r = redis.Redis.from_url(redis_url)
    assert r.llen(queue) == 6

    # when: one is cancelled
    result = run_cli("cancel", doomed, env=env)

    # then: its three messages left the queue (what KEDA counts); the other job's stayed
    assert result.returncode == 0, result.stderr
    assert [feed.message_job(raw) for raw in r.lrange(queue, 0, -1)] == [other] * 3


def test_a_curation_job_runs_signed_its_later_stages_derived_from_the_spec(redis_url, tmp_path, start_worker, trusted):
    # given: a curation job submitted with signing on (the producer signs its first stage's entries; a
    # worker completing a stage creates the next stage's, unsigned), a window of two messages
    producer, worker_env = trusted
    scored_uri, _ = write_scored(tmp_path / "scored", plant(3000, seed=3, boundary_share=0.3), 3)
    queue, out = f"signed-{uuid.uuid4().hex[:8]}", tmp_path / "out"
    env = service_env(redis_url, CLIPBATCH_QUEUE_WINDOW="2", **producer)
    result = run_cli("submit", "shards", "--scored", scored_uri, "--output", str(out), "--top-fraction", "0.9",
                     "--dedup-cosine", "0.95", "--dedup-exact", "--cluster-size", "500", "--clusters-per-task", "2",
                     "--samples-per-shard", "1000", "--queue", queue, "--json", env=env)
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)["job_id"]
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    dead_before = r.llen(keys.DEAD_LETTERS)

    # when: an attacker pushes a dedup task, at its very index, before the stage before it ran (its input
    # would be half there); then a signing worker runs the job
    dedup = load_plan(open_storage(str(out))).base("dedup")
    r.lpush(keys.job_pending(job), json.dumps([dedup, task_input(str(out), "dedup", 0), None]))
    worker = start_worker(queue, service_env(redis_url, **worker_env))
    wait_for(lambda: (out / "_job.json").exists(), 600, "the job to end")

    # then: it succeeded, every stage's task ran; the early dedup task was refused, naming why
    status = json.loads(run_cli("status", job, "--json", env=env).stdout)
    assert (status["state"], status["shards_done"]) == ("succeeded", status["shards_total"]), status
    assert all(f"#{stage}=0" in worker.log() for stage in ("clusters", "assign", "dedup", "boundary", "write"))
    (refused,) = refusals(r, dead_before)
    assert refused["index"] == dedup and "a stage before its own is not committed yet" in refused["reason"]


@pytest.fixture()
def keyring(tmp_path) -> tuple[Signer, Signer, Verifier]:
    """Two trusted signers (a producer, a worker) and a verifier trusting both."""
    store = tmp_path / "trusted"
    store.mkdir()
    ids = [make_identity(tmp_path, name) for name in ("producer", "worker")]
    for _, cert in ids:
        (store / cert.name).write_bytes(cert.read_bytes())
    signers = [Signer(Signing(str(key), str(cert), str(store))) for key, cert in ids]
    return signers[0], signers[1], Verifier(Signing(str(ids[0][0]), str(ids[0][1]), str(store)))


def test_a_spec_signature_holds_for_its_job_and_spec_only(keyring):
    producer, _, verifier = keyring
    signature = producer.spec("job-a", '{"output": "/a"}')
    assert verifier.spec("job-a", '{"output": "/a"}', signature)
    for job, spec, sig in (("job-b", '{"output": "/a"}', signature), ("job-a", '{"output": "/b"}', signature),
                           ("job-a", '{"output": "/a"}', None), ("job-a", '{"output": "/a"}', "{}")):
        with pytest.raises(Refused, match=f"job {job}: its spec"):
            verifier.spec(job, spec, sig)


def test_an_entry_signature_holds_for_its_four_fields_and_its_specs_signer_only(keyring):
    producer, worker, verifier = keyring
    spec = FinetuneSpec("/t", "/o", ModelSpec("m"), shards=("/t/0.tar",))
    signer = verifier.spec("j", "{}", producer.spec("j", "{}"))
    (entry,) = producer.entries("j", [(3, "/in/3.tar", "v3")])
    verifier.entry(signer, spec, "j", entry)
    (by_worker,) = worker.entries("j", [(3, "/in/3.tar", "v3")])
    for changed in ((4, *entry[1:]), (3, "/in/4.tar", *entry[2:]), (3, "/in/3.tar", "v4", entry[3]), by_worker):
        with pytest.raises(Refused, match="its signature does not verify with the key that signed the job's spec"):
            verifier.entry(signer, spec, "j", changed)
    with pytest.raises(Refused, match="not derivable"):
        verifier.entry(signer, spec, "j", entry[:3])
    with pytest.raises(Refused, match="not \\[index, input, version"):
        verifier.entry(signer, spec, "j", (3,))
    with pytest.raises(Refused, match="of job k: its signature does not verify"):
        verifier.entry(signer, spec, "k", entry)


def test_a_fine_tunes_steps_are_derivable_from_its_spec_and_nothing_else_is():
    spec = FinetuneSpec("/t", "/o", ModelSpec("m"), epochs=2, shards=("/t/0.tar", "/t/1.tar"))
    assert [derivable(spec, k, spec.shards[k % 2], None) for k in range(4)] == [None] * 4
    assert "not step 1" in derivable(spec, 1, "/t/0.tar", None)
    assert "not step 4" in derivable(spec, 4, "/t/0.tar", None)
    assert "[index, input, null]" in derivable(spec, 0, "/t/0.tar", "v")
    embed = JobSpec("/in", "/o", ModelSpec("m"))
    assert derivable(embed, 0, "/in/0.tar", None) == \
        "the entries of embed jobs are planned, and signed, by their producer"
