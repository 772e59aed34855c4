"""Nothing lost, nothing taken (issue 15): the reference's raw last_key.txt, other
products' logins in the shared ~/.paradigx/auth.json, and signals and locks that
never cost the login.

The earlier releases' files are written as shared/spec/legacy-clients.md
describes them (the Earlier helper of test_state.py); a "user whom file modes
stop" is this user, or root without its power to open any file (setpriv).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Cli, Result, console_script
import fake_gateway
from fake_gateway import FakeGateway
from test_startup import heavy_among, run_profiled
from test_state import (  # noqa: F401
    Earlier, earlier, files_under, foreign_file, gateway6, last_error, login_to, mode, read_only,
)

import tokenroute

POSIX = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes, signals and flock")
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
OTHER_UID = 12345  # a user that owns nothing here


def as_a_user(cli: Cli, *argv: str, env: dict[str, str] | None = None) -> Result:
    """Run the console script as a user whom file modes stop: this one, or, under root,
    root without the capabilities that let it open any file (as any user's process is)."""
    prefix: list[str] = []
    if AS_ROOT:
        setpriv = shutil.which("setpriv")
        drop = "-dac_override,-dac_read_search"
        if setpriv is None or subprocess.run([setpriv, f"--bounding-set={drop}", "true"]).returncode != 0:
            pytest.skip("root, and no setpriv here to drop the power to open any file")
        prefix = [setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}"]
    done = subprocess.run(
        [*prefix, console_script(), *argv], env=cli.process_env(env), capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL,
    )
    return Result(done.returncode, done.stdout, done.stderr)


# ---------------------------------------------- last_key.txt is the raw key


@POSIX
def test_keys_create_caches_the_raw_key_alone_and_its_gateway_in_keys_txt(cli, gateway):
    cli.login()

    created = cli.run("keys", "create", "--name", "laptop", "--json").json()
    exported = subprocess.run(["sh", "-c", 'printf %s "$(cat "$1")"', "sh", str(cli.last_key)],
                              capture_output=True, text=True)

    assert cli.last_key.read_bytes() == created["raw"].encode()  # as 0.1.0 wrote it: no header, no newline
    assert exported.stdout == created["raw"]  # export OPENAI_API_KEY=$(cat ~/.tokenroute/last_key.txt)
    assert cli.keys_file.read_text().splitlines()[1:] == [f"{gateway.url} {created['raw']} {created['id']}"]
    assert (mode(cli.last_key), mode(cli.keys_file)) == (0o600, 0o600)


def full_disk_for(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up just as `path` is replaced (and only then)."""
    replace = os.replace

    def replace_or_fail(source: Any, target: Any) -> None:
        if os.fspath(target) == str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        replace(source, target)

    monkeypatch.setattr(os, "replace", replace_or_fail)


def test_a_key_recorded_in_keys_txt_is_said_to_be_cached_when_only_last_key_txt_fails(cli, gateway, monkeypatch):
    cli.login()
    full_disk_for(cli.last_key, monkeypatch)  # keys.txt, written first, got through

    created = cli.run("keys", "create", "--name", "a", "--json")
    record = cli.keys_file.read_text()
    guide = cli.run("mcp", stdin=b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", '
                                 b'"params": {"name": "keys_create", "arguments": {"name": "agent"}}}\n')
    monkeypatch.undo()

    raw = created.json()["raw"]
    assert created.code == 0, created
    assert f"cannot write {cli.last_key}" in created.err and f"the key is cached in {cli.keys_file} only" in created.err
    assert f"Cached in {cli.keys_file} for env, run, test and models." in created.err
    assert json.loads(guide.out)["result"]["content"][1]["text"] == (
        f"The raw key is shown only this once; cached in {cli.keys_file}.")
    assert raw in record


def test_a_folder_where_last_key_txt_goes_is_set_aside_and_the_key_cached(cli, gateway):
    cli.login()
    cli.last_key.mkdir()

    created = cli.run("keys", "create", "--name", "a", "--json")

    assert created.code == 0 and f"{cli.last_key} could not be read; moved it to" in created.err
    assert cli.last_key.read_text() == created.json()["raw"]


@POSIX
def test_ctrl_c_after_keys_txt_has_the_new_key_says_where_it_is_cached(cli, gateway, monkeypatch):
    cli.login()
    synced: list[int] = []

    def fsync(fd: int) -> None:  # Ctrl-C while last_key.txt, the second file, goes to disk
        synced.append(fd)
        if len(synced) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", fsync)
    result = cli.run("keys", "create", "--name", "a", "--json")
    monkeypatch.undo()

    raw = json.loads(result.out)["raw"]
    assert result.code == 0 and f"interrupted: the key is cached in {cli.keys_file} only" in result.err
    assert cli.run("env", "--json").json()["OPENAI_API_KEY"] == raw


def test_a_key_of_another_gateway_is_never_sent_while_keys_txt_cannot_be_read(cli, gateway, staging, monkeypatch):
    monkeypatch.setattr(tokenroute, "DEFAULT_API_URL", gateway.url)
    login_to(cli, staging)
    stage = cli.run("keys", "create", "--name", "stage", "--json", env={"TOKENROUTE_API_URL": staging.url}).json()
    cli.keys_file.unlink()
    cli.keys_file.mkdir()  # unreadable: last_key.txt's key may be any gateway's

    result = cli.run("models", "--json")

    assert result.code == 1 and result.error()["code"] == "no_key", result
    assert not [r for r in gateway.requests if r.header("Authorization") == f"Bearer {stage['raw']}"]


@pytest.mark.parametrize("record", ["a folder", "a later release's", "emptied"])
def test_a_key_no_readable_keys_txt_places_is_set_aside_by_a_write_never_deleted(cli, gateway, record):
    cli.login()
    cli.config_dir.mkdir(exist_ok=True)
    if record == "a folder":
        cli.keys_file.mkdir()
    else:  # `: > keys.txt` loses the record too: last_key.txt may hold another gateway's mirror
        cli.keys_file.write_text("# tokenroute keys, version 2: gateway key id label\n" if record != "emptied" else "")
    pasted = "sk-tr-PASTEDpastedPASTEDpasted0123456789"
    cli.last_key.write_text(pasted + "\n")

    env = cli.run("env", "--json")  # whose key it is cannot be told: sent to no gateway
    created = cli.run("keys", "create", "--name", "b", "--json")

    assert env.code == 1 and env.error()["code"] == "no_key"
    assert f"so the key in {cli.last_key} could be any gateway's and goes to none" in env.error()["message"]
    assert "holds a key no readable keys.txt places; moved it to" in created.err
    assert pasted.encode() in b"".join(files_under(cli.config_dir).values())  # set aside, not lost
    assert created.code == 0 and cli.last_key.read_text() == created.json()["raw"], created  # keys.txt set aside too


@POSIX
def test_a_revoke_that_cannot_tidy_the_key_cache_still_says_it_revoked(cli, gateway, api_key):
    cli.login()
    key = gateway.add_key(name="old")
    cli.last_key.mkdir()  # unusable: to be set aside, in a folder that takes nothing now
    (cli.config_dir / "credentials.lock").touch()

    with read_only(cli.config_dir):
        result = cli.run("keys", "revoke", key["id"], "--json")

    assert result.code == 0 and result.json()["status"] == "revoked", result
    assert "the revoked key may still be cached" in result.err
    assert gateway.keys[key["id"]]["status"] == "revoked"


def test_forgetting_keys_while_keys_txt_cannot_be_read_says_they_may_stay(cli, gateway):
    cli.login()
    raw = cli.run("keys", "create", "--name", "a", "--json").json()["raw"]
    record = cli.keys_file.read_text()
    cli.keys_file.unlink()
    cli.keys_file.mkdir()

    result = cli.run("logout", "--forget-key")

    assert result.code == 0 and result.out == f"OK logged out of {gateway.url}\n"
    assert f"warning: {cli.keys_file} is not a file; moved it to" in result.err
    assert f"warning: {cli.last_key} holds a key no readable keys.txt places; moved it to" in result.err
    assert raw in record and not cli.last_key.exists()  # never read again, nor lost
    assert raw.encode() in b"".join(files_under(cli.config_dir).values())


@POSIX
def test_logout_forget_key_says_what_it_forgot_when_0_2_s_key_stays(cli, gateway, earlier):
    mine, older = gateway.add_key(name="mine"), gateway.add_key(name="from-0.2")
    cli.cache_key(mine["raw"], mine["id"])
    earlier.key_02_file(older["raw"])

    with read_only(earlier.paradigx):
        result = cli.run("logout", "--forget-key")

    assert result.code == 0
    assert result.out == f"OK forgot the cached API key of {gateway.url} (not logged in)\n"
    assert f"warning: the API key in {earlier.key_02} cannot be removed" in result.err


def test_revoke_names_the_file_its_key_was_removed_from(cli, gateway, staging):
    login_to(cli, gateway)
    login_to(cli, staging)
    here = cli.run("keys", "create", "--name", "a", "--json").json()
    cli.run("keys", "create", "--name", "b", env={"TOKENROUTE_API_URL": staging.url})  # last_key.txt: b

    revoked = cli.run("keys", "revoke", here["id"])

    assert f"Removed it from the key cache ({cli.keys_file})." in revoked.err


def test_each_gateway_keeps_its_key_and_last_key_txt_holds_the_newest(cli, gateway, staging):
    login_to(cli, gateway)
    login_to(cli, staging)
    prod = cli.run("keys", "create", "--name", "prod", "--json").json()
    stage = cli.run("keys", "create", "--name", "stage", "--json", env={"TOKENROUTE_API_URL": staging.url}).json()

    here = cli.run("env", "--json")
    there = cli.run("env", "--json", env={"TOKENROUTE_API_URL": staging.url})

    assert cli.last_key.read_text() == stage["raw"]
    assert here.json()["OPENAI_API_KEY"] == prod["raw"]
    assert there.json()["OPENAI_API_KEY"] == stage["raw"]
    assert (here.err, there.err) == ("", "")


def test_a_key_pasted_into_last_key_txt_is_only_ever_the_default_gateways(cli, gateway, staging, monkeypatch):
    monkeypatch.setattr(tokenroute, "DEFAULT_API_URL", gateway.url)  # where a key from the dashboard comes from
    login_to(cli, gateway)
    login_to(cli, staging)
    cli.run("keys", "create", "--name", "older", "--json")
    pasted = gateway.add_key(name="from-the-dashboard")["raw"]
    cli.last_key.write_text(pasted + "\n")  # echo KEY > ~/.tokenroute/last_key.txt
    before = files_under(cli.config_dir)

    elsewhere = cli.run("models", "--json", env={"TOKENROUTE_API_URL": staging.url})
    here = cli.run("models", "--json")
    env = cli.run("env")

    assert elsewhere.code == 1 and elsewhere.error()["code"] == "no_key"
    assert (f"the key in {cli.last_key} names no gateway, so it is taken for {gateway.url} only; to use it here, "
            "pass it with --key or TOKENROUTE_API_KEY") in elsewhere.error()["message"]
    assert [r for r in staging.requests if r.path_only.startswith("/v1")] == []  # never sent elsewhere
    assert here.code == 0 and gateway.requests[-1].header("Authorization") == f"Bearer {pasted}"  # it replaces the older
    assert (env.err, env.out.splitlines()[0]) == ("", f"OPENAI_API_KEY={pasted}")
    assert files_under(cli.config_dir) == before  # reading records nothing: the person's file, as they wrote it


@pytest.mark.parametrize("argv", [["env"], ["doctor"], ["keys", "list"], ["models"], ["test"]],
                         ids=["env", "doctor", "keys list", "models", "test (402)"])
@pytest.mark.parametrize("where", ["default", "elsewhere"])
def test_a_command_that_reads_never_records_or_moves_a_pasted_key(cli, gateway, staging, monkeypatch, argv, where):
    monkeypatch.setattr(tokenroute, "DEFAULT_API_URL", gateway.url)
    pasted = gateway.add_key(name="empty", balance_usd="0.00")["raw"]  # `test` gets a 402 with it
    login_to(cli, gateway)
    login_to(cli, staging)
    cli.last_key.write_text(pasted)
    before = files_under(cli.home)

    result = cli.run(*argv, env={"TOKENROUTE_API_URL": staging.url} if where == "elsewhere" else None)

    assert "Traceback" not in result.err, result
    assert files_under(cli.home) == before
    assert pasted not in "".join(r.header("Authorization") or "" for r in staging.requests)


def test_a_write_to_the_key_cache_records_a_pasted_key_for_the_default_gateway_first(cli, gateway, staging,
                                                                                      monkeypatch):
    monkeypatch.setattr(tokenroute, "DEFAULT_API_URL", gateway.url)
    login_to(cli, staging)
    pasted = gateway.add_key(name="from-the-dashboard")["raw"]
    cli.config_dir.mkdir(exist_ok=True)
    cli.last_key.write_text(pasted + "\n")

    stage = {"TOKENROUTE_API_URL": staging.url}
    uncached = cli.run("keys", "revoke", staging.add_key(name="other")["id"], env=stage)  # no cache change: no write
    untouched = cli.last_key.read_text()
    created = cli.run("keys", "create", "--name", "stage", "--json", env=stage)
    forget = cli.run("logout", "--forget-key", env=stage)

    assert uncached.code == 0 and untouched == pasted + "\n"
    assert created.code == 0, created
    assert (f"Recorded the API key {pasted[:10]}... in {cli.last_key} (it names no gateway: pasted, or tokenroute "
            f"0.1.0's) as {gateway.url}'s, in {cli.keys_file}.") in created.err
    assert forget.out == f"OK logged out of {staging.url} and forgot the cached API key\n"
    assert cli.cached_key() == pasted and not cli.last_key.exists()  # it held staging's key: none in its place
    assert cli.run("env").out.splitlines()[0] == f"OPENAI_API_KEY={pasted}"


def test_a_last_key_txt_with_a_comment_is_no_1_0_0_file_and_is_set_aside_never_lost(cli, gateway, monkeypatch):
    monkeypatch.setattr(tokenroute, "DEFAULT_API_URL", gateway.url)
    cli.login()
    key = gateway.add_key(name="from-the-dashboard")["raw"]
    cli.config_dir.mkdir(exist_ok=True)
    text = f"# from the dashboard\n{key}\n"
    cli.last_key.write_text(text)

    env = cli.run("env", "--json")
    created = cli.run("keys", "create", "--name", "ci", "--json")

    assert env.code == 1 and env.error()["code"] == "no_key"  # no key tokenroute can read; nothing moved
    assert not cli.keys_file.exists() or key not in cli.keys_file.read_text()
    (aside,) = cli.config_dir.glob("last_key.txt.damaged-*")
    assert aside.read_text() == text and "is not in a format this release knows" in created.err
    assert cli.last_key.read_text() == created.json()["raw"]


CRASH = """
import os, sys
import tokenroute
name, count = os.environ["KILL_AFTER"].split(":")
if os.environ.get("KILL_DEFAULT"):
    tokenroute.DEFAULT_API_URL = os.environ["KILL_DEFAULT"]  # the test's gateway plays the default one
real, done = tokenroute.replace_file, []
def replace_file(path, data, **settings):
    real(path, data, **settings)
    if os.path.basename(path) == name:
        done.append(path)
        if len(done) == int(count):
            os._exit(137)  # as `kill -9` right there
tokenroute.replace_file = replace_file
sys.exit(tokenroute.main(sys.argv[1:]))
"""


def killed_after(cli: Cli, write: str, *argv: str, default: str = "", env: dict[str, str] | None = None) -> Result:
    """Run tokenroute ARGV in a process killed right after it has replaced the file named in
    `write` ("NAME:N", its Nth replacement), as `kill -9` would; `default`: the default gateway."""
    done = subprocess.run([sys.executable, "-c", CRASH, *argv], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL,
                          env=cli.process_env({**(env or {}), "KILL_AFTER": write, "KILL_DEFAULT": default}))
    return Result(done.returncode, done.stdout, done.stderr)


@pytest.mark.parametrize("moment", ["keys.txt:1", "last_key.txt:1"])
def test_a_kill_between_the_key_files_never_sends_a_key_to_another_gateway(cli, gateway, staging, monkeypatch, moment):
    monkeypatch.setattr(tokenroute, "DEFAULT_API_URL", gateway.url)
    login_to(cli, gateway)
    login_to(cli, staging)
    prod = cli.run("keys", "create", "--name", "prod", "--json").json()
    stage = cli.run("keys", "create", "--name", "stage", "--json", env={"TOKENROUTE_API_URL": staging.url}).json()

    killed = killed_after(cli, moment, "keys", "create", "--name", "stage2", "--json",
                          default=gateway.url, env={"TOKENROUTE_API_URL": staging.url})
    here, there = cli.run("env", "--json"), cli.run("env", "--json", env={"TOKENROUTE_API_URL": staging.url})

    assert killed.code == 137, killed
    (stage2,) = [key for key in staging.keys.values() if key["name"] == "stage2"]
    assert here.json()["OPENAI_API_KEY"] == prod["raw"]  # never staging's older key, which last_key.txt held
    assert there.json()["OPENAI_API_KEY"] == stage2["raw"]  # keys.txt, written first, has the word
    assert stage["raw"].encode() not in b"".join(files_under(cli.config_dir).values())
    assert cli.run("keys", "create", "--name", "next", "--json").code == 0  # the next write brings last_key.txt back
    assert cli.last_key.read_text() == cli.cached_key()


def test_a_kill_while_1_0_0_s_key_file_is_converted_loses_no_key(cli, gateway, staging, monkeypatch):
    monkeypatch.setattr(tokenroute, "DEFAULT_API_URL", gateway.url)
    prod, stage = gateway.add_key(name="prod"), staging.add_key(name="stage")
    cli.config_dir.mkdir(mode=0o700)
    cli.last_key.write_text(
        "# tokenroute: the newest API key created on each gateway (gateway, key, key id)\n"
        f"{gateway.url} {prod['raw']} {prod['id']}\n{staging.url} {stage['raw']} {stage['id']}\n"
    )

    killed = killed_after(cli, "keys.txt:1", "env", "--json", default=gateway.url)
    again = cli.run("env", "--json")
    there = cli.run("env", "--json", env={"TOKENROUTE_API_URL": staging.url})

    assert killed.code == 137, killed
    assert again.json()["OPENAI_API_KEY"] == prod["raw"] and "moved the cached keys" in again.err  # converted again
    assert there.json()["OPENAI_API_KEY"] == stage["raw"]
    assert cli.last_key.read_text() == prod["raw"]


def test_last_key_txt_of_1_0_0_is_converted_once_and_no_key_is_lost(cli, gateway, staging):
    login_to(cli, staging)
    prod, stage = gateway.add_key(name="prod"), staging.add_key(name="stage")
    cli.last_key.write_text(  # exactly as 1.0.0 wrote it
        "# tokenroute: the newest API key created on each gateway (gateway, key, key id)\n"
        f"{gateway.url} {prod['raw']} {prod['id']}\n{staging.url} {stage['raw']} {stage['id']}\n"
    )

    first = cli.run("env", "--json")
    second = cli.run("env", "--json", env={"TOKENROUTE_API_URL": staging.url})

    assert first.json()["OPENAI_API_KEY"] == prod["raw"]
    assert f"moved the cached keys to {cli.keys_file}" in first.err
    assert cli.last_key.read_text() == prod["raw"]
    assert second.json()["OPENAI_API_KEY"] == stage["raw"] and second.err == ""
    assert cli.keys_file.read_text().splitlines()[1:] == [
        f"{staging.url} {stage['raw']} {stage['id']}", f"{gateway.url} {prod['raw']} {prod['id']}"]
    revoked = cli.run("keys", "revoke", stage["id"], env={"TOKENROUTE_API_URL": staging.url})
    assert "Removed it from the key cache" in revoked.err  # the id came along


def test_keys_list_names_1_0_0_s_file_as_where_the_key_in_use_is_until_it_is_converted(cli, gateway):
    cli.login()
    prod = gateway.add_key(name="prod")
    cli.last_key.write_text(  # exactly as 1.0.0 wrote it; nothing has converted it yet
        f"# tokenroute: the newest API key created on each gateway (gateway, key, key id)\n"
        f"{gateway.url} {prod['raw']} {prod['id']}\n")

    listed = cli.run("keys", "list")

    assert listed.err == f"In use: the key env, run, test and models use (from {cli.last_key}).\n"
    assert not cli.keys_file.exists()


@POSIX
def test_env_write_in_a_folder_that_takes_no_new_file_says_so_and_how_to_append(cli, gateway, api_key, tmp_path):
    folder = tmp_path / "etc-app"
    folder.mkdir()
    dotenv = folder / ".env"
    dotenv.write_text("A=1\n")
    folder.chmod(0o500)  # the file itself stays writable
    try:
        result = as_a_user(cli, "env", "--write", str(dotenv), env={"TOKENROUTE_API_KEY": api_key})
    finally:
        folder.chmod(0o700)

    assert result.code == 1 and dotenv.read_text() == "A=1\n"
    assert result.err == (
        f"error: cannot write {dotenv}: Permission denied in {folder}, which must take the new file that replaces it "
        f"whole (so that a crash never leaves it half-written); the same command with `>> {dotenv}` in place of "
        f"`--write {dotenv}` appends instead\n")


def test_a_key_file_that_cannot_be_read_is_named_not_taken_for_no_key(cli, gateway):
    cli.config_dir.mkdir(mode=0o700)
    cli.keys_file.mkdir()  # not a file; another user's file reads the same

    result = cli.run("env", "--json")

    assert result.code == 1 and result.error()["code"] == "no_key"
    assert (f"{cli.keys_file} cannot be used (not a file, unreadable here, emptied, or a later release's)"
            in result.error()["message"])


@pytest.mark.parametrize("content", [b"sk-tr-pastedKEY123\r\n", b"sk-tr-fromZeroOneZero", None],
                         ids=["pasted", "0.1.0", "tokenroute's"])
def test_keys_create_no_cache_leaves_last_key_txt_byte_for_byte(cli, gateway, content):
    cli.login()
    if content is None:
        cli.cache_key("sk-tr-cachedBEFORE", "key_before")
        content = cli.last_key.read_bytes()
    else:
        cli.last_key.write_bytes(content)
    listed = cli.keys_file.read_bytes() if cli.keys_file.exists() else None

    result = cli.run("keys", "create", "--name", "ci", "--no-cache", "--json")

    assert result.code == 0, result
    assert cli.last_key.read_bytes() == content
    assert (cli.keys_file.read_bytes() if cli.keys_file.exists() else None) == listed


def test_revoking_the_newest_key_removes_it_from_last_key_txt_and_keeps_the_others(cli, gateway, staging):
    login_to(cli, gateway)
    login_to(cli, staging)
    prod = cli.run("keys", "create", "--name", "prod", "--json").json()
    stage = cli.run("keys", "create", "--name", "stage", "--json", env={"TOKENROUTE_API_URL": staging.url}).json()

    cli.run("keys", "revoke", stage["id"], env={"TOKENROUTE_API_URL": staging.url})

    assert not cli.last_key.exists()  # it held the revoked key; it never holds another gateway's in its place
    assert cli.run("env").out.splitlines()[0] == f"OPENAI_API_KEY={prod['raw']}"
    assert stage["raw"].encode() not in b"".join(files_under(cli.config_dir).values())


def test_env_with_a_cached_key_imports_nothing_heavy(tmp_path):
    folder = tmp_path / "config"
    folder.mkdir(mode=0o700)
    key = "sk-tr-abc123"
    (folder / "last_key.txt").write_text(key)
    (folder / "keys.txt").write_text(f"{tokenroute.KEYS_HEADER}\nhttps://gateway.example.com {key} key_1\n")

    out, modules = run_profiled([console_script(), "env"], tmp_path)

    assert out == f"OPENAI_API_KEY={key}\nOPENAI_BASE_URL=https://gateway.example.com/v1\n"
    assert heavy_among(modules) == []


@POSIX
@pytest.mark.parametrize("owner", ["this user, mode 000", "another user"])
def test_a_key_file_that_cannot_be_read_is_set_aside_never_overwritten(cli, gateway, owner):
    cli.login()
    cli.cache_key("sk-tr-madeUnderSudo", "key_sudo")
    for path in (cli.last_key, cli.keys_file):
        if owner == "another user":
            if not AS_ROOT:
                pytest.skip("making a file another user's needs root")
            os.chown(path, OTHER_UID, OTHER_UID)
        path.chmod(0o000)

    result = as_a_user(cli, "keys", "create", "--name", "ci", "--json")

    assert result.code == 0, result
    asides = sorted(cli.config_dir.glob("*.damaged-*"))
    assert [p.name.partition(".damaged-")[0] for p in asides] == ["keys.txt", "last_key.txt"]
    for aside in asides:
        aside.chmod(0o600)
    assert all(b"sk-tr-madeUnderSudo" in aside.read_bytes() for aside in asides)
    assert cli.last_key.read_text() == result.json()["raw"]


@POSIX
def test_a_fifo_where_a_file_should_be_is_refused_not_waited_on(cli, gateway, earlier):
    cli.config_dir.mkdir(mode=0o700)
    earlier.paradigx.mkdir()
    for path in (cli.credentials, cli.last_key, cli.keys_file, earlier.auth, earlier.key_02):
        os.mkfifo(path)  # no writer: opening one to read would wait for ever
    gateway.auto_approve, gateway.interval = True, 1  # a subprocess polls on the real clock

    env = cli.script("env", "--json", timeout=30)
    whoami = cli.script("whoami", "--json", timeout=30)
    login = cli.script("login", "--no-browser", timeout=30)

    assert env.code == 1 and env.error()["code"] == "no_key", env
    assert whoami.code == 1 and "not a regular file" in whoami.error()["message"], whoami
    assert login.code == 0 and "moved it to" in login.err, login
    assert earlier.auth.is_fifo() and earlier.key_02.is_fifo()  # not ours to remove: they hold nothing of ours
    created = cli.script("keys", "create", "--name", "ci", "--json", timeout=30)
    assert created.code == 0 and cli.last_key.read_text() == created.json()["raw"], created


# ---------------------------------------- another product's login stays its own


def other_products_entry(api_url: str) -> dict[str, Any]:
    """A login of another Paradigx CLI: the same identity provider, the same shape."""
    return {"access_token": "other-access", "refresh_token": "other-refresh", "expires_at": 1764540000,
            "issuer": "https://auth.paradigx.com", "client_id": "other-cli", "resource": api_url,
            "api_url": api_url, "token_endpoint": None}


@pytest.mark.parametrize("answer", ["its own client", "no discovery"])
def test_another_products_login_at_the_url_in_use_is_never_taken(cli, gateway, staging, earlier, answer):
    earlier.paradigx.mkdir()
    earlier.auth.write_text(json.dumps({"version": 1, "tokens": {staging.url: other_products_entry(staging.url)}},
                                       indent=2))
    before = earlier.auth.read_bytes()
    if answer == "no discovery":  # a server that is no tokenroute gateway
        staging.fail("/api/v1/auth/discovery", status=404, body={"detail": "Not Found"}, count=99)
    mistyped = {"TOKENROUTE_API_URL": staging.url}

    whoami = cli.run("whoami", "--json", env=mistyped)
    logout = cli.run("--api-url", staging.url, "logout")  # what `logout --all`'s hint says to run

    assert whoami.code == 1 and last_error(whoami)["code"] == "auth_required"
    assert logout.out == f"Not logged in to {staging.url}; nothing to do\n"
    assert earlier.auth.read_bytes() == before
    assert json.loads(cli.credentials.read_text()) == {"version": 2, "logins": {}, "logged_out": [staging.url]}


@pytest.mark.parametrize("then", [["whoami", "--json"], ["logout"]])
def test_logging_in_at_another_products_url_by_mistake_never_takes_its_login(cli, gateway, staging, earlier, then):
    """Another product built like tokenroute: its server's discovery names the client its own
    login holds, so a login tokenroute makes there by mistake names it too, and vouches for nothing."""
    entry = dict(other_products_entry(staging.url), client_id=fake_gateway.CLIENT_ID, issuer=staging.url + "/oidc",
                 token_endpoint=staging.url + "/oidc/token")
    earlier.paradigx.mkdir()
    earlier.auth.write_text(json.dumps({"version": 1, "tokens": {staging.url: entry}}, indent=2))
    before = earlier.auth.read_bytes()
    assert login_to(cli, staging).code == 0  # the mistyped TOKENROUTE_API_URL

    result = cli.run(*then, env={"TOKENROUTE_API_URL": staging.url})

    assert result.code == 0, result
    assert earlier.auth.read_bytes() == before


def test_logout_all_never_removes_another_products_login_at_a_gateway_it_knows(cli, gateway, staging, earlier):
    entry = earlier.login_02()
    data = json.loads(earlier.auth.read_text())
    data["tokens"]["https://api.staging.example"] = other_products_entry(staging.url)
    earlier.auth.write_text(json.dumps(data, indent=2))
    login_to(cli, staging)
    other = earlier.auth.read_text()[earlier.auth.read_text().index('"https://api.other-product.example"'):]

    result = cli.run("logout", "--all")

    assert result.code == 0, result
    left = json.loads(earlier.auth.read_text())["tokens"]
    assert list(left) == ["https://api.other-product.example", "https://api.staging.example"]
    assert earlier.auth.read_text().endswith(other)
    assert entry["refresh_token"].encode() not in b"".join(files_under(cli.home).values())


@POSIX
def test_auth_json_written_with_crlf_keeps_its_line_ends(cli, gateway, earlier):
    entry = earlier.login_02()
    data = json.loads(earlier.auth.read_text())
    earlier.auth.write_bytes(json.dumps(data, indent=2).replace("\n", "\r\n").encode())  # 0.2.0 on Windows
    del data["tokens"][gateway.url]

    result = cli.run("whoami", "--json")

    assert result.code == 0, result
    assert earlier.auth.read_bytes() == json.dumps(data, indent=2).replace("\n", "\r\n").encode()
    assert cli.stored_login()["refresh_token"] == entry["refresh_token"]


@pytest.mark.parametrize("place", [0, 1, 3], ids=["first", "middle", "last"])
def test_auth_json_with_three_or_more_other_entries_keeps_its_own_separators_and_indent(cli, gateway, earlier, place):
    entry = earlier.login_02()
    members = [f'"https://p{n}.example":{json.dumps(other_products_entry(f"https://p{n}.example"), indent=n)}'
               for n in range(1, 4)]
    members.insert(place, f'"{gateway.url}": {json.dumps(entry)}')
    separators = [",\n\t", " , ", ",\r\n      "]
    text = '{"version": 1,\n "tokens": {  ' + "".join(m + s for m, s in zip(members, separators + [""])) + "\n }\n}\n"
    earlier.auth.write_bytes(text.encode())
    # the entry goes with the separator that followed it (the last one: that before it); every other byte stays
    cut = members[place] + separators[place] if place < 3 else separators[2] + members[3]

    result = cli.run("whoami", "--json")

    assert result.code == 0, result
    assert earlier.auth.read_bytes() == text.replace(cut, "", 1).encode()
    assert cli.stored_login()["refresh_token"] == entry["refresh_token"]


def test_a_repeated_tokens_member_never_leaves_the_login_in_two_places(cli, gateway, earlier):
    entry = earlier.login_02()
    data = json.loads(earlier.auth.read_text())
    stale = dict(entry, refresh_token="rt-stale-copy")
    other = json.dumps(data["tokens"]["https://api.other-product.example"])
    text = (f'{{"version": 1, "tokens": {{"{gateway.url}": {json.dumps(stale)}}},\n'  # a JSON reader sees the last
            f' "tokens": {{"{gateway.url}": {json.dumps(entry)}, "https://api.other-product.example": {other}}}}}\n')
    earlier.auth.write_text(text)

    result = cli.run("whoami", "--json")

    assert result.code == 0, result
    assert gateway.requests[-1].header("Authorization") == f"Bearer {entry['access_token']}"
    every_file = b"".join(files_under(cli.home).values())
    assert every_file.count(entry["refresh_token"].encode()) == 1 and b"rt-stale-copy" not in every_file
    assert earlier.auth.read_text() == (
        '{"version": 1, "tokens": {},\n'
        f' "tokens": {{"https://api.other-product.example": {other}}}}}\n')


@POSIX
def test_a_symlinked_auth_json_in_a_folder_that_cannot_be_written_is_never_copied(cli, gateway, earlier, tmp_path):
    entry = earlier.login_02()
    real = tmp_path / "dotfiles" / "auth.json"
    real.parent.mkdir()
    shutil.move(str(earlier.auth), str(real))
    earlier.auth.symlink_to(real)
    before = real.read_bytes()

    with read_only(real.parent):
        result = cli.run("whoami", "--json")

    assert result.code == 1 and last_error(result)["code"] == "auth_required"
    assert f"could not take over the earlier release's files: cannot rewrite {real}: " in result.err
    assert real.read_bytes() == before
    assert entry["refresh_token"].encode() not in b"".join(files_under(cli.config_dir).values())


@POSIX
def test_a_0_2_key_that_cannot_be_removed_is_never_said_to_be_forgotten(cli, gateway, earlier):
    """0.2.0's key file in a folder this user cannot write: reads still use the key, so logout
    --forget-key and keys revoke do their work, say so, and warn that it stays."""
    key = gateway.add_key(name="from-0.2")
    earlier.key_02_file(key["raw"])
    cli.login()

    with read_only(earlier.paradigx):
        revoke = cli.run("keys", "revoke", key["id"], "--json")
        logout = cli.run("logout", "--forget-key", "--json")
        env = cli.run("env", "--json")

    stays = (f"warning: the API key in {earlier.key_02} cannot be removed ({earlier.paradigx} cannot be written), so "
             "env, run, test and models still use it: delete that file\n")
    assert revoke.code == 0 and revoke.json()["status"] == "revoked" and revoke.err.endswith(stays), revoke
    assert gateway.keys[key["id"]]["status"] == "revoked"
    assert logout.code == 0 and logout.json() == {"logged_out": True, "api_url": gateway.url, "cached_keys": [gateway.url]}
    assert logout.err.endswith(stays), logout
    assert env.json()["OPENAI_API_KEY"] == key["raw"]  # as said


def test_logout_leaves_the_logins_waiting_for_other_gateways(cli, gateway, staging):
    cli.run("login", "--no-wait", env={"TOKENROUTE_API_URL": staging.url})
    cli.run("login", "--no-wait")

    assert cli.run("logout").code == 0
    staging.approve()

    assert cli.run("login", "--resume", "--json", env={"TOKENROUTE_API_URL": staging.url}).json()["status"] == "logged_in"
    assert cli.run("login", "--resume", "--json").error()["code"] == "no_pending_login"


def test_a_0_2_login_of_an_internationalised_gateway_is_found_like_an_ascii_one(cli, gateway, earlier):
    login = cli.login()
    punycode = "https://xn--bcher-kva.example"
    cli.credentials.write_text(json.dumps({"version": 2, "logins": {punycode: dict(login, api_url=punycode)}}))
    entry = earlier.login_02()
    data = json.loads(earlier.auth.read_text())
    data["tokens"]["https://bücher.example"] = dict(data["tokens"].pop(gateway.url), api_url="https://bücher.example/")
    earlier.auth.write_text(json.dumps(data, indent=2))  # 0.2.0 wrote the host as typed, JSON-escaped
    assert "\\u00fc" in earlier.auth.read_text()

    result = cli.run("logout", env={"TOKENROUTE_API_URL": "https://Bücher.example"})

    assert result.out == f"OK logged out of {punycode}\n"
    assert list(json.loads(earlier.auth.read_text())["tokens"]) == ["https://api.other-product.example"]
    assert entry["refresh_token"].encode() not in b"".join(files_under(cli.home).values())


def test_a_0_2_login_of_an_internationalised_gateway_is_taken_over(cli, gateway, earlier, monkeypatch):
    monkeypatch.setattr(tokenroute, "DEFAULT_API_URL", gateway.url)  # whose discovery names tokenroute's client
    entry = earlier.login_02()
    data = json.loads(earlier.auth.read_text())
    unicode = "https://bücher.example"  # 0.2.0 wrote the host as typed in api_url and resource, JSON-escaped
    data["tokens"][unicode] = dict(data["tokens"].pop(gateway.url), api_url=unicode, resource=unicode)
    earlier.auth.write_text(json.dumps(data, indent=2))
    proxy = {"HTTPS_PROXY": gateway.recorder.url, "NO_PROXY": ""}  # no such host: the tunnel is only recorded

    result = cli.run("whoami", env={"TOKENROUTE_API_URL": unicode, **proxy})

    assert "took over the login of tokenroute 0.2.0" in result.err, result
    stored = json.loads(cli.credentials.read_text())["logins"]["https://xn--bcher-kva.example"]
    assert (stored["refresh_token"], stored["resource"]) == (entry["refresh_token"], "https://xn--bcher-kva.example")
    assert list(json.loads(earlier.auth.read_text())["tokens"]) == ["https://api.other-product.example"]


@pytest.mark.parametrize("logged_in", [False, True], ids=["taken over", "superseded"])
def test_a_0_2_login_of_an_ipv6_gateway_is_found_however_0_2_spelled_it(tmp_path, gateway6, logged_in, monkeypatch):
    monkeypatch.setattr(tokenroute, "DEFAULT_API_URL", gateway6.url)
    cli = Cli(gateway6, tmp_path)
    earlier = Earlier(cli, gateway6)
    if logged_in:  # a login of this release names its client and issuer: the identity provider may live anywhere
        new = dict(cli.login(), issuer="https://auth.paradigx.example")
        cli.write_login(new)
    entry = earlier.login_02()
    data = json.loads(earlier.auth.read_text())
    spelled = gateway6.url.replace("[::1]", "[0:0:0:0:0:0:0:1]")
    data["tokens"][spelled] = dict(data["tokens"].pop(gateway6.url), api_url=spelled)
    if logged_in:
        data["tokens"][spelled].update(issuer="https://auth.paradigx.example", token_endpoint=None)
    earlier.auth.write_text(json.dumps(data, indent=2))

    result = cli.run("whoami", "--json")

    assert result.code == 0, result
    assert cli.stored_login()["refresh_token"] == (new if logged_in else entry)["refresh_token"]
    assert list(json.loads(earlier.auth.read_text())["tokens"]) == ["https://api.other-product.example"]


def test_logout_is_final_beside_a_damaged_credentials_file_and_a_0_2_login(cli, gateway, earlier):
    entry = earlier.login_02()
    other = earlier.other_entry_text()
    cli.config_dir.mkdir(mode=0o700)
    cli.credentials.write_bytes(b"{broken")

    logout = cli.run("logout")
    whoami = cli.run("whoami", "--json")

    assert logout.code == 0, logout
    assert logout.out == f"OK logged out of {gateway.url}\n"
    assert whoami.code == 1 and whoami.error()["code"] == "auth_required"
    assert list(json.loads(earlier.auth.read_text())["tokens"]) == ["https://api.other-product.example"]
    assert earlier.other_entry_text() == other
    assert entry["refresh_token"].encode() not in b"".join(files_under(cli.home).values())


@pytest.mark.parametrize("failure", ["offline", "503", "500"])
def test_logout_is_final_when_nothing_can_vouch_for_the_0_2_login(cli, gateway, earlier, failure):
    entry = earlier.login_02()
    before = earlier.auth.read_bytes()
    if failure == "offline":
        gateway.fail("/api/v1/auth/discovery", close=True, count=99)
    else:  # the gateway's discovery failing says nothing about whose login it is
        gateway.fail("/api/v1/auth/discovery", status=int(failure), count=99)

    logout = cli.run("logout", "--json")
    gateway.clear_faults()
    asked = len(gateway.requests)
    whoami = cli.run("whoami", "--json")

    assert (logout.code, logout.json()["logged_out"]) == (0, False), logout
    assert (f"{earlier.auth} still holds a login for {gateway.url} that tokenroute cannot tell is its own "
            f"({gateway.url} could not be asked: ") in logout.err
    assert "it stays there, and tokenroute will not take it over" in logout.err
    assert whoami.code == 1 and last_error(whoami)["code"] == "auth_required"
    assert len(gateway.requests) == asked  # logged out of: nothing to judge, nothing asked
    assert earlier.auth.read_bytes() == before
    assert entry["refresh_token"].encode() not in b"".join(files_under(cli.config_dir).values())
    assert login_to(cli, gateway).code == 0  # `login` logs in anew, and clears the record
    assert "logged_out" not in json.loads(cli.credentials.read_text())
    assert cli.run("whoami", "--json").code == 0
    assert list(json.loads(earlier.auth.read_text())["tokens"]) == ["https://api.other-product.example"]


def test_the_takeover_after_a_re_login_never_overwrites_the_newer_login(cli, gateway, earlier):
    old = earlier.login_02()
    new = cli.login()  # logged in again with this release, before the takeover could happen

    result = cli.run("whoami", "--json")

    assert result.code == 0, result
    assert gateway.requests[-1].header("Authorization") == f"Bearer {new['access_token']}"
    assert cli.stored_login() == new
    assert list(json.loads(earlier.auth.read_text())["tokens"]) == ["https://api.other-product.example"]
    assert old["refresh_token"].encode() not in b"".join(files_under(cli.home).values())


# ------------------------------------------- signals and locks never cost the login


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.02)


def default_signals() -> None:
    """In the child, before it runs: every signal acts as by default (the suite itself may run with
    SIGINT ignored, as a background job of a script does), and SIGQUIT dumps no core."""
    import resource

    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@POSIX
@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT"])
def test_a_signal_during_a_refresh_waits_until_the_rotated_token_is_saved(cli, gateway, name):
    number = getattr(signal, name)
    old = cli.login(expires_in=-100)
    gateway.slow("/oidc/token", 1.5, method="POST")
    process = subprocess.Popen([console_script(), "balance"], env=cli.process_env(), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    try:
        wait_for(lambda: any(r.path_only == "/oidc/token" for r in gateway.requests), "the refresh")
        process.send_signal(number)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    wait_for(lambda: gateway.refresh_count == 1, "the rotation")

    assert process.returncode == (130 if number == signal.SIGINT else -number), err
    assert "finishing the login refresh first" in err
    assert cli.stored_login()["refresh_token"] != old["refresh_token"]
    assert cli.run("balance").code == 0  # the rotated token was saved: the login lives
    assert gateway.revoked_logins == 0


@POSIX
def test_a_signal_ignored_when_the_refresh_starts_stays_ignored(cli, gateway):
    cli.login(expires_in=-100)
    gateway.slow("/oidc/token", 1.5, method="POST")

    def as_nohup() -> None:  # `nohup tokenroute ...`, or a background job of a script: SIGINT ignored
        default_signals()
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    process = subprocess.Popen([console_script(), "balance", "--json"], env=cli.process_env(), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_nohup)
    try:
        wait_for(lambda: any(r.path_only == "/oidc/token" for r in gateway.requests), "the refresh")
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()

    assert (process.returncode, err) == (0, ""), err  # it did nothing, as before the hold
    assert json.loads(out)["currency"] == "USD"


def test_a_refresh_off_the_main_thread_holds_no_signal_and_works(cli, gateway):
    cli.login(expires_in=-100)
    results: list[Result] = []
    handler = signal.getsignal(signal.SIGINT)

    worker = threading.Thread(target=lambda: results.append(cli.run("balance", "--json")))
    worker.start()
    worker.join(60)

    assert results and results[0].code == 0, results
    assert gateway.refresh_count == 1
    assert signal.getsignal(signal.SIGINT) is handler


@POSIX
@pytest.mark.parametrize("owner", ["this user, mode 000", "another user", "a folder"])
def test_a_lock_file_this_user_cannot_open_is_set_aside_and_login_works(cli, gateway, owner):
    cli.config_dir.mkdir(mode=0o700)
    lock = cli.config_dir / "credentials.lock"
    if owner == "a folder":
        lock.mkdir()
    else:
        lock.write_bytes(b"")
    if owner == "another user":  # left by `sudo tokenroute ...` with HOME kept
        if not AS_ROOT:
            pytest.skip("making a file another user's needs root")
        os.chown(lock, OTHER_UID, OTHER_UID)
        lock.chmod(0o600)
    elif owner == "this user, mode 000":
        lock.chmod(0o000)
    gateway.auto_approve, gateway.interval = True, 1  # a subprocess polls on the real clock

    result = as_a_user(cli, "login", "--no-browser")

    assert result.code == 0, result
    (aside,) = cli.config_dir.glob("credentials.lock.damaged-*")
    reason = "Is a directory" if owner == "a folder" else "Permission denied"
    assert f"credentials.lock could not be opened ({reason}); moved it to {aside}" in result.err
    assert result.err.index("moved it to") < result.err.index("enter code")  # checked before a code is shown
    assert cli.stored_login()["api_url"] == gateway.url
    assert as_a_user(cli, "whoami").code == 0


@POSIX
def test_login_force_sets_an_unusable_credentials_file_aside_before_a_code_is_shown(cli, gateway):
    cli.config_dir.mkdir(mode=0o700)
    cli.credentials.mkdir()
    gateway.auto_approve, gateway.interval = True, 1  # a subprocess polls on the real clock

    result = cli.run("login", "--force", "--no-browser")

    assert result.code == 0, result
    assert result.err.index("moved it to") < result.err.index("enter code")
    assert cli.stored_login()["api_url"] == gateway.url


@POSIX
def test_a_logout_that_lands_while_a_refresh_waits_for_the_lock_stops_the_refresh(cli, gateway):
    import fcntl

    cli.login(expires_in=-100)
    lock = os.open(cli.config_dir / "credentials.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # another process is busy with the login
    logouts: list[Result] = []

    def logout_lands() -> None:
        if not logouts:
            os.close(lock)
            logouts.append(cli.run("logout"))

    cli.clock.on_sleep.append(logout_lands)
    result = cli.run("balance", "--json")

    assert logouts[0].out == f"OK logged out of {gateway.url}\n"
    assert result.code == 1 and result.error()["code"] == "auth_required"
    assert gateway.refresh_count == 0  # no refresh
    assert not cli.credentials.exists()  # no write-back


def test_revoking_a_key_never_drops_a_cached_key_of_another_id_with_the_same_prefix(cli, gateway):
    cli.login()
    cached = cli.run("keys", "create", "--name", "cached", "--json").json()
    twin = gateway.add_key(name="twin")
    gateway.keys[twin["id"]]["key_prefix"] = cached["key_prefix"]  # 4 random characters can collide

    result = cli.run("keys", "revoke", twin["id"])

    assert result.code == 0, result
    assert "key cache" not in result.err
    assert cli.cached_key() == cached["raw"] and cli.last_key.read_text() == cached["raw"]


@POSIX
def test_a_credentials_file_this_user_cannot_open_is_set_aside_by_login(cli, gateway):
    cli.login()
    cli.credentials.chmod(0o000)
    gateway.auto_approve, gateway.interval = True, 1  # a subprocess polls on the real clock

    refused = as_a_user(cli, "whoami")
    result = as_a_user(cli, "login", "--no-browser")

    assert refused.code == 1 and "tokenroute login" in refused.err, refused
    assert result.code == 0, result
    (aside,) = cli.config_dir.glob("credentials.json.damaged-*")
    assert f"moved it to {aside}" in result.err
    assert as_a_user(cli, "whoami").code == 0


# ------------------------------------------- what vouches for 0.2.0's logins


def products_discovery(gw: FakeGateway, entry: dict[str, Any]) -> None:
    """Make `gw` a Paradigx product built like tokenroute: its discovery names its own client."""
    gw.fail("/api/v1/auth/discovery", status=200, count=99, body={
        "issuer": entry["issuer"], "client_id": entry["client_id"], "resource": gw.url, "scopes": ["openid"],
        "device_authorization_endpoint": gw.url + "/oidc/device/auth", "token_endpoint": gw.url + "/oidc/token"})


def test_a_server_that_vouches_for_itself_never_gets_its_login_taken_or_deleted(cli, gateway, staging, earlier):
    earlier.paradigx.mkdir()
    entry = other_products_entry(staging.url)
    earlier.auth.write_text(json.dumps({"version": 1, "tokens": {staging.url: entry}}, indent=2))
    products_discovery(staging, entry)
    before = earlier.auth.read_bytes()
    mistyped = {"TOKENROUTE_API_URL": staging.url}

    whoami = cli.run("whoami", "--json", env=mistyped)
    logout = cli.run("--api-url", staging.url, "logout")  # what `logout --all` used to suggest
    every = cli.run("logout", "--all")

    assert whoami.code == 1 and last_error(whoami)["code"] == "auth_required"
    assert "is not taken over: tokenroute cannot tell it is its own" in whoami.err
    assert (logout.code, every.code) == (0, 0)
    assert earlier.auth.read_bytes() == before
    assert b"other-refresh" not in b"".join(files_under(cli.config_dir).values())
    assert [r.path_only for r in staging.requests] == []  # the server judged is never the judge


def test_a_tokenroute_like_login_that_nothing_vouches_for_is_left_alone(cli, gateway, staging, earlier):
    earlier.paradigx.mkdir()  # a self-hosted gateway with its own identity provider: its discovery is its own word
    entry = dict(other_products_entry(staging.url), client_id="tokenroute-cli", issuer=staging.url + "/oidc")
    earlier.auth.write_text(json.dumps({"version": 1, "tokens": {staging.url: entry}}, indent=2))
    before = earlier.auth.read_bytes()

    whoami = cli.run("whoami", "--json", env={"TOKENROUTE_API_URL": staging.url})

    assert whoami.code == 1 and last_error(whoami)["code"] == "auth_required"
    assert whoami.err.startswith(
        f"For {staging.url}: the login in {earlier.auth} is not taken over: tokenroute cannot tell it is its own "
        f"(it is no login of tokenroute's client as {gateway.url} names it); `tokenroute login` logs in.\n")
    assert earlier.auth.read_bytes() == before
    assert [r.path_only for r in staging.requests] == []


def test_a_0_2_login_is_left_alone_when_the_default_gateway_cannot_be_asked(cli, gateway, earlier, monkeypatch):
    entry = earlier.login_02()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        offline = f"http://127.0.0.1:{closed.getsockname()[1]}"  # nothing listens there
    monkeypatch.setattr(tokenroute, "DEFAULT_API_URL", offline)
    before = earlier.auth.read_bytes()

    whoami = cli.run("whoami", "--json")

    assert whoami.code == 1 and last_error(whoami)["code"] == "auth_required"
    assert f"tokenroute cannot tell it is its own ({offline} could not be asked: " in whoami.err
    assert earlier.auth.read_bytes() == before
    assert entry["refresh_token"].encode() not in b"".join(files_under(cli.config_dir).values())
    assert gateway.requests == []


@pytest.mark.parametrize("issuer", ["another", "the same"])
def test_a_stored_login_vouches_only_for_entries_of_its_own_client_and_issuer(cli, gateway, earlier, issuer):
    assert login_to(cli, gateway).code == 0
    assert cli.stored_login()["issuer"] == gateway.url + "/oidc"  # a login records its issuer
    earlier.login_02()
    data = json.loads(earlier.auth.read_text())
    if issuer == "another":  # another product of the same client id with another identity provider, say
        data["tokens"][gateway.url].update(issuer="https://other-idp.example", refresh_token="someone-elses")
    earlier.auth.write_text(json.dumps(data, indent=2))
    before = earlier.auth.read_bytes()

    result = cli.run("whoami", "--json")

    assert result.code == 0, result
    left = list(json.loads(earlier.auth.read_text())["tokens"])
    if issuer == "another":
        assert earlier.auth.read_bytes() == before
    else:  # superseded by the new login: removed
        assert left == ["https://api.other-product.example"]


@pytest.mark.parametrize("host", ["another", "the same"])
def test_a_login_stored_before_1_1_vouches_by_client_id_and_its_token_endpoints_host(cli, gateway, earlier, host):
    earlier.login_02()
    data = json.loads(earlier.auth.read_text())
    issuer = "https://other-idp.example/oidc" if host == "another" else gateway.url + "/elsewhere"
    data["tokens"][gateway.url].update(issuer=issuer, refresh_token="someone-elses")
    earlier.auth.write_text(json.dumps(data, indent=2))
    before = earlier.auth.read_bytes()
    cli.login()  # no issuer recorded, as before 1.1

    result = cli.run("whoami", "--json")

    assert result.code == 0, result
    assert (earlier.auth.read_bytes() == before) == (host == "another")


def test_a_0_2_copy_of_the_0_1_login_is_known_by_its_refresh_token_and_taken_once(cli, gateway, earlier):
    creds = earlier.login_01()
    earlier.paradigx.mkdir()  # 0.2.0 copied 0.1.0's login as it was: no client id, the same refresh token
    entry = dict(creds, api_url=gateway.url, resource=gateway.resource, token_endpoint=None)
    data = {"version": 1, "tokens": {gateway.url: entry, "https://p.example": other_products_entry("https://p.example")}}
    earlier.auth.write_text(json.dumps(data, indent=2))

    result = cli.run("whoami", "--json")

    assert result.code == 0, result
    assert "took over the login of tokenroute 0.2.0" in result.err
    assert b"".join(files_under(cli.home).values()).count(creds["refresh_token"].encode()) == 1
    assert list(json.loads(earlier.auth.read_text())["tokens"]) == ["https://p.example"]


def test_0_1_s_login_is_not_taken_beside_a_newer_0_2_copy_nothing_vouches_for(cli, gateway, earlier):
    gateway.resource = gateway.url  # as on the real service: the resource indicator is the API base URL
    creds = earlier.login_01(expires_in=-100)
    refreshed = gateway.issue_tokens()  # 0.2.0 copied it (client id null) and refreshed it since: rotated
    entry = dict(creds, access_token=refreshed["access_token"], refresh_token=refreshed["refresh_token"],
                 expires_at=int(cli.clock.now()) - 100, api_url=gateway.url, resource=gateway.url, token_endpoint=None)
    earlier.paradigx.mkdir()
    earlier.auth.write_text(json.dumps({"version": 1, "tokens": {gateway.url: entry}}, indent=2))
    files = files_under(cli.home)

    result = cli.run("whoami", "--json")

    assert result.code == 1 and last_error(result)["code"] == "auth_required"
    assert "nor is the login of tokenroute 0.1.0" in result.err and "`tokenroute login` logs in" in result.err
    assert (gateway.refresh_count, gateway.revoked_logins) == (0, 0)
    assert dict(files_under(cli.home), **{".tokenroute/credentials.lock": b""}) == dict(
        files, **{".tokenroute/credentials.lock": b""})  # nothing moved, nothing lost


def test_a_0_1_login_is_the_default_gateways_and_never_sent_elsewhere(cli, gateway, staging, earlier):
    creds = earlier.login_01()

    elsewhere = cli.run("whoami", "--json", env={"TOKENROUTE_API_URL": staging.url})
    here = cli.run("whoami", "--json")

    assert elsewhere.code == 1 and last_error(elsewhere)["code"] == "auth_required"
    assert f"logged in to {gateway.url}" in last_error(elsewhere)["message"]
    assert staging.requests == []
    assert here.code == 0, here
    assert gateway.requests[-1].header("Authorization") == f"Bearer {creds['access_token']}"


def test_a_0_1_login_s_refresh_token_goes_only_to_the_issuer_that_granted_it(cli, gateway, earlier):
    creds = earlier.login_01(expires_in=-100)
    path = earlier.tokenroute / "credentials.json"
    path.write_text(json.dumps(dict(creds, issuer="https://auth.elsewhere.example/oidc")))

    result = cli.run("whoami", "--json")

    assert result.code == 1 and last_error(result)["code"] == "session_expired"
    assert "was granted by https://auth.elsewhere.example/oidc" in last_error(result)["message"]
    assert gateway.refresh_count == 0


@pytest.mark.parametrize("damage", ["expires_at in milliseconds", "NaN", "access_token null"])
def test_a_0_2_login_that_is_no_usable_login_is_left_where_it_is(cli, gateway, earlier, damage):
    entry = earlier.login_02()
    text = earlier.auth.read_text()
    expiry, access = f'"expires_at": {entry["expires_at"]}', f'"access_token": "{entry["access_token"]}"'
    text = {"expires_at in milliseconds": text.replace(expiry, f'"expires_at": {entry["expires_at"] * 1000}'),
            "NaN": text.replace(expiry, '"expires_at": NaN'),
            "access_token null": text.replace(access, '"access_token": null')}[damage]
    earlier.auth.write_text(text)

    result = cli.run("whoami", "--json")

    assert result.code == 1 and last_error(result)["code"] == "auth_required"
    assert "is not taken over: it is no usable login" in result.err
    assert earlier.auth.read_text() == text
    assert entry["refresh_token"].encode() not in b"".join(files_under(cli.config_dir).values())


def test_an_entry_that_copies_another_gateways_login_is_removed_never_taken(cli, gateway, staging, earlier):
    login = cli.login()
    earlier.paradigx.mkdir()
    copy = dict(other_products_entry(staging.url), refresh_token=login["refresh_token"])
    earlier.auth.write_text(json.dumps({"version": 1, "tokens": {staging.url: copy}}, indent=2))

    result = cli.run("whoami", "--json", env={"TOKENROUTE_API_URL": staging.url})

    assert result.code == 1 and last_error(result)["code"] == "auth_required"
    assert json.loads(earlier.auth.read_text())["tokens"] == {}
    assert where_is(cli, login["refresh_token"]) == [".tokenroute/credentials.json"]
    assert list(json.loads(cli.credentials.read_text())["logins"]) == [gateway.url]


def test_a_logout_that_lands_while_a_takeover_waits_for_the_lock_is_final(cli, gateway, earlier):
    import fcntl

    entry = earlier.login_02()
    cli.config_dir.mkdir(mode=0o700)
    lock = os.open(cli.config_dir / "credentials.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # another process is busy with the files
    logouts: list[Result] = []
    landed: list[bool] = []

    def logout_lands() -> None:  # one that cannot judge the login: it records the gateway as logged out of
        if not landed:
            landed.append(True)
            os.close(lock)
            gateway.fail("/api/v1/auth/discovery", status=503, count=99)
            logouts.append(cli.run("logout"))

    cli.clock.on_sleep.append(logout_lands)
    result = cli.run("whoami", "--json")

    assert logouts[0].code == 0, logouts
    assert result.code == 1 and last_error(result)["code"] == "auth_required"
    assert entry["refresh_token"].encode() not in b"".join(files_under(cli.config_dir).values())


def test_plain_logout_removes_only_this_gateways_0_2_login(cli, gateway, staging, earlier):
    earlier.login_02()
    data = json.loads(earlier.auth.read_text())
    data["tokens"][staging.url] = dict(data["tokens"][gateway.url], api_url=staging.url, refresh_token="rt-staging")
    earlier.auth.write_text(json.dumps(data, indent=2))

    result = cli.run("logout")

    assert result.out == f"OK logged out of {gateway.url}\n"
    assert list(json.loads(earlier.auth.read_text())["tokens"]) == ["https://api.other-product.example", staging.url]


# ------------------------------------ the takeover: two phases, one place


def where_is(cli: Cli, secret: str) -> list[str]:
    return sorted(name for name, data in files_under(cli.home).items() if secret.encode() in data)


@POSIX
@pytest.mark.parametrize("obstacle", ["immutable", "a 240-character name"])
def test_an_auth_json_that_cannot_be_replaced_keeps_the_login_in_one_place(cli, gateway, earlier, tmp_path, obstacle):
    entry = earlier.login_02()
    if obstacle == "immutable":
        if not AS_ROOT or subprocess.run(["chattr", "+i", str(earlier.auth)], capture_output=True).returncode != 0:
            pytest.skip("no chattr +i here (it needs root and a file system that has it)")
        real = earlier.auth
    else:  # the temporary file beside it gets a longer name than the file system takes
        real = tmp_path / "dotfiles" / ("a" * 240)
        real.parent.mkdir()
        shutil.move(str(earlier.auth), str(real))
        earlier.auth.symlink_to(real)
    before = real.read_bytes()
    try:
        result = cli.run("whoami", "--json")
    finally:
        subprocess.run(["chattr", "-i", str(earlier.auth)], capture_output=True)

    assert result.code == 1 and last_error(result)["code"] == "auth_required"
    assert f"could not take over the earlier release's files: cannot rewrite {real}: " in result.err
    assert real.read_bytes() == before
    assert where_is(cli, entry["refresh_token"]) == [".paradigx/auth.json"]
    assert not cli.credentials.exists()  # put back as it was: absent
    assert [p.name for p in real.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_an_auth_json_another_program_writes_meanwhile_is_never_overwritten(cli, gateway, earlier, monkeypatch):
    entry = earlier.login_02()
    write_logins = tokenroute.write_logins

    def and_another_program_writes(*args: Any, **kwargs: Any) -> None:  # between the save and the rename
        write_logins(*args, **kwargs)
        data = json.loads(earlier.auth.read_text())
        data["tokens"]["https://p.example"] = other_products_entry("https://p.example")
        earlier.auth.write_text(json.dumps(data, indent=2))

    monkeypatch.setattr(tokenroute, "write_logins", and_another_program_writes)
    result = cli.run("whoami", "--json")
    written = earlier.auth.read_bytes()

    assert result.code == 1, result
    assert f"{earlier.auth} changed meanwhile (another program wrote it); nothing was taken from it" in result.err
    assert "https://p.example" in json.loads(written)["tokens"]  # its write stands
    assert where_is(cli, entry["refresh_token"]) == [".paradigx/auth.json"]


@POSIX
def test_the_takeover_keeps_auth_json_s_owner_and_group(cli, gateway, earlier):
    earlier.login_02()
    groups = [gid for gid in os.getgroups() if gid != os.getgid()]
    group = OTHER_UID if AS_ROOT else (groups[0] if groups else None)
    if group is None:
        pytest.skip("this user is in no second group to give auth.json")
    os.chown(earlier.auth, os.getuid(), group)
    earlier.auth.chmod(0o640)  # a group that reads it: another Paradigx tool run as a service, say

    result = cli.run("whoami", "--json")

    assert result.code == 0, result
    status = earlier.auth.stat()
    assert (status.st_uid, status.st_gid, mode(earlier.auth)) == (os.getuid(), group, 0o640)


@pytest.mark.parametrize("moment", ["credentials.json", "auth.json"], ids=["after the save", "after the cut"])
def test_a_kill_during_the_takeover_never_loses_the_login_nor_leaves_two_live_copies(cli, gateway, earlier, moment):
    entry = earlier.login_02(expires_in=-100)  # the next command refreshes first

    killed = killed_after(cli, f"{moment}:1", "whoami", "--json", default=gateway.url)
    saved = where_is(cli, entry["refresh_token"])
    after = cli.run("whoami", "--json")

    assert killed.code == 137, killed
    assert ".tokenroute/credentials.json" in saved  # saved before auth.json changes: never lost
    assert after.code == 0, after
    assert (gateway.refresh_count, gateway.revoked_logins) == (1, 0)
    stored = json.loads(cli.credentials.read_text())["logins"][gateway.url]["refresh_token"]
    assert where_is(cli, stored) == [".tokenroute/credentials.json"]
    assert where_is(cli, entry["refresh_token"]) == []


@POSIX
def test_an_auth_json_of_another_user_is_never_read_nor_rewritten(cli, gateway, earlier):
    earlier.login_02()
    if AS_ROOT:
        os.chown(earlier.auth, OTHER_UID, OTHER_UID)
    else:  # a symlink to a file root owns is another user's file for anyone else
        earlier.auth.unlink()
        earlier.auth.symlink_to(foreign_file())
    before = earlier.auth.read_bytes()

    result = cli.run("whoami", "--json")

    assert result.code == 1 and last_error(result)["code"] == "auth_required"
    assert earlier.auth.read_bytes() == before and earlier.auth.stat().st_uid != os.getuid()
    assert not cli.credentials.exists()


def test_two_files_set_aside_in_one_second_are_both_kept(cli, gateway):
    cli.config_dir.mkdir(mode=0o700)
    for damage in (b"{first", b"{second"):
        cli.credentials.write_bytes(damage)
        assert cli.run("logout").code == 0

    asides = sorted(cli.config_dir.glob("credentials.json.damaged-*"))
    assert sorted(p.read_bytes() for p in asides) == [b"{first", b"{second"]
    assert asides[1].name == asides[0].name + "-2"


def test_a_key_file_of_a_later_release_is_set_aside_never_overwritten(cli, gateway):
    cli.login()
    cli.config_dir.mkdir(exist_ok=True)
    later = f"# tokenroute keys, version 2: a later release's\n{gateway.url} sk-tr-fromLATER key_9 laptop\n"
    cli.keys_file.write_text(later)

    result = cli.run("keys", "create", "--name", "ci", "--json")

    assert result.code == 0, result
    (aside,) = cli.config_dir.glob("keys.txt.damaged-*")
    assert aside.read_text() == later and "is not in a format this release knows" in result.err
    assert cli.cached_key() == result.json()["raw"]
