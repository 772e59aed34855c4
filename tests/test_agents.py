"""Agent-first behaviour (issue 4): non-blocking login, doctor, stable `--json`
error codes, no waiting without a TTY, env formats, completions, and plain
ASCII output for every console."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

import tokenroute
from conftest import Cli, Result, console_script
from fake_gateway import FakeGateway

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes and shells")
RESUME = "tokenroute login --resume"
PENDING_KEYS = {"status", "verification_uri", "verification_uri_complete", "user_code", "expires_at", "next"}


# ---------------------------------------------------------------- helpers


def logged_in(cli: Cli) -> str:
    """The last line of a login to the test gateway, as a person reads it."""
    return f"OK logged in as agent@example.com ({cli.gateway.url.split('//')[1]})\n"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def closed_port_url() -> str:
    """The URL of a loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return "http://127.0.0.1:%d" % port


def device_code(gateway: FakeGateway) -> str:
    """The one device code the gateway has handed out."""
    codes = list(gateway.device_codes)
    assert len(codes) == 1, codes
    return codes[0]


def user_code(gateway: FakeGateway) -> str:
    return gateway.device_codes[device_code(gateway)].user_code


def files_holding(cli: Cli, secret: str) -> list[Path]:
    """Files in the config dir whose content contains `secret`."""
    if not cli.config_dir.is_dir():
        return []
    return [p for p in cli.config_dir.iterdir() if p.is_file() and secret in p.read_text(errors="replace")]


def start_no_wait(cli: Cli, *extra: str) -> tuple[Result, str]:
    """`tokenroute login --no-wait`; returns the result and the stored device code."""
    result = cli.run("login", "--no-wait", *extra)
    assert result.code == 0, result
    return result, device_code(cli.gateway)


def run_suggested(cli: Cli, command: str, *extra: str, **kwargs: Any) -> Result:
    """Run a suggested `next` command exactly as written (minus the program name)."""
    words = shlex.split(command)
    assert words[0] == "tokenroute", command
    return cli.run(*words[1:], *extra, **kwargs)


def approve_when_polled(cli: Cli) -> None:
    """Play the person who approves the login while the CLI waits."""
    def approve() -> None:
        if any(code.status == "pending" for code in cli.gateway.device_codes.values()):
            cli.gateway.approve()
    cli.clock.on_sleep.append(approve)


def device_flow_requests(gateway: FakeGateway) -> list[str]:
    return [r.path_only for r in gateway.requests
            if r.path_only in ("/api/v1/auth/discovery", "/oidc/device/auth")
            or (r.form or {}).get("grant_type", "").endswith("device_code")]


def doctor(cli: Cli, *argv: str, env: dict[str, str] | None = None) -> tuple[Result, dict[str, Any]]:
    result = cli.run("doctor", "--json", *argv, env=env)
    return result, result.json()


def check(report: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in report["checks"] if c["name"] == name]
    assert found, (name, report)
    return found[0]


def script_with_stdin_open(cli: Cli, *argv: str, env: dict[str, str] | None = None,
                           timeout: float = 20) -> Result:
    """The console script with a pipe on stdin that is never written to nor closed."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen([console_script(), *argv], env=cli.process_env(env),
                                   stdin=subprocess.PIPE, stdout=out, stderr=err, text=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail("`tokenroute %s` waited on its open stdin for %ss" % (" ".join(argv), timeout))
        finally:
            assert process.stdin is not None
            process.stdin.close()
        out.seek(0)
        err.seek(0)
        return Result(code, out.read(), err.read())


def common_commands(gateway: FakeGateway, api_key: str) -> list[list[str]]:
    """Every command a user or agent runs, in an order that works after a login."""
    revocable = gateway.add_key(name="old", balance_usd="1.00")["id"]
    return [
        ["whoami"], ["balance"], ["keys", "create", "--name", "ci"], ["keys", "list"],
        ["keys", "revoke", revocable], ["topup", "--amount", "5", "--no-browser"], ["usage", "--days", "7"],
        ["env"], ["env", "--export"], ["test"], ["models"], ["doctor"], ["status"],
        ["login"], ["login", "--no-wait"], ["logout"], ["keys"], ["usage", "--days", "0"],
        ["--help"], ["--version"],
    ]


def parser_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the parser: ("login",), ("keys",), ("keys", "create"), ..."""
    found: list[tuple[str, ...]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append(path + (name,))
                found += parser_commands(sub, path + (name,))
    return found


# ---------------------------------------------------------------- login --no-wait


def test_login_no_wait_exits_0_at_once(cli: Cli) -> None:
    result, _ = start_no_wait(cli)
    assert result.code == 0
    assert cli.clock.sleeps == [] or sum(cli.clock.sleeps) == 0


@posix_only
def test_login_no_wait_stores_the_pending_code_0600_in_the_config_dir(cli: Cli) -> None:
    _, code = start_no_wait(cli)
    stored = files_holding(cli, code)
    assert len(stored) == 1
    assert stored[0].parent == cli.config_dir
    assert mode(stored[0]) == 0o600
    assert mode(cli.config_dir) == 0o700


@posix_only
def test_login_no_wait_pending_file_is_private_under_umask_000(cli: Cli) -> None:
    old = os.umask(0)
    try:
        _, code = start_no_wait(cli)
    finally:
        os.umask(old)
    [stored] = files_holding(cli, code)
    assert mode(stored) == 0o600
    assert mode(cli.config_dir) == 0o700


def test_login_no_wait_prints_url_code_and_resume_command(cli: Cli, gateway: FakeGateway) -> None:
    result, _ = start_no_wait(cli)
    text = result.out + result.err
    assert gateway.url + "/device" in text
    assert user_code(gateway) in text
    assert RESUME in text


def test_login_no_wait_json_is_exactly_the_pending_object(cli: Cli, gateway: FakeGateway) -> None:
    result, _ = start_no_wait(cli, "--json")
    data = result.json()
    code = user_code(gateway)
    assert set(data) == PENDING_KEYS
    assert data["status"] == "pending"
    assert data["next"] == RESUME
    assert data["user_code"] == code
    assert data["verification_uri"] == gateway.url + "/device"
    assert data["verification_uri_complete"] == gateway.url + "/device?user_code=" + code
    assert isinstance(data["expires_at"], int)
    assert abs(data["expires_at"] - (cli.clock.now() + gateway.device_expires_in)) <= 5
    assert result.err == ""


def test_login_no_wait_stores_no_credentials_yet(cli: Cli) -> None:
    start_no_wait(cli)
    assert not cli.credentials.exists()
    assert cli.run("whoami", "--json").error()["code"] == "auth_required"


def test_login_no_wait_opens_no_browser_even_for_a_person(cli: Cli) -> None:
    result = cli.run("login", "--no-wait", tty=True)
    assert result.code == 0
    assert cli.opened == []


# ---------------------------------------------------------------- login --resume


def test_resume_after_approval_logs_in_and_removes_the_pending_code(cli: Cli, gateway: FakeGateway) -> None:
    _, code = start_no_wait(cli)
    gateway.approve()
    result = cli.run("login", "--resume")
    assert (result.code, result.out) == (0, logged_in(cli))
    assert cli.stored_login()["api_url"] == gateway.url
    assert files_holding(cli, code) == []
    assert cli.run("whoami").code == 0


def test_resume_still_pending_at_timeout_exits_1_with_pending_and_next(cli: Cli) -> None:
    _, code = start_no_wait(cli)
    result = cli.run("login", "--resume", "--timeout", "3", "--json")
    assert result.code == 1
    error = result.error()
    assert error["code"] == "login_pending"
    assert error["status"] is None  # the HTTP status field keeps its type
    assert error["next"] == RESUME
    assert error["pending"]["status"] == "pending"
    assert set(error["pending"]) == PENDING_KEYS
    assert error["pending"]["next"] == RESUME
    assert len(files_holding(cli, code)) == 1
    assert sum(cli.clock.sleeps) <= 3


def test_resume_timeout_0_still_pending_exits_1(cli: Cli) -> None:
    _, code = start_no_wait(cli)
    result = cli.run("login", "--resume", "--timeout", "0", "--json")
    assert result.code == 1
    assert (result.error()["pending"]["status"], result.error()["next"]) == ("pending", RESUME)
    assert len(files_holding(cli, code)) == 1


def test_resume_timeout_0_checks_an_approved_code_once(cli: Cli, gateway: FakeGateway) -> None:
    """An agent polling with `--timeout 0` must see the approval, not `pending` forever."""
    start_no_wait(cli)
    gateway.approve()
    result = cli.run("login", "--resume", "--timeout", "0")
    assert (result.code, result.out) == (0, logged_in(cli)), result


def test_resume_timeout_0_polls_once_with_a_clock_that_moves(cli: Cli, gateway: FakeGateway) -> None:
    """A real clock moves between two readings; `--timeout 0` must still poll."""
    start_no_wait(cli)
    gateway.approve()
    cli.clock.now = time.time  # type: ignore[method-assign]
    result = cli.run("login", "--resume", "--timeout", "0")
    assert (result.code, result.out) == (0, logged_in(cli)), result


def test_suggested_resume_command_works_as_written_after_approval(cli: Cli, gateway: FakeGateway) -> None:
    start_no_wait(cli, "--json")
    pending = cli.run("login", "--resume", "--timeout", "0", "--json")
    assert pending.code == 1
    gateway.approve()
    result = run_suggested(cli, pending.error()["next"])
    assert (result.code, result.out) == (0, logged_in(cli))
    assert cli.credentials.exists()


def test_resume_after_denial_exits_3_and_removes_the_pending_code(cli: Cli, gateway: FakeGateway) -> None:
    _, code = start_no_wait(cli)
    gateway.deny()
    result = cli.run("login", "--resume", "--json")
    assert result.code == 3
    assert result.error()["code"] == "login_denied"
    assert files_holding(cli, code) == []
    assert not cli.credentials.exists()


def test_resume_after_expiry_exits_3_and_removes_the_pending_code(cli: Cli, gateway: FakeGateway) -> None:
    _, code = start_no_wait(cli)
    gateway.expire_device_codes()
    result = cli.run("login", "--resume", "--json")
    assert result.code == 3
    assert result.error()["code"] == "login_expired"
    assert files_holding(cli, code) == []


def test_resume_after_local_expiry_exits_3_and_removes_the_pending_code(cli: Cli, gateway: FakeGateway) -> None:
    _, code = start_no_wait(cli)
    cli.clock.time += gateway.device_expires_in + 1
    result = cli.run("login", "--resume")
    assert result.code == 3
    assert files_holding(cli, code) == []


def test_resume_without_pending_login_exits_1_and_suggests_no_wait(cli: Cli, gateway: FakeGateway) -> None:
    result = cli.run("login", "--resume", "--json")
    assert result.code == 1
    assert result.error()["next"] == "tokenroute login --no-wait"
    assert gateway.requests == []
    follow = run_suggested(cli, result.error()["next"])
    assert follow.code == 0
    assert RESUME in follow.out + follow.err


def test_agent_round_trip_with_the_console_script(cli: Cli, gateway: FakeGateway) -> None:
    started = cli.script("login", "--no-wait", "--json", timeout=30)
    assert started.code == 0, started
    pending = started.json()
    assert set(pending) == PENDING_KEYS
    gateway.approve(pending["user_code"])
    words = shlex.split(pending["next"])
    assert words[0] == "tokenroute"
    finished = cli.script(*words[1:], "--json", timeout=30)
    assert finished.code == 0, finished
    assert finished.json()["status"] == "logged_in"
    assert cli.script("whoami", "--json").json()["email"] == "agent@example.com"


# ---------------------------------------------------------------- login when logged in


def test_login_when_logged_in_says_so_without_a_device_flow(cli: Cli, gateway: FakeGateway) -> None:
    cli.login()
    before = cli.credentials.read_text()
    result = cli.run("login")
    assert result.code == 0
    assert "already logged in" in (result.out + result.err).lower()
    assert device_flow_requests(gateway) == []
    assert gateway.device_codes == {}
    assert cli.credentials.read_text() == before


def test_login_no_wait_when_logged_in_starts_no_device_flow(cli: Cli, gateway: FakeGateway) -> None:
    cli.login()
    result = cli.run("login", "--no-wait", "--json")
    assert result.code == 0
    assert result.json()["status"] == "logged_in"
    assert gateway.device_codes == {}


def test_login_force_starts_a_new_device_flow(cli: Cli, gateway: FakeGateway) -> None:
    old = cli.login()
    approve_when_polled(cli)
    result = cli.run("login", "--force")
    assert (result.code, result.out) == (0, logged_in(cli))
    assert "/oidc/device/auth" in device_flow_requests(gateway)
    assert cli.stored_login()["access_token"] != old["access_token"]


# ---------------------------------------------------------------- doctor


def test_doctor_all_good_exits_0_with_every_item_ok(cli: Cli, api_key: str) -> None:
    cli.login()
    result, report = doctor(cli, env={"TOKENROUTE_API_KEY": api_key})
    assert result.code == 0, result
    assert report["ok"] is True
    assert [c["status"] for c in report["checks"]] == ["ok"] * len(report["checks"])
    names = {c["name"] for c in report["checks"]}
    assert {"python", "api url", "gateway", "login", "api key", "files"} <= names


def test_doctor_human_all_good_lists_every_item_ok(cli: Cli, api_key: str) -> None:
    cli.login()
    result = cli.run("doctor", env={"TOKENROUTE_API_KEY": api_key})
    assert result.code == 0, result
    lines = result.out.splitlines()
    assert len(lines) >= 6
    assert all(line.startswith("ok ") for line in lines), lines


def test_status_is_an_alias_of_doctor(cli: Cli, api_key: str) -> None:
    cli.login()
    env = {"TOKENROUTE_API_KEY": api_key}
    as_doctor = cli.run("doctor", "--json", env=env)
    as_status = cli.run("status", "--json", env=env)
    assert as_status.code == as_doctor.code == 0
    summary = [(c["name"], c["status"]) for c in as_status.json()["checks"]]
    assert summary == [(c["name"], c["status"]) for c in as_doctor.json()["checks"]]


def test_doctor_shows_api_url_from_env(cli: Cli, gateway: FakeGateway) -> None:
    _, report = doctor(cli)
    detail = check(report, "api url")["detail"]
    assert gateway.url in detail and "TOKENROUTE_API_URL" in detail


def test_doctor_shows_api_url_from_flag(cli: Cli, gateway: FakeGateway) -> None:
    _, report = doctor(cli, "--api-url", gateway.url, env={"TOKENROUTE_API_URL": closed_port_url()})
    detail = check(report, "api url")["detail"]
    assert gateway.url in detail and "--api-url" in detail
    assert check(report, "gateway")["status"] == "ok"


def test_doctor_shows_api_url_default(cli: Cli, gateway: FakeGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenroute, "DEFAULT_API_URL", gateway.url)  # no real network in tests
    del cli.env["TOKENROUTE_API_URL"]
    _, report = doctor(cli)
    detail = check(report, "api url")["detail"]
    assert gateway.url in detail and "default" in detail
    assert check(report, "gateway")["status"] == "ok"


def test_doctor_unreachable_gateway_exits_2(cli: Cli) -> None:
    result, report = doctor(cli, env={"TOKENROUTE_API_URL": closed_port_url()})
    assert result.code == 2
    assert check(report, "gateway")["status"] == "problem"
    assert report["ok"] is False


def test_doctor_gateway_5xx_exits_3(cli: Cli, gateway: FakeGateway) -> None:
    cli.login()
    gateway.fail("/api/v1/auth/discovery", status=500, count=10)
    result, report = doctor(cli)
    assert result.code == 3
    assert check(report, "gateway")["status"] == "problem"
    assert check(report, "login")["status"] == "ok"


def test_doctor_not_logged_in_exits_1_with_login_fix(cli: Cli) -> None:
    result, report = doctor(cli)
    assert result.code == 1
    login = check(report, "login")
    assert (login["status"], login["fix"]) == ("problem", "tokenroute login")


def test_doctor_refreshes_an_expired_access_token(cli: Cli, gateway: FakeGateway, api_key: str) -> None:
    old = cli.login(expires_in=0)
    result, report = doctor(cli, env={"TOKENROUTE_API_KEY": api_key})
    assert result.code == 0, result
    assert check(report, "login")["status"] == "ok"
    assert gateway.refresh_count == 1
    assert cli.stored_login()["access_token"] != old["access_token"]


def test_doctor_reports_a_rejected_api_key(cli: Cli) -> None:
    cli.login()
    result, report = doctor(cli, env={"TOKENROUTE_API_KEY": "sk-tr-" + "x" * 32})
    assert result.code == 1
    assert check(report, "api key")["status"] == "problem"


def test_doctor_names_the_key_from_the_flag(cli: Cli, api_key: str) -> None:
    _, report = doctor(cli, "--key", api_key, env={"TOKENROUTE_API_KEY": "sk-tr-" + "y" * 32})
    item = check(report, "api key")
    assert item["status"] == "ok"
    assert "--key" in item["detail"] and api_key[:10] in item["detail"]
    assert api_key not in item["detail"]


def test_doctor_names_the_key_from_the_env(cli: Cli, api_key: str) -> None:
    _, report = doctor(cli, env={"TOKENROUTE_API_KEY": api_key})
    item = check(report, "api key")
    assert item["status"] == "ok"
    assert "TOKENROUTE_API_KEY" in item["detail"] and api_key[:10] in item["detail"]


def test_doctor_names_the_key_from_the_cache(cli: Cli, api_key: str) -> None:
    cli.config_dir.mkdir(mode=0o700)
    cli.cache_key(api_key)
    cli.last_key.chmod(0o600)
    _, report = doctor(cli)
    item = check(report, "api key")
    assert item["status"] == "ok"
    assert str(cli.last_key) in item["detail"] and api_key[:10] in item["detail"]


@posix_only
def test_doctor_world_readable_credentials_are_a_problem_with_a_chmod_fix(cli: Cli, api_key: str) -> None:
    cli.login()
    cli.credentials.chmod(0o644)
    result, report = doctor(cli, env={"TOKENROUTE_API_KEY": api_key})
    assert result.code == 1
    [bad] = [c for c in report["checks"] if c["status"] == "problem"]
    assert str(cli.credentials) in bad["detail"]
    assert bad["fix"].startswith("chmod 600 ")
    subprocess.run(["sh", "-c", bad["fix"]], check=True)
    assert mode(cli.credentials) == 0o600
    assert cli.run("doctor", env={"TOKENROUTE_API_KEY": api_key}).code == 0


@posix_only
def test_doctor_chmod_fix_works_with_a_space_in_the_path(cli: Cli, tmp_path: Path) -> None:
    config = tmp_path / "my config"
    env = {"TOKENROUTE_CONFIG_DIR": str(config)}
    assert cli.run("login", "--no-wait", env=env).code == 0
    [pending] = [p for p in config.iterdir() if device_code(cli.gateway) in p.read_text()]
    pending.chmod(0o644)
    _, report = doctor(cli, env=env)
    [bad] = [c for c in report["checks"] if c["status"] == "problem" and c["name"] == "files"]
    subprocess.run(["sh", "-c", bad["fix"]], check=True, capture_output=True)
    assert mode(pending) == 0o600


def test_doctor_json_shape(cli: Cli) -> None:
    _, report = doctor(cli)
    assert set(report) == {"ok", "checks"}
    assert isinstance(report["ok"], bool)
    for item in report["checks"]:
        assert set(item) == {"name", "status", "detail", "fix"}
        assert item["status"] in ("ok", "warning", "problem")
        assert isinstance(item["name"], str) and isinstance(item["detail"], str)
        assert item["fix"] is None or isinstance(item["fix"], str)


def test_doctor_reports_the_python_version(cli: Cli) -> None:
    _, report = doctor(cli)
    version = "%d.%d.%d" % sys.version_info[:3]
    assert version in check(report, "python")["detail"]
    assert version in cli.run("doctor").out


def test_doctor_output_is_ascii(cli: Cli, gateway: FakeGateway) -> None:
    cli.login()
    cli.credentials.chmod(0o644)
    for argv in (["doctor"], ["doctor", "--json"], ["status"]):
        result = cli.run(*argv, env={"TOKENROUTE_API_KEY": "sk-tr-" + "z" * 32})
        (result.out + result.err).encode("ascii")


# ---------------------------------------------------------------- --json error codes


def test_json_error_auth_required_suggests_login_that_works(cli: Cli) -> None:
    result = cli.run("whoami", "--json")
    assert result.code == 1 and result.out == ""
    error = result.error()
    assert (error["code"], error["next"]) == ("auth_required", "tokenroute login")
    approve_when_polled(cli)
    assert run_suggested(cli, error["next"]).code == 0
    assert cli.run("whoami").code == 0


def test_json_error_session_expired_when_the_refresh_token_is_stale(cli: Cli, gateway: FakeGateway) -> None:
    cli.login()
    backup = cli.credentials.read_text()
    gateway.expire_access_tokens()
    assert cli.run("balance").code == 0  # refreshed: the stored refresh token rotated
    cli.credentials.write_text(backup)  # an old copy of credentials.json comes back
    gateway.expire_access_tokens()
    result = cli.run("balance", "--json")
    assert result.code == 1
    error = result.error()
    assert (error["code"], error["next"]) == ("session_expired", "tokenroute login")


def test_json_error_insufficient_balance_suggests_a_topup_that_works(cli: Cli, gateway: FakeGateway) -> None:
    empty = gateway.add_key(name="empty", balance_usd="0.00")["raw"]
    result = cli.run("test", "--key", empty, "--json")
    assert result.code == 1
    error = result.error()
    assert (error["code"], error["status"]) == ("insufficient_balance", 402)
    assert error["next"].startswith("tokenroute topup --amount ")
    cli.login()
    assert run_suggested(cli, error["next"], "--json").code == 0


def test_json_error_rate_limited(cli: Cli, gateway: FakeGateway, api_key: str) -> None:
    body = {"error": {"message": "Rate limit reached", "type": "rate_limit_error", "code": "rate_limited"}}
    gateway.fail("/v1/chat/completions", status=429, body=body, headers={"Retry-After": "7"})
    result = cli.run("test", "--key", api_key, "--json")
    assert result.code == 1
    assert (result.error()["code"], result.error()["status"]) == ("rate_limited", 429)


def test_json_error_not_found(cli: Cli) -> None:
    cli.login()
    result = cli.run("keys", "revoke", "key_doesnotexist", "--json")
    assert result.code == 1
    assert (result.error()["code"], result.error()["status"]) == ("not_found", 404)


def test_json_error_invalid_input_for_a_bad_argument(cli: Cli, gateway: FakeGateway) -> None:
    cli.login()
    for argv in (["usage", "--days", "0"], ["topup", "--amount", "1.234"], ["keys", "create"]):
        result = cli.run(*argv, "--json")
        assert result.code == 1, argv
        assert result.out == ""
        assert result.error()["code"] in ("invalid_input", "usage"), argv
    assert [r.path_only for r in gateway.requests] == []


def test_json_error_network(cli: Cli, api_key: str) -> None:
    result = cli.run("models", "--key", api_key, "--json", env={"TOKENROUTE_API_URL": closed_port_url()})
    assert result.code == 2
    assert (result.error()["code"], result.error()["status"]) == ("network", None)


def test_json_error_server(cli: Cli, gateway: FakeGateway) -> None:
    cli.login()
    gateway.fail("/api/v1/balance", status=500, count=5)
    result = cli.run("balance", "--json")
    assert result.code == 3
    assert (result.error()["code"], result.error()["status"]) == ("server", 500)


def test_json_error_login_pending(cli: Cli) -> None:
    start_no_wait(cli)
    result = cli.run("login", "--resume", "--timeout", "1", "--json")
    assert result.code == 1
    assert (result.error()["code"], result.error()["next"]) == ("login_pending", RESUME)


# ---------------------------------------------------------------- no TTY, no colour


def test_no_command_waits_for_input_without_a_tty(cli: Cli, gateway: FakeGateway, api_key: str) -> None:
    gateway.auto_approve = True
    gateway.interval = 1
    first = script_with_stdin_open(cli, "login")
    assert first.code == 0, first
    env = {"TOKENROUTE_API_KEY": api_key}
    for argv in common_commands(gateway, api_key) + [["login", "--force"], ["login", "--resume"]]:
        result = script_with_stdin_open(cli, *argv, env=env)
        assert "Traceback" not in result.err, (argv, result)


def test_non_tty_output_has_no_ansi_escapes(cli: Cli, gateway: FakeGateway, api_key: str) -> None:
    cli.login()
    gateway.account["display_name"] = "Agent \x1b[31mred\x1b[0m"
    env = {"TOKENROUTE_API_KEY": api_key}
    for argv in common_commands(gateway, api_key):
        result = cli.script(*argv, env=env)
        assert "\x1b" not in result.out + result.err, (argv, result)


def test_no_color_output_has_no_ansi_escapes_even_on_a_tty(cli: Cli, gateway: FakeGateway, api_key: str) -> None:
    cli.login()
    gateway.account["display_name"] = "Agent \x1b[31mred\x1b[0m"
    env = {"TOKENROUTE_API_KEY": api_key, "NO_COLOR": "1"}
    for argv in common_commands(gateway, api_key):
        result = cli.run(*argv, env=env, tty=True)
        assert "\x1b" not in result.out + result.err, (argv, result)


# ---------------------------------------------------------------- env formats


def test_env_default_stays_dotenv(cli: Cli, gateway: FakeGateway, api_key: str) -> None:
    result = cli.run("env", "--key", api_key)
    assert result.out == "OPENAI_API_KEY=%s\nOPENAI_BASE_URL=%s/v1\n" % (api_key, gateway.url)


def test_env_export_prints_export_lines(cli: Cli, gateway: FakeGateway, api_key: str) -> None:
    result = cli.run("env", "--export", "--key", api_key)
    assert result.code == 0
    assert result.out == "export OPENAI_API_KEY=%s\nexport OPENAI_BASE_URL=%s/v1\n" % (api_key, gateway.url)


def test_env_shell_fish(cli: Cli, gateway: FakeGateway, api_key: str) -> None:
    result = cli.run("env", "--shell", "fish", "--key", api_key)
    assert result.code == 0
    assert result.out == "set -gx OPENAI_API_KEY %s\nset -gx OPENAI_BASE_URL %s/v1\n" % (api_key, gateway.url)


def test_env_shell_powershell(cli: Cli, gateway: FakeGateway, api_key: str) -> None:
    result = cli.run("env", "--shell", "powershell", "--key", api_key)
    assert result.code == 0
    assert result.out == "$env:OPENAI_API_KEY = '%s'\n$env:OPENAI_BASE_URL = '%s/v1'\n" % (api_key, gateway.url)


@posix_only
def test_eval_env_export_sets_the_variables_in_sh(cli: Cli, gateway: FakeGateway, api_key: str) -> None:
    program = 'eval "$("$TR" env --export)" && printf "%s\\n%s\\n" "$OPENAI_API_KEY" "$OPENAI_BASE_URL"'
    env = cli.process_env({"TOKENROUTE_API_KEY": api_key, "TR": console_script()})
    env.pop("OPENAI_API_KEY", None)
    done = subprocess.run(["sh", "-c", program], env=env, capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == "%s\n%s/v1\n" % (api_key, gateway.url)


def test_dotenv_output_parses_back_to_the_same_values(cli: Cli, gateway: FakeGateway, api_key: str) -> None:
    out = cli.run("env", "--key", api_key).out
    parsed = dict(line.split("=", 1) for line in out.splitlines())
    assert parsed == {"OPENAI_API_KEY": api_key, "OPENAI_BASE_URL": gateway.url + "/v1"}


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_env_output_sets_the_variables_in_fish(cli: Cli, gateway: FakeGateway, api_key: str) -> None:
    out = cli.run("env", "--shell", "fish", "--key", api_key).out
    done = subprocess.run(["fish", "-c", out + "echo $OPENAI_API_KEY"], capture_output=True, text=True, timeout=30)
    assert done.stdout == api_key + "\n"


# ---------------------------------------------------------------- completion


def completion_script(cli: Cli, shell: str) -> str:
    result = cli.run("completion", shell)
    assert (result.code, result.err) == (0, "")
    return result.out


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_mentions_every_command_of_the_parser(cli: Cli, shell: str) -> None:
    script = completion_script(cli, shell)
    expected = {path[-1] for path in parser_commands(tokenroute.build_parser())}
    assert {"login", "keys", "create", "doctor", "status", "completion"} <= expected
    missing = [name for name in sorted(expected) if not re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(name), script)]
    assert missing == []


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion_passes_bash_n(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "tokenroute.bash"
    path.write_bytes(completion_script(cli, "bash").encode())  # LF, as the shell reads it, on Windows too
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stderr) == (0, "")


def bash_complete(cli: Cli, tmp_path: Path, *words: str) -> list[str]:
    """Source the bash completion and complete the command line `words` (last one is the cursor word)."""
    script = completion_script(cli, "bash")
    match = re.search(r"complete -F (\S+) tokenroute", script)
    assert match is not None, script
    path = tmp_path / "tokenroute.bash"
    path.write_bytes(script.encode())
    line = " ".join(words)
    program = (
        'source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); '
        'COMP_LINE="${*}"; COMP_POINT=${#COMP_LINE}; %s; printf "%%s\\n" "${COMPREPLY[@]}"' % match.group(1)
    )
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", program, "bash", str(path), *words],
                          capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stderr) == (0, ""), line
    return [word for word in done.stdout.splitlines() if word]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completes_ke_to_keys(cli: Cli, tmp_path: Path) -> None:
    assert bash_complete(cli, tmp_path, "tokenroute", "ke") == ["keys"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completes_keys_c_to_create(cli: Cli, tmp_path: Path) -> None:
    assert bash_complete(cli, tmp_path, "tokenroute", "keys", "c") == ["create"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completes_every_command_of_the_parser(cli: Cli, tmp_path: Path) -> None:
    paths = parser_commands(tokenroute.build_parser())
    top = sorted(path[0] for path in paths if len(path) == 1)
    assert sorted(w for w in bash_complete(cli, tmp_path, "tokenroute", "") if not w.startswith("-")) == top
    keys = sorted(path[1] for path in paths if path[:1] == ("keys",) and len(path) == 2)
    assert sorted(w for w in bash_complete(cli, tmp_path, "tokenroute", "keys", "") if not w.startswith("-")) == keys


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completes_option_values(cli: Cli, tmp_path: Path) -> None:
    assert bash_complete(cli, tmp_path, "tokenroute", "env", "--sh") == ["--shell"]
    assert bash_complete(cli, tmp_path, "tokenroute", "env", "--shell", "f") == ["fish"]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_passes_zsh_n(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "_tokenroute"
    path.write_bytes(completion_script(cli, "zsh").encode())  # LF, as the shell reads it, on Windows too
    done = subprocess.run(["zsh", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completion_passes_fish_n(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "tokenroute.fish"
    path.write_bytes(completion_script(cli, "fish").encode())  # LF, as the shell reads it, on Windows too
    done = subprocess.run(["fish", "--no-execute", str(path)], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stderr) == (0, "")


# ---------------------------------------------------------------- Windows-ish consoles


def test_common_human_output_is_ascii(cli: Cli, gateway: FakeGateway, api_key: str) -> None:
    approve_when_polled(cli)
    login = cli.run("login")
    assert login.out == logged_in(cli)
    outputs = [login]
    env = {"TOKENROUTE_API_KEY": api_key}
    for argv in common_commands(gateway, api_key):
        outputs.append(cli.run(*argv, env=env))
    outputs.append(cli.run("login", "--no-wait"))
    outputs.append(cli.run("login", "--resume", "--timeout", "0"))
    for result in outputs:
        (result.out + result.err).encode("ascii")
        result.out.encode("cp1252")


def test_cp1252_console_never_raises_on_non_ascii_server_text(cli: Cli, gateway: FakeGateway) -> None:
    cli.login()
    gateway.account["display_name"] = "Zo\u00eb \u2713 \u65e5\u672c"
    done = subprocess.run([console_script(), "whoami"], env=cli.process_env({"PYTHONIOENCODING": "cp1252"}),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    out, err = done.stdout.decode("cp1252"), done.stderr.decode("cp1252")
    assert (done.returncode, err) == (0, ""), out
    assert "Name:    Zo\u00eb ? ??" in out


def test_refresh_works_where_fcntl_does_not_exist(cli: Cli, gateway: FakeGateway,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError, as on Windows
    cli.login(expires_in=0)
    result = cli.run("balance", "--json")
    assert result.code == 0, result
    assert gateway.refresh_count == 1
