"""Redaction: every URL form that carries a credential (user:password@, an '@' inside the password,
password and other credential query parameters) is masked in CLI output, worker logs, error rows
and the argument reprs that Flower and task events show."""
from __future__ import annotations

import json
import logging
import subprocess
import string
import uuid
from urllib.parse import quote

import pytest
import redis
from hypothesis import assume, given, settings, strategies as st

from clipbatch.core.broker import make_app
from clipbatch.core.config import RedactingFilter, Settings, redact
from clipbatch.workers.readers import Columns, row_sample
from tests.conftest import free_port, redis_pings, run_cli, service_env, wait_for

SECRET = "S3cr3t-q9Z"
FORMS = {
    "userinfo": (f"redis://user:{SECRET}@host:6379/0", "redis://user:***@host:6379/0"),
    "no_user": (f"redis://:{SECRET}@host:6379/0", "redis://:***@host:6379/0"),
    "at_in_password": (f"redis://:p@{SECRET}@host:6379/0", "redis://:***@host:6379/0"),
    "slash_in_password": (f"redis://u:a/{SECRET}@host/0", "redis://u:***@host/0"),
    "quotes_in_password": (f"redis://u:a'{SECRET}\"b@host/0", "redis://u:***@host/0"),
    "colon_and_percent_in_password": (f"redis://u:a:{SECRET}%40@host/0", "redis://u:***@host/0"),
    "at_in_user": (f"redis://me@corp.example:{SECRET}@host/0", "redis://me@corp.example:***@host/0"),
    "quote_in_query_password": (f"https://h/x?password=a'{SECRET}&x=1", "https://h/x?password=***&x=1"),
    "query_password": (f"rediss://host:6380/0?password={SECRET}&ssl_cert_reqs=required",
                       "rediss://host:6380/0?password=***&ssl_cert_reqs=required"),
    "both": (f"redis://u:{SECRET}@host/0?password={SECRET}", "redis://u:***@host/0?password=***"),
    "presigned": (f"https://b.s3.amazonaws.com/k.jpg?X-Amz-Credential={SECRET}&X-Amz-Signature={SECRET}&x=1",
                  "https://b.s3.amazonaws.com/k.jpg?X-Amz-Credential=***&X-Amz-Signature=***&x=1"),
    "token_param": (f"https://h/x?token={SECRET}#f", "https://h/x?token=***#f"),
    "in_a_sentence": (f"cannot reach redis://:{SECRET}@127.0.0.1:1/0 (refused)",
                      "cannot reach redis://:***@127.0.0.1:1/0 (refused)"),
}
HARMLESS = ["redis://127.0.0.1:6379/0", "s3://bucket/photos/a@2x.jpg", "rediss://host:6380/0?ssl_cert_reqs=required",
            "a plain reason: member too large"]


@pytest.mark.parametrize("form", FORMS)
def test_redact_masks_each_url_form(form):
    url, expected = FORMS[form]
    assert redact(url) == expected
    assert SECRET not in redact(url) and redact(redact(url)) == redact(url)


@pytest.mark.parametrize("text", HARMLESS)
def test_redact_leaves_urls_without_credentials_alone(text):
    assert redact(text) == text


# Passwords from a broad alphabet: every printable non-space ASCII character (quotes, '@', ':', '/',
# '%', '\\', '#', '?') and some letters beyond ASCII; used raw or percent-encoded, as a URL may carry them.
_PASSWORD_CHARS = "".join(c for c in string.printable if not c.isspace()) + "\u00e9\u00df\u6f22\u0416"
_SAFE = string.ascii_letters + string.digits + "-._~"
_HOST = st.builds(lambda name, port: name + port, st.text(string.ascii_lowercase + string.digits + "-.", min_size=1,
                  max_size=20).filter(lambda h: h[0].isalnum()), st.sampled_from(["", ":6379", ":6380", ":9000"]))
_PATH = st.sampled_from(["", "/", "/0", "/11", "/bucket/key.tar", "/a/b%20c.jpg"])
_PARAM = st.tuples(st.sampled_from(["db", "ssl_cert_reqs", "region", "x", "timeout"]), st.text(_SAFE, max_size=8))
# A URL ends at whitespace (a raw space is never part of one): what follows it after a space reads as it was.
_CONTEXT = st.sampled_from([("", ""), ("cannot reach ", " (refused)"), ("broker=", "\n"), ("[", " ]"),
                            ("error: ", " - retrying")])


@st.composite
def credential_urls(draw) -> tuple[str, str, str]:
    """(a URL holding a password, the same URL as redact should give it, the password as it appears)."""
    scheme = draw(st.sampled_from(["redis", "rediss", "s3", "https", "amqp", "postgresql"]))
    user = draw(st.text(_SAFE + "'\"%@!$*+()", max_size=12))
    password = draw(st.text(_PASSWORD_CHARS, min_size=1, max_size=24))
    written = quote(password, safe="") if draw(st.booleans()) else password
    rest = draw(_HOST) + draw(_PATH)
    params = draw(st.lists(_PARAM, max_size=3))
    secret_param = draw(st.booleans())
    query = "&".join(f"{k}={v}" for k, v in params)
    shown = query
    if secret_param:
        # a query value holds '&', '#' and spaces only percent-encoded (a URL parser splits there)
        query += ("&" if query else "") + f"password={quote(password, safe='')}"
        shown += ("&" if shown else "") + "password=***"
    tail, shown_tail = (f"?{query}", f"?{shown}") if query else ("", "")
    return (f"{scheme}://{user}:{written}@{rest}{tail}", f"{scheme}://{user}:***@{rest}{shown_tail}", written)


@settings(max_examples=400, deadline=None)
@given(credential_urls(), _CONTEXT)
def test_redact_masks_any_password_and_leaves_the_rest_readable(url, context):
    # given: a URL with a password of any characters, said in a sentence
    raw, expected, _ = url
    before, after = context

    # then: the password is gone and everything else reads as it was (scheme, user, host, path, query)
    assert redact(before + raw + after) == before + expected + after
    assert redact(expected) == expected


@settings(max_examples=200, deadline=None)
@given(credential_urls())
def test_redact_masks_passwords_in_the_reprs_logs_and_events_show(url):
    # given: a URL in a list, as Celery's argsrepr and a log line's %r show it (quotes and backslashes escaped)
    raw, expected, written = url
    assume(len(written) >= 6 and written not in expected)

    # then: the password, escaped or not, is not in what is shown, and the host still is
    shown = redact(repr([raw, "next"]))
    assert written not in shown and repr(written)[1:-1] not in shown
    assert "***@" + expected.split("***@", 1)[1].split("?", 1)[0] in shown


def test_log_filter_redacts_formatted_records():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "broker %s said %s", (FORMS["at_in_password"][0], 1),
                               None)
    assert RedactingFilter().filter(record)
    assert record.getMessage() == "broker redis://:***@host:6379/0 said 1"


def test_error_rows_do_not_carry_credentials(tmp_path):
    # given: rows naming images by URLs that carry credentials
    cols = Columns("image", "caption", None)
    reasons = [row_sample("k", {"image": FORMS[form][0], "caption": "c"}, cols, str(tmp_path)).error
               for form in ("userinfo", "at_in_password", "presigned", "token_param")]

    # then: each is an error row, and none of its reasons holds the secret
    assert all(r and r.startswith("input refused: ") for r in reasons), reasons
    assert not [r for r in reasons if SECRET in r]


@pytest.mark.integration
def test_message_argsrepr_and_sent_event_are_redacted(redis_url):
    # given: a message whose arguments hold credential URLs, published to a real Redis queue
    app = make_app(Settings(redis_url, 3600, 2, 3600))
    queue = f"redact-{uuid.uuid4().hex[:8]}"
    args, kwargs = (FORMS["at_in_password"][0],), {"src": FORMS["presigned"][0]}
    app.send_task("clipbatch.nothing", args=args, kwargs=kwargs, queue=queue)
    sent = app.amqp.create_task_message("id", "clipbatch.nothing", args, kwargs, create_sent_event=True)

    # then: what Flower and events show is redacted; the body the worker runs is unchanged
    raw = redis.Redis.from_url(redis_url).lrange(queue, 0, -1)
    message = json.loads(raw[0])
    headers = message["headers"]
    assert SECRET not in headers["argsrepr"] and SECRET not in headers["kwargsrepr"]
    assert "redis://:***@host:6379/0" in headers["argsrepr"]
    assert SECRET not in sent.sent_event["args"] and SECRET not in sent.sent_event["kwargs"]
    import base64
    assert json.loads(base64.b64decode(message["body"]))[0] == list(args)
    redis.Redis.from_url(redis_url).delete(queue)


@pytest.mark.parametrize("form", ["userinfo", "at_in_password", "query_password_plain"])
def test_cli_errors_never_print_the_password(form):
    port = free_port()
    url = {"userinfo": f"redis://user:{SECRET}@127.0.0.1:{port}/0",
           "at_in_password": f"redis://:p@{SECRET}@127.0.0.1:{port}/0",
           "query_password_plain": f"redis://127.0.0.1:{port}/0?password={SECRET}"}[form]
    result = run_cli("status", "some-job", env=service_env(url))
    assert result.returncode == 1
    assert SECRET not in result.stdout + result.stderr
    assert "***" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.integration
def test_worker_log_redacts_a_password_with_an_at_and_message_contents(tmp_path, start_worker):
    # given: a Redis whose password holds an '@', and a worker using it
    password = f"p@{SECRET}"
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--requirepass", password], stdout=subprocess.DEVNULL)
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    try:
        wait_for(lambda: redis_pings(url), 20, "password Redis")
        queue = f"redact-{uuid.uuid4().hex[:8]}"
        worker = start_worker(queue, service_env(url))

        # when: a message the worker does not know arrives, holding a credential URL (Celery logs its body)
        make_app(Settings(url, 3600, 2, 3600)).send_task("clipbatch.unknown", args=[FORMS["userinfo"][0]], queue=queue)
        wait_for(lambda: "unregistered task" in worker.log(), 60, "the worker to log the unknown message")

        # then: the log names neither the Redis password nor the one in the message
        log = worker.log()
        assert SECRET not in log, [line for line in log.splitlines() if SECRET in line]
    finally:
        server.kill()
        server.wait()
