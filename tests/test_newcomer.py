"""The first ten minutes (issue 16 §3, §5, §6) and odd input (issue 15 §7).

Credit lives on each key, and every place that touches it says which key;
a URL that is no gateway says so (and what the gateway's URL probably is);
the habits people bring from gh and fly work; an empty --api-url, a time at
the edge of the calendar and an absurd amount get a clear answer, never a
traceback. Each behaviour runs through the installed console script against
the fake gateway; a few run in process where a terminal is played.
"""
from __future__ import annotations

import functools
import http.server
import io
import json
import os
import re
import subprocess
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

import tokenroute
from conftest import Cli, console_script
from fake_gateway import FakeGateway

posix_only = pytest.mark.skipif(os.name != "posix", reason="a pseudo-terminal is POSIX's")


def sent(gateway: FakeGateway, method: str, path: str) -> list[Any]:
    return [r for r in gateway.requests if r.method == method and r.path_only == path]


def key_named(gateway: FakeGateway, name: str) -> dict[str, str]:
    return next(key for key in gateway.keys.values() if key["name"] == name)


def script_merged(cli: Cli, *argv: str) -> tuple[int, str]:
    """The console script with stdout and stderr in one stream, as a log shows them; stdout is
    block-buffered as in any pipe (an empty PYTHONUNBUFFERED turns off the machine's setting)."""
    done = subprocess.run([console_script(), *argv], env=cli.process_env({"PYTHONUNBUFFERED": ""}),
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=60)
    return done.returncode, done.stdout


def script_at_terminal(cli: Cli, *argv: str, typed: bytes) -> tuple[int, str, str]:
    """The console script with stdin and stderr on a pseudo-terminal (a person there) and stdout piped;
    `typed` is what the person types. Returns the exit code, stdout, and what the terminal showed."""
    import pty

    master, slave = pty.openpty()
    try:
        child = subprocess.Popen([console_script(), *argv], env=cli.process_env(), stdin=slave,
                                 stdout=subprocess.PIPE, stderr=slave)
    finally:
        os.close(slave)
    os.write(master, typed)
    out, _ = child.communicate(timeout=60)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the terminal's other side is closed
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    return child.returncode, out.decode(), shown.decode()


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def web_server(tmp_path: Path) -> Iterator[str]:
    """A plain web server (a folder with an index.html), no gateway: every API path is a 404."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<h1>Welcome</h1>")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietFiles, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ------------------------------------------------------- §3 credit is per key


def test_a_402_names_the_cached_key_its_balance_and_the_funded_one(cli: Cli, gateway: FakeGateway) -> None:
    gateway.add_key(name="seed", balance_usd="5.00")
    cli.login()
    assert "$5.00" in cli.script("balance").out
    assert cli.script("keys", "create", "--name", "laptop").code == 0  # a $0.00 key, now the cached one
    laptop = key_named(gateway, "laptop")

    result = cli.script("test")
    as_json = cli.script("test", "--json")

    assert (result.code, result.out) == (1, "")
    assert result.err == (
        f"error: Insufficient balance: the API key 'laptop' ({laptop['key_prefix']}...) from {cli.last_key} has "
        "$0.00; credit is per key (your key 'seed' has $5.00): top up, or use a funded key with --key or "
        "TOKENROUTE_API_KEY; run `tokenroute topup --amount 5`\n"
    )
    error = as_json.error()
    assert (as_json.code, error["code"], error["status"], error["next"]) == (
        1, "insufficient_balance", 402, "tokenroute topup --amount 5")
    assert error["api_key"] == {"id": laptop["id"], "name": "laptop", "key_prefix": laptop["key_prefix"],
                                "balance_usd": "0.00", "source": str(cli.last_key)}
    assert laptop["raw"] not in result.err + as_json.err


def test_a_402_without_a_login_names_the_key_by_prefix_and_keeps_the_gateways_word(cli: Cli, gateway: FakeGateway) -> None:
    empty = gateway.add_key(name="empty", balance_usd="0.00")["raw"]
    body = {"error": {"message": "Insufficient balance ($0.00 left)", "type": "insufficient_quota",
                      "code": "insufficient_balance"}}
    gateway.fail("/v1/chat/completions", status=402, body=body)

    result = cli.script("test", env={"TOKENROUTE_API_KEY": empty})

    assert result.code == 1
    assert result.err == (
        f"error: Insufficient balance ($0.00 left): the API key {empty[:10]}... from TOKENROUTE_API_KEY; credit is "
        "per key: top up, or use a funded key with --key or TOKENROUTE_API_KEY; run `tokenroute topup --amount 5`\n"
    )
    assert sent(gateway, "GET", "/api/v1/me/keys") == []  # not logged in: nothing asked of the account


def test_a_402_names_the_flag_when_the_key_given_is_also_the_cached_one(cli: Cli, gateway: FakeGateway) -> None:
    cli.login()
    cli.script("keys", "create", "laptop")
    cached = key_named(gateway, "laptop")["raw"]

    result = cli.script("test", "--key", cached, "--json")

    assert result.code == 1 and result.error()["api_key"]["source"] == "--key"
    assert " from --key has $0.00" in result.error()["message"]


EXPIRED_402 = ("error: Insufficient balance: the API key {prefix}... from TOKENROUTE_API_KEY; credit is per key: top "
               "up, or use a funded key with --key or TOKENROUTE_API_KEY; run `tokenroute topup --amount 5`\n")


def test_a_402_with_an_expired_login_neither_refreshes_nor_lists_the_keys(cli: Cli, gateway: FakeGateway) -> None:
    empty = gateway.add_key(name="empty", balance_usd="0.00")["raw"]
    cli.login(expires_in=1)
    stored = cli.credentials.read_bytes()

    result = cli.script("test", env={"TOKENROUTE_API_KEY": empty})

    assert result.code == 1 and result.err == EXPIRED_402.format(prefix=empty[:10])
    assert sent(gateway, "POST", "/oidc/token") == [] and sent(gateway, "GET", "/api/v1/me/keys") == []
    assert cli.credentials.read_bytes() == stored


def test_a_402_never_takes_over_an_earlier_releases_login(cli: Cli, gateway: FakeGateway) -> None:
    empty = gateway.add_key(name="empty", balance_usd="0.00")["raw"]
    tokens = gateway.issue_tokens()
    entry = {"access_token": tokens["access_token"], "refresh_token": tokens["refresh_token"],
             "expires_at": int(cli.clock.now() + 3600), "issuer": gateway.url + "/oidc", "client_id": "tokenroute-cli",
             "resource": gateway.resource, "api_url": gateway.url, "token_endpoint": gateway.url + "/oidc/token"}
    auth = cli.home / ".paradigx" / "auth.json"
    auth.parent.mkdir()
    auth.write_text(json.dumps({"version": 1, "tokens": {gateway.url: entry}}, indent=2))
    auth.chmod(0o600)
    before = auth.read_bytes()

    result = cli.script("test", env={"TOKENROUTE_API_KEY": empty})

    assert result.code == 1 and result.err == EXPIRED_402.format(prefix=empty[:10])
    assert auth.read_bytes() == before and not cli.credentials.exists()
    assert sent(gateway, "GET", "/api/v1/me/keys") == []


def test_a_402_asks_the_account_once_and_briefly(cli: Cli, gateway: FakeGateway) -> None:
    empty = gateway.add_key(name="empty", balance_usd="0.00")["raw"]
    cli.login()
    gateway.fail("/api/v1/me/keys", status=503, method="GET")  # a retry would get the list

    unavailable = cli.script("test", env={"TOKENROUTE_API_KEY": empty})
    gateway.slow("/api/v1/me/keys", 20, method="GET")  # well within TOKENROUTE_TIMEOUT, beyond a glance
    slow = cli.script("test", env={"TOKENROUTE_API_KEY": empty})

    assert unavailable.code == slow.code == 1
    assert unavailable.err == slow.err == EXPIRED_402.format(prefix=empty[:10])
    assert len(sent(gateway, "GET", "/api/v1/me/keys")) == 2


def test_keys_list_marks_the_key_env_run_test_and_models_use(cli: Cli, gateway: FakeGateway) -> None:
    seed = gateway.add_key(name="seed", balance_usd="5.00")
    cli.login()
    cli.script("keys", "create", "laptop")
    laptop = key_named(gateway, "laptop")

    human = cli.script("keys", "list")
    listed = cli.script("keys", "list", "--json").json()
    from_env = cli.script("keys", "list", "--json", env={"TOKENROUTE_API_KEY": seed["raw"]}).json()

    assert human.code == 0
    lines = human.out.splitlines()
    assert lines[0].split()[-2:] == ["In", "use"]
    assert next(line for line in lines if laptop["id"] in line).endswith("  yes")
    assert not next(line for line in lines if seed["id"] in line).endswith("yes")
    assert human.err == f"In use: the key env, run, test and models use (from {cli.last_key}).\n"
    assert {key["id"]: key["in_use"] for key in listed} == {seed["id"]: False, laptop["id"]: True}
    assert {key["id"]: key["in_use"] for key in from_env} == {seed["id"]: True, laptop["id"]: False}
    gateway_fields = {k: v for k, v in seed.items() if k != "raw"}
    assert next(key for key in listed if key["id"] == seed["id"]) == {**gateway_fields, "in_use": False}


def test_keys_list_marks_the_active_key_when_a_revoked_one_shares_its_prefix(cli: Cli, gateway: FakeGateway) -> None:
    cli.login()
    cli.script("keys", "create", "laptop")
    laptop = key_named(gateway, "laptop")
    old = gateway.add_key(name="old")
    gateway.keys[old["id"]].update(key_prefix=laptop["key_prefix"], status="revoked")

    listed = cli.script("keys", "list", "--json").json()

    assert {key["id"]: key["in_use"] for key in listed} == {laptop["id"]: True, old["id"]: False}


def test_keys_list_says_when_the_key_in_use_is_none_of_the_accounts(cli: Cli, gateway: FakeGateway) -> None:
    seed = gateway.add_key(name="seed")
    cli.login()

    result = cli.script("keys", "list", env={"TOKENROUTE_API_KEY": "sk-tr-fromsomewhereelse"})

    assert result.code == 0 and "In use" not in result.out and seed["id"] in result.out
    assert result.err == ("The key that env, run, test and models use (sk-tr-from..., from TOKENROUTE_API_KEY) "
                          "is none of these.\n")


def test_revoking_a_key_with_credit_without_a_terminal_goes_ahead_and_says_what_is_lost_in_order(
    cli: Cli, gateway: FakeGateway
) -> None:
    cli.login()
    cli.script("keys", "create", "laptop")
    laptop = key_named(gateway, "laptop")
    gateway.set_balance(laptop["id"], "2.50")

    code, shown = script_merged(cli, "keys", "revoke", laptop["id"])

    assert code == 0
    assert shown == (
        f"OK revoked {laptop['id']} (laptop)\n"
        f"warning: the $2.50 of credit on {laptop['id']} is lost with it\n"
        f"Removed it from the key cache ({cli.last_key}).\n"
    )
    assert gateway.keys[laptop["id"]]["status"] == "revoked"


def test_revoking_without_a_terminal_asks_nothing_of_the_key_list(cli: Cli, gateway: FakeGateway) -> None:
    leaked = gateway.add_key(name="leaked", balance_usd="2.50")
    cli.login()
    gateway.fail("/api/v1/me/keys", status=500, method="GET", count=10)

    result = cli.script("keys", "revoke", leaked["id"])

    assert (result.code, result.out) == (0, f"OK revoked {leaked['id']} (leaked)\n")
    assert result.err == f"warning: the $2.50 of credit on {leaked['id']} is lost with it\n"
    assert gateway.keys[leaked["id"]]["status"] == "revoked"
    assert sent(gateway, "GET", "/api/v1/me/keys") == []


def test_revoking_at_a_terminal_when_the_key_list_fails_asks_without_the_amount(cli: Cli, gateway: FakeGateway) -> None:
    leaked = gateway.add_key(name="leaked", balance_usd="2.50")
    cli.login()
    gateway.fail("/api/v1/me/keys", status=500, method="GET", count=10)

    result = cli.run("keys", "revoke", leaked["id"], tty=True, stdin=b"y\n", env={"NO_COLOR": "1"})

    assert (result.code, result.out) == (0, f"OK revoked {leaked['id']} (leaked)\n")
    assert result.err == (
        f"{leaked['id']}: its credit could not be checked (the gateway failed: boom); any credit on it is lost with "
        "the key. Revoke it? [y/N] "
        f"warning: the $2.50 of credit on {leaked['id']} is lost with it\n"
    )
    assert gateway.keys[leaked["id"]]["status"] == "revoked"


def test_revoking_a_key_already_revoked_at_a_terminal_asks_nothing(cli: Cli, gateway: FakeGateway) -> None:
    old = gateway.add_key(name="old", balance_usd="5.00")
    gateway.keys[old["id"]]["status"] = "revoked"  # its credit was lost the first time
    cli.login()

    result = cli.run("keys", "revoke", old["id"], tty=True, stdin=b"", env={"NO_COLOR": "1"})

    assert (result.code, result.out, result.err) == (0, f"OK revoked {old['id']} (old)\n", "")


def test_revoking_a_key_without_credit_says_nothing_about_credit(cli: Cli, gateway: FakeGateway) -> None:
    empty = gateway.add_key(name="empty", balance_usd="0.00")
    cli.login()

    result = cli.script("keys", "revoke", empty["id"])

    assert (result.code, result.out, result.err) == (0, f"OK revoked {empty['id']} (empty)\n", "")


@posix_only
def test_revoking_a_key_with_credit_at_a_terminal_asks_first(cli: Cli, gateway: FakeGateway) -> None:
    seed = gateway.add_key(name="seed", balance_usd="5.00")
    cli.login()

    declined = script_at_terminal(cli, "keys", "revoke", seed["id"], typed=b"n\n")

    assert declined[0] == 1 and declined[1] == ""
    assert f"{seed['id']} (seed) holds $5.00 of credit, lost with the key. Revoke it? [y/N]" in declined[2]
    assert "not revoked" in declined[2]
    assert sent(gateway, "DELETE", f"/api/v1/me/keys/{seed['id']}") == []
    assert gateway.keys[seed["id"]]["status"] == "active"

    accepted = script_at_terminal(cli, "keys", "revoke", seed["id"], typed=b"y\n")

    assert accepted[0] == 0 and accepted[1] == f"OK revoked {seed['id']} (seed)\n"
    assert "Revoke it? [y/N]" in accepted[2] and "warning" not in accepted[2]
    assert gateway.keys[seed["id"]]["status"] == "revoked"


@posix_only
def test_revoke_yes_does_not_ask_at_a_terminal(cli: Cli, gateway: FakeGateway) -> None:
    seed = gateway.add_key(name="seed", balance_usd="5.00")
    cli.login()

    code, out, shown = script_at_terminal(cli, "keys", "revoke", seed["id"], "--yes", typed=b"")

    assert (code, out) == (0, f"OK revoked {seed['id']} (seed)\n")
    assert "[y/N]" not in shown and f"the $5.00 of credit on {seed['id']} is lost with it" in shown
    assert gateway.keys[seed["id"]]["status"] == "revoked"


def test_a_terminal_that_answers_nothing_keeps_the_key(cli: Cli, gateway: FakeGateway) -> None:
    seed = gateway.add_key(name="seed", balance_usd="5.00")
    cli.login()

    result = cli.run("keys", "revoke", seed["id"], "--json", tty=True, stdin=b"")

    assert (result.code, result.out) == (1, "")
    prompt, error = result.err.splitlines()
    assert prompt.endswith("Revoke it? [y/N] ") and json.loads(error)["error"]["code"] == "cancelled"
    assert gateway.keys[seed["id"]]["status"] == "active"


def test_topup_says_credit_is_per_key_and_where_to_see_which(cli: Cli, gateway: FakeGateway) -> None:
    cli.login()
    session = {"checkout_url": "https://checkout.stripe.com/c/pay/cs_1", "session_id": "cs_1", "amount_usd": "5",
               "expires_at": 1796047329, "key_name": "guessed"}  # no field the API defines names a key
    gateway.fail("/api/v1/topup", status=200, body=session, count=2)

    result = cli.script("topup", "5")
    as_json = cli.script("topup", "5", "--json")

    assert result.code == 0
    assert result.err.endswith("\nCredit is per key: once paid, `tokenroute keys list` shows which key holds it.\n")
    assert as_json.json() == session  # the gateway's fields, as they are


# -------------------------------------------------- §5 wrong URLs say so


def test_a_url_ending_in_v1_says_no_gateway_and_suggests_the_base(cli: Cli, gateway: FakeGateway) -> None:
    url = gateway.url + "/v1"

    result = cli.script("--api-url", url, "login")
    as_json = cli.script("--api-url", url, "login", "--json")

    assert (result.code, result.out) == (1, "")
    assert result.err == (
        f"error: no tokenroute gateway at {url} (it answers /api/v1/auth/discovery with HTTP 404, "
        f"application/json); the gateway's URL is probably {gateway.url} (without /v1)\n"
    )
    error = as_json.error()
    assert (error["code"], error["status"], error["suggested_api_url"]) == ("not_a_gateway", 404, gateway.url)


def test_an_api_key_call_to_a_v1_url_says_no_gateway_too(cli: Cli, gateway: FakeGateway, api_key: str) -> None:
    result = cli.script("models", "--key", api_key, env={"TOKENROUTE_API_URL": gateway.url + "/v1"})

    assert result.code == 1
    assert result.err == (
        f"error: no tokenroute gateway at {gateway.url}/v1 (it answers /v1/models with HTTP 404); "
        f"the gateway's URL is probably {gateway.url} (without /v1)\n"
    )


def test_a_plain_web_server_is_no_gateway_in_login_and_doctor(cli: Cli, web_server: str) -> None:
    login = cli.script("--api-url", web_server, "login")
    doctor = cli.script("--api-url", web_server, "doctor", env={"TOKENROUTE_API_KEY": "sk-tr-neversent"})
    report = cli.script("--api-url", web_server, "doctor", "--json").json()

    assert login.code == 1
    assert login.err.startswith(f"error: no tokenroute gateway at {web_server} (it answers /api/v1/auth/discovery "
                                "with HTTP 404, text/html")
    assert "probably" not in login.err
    assert doctor.code == 1
    assert f"problem  gateway  no tokenroute gateway at {web_server}" in doctor.out
    assert "fix: set --api-url or TOKENROUTE_API_URL to your tokenroute gateway's URL\n" in doctor.out
    gateway_check = next(check for check in report["checks"] if check["name"] == "gateway")
    assert gateway_check["fix"] == "set --api-url or TOKENROUTE_API_URL to your tokenroute gateway's URL"
    assert [check["name"] for check in report["checks"]][:4] == ["python", "api url", "gateway", "files"]
    assert "login" not in doctor.out and "api key" not in doctor.out  # nothing to log in to, no key sent there


def test_a_garbled_discovery_answer_is_the_gateways_failure(cli: Cli, gateway: FakeGateway) -> None:
    gateway.fail("/api/v1/auth/discovery", status=200, body=b"{not json")

    result = cli.script("login", "--json")

    assert result.code == 3
    assert result.error()["code"] == "server" and "unusable answer" in result.error()["message"]


@pytest.mark.parametrize("body", [
    {"detail": "Model 'nope/none' not found"}, {"error": "no such model"}, {"detail": "Not Found", "model": "x"},
])
def test_a_v1_404_in_the_gateways_own_words_is_its_answer(cli: Cli, gateway: FakeGateway, api_key: str,
                                                           body: dict[str, str]) -> None:
    gateway.fail("/v1/chat/completions", status=404, body=body)

    result = cli.script("test", "--key", api_key, "--json")

    assert result.code == 1
    assert (result.error()["code"], result.error()["next"]) == ("not_found", "tokenroute models")


def test_test_at_a_v1_url_says_no_gateway_not_unknown_model(cli: Cli, gateway: FakeGateway, api_key: str) -> None:
    result = cli.script("test", "--key", api_key, env={"TOKENROUTE_API_URL": gateway.url + "/v1"})

    assert result.code == 1 and result.err.startswith(f"error: no tokenroute gateway at {gateway.url}/v1 ")
    assert "tokenroute models" not in result.err


def test_doctors_fixes_carry_the_api_url_flag(cli: Cli, staging: FakeGateway) -> None:
    result = cli.script("--api-url", staging.url, "doctor", "--json")  # TOKENROUTE_API_URL names another gateway

    fixes = {check["name"]: check["fix"] for check in result.json()["checks"]}
    assert fixes["login"] == f"tokenroute --api-url {staging.url} login"
    assert fixes["api key"] == f"tokenroute --api-url {staging.url} keys create --name NAME"
    assert cli.script("doctor", "--json").json()["checks"][3]["fix"] == "tokenroute login"


def test_every_next_hint_carries_the_api_url_flag_that_chose_the_gateway(cli: Cli, staging: FakeGateway) -> None:
    """Following a hint without it would act on the default (or TOKENROUTE_API_URL's) gateway."""
    flag = ["--api-url", staging.url]
    logged_out = cli.script(*flag, "whoami", "--json")
    started = cli.script(*flag, "login", "--no-wait", "--json")
    started_text = cli.script(*flag, "login", "--no-wait", "--force")
    waiting = cli.script(*flag, "login", "--resume", "--timeout", "0", "--json")
    at_a_terminal = cli.script(*flag, "login", "--resume", "--timeout", "0")
    no_key = cli.script("env", "--api-url", staging.url, "--json")

    assert logged_out.error()["next"] == f"tokenroute --api-url {staging.url} login"
    assert started.json()["next"] == f"tokenroute --api-url {staging.url} login --resume"
    assert f"Then run: tokenroute --api-url {staging.url} login --resume\n" in started_text.out
    assert waiting.error()["next"] == waiting.error()["pending"]["next"] == started.json()["next"]
    assert at_a_terminal.err.endswith(f"; run `tokenroute --api-url {staging.url} login --resume`\n")
    assert no_key.error()["next"] == f"tokenroute --api-url {staging.url} keys create --name NAME"
    assert cli.script("whoami", "--json").error()["next"] == "tokenroute login"  # TOKENROUTE_API_URL stays set
    timeout = cli.script(*flag, "login", "--timeout", "5", "--json").error()["message"]
    assert f"use `tokenroute --api-url {staging.url} login --no-wait`, then `tokenroute --api-url {staging.url} login " \
           "--resume --timeout SECONDS`" in timeout
    staging.auto_approve = True
    assert cli.script(*flag, "login", "--no-browser").code == 0
    again = cli.script(*flag, "login")
    empty = cli.script(*flag, "keys", "list")
    topup = cli.script(*flag, "topup", "5", "--no-browser")
    assert f"(tokenroute --api-url {staging.url} login --force to log in again)" in again.out
    assert f"Create one: tokenroute --api-url {staging.url} keys create --name NAME" in empty.err
    assert f"`tokenroute --api-url {staging.url} keys list` shows which key holds it" in topup.err


@pytest.mark.parametrize("argv", [["login", "--timeout", "1"], ["login", "--no-wait", "--timeout", "1"]])
def test_login_timeout_without_resume_is_refused_not_ignored(cli: Cli, gateway: FakeGateway, argv: list[str]) -> None:
    gateway.auto_approve = False  # ignored, `login` would wait until the code expired

    result = cli.script(*argv, "--json")

    assert result.code == 1 and result.error()["code"] == "usage"
    assert "--timeout bounds the wait of --resume" in result.error()["message"]
    assert gateway.requests == []


@pytest.mark.parametrize("failure, code, exit_code", [(500, "server", 3), ("down", "network", 2)])
def test_login_resume_says_the_gateway_fails_not_that_the_login_waits(cli: Cli, gateway: FakeGateway, failure: Any,
                                                                      code: str, exit_code: int) -> None:
    gateway.auto_approve = False
    cli.run("login", "--no-wait")
    if failure == "down":
        gateway.fail("/oidc/token", close=True, count=99)
    else:
        gateway.fail("/oidc/token", status=failure, count=99)

    result = cli.run("login", "--resume", "--timeout", "3", "--json")

    assert result.code == exit_code, result
    assert result.error()["code"] == code and result.error()["next"] == "tokenroute login --resume"
    assert "the login may still be approved: try again later" in result.error()["message"]
    gateway.clear_faults()
    gateway.approve()  # the login was never lost
    assert cli.run("login", "--resume", "--json").json()["status"] == "logged_in"


def test_login_resume_with_nothing_waiting_and_a_dead_session_is_no_login(cli: Cli, gateway: FakeGateway) -> None:
    creds = cli.login(expires_in=-100)
    cli.write_login(dict(creds, refresh_token="dead-refresh"))  # the provider rejects it

    result = cli.run("login", "--resume", "--json")

    assert result.code == 1 and result.error()["code"] == "no_pending_login"


def test_login_resume_with_nothing_waiting_offline_is_no_pending_login(cli: Cli, gateway: FakeGateway) -> None:
    cli.login()
    gateway.fail("/api/v1/me", close=True, count=99)  # the gateway cannot be reached

    result = cli.run("login", "--resume", "--json")

    assert result.code == 1 and result.error()["code"] == "no_pending_login"


def test_a_damaged_credentials_file_names_the_login_for_the_gateway_chosen(cli: Cli, staging: FakeGateway) -> None:
    cli.config_dir.mkdir(mode=0o700)
    cli.credentials.write_text("{bad")

    result = cli.run("--api-url", staging.url, "whoami")

    assert result.code == 1
    assert result.err.endswith(f"is damaged; logging in sets it aside and logs in again; run "
                               f"`tokenroute --api-url {staging.url} login`\n")


def test_a_gateway_url_with_sk_tr_inside_a_word_is_shown_as_typed(cli: Cli) -> None:
    result = cli.run("env", "--api-url", "https://risk-tr-prod-gw.example.com", "--json")

    assert result.code == 1 and "https://risk-tr-prod-gw.example.com" in result.error()["message"]


def test_a_path_with_eyj_inside_a_word_is_shown_as_typed(cli: Cli, api_key: str, tmp_path: Path) -> None:
    result = cli.run("env", "--write", str(tmp_path / "heyJudeLyrics" / ".env"), env={"TOKENROUTE_API_KEY": api_key})

    assert result.code == 1 and f"{tmp_path}/heyJudeLyrics/.env" in result.err


def test_login_resume_says_still_waiting_when_only_some_polls_failed(cli: Cli, gateway: FakeGateway) -> None:
    gateway.auto_approve = False
    gateway.interval = 1
    cli.run("login", "--no-wait")
    polls = lambda: sum(1 for r in gateway.requests if r.path == "/oidc/token")  # noqa: E731
    armed: list[int] = []

    def fail_after_two_answers() -> None:  # "still waiting" twice, then the gateway fails to the end
        if polls() == 2 and not armed:
            armed.append(1)
            gateway.fail("/oidc/token", status=502, count=99)

    cli.clock.on_sleep.append(fail_after_two_answers)
    result = cli.run("login", "--resume", "--timeout", "12", "--json")

    assert result.code == 1 and result.error()["code"] == "login_pending", result
    assert armed and polls() > 2


def test_mcp_with_api_url_hands_a_person_the_login_command_for_that_gateway(cli: Cli, staging: FakeGateway) -> None:
    initialize = b'{"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18"}}\n'
    result = cli.run("mcp", "--read-only", "--api-url", staging.url, stdin=initialize)

    instructions = json.loads(result.out)["result"]["instructions"]
    assert f"ask the user to run `tokenroute --api-url {staging.url} login` in a terminal" in instructions


def test_a_web_page_answering_everything_is_no_gateway_either(cli: Cli, gateway: FakeGateway) -> None:
    gateway.fail("/api/v1/auth/discovery", status=200, body="<!doctype html><h1>Welcome</h1>", content_type="text/html")

    result = cli.script("login", "--json")

    assert result.code == 1
    assert result.error()["code"] == "not_a_gateway"


def test_doctors_fix_for_a_v1_url_names_the_base_url_where_it_came_from(cli: Cli, gateway: FakeGateway) -> None:
    url = gateway.url + "/v1"

    flag = cli.script("--api-url", url, "doctor")
    env = cli.script("doctor", env={"TOKENROUTE_API_URL": url})

    assert f"fix: tokenroute --api-url {gateway.url} doctor\n" in flag.out
    assert f"fix: export TOKENROUTE_API_URL={gateway.url}\n" in env.out
    assert cli.script("--api-url", gateway.url, "doctor").out.count("problem  gateway") == 0


@pytest.mark.parametrize(("typed", "meant"), [
    ("localhost:8787", "http://localhost:8787"),
    ("127.0.0.1:8787/", "http://127.0.0.1:8787"),
    ("[::1]:8787", "http://[::1]:8787"),
    ("api.example.com", "https://api.example.com"),
    ("gateway.example.com:8443", "https://gateway.example.com:8443"),
    ("localhost:8787/v1", "http://localhost:8787"),
    ("api.example.com/v1/", "https://api.example.com"),
])
def test_a_url_without_a_scheme_suggests_one(cli: Cli, gateway: FakeGateway, typed: str, meant: str) -> None:
    result = cli.script("--api-url", typed, "login")

    assert (result.code, result.out) == (1, "")
    assert result.err == f"error: --api-url is not a valid http(s) gateway URL: {typed!r}; did you mean {meant}?\n"
    assert gateway.requests == []


@pytest.mark.parametrize("typed", ["http:/localhost:8787", "https:/api.example.com", "localhost:", "http//localhost"])
def test_a_mistyped_scheme_gets_no_guess(cli: Cli, gateway: FakeGateway, typed: str) -> None:
    result = cli.script("--api-url", typed, "login")

    assert (result.code, result.out) == (1, "")
    assert result.err == f"error: --api-url is not a valid http(s) gateway URL: {typed!r}\n"


# ------------------------------------------------- §6 the habits people bring


def test_names_amounts_days_and_models_come_as_words(cli: Cli, gateway: FakeGateway, api_key: str) -> None:
    cli.login()

    created = cli.script("keys", "create", "laptop", "--json")
    topup = cli.script("topup", "12.50", "--json")
    usage = cli.script("usage", "7", "--json")
    tried = cli.script("test", "openai/gpt-4o", "--key", api_key, "--json")

    assert [r.code for r in (created, topup, usage, tried)] == [0, 0, 0, 0]
    assert sent(gateway, "POST", "/api/v1/me/keys")[0].json == {"name": "laptop"}
    assert sent(gateway, "POST", "/api/v1/topup")[0].json == {"amount_usd": "12.50"}
    assert sent(gateway, "GET", "/api/v1/me/usage")[0].query == {"days": "7"}
    assert sent(gateway, "POST", "/v1/chat/completions")[0].json["model"] == "openai/gpt-4o"
    assert tried.json()["model"] == "openai/gpt-4o"


@pytest.mark.parametrize("argv", [
    ["keys", "create", "laptop", "--name", "ci"],
    ["keys", "create", "--name", "ci", "laptop"],
    ["topup", "5", "--amount", "5"],
    ["keys", "create", "laptop", "ci"],
    ["keys", "create"],
    ["topup", "0"],
])
def test_a_word_and_its_flag_together_or_a_bad_word_is_a_usage_error(cli: Cli, gateway: FakeGateway,
                                                                        argv: list[str]) -> None:
    cli.login()

    result = cli.script(*argv)

    assert (result.code, result.out) == (1, "")
    assert result.err.startswith("error: ") and "usage: tokenroute" in result.err
    assert gateway.requests == []


def test_version_prints_the_version_and_dash_v_points_to_it(cli: Cli) -> None:
    version = cli.script("version")
    as_json = cli.script("version", "--json")
    flag = cli.script("--version", env={"TOKENROUTE_JSON": "1"})
    short = cli.script("-v")

    assert (version.code, version.out, version.err) == (0, f"tokenroute {tokenroute.__version__}\n", "")
    assert (as_json.code, as_json.json(), as_json.err) == (0, {"version": tokenroute.__version__}, "")
    assert flag.out == f"tokenroute {tokenroute.__version__}\n"  # the flag prints text, as argparse's does
    assert (short.code, short.out) == (1, "")
    assert short.err.startswith("error: unrecognized argument: -v; for the version, use --version\n")


def test_keys_alone_shows_its_help_and_exits_0(cli: Cli, gateway: FakeGateway) -> None:
    result = cli.script("keys")

    assert (result.code, result.err) == (0, "")
    assert result.out.startswith("usage: tokenroute keys ")
    assert all(f"    {name} " in result.out for name in ("create", "list", "revoke"))
    assert cli.script("keys", "--json").error()["code"] == "usage"  # JSON wanted: an error, not help text
    assert gateway.requests == []


@pytest.mark.parametrize("argv", [[], ["keys"]], ids=["tokenroute", "tokenroute keys"])
def test_tokenroute_json_1_is_the_json_flag_where_help_would_show(cli: Cli, argv: list[str]) -> None:
    flag = cli.script(*argv, "--json")
    variable = cli.script(*argv, env={"TOKENROUTE_JSON": "1"})

    assert (variable.code, variable.out) == (flag.code, flag.out) == (1, "")
    assert variable.error() == flag.error() and flag.error()["code"] == "usage"


@pytest.mark.parametrize("argv", [["test", "{key}"], ["test", "--model", "{key}"], ["test", "--json", "{key}"]])
def test_a_key_given_as_the_model_is_refused_unechoed(cli: Cli, gateway: FakeGateway, api_key: str,
                                                      argv: list[str]) -> None:
    result = cli.script(*[word.format(key=api_key) for word in argv])

    assert (result.code, result.out) == (1, "")
    assert "the model is an API key: pass the key with --key" in result.err
    assert api_key[:10] not in result.err and gateway.requests == []


def test_an_unknown_option_is_named_before_a_missing_word(cli: Cli) -> None:
    result = cli.script("keys", "create", "-x")
    missing = cli.script("keys", "create")

    assert result.code == 1 and result.err.startswith("error: unrecognized argument: -x\n")
    assert missing.code == 1 and missing.err.startswith("error: keys create needs NAME (or --name NAME)\n")


def test_key_and_model_not_found_say_what_to_run_next(cli: Cli, gateway: FakeGateway, api_key: str) -> None:
    cli.login()

    key = cli.script("keys", "revoke", "key_missing", "--json")
    model = cli.script("test", "--model", "nope/none", "--key", api_key)

    assert (key.code, key.error()["message"], key.error()["next"]) == (1, "Key not found", "tokenroute keys list")
    assert (model.code, model.err) == (1, "error: Model 'nope/none' not found; run `tokenroute models`\n")


def test_usage_keeps_the_places_of_a_cost_below_a_cent(cli: Cli, gateway: FakeGateway) -> None:
    cli.login()
    answer = {"range_days": 30, "total_requests": 1, "total_tokens_in": 10, "total_tokens_out": 1,
              "total_cost_usd": "0.0000075"}
    gateway.fail("/api/v1/me/usage", status=200, body=answer)

    result = cli.script("usage")

    assert result.code == 0
    assert re.search(r"^Cost:\s+\$0\.0000075$", result.out, re.M), result.out


def test_completion_offers_the_new_words(cli: Cli) -> None:
    script = cli.script("completion", "bash").out

    top = re.search(r'^ *""\) words="([^"]*)"', script, re.M)
    revoke = re.search(r'^ *"keys revoke"\) words="([^"]*)"', script, re.M)
    assert top and "version" in top.group(1).split(), script
    assert revoke and "--yes" in revoke.group(1).split(), script


NEW_LINES = [
    ["keys", "create", "laptop"],
    ["keys", "create", "laptop", "--no-cache", "--json"],
    ["--json", "topup", "5"],
    ["topup", "12.50", "--no-browser"],
    ["usage", "7"],
    ["test", "openai/gpt-4o", "--key", "sk-tr-abc123"],
    ["version"],
]


@pytest.mark.parametrize("argv", NEW_LINES, ids=" ".join)
def test_the_fast_parser_reads_words_as_argparse_does(argv: list[str]) -> None:
    fast = tokenroute.parse_fast(argv)
    full = tokenroute.build_parser().parse_args(argv)

    assert fast is not None
    expected = {name: value for name, value in vars(full).items() if not name.endswith("command")}
    assert vars(fast) == {"json": False, "api_url": None, **expected}


@pytest.mark.parametrize("argv", [
    ["keys", "create", "laptop", "--name", "ci"], ["topup", "5", "--amount=5"], ["keys", "create", "a", "b"],
    ["usage", "0"], ["keys", "create", "-x"],
], ids=" ".join)
def test_the_fast_parser_leaves_a_doubled_or_bad_word_to_argparse(argv: list[str]) -> None:
    assert tokenroute.parse_fast(argv) is None


# ------------------------------------------------- issue 15 §7: odd input


@pytest.mark.parametrize("argv", [
    ["--api-url", "", "balance"], ["--api-url=", "balance"], ["balance", "--api-url", " "], ["env", "--api-url="],
])
def test_an_empty_api_url_flag_is_an_error_naming_the_flag(cli: Cli, gateway: FakeGateway, argv: list[str]) -> None:
    cli.login()  # TOKENROUTE_API_URL names the gateway: an empty flag must not fall back to it (or production)
    cli.cache_key("sk-tr-cachedkey1234")

    result = cli.script(*argv)

    assert (result.code, result.out) == (1, "")
    assert result.err == (
        f"error: --api-url is empty: give the gateway's URL, or leave the flag out for {tokenroute.DEFAULT_API_URL}\n"
    )
    assert gateway.requests == []


def test_an_empty_tokenroute_api_url_is_unset(cli: Cli, tmp_path: Path) -> None:
    result = cli.script("env", "--key", "sk-tr-abc123", env={"TOKENROUTE_API_URL": ""})
    ctx = tokenroute.Context(env={"TOKENROUTE_API_URL": ""}, stdout=io.StringIO(), stderr=io.StringIO())

    assert (result.code, result.err) == (0, "")
    assert result.out == f"OPENAI_API_KEY=sk-tr-abc123\nOPENAI_BASE_URL={tokenroute.DEFAULT_API_URL}/v1\n"
    assert tokenroute.api_url_setting(ctx, None) == (
        tokenroute.DEFAULT_API_URL, "default; TOKENROUTE_API_URL is set but empty")  # what doctor shows


EDGE_TIMES = ["9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00"]


def test_times_at_the_edge_of_the_calendar_are_shown_as_sent(cli: Cli, gateway: FakeGateway) -> None:
    for number, moment in enumerate(EDGE_TIMES):
        gateway.keys[gateway.add_key(name=f"edge{number}")["id"]]["created_at"] = moment
    cli.login()
    session = {"checkout_url": "https://checkout.stripe.com/c/pay/cs_1", "session_id": "cs_1", "amount_usd": "5",
               "expires_at": EDGE_TIMES[0]}
    gateway.fail("/api/v1/topup", status=200, body=session)

    listed = cli.script("keys", "list")
    topup = cli.script("topup", "5")

    assert listed.code == 0 and all(moment in listed.out for moment in EDGE_TIMES), listed
    assert topup.code == 0 and f"The link expires {EDGE_TIMES[0]}." in topup.err, topup


def test_a_time_that_only_looks_like_utc_cannot_reach_the_terminal_raw(cli: Cli, gateway: FakeGateway) -> None:
    gateway.keys[gateway.add_key(name="odd")["id"]]["created_at"] = "2024-01-01T\x1b[:2J"
    cli.login()

    result = cli.script("keys", "list")

    assert result.code == 0 and "\x1b" not in result.out
    assert "2024-01-01T\\x1b[:2J" in result.out


def test_a_5000_digit_amount_is_shown_as_sent(cli: Cli, gateway: FakeGateway) -> None:
    huge = "9" * 5000
    gateway.keys[gateway.add_key(name="rich")["id"]]["balance_usd"] = huge
    cli.login()
    gateway.fail("/api/v1/balance", status=200, body={"balance_usd": huge, "currency": "USD"})

    listed = cli.script("keys", "list")
    balance = cli.script("balance")
    as_json = cli.script("keys", "list", "--json")

    assert listed.code == 0 and huge in listed.out, listed.err
    assert (balance.code, balance.out) == (0, f"Balance: {huge}\n")
    assert as_json.json()[0]["balance_usd"] == huge


@pytest.mark.parametrize(("value", "shown"), [
    ("0.0042", "$0.0042"), ("-0.004", "-$0.004"), ("0.01", "$0.01"), ("1.004", "$1.00"), ("1" * 41, "1" * 41),
    ("1." + "0" * 60, "$1.00"), ("0" * 40 + "2.50", "$2.50"), ("0." + "0" * 38 + "42", "$0." + "0" * 38 + "42"),
])
def test_amounts_below_a_cent_keep_their_places(value: str, shown: str) -> None:
    assert tokenroute.usd(value) == shown


@pytest.mark.parametrize("value", [*EDGE_TIMES, "0001-01-01T00:00:00+00:01", 10**11, -1, float("nan")])
def test_readable_time_never_raises(value: object) -> None:
    assert tokenroute.readable_time(value) == tokenroute.show(value)

