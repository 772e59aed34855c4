"""Nothing lost, nothing taken (issue 15): the reference's raw last_key.txt, other
products' logins in the shared ~/.paradigx/auth.json, and signals and locks that
never cost the login.

The earlier releases' files are written as shared/spec/legacy-clients.md
describes them (the Earlier helper of test_state.py); a "user whom file modes
stop" is this user, or root without its power to open any file (setpriv).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from typing import Any

import pytest

from conftest import Cli, Result, console_script
from test_startup import heavy_among, run_profiled
from test_state import Earlier, earlier, files_under, gateway6, last_error, login_to, mode, read_only  # noqa: F401

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


def test_a_key_pasted_into_last_key_txt_is_the_gateway_in_use_s(cli, gateway, staging):
    login_to(cli, gateway)
    prod = cli.run("keys", "create", "--name", "prod", "--json").json()
    pasted = staging.add_key(name="from-the-dashboard")["raw"]
    cli.last_key.write_text(pasted + "\n")  # echo KEY > ~/.tokenroute/last_key.txt

    first = cli.run("models", "--json", env={"TOKENROUTE_API_URL": staging.url})
    again = cli.run("env", env={"TOKENROUTE_API_URL": staging.url})
    prod_env = cli.run("env")

    assert first.code == 0, first
    assert staging.requests[-1].header("Authorization") == f"Bearer {pasted}"
    assert first.err == (f"For {staging.url}: took the API key {pasted[:10]}... in {cli.last_key} (recorded for "
                         "no gateway: pasted, or tokenroute 0.1.0's) as this gateway's.\n")
    assert (again.err, again.out.splitlines()[0]) == ("", f"OPENAI_API_KEY={pasted}")
    assert prod_env.out.splitlines()[0] == f"OPENAI_API_KEY={prod['raw']}"  # the other gateway's key stays its own
    assert cli.last_key.read_text() == pasted + "\n"  # the person's file, as they wrote it


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
    assert not cli.credentials.exists()


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
    assert f"could not take over the earlier release's files: cannot write in {real.parent}" in result.err
    assert real.read_bytes() == before
    assert entry["refresh_token"].encode() not in b"".join(files_under(cli.config_dir).values())


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


@pytest.mark.parametrize("logged_in", [False, True], ids=["taken over", "superseded"])
def test_a_0_2_login_of_an_ipv6_gateway_is_found_however_0_2_spelled_it(tmp_path, gateway6, logged_in):
    cli = Cli(gateway6, tmp_path)
    earlier = Earlier(cli, gateway6)
    new = cli.login() if logged_in else None
    entry = earlier.login_02()
    data = json.loads(earlier.auth.read_text())
    spelled = gateway6.url.replace("[::1]", "[0:0:0:0:0:0:0:1]")
    data["tokens"][spelled] = dict(data["tokens"].pop(gateway6.url), api_url=spelled)
    if logged_in:  # a login of this release names the client: the identity provider may live anywhere
        data["tokens"][spelled].update(issuer="https://auth.paradigx.example", token_endpoint=None)
    earlier.auth.write_text(json.dumps(data, indent=2))

    result = cli.run("whoami", "--json")

    assert result.code == 0, result
    assert cli.stored_login()["refresh_token"] == (new or entry)["refresh_token"]
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


def test_a_logout_that_cannot_ask_the_gateway_says_it_is_not_finished(cli, earlier):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        unreachable = f"http://127.0.0.1:{closed.getsockname()[1]}"  # nothing listens there
    earlier.paradigx.mkdir()
    earlier.auth.write_text(json.dumps({"version": 1, "tokens": {unreachable: other_products_entry(unreachable)}}))
    before = earlier.auth.read_bytes()

    result = cli.run("logout", "--json", env={"TOKENROUTE_API_URL": unreachable})

    assert result.code == 2 and result.out == ""
    assert result.error()["code"] == "network"
    assert "run this logout again once it can be reached" in result.error()["message"]
    assert earlier.auth.read_bytes() == before


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


@POSIX
@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_a_refresh_waits_until_the_rotated_token_is_saved(cli, gateway, number):
    old = cli.login(expires_in=-100)
    gateway.slow("/oidc/token", 1.5, method="POST")
    process = subprocess.Popen([console_script(), "balance"], env=cli.process_env(), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(r.path_only == "/oidc/token" for r in gateway.requests), "the refresh")
        process.send_signal(number)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    wait_for(lambda: gateway.refresh_count == 1, "the rotation")

    assert process.returncode == (130 if number == signal.SIGINT else -signal.SIGTERM), err
    assert "finishing the login refresh first" in err
    assert cli.stored_login()["refresh_token"] != old["refresh_token"]
    assert cli.run("balance").code == 0  # the rotated token was saved: the login lives
    assert gateway.revoked_logins == 0


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
