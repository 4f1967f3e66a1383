"""The embedded default's Redis is private: only holders of its random password reach it, and the
password is on no command line (another local user reads those with ``ps``) nor in a file they can read."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest
import redis

from clipbatch.orchestration.embedded import private_redis

pytestmark = pytest.mark.integration


def test_the_private_redis_refuses_anyone_without_its_random_password(tmp_path):
    # given: two private Redis servers, as two `clipbatch run`s start them
    (tmp_path / "second").mkdir()
    with private_redis(tmp_path) as url, private_redis(tmp_path / "second") as other:
        conn = redis.Redis.from_url(url)
        host, port = conn.connection_pool.connection_kwargs["host"], conn.connection_pool.connection_kwargs["port"]
        password = conn.connection_pool.connection_kwargs["password"]

        # then: a client without the password (what another local user has) can do nothing
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=host, port=port).set("x", 1)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=host, port=port, password="guess").ping()
        assert conn.ping() and conn.config_get("bind")["bind"] == "127.0.0.1"

        # and the password is long, random per run, on no command line, in a file only this user reads
        assert len(password) >= 32 and password != redis.Redis.from_url(other).connection_pool.connection_kwargs["password"]
        pid = conn.info("server")["process_id"]
        assert password not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        conf = tmp_path / "redis.conf"
        assert password in conf.read_text()
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
