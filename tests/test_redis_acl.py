"""deploy/redis/users.acl.template against a real ``redis-server --aclfile``: the producer submits,
a real worker consumes and commits, the monitor reads status; none can do the others' work, and
none can FLUSHALL, CONFIG or touch keys outside the project's."""
from __future__ import annotations

import json
import secrets
import string
import subprocess
from pathlib import Path

import pytest
import redis

from tests.conftest import free_port, redis_pings, run_cli, service_env, wait_for

pytestmark = pytest.mark.integration

TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "redis" / "users.acl.template"
ROLES = ("producer", "worker", "monitor")


@pytest.fixture()
def acl_redis(tmp_path):
    """A redis-server started with the shipped ACL file rendered with random passwords: role -> URL."""
    passwords = {role: secrets.token_hex(16) for role in ROLES}
    aclfile = tmp_path / "users.acl"
    aclfile.write_text(string.Template(TEMPLATE.read_text()).substitute(
        {f"{role.upper()}_PASSWORD": pw for role, pw in passwords.items()}))
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--aclfile", str(aclfile)],
                              stdout=open(tmp_path / "redis.log", "wb"), stderr=subprocess.STDOUT)
    urls = {role: f"redis://{role}:{pw}@127.0.0.1:{port}/0" for role, pw in passwords.items()}
    try:
        wait_for(lambda: redis_pings(urls["monitor"]), 20, "the ACL redis-server")
        yield urls
    finally:
        server.kill()
        server.wait()


def _refused(conn: redis.Redis, *command) -> bool:
    try:
        conn.execute_command(*command)
    except redis.exceptions.NoPermissionError:
        return True
    return False


def test_each_role_does_its_job_with_its_own_user(acl_redis, photo_shards, checkpoint, tmp_path, start_worker):
    folder, _ = photo_shards
    env = {role: service_env(url) for role, url in acl_redis.items()}

    # when: the producer submits, a real worker with the worker user runs it, the monitor reads status
    submitted = run_cli("submit", "embed", "--input", str(folder / "00000.tar"), "--output", str(tmp_path / "out"),
                        "--model", "clipbatch-tiny", "--pretrained", str(checkpoint), "--queue", "gpu", "--json",
                        env=env["producer"])
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    start_worker("gpu", env["worker"])

    def done() -> bool:
        status = run_cli("status", job_id, "--json", env=env["monitor"])
        assert status.returncode in (0, 1), status.stderr
        return json.loads(status.stdout)["state"] in ("succeeded", "failed")

    wait_for(done, 300, "the job to end", interval_s=1)

    # then: it succeeded, and the monitor user cannot submit (a one-line error, no traceback)
    final = json.loads(run_cli("status", job_id, "--json", env=env["monitor"]).stdout)
    assert final["state"] == "succeeded" and final["shards_done"] == 1
    refused = run_cli("submit", "embed", "--input", str(folder / "00001.tar"), "--output", str(tmp_path / "out2"),
                      "--model", "clipbatch-tiny", "--pretrained", str(checkpoint), "--queue", "gpu",
                      env=env["monitor"])
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "permission" in refused.stderr.lower(), refused.stderr


def test_no_role_can_do_the_others_work_or_administer_redis(acl_redis):
    conns = {role: redis.Redis.from_url(url) for role, url in acl_redis.items()}
    admin = [("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("CONFIG", "SET", "maxmemory", "1"), ("KEYS", "*"),
             ("ACL", "LIST"), ("CLIENT", "LIST"), ("SWAPDB", "0", "1"), ("SAVE",), ("SHUTDOWN", "NOSAVE"), ("MONITOR",)]
    other_prefix = [("SET", "otherapp:x", "1"), ("GET", "otherapp:x"), ("LPUSH", "otherqueue", "m"), ("DEL", "session:1")]
    for role, conn in conns.items():
        for command in admin + other_prefix:
            assert _refused(conn, *command), (role, command)
    # the monitor only reads: it cannot push a message, write a job or publish an event
    for command in (("LPUSH", "gpu", "m"), ("HSET", "clipbatch:job:x", "state", "x"), ("DEL", "clipbatch:jobs"),
                    ("PUBLISH", "/0.celeryev/task.sent", "x")):
        assert _refused(conns["monitor"], *command), command
    assert conns["monitor"].llen("gpu") == 0 and conns["monitor"].hgetall("clipbatch:job:none") == {}
    # the producer cannot take messages off a queue or touch what workers hold unacked
    for command in (("BRPOP", "gpu", "1"), ("HGETALL", "unacked"), ("ZADD", "unacked_index", "1", "x")):
        assert _refused(conns["producer"], *command), command
    # the default user is off: without a user and password nothing is reachable
    port = conns["monitor"].connection_pool.connection_kwargs["port"]
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=port).ping()
