"""Local state through real life (issue 8): upgrades from 0.1.0 and 0.2.0,
several gateways, stale keys, failing outputs, logout racing a refresh,
damaged files, every URL form, and the rest of the network and input.

The earlier releases' files are written here exactly as
shared/spec/legacy-clients.md describes them.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import Cli, Result, console_script
from fake_gateway import FakeGateway

import tokenroute

POSIX = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes, descriptors and signals")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def foreign_file() -> str:
    """A file of another user's (root's) that this one can read."""
    found = next((path for path in ("/etc/hostname", "/etc/passwd") if os.path.exists(path)), None)
    if found is None or os.stat(found).st_uid == os.getuid():
        pytest.skip("no file of another user's here")
    return found


# ------------------------------------------------------------ earlier releases


class Earlier:
    """Writes the files that tokenroute 0.1.0 and 0.2.0 left in a HOME."""

    def __init__(self, cli: Cli, gateway: FakeGateway) -> None:
        self.cli = cli
        self.gateway = gateway
        self.tokenroute = cli.home / ".tokenroute"
        self.paradigx = cli.home / ".paradigx"
        self.auth = self.paradigx / "auth.json"
        self.key_02 = self.paradigx / "tokenroute_last_key.txt"

    def login_01(self, *, expires_in: int = 3600) -> dict[str, Any]:
        tokens = self.gateway.issue_tokens(expires_in=expires_in)
        creds = {
            "access_token": tokens["access_token"],
            "refresh_token": tokens["refresh_token"],
            "expires_at": int(self.cli.clock.now() + expires_in),
            "issuer": self.gateway.url + "/oidc",
            "client_id": None,
        }
        self.tokenroute.mkdir(exist_ok=True)
        self.tokenroute.chmod(0o755)  # 0.1.0 used mkdir and the umask
        path = self.tokenroute / "credentials.json"
        path.write_text(json.dumps(creds, indent=2))
        path.chmod(0o600)
        return creds

    def key_01(self, key: str) -> None:
        self.tokenroute.mkdir(exist_ok=True)
        self.tokenroute.chmod(0o755)
        path = self.tokenroute / "last_key.txt"
        path.write_text(key)  # no trailing newline
        path.chmod(0o600)
        os.utime(path, (time.time() - 86400, time.time() - 86400))

    def login_02(self, *, expires_in: int = 3600, token_endpoint: bool = True) -> dict[str, Any]:
        tokens = self.gateway.issue_tokens(expires_in=expires_in)
        entry = {
            "access_token": tokens["access_token"],
            "refresh_token": tokens["refresh_token"],
            "expires_at": int(self.cli.clock.now() + expires_in),
            "issuer": self.gateway.url + "/oidc",
            "client_id": "tokenroute-cli",
            "resource": self.gateway.resource,
            "api_url": self.gateway.url,
            "token_endpoint": self.gateway.url + "/oidc/token" if token_endpoint else None,
        }
        self.paradigx.mkdir(exist_ok=True)
        other = {
            "access_token": "other-access", "refresh_token": "other-refresh", "expires_at": 1764540000,
            "issuer": "https://auth.paradigx.com", "client_id": "other-cli",
            "resource": "https://api.other-product.example", "api_url": "https://api.other-product.example",
            "token_endpoint": None,
        }
        data = {"version": 1, "tokens": {self.gateway.url: entry, "https://api.other-product.example": other}}
        self.auth.write_text(json.dumps(data, indent=2))
        self.auth.chmod(0o600)
        return entry

    def key_02_file(self, key: str) -> None:
        self.paradigx.mkdir(exist_ok=True)
        self.key_02.write_text(key)
        self.key_02.chmod(0o600)

    def other_entry_text(self) -> str:
        """The other product's entry as auth.json spells it (indent 2, its place in the file)."""
        text = self.auth.read_text()
        return text[text.index('"https://api.other-product.example"'):]


@pytest.fixture
def earlier(cli: Cli, gateway: FakeGateway, monkeypatch: pytest.MonkeyPatch) -> Earlier:
    """The earlier releases' files, for a user of the default gateway: `gateway` plays it
    (0.1.0 and 0.2.0 users almost all used it), so its discovery names tokenroute's client."""
    monkeypatch.setattr(tokenroute, "DEFAULT_API_URL", gateway.url)
    return Earlier(cli, gateway)


def test_0_2_login_and_key_are_taken_over_once_without_a_new_login(cli, gateway, earlier, api_key, staging):
    entry = earlier.login_02()
    earlier.key_02_file(api_key)
    other_before = earlier.other_entry_text()
    earlier.auth.chmod(0o640)

    result = cli.run("balance", "--json")

    assert result.code == 0, result
    assert json.loads(result.out) == {"balance_usd": "5.00", "currency": "USD"}
    assert "took over the login of tokenroute 0.2.0" in result.err
    assert cli.stored_login()["refresh_token"] == entry["refresh_token"]
    auth = json.loads(earlier.auth.read_text())
    assert list(auth["tokens"]) == ["https://api.other-product.example"]
    assert earlier.other_entry_text() == other_before
    assert mode(earlier.auth) == 0o640 or os.name != "posix"  # Windows has no modes
    assert gateway.requests[-1].header("Authorization") == f"Bearer {entry['access_token']}"

    key = cli.run("env")  # 0.2.0's key names no gateway: the default gateway's, read where it is
    assert (key.code, key.err) == (0, "") and f"OPENAI_API_KEY={api_key}\n" in key.out
    assert earlier.key_02.exists()

    login_to(cli, staging)
    created = cli.run("keys", "create", "--name", "stage", "--json", env={"TOKENROUTE_API_URL": staging.url})
    assert f"Took over the cached API key {api_key[:10]}... of tokenroute 0.2.0 ({earlier.key_02})" in created.err
    assert not earlier.key_02.exists() and api_key not in created.err  # the first write records it first
    assert cli.cached_key() == api_key and cli.last_key.read_text() == created.json()["raw"]
    assert cli.run("env").out.splitlines()[0] == f"OPENAI_API_KEY={api_key}"


def test_0_2_login_without_token_endpoint_refreshes_through_discovery(cli, gateway, earlier):
    entry = earlier.login_02(expires_in=-100, token_endpoint=False)

    result = cli.run("whoami", "--json")

    assert result.code == 0, result
    refresh = next(r for r in gateway.requests if r.path_only == "/oidc/token")
    assert refresh.form["refresh_token"] == entry["refresh_token"]
    assert cli.stored_login()["token_endpoint"] == gateway.url + "/oidc/token"


def test_0_1_login_is_taken_over_and_refreshed_with_discovery_and_the_api_url_as_resource(cli, gateway, earlier):
    gateway.resource = gateway.url  # as on the real service: the resource indicator is the API base URL
    creds = earlier.login_01(expires_in=-100)

    result = cli.run("whoami", "--json")

    assert result.code == 0, result
    assert "took over the login of tokenroute 0.1.0" in result.err
    discovery, refresh = gateway.requests[0], gateway.requests[1]
    assert discovery.path_only == "/api/v1/auth/discovery"
    assert refresh.path_only == "/oidc/token"
    assert refresh.form["refresh_token"] == creds["refresh_token"]
    assert refresh.form["resource"] == gateway.url
    assert refresh.form["client_id"] == "tokenroute-cli"
    stored = json.loads(cli.credentials.read_text())
    assert stored["version"] == 2 and list(stored["logins"]) == [gateway.url]
    assert creds["refresh_token"] not in cli.credentials.read_text()  # rotated, and saved in one place


def test_0_1_login_without_refresh_token_asks_for_a_new_login(cli, gateway, earlier):
    earlier.login_01(expires_in=-100)
    data = json.loads((earlier.tokenroute / "credentials.json").read_text())
    (earlier.tokenroute / "credentials.json").write_text(json.dumps(dict(data, refresh_token=None, expires_at=None)))

    result = cli.run("balance")

    assert result.code == 1
    assert result.err.endswith("error: session expired; run `tokenroute login`\n")


def test_0_2_wins_over_0_1_and_the_0_1_copy_is_dropped(cli, gateway, earlier):
    old = earlier.login_01()
    new = earlier.login_02()

    result = cli.run("whoami", "--json")

    assert result.code == 0, result
    assert gateway.requests[-1].header("Authorization") == f"Bearer {new['access_token']}"
    every_file = b"".join(files_under(cli.home).values())
    assert old["refresh_token"].encode() not in every_file
    assert every_file.count(new["refresh_token"].encode()) == 1


@POSIX
def test_the_0_1_folder_is_made_private_and_doctor_reports_only_a_real_problem(cli, gateway, earlier, api_key):
    earlier.key_01(api_key)
    assert mode(earlier.tokenroute) == 0o755

    result = cli.run("doctor", "--json")

    assert mode(earlier.tokenroute) == 0o700
    assert "made" in result.err and "private (0700)" in result.err
    files = [check for check in json.loads(result.out)["checks"] if check["name"] == "files"]
    assert files and all(check["status"] == "ok" for check in files)

    elsewhere = cli.home / "chosen"
    elsewhere.mkdir(mode=0o755)
    elsewhere.chmod(0o755)
    (elsewhere / "last_key.txt").write_text(f"# keys\n{gateway.url} {api_key} -\n")
    (elsewhere / "last_key.txt").chmod(0o600)
    chosen = cli.run("doctor", "--json", env={"TOKENROUTE_CONFIG_DIR": str(elsewhere)})
    problems = [c for c in json.loads(chosen.out)["checks"] if c["name"] == "files" and c["status"] == "problem"]
    assert [c["fix"] for c in problems] == [f"chmod 700 {elsewhere}"]  # a folder the user chose is only reported
    assert mode(elsewhere) == 0o755


def test_the_newest_earlier_key_wins_and_a_revoked_one_never_comes_back(cli, gateway, earlier):
    older = gateway.add_key(name="from-0.1")
    newer = gateway.add_key(name="from-0.2")
    earlier.key_01(older["raw"])
    earlier.key_02_file(newer["raw"])
    cli.login()

    taken = cli.run("env")
    assert f"OPENAI_API_KEY={newer['raw']}\n" in taken.out
    revoked = cli.run("keys", "revoke", newer["id"])
    assert revoked.code == 0, revoked
    assert "Removed it from the key cache" in revoked.err

    after = cli.run("env", "--json")
    assert after.code == 1
    assert after.error()["code"] == "no_key"
    every_file = b"".join(files_under(cli.home).values())
    assert older["raw"].encode() not in every_file and newer["raw"].encode() not in every_file


def test_an_earlier_key_belongs_to_the_first_gateway_used_after_the_upgrade(cli, gateway, staging, earlier, api_key):
    earlier.key_01(api_key)

    first = cli.run("env", env={"TOKENROUTE_API_URL": gateway.url})
    other = cli.run("env", "--json", env={"TOKENROUTE_API_URL": staging.url})

    assert f"OPENAI_API_KEY={api_key}\n" in first.out
    assert other.code == 1
    assert other.error()["code"] == "no_key"
    assert gateway.url in other.error()["message"]  # it says which gateway the cached key is for


def test_takeover_notes_stay_off_stdout_and_out_of_json(cli, gateway, earlier, api_key):
    earlier.login_02()
    earlier.key_02_file(api_key)

    result = cli.run("balance", "--json")
    env = cli.run("env", "--json")

    assert json.loads(result.out) == {"balance_usd": "5.00", "currency": "USD"}
    assert "took over" in result.err
    assert json.loads(env.out) == {"OPENAI_API_KEY": api_key, "OPENAI_BASE_URL": gateway.url + "/v1"}


def test_after_logout_no_refresh_token_of_tokenroute_remains_under_home(cli, gateway, earlier):
    old = earlier.login_01()
    new = earlier.login_02()

    result = cli.run("logout")

    assert result.code == 0, result
    every_file = b"".join(files_under(cli.home).values())
    assert old["refresh_token"].encode() not in every_file
    assert new["refresh_token"].encode() not in every_file
    assert b"other-refresh" in every_file  # the other product's login stays
    assert cli.run("whoami").code == 1


# -------------------------------------------------------------- several gateways


def login_to(cli: Cli, gw: FakeGateway) -> Result:
    gw.auto_approve = True
    return cli.run("login", "--no-browser", env={"TOKENROUTE_API_URL": gw.url})


def test_a_login_per_gateway_side_by_side(cli, gateway, staging):
    assert login_to(cli, gateway).code == 0
    assert login_to(cli, staging).code == 0

    prod = cli.run("whoami")
    stage = cli.run("whoami", env={"TOKENROUTE_API_URL": staging.url})

    assert prod.code == 0 and stage.code == 0
    assert f"Gateway: {gateway.url}\n" in prod.out
    assert staging.url in stage.out
    stored = json.loads(cli.credentials.read_text())
    assert stored["version"] == 2 and sorted(stored["logins"]) == sorted([gateway.url, staging.url])
    assert mode(cli.credentials) == 0o600 or os.name != "posix"


def test_logout_forgets_the_current_gateway_and_all_forgets_every_one(cli, gateway, staging):
    login_to(cli, gateway)
    login_to(cli, staging)

    one = cli.run("logout", "--json", env={"TOKENROUTE_API_URL": staging.url})

    assert one.json() == {"logged_out": True, "api_url": staging.url, "cached_keys": []}
    assert cli.run("whoami").code == 0
    assert cli.run("whoami", env={"TOKENROUTE_API_URL": staging.url}).code == 1
    login_to(cli, staging)
    every = cli.run("logout", "--all")
    assert (every.code, every.out) == (0, "OK logged out of every gateway\n")
    assert not cli.credentials.exists()


def test_a_cached_key_is_offered_only_to_its_gateway(cli, gateway, staging):
    login_to(cli, gateway)
    created = cli.run("keys", "create", "--name", "prod", "--json").json()

    here = cli.run("env")
    there = cli.run("models", "--json", env={"TOKENROUTE_API_URL": staging.url})

    assert f"OPENAI_API_KEY={created['raw']}\n" in here.out
    assert there.code == 1 and there.error()["code"] == "no_key"
    assert staging.requests == []


def test_doctor_and_whoami_name_the_gateway(cli, gateway):
    cli.login()

    doctor = cli.run("doctor")
    whoami = cli.run("whoami")

    assert f"logged in to {gateway.url} as " in doctor.out
    assert any(line.split() == ["Gateway:", gateway.url] for line in whoami.out.splitlines())


# -------------------------------------------------------- the one-time key


def run_script(cli: Cli, *argv: str, stdout: Any, env: dict[str, str] | None = None, **kwargs: Any) -> Result:
    done = subprocess.run(
        [console_script(), *argv], env=cli.process_env(env), stdout=stdout, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True, timeout=60, **kwargs,
    )
    return Result(done.returncode, "", done.stderr)


def closed_stdout(cli: Cli, *argv: str, env: dict[str, str] | None = None) -> Result:
    """Run the console script as `tokenroute ARGV >&-`."""
    return run_script(cli, *argv, stdout=None, env=env, preexec_fn=lambda: os.close(1))


def reader_left(cli: Cli, *argv: str, env: dict[str, str] | None = None) -> Result:
    """Run the console script into a pipe whose reader has already left."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return run_script(cli, *argv, stdout=write_end, env=env)
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    "failing", [pytest.param(closed_stdout, marks=POSIX), reader_left], ids=["closed", "reader-left"]
)
@pytest.mark.parametrize("unbuffered", ["", "1"], ids=["buffered", "unbuffered"])
def test_keys_create_that_cannot_print_says_where_the_key_is_cached(cli, gateway, failing, unbuffered):
    cli.login()

    result = failing(cli, "keys", "create", "--name", "ci", env={"PYTHONUNBUFFERED": unbuffered})

    assert result.code == 1, result
    assert "could not be printed" in result.err and str(cli.last_key) in result.err
    assert "Traceback" not in result.err and "Exception ignored" not in result.err
    (key,) = gateway.keys.values()
    assert cli.cached_key() == key["raw"]


@pytest.mark.parametrize(
    "failing", [pytest.param(closed_stdout, marks=POSIX), reader_left], ids=["closed", "reader-left"]
)
def test_keys_create_no_cache_that_cannot_print_says_how_to_revoke(cli, gateway, failing):
    cli.login()

    result = failing(cli, "keys", "create", "--name", "ci", "--no-cache", "--json")

    assert result.code == 1, result
    (key_id,) = gateway.keys
    error = json.loads(result.err)["error"]
    assert error["code"] == "output_failed"
    assert "delivered nowhere" in error["message"]
    assert error["next"] == f"tokenroute keys revoke {key_id}"
    assert not cli.last_key.exists()


@pytest.mark.parametrize(
    "failing", [pytest.param(closed_stdout, marks=POSIX), reader_left], ids=["closed", "reader-left"]
)
@pytest.mark.parametrize(
    "argv", [["--version"], ["--help"], ["env"], ["balance"], ["keys", "list"], ["models"], ["doctor"], ["logout"]]
)
def test_every_command_ends_cleanly_when_stdout_fails(cli, gateway, api_key, failing, argv):
    cli.login()
    cli.cache_key(api_key)

    result = failing(cli, *argv)

    assert "Traceback" not in result.err and "Exception ignored" not in result.err, result
    if failing is closed_stdout:  # the data went nowhere: say so
        assert result.code == 1, result
        assert result.err.endswith("error: cannot write the output: the stream is closed\n"), result
    else:  # the reader left on purpose (`| head -1`): end quietly
        assert result.code == 0, result
        assert "error" not in result.err, result


# ------------------------------------------------------------- stale keys


def test_revoking_the_cached_key_removes_it_from_the_cache(cli, gateway):
    cli.login()
    created = cli.run("keys", "create", "--name", "ci", "--json").json()
    other = gateway.add_key(name="other")

    kept = cli.run("keys", "revoke", other["id"])
    assert "key cache" not in kept.err
    assert cli.cached_key() == created["raw"]

    result = cli.run("keys", "revoke", created["id"])

    assert result.code == 0, result
    assert result.err == f"Removed it from the key cache ({cli.last_key}).\n"
    assert cli.cached_key() is None


def test_a_rejected_api_key_is_invalid_key_not_a_login_problem(cli, gateway):
    result = cli.run("models", "--json", "--key", "sk-tr-unknownkey123")

    assert result.code == 1
    error = result.error()
    assert error["code"] == "invalid_key"
    assert error["next"] == "tokenroute keys create --name NAME"
    assert "login" not in error["next"]


def test_logout_says_a_cached_key_remains_and_how_to_forget_it(cli, gateway, api_key):
    cli.login()
    cli.cache_key(api_key)

    result = cli.run("logout")

    assert result.out == f"OK logged out of {gateway.url}\n"
    assert f"stays cached in {cli.last_key}" in result.err  # where env reads it
    assert "tokenroute logout --forget-key" in result.err
    forget = cli.run("logout", "--forget-key")
    assert forget.err == ""
    assert cli.cached_key() is None
    assert cli.run("env").code == 1


# -------------------------------------------------------- logout is final


def test_a_refresh_in_flight_never_writes_the_login_back_after_logout(cli, gateway):
    cli.login(expires_in=-100)
    gateway.slow("/oidc/token", 2.0, method="POST")
    refreshing = subprocess.Popen(
        [console_script(), "balance"], env=cli.process_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not any(r.path_only == "/oidc/token" for r in gateway.requests):
            assert time.monotonic() < deadline, "the refresh never started"
            time.sleep(0.02)
        logout = subprocess.run(
            [console_script(), "logout"], env=cli.process_env(), capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL,
        )
        refreshing.communicate(timeout=60)
    finally:
        refreshing.kill()

    assert logout.returncode == 0, logout.stderr
    assert logout.stdout == f"OK logged out of {gateway.url}\n"  # it waited for the refresh, then removed it
    assert not cli.credentials.exists()
    assert cli.run("whoami").code == 1


# ------------------------------------------------- login always gets you out


@pytest.mark.parametrize("damage", ["binary", "folder", "foreign"])
def test_login_sets_an_unusable_credentials_file_aside_and_logs_in(cli, gateway, damage):
    cli.config_dir.mkdir(mode=0o700)
    if damage == "folder":
        cli.credentials.mkdir()
        (cli.credentials / "inside").write_text("kept")
    else:
        cli.credentials.write_bytes(b"\xff\xfe\x00garbage" if damage == "binary" else b'{"version": 2, "logins": {}}')
    if damage == "foreign" and os.geteuid() == 0:
        os.chown(cli.credentials, 12345, 12345)
    elif damage == "foreign":  # a symlink to a file root owns is another user's file for anyone else
        cli.credentials.unlink()
        cli.credentials.symlink_to(foreign_file())
    gateway.auto_approve = True

    refused = cli.run("whoami")
    result = cli.run("login", "--no-browser")

    assert refused.code == 1 and "tokenroute login" in refused.err
    assert result.code == 0, result
    (aside,) = cli.config_dir.glob("credentials.json.damaged-*")
    assert f"moved it to {aside}" in result.err
    assert cli.stored_login()["api_url"] == gateway.url
    assert cli.run("whoami").code == 0


@pytest.mark.parametrize("damage", ["garbage", "folder"])
def test_a_damaged_pending_login_never_blocks_login(cli, gateway, damage):
    cli.config_dir.mkdir(mode=0o700)
    pending = cli.config_dir / "pending_login.json"
    if damage == "folder":
        pending.mkdir()
    else:
        pending.write_bytes(b"\x00{not json")

    resumed = cli.run("login", "--resume", "--json")
    started = cli.run("login", "--no-wait", "--json")
    gateway.approve()
    finished = cli.run("login", "--resume")

    assert resumed.error()["code"] == "no_pending_login"
    assert resumed.error()["next"] == "tokenroute login --no-wait"
    assert started.code == 0, started
    assert finished.code == 0, finished


@POSIX
def test_an_unwritable_config_folder_fails_before_a_code_is_shown(cli, gateway):
    if os.geteuid() == 0:  # root writes in any folder of its own: take one no one may write in
        config = Path("/proc/self")
        if not config.is_dir():
            pytest.skip("no read-only folder for root here")
    else:
        config = cli.config_dir
        config.mkdir(mode=0o500)
        config.chmod(0o500)

    result = cli.run("login", "--no-browser", env={"TOKENROUTE_CONFIG_DIR": str(config)})

    assert result.code == 1, result
    assert "cannot write in" in result.err and str(config) in result.err
    assert "enter code" not in result.err
    assert [r.path_only for r in gateway.requests] == []


# ----------------------------------------------------------- every URL form


def test_schemes_and_hosts_are_case_insensitive(cli, gateway, api_key):
    shouting = gateway.url.replace("http://", "HTTP://").upper()
    cli.login()

    models = cli.run("models", "--json", "--key", api_key, env={"TOKENROUTE_API_URL": shouting + "/"})
    whoami = cli.run("whoami", "--json", env={"TOKENROUTE_API_URL": shouting})

    assert models.code == 0, models
    assert whoami.code == 0, whoami  # the same login: one canonical form


@pytest.mark.parametrize("where", ["env", "flag"])
def test_a_url_with_a_password_is_refused_and_the_password_never_shown(cli, gateway, where):
    url = gateway.url.replace("http://", "http://ada:s3cretpw@")
    argv, env = (["--api-url", url], {}) if where == "flag" else ([], {"TOKENROUTE_API_URL": url})
    source = "--api-url" if where == "flag" else "TOKENROUTE_API_URL"

    results = [cli.run(*argv, *command, env=env) for command in (["whoami"], ["env", "--json"], ["doctor", "--json"])]

    for result in results:
        assert result.code == 1, result
        assert "s3cretpw" not in result.out + result.err
        assert f"{source} must not hold a user name or password" in result.out + result.err
    assert gateway.requests == []


def test_a_user_info_trick_is_refused_before_connecting(cli, gateway, api_key):
    result = cli.run("models", "--key", api_key, env={"TOKENROUTE_API_URL": "http://127.0.0.1@example.invalid"})

    assert result.code == 1
    assert "must not hold a user name or password" in result.err


def test_an_internationalised_host_is_stored_and_compared_in_one_form(cli, gateway, api_key):
    cli.cache_key(api_key)
    stored = {"version": 2, "logins": {}}
    login = cli.login()
    stored["logins"]["https://xn--bcher-kva.example"] = dict(login, api_url="https://xn--bcher-kva.example")
    cli.credentials.write_text(json.dumps(stored))

    result = cli.run("logout", "--json", env={"TOKENROUTE_API_URL": "HTTPS://Bücher.Example:443/"})

    assert result.json()["api_url"] == "https://xn--bcher-kva.example"
    assert result.json()["logged_out"] is True


def test_an_internationalised_host_reaches_the_network_as_punycode(cli, gateway, api_key):
    proxy = {"HTTPS_PROXY": gateway.recorder.url, "NO_PROXY": ""}
    cli.run("models", "--key", api_key, env={"TOKENROUTE_API_URL": "https://bücher.example", **proxy})

    tunnels = {(r.method, r.path) for r in gateway.recorder.requests}
    assert tunnels == {("CONNECT", "xn--bcher-kva.example:443")}


@pytest.fixture
def gateway6() -> Any:
    try:
        gw = FakeGateway(host="::1").start()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        yield gw
    finally:
        gw.stop()


def test_ipv6_literals_work_in_every_command_env_included(tmp_path, gateway6):
    cli = Cli(gateway6, tmp_path)
    gateway6.auto_approve = True

    login = cli.run("login", "--no-browser")
    created = cli.run("keys", "create", "--name", "v6", "--json")
    env = cli.run("env")
    export = cli.run("env", "--export")
    models = cli.run("models", "--json")

    assert gateway6.url.startswith("http://[::1]:")
    assert (login.code, created.code, models.code) == (0, 0, 0), (login, created, models)
    assert env.out == f"OPENAI_API_KEY={created.json()['raw']}\nOPENAI_BASE_URL={gateway6.url}/v1\n"
    assert f"export OPENAI_BASE_URL='{gateway6.url}/v1'\n" in export.out
    if shutil.which("sh") is None:
        pytest.skip("no POSIX sh here to run the --export output")
    sh = subprocess.run(["sh", "-c", export.out + 'printf %s "$OPENAI_BASE_URL"'], capture_output=True, text=True)
    assert sh.stdout == gateway6.url + "/v1"


@pytest.mark.parametrize("host", ["api..tokenroute.io", "a" * 64 + ".example.com", ".example.com"])
@pytest.mark.parametrize("where", ["env", "flag"])
def test_a_malformed_host_is_a_bad_gateway_url_not_a_proxy_problem(cli, api_key, host, where):
    url = f"https://{host}"
    argv, env = (["--api-url", url], {}) if where == "flag" else ([], {"TOKENROUTE_API_URL": url})

    result = cli.run(*argv, "models", "--key", api_key, env=env)

    assert result.code == 1, result
    assert "not a valid http(s) gateway URL" in result.err
    assert "proxy" not in result.err
    assert ("--api-url" in result.err) == (where == "flag")
    assert ("TOKENROUTE_API_URL" in result.err) == (where == "env")


def test_env_refuses_plain_http_to_a_remote_gateway(cli, api_key):
    result = cli.run("env", "--json", "--key", api_key, env={"TOKENROUTE_API_URL": "http://gateway.example.com"})

    assert (result.code, result.out) == (1, "")
    assert result.error()["code"] == "insecure_url"


# ------------------------------------------------- input and the network


@pytest.mark.parametrize("status", [429, 503])
def test_device_flow_backs_off_on_429_and_5xx_and_keeps_polling(cli, gateway, status):
    gateway.fail("/oidc/token", status=status, body={"detail": "slow down"}, count=3, method="POST")
    cli.clock.on_sleep.append(lambda: gateway.approve() if len(cli.clock.sleeps) > 4 else None)

    result = cli.run("login", "--no-browser")

    assert result.code == 0, result
    polls = [r for r in gateway.requests if r.path_only == "/oidc/token"]
    assert len(polls) >= 4
    waits = [s for s in cli.clock.sleeps if s > 0]
    assert waits[1] > waits[0] and waits[2] > waits[1]  # each failure waits longer


def test_device_flow_keeps_polling_through_network_errors(cli, gateway):
    gateway.fail("/oidc/token", close=True, count=2, method="POST")
    cli.clock.on_sleep.append(lambda: gateway.approve() if len(cli.clock.sleeps) > 3 else None)

    result = cli.run("login", "--no-browser")

    assert result.code == 0, result


def test_invalid_utf8_in_an_argument_exits_1_with_a_clear_message(cli, gateway):
    cli.login()

    result = cli.run("keys", "create", "--name", b"bad\xff".decode("utf-8", "surrogateescape"))

    assert (result.code, result.out) == (1, "")
    assert result.err == "error: the argument 'bad?' is not valid UTF-8 text\n"
    assert gateway.requests == []


@POSIX
def test_invalid_utf8_through_the_console_script(cli, gateway):
    done = subprocess.run(
        [os.fsencode(console_script()), b"keys", b"create", b"--name", b"\xff\xfe"],
        env={**cli.process_env(), "TOKENROUTE_JSON": "1"}, capture_output=True, timeout=60,
    )
    bad_env = subprocess.run(
        [console_script(), "env"], capture_output=True, timeout=60,
        env={**{k.encode(): v.encode() for k, v in cli.process_env().items()}, b"TOKENROUTE_API_KEY": b"sk-tr-\xff"},
    )

    assert done.returncode == 1 and b"Traceback" not in done.stderr
    assert json.loads(done.stderr)["error"]["message"] == "the argument '??' is not valid UTF-8 text"
    assert bad_env.returncode == 1
    assert bad_env.stderr == b"error: TOKENROUTE_API_KEY is not valid UTF-8 text\n"


def test_a_bad_timeout_is_a_config_error_naming_the_variable(cli, api_key):
    result = cli.run("models", "--json", "--key", api_key, env={"TOKENROUTE_TIMEOUT": "soon"})

    assert result.code == 1
    assert result.error()["code"] == "config"
    assert "TOKENROUTE_TIMEOUT" in result.error()["message"]


@POSIX
def test_a_full_disk_while_saving_a_rotated_token_still_delivers_and_warns(cli, gateway):
    import resource

    cli.login(expires_in=-100)

    def no_room() -> None:  # every write to a file fails, as on a full disk (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    done = subprocess.run(
        [console_script(), "balance", "--json"], env=cli.process_env(), capture_output=True, text=True,
        timeout=60, stdin=subprocess.DEVNULL, preexec_fn=no_room,
    )

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"balance_usd": "0.00", "currency": "USD"}
    assert gateway.refresh_count == 1
    assert "warning: cannot write" in done.stderr
    assert "the next command will need `tokenroute login`" in done.stderr


# ------------------------------------------- earlier releases, the hard cases


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make `folder` unwritable: its mode for a user, a read-only bind mount for
    root (whom modes do not stop); skips where neither is possible."""
    if os.geteuid() != 0:
        folder.chmod(0o500)
        try:
            yield
        finally:
            folder.chmod(0o700)
        return
    if subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode != 0:
        pytest.skip("root, and no bind mount here to make a folder read-only")
    try:
        remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True)
        if remount.returncode != 0:
            pytest.skip("root, and no read-only remount here")
        yield
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


@POSIX
def test_a_login_in_a_read_only_paradigx_folder_is_never_copied(cli, gateway, earlier):
    entry = earlier.login_02()
    before = earlier.auth.read_bytes()

    with read_only(earlier.paradigx):
        whoami = cli.run("whoami", "--json")
        logout = cli.run("logout")
        again = cli.run("whoami", "--json")

    assert whoami.code == 1 and last_error(whoami)["code"] == "auth_required"
    assert f"warning: could not take over the earlier release's files: cannot rewrite {earlier.auth}" in whoami.err
    assert earlier.auth.read_bytes() == before
    assert entry["refresh_token"].encode() not in b"".join(files_under(cli.config_dir).values())  # in one place
    assert logout.out == f"Not logged in to {gateway.url}; nothing to do\n"
    assert "tokenroute 0.2.0's login stays there, unused" in logout.err
    assert again.code == 1 and json.loads(cli.credentials.read_text())["logins"] == {}  # logged out of: final


@POSIX
def test_a_key_in_a_read_only_paradigx_folder_is_used_where_it_is_and_never_recorded(cli, gateway, earlier, api_key):
    earlier.key_02_file(api_key)
    cli.login()

    with read_only(earlier.paradigx):
        env = cli.run("env", "--json")
        created = cli.run("keys", "create", "--name", "ci", "--json")  # a write: it cannot leave, so it is not taken

    assert env.json()["OPENAI_API_KEY"] == api_key
    assert created.code == 0 and "Took over" not in created.err, created
    assert earlier.key_02.read_text() == api_key and api_key not in cli.keys_file.read_text()


@POSIX
def test_a_0_1_login_in_a_read_only_folder_says_why_it_is_not_used(cli, gateway, earlier):
    earlier.login_01()

    with read_only(earlier.tokenroute):
        result = cli.run("whoami", "--json")

    assert result.code == 1
    assert last_error(result)["code"] == "config"
    assert "tokenroute 0.1.0" in last_error(result)["message"] and "writable" in last_error(result)["message"]


def test_logout_all_removes_the_0_2_logins_of_every_gateway(cli, gateway, earlier, staging):
    earlier.login_02()  # the default gateway's (`gateway` plays it), never used since the upgrade
    auth = json.loads(earlier.auth.read_text())
    for url in (staging.url, "https://api.tokenroute.example"):  # logged in there again; never used
        auth["tokens"][url] = dict(auth["tokens"][gateway.url], api_url=url, refresh_token=f"rt-{url}")
    earlier.auth.write_text(json.dumps(auth, indent=2))
    login_to(cli, staging)

    result = cli.run("logout", "--all", env={"TOKENROUTE_API_URL": staging.url})

    assert result.code == 0, result
    left = json.loads(earlier.auth.read_text())["tokens"]
    assert list(left) == ["https://api.other-product.example"]
    assert b"rt-" not in b"".join(files_under(cli.home).values())
    assert result.err.endswith(  # another product's login is named, and left as it is
        f"{earlier.auth} still holds a login for https://api.other-product.example that tokenroute cannot tell is "
        "its own (other Paradigx products keep their logins there): it stays there, and tokenroute will not take "
        "it over\n"
    )


@POSIX
def test_the_other_entries_of_auth_json_keep_every_byte(cli, gateway, earlier, tmp_path):
    entry = earlier.login_02()
    data = json.loads(earlier.auth.read_text())
    data["tokens"]["https://api.other-product.example"]["display_name"] = "Zoë"
    real = tmp_path / "dotfiles" / "auth.json"
    real.parent.mkdir()
    text = json.dumps(data, indent=4, ensure_ascii=False)  # not how 0.2.0 wrote it: someone else's editor
    real.write_text(text, encoding="utf-8")
    earlier.auth.unlink()
    earlier.auth.symlink_to(real)

    result = cli.run("whoami", "--json")

    assert result.code == 0, result
    assert earlier.auth.is_symlink()  # updated at its target
    other = text[text.index('"https://api.other-product.example"'):]
    assert real.read_text(encoding="utf-8") == text[:text.index(f'"{gateway.url}"')] + other
    assert entry["refresh_token"] not in real.read_text(encoding="utf-8")


def test_a_host_that_idna_2003_would_change_is_refused(cli, api_key):
    result = cli.run("env", "--key", api_key, env={"TOKENROUTE_API_URL": "https://straße.example"})

    assert result.code == 1
    assert "not a valid http(s) gateway URL" in result.err


@POSIX
def test_a_closed_stderr_does_not_fail_a_command_that_worked(cli, gateway):
    cli.login()

    done = subprocess.run(
        [console_script(), "keys", "create", "--name", "quiet"], env=cli.process_env(), stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True, timeout=60, preexec_fn=lambda: os.close(2),
    )

    assert done.returncode == 0
    assert "Key:" in done.stdout
    assert len(gateway.keys) == 1


def test_login_takes_over_a_0_2_login_even_beside_a_damaged_credentials_file(cli, gateway, earlier):
    entry = earlier.login_02()
    cli.config_dir.mkdir(mode=0o700)
    cli.credentials.write_bytes(b"{broken")

    result = cli.run("login", "--no-browser")

    assert result.code == 0, result
    assert "moved it to" in result.err and "took over the login of tokenroute 0.2.0" in result.err
    assert "/oidc/device/auth" not in [r.path_only for r in gateway.requests]
    assert cli.stored_login()["refresh_token"] == entry["refresh_token"]


def last_error(result: Result) -> dict[str, Any]:
    """The `--json` error, the last line of stderr (warnings may come before it)."""
    return json.loads(result.err.splitlines()[-1])["error"]


@POSIX
def test_a_suggested_command_keeps_the_gateway_given_by_flag(cli, gateway):
    cli.login()
    env = {"TOKENROUTE_API_URL": "https://elsewhere.example"}  # the flag wins; the suggestion must name it too

    result = closed_stdout(cli, "--api-url", gateway.url, "keys", "create", "--name", "ci", "--no-cache", "--json",
                           env=env)

    (key_id,) = gateway.keys
    assert last_error(result)["next"] == f"tokenroute --api-url {gateway.url} keys revoke {key_id}"


def test_a_login_of_the_unversioned_first_cut_is_brought_to_version_2_once(cli, gateway):
    login = cli.login()
    cli.credentials.write_text(json.dumps(login))  # one login, no version: this release before issue 8

    first = cli.run("whoami", "--json")
    second = cli.run("balance", "--json")

    assert (first.code, second.code) == (0, 0), (first, second)
    assert json.loads(cli.credentials.read_text()) == {"version": 2, "logins": {gateway.url: login}}
