"""Every command of the CLI reference, end to end against the fake gateway.

Each test asserts what a person or an agent relies on: the exit code, the
exact stdout (or JSON), stderr, the files and their modes, and what the
gateway received.
"""
from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import tokenroute
from conftest import POSIX, Cli, posix_modes
from fake_gateway import FakeGateway

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
SCOPE = "openid offline_access profile email"
RESOURCE = "https://api.tokenroute.io"


# ---------------------------------------------------------------- helpers


def sent(gateway: Any, method: str, path: str) -> list[Any]:
    """The requests the gateway received for METHOD PATH (query string ignored)."""
    return [r for r in gateway.requests if r.method == method and r.path_only == path]


def device_polls(gateway: Any) -> list[Any]:
    return [r for r in sent(gateway, "POST", "/oidc/token") if (r.form or {}).get("grant_type") == DEVICE_GRANT]


def refresh_grants(gateway: Any) -> list[Any]:
    return [r for r in sent(gateway, "POST", "/oidc/token") if (r.form or {}).get("grant_type") == "refresh_token"]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def closed_port_url() -> str:
    """A loopback URL nothing listens on: connecting is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def on_poll(cli: Any, number: int, action: Any) -> None:
    """Run ACTION during the CLI's NUMBER-th sleep, i.e. just before its NUMBER-th poll."""
    calls = []

    def hook() -> None:
        calls.append(None)
        if len(calls) == number:
            action()

    cli.clock.on_sleep.append(hook)


def days_ago(days: int) -> float:
    """A moment in the gateway's (real) time, for usage records."""
    return time.time() - days * 86400


def stored(cli: Any) -> dict[str, Any]:
    return cli.stored_login()


def login_prompt(gateway: Any, user_code: str) -> str:
    return (
        f"Visit: {gateway.url}/device\n"
        f"And enter code: {user_code}\n"
        f"(or open {gateway.url}/device?user_code={user_code})\n"
        "Waiting for authorization...\n"
    )


def user_code_in(err: str) -> str:
    match = re.search(r"^And enter code: (\S+)$", err, re.MULTILINE)
    assert match, err
    return match.group(1)


# ---------------------------------------------------------------- login


def test_login_runs_discovery_then_device_flow_with_resource(cli, gateway):
    on_poll(cli, 1, gateway.approve)

    result = cli.run("login")

    assert result.code == 0, result
    assert result.out == f"OK logged in as agent@example.com ({gateway.url.split('//')[1]})\n"
    assert [(r.method, r.path_only) for r in gateway.requests] == [
        ("GET", "/api/v1/auth/discovery"),
        ("POST", "/oidc/device/auth"),
        ("POST", "/oidc/token"),
        ("GET", "/api/v1/me"),  # who logged in, for the last line
    ]
    device_auth = sent(gateway, "POST", "/oidc/device/auth")[0]
    assert device_auth.form == {"client_id": "tokenroute-cli", "scope": SCOPE, "resource": RESOURCE}
    poll = device_polls(gateway)[0]
    assert poll.form == {
        "grant_type": DEVICE_GRANT,
        "device_code": poll.form["device_code"],
        "client_id": "tokenroute-cli",
        "resource": RESOURCE,
    }
    assert poll.form["device_code"]


def test_login_prints_code_and_waiting_on_stderr(cli, gateway):
    on_poll(cli, 1, gateway.approve)

    result = cli.run("login")

    assert result.err == login_prompt(gateway, user_code_in(result.err))
    assert result.out == f"OK logged in as agent@example.com ({gateway.url.split('//')[1]})\n"


def test_login_stores_tokens_endpoint_client_resource_and_url(cli, gateway):
    on_poll(cli, 1, gateway.approve)
    before = cli.clock.now()

    assert cli.run("login").code == 0

    creds = stored(cli)
    assert set(creds) == {
        "api_url", "access_token", "refresh_token", "expires_at", "token_endpoint", "client_id", "resource", "issuer",
    }
    assert creds["api_url"] == gateway.url
    assert creds["access_token"].startswith("eyJ")  # a JWT for the gateway, not an opaque token
    assert creds["refresh_token"]
    assert creds["token_endpoint"] == gateway.url + "/oidc/token"
    assert creds["client_id"] == "tokenroute-cli"
    assert creds["resource"] == RESOURCE
    assert creds["issuer"] == gateway.url + "/oidc"  # what tells tokenroute's logins in ~/.paradigx/auth.json
    assert creds["expires_at"] == pytest.approx(before + 5 + 3600)


def test_login_token_works_for_account_commands(cli, gateway, api_key):
    on_poll(cli, 1, gateway.approve)
    assert cli.run("login").code == 0

    result = cli.run("balance", "--json")

    assert result.code == 0, result
    assert result.json() == {"balance_usd": "5.00", "currency": "USD"}


def test_login_polls_every_5_seconds_when_server_omits_interval(cli, gateway):
    assert gateway.interval is None
    on_poll(cli, 3, gateway.approve)

    assert cli.run("login").code == 0

    assert cli.clock.sleeps == [5, 5, 5]
    assert len(device_polls(gateway)) == 3


def test_login_polls_at_the_server_interval(cli, gateway):
    gateway.interval = 2
    on_poll(cli, 2, gateway.approve)

    assert cli.run("login").code == 0

    assert cli.clock.sleeps == [2, 2]


def test_login_slow_down_adds_5_seconds(cli, gateway):
    gateway.slow_down_next = 1
    on_poll(cli, 3, gateway.approve)

    assert cli.run("login").code == 0

    assert cli.clock.sleeps == [5, 10, 10]
    assert len(device_polls(gateway)) == 3


def test_login_denied_exits_3(cli, gateway):
    on_poll(cli, 1, gateway.deny)

    result = cli.run("login")

    assert result.code == 3
    assert result.out == ""
    assert result.err.endswith("error: the login was denied; run `tokenroute login`\n")
    assert not cli.credentials.exists()


def test_login_denied_json_error(cli, gateway):
    on_poll(cli, 1, gateway.deny)

    result = cli.run("login", "--json")

    assert result.code == 3
    assert result.out == ""
    error = json.loads(result.err.splitlines()[-1])["error"]
    assert (error["code"], error["message"], error["status"]) == ("login_denied", "the login was denied", None)


def test_login_expired_code_exits_3(cli, gateway):
    on_poll(cli, 1, gateway.expire_device_codes)

    result = cli.run("login")

    assert result.code == 3
    assert result.err.endswith(
        "error: the login code expired before it was approved; run `tokenroute login`\n"
    )
    assert not cli.credentials.exists()


def test_login_stops_polling_at_expires_in(cli, gateway):
    gateway.device_expires_in = 12

    result = cli.run("login")

    assert result.code == 3
    assert "expired" in result.err
    assert cli.clock.sleeps == [5, 5, 2]
    assert len(device_polls(gateway)) == 2


def test_login_opens_browser_at_complete_uri_for_a_person(cli, gateway):
    on_poll(cli, 1, gateway.approve)

    result = cli.run("login", tty=True)

    assert result.code == 0
    assert cli.opened == [f"{gateway.url}/device?user_code={user_code_in(result.err)}"]


@pytest.mark.parametrize(
    ("argv", "tty"),
    [(("login",), False), (("login", "--no-browser"), True)],
    ids=["no-tty", "no-browser-flag"],
)
def test_login_does_not_open_browser(cli, gateway, argv, tty):
    on_poll(cli, 1, gateway.approve)

    result = cli.run(*argv, tty=tty)

    assert result.code == 0
    assert cli.opened == []
    assert f"{gateway.url}/device" in result.err  # the URL is always printed


def test_login_json_keeps_stdout_clean(cli, gateway):
    on_poll(cli, 1, gateway.approve)

    result = cli.run("--json", "login")

    assert result.code == 0
    assert result.json() == {"status": "logged_in", "api_url": gateway.url}
    assert result.err == login_prompt(gateway, user_code_in(result.err))


def test_login_when_discovery_is_disabled_exits_3(cli, gateway):
    gateway.fail("/api/v1/auth/discovery", status=503, body={"detail": "CLI login disabled"}, count=3)

    result = cli.run("login")

    assert result.code == 3
    assert result.err == "error: CLI login is not enabled on this gateway\n"


def test_login_without_refresh_token_still_works(cli, gateway):
    # A provider that grants no offline_access issues no refresh token; the
    # login must still be usable until the access token expires.
    discovery = {
        "issuer": gateway.url + "/oidc", "client_id": "tokenroute-cli", "resource": RESOURCE,
        "scopes": ["openid"],
        "device_authorization_endpoint": gateway.url + "/oidc/device/auth",
        "token_endpoint": gateway.url + "/oidc/token",
    }
    gateway.fail("/api/v1/auth/discovery", status=200, body=discovery)
    on_poll(cli, 1, gateway.approve)
    assert cli.run("login").code == 0

    result = cli.run("whoami", "--json")

    assert result.code == 0, result
    assert result.json()["email"] == "agent@example.com"


def test_expired_login_without_refresh_token_asks_for_login(cli, gateway):
    creds = cli.login(expires_in=0)
    cli.write_login(dict(creds, refresh_token=""))

    result = cli.run("whoami")

    assert result.code == 1
    assert result.err == "error: session expired; run `tokenroute login`\n"
    assert gateway.requests == []


def test_interrupted_login_exits_130(cli, gateway):
    def interrupt() -> None:
        raise KeyboardInterrupt

    on_poll(cli, 1, interrupt)

    result = cli.run("login")

    assert result.code == 130
    assert result.err.endswith("error: interrupted\n")
    assert not cli.credentials.exists()


# ---------------------------------------------------------------- files


@posix_modes
def test_login_writes_owner_only_files(cli, gateway):
    on_poll(cli, 1, gateway.approve)

    assert cli.run("login").code == 0

    assert mode(cli.config_dir) == 0o700
    assert mode(cli.credentials) == 0o600


@posix_modes
def test_keys_create_caches_key_owner_only(cli, gateway):
    cli.login()

    assert cli.run("keys", "create", "--name", "laptop").code == 0

    assert mode(cli.last_key) == 0o600


@posix_modes
def test_files_are_owner_only_under_umask_000(cli, gateway):
    on_poll(cli, 1, gateway.approve)
    previous = os.umask(0)
    try:
        assert cli.run("login").code == 0
        assert cli.run("keys", "create", "--name", "laptop").code == 0
    finally:
        os.umask(previous)

    assert mode(cli.config_dir) == 0o700
    assert mode(cli.credentials) == 0o600
    assert mode(cli.last_key) == 0o600


@posix_modes
def test_refresh_keeps_credentials_owner_only_under_umask_000(cli, gateway):
    cli.login(expires_in=0)
    previous = os.umask(0)
    try:
        assert cli.run("balance").code == 0
    finally:
        os.umask(previous)

    assert mode(cli.credentials) == 0o600


def test_no_temp_files_left_behind(cli, gateway):
    on_poll(cli, 1, gateway.approve)
    assert cli.run("login").code == 0
    assert cli.run("keys", "create", "--name", "laptop").code == 0

    leftovers = [p.name for p in cli.config_dir.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


# ---------------------------------------------------------------- logout


def test_logout_removes_credentials(cli, gateway):
    cli.login()

    result = cli.run("logout")

    assert (result.code, result.out) == (0, f"OK logged out of {gateway.url}\n")
    assert not cli.credentials.exists()
    assert gateway.requests == []


def test_logout_when_logged_out_exits_0(cli, gateway):
    result = cli.run("logout")

    assert (result.code, result.out) == (0, f"Not logged in to {gateway.url}; nothing to do\n")


def test_commands_after_logout_ask_for_login(cli, gateway):
    cli.login()
    cli.run("logout")

    result = cli.run("whoami")

    assert result.code == 1
    assert result.err == f"error: not logged in to {gateway.url}; run `tokenroute login`\n"
    assert gateway.requests == []


# ---------------------------------------------------------------- token refresh


def test_expired_access_token_is_refreshed_once_with_resource(cli, gateway, api_key):
    old = cli.login(expires_in=0)

    result = cli.run("balance", "--json")

    assert result.code == 0, result
    assert result.json() == {"balance_usd": "5.00", "currency": "USD"}
    grants = refresh_grants(gateway)
    assert len(grants) == 1
    assert grants[0].form == {
        "grant_type": "refresh_token",
        "refresh_token": old["refresh_token"],
        "client_id": "tokenroute-cli",
        "resource": RESOURCE,
    }
    new = stored(cli)
    assert sent(gateway, "GET", "/api/v1/balance")[0].header("Authorization") == f"Bearer {new['access_token']}"


def test_rotated_refresh_token_is_persisted(cli, gateway):
    old = cli.login(expires_in=0)
    assert cli.run("balance").code == 0
    rotated = stored(cli)
    assert rotated["refresh_token"] != old["refresh_token"]
    assert rotated["access_token"] != old["access_token"]

    # The next refresh presents the rotated token; reusing the old one would revoke the login.
    gateway.expire_access_tokens()
    assert cli.run("balance").code == 0

    assert refresh_grants(gateway)[1].form["refresh_token"] == rotated["refresh_token"]
    assert gateway.revoked_logins == 0
    assert gateway.refresh_count == 2


def test_valid_access_token_is_not_refreshed(cli, gateway):
    creds = cli.login()

    assert cli.run("balance").code == 0

    assert gateway.refresh_count == 0
    assert sent(gateway, "GET", "/api/v1/balance")[0].header("Authorization") == f"Bearer {creds['access_token']}"


def test_401_refreshes_once_and_retries(cli, gateway, api_key):
    old = cli.login()
    gateway.expire_access_tokens()  # the gateway rejects a token the CLI still thinks is valid

    result = cli.run("balance", "--json")

    assert result.code == 0, result
    assert gateway.refresh_count == 1
    calls = sent(gateway, "GET", "/api/v1/balance")
    assert [c.header("Authorization") for c in calls] == [
        f"Bearer {old['access_token']}",
        f"Bearer {stored(cli)['access_token']}",
    ]


def test_persistent_401_exits_1_with_login_hint(cli, gateway):
    cli.login()
    gateway.fail("/api/v1/me", status=401, body={"detail": "Not authenticated"}, count=2)

    result = cli.run("whoami")

    assert result.code == 1
    assert result.err == "error: Not authenticated; run `tokenroute login`\n"
    assert gateway.refresh_count == 1
    assert len(sent(gateway, "GET", "/api/v1/me")) == 2


def test_rejected_refresh_exits_1_session_expired(cli, gateway):
    creds = cli.login(expires_in=0)
    cli.write_login(dict(creds, refresh_token="not-a-live-refresh-token"))

    result = cli.run("whoami")

    assert result.code == 1
    assert result.out == ""
    assert result.err == "error: session expired; run `tokenroute login`\n"
    assert gateway.refresh_count == 1  # never retried with a stale token
    assert sent(gateway, "GET", "/api/v1/me") == []


def test_rejected_refresh_json_error(cli, gateway):
    creds = cli.login(expires_in=0)
    cli.write_login(dict(creds, refresh_token="not-a-live-refresh-token"))

    result = cli.run("whoami", "--json")

    assert result.code == 1
    assert result.out == ""
    assert result.error() == {
        "code": "session_expired", "message": "session expired", "status": None, "next": "tokenroute login",
    }


def test_login_after_session_expired_starts_a_new_login(cli, gateway):
    creds = cli.login(expires_in=0)
    cli.write_login(dict(creds, refresh_token="not-a-live-refresh-token"))
    assert cli.run("whoami").err == "error: session expired; run `tokenroute login`\n"
    on_poll(cli, 1, gateway.approve)

    result = cli.run("login")  # the command the error told the user to run

    assert (result.code, result.out) == (0, f"OK logged in as agent@example.com ({gateway.url.split('//')[1]})\n")
    assert len(device_polls(gateway)) == 1
    assert cli.run("whoami").code == 0


# ---------------------------------------------------------------- whoami, balance, usage


def test_whoami_human(cli, gateway, api_key):
    cli.login()

    result = cli.run("whoami")

    assert result.code == 0
    assert result.out == (
        "Name:    Agent\n"
        "Email:   agent@example.com\n"
        "Balance: $5.00\n"
        "Status:  active\n"
        f"ID:      {gateway.account['id']}\n"
        "Subject: logto_xyz\n"
        f"Gateway: {gateway.url}\n"
    )
    assert result.err == ""


def test_whoami_json_sends_access_token(cli, gateway, api_key):
    creds = cli.login()

    result = cli.run("whoami", "--json")

    assert result.code == 0
    assert result.json() == {
        "id": gateway.account["id"], "display_name": "Agent", "email": "agent@example.com",
        "logto_sub": "logto_xyz", "balance_usd": "5.00", "status": "active",
    }
    request = sent(gateway, "GET", "/api/v1/me")[0]
    assert request.header("Authorization") == f"Bearer {creds['access_token']}"


def test_balance_human(cli, gateway, api_key):
    cli.login()

    result = cli.run("balance")

    assert (result.code, result.out, result.err) == (0, "Balance: $5.00\n", "")


def test_usage_json_sends_days(cli, gateway):
    gateway.record_usage(100, 20, "0.10")
    gateway.record_usage(50, 10, "0.08")
    gateway.record_usage(999, 999, "9.99", at=days_ago(10))
    cli.login()

    result = cli.run("usage", "--days", "7", "--json")

    assert result.code == 0, result
    assert result.json() == {
        "range_days": 7, "total_requests": 2, "total_tokens_in": 150, "total_tokens_out": 30,
        "total_cost_usd": "0.18",
    }
    assert [r.path for r in sent(gateway, "GET", "/api/v1/me/usage")] == ["/api/v1/me/usage?days=7"]


def test_usage_defaults_to_30_days_human(cli, gateway):
    gateway.record_usage(100, 20, "0.18")
    cli.login()

    result = cli.run("usage")

    assert result.code == 0
    assert result.out == (
        "Days:       30\n"
        "Requests:   1\n"
        "Tokens in:  100\n"
        "Tokens out: 20\n"
        "Cost:       $0.18\n"
    )
    assert sent(gateway, "GET", "/api/v1/me/usage")[0].path == "/api/v1/me/usage?days=30"


# ---------------------------------------------------------------- keys


def test_keys_create_shows_raw_once_and_caches_it(cli, gateway):
    creds = cli.login()

    result = cli.run("keys", "create", "--name", "laptop")

    assert result.code == 0, result
    key = next(k for k in gateway.keys.values() if k["name"] == "laptop")
    assert result.out == (
        "Name:    laptop\n"
        f"ID:      {key['id']}\n"
        f"Prefix:  {key['key_prefix']}\n"
        "Balance: $0.00\n"
        "Status:  active\n"
        f"Key:     {key['raw']}\n"
    )
    assert result.err == (
        f"Save this key now: it is shown only once. Cached in {cli.last_key} for env, run, test and models.\n"
    )
    assert cli.cached_key() == key["raw"]
    request = sent(gateway, "POST", "/api/v1/me/keys")[0]
    assert request.json == {"name": "laptop"}
    assert request.header("Content-Type") == "application/json"
    assert request.header("Authorization") == f"Bearer {creds['access_token']}"


def test_keys_create_json_returns_the_new_key(cli, gateway):
    cli.login()

    result = cli.run("keys", "create", "--name", "fieryeye", "--json")

    assert result.code == 0
    key = next(k for k in gateway.keys.values() if k["name"] == "fieryeye")
    assert result.json() == key
    assert result.json()["raw"].startswith("sk-tr-")
    assert cli.cached_key() == key["raw"]


def test_keys_create_no_cache_leaves_no_file(cli, gateway):
    cli.login()

    result = cli.run("keys", "create", "--name", "ci", "--no-cache")

    assert result.code == 0
    assert not cli.last_key.exists()
    assert result.err == "Save this key now: it is shown only once (not cached: --no-cache).\n"


def test_keys_create_sends_a_fresh_idempotency_key_each_time(cli, gateway):
    cli.login()

    cli.run("keys", "create", "--name", "one")
    cli.run("keys", "create", "--name", "two")

    keys = [r.header("Idempotency-Key") for r in sent(gateway, "POST", "/api/v1/me/keys")]
    assert len(keys) == 2 and all(keys)
    assert keys[0] != keys[1]
    assert sorted(k["name"] for k in gateway.keys.values()) == ["one", "two"]


def test_keys_list_json_never_has_raw(cli, gateway, api_key):
    cli.login()

    result = cli.run("keys", "list", "--json")

    assert result.code == 0
    seed = next(iter(gateway.keys.values()))
    assert result.json() == [{**{k: v for k, v in seed.items() if k != "raw"}, "in_use": False}]
    assert api_key not in result.out


def test_keys_list_human_table(cli, gateway):
    laptop = gateway.add_key(name="laptop", balance_usd="5.00")
    ci = gateway.add_key(name="ci", balance_usd="0.25")
    gateway.keys[ci["id"]]["status"] = "revoked"
    cli.login()

    result = cli.run("keys", "list")

    assert result.code == 0
    created = tokenroute.readable_time(laptop["created_at"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", created)
    assert result.out == (
        "ID            Name    Prefix      Status   Balance  Created\n"
        f"{laptop['id']}  laptop  {laptop['key_prefix']}  active   $5.00    {created}\n"
        f"{ci['id']}  ci      {ci['key_prefix']}  revoked  $0.25    {tokenroute.readable_time(ci['created_at'])}\n"
    )
    assert laptop["raw"] not in result.out


def test_keys_list_empty_says_how_to_create(cli, gateway):
    cli.login()

    result = cli.run("keys", "list")

    assert (result.code, result.out) == (0, "")
    assert result.err == "No keys yet. Create one: tokenroute keys create --name NAME\n"


def test_keys_revoke_deletes_the_key(cli, gateway, api_key):
    key_id = next(iter(gateway.keys))
    cli.login()

    result = cli.run("keys", "revoke", key_id)

    assert result.code == 0
    assert result.out == f"OK revoked {key_id} (seed)\n"
    assert [r.path for r in sent(gateway, "DELETE", f"/api/v1/me/keys/{key_id}")] == [f"/api/v1/me/keys/{key_id}"]
    assert gateway.keys[key_id]["status"] == "revoked"


def test_keys_revoke_json(cli, gateway, api_key):
    key_id = next(iter(gateway.keys))
    cli.login()

    result = cli.run("keys", "revoke", key_id, "--json")

    assert result.code == 0
    assert result.json()["id"] == key_id
    assert result.json()["status"] == "revoked"
    assert "raw" not in result.json()


def test_revoke_unknown_key_exits_1_not_found(cli, gateway):
    cli.login()

    result = cli.run("keys", "revoke", "key_missing")

    assert (result.code, result.out) == (1, "")
    assert result.err == "error: Key not found; run `tokenroute keys list`\n"


def test_revoked_key_exits_1(cli, gateway, api_key):
    key_id = next(iter(gateway.keys))
    cli.login()
    assert cli.run("keys", "revoke", key_id).code == 0

    result = cli.run("test", "--key", api_key)

    assert (result.code, result.out) == (1, "")
    assert result.err == (
        "error: Invalid API key; the gateway rejected the API key (revoked or unknown): pass another with --key, "
        "or create one; run `tokenroute keys create --name NAME`\n"
    )


# ---------------------------------------------------------------- topup


def test_topup_sends_amount_as_decimal_string(cli, gateway):
    creds = cli.login()

    result = cli.run("topup", "--amount", "5")

    assert result.code == 0, result
    request = sent(gateway, "POST", "/api/v1/topup")[0]
    assert request.json == {"amount_usd": "5"}
    assert request.header("Authorization") == f"Bearer {creds['access_token']}"
    assert request.header("Idempotency-Key")
    (session_id,) = gateway.checkouts
    assert result.out == f"Checkout: https://checkout.stripe.com/c/pay/{session_id}\n"
    expires = r"\d{4}-\d\d-\d\d \d\d:\d\d UTC"  # the answer's expires_at, in Unix seconds
    assert re.fullmatch(rf"Open it to pay \$5\.00; credit arrives once paid\. The link expires {expires}\.\n"
                        r"Credit is per key: once paid, `tokenroute keys list` shows which key holds it\.\n", result.err)


@pytest.mark.parametrize("amount", ["12.50", "0.5", "1000"])
def test_topup_keeps_amount_exact(cli, gateway, amount):
    cli.login()

    result = cli.run("topup", "--amount", amount, "--json")

    assert result.code == 0
    assert sent(gateway, "POST", "/api/v1/topup")[0].json == {"amount_usd": amount}
    assert result.json()["amount_usd"] == amount


def test_topup_json(cli, gateway):
    cli.login()

    result = cli.run("topup", "--amount", "5", "--json")

    assert result.code == 0
    (session_id,) = gateway.checkouts
    body = result.json()
    assert body == {
        "checkout_url": f"https://checkout.stripe.com/c/pay/{session_id}",
        "session_id": session_id,
        "amount_usd": "5",
        "expires_at": body["expires_at"],
    }
    assert isinstance(body["expires_at"], int)
    assert result.err == ""


def test_topup_opens_browser_for_a_person(cli, gateway):
    cli.login()

    result = cli.run("topup", "--amount", "5", tty=True)

    assert result.code == 0
    (session_id,) = gateway.checkouts
    assert cli.opened == [f"https://checkout.stripe.com/c/pay/{session_id}"]


@pytest.mark.parametrize(
    ("argv", "tty"),
    [
        (("topup", "--amount", "5"), False),
        (("topup", "--amount", "5", "--json"), True),
        (("topup", "--amount", "5", "--no-browser"), True),
    ],
    ids=["no-tty", "json", "no-browser-flag"],
)
def test_topup_does_not_open_browser(cli, gateway, argv, tty):
    cli.login()

    result = cli.run(*argv, tty=tty)

    assert result.code == 0
    assert cli.opened == []
    assert "https://checkout.stripe.com/c/pay/" in result.out


@pytest.mark.parametrize("amount", ["0", "-5", "5.001", "abc", "1e2", "NaN", "", "1,000"])
def test_invalid_topup_amount_exits_1_without_request(cli, gateway, amount):
    cli.login()

    result = cli.run("topup", "--amount", amount)

    assert result.code == 1
    assert result.out == ""
    assert result.err.startswith("error: argument --amount: ")
    assert gateway.requests == []


# ---------------------------------------------------------------- env


def test_env_prints_exactly_two_lines(cli, gateway, api_key):
    result = cli.run("env", "--key", api_key)

    assert result.code == 0
    assert result.out == f"OPENAI_API_KEY={api_key}\nOPENAI_BASE_URL={gateway.url}/v1\n"
    assert result.err == ""
    assert gateway.requests == []


def test_env_json(cli, gateway, api_key):
    result = cli.run("env", "--key", api_key, "--json")

    assert result.code == 0
    assert result.json() == {"OPENAI_API_KEY": api_key, "OPENAI_BASE_URL": f"{gateway.url}/v1"}


def test_env_ignores_trailing_slash_in_api_url(cli, gateway, api_key):
    result = cli.run("env", "--key", api_key, env={"TOKENROUTE_API_URL": gateway.url + "/"})

    assert result.out.splitlines()[1] == f"OPENAI_BASE_URL={gateway.url}/v1"


def test_env_defaults_to_the_public_gateway(cli, api_key):
    del cli.env["TOKENROUTE_API_URL"]

    result = cli.run("env", "--key", api_key)

    assert result.out == f"OPENAI_API_KEY={api_key}\nOPENAI_BASE_URL=https://api.tokenroute.io/v1\n"


@pytest.mark.parametrize("command", ["env", "test", "models"])
def test_no_key_exits_1_with_hint(cli, gateway, command):
    result = cli.run(command)

    assert (result.code, result.out) == (1, "")
    assert result.err == (
        f"error: no API key for {gateway.url}: pass --key, set TOKENROUTE_API_KEY, or create one; "
        "run `tokenroute keys create --name NAME`\n"
    )
    assert gateway.requests == []


@pytest.mark.parametrize("command", ["env", "test", "models"])
def test_malformed_key_exits_1_without_request(cli, gateway, command):
    result = cli.run(command, "--key", "not-a-key")

    assert result.code == 1
    assert result.err == "error: the API key from --key is not a tokenroute key (sk-tr-...)\n"
    assert gateway.requests == []


# ---------------------------------------------------------------- key resolution


@pytest.fixture
def three_keys(cli, gateway):
    """One key for each source: --key, TOKENROUTE_API_KEY and last_key.txt."""
    flag, env, cached = (gateway.add_key(name=n)["raw"] for n in ("flag", "env", "cached"))
    cli.config_dir.mkdir(mode=0o700)
    cli.cache_key(cached)
    return {"flag": flag, "env": env, "cached": cached}


def key_used(gateway, command: str, result) -> str:
    """The key COMMAND used: from env's output, else from the Authorization header."""
    assert result.code == 0, result
    if command == "env":
        return result.out.splitlines()[0].split("=", 1)[1]
    path = "/v1/chat/completions" if command == "test" else "/v1/models"
    (request,) = [r for r in gateway.requests if r.path_only == path]
    scheme, _, key = request.header("Authorization").partition(" ")
    assert scheme == "Bearer"
    return key


@pytest.mark.parametrize("command", ["env", "test", "models"])
def test_key_flag_beats_env_and_cache(cli, gateway, three_keys, command):
    result = cli.run(command, "--key", three_keys["flag"], env={"TOKENROUTE_API_KEY": three_keys["env"]})

    assert key_used(gateway, command, result) == three_keys["flag"]


@pytest.mark.parametrize("command", ["env", "test", "models"])
def test_env_key_beats_cache(cli, gateway, three_keys, command):
    result = cli.run(command, env={"TOKENROUTE_API_KEY": three_keys["env"]})

    assert key_used(gateway, command, result) == three_keys["env"]


@pytest.mark.parametrize("command", ["env", "test", "models"])
def test_cached_key_is_the_fallback(cli, gateway, three_keys, command):
    result = cli.run(command)

    assert key_used(gateway, command, result) == three_keys["cached"]


def test_created_key_is_used_by_test_with_no_arguments(cli, gateway):
    cli.login()
    cli.run("keys", "create", "--name", "laptop")
    key = next(k for k in gateway.keys.values() if k["name"] == "laptop")
    gateway.set_balance(key["id"], "1.00")

    result = cli.run("test")

    assert result.code == 0, result
    assert sent(gateway, "POST", "/v1/chat/completions")[0].header("Authorization") == f"Bearer {key['raw']}"


# ---------------------------------------------------------------- test


def test_test_prints_reply(cli, gateway, api_key):
    result = cli.run("test", "--key", api_key)

    assert result.code == 0
    assert result.out == "OK connected (openai/gpt-4o-mini)\n  reply: OK\n"
    assert result.err == ""
    request = sent(gateway, "POST", "/v1/chat/completions")[0]
    assert request.json["model"] == "openai/gpt-4o-mini"
    assert request.json["messages"][0]["role"] == "user"
    assert request.header("Content-Type") == "application/json"


def test_test_with_model(cli, gateway, api_key):
    result = cli.run("test", "--model", "openai/gpt-4o", "--key", api_key)

    assert result.out == "OK connected (openai/gpt-4o)\n  reply: OK\n"
    assert sent(gateway, "POST", "/v1/chat/completions")[0].json["model"] == "openai/gpt-4o"


def test_test_json(cli, gateway, api_key):
    result = cli.run("test", "--key", api_key, "--json")

    assert result.code == 0
    assert result.json() == {
        "ok": True, "model": "openai/gpt-4o-mini", "reply": "OK",
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
    }


def test_test_unknown_model_exits_1(cli, gateway, api_key):
    result = cli.run("test", "--model", "nope/none", "--key", api_key)

    assert (result.code, result.out) == (1, "")
    assert result.err == "error: Model 'nope/none' not found; run `tokenroute models`\n"


def test_insufficient_balance_exits_1_with_topup_hint(cli, gateway):
    empty = gateway.add_key(name="empty", balance_usd="0.00")["raw"]

    result = cli.run("test", "--key", empty)

    assert (result.code, result.out) == (1, "")
    assert result.err == (
        f"error: Insufficient balance: the API key {empty[:10]}... from --key; credit is per key: top up, or use a "
        "funded key with --key or TOKENROUTE_API_KEY; run `tokenroute topup --amount 5`\n"
    )


def test_insufficient_balance_json_error(cli, gateway):
    empty = gateway.add_key(name="empty", balance_usd="0.00")["raw"]

    result = cli.run("test", "--key", empty, "--json")

    assert (result.code, result.out) == (1, "")
    assert result.error() == {
        "code": "insufficient_balance", "status": 402, "next": "tokenroute topup --amount 5",
        "message": f"Insufficient balance: the API key {empty[:10]}... from --key; credit is per key: top up, or use "
                   "a funded key with --key or TOKENROUTE_API_KEY",
        "api_key": {"key_prefix": empty[:10], "source": "--key"},
    }


# ---------------------------------------------------------------- models


def test_models_json_is_a_top_level_array(cli, gateway, api_key):
    result = cli.run("models", "--key", api_key, "--json")

    assert result.code == 0
    models = result.json()
    assert isinstance(models, list)
    assert [m["id"] for m in models] == ["openai/gpt-4o-mini", "openai/gpt-4o", "anthropic/claude-haiku-4-5"]
    assert models[0]["input_usd_per_1k"] == "0.00015"  # money stays a string
    request = sent(gateway, "GET", "/v1/models")[0]
    assert request.header("Authorization") == f"Bearer {api_key}"


def test_models_human_table(cli, gateway, api_key):
    result = cli.run("models", "--key", api_key)

    assert result.code == 0
    assert result.out == (  # per 1M tokens: per 1k the prices are fractions of a cent
        "Model                       Provider   Tier  Input $/1M  Output $/1M\n"
        "openai/gpt-4o-mini          openai     low   $0.15       $0.60\n"
        "openai/gpt-4o               openai     high  $2.50       $10.00\n"
        "anthropic/claude-haiku-4-5  anthropic  low   $1.00       $5.00\n"
    )


# ---------------------------------------------------------------- --json placement


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (("--json", "balance"), {}),
        (("balance", "--json"), {}),
        (("balance",), {"TOKENROUTE_JSON": "1"}),
        (("--json", "keys", "list"), {}),
        (("keys", "--json", "list"), {}),
        (("keys", "list", "--json"), {}),
    ],
    ids=["before", "after", "env", "before-group", "between", "after-group"],
)
def test_json_flag_anywhere(cli, gateway, api_key, argv, env):
    cli.login()

    result = cli.run(*argv, env=env)

    assert result.code == 0, result
    assert isinstance(result.json(), (dict, list))
    assert result.err == ""


def test_tokenroute_json_0_keeps_human_output(cli, gateway, api_key):
    cli.login()

    result = cli.run("balance", env={"TOKENROUTE_JSON": "0"})

    assert result.out == "Balance: $5.00\n"


def test_json_flag_before_env_command(cli, gateway, api_key):
    result = cli.run("--json", "env", "--key", api_key)

    assert result.json() == {"OPENAI_API_KEY": api_key, "OPENAI_BASE_URL": f"{gateway.url}/v1"}


# ---------------------------------------------------------------- error mapping


@pytest.mark.parametrize(
    ("status", "body", "count", "exit_code", "message"),
    [
        (404, {"detail": "Not Found"}, 1, 1, "Not Found"),
        (403, {"detail": "Account suspended"}, 1, 1, "Account suspended"),
        (
            422,
            {"detail": [
                {"loc": ["query", "days"], "msg": "too many", "type": "value_error"},
                {"loc": ["body"], "msg": "bad body", "type": "value_error"},
            ]},
            1, 1, "days: too many; body: bad body",
        ),
        (400, {"error": "bad_request", "detail": "Nope"}, 1, 1, "Nope"),
        (500, {"detail": "boom"}, 1, 3, "the gateway failed: boom"),
        (503, {"detail": "down"}, 3, 3, "the gateway failed: down"),
    ],
    ids=["404", "403", "422-list", "error-and-detail", "500", "503"],
)
def test_account_error_mapping(cli, gateway, status, body, count, exit_code, message):
    cli.login()
    gateway.fail("/api/v1/balance", status=status, body=body, count=count)

    result = cli.run("balance")

    assert (result.code, result.out) == (exit_code, "")
    assert result.err == f"error: {message}\n"


@pytest.mark.parametrize(
    ("status", "exit_code", "code"),
    [(404, 1, "not_found"), (422, 1, "invalid_input"), (500, 3, "server")],
)
def test_json_error_shape(cli, gateway, status, exit_code, code):
    cli.login()
    gateway.fail("/api/v1/topup", status=status, body={"detail": "went wrong"})

    result = cli.run("topup", "--amount", "5", "--json")

    assert (result.code, result.out) == (exit_code, "")
    expected = "the gateway failed: went wrong" if status >= 500 else "went wrong"
    assert result.error() == {"code": code, "message": expected, "status": status}


def test_unparseable_answer_exits_3(cli, gateway):
    cli.login()
    gateway.fail("/api/v1/balance", status=200, body=b"<html>hello</html>", content_type="text/html")

    result = cli.run("balance")

    assert result.code == 3
    assert result.err == "error: the gateway sent an unusable answer (HTTP 200, text/html)\n"


def test_rate_limited_exits_1(cli, gateway, api_key):
    gateway.fail(
        "/v1/chat/completions", status=429, headers={"Retry-After": "7"},
        body={"error": {"message": "Slow down", "type": "rate_limit", "code": "rate_limited"}},
    )

    result = cli.run("test", "--key", api_key, "--json")

    assert result.code == 1
    assert result.error() == {"code": "rate_limited", "message": "Slow down; retry after 7 s", "status": 429}


def test_chat_server_error_exits_3(cli, gateway, api_key):
    gateway.fail("/v1/chat/completions", status=502, body={"error": {"message": "upstream failed"}})

    result = cli.run("test", "--key", api_key)

    assert result.code == 3
    assert result.err == "error: the gateway failed: upstream failed\n"
    assert len(sent(gateway, "POST", "/v1/chat/completions")) == 1  # a POST is never retried


def test_transient_503_on_get_is_retried(cli, gateway, api_key):
    gateway.fail("/v1/models", status=503, body={"detail": "busy"}, count=1)

    result = cli.run("models", "--key", api_key, "--json")

    assert result.code == 0, result
    assert len(sent(gateway, "GET", "/v1/models")) == 2


@pytest.mark.parametrize("command", ["test", "models"])
def test_connection_refused_exits_2(cli, api_key, command):
    result = cli.run(command, "--key", api_key, env={"TOKENROUTE_API_URL": closed_port_url()})

    assert (result.code, result.out) == (2, "")
    assert result.err.startswith("error: connection refused by 127.0.0.1")


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ({"hang": True}, "error: timed out waiting for 127.0.0.1 (TOKENROUTE_TIMEOUT to wait longer)\n"),
        ({"close": True}, "error: connection to 127.0.0.1 failed: Remote end closed connection without response\n"),
    ],
    ids=["timeout", "reset"],
)
def test_network_failure_exits_2(cli, gateway, api_key, fault, message):
    gateway.fail("/v1/chat/completions", **fault)

    result = cli.run("test", "--key", api_key, env={"TOKENROUTE_TIMEOUT": "0.5"})

    assert (result.code, result.out, result.err) == (2, "", message)


def test_connection_refused_json_error(cli, api_key):
    result = cli.run("test", "--key", api_key, "--json", env={"TOKENROUTE_API_URL": closed_port_url()})

    assert (result.code, result.out) == (2, "")
    error = result.error()
    assert (error["code"], error["status"]) == ("network", None)
    assert error["message"].startswith("connection refused by 127.0.0.1")


def test_login_refused_exits_2(cli):
    result = cli.run("login", env={"TOKENROUTE_API_URL": closed_port_url()})

    assert result.code == 2
    assert not cli.credentials.exists()


# ---------------------------------------------------------------- usage errors, --version, --help


@pytest.mark.parametrize(
    "argv",
    [
        ("bogus",),
        ("keys", "create"),
        ("keys", "revoke"),
        ("topup",),
        ("usage", "--days", "0"),
        ("usage", "--days", "366"),
        ("usage", "--days", "week"),
        ("balance", "--frobnicate"),
    ],
    ids=lambda argv: " ".join(argv) or "no-command",
)
def test_usage_error_exits_1(cli, gateway, argv):
    cli.login()

    result = cli.run(*argv)

    assert result.code == 1
    assert result.out == ""
    assert result.err.startswith("error: ")
    assert "usage: tokenroute" in result.err
    assert gateway.requests == []


def test_usage_error_json(cli, gateway):
    result = cli.run("--json", "usage", "--days", "0")

    assert (result.code, result.out) == (1, "")
    error = result.error()
    assert (error["code"], error["status"]) == ("usage", None)
    assert "1 to 365" in error["message"]


def test_version(cli):
    result = cli.run("--version")

    assert (result.code, result.out, result.err) == (0, f"tokenroute {tokenroute.__version__}\n", "")
    assert re.fullmatch(r"\d+\.\d+\.\d+", tokenroute.__version__)


COMMANDS = [
    ("login",), ("logout",), ("whoami",), ("balance",), ("topup",), ("usage",),
    ("keys", "create"), ("keys", "list"), ("keys", "revoke"), ("env",), ("test",), ("models",),
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_shows_an_example(cli, gateway, command):
    result = cli.run(*command, "-h")

    assert result.code == 0
    assert result.out.startswith(f"usage: tokenroute {' '.join(command)}")
    example = [line for line in result.out.splitlines() if line.startswith("example: ")]
    assert len(example) == 1
    assert example[0].startswith(f"example: tokenroute {' '.join(command)}")
    assert gateway.requests == []


def test_top_level_help_lists_every_command(cli):
    result = cli.run("--help")

    assert result.code == 0
    for name in ("login", "logout", "whoami", "keys", "balance", "topup", "usage", "env", "test", "models"):
        assert re.search(rf"^\s+{name}\s", result.out, re.MULTILINE), name


# ---------------------------------------------------------------- subprocesses


def run_module(cli, *argv: str, env: dict[str, str] | None = None) -> Any:
    completed = subprocess.run(
        [sys.executable, "-m", "tokenroute", *argv],
        env=cli.process_env(env),
        cwd=str(cli.home),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    return completed


def test_script_json_goes_to_stdout_only(cli, gateway, api_key):
    cli.login()

    result = cli.script("balance", "--json")

    assert (result.code, result.err) == (0, "")
    assert result.json() == {"balance_usd": "5.00", "currency": "USD"}


def test_script_keys_create_separates_key_from_note(cli, gateway):
    cli.login()

    result = cli.script("keys", "create", "--name", "laptop", "--json")

    assert result.code == 0
    key = next(k for k in gateway.keys.values() if k["name"] == "laptop")
    assert result.json()["raw"] == key["raw"]
    assert result.err.startswith("Save this key now")
    assert cli.cached_key() == key["raw"]
    if POSIX:
        assert mode(cli.last_key) == 0o600


def test_script_topup_without_tty_prints_url_only(cli, gateway):
    cli.login()

    result = cli.script("topup", "--amount", "5")

    assert result.code == 0
    (session_id,) = gateway.checkouts
    assert result.out == f"Checkout: https://checkout.stripe.com/c/pay/{session_id}\n"
    assert result.err.startswith("Open it to pay $5.00; credit arrives once paid. The link expires 20")


@pytest.mark.parametrize(
    ("argv", "exit_code"),
    [
        (("--json", "keys", "revoke", "key_missing"), 1),
        (("--json", "usage", "--days", "0"), 1),
        (("--json", "balance"), 3),
    ],
    ids=["404", "usage-error", "500"],
)
def test_script_json_errors_go_to_stderr(cli, gateway, argv, exit_code):
    cli.login()
    gateway.fail("/api/v1/balance", status=500)

    result = cli.script(*argv)

    assert (result.code, result.out) == (exit_code, "")
    assert set(result.error()) >= {"code", "message", "status"}
    assert "Traceback" not in result.err


def test_script_connection_refused_exits_2(cli, api_key):
    result = cli.script("test", "--key", api_key, env={"TOKENROUTE_API_URL": closed_port_url()})

    assert (result.code, result.out) == (2, "")
    assert result.err.startswith("error: connection refused")
    assert "Traceback" not in result.err


def test_script_env_appends_cleanly_to_dotenv(cli, gateway, api_key, tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("EXISTING=1\n")

    result = cli.script("env", "--key", api_key)
    with dotenv.open("a") as handle:
        handle.write(result.out)

    assert result.code == 0
    assert dotenv.read_text() == f"EXISTING=1\nOPENAI_API_KEY={api_key}\nOPENAI_BASE_URL={gateway.url}/v1\n"


def test_python_m_tokenroute_version(cli):
    completed = run_module(cli, "--version")

    assert (completed.returncode, completed.stdout, completed.stderr) == (
        0, f"tokenroute {tokenroute.__version__}\n", "",
    )


def test_python_m_tokenroute_models_json(cli, gateway, api_key):
    completed = run_module(cli, "models", "--json", env={"TOKENROUTE_API_KEY": api_key})

    assert (completed.returncode, completed.stderr) == (0, "")
    assert [m["id"] for m in json.loads(completed.stdout)][0] == "openai/gpt-4o-mini"


def test_python_m_tokenroute_usage_error_exits_1(cli):
    completed = run_module(cli, "topup", "--amount", "nope")

    assert completed.returncode == 1
    assert completed.stdout == ""
    assert completed.stderr.startswith("error: argument --amount: ")


def test_readme_sandbox_walkthrough_works_as_written(tmp_path):
    """The README's offline steps, with the console script against the standalone-mode gateway."""
    sandbox = FakeGateway(auto_approve=True, auto_pay=True, interval=1).start()
    try:
        cli = Cli(sandbox, tmp_path)
        cli.env["TOKENROUTE_CONFIG_DIR"] = str(tmp_path / "tokenroute-sandbox")
        steps = [["login", "--no-browser"], ["keys", "create", "--name", "sandbox"], ["topup", "--amount", "5"],
                 ["test"], ["usage", "--days", "1", "--json"]]
        results = [cli.script(*step) for step in steps]
    finally:
        sandbox.stop()

    assert [r.code for r in results] == [0, 0, 0, 0, 0], results
    assert results[3].out == "OK connected (openai/gpt-4o-mini)\n  reply: OK\n"
    assert json.loads(results[4].out)["total_requests"] == 1
