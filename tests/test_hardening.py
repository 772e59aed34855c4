"""Hardening (issue 3): hostile networks, hostile input, parallel processes.

One test per behaviour, each named for it, each failing without it. Faults
come from the fake gateway's injection (`gateway.fail`, `fail_html`, the
`recorder` listener). In-process runs use a fake clock, so anything that
depends on real time (a hanging server, parallel processes, closed pipes)
runs the installed console script in a subprocess instead.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import POSIX, console_script, posix_modes

import tokenroute

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
skip_as_root = pytest.mark.skipif(AS_ROOT, reason="root reads and writes regardless of file modes")


# ---------------------------------------------------------------- helpers


def sent(gateway: Any, method: str, path: str) -> list[Any]:
    """Requests the gateway received for METHOD PATH (query string ignored)."""
    return [r for r in gateway.requests if r.method == method and r.path_only == path]


def device_polls(gateway: Any) -> list[Any]:
    return [r for r in sent(gateway, "POST", "/oidc/token") if (r.form or {}).get("grant_type") == DEVICE_GRANT]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def assert_clean_failure(result: Any, code: int) -> None:
    """Exit CODE with exactly one `error: ...` line on stderr and no traceback."""
    assert result.code == code, result
    assert "Traceback" not in result.err, result
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result


def assert_terminal_safe(text: str) -> None:
    """Nothing a terminal would interpret: no ESC, no C0/C1 controls but newline."""
    bad = sorted({c for c in text if c != "\n" and not c.isprintable()})
    assert bad == [], (bad, text)


def on_sleep(cli: Any, number: int, action: Callable[[], None]) -> None:
    """Run ACTION during the CLI's NUMBER-th sleep (before its NUMBER-th poll)."""
    calls: list[None] = []

    def hook() -> None:
        calls.append(None)
        if len(calls) == number:
            action()

    cli.clock.on_sleep.append(hook)


@pytest.fixture
def no_dns(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record (and fail) every lookup of, or connection to, a host that is not loopback."""
    attempts: list[Any] = []
    real_getaddrinfo, real_create_connection = socket.getaddrinfo, socket.create_connection

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host in ("127.0.0.1", "localhost", "::1"):
            return real_getaddrinfo(host, *args, **kwargs)
        attempts.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "lookups are not allowed in this test")

    def create_connection(address: Any, *args: Any, **kwargs: Any) -> Any:
        if address[0] in ("127.0.0.1", "localhost", "::1"):
            return real_create_connection(address, *args, **kwargs)
        attempts.append(address)
        raise socket.gaierror(socket.EAI_NONAME, "connections are not allowed in this test")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    return attempts


def write_credentials(cli: Any, **fields: Any) -> dict[str, Any]:
    creds = {
        "api_url": cli.gateway.url,
        "access_token": "eyJhbGciOiJub25lIn0.e30.c2lnbmF0dXJl",
        "refresh_token": "rt-" + "x" * 40,
        "expires_at": cli.clock.now() + 3600,
        "token_endpoint": cli.gateway.url + "/oidc/token",
        "client_id": "tokenroute-cli",
        "resource": cli.gateway.resource,
    }
    creds.update(fields)
    cli.config_dir.mkdir(mode=0o700, exist_ok=True)
    cli.write_login(creds)
    cli.credentials.chmod(0o600)
    return creds


# ---------------------------------------------------------------- timeouts


@pytest.mark.parametrize(
    "argv, path",
    [(["whoami"], "/api/v1/me"), (["keys", "create", "--name", "ci"], "/api/v1/me/keys")],
    ids=["get", "post"],
)
def test_hanging_server_exits_2_within_the_timeout(cli, gateway, argv, path):
    # Real time: the in-process fake clock cannot prove a socket gives up.
    cli.login()
    gateway.fail(path, hang=True, count=10)

    started = time.monotonic()
    result = cli.script(*argv, env={"TOKENROUTE_TIMEOUT": "0.5"}, timeout=30)
    elapsed = time.monotonic() - started

    assert result.code == 2, result
    assert "Traceback" not in result.err
    assert "timed out" in result.err
    assert elapsed < 8, elapsed  # 0.5 s of waiting plus interpreter start-up, not a hang


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf", "1e9", "5s"])
def test_invalid_timeout_exits_1_before_any_request(cli, gateway, api_key, value):
    result = cli.run("models", "--key", api_key, env={"TOKENROUTE_TIMEOUT": value})

    assert_clean_failure(result, 1)
    assert "TOKENROUTE_TIMEOUT" in result.err
    assert gateway.requests == []


def test_retries_never_sleep_past_the_deadline(cli, gateway):
    cli.login()
    gateway.fail("/api/v1/balance", status=503, headers={"Retry-After": "8"}, count=3)

    result = cli.run("balance", env={"TOKENROUTE_TIMEOUT": "5"})

    assert result.code == 3, result
    assert sum(cli.clock.sleeps) < 5
    assert len(sent(gateway, "GET", "/api/v1/balance")) == 1


# ---------------------------------------------------------------- GET retries


@pytest.mark.parametrize("status", [502, 503, 504, 429])
@pytest.mark.parametrize("failures", [1, 2])
def test_get_is_retried_on_transient_status_then_succeeds(cli, gateway, status, failures):
    cli.login()
    gateway.fail("/api/v1/balance", status=status, count=failures)

    result = cli.run("balance", "--json")

    assert result.code == 0, result
    assert result.json()["currency"] == "USD"
    assert len(sent(gateway, "GET", "/api/v1/balance")) == failures + 1


def test_get_retries_back_off(cli, gateway):
    cli.login()
    gateway.fail("/api/v1/balance", status=503, count=2)

    assert cli.run("balance").code == 0

    assert len(cli.clock.sleeps) == 2
    assert 0 < cli.clock.sleeps[0] < cli.clock.sleeps[1]


def test_retry_after_is_honoured(cli, gateway, api_key):
    gateway.fail("/v1/models", status=429, headers={"Retry-After": "3"})

    result = cli.run("models", "--key", api_key)

    assert result.code == 0, result
    assert cli.clock.sleeps == [3]


@pytest.mark.parametrize("retry_after", ["3600", "1e9", "inf"])
def test_retry_after_is_capped(cli, gateway, api_key, retry_after):
    gateway.fail("/v1/models", status=503, headers={"Retry-After": retry_after})

    result = cli.run("models", "--key", api_key)

    assert result.code == 0, result
    assert len(cli.clock.sleeps) == 1
    assert 0 < cli.clock.sleeps[0] <= 10


@pytest.mark.parametrize("fault", [{"close": True}, {"truncate": True}], ids=["close-before", "close-mid-body"])
def test_get_is_retried_when_the_connection_drops(cli, gateway, fault):
    cli.login()
    body = json.dumps({"balance_usd": "5.00", "currency": "USD", "pad": "x" * 2000})
    gateway.fail("/api/v1/balance", status=200, body=body, **fault)

    result = cli.run("balance", "--json")

    assert result.code == 0, result
    assert result.json()["currency"] == "USD"
    assert len(sent(gateway, "GET", "/api/v1/balance")) == 2


@pytest.mark.parametrize(
    "fault, code, machine_code",
    [
        ({"status": 503}, 3, "server"),
        ({"status": 502}, 3, "server"),
        ({"status": 429, "body": {"detail": "slow down"}}, 1, "rate_limited"),
        ({"close": True}, 2, "network"),
    ],
    ids=["503", "502", "429", "close"],
)
def test_get_gives_up_after_3_attempts_with_the_right_exit_code(cli, gateway, fault, code, machine_code):
    cli.login()
    gateway.fail("/api/v1/balance", count=100, **fault)

    result = cli.run("balance", "--json")

    assert result.code == code, result
    assert result.out == ""
    assert result.error()["code"] == machine_code
    assert "Traceback" not in result.err
    assert len(sent(gateway, "GET", "/api/v1/balance")) == 3


@pytest.mark.parametrize(
    "argv, path",
    [(["keys", "create", "--name", "ci"], "/api/v1/me/keys"), (["topup", "--amount", "5"], "/api/v1/topup")],
    ids=["keys-create", "topup"],
)
@pytest.mark.parametrize(
    "fault, code", [({"status": 502}, 3), ({"status": 503}, 3), ({"close": True}, 2)], ids=["502", "503", "close"]
)
def test_post_is_never_sent_twice(cli, gateway, argv, path, fault, code):
    cli.login()
    gateway.fail(path, method="POST", count=100, **fault)

    result = cli.run(*argv)

    assert_clean_failure(result, code)
    assert len(sent(gateway, "POST", path)) == 1


@pytest.mark.parametrize(
    "argv, path",
    [(["keys", "create", "--name", "ci"], "/api/v1/me/keys"), (["topup", "--amount", "5"], "/api/v1/topup")],
    ids=["keys-create", "topup"],
)
def test_idempotency_key_is_sent_and_unique_per_invocation(cli, gateway, argv, path):
    cli.login()

    assert cli.run(*argv).code == 0
    assert cli.run(*argv).code == 0

    keys = [r.header("Idempotency-Key") for r in sent(gateway, "POST", path)]
    assert len(keys) == 2
    assert all(key and len(key) >= 16 and key.isprintable() for key in keys), keys
    assert keys[0] != keys[1]


# ---------------------------------------------------------------- bad answers


def test_html_error_page_exits_3_in_one_line(cli, gateway):
    cli.login()
    gateway.fail_html("/api/v1/me", 502, count=3)

    result = cli.run("whoami")

    assert_clean_failure(result, 3)
    assert "<" not in result.err and "nginx" not in result.err
    assert "502" in result.err


@pytest.mark.parametrize(
    "body, content_type",
    [
        (b"", "application/json"),
        (b'{"id": "f4a8", "display_name": "Ag', "application/json"),
        (b'{"id": f4a8}', "application/json"),
        (b"\xff\xfe\x00{}", "application/json"),
        (b"<html><body>Sign in to the hotel wifi</body></html>", "text/html"),
        (b"[" * 100000 + b"]" * 100000, "application/json"),
    ],
    ids=["empty", "truncated-json", "malformed-json", "not-utf8", "captive-portal", "deeply-nested"],
)
def test_unusable_2xx_answer_exits_3(cli, gateway, body, content_type):
    cli.login()
    gateway.fail("/api/v1/me", status=200, body=body, content_type=content_type)

    result = cli.run("whoami")

    assert_clean_failure(result, 3)
    assert "<" not in result.err


@pytest.mark.parametrize(
    "argv, path, body",
    [
        (["whoami"], "/api/v1/me", []),
        (["balance"], "/api/v1/balance", "5.00"),
        (["keys", "list"], "/api/v1/me/keys", {"keys": []}),
        (["models"], "/v1/models", []),
        (["models"], "/v1/models", {"object": "list", "data": {"id": "x"}}),
        (["test"], "/v1/chat/completions", {"choices": []}),
        (["test"], "/v1/chat/completions", {"choices": [{"message": {"content": 5}}]}),
        (["keys", "create", "--name", "ci"], "/api/v1/me/keys", {"id": "k", "raw": 5}),
        (["topup", "--amount", "5"], "/api/v1/topup", {"checkout_url": ["x"]}),
        (["usage"], "/api/v1/me/usage", None),
    ],
)
def test_wrong_json_type_exits_3(cli, gateway, api_key, argv, path, body):
    cli.login()
    gateway.fail(path, status=200, body=json.dumps(body))

    result = cli.run(*argv, env={"TOKENROUTE_API_KEY": api_key})

    assert_clean_failure(result, 3)


ABSURD_LIFETIMES = [b"1" + b"0" * 400, b"-1" + b"0" * 400, b"1e309", b"NaN", b"Infinity"]


@pytest.mark.parametrize("expires_in", ABSURD_LIFETIMES, ids=["huge-int", "huge-negative", "1e309", "nan", "inf"])
def test_absurd_token_lifetime_from_login_is_survived(cli, gateway, expires_in):
    gateway.auto_approve = True
    answer = b'{"access_token": "eyJhbGciOi.e30.sig", "refresh_token": "rt-12345678", "expires_in": ' + expires_in + b"}"
    gateway.fail("/oidc/token", status=200, body=answer, method="POST")

    result = cli.run("login", "--no-browser")

    assert result.code == 0, result
    stored = json.loads(cli.credentials.read_text(), parse_constant=lambda name: pytest.fail(f"{name} stored"))
    assert isinstance(stored["logins"][gateway.url]["expires_at"], (int, float))


@pytest.mark.parametrize("expires_in", ABSURD_LIFETIMES, ids=["huge-int", "huge-negative", "1e309", "nan", "inf"])
def test_absurd_token_lifetime_from_refresh_is_survived(cli, gateway, expires_in):
    cli.login(expires_in=-100)
    answer = b'{"access_token": "eyJhbGciOi.e30.sig", "refresh_token": "rt-12345678", "expires_in": ' + expires_in + b"}"
    gateway.fail("/oidc/token", status=200, body=answer, method="POST")
    gateway.fail("/api/v1/balance", status=200, body={"balance_usd": "5.00", "currency": "USD"})

    result = cli.run("balance")

    assert result.code == 0, result
    stored = json.loads(cli.credentials.read_text(), parse_constant=lambda name: pytest.fail(f"{name} stored"))
    assert stored["logins"][gateway.url]["access_token"] == "eyJhbGciOi.e30.sig"


@pytest.mark.parametrize("expires_in", ABSURD_LIFETIMES, ids=["huge-int", "huge-negative", "1e309", "nan", "inf"])
def test_absurd_device_code_lifetime_is_survived(cli, gateway, expires_in):
    grant = (b'{"device_code": "dc", "user_code": "BCDF-GHJK", "verification_uri": "https://x.example/device", '
             b'"interval": 5, "expires_in": ' + expires_in + b"}")
    gateway.fail("/oidc/device/auth", status=200, body=grant, method="POST")

    result = cli.run("login", "--no-wait", "--json")

    assert result.code in (0, 3), result
    assert "Traceback" not in result.err
    if result.code == 0:
        pending = cli.config_dir / "pending_login.json"
        json.loads(pending.read_text(), parse_constant=lambda name: pytest.fail(f"{name} stored"))


def test_oversized_body_exits_3_and_is_not_retried(cli, gateway):
    # Retries are for connection errors and 429/502/503/504, not for an answer we refused to read.
    cli.login()
    huge = b'{"detail": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    gateway.fail("/api/v1/me", status=200, body=huge, count=3)

    result = cli.run("whoami")

    assert_clean_failure(result, 3)
    assert len(result.err) < 500
    assert len(sent(gateway, "GET", "/api/v1/me")) == 1


def test_oversized_error_body_exits_3(cli, gateway, api_key):
    gateway.fail("/v1/chat/completions", status=500, body=b"E" * (6 * 1024 * 1024), content_type="text/plain")

    result = cli.run("test", "--key", api_key)

    assert_clean_failure(result, 3)


# ---------------------------------------------------------------- device flow


def test_device_flow_survives_transient_5xx_and_dropped_connections(cli, gateway):
    gateway.fail("/oidc/token", status=503, count=2, method="POST")
    gateway.fail_html("/oidc/token", 502, count=1, method="POST")
    gateway.fail("/oidc/token", close=True, count=1, method="POST")
    on_sleep(cli, 5, gateway.approve)

    result = cli.run("login", "--no-browser")

    assert result.code == 0, result
    assert result.out == f"OK logged in as agent@example.com ({gateway.url.split('//')[1]})\n"
    assert cli.stored_login()["access_token"].startswith("eyJ")
    assert len(device_polls(gateway)) == 5


def test_device_flow_with_persistent_5xx_gives_up_when_the_code_expires(cli, gateway):
    gateway.device_expires_in = 60
    gateway.fail("/oidc/token", status=503, count=1000, method="POST")

    result = cli.run("login", "--no-browser")

    assert result.code == 3, result
    assert "expired" in result.err
    assert not cli.credentials.exists()
    assert sum(cli.clock.sleeps) <= 61


def test_slow_down_adds_5_seconds_to_every_later_poll(cli, gateway):
    gateway.slow_down_next = 1  # the first poll answers slow_down
    on_sleep(cli, 4, gateway.approve)

    result = cli.run("login", "--no-browser")

    assert result.code == 0, result
    assert cli.clock.sleeps == [5, 10, 10, 10]


def test_ctrl_c_while_polling_exits_130_and_stores_nothing(cli, gateway):
    def interrupt() -> None:
        raise KeyboardInterrupt

    on_sleep(cli, 2, interrupt)

    result = cli.run("login", "--no-browser", "--json")

    assert result.code == 130, result
    assert result.out == ""
    assert result.err.splitlines()[-1] == json.dumps(
        {"error": {"code": "interrupted", "message": "interrupted", "status": None}}
    )
    assert "Traceback" not in result.err
    left = sorted(p.name for p in cli.config_dir.iterdir()) if cli.config_dir.exists() else []
    assert [name for name in left if name != "credentials.lock"] == []


# ---------------------------------------------------------------- secrets: redirects


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize(
    "argv, path",
    [
        (["whoami"], "/api/v1/me"),
        (["keys", "create", "--name", "ci"], "/api/v1/me/keys"),
        (["models"], "/v1/models"),
        (["test"], "/v1/chat/completions"),
    ],
)
def test_redirect_on_an_authenticated_call_is_an_error_and_sends_nothing(cli, gateway, api_key, status, argv, path):
    cli.login()
    gateway.fail(path, status=status, body=b"", headers={"Location": gateway.recorder.url + "/steal"}, count=3)

    result = cli.run(*argv, env={"TOKENROUTE_API_KEY": api_key})

    assert_clean_failure(result, 3)
    assert "redirect" in result.err
    assert gateway.recorder.requests == []


def test_redirected_token_refresh_sends_nothing_to_the_other_host(cli, gateway):
    cli.login(expires_in=-100)
    gateway.fail("/oidc/token", status=307, body=b"", headers={"Location": gateway.recorder.url + "/oidc/token"})

    result = cli.run("whoami")

    assert result.code != 0, result
    assert "Traceback" not in result.err
    assert gateway.recorder.requests == []


@pytest.mark.parametrize(
    "location", ["http://[::1", "http://127.0.0.1:notaport/x", "javascript:alert(1)", "//\x7f\x00", "ftp://x/y"]
)
def test_malformed_redirect_location_is_a_clean_error(cli, gateway, location):
    cli.login()
    gateway.fail("/api/v1/me", status=302, body=b"", headers={"Location": location}, count=3)

    result = cli.run("whoami")

    assert_clean_failure(result, 3)
    assert_terminal_safe(result.err)
    assert gateway.recorder.requests == []


# ---------------------------------------------------------------- secrets: plain http


@pytest.mark.parametrize(
    "url",
    [
        "http://example.invalid",
        "http://localhost.example.invalid",
        "http://127.0.0.1.example.invalid",
    ],
)
def test_plain_http_to_a_remote_host_is_refused_before_connecting(cli, gateway, api_key, no_dns, url):
    result = cli.run("models", "--key", api_key, env={"TOKENROUTE_API_URL": url})

    assert_clean_failure(result, 1)
    assert "plain http" in result.err and "https" in result.err
    assert "example.invalid" in result.err
    assert no_dns == []


def test_plain_http_login_is_refused_before_connecting(cli, no_dns):
    result = cli.run("login", "--json", env={"TOKENROUTE_API_URL": "http://example.invalid"})

    assert result.code == 1, result
    assert result.error()["code"] == "insecure_url"
    assert no_dns == []


def test_stored_login_for_a_plain_http_gateway_sends_no_token(cli, no_dns):
    write_credentials(cli, api_url="http://example.invalid")

    result = cli.run("whoami", env={"TOKENROUTE_API_URL": "http://example.invalid"})

    assert_clean_failure(result, 1)
    assert "plain http" in result.err
    assert no_dns == []


@pytest.mark.parametrize("endpoint", ["token_endpoint", "device_authorization_endpoint"])
def test_discovery_pointing_at_plain_http_is_refused(cli, gateway, endpoint):
    discovery = {
        "issuer": gateway.url + "/oidc",
        "client_id": "tokenroute-cli",
        "resource": gateway.resource,
        "scopes": ["openid", "offline_access"],
        "device_authorization_endpoint": gateway.url + "/oidc/device/auth",
        "token_endpoint": gateway.url + "/oidc/token",
    }
    discovery[endpoint] = "http://idp.example.invalid/oidc/" + endpoint
    gateway.fail("/api/v1/auth/discovery", status=200, body=json.dumps(discovery))
    on_sleep(cli, 1, gateway.approve)

    result = cli.run("login", "--no-browser")

    assert result.code == 1, result
    assert "idp.example.invalid" in result.err and "https" in result.err
    assert "Traceback" not in result.err
    assert not cli.credentials.exists()


def test_insecure_token_endpoint_is_refused_before_a_code_is_shown(cli, gateway, no_dns):
    # Refusing only at the first poll lets a person approve a login that can never finish.
    discovery = {
        "client_id": "tokenroute-cli",
        "resource": gateway.resource,
        "scopes": ["openid"],
        "device_authorization_endpoint": gateway.url + "/oidc/device/auth",
        "token_endpoint": "http://idp.example.invalid/oidc/token",
    }
    gateway.fail("/api/v1/auth/discovery", status=200, body=json.dumps(discovery))

    result = cli.run("login", "--no-browser")

    assert_clean_failure(result, 1)
    assert sent(gateway, "POST", "/oidc/device/auth") == []


# ---------------------------------------------------------------- secrets: paths, browser, redaction


@pytest.mark.parametrize(
    "key_id, path",
    [
        ("../../admin", "/api/v1/me/keys/..%2F..%2Fadmin"),
        ("a/b", "/api/v1/me/keys/a%2Fb"),
        ("key?x=1#frag", "/api/v1/me/keys/key%3Fx%3D1%23frag"),
        ("%2e%2e", "/api/v1/me/keys/%252e%252e"),
        ("key 1", "/api/v1/me/keys/key%201"),
    ],
)
def test_key_id_is_percent_encoded_as_one_path_segment(cli, gateway, key_id, path):
    cli.login()

    result = cli.run("keys", "revoke", key_id)

    assert result.code == 1, result  # the fake knows no such key
    assert [r.path for r in gateway.requests if r.method == "DELETE"] == [path]


@pytest.mark.parametrize("key_id", [".", ".."])
def test_dot_segment_key_id_never_reaches_the_gateway_as_a_dot_segment(cli, gateway, key_id):
    # `/api/v1/me/keys/..` is `/api/v1/me` to any URL normaliser on the way.
    cli.login()

    result = cli.run("keys", "revoke", key_id)

    assert result.code == 1, result
    deletes = [r.path for r in gateway.requests if r.method == "DELETE"]
    assert all(not p.rstrip("/").endswith(("/.", "/..")) for p in deletes), deletes


@pytest.mark.parametrize(
    "url, opened",
    [
        ("javascript:alert(document.cookie)", False),
        ("file:///etc/passwd", False),
        ("http://evil.example/pay", False),
        ("data:text/html,<script>alert(1)</script>", False),
        ("https://[::1", False),
        ("https://checkout.stripe.com/c/pay/cs_test_1", True),
        ("http://127.0.0.1:9/pay", True),
    ],
)
def test_browser_opens_only_https_or_loopback_urls_and_no_other_is_shown(cli, gateway, url, opened):
    cli.login()
    session = {"checkout_url": url, "session_id": "cs_test_1", "amount_usd": "5", "expires_at": 1700000000}
    gateway.fail("/api/v1/topup", status=200, body=json.dumps(session), method="POST")

    result = cli.run("topup", "--amount", "5", tty=True)

    assert result.code == (0 if opened else 3), result  # issue 17: a URL no one should open is an unusable answer
    assert (url in result.out) == opened
    assert cli.opened == ([url] if opened else [])


def test_login_never_opens_a_non_https_verification_url(cli, gateway):
    grant = {
        "device_code": "dc",
        "user_code": "BCDF-GHJK",
        "verification_uri": gateway.url + "/device",
        "verification_uri_complete": "javascript:alert(1)",
        "expires_in": 600,
        "interval": 5,
    }
    gateway.fail("/oidc/device/auth", status=200, body=json.dumps(grant), method="POST")

    result = cli.run("login", tty=True)

    assert result.code == 3, result
    assert "javascript:alert(1)" not in result.err  # issue 17: refused, never shown
    assert cli.opened == []


def test_server_error_echoing_an_api_key_is_redacted(cli, gateway, api_key):
    body = {"error": {"message": f"Incorrect API key provided: {api_key}", "type": "invalid_request_error"}}

    for argv in (["models", "--key", api_key], ["models", "--key", api_key, "--json"]):
        gateway.fail("/v1/models", status=401, body=body)
        result = cli.run(*argv)
        assert result.code == 1, result
        assert api_key not in result.err and api_key not in result.out
        assert api_key[:10] in result.err


def test_server_error_echoing_the_access_token_is_redacted(cli, gateway):
    creds = cli.login()
    gateway.fail("/api/v1/me", status=400, body={"detail": f"bad token {creds['access_token']}"})

    result = cli.run("whoami")

    assert_clean_failure(result, 1)
    assert creds["access_token"] not in result.err
    assert creds["access_token"][:24] not in result.err


def test_token_endpoint_error_echoing_the_refresh_token_is_redacted(cli, gateway):
    creds = cli.login(expires_in=-100)
    body = {"error": "server_error", "error_description": f"could not rotate {creds['refresh_token']}"}

    for argv in (["whoami"], ["whoami", "--json"]):
        gateway.fail("/oidc/token", status=500, body=body, method="POST")
        result = cli.run(*argv)
        assert result.code == 3, result
        assert creds["refresh_token"] not in result.err
        assert creds["refresh_token"][:16] not in result.err


@pytest.mark.parametrize(
    "argv",
    [
        ["models", "--key", "sk-tr-abcdEFGH1234 SECRETsecret"],
        ["models", "--key", "sk_tr_abcdEFGH1234SECRETsecret"],
        ["test", "--key", "sk-tr-abcdEFGH1234SECRETsecret'"],
        ["env", "--key", "sk-tr-abcdEFGH1234SECRETsecret#"],
        ["env", "--key=sk-tr-abcdEFGH1234\nSECRETsecret"],
        ["--key", "sk-tr-abcdEFGH1234SECRETsecret", "models"],
        ["--key", "sk_tr_abcdEFGH1234SECRETsecret", "models"],
    ],
    ids=["space", "underscores", "quote", "hash", "newline", "misplaced", "misplaced-typo"],
)
@pytest.mark.parametrize("as_json", [False, True], ids=["human", "json"])
def test_a_mistyped_key_is_never_printed_in_full(cli, gateway, argv, as_json):
    result = cli.run(*argv, *(["--json"] if as_json else []))

    assert result.code == 1, result
    assert "SECRETsecret" not in result.err + result.out
    assert gateway.requests == []


# ---------------------------------------------------------------- secrets: TLS


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a certificate for the loopback TLS server")
    folder = tmp_path_factory.mktemp("tls")
    made = {}
    for name in ("server", "other"):
        cert, key = folder / f"{name}.pem", folder / f"{name}.key"
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
             "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True,
        )
        made[name], made[name + "_key"] = cert, key
    garbage = folder / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    made["garbage"] = garbage
    made["missing"] = folder / "missing.pem"
    return made


class _ModelsHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def tls_server(certificates: dict[str, Path]) -> Iterator[str]:
    """An https server on loopback with a self-signed certificate; answers every GET with no models."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(certificates["server"]), str(certificates["server_key"]))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ModelsHandler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_custom_ca_in_ssl_cert_file_is_trusted(cli, tls_server, certificates, api_key):
    env = {"TOKENROUTE_API_URL": tls_server, "SSL_CERT_FILE": str(certificates["server"])}

    result = cli.run("models", "--key", api_key, "--json", env=env)

    assert result.code == 0, result
    assert result.json() == []


def test_tls_verification_is_on_by_default(cli, tls_server, api_key):
    result = cli.run("models", "--key", api_key, env={"TOKENROUTE_API_URL": tls_server})

    assert_clean_failure(result, 2)
    assert "certificate" in result.err and "SSL_CERT_FILE" in result.err


@pytest.mark.parametrize("ca", ["other", "garbage", "missing"])
def test_bogus_ssl_cert_file_exits_2_with_a_hint(cli, tls_server, certificates, api_key, ca):
    env = {"TOKENROUTE_API_URL": tls_server, "SSL_CERT_FILE": str(certificates[ca])}

    result = cli.run("models", "--key", api_key, env=env)

    assert_clean_failure(result, 2)
    assert "SSL_CERT_FILE" in result.err


# ---------------------------------------------------------------- terminal safety

HOSTILE = "evil\x1b[2J\x1b]0;owned\x07\x9b31m\r\x08\u202e\x00end"


def test_key_names_are_neutralised_for_a_terminal(cli, gateway):
    cli.login()
    gateway.add_key(name=HOSTILE)

    human = cli.run("keys", "list")
    as_json = cli.run("keys", "list", "--json")

    assert human.code == 0, human
    assert_terminal_safe(human.out + human.err)
    assert "evil" in human.out
    assert "\x1b" not in as_json.out
    assert as_json.json()[0]["name"] == HOSTILE


def test_account_fields_are_neutralised_for_a_terminal(cli, gateway):
    cli.login()
    gateway.account["display_name"] = HOSTILE

    result = cli.run("whoami")

    assert result.code == 0, result
    assert_terminal_safe(result.out + result.err)


def test_model_ids_are_neutralised_for_a_terminal(cli, gateway, api_key):
    models = {"object": "list", "data": [{"id": HOSTILE, "owned_by": HOSTILE, "complexity_tier": "low",
                                          "input_usd_per_1k": "0.1", "output_usd_per_1k": "0.2"}]}
    gateway.fail("/v1/models", status=200, body=json.dumps(models), count=2)

    human = cli.run("models", "--key", api_key)
    as_json = cli.run("models", "--key", api_key, "--json")

    assert human.code == 0, human
    assert_terminal_safe(human.out + human.err)
    assert "\x1b" not in as_json.out
    assert as_json.json()[0]["id"] == HOSTILE


def test_chat_reply_is_neutralised_for_a_terminal(cli, gateway, api_key):
    completion = {"choices": [{"index": 0, "message": {"role": "assistant", "content": HOSTILE}}]}
    gateway.fail("/v1/chat/completions", status=200, body=json.dumps(completion), count=2)

    human = cli.run("test", "--key", api_key)
    as_json = cli.run("test", "--key", api_key, "--json")

    assert human.code == 0, human
    assert human.out.startswith("OK connected (openai/gpt-4o-mini)\n  reply: evil")
    assert_terminal_safe(human.out + human.err)
    assert "\x1b" not in as_json.out
    assert as_json.json()["reply"] == HOSTILE


@pytest.mark.parametrize(
    "body",
    [{"detail": HOSTILE}, {"error": {"message": HOSTILE}}, {"detail": [{"loc": ["body", HOSTILE], "msg": HOSTILE}]}],
    ids=["fastapi", "openai", "validation"],
)
def test_error_details_are_neutralised_for_a_terminal(cli, gateway, body):
    cli.login()
    gateway.fail("/api/v1/me", status=400, body=body, count=2)

    human = cli.run("whoami")
    as_json = cli.run("whoami", "--json")

    assert_clean_failure(human, 1)
    assert_terminal_safe(human.err)
    assert "\x1b" not in as_json.err
    assert as_json.error()["status"] == 400


def test_redirect_location_and_content_type_are_neutralised_for_a_terminal(cli, gateway):
    cli.login()
    gateway.fail("/api/v1/me", status=302, body=b"", headers={"Location": "https://x/\x1b[2J"}, count=3)
    gateway.fail("/api/v1/balance", status=200, body=b"<", content_type="text/\x1b[31mhtml")

    redirected = cli.run("whoami")
    unusable = cli.run("balance")

    assert_clean_failure(redirected, 3)
    assert_clean_failure(unusable, 3)
    assert_terminal_safe(redirected.err + unusable.err)


BAD_KEYS = [
    "sk-tr-abc\nEVIL=1",
    "sk-tr-abc#comment",
    "sk-tr-abc'x",
    'sk-tr-abc"x',
    "sk-tr-abc def",
    "sk-tr-abc$HOME",
    "sk-tr-abc`id`",
    "sk-tr-abc\\n",
    "sk-tr-abc\rX",
    "sk-tr-",
    "not-a-key",
]


def run_env_with_key_from(cli, source, key):
    """`tokenroute env` with KEY given by --key, TOKENROUTE_API_KEY or last_key.txt."""
    if source == "--key":
        return cli.run("env", "--key", key)
    if source == "TOKENROUTE_API_KEY":
        return cli.run("env", env={"TOKENROUTE_API_KEY": key})
    cli.config_dir.mkdir(mode=0o700)
    cli.cache_key(key)
    cli.last_key.chmod(0o600)
    return cli.run("env")


@pytest.mark.parametrize("key", BAD_KEYS)
@pytest.mark.parametrize("source", ["--key", "TOKENROUTE_API_KEY", "last_key.txt"])
def test_env_refuses_an_implausible_key(cli, key, source):
    result = run_env_with_key_from(cli, source, key)

    assert_clean_failure(result, 1)
    assert result.out == ""


@pytest.mark.parametrize("source", ["--key", "TOKENROUTE_API_KEY", "last_key.txt"])
def test_env_prints_exactly_two_lines_for_a_plausible_key(cli, gateway, api_key, source):
    result = run_env_with_key_from(cli, source, api_key)

    assert result.code == 0, result
    assert result.out == f"OPENAI_API_KEY={api_key}\nOPENAI_BASE_URL={gateway.url}/v1\n"


@pytest.mark.parametrize("url", ["https://gw.example/#x", "https://gw.example/a b", "https://gw.example/'$(id)'"])
def test_env_refuses_an_api_url_a_shell_would_misread(cli, api_key, url):
    result = cli.run("env", "--key", api_key, env={"TOKENROUTE_API_URL": url})

    assert_clean_failure(result, 1)
    assert result.out == ""


@pytest.mark.parametrize("argv", [["keys", "list"], ["keys", "list", "--json"]], ids=["table", "json"])
def test_closed_pipe_ends_quietly(cli, gateway, tmp_path, argv):
    cli.login()
    for number in range(2000):  # far more output than a pipe buffer holds
        gateway.add_key(name=f"key-{number:04d}")
    status_file = tmp_path / "status"
    pipeline = f'"{console_script()}" {" ".join(argv)} | head -1; echo "${{PIPESTATUS[0]}}" > "{status_file}"'

    completed = subprocess.run(
        ["bash", "-c", pipeline], env=cli.process_env(), capture_output=True, text=True, timeout=60
    )

    assert completed.stdout.count("\n") == 1, completed.stdout[:200]
    assert completed.stderr == ""
    assert status_file.read_text().strip() in ("0", "141")


# ---------------------------------------------------------------- files


@posix_modes
def test_credential_files_are_owner_only_from_creation_under_umask_000(cli, gateway, monkeypatch):
    created: list[tuple[str, int]] = []
    real_open = os.open
    folder = str(cli.config_dir)

    def recording_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_CREAT and str(path).startswith(folder):
            created.append((os.path.basename(str(path)), stat.S_IMODE(os.fstat(fd).st_mode)))
        return fd

    monkeypatch.setattr(os, "open", recording_open)
    on_sleep(cli, 1, gateway.approve)
    previous = os.umask(0)
    try:
        assert cli.run("login", "--no-browser").code == 0
        assert cli.run("keys", "create", "--name", "ci").code == 0
    finally:
        os.umask(previous)

    assert any(name.startswith("credentials.json") for name, _ in created), created
    assert any(name.startswith("last_key.txt") for name, _ in created), created
    assert all(m == 0o600 for _, m in created), created
    assert mode(cli.config_dir) == 0o700
    assert mode(cli.credentials) == 0o600 and mode(cli.last_key) == 0o600
    assert sorted(p.name for p in cli.config_dir.iterdir() if p.name.endswith(".tmp")) == []


def test_a_failing_write_leaves_the_old_file_and_no_temp_file(cli, gateway, monkeypatch):
    cli.login()
    cli.cache_key("sk-tr-OLDKEYoldkey")
    before = cli.last_key.read_text()

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    result = cli.run("keys", "create", "--name", "ci")

    assert result.code == 1, result
    assert "No space left on device" in result.err
    assert "Traceback" not in result.err
    assert "sk-tr-" in result.out  # the new key was still shown once
    assert cli.last_key.read_text() == before
    assert sorted(p.name for p in cli.config_dir.iterdir() if p.name.endswith(".tmp")) == []


def test_symlink_at_last_key_is_not_followed(cli, gateway, tmp_path):
    cli.login()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    cli.last_key.symlink_to(victim)

    result = cli.run("keys", "create", "--name", "ci")

    assert result.code == 0, result
    assert victim.read_text() == "precious\n"
    assert not cli.last_key.is_symlink()
    assert cli.cached_key().startswith("sk-tr-")
    if POSIX:
        assert mode(cli.last_key) == 0o600


def test_symlink_at_credentials_is_not_followed(cli, gateway, tmp_path):
    cli.login(expires_in=-100)  # whoami must refresh, i.e. rewrite credentials.json
    victim = tmp_path / "victim.json"
    shutil.move(str(cli.credentials), str(victim))
    before = victim.read_text()
    cli.credentials.symlink_to(victim)

    result = cli.run("whoami")

    assert result.code == 0, result
    assert gateway.refresh_count == 1
    assert victim.read_text() == before
    assert not cli.credentials.is_symlink()
    if POSIX:
        assert mode(cli.credentials) == 0o600


DAMAGED = {
    "corrupt": b'{"access_token": "eyJ',
    "empty": b"",
    "list": b"[]",
    "wrong-type": b'{"access_token": 5}',
    "null": b"null",
    "binary": b"\xff\xfe\x00\x01garbage",
    "deeply-nested": b"[" * 100000 + b"]" * 100000,
    "missing-fields": b'{"access_token": "eyJabc", "expires_at": 1}',
}


@pytest.mark.parametrize("content", list(DAMAGED.values()), ids=list(DAMAGED))
def test_damaged_credentials_exit_1_naming_the_file_and_are_kept(cli, gateway, content):
    cli.config_dir.mkdir(mode=0o700)
    cli.credentials.write_bytes(content)

    result = cli.run("whoami")

    assert_clean_failure(result, 1)
    assert str(cli.credentials) in result.err
    assert "tokenroute login" in result.err
    assert cli.credentials.read_bytes() == content
    assert gateway.requests == []


@posix_modes
@skip_as_root
def test_unreadable_credentials_exit_1_naming_the_file_and_are_kept(cli, gateway):
    creds = cli.login()
    cli.credentials.chmod(0)
    try:
        result = cli.run("whoami")
    finally:
        cli.credentials.chmod(0o600)

    assert_clean_failure(result, 1)
    assert str(cli.credentials) in result.err and "tokenroute login" in result.err
    assert cli.stored_login() == creds


@pytest.mark.parametrize("content", [DAMAGED["corrupt"], DAMAGED["list"], DAMAGED["deeply-nested"]],
                         ids=["corrupt", "list", "deeply-nested"])
def test_login_replaces_damaged_credentials(cli, gateway, content):
    # The error for a damaged file says "run `tokenroute login`": that must work.
    cli.config_dir.mkdir(mode=0o700)
    cli.credentials.write_bytes(content)
    on_sleep(cli, 1, gateway.approve)

    result = cli.run("login", "--no-browser")

    assert result.code == 0, result
    assert cli.stored_login()["access_token"].startswith("eyJ")


@pytest.mark.parametrize(
    "argv", [["whoami"], ["login"], ["keys", "create", "--name", "ci"], ["logout"], ["env"]]
)
def test_missing_home_is_a_clear_error(cli, gateway, argv):
    result = cli.run(*argv, env={"HOME": "", "USERPROFILE": ""})

    assert_clean_failure(result, 1)
    assert "HOME" in result.err and "TOKENROUTE_CONFIG_DIR" in result.err
    assert gateway.requests == []


@pytest.mark.parametrize("argv", [["login", "--no-browser"], ["whoami"], ["keys", "create", "--name", "ci"]])
def test_home_that_is_not_a_folder_is_a_clear_error(cli, gateway, tmp_path, argv):
    # Works as root too: nothing can create or read a folder inside a regular file.
    if os.name == "nt" and argv[0] != "login":
        pytest.skip("Windows reports a path through a file as not found: reading there is 'not logged in'")
    not_a_folder = tmp_path / "home-file"
    not_a_folder.write_text("")
    on_sleep(cli, 1, gateway.approve)

    result = cli.run(*argv, env={"HOME": str(not_a_folder), "USERPROFILE": str(not_a_folder)})

    assert_clean_failure(result, 1)
    assert str(not_a_folder) in result.err and "TOKENROUTE_CONFIG_DIR" in result.err


@posix_modes
@skip_as_root
def test_read_only_config_dir_is_a_clear_error(cli, gateway):
    cli.login()
    cli.config_dir.chmod(0o500)
    try:
        result = cli.run("keys", "create", "--name", "ci")
    finally:
        cli.config_dir.chmod(0o700)

    assert result.code == 1, result
    assert "Traceback" not in result.err
    assert str(cli.config_dir) in result.err and "TOKENROUTE_CONFIG_DIR" in result.err
    assert "sk-tr-" in result.out  # the key is still shown once


def test_tokenroute_config_dir_overrides_home(cli, gateway, tmp_path):
    folder = tmp_path / "sandbox" / "tokenroute"
    env = {"TOKENROUTE_CONFIG_DIR": str(folder), "HOME": "/nonexistent-home"}
    on_sleep(cli, 1, gateway.approve)

    assert cli.run("login", "--no-browser", env=env).code == 0
    created = cli.run("keys", "create", "--name", "ci", "--json", env=env)
    printed = cli.run("env", env=env)

    assert created.code == 0, created
    assert sorted(p.name for p in folder.iterdir() if p.name != "credentials.lock") == [
        "credentials.json", "keys.txt", "last_key.txt"]
    if POSIX:
        assert mode(folder) == 0o700
    assert printed.out.startswith(f"OPENAI_API_KEY={created.json()['raw']}\n")
    assert not cli.config_dir.exists()


# ---------------------------------------------------------------- parallel processes


def test_parallel_processes_refresh_once(cli, gateway, api_key):
    cli.login(expires_in=-100)
    gateway.expire_access_tokens()
    # every process reads the expired login before the first refresh ends
    gateway.slow("/oidc/token", 0.5, count=8, method="POST")
    command = [console_script(), "balance", "--json"]
    env = cli.process_env()

    processes = [
        subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(8)
    ]
    results = [(p.communicate(timeout=60), p.returncode) for p in processes]

    assert [code for _, code in results] == [0] * 8, results
    assert all(json.loads(out)["balance_usd"] == "5.00" for (out, _), _ in results)
    assert gateway.refresh_count == 1
    assert gateway.revoked_logins == 0


# ---------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    "amount", ["0", "-5", "abc", "nan", "inf", "1e309", "0.001", "", " ", "0.00", "-0", "1e2", "5,00", "\uff15"]
)
def test_invalid_topup_amount_exits_1_before_any_request(cli, gateway, amount):
    cli.login()

    result = cli.run("topup", "--amount", amount)
    joined = cli.run("topup", f"--amount={amount}")

    for outcome in (result, joined):
        assert outcome.code == 1, outcome
        assert "Traceback" not in outcome.err
        assert "2 decimals" in outcome.err and "like 5" in outcome.err
    assert gateway.requests == []


@pytest.mark.parametrize("amount, sent_amount", [("5", "5"), ("12.50", "12.50"), ("0.01", "0.01")])
def test_valid_topup_amount_is_sent_as_a_decimal_string(cli, gateway, amount, sent_amount):
    cli.login()

    assert cli.run("topup", "--amount", amount, "--json").code == 0

    assert sent(gateway, "POST", "/api/v1/topup")[0].json == {"amount_usd": sent_amount}


@pytest.mark.parametrize("days", ["0", "366", "7.5", "abc", "-1", "", "1e2", "+7"])
def test_invalid_usage_days_exits_1_before_any_request(cli, gateway, days):
    cli.login()

    result = cli.run("usage", f"--days={days}")

    assert result.code == 1, result
    assert "Traceback" not in result.err
    assert "365" in result.err
    assert gateway.requests == []


@pytest.mark.parametrize(
    "argv", [["keys", "create", "--name", ""], ["keys", "create", "--name", "   "], ["keys", "revoke", ""],
             ["keys", "revoke", "  "], ["test", "--model", ""]]
)
def test_empty_name_or_id_exits_1_before_any_request(cli, gateway, argv):
    cli.login()

    result = cli.run(*argv, env={"TOKENROUTE_API_KEY": "sk-tr-abcdefgh"})

    assert result.code == 1, result
    assert "empty" in result.err
    assert gateway.requests == []


@pytest.mark.parametrize(
    "argv", [["frobnicate"], ["whoami", "--frob"], ["keys", "frob"], ["--frob"], ["--api-url", "https://api.tokenroute.io"], ["topup"]]
)
def test_unknown_command_or_option_exits_1_with_the_usage_line(cli, gateway, argv):
    cli.login()

    result = cli.run(*argv)
    as_json = cli.run(*argv, "--json")

    assert result.code == 1, result
    assert "Traceback" not in result.err
    assert result.err.startswith("error: ")
    assert "usage: tokenroute" in result.err
    assert result.out == ""
    assert as_json.code == 1 and as_json.out == ""
    assert as_json.error()["code"] == "usage"
    assert gateway.requests == []


# ------------------------------------------------------------------ proxies


def test_https_proxy_from_the_environment_carries_the_tunnel_without_the_key(cli, gateway):
    env = {"TOKENROUTE_API_URL": "https://api.tokenroute.test", "HTTPS_PROXY": gateway.recorder.url}

    result = cli.run("models", "--key", "sk-tr-abcd1234secret", env=env)

    # The recorder answers the CONNECT but speaks no TLS: a clean network error.
    assert_clean_failure(result, 2)
    tunnels = gateway.recorder.requests
    assert tunnels and {(r.method, r.path) for r in tunnels} == {("CONNECT", "api.tokenroute.test:443")}
    assert all(r.header("Authorization") is None for r in tunnels)
    assert "sk-tr-abcd1234secret" not in result.err


def test_proxy_credentials_go_in_the_tunnel_request_decoded_and_are_never_shown(cli, gateway):
    proxy = gateway.recorder.url.replace("http://", "http://us%40er:p%3Ass@")
    env = {"TOKENROUTE_API_URL": "https://api.tokenroute.test", "https_proxy": proxy, "HTTPS_PROXY": "http://127.0.0.1:9"}

    result = cli.run("models", "--key", "sk-tr-abcd1234secret", env=env)

    assert_clean_failure(result, 2)
    tunnels = gateway.recorder.requests
    assert tunnels and {(r.method, r.path) for r in tunnels} == {("CONNECT", "api.tokenroute.test:443")}
    assert {r.header("Proxy-Authorization") for r in tunnels} == {"Basic dXNAZXI6cDpzcw=="}  # us@er:p:ss
    assert "p%3Ass" not in result.err and "p:ss" not in result.err


@pytest.mark.parametrize(("no_proxy", "host", "port", "bypassed"), [
    ("*", "api.tokenroute.io", None, True),
    ("tokenroute.io", "api.tokenroute.io", None, True),
    (" .Tokenroute.IO ", "api.tokenroute.io", 443, True),
    ("example.com, api.tokenroute.io:8443", "api.tokenroute.io", 8443, True),
    ("api.tokenroute.io:8443", "api.tokenroute.io", None, False),
    ("route.io", "api.tokenroute.io", None, False),
    ("", "api.tokenroute.io", None, False),
])
def test_no_proxy_matches_as_urllib_reads_it(no_proxy, host, port, bypassed):
    assert tokenroute.bypasses_proxy(host, port, no_proxy) is bypassed


def test_loopback_gateway_is_never_reached_through_a_proxy(cli, gateway):
    cli.login()

    result = cli.run("balance", env={"HTTP_PROXY": gateway.recorder.url, "http_proxy": gateway.recorder.url})

    assert result.code == 0, result
    assert gateway.recorder.requests == []
    assert [r.path for r in gateway.requests] == ["/api/v1/balance"]


def test_a_server_that_trickles_bytes_gives_exit_2_in_bounded_time(cli, gateway, api_key):
    """Each byte arrives well within the socket timeout; only an overall deadline ends it."""
    gateway.fail("/v1/models", trickle=0.05, count=3)

    started = time.monotonic()
    result = cli.script("models", env={"TOKENROUTE_API_KEY": api_key, "TOKENROUTE_TIMEOUT": "1"}, timeout=30)

    assert_clean_failure(result, 2)
    assert "timed out" in result.err
    assert time.monotonic() - started < 10


HOSTILE_API_URLS = [
    "https://x.example;{touch,/tmp/tokenroute-pwned};x",
    "https://x.example&touch${IFS}/tmp/tokenroute-pwned",
    "https://x.example|id",
    "https://x.example/$(id)",
    "https://x.example/`id`",
    "https://x.example/a:~root",
    "https://x.example/*",
    "https://x.example/(x)",
]


@pytest.mark.parametrize("url", HOSTILE_API_URLS)
@pytest.mark.parametrize("shell", ["dotenv", "sh", "fish", "powershell"])
def test_env_refuses_an_api_url_a_shell_would_not_take_literally(cli, api_key, url, shell):
    result = cli.run("env", "--shell", shell, env={"TOKENROUTE_API_KEY": api_key, "TOKENROUTE_API_URL": url})

    assert_clean_failure(result, 1)
    assert result.out == ""



def test_rate_limited_refresh_is_not_reported_as_an_expired_session(cli, gateway):
    creds = cli.login(expires_in=-100)
    gateway.fail("/oidc/token", status=429, body={"error": "slow down " + creds["refresh_token"]}, method="POST")

    result = cli.run("whoami", "--json")

    assert (result.code, result.out) == (1, "")
    assert (result.error()["code"], result.error()["status"]) == ("rate_limited", 429)
    assert creds["refresh_token"] not in result.err


def test_json_output_of_a_nan_from_the_server_is_a_server_error(cli, gateway):
    cli.login()
    gateway.fail("/api/v1/balance", status=200, body=b'{"balance_usd": NaN, "currency": "USD"}')

    result = cli.run("balance", "--json")

    assert (result.code, result.out) == (3, "")
    assert result.error()["code"] == "server"


def test_a_created_key_that_is_not_a_plain_token_is_still_shown_but_not_cached(cli, gateway):
    cli.login()
    odd = {"id": "key_1", "name": "x", "key_prefix": "sk-tr-abcd", "raw": "sk-tr-abcd.efgh", "status": "active"}
    gateway.fail("/api/v1/me/keys", status=201, body=odd, method="POST")

    result = cli.run("keys", "create", "--name", "x")

    assert result.code == 3
    assert "Key:     sk-tr-abcd.efgh\n" in result.out  # the only copy, shown all the same
    assert not cli.last_key.exists()


# ---------------------------------------------------- second security review


@pytest.fixture
def raw_server():
    """A loopback server that answers every connection with the bytes a test sets."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    answer = {"bytes": b""}

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                connection.recv(65536)
                connection.sendall(answer["bytes"])

    threading.Thread(target=serve, daemon=True).start()
    yield answer, "http://127.0.0.1:%d" % listener.getsockname()[1]
    listener.close()


def test_a_content_length_of_unicode_digits_is_a_clean_error(cli, raw_server):
    answer, url = raw_server
    answer["bytes"] = b"HTTP/1.0 200 OK\r\nContent-Length: \xb2\r\nContent-Type: application/json\r\n\r\n{}"

    result = cli.run("models", "--key", "sk-tr-abcd1234", env={"TOKENROUTE_API_URL": url})

    assert_clean_failure(result, 3)


def test_keys_with_dashes_or_underscores_up_front_are_redacted_too(cli, gateway):
    key = "sk-tr-Q_x9" + "s3cr3t" * 5
    gateway.fail("/v1/models", status=401, body={"error": {"message": f"Incorrect API key provided: {key}"}})

    doctor = cli.run("doctor", "--key", key)
    models = cli.run("models", "--key", key)

    assert "s3cr3t" not in doctor.out + doctor.err
    assert "sk-tr-Q_x9..." in doctor.out
    assert "s3cr3t" not in models.err and models.code == 1


def test_a_malformed_proxy_url_is_a_clean_error_that_hides_its_password(cli):
    env = {"TOKENROUTE_API_URL": "https://api.tokenroute.test", "HTTPS_PROXY": "http:/user:S3CRET@proxy:3128"}

    result = cli.run("models", "--key", "sk-tr-abcd1234", env=env)

    assert_clean_failure(result, 1)
    assert "S3CRET" not in result.err


def test_server_text_in_an_error_never_reaches_the_terminal_raw(cli, gateway):
    found = {
        "client_id": "tokenroute-cli", "resource": gateway.resource, "scopes": ["openid"],
        "device_authorization_endpoint": "http://evil\x1bc\x9b31mred\x08.example/x",
        "token_endpoint": gateway.url + "/oidc/token",
    }
    gateway.fail("/api/v1/auth/discovery", status=200, body=found)

    result = cli.run("login", "--no-browser")

    assert_clean_failure(result, 1)
    assert_terminal_safe(result.err)


def test_a_login_failure_echoing_the_device_code_does_not_print_it(cli, gateway):
    gateway.interval = 1
    original_fail = {"error": "server_rejected", "error_description": "rejected device code "}

    def echo_code() -> None:
        code = next(iter(gateway.device_codes))
        gateway.fail("/oidc/token", status=400, body=dict(original_fail, error_description="rejected " + code))
        cli.clock.on_sleep.clear()

    cli.clock.on_sleep.append(echo_code)
    result = cli.run("login", "--no-browser")

    assert result.code == 3
    code = next(iter(gateway.device_codes))
    assert code not in result.err and code[:10] + "..." in result.err


@pytest.mark.parametrize("argv", [["models"], ["api", "/v1/models"]])
def test_a_key_the_gateway_echoes_is_cut_once(cli, gateway, api_key, argv):
    gateway.fail("/v1/models", status=403, body={"detail": f"bad key {api_key}"}, count=2)

    result = cli.run(*argv, "--key", api_key)
    as_json = cli.run(*argv, "--key", api_key, "--json")

    assert result.code == 1 and result.err == f"error: bad key {api_key[:10]}...\n"
    assert as_json.error()["message"] == f"bad key {api_key[:10]}..."


@pytest.mark.parametrize("glued", ["key%3D{key}", "x{key}", '{{\\"m\\": \\"hi\\n{key}\\"}}'])
def test_a_key_the_gateway_names_glued_to_text_is_cut_too(cli, gateway, api_key, glued):
    other = gateway.add_key(name="other")["raw"]  # not the one sent, which is cut wherever it is
    gateway.fail("/v1/models", status=403, body={"detail": glued.format(key=other)})

    result = cli.run("models", "--key", api_key)

    assert result.code == 1 and other not in result.err and other[:10] + "..." in result.err


@pytest.mark.parametrize("echoed", ["eyJabcd.payload-secret.signature-secret", "eyJhbGciOiJIUzI1NiJ9.e30.sig-secret"])
def test_a_token_the_gateway_echoes_is_cut_whatever_its_header_length(cli, gateway, api_key, echoed):
    gateway.fail("/v1/models", status=403, body={"detail": f"bad token {echoed}"})

    result = cli.run("models", "--key", api_key)

    assert result.code == 1 and "secret" not in result.err and f"bad token {echoed[:7]}..." in result.err


def hold_lock(fd: int) -> None:
    """Lock a file the way tokenroute does on this platform, as another process would."""
    if os.name == "nt":
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)


def test_ctrl_c_while_keys_create_waits_for_the_lock_still_shows_the_new_key(cli, gateway):
    cli.login()
    cli.config_dir.mkdir(exist_ok=True)

    def ctrl_c_once_created() -> None:
        if any(r.method == "POST" and r.path == "/api/v1/me/keys" for r in gateway.requests):
            raise KeyboardInterrupt

    with open(cli.config_dir / "credentials.lock", "w") as held:
        hold_lock(held.fileno())  # another tokenroute
        cli.clock.on_sleep.append(ctrl_c_once_created)
        result = cli.run("keys", "create", "--name", "held", "--json")

    [key] = [key for key in gateway.keys.values() if key["name"] == "held"]
    assert result.code == 130
    assert json.loads(result.out)["raw"] == key["raw"]  # its only copy, shown
    assert json.loads(result.err)["error"]["message"] == "the key above was created but not cached: interrupted"
    assert cli.cached_key() is None


def test_waiting_for_another_process_refresh_ends_within_the_timeout(cli, gateway):
    cli.login(expires_in=-100)
    cli.config_dir.mkdir(exist_ok=True)
    with open(cli.config_dir / "credentials.lock", "w") as held:
        hold_lock(held.fileno())

        result = cli.run("whoami", env={"TOKENROUTE_TIMEOUT": "1"})

    assert_clean_failure(result, 2)
    assert "another tokenroute process" in result.err
    assert gateway.refresh_count == 0
    assert 1 <= sum(cli.clock.sleeps) <= 1.2


# ---------------------------------------------------------------- a proxy that fails


PROXIED = {"TOKENROUTE_API_URL": "https://gateway.example.com", "NO_PROXY": "", "no_proxy": ""}


def test_a_proxy_that_wants_a_password_is_named_and_not_retried(cli, raw_server):
    answer, url = raw_server
    answer["bytes"] = b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n"

    result = cli.run("models", "--key", "sk-tr-abcd1234", env={**PROXIED, "HTTPS_PROXY": url})

    assert_clean_failure(result, 2)
    proxy = url.split("//")[1]
    assert f"the HTTPS_PROXY proxy {proxy} wants a user name and password (407)" in result.err
    assert cli.clock.sleeps == []  # a missing password does not come back on a retry


def test_an_unreachable_proxy_is_named_not_the_gateway(cli, no_dns):
    result = cli.run("models", "--key", "sk-tr-abcd1234", env={**PROXIED, "HTTPS_PROXY": "http://ada:s3cret@127.0.0.1:1"})

    assert_clean_failure(result, 2)
    assert "cannot reach the HTTPS_PROXY proxy 127.0.0.1:1" in result.err
    assert "s3cret" not in result.err and "ada" not in result.err


@pytest.mark.parametrize("proxy", ["http://ada:hunter2", "ada:hunter2"])
def test_a_password_where_the_proxy_port_should_be_is_never_shown(cli, proxy):
    result = cli.run("models", "--key", "sk-tr-abcd1234", env={**PROXIED, "HTTPS_PROXY": proxy})

    assert_clean_failure(result, 1)
    assert "hunter2" not in result.err
    assert "proxy variable" in result.err


def test_an_empty_lower_case_proxy_variable_turns_the_upper_case_one_off():
    env = {"HTTPS_PROXY": "http://proxy.example:3128", "https_proxy": "", "HTTP_PROXY": "http://p.example:1"}

    assert tokenroute.proxy_settings(env) == {"http": "http://p.example:1"}
