"""`tokenroute api` (issue 18): any gateway endpoint with the credential its path takes.

Through the installed console script against the fake gateway: which
credential goes where (and nowhere else), fields and bodies as gh api builds
them, the answer as sent (and a stream as it arrives), --include, and the
exit codes and errors every command has.
"""
from __future__ import annotations

import json
import queue
import socket
import subprocess
import threading
from typing import Any, Callable, Iterator

import pytest

from conftest import POSIX, Cli, Result, console_script

import tokenroute

CHAT = ["-f", "model=openai/gpt-4o-mini", "-F", 'messages=[{"role": "user", "content": "Hi"}]']


def script_with_input(cli: Cli, *argv: str, stdin: bytes) -> Result:
    """The console script with `stdin` as its standard input."""
    done = subprocess.run([console_script(), *argv], env=cli.process_env(), input=stdin, capture_output=True, timeout=60)
    return Result(done.returncode, done.stdout.decode(), done.stderr.decode())


def assert_nothing_shows(result: Result, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in result.out and secret not in result.err, result


def last(gateway: Any) -> Any:
    return gateway.requests[-1]


class RawGateway:
    """A loopback server that answers every request with the bytes it was given, then closes the
    connection: status lines, lengths and cut-off bodies that the fake gateway does not send."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.requests: list[bytes] = []  # each request's head (the tests send no body)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # stopped
                return
            with connection:
                head = b""
                while b"\r\n\r\n" not in head:
                    data = connection.recv(65536)
                    if not data:
                        break
                    head += data
                self.requests.append(head)
                connection.sendall(self.answer)

    def stop(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() of serve on Linux
        except OSError:
            pass
        self.listener.close()


@pytest.fixture
def raw_gateway() -> Iterator[Callable[[bytes], RawGateway]]:
    """Start RawGateways answering with the given bytes; all are stopped after the test."""
    started: list[RawGateway] = []

    def start(answer: bytes) -> RawGateway:
        started.append(RawGateway(answer))
        return started[-1]

    yield start
    for server in started:
        server.stop()


# ---------------------------------------------------------------- the credential follows the path


@pytest.mark.parametrize("source", ["--key", "TOKENROUTE_API_KEY", "cache"])
def test_a_v1_path_carries_the_api_key_from_each_source(cli, gateway, api_key, source):
    argv, env = ["api", "/v1/models"], {}
    if source == "--key":
        argv += ["--key", api_key]
    elif source == "TOKENROUTE_API_KEY":
        env["TOKENROUTE_API_KEY"] = api_key
    else:
        cli.cache_key(api_key)
    cli.login()

    result = cli.script(*argv, env=env)

    assert (result.code, result.err) == (0, "")
    assert [model["id"] for model in result.json()["data"]][0] == "openai/gpt-4o-mini"
    assert [(r.method, r.path, r.header("Authorization")) for r in gateway.requests] == [
        ("GET", "/v1/models", f"Bearer {api_key}")
    ]
    assert_nothing_shows(result, api_key)


def test_an_api_path_carries_the_login(cli, gateway, api_key):
    creds = cli.login()
    cli.cache_key(api_key)

    result = cli.script("api", "/api/v1/balance")

    assert (result.code, result.err) == (0, "")
    assert result.json() == {"balance_usd": "5.00", "currency": "USD"}
    assert last(gateway).header("Authorization") == f"Bearer {creds['access_token']}"
    assert_nothing_shows(result, creds["access_token"], creds["refresh_token"], api_key)


def test_an_expiring_login_is_refreshed_before_the_call(cli, gateway):
    old = cli.login(expires_in=10)

    result = cli.script("api", "/api/v1/me")

    assert (result.code, result.err) == (0, "")
    assert result.json()["email"] == "agent@example.com"
    assert gateway.refresh_count == 1
    new = cli.stored_login()
    assert new["access_token"] != old["access_token"]
    assert last(gateway).header("Authorization") == f"Bearer {new['access_token']}"
    assert_nothing_shows(result, old["access_token"], new["access_token"], new["refresh_token"])


def test_a_401_on_an_api_path_refreshes_once_and_sends_again(cli, gateway):
    cli.login()
    gateway.expire_access_tokens()  # the server says no before the stored expiry says so

    result = cli.script("api", "-X", "POST", "/api/v1/me/keys", "-f", "name=ci")

    assert (result.code, result.err) == (0, "")
    assert result.json()["name"] == "ci"
    assert gateway.refresh_count == 1
    posts = [r for r in gateway.requests if r.path == "/api/v1/me/keys"]
    assert len(posts) == 2 and posts[0].json == posts[1].json == {"name": "ci"}
    assert len(gateway.keys) == 1


def test_a_second_401_on_an_api_path_is_the_login_error(cli, gateway):
    cli.login()
    gateway.fail("/api/v1/me", status=401, body={"detail": "Not authenticated"}, count=2)

    result = cli.script("--json", "api", "/api/v1/me")

    assert result.code == 1
    assert result.out == '{"detail": "Not authenticated"}'
    assert result.error()["code"] == "auth_required" and result.error()["next"] == "tokenroute login"
    assert gateway.refresh_count == 1


def test_a_401_on_a_v1_path_is_an_invalid_key(cli, gateway, api_key):
    gateway.keys.clear()

    result = cli.script("api", "/v1/models", "--key", api_key)

    assert result.code == 1
    assert json.loads(result.out)["error"]["code"] == "invalid_api_key"
    assert result.err.startswith("error: Invalid API key; the gateway rejected the API key")
    assert result.err.endswith("; run `tokenroute keys create --name NAME`\n")
    assert_nothing_shows(result, api_key)


def test_other_paths_carry_no_credential(cli, gateway, api_key):
    cli.login()
    cli.cache_key(api_key)

    result = cli.script("api", "/device?user_code=ABCD-EFGH")

    assert (result.code, result.err) == (0, "")
    assert "Device login" in result.out
    assert last(gateway).path == "/device?user_code=ABCD-EFGH"
    assert last(gateway).header("Authorization") is None


def test_a_401_on_another_path_says_that_no_credential_went(cli, gateway, api_key):
    cli.login()
    cli.cache_key(api_key)  # neither goes to /health, so neither is to blame
    gateway.fail("/health", status=401, body={"detail": "Not authenticated"}, count=2)

    result = cli.script("api", "/health")
    as_json = cli.script("api", "--json", "/health")

    assert result.code == 1
    assert "sends one only to /api/... (your login) and /v1/... (the API key)" in result.err
    assert "API key" not in result.err.partition(";")[0] and "keys create" not in result.err
    assert as_json.code == 1
    assert json.loads(as_json.err)["error"] == {
        "code": "unauthorized", "status": 401, "message": json.loads(as_json.err)["error"]["message"]
    }
    assert [r.header("Authorization") for r in gateway.requests] == [None, None]


@pytest.mark.parametrize("path", ["/api/v1/me", "/device"])
def test_a_key_flag_outside_v1_is_refused_before_anything_is_sent(cli, gateway, api_key, path):
    result = cli.script("api", path, "--key", api_key)

    assert result.code == 1
    assert "--key is for /v1/... paths" in result.err
    assert gateway.requests == []


def test_no_login_for_an_api_path_says_how_to_log_in(cli, gateway):
    result = cli.script("api", "/api/v1/me")

    assert result.code == 1
    assert result.err == f"error: not logged in to {gateway.url}; run `tokenroute login`\n"
    assert gateway.requests == []


def test_no_key_for_a_v1_path_says_how_to_get_one(cli, gateway):
    result = cli.script("--json", "api", "/v1/models")

    assert result.code == 1
    assert result.error()["code"] == "no_key"
    assert gateway.requests == []


@pytest.mark.parametrize("path, plain", [("/%61pi/v1/me", "/api/v1/me"), ("/%76%31/models", "/v1/models")])
def test_a_percent_encoded_path_gets_the_credential_of_the_path_it_names(cli, gateway, api_key, path, plain):
    creds = cli.login()
    cli.cache_key(api_key)
    gateway.fail(plain, status=200, body={"ok": True})  # the fake gateway routes only the plain path itself

    result = cli.script("api", path)

    assert (result.code, result.err) == (0, "")
    credential = creds["access_token"] if plain.startswith("/api/") else api_key
    assert (last(gateway).path, last(gateway).header("Authorization")) == (path, f"Bearer {credential}")


# ---------------------------------------------------------------- full URLs and paths


def test_a_full_url_of_the_gateway_is_sent_there(cli, gateway, api_key):
    result = cli.script("api", f"{gateway.url}/v1/models?limit=2", "--key", api_key)

    assert (result.code, result.err) == (0, "")
    assert last(gateway).path == "/v1/models?limit=2"
    assert last(gateway).header("Authorization") == f"Bearer {api_key}"


def test_a_gateway_under_a_path_takes_paths_and_urls_under_it(cli, gateway, api_key):
    env = {"TOKENROUTE_API_URL": gateway.url + "/base"}

    relative = cli.script("api", "/v1/models", "--key", api_key, env=env)
    full = cli.script("api", f"{gateway.url}/base/v1/models", "--key", api_key, env=env)
    outside = cli.script("api", f"{gateway.url}/v1/models", "--key", api_key, env=env)

    assert relative.code == full.code == 1  # the fake gateway serves nothing under /base
    assert [(r.path, r.header("Authorization")) for r in gateway.requests] == [("/base/v1/models", f"Bearer {api_key}")] * 2
    assert outside.code == 1 and f"is not on the gateway in use ({gateway.url}/base)" in outside.err
    assert len(gateway.requests) == 2


def test_a_url_in_the_query_of_a_path_is_part_of_the_path(cli, gateway, api_key):
    result = cli.script("api", "/v1/models?next=https://evil.example/x", "--key", api_key)

    assert result.code == 0
    assert last(gateway).path == "/v1/models?next=https://evil.example/x"


@pytest.mark.parametrize("where", ["recorder", "recorder https", "same host other port", "localhost alias"])
def test_a_full_url_of_another_host_is_refused_and_nothing_is_sent(cli, gateway, api_key, where):
    cli.login()
    cli.cache_key(api_key)
    recorder = gateway.recorder
    port = gateway.url.rpartition(":")[2]
    url = {
        "recorder": f"{recorder.url}/v1/models",
        "recorder https": recorder.url.replace("http:", "https:") + "/api/v1/me",
        "same host other port": f"http://127.0.0.1:{int(port) + 1}/v1/models",
        "localhost alias": f"http://localhost:{port}/v1/models",
    }[where]

    result = cli.script("api", url)

    assert result.code == 1
    assert f"is not on the gateway in use ({gateway.url})" in result.err
    assert (recorder.requests, gateway.requests) == ([], [])


def test_a_url_with_user_info_is_refused_without_echoing_it(cli, gateway, api_key):
    cli.cache_key(api_key)

    result = cli.script("api", f"http://user:hunter2@{gateway.url.partition('://')[2]}/v1/models")

    assert result.code == 1
    assert "hunter2" not in result.err and "user name or password" in result.err
    assert gateway.requests == []


@pytest.mark.parametrize(
    "path",
    ["//evil.example/v1/models", "/v1/../api/v1/me", "/v1/%2e%2e/api/v1/me", "/v1/.%2E/x", "/%2F%2Fevil.example/v1",
     "/v1\\models", "/v1/models#frag", "/v1/mo dels", "/v1/\x1b[31mred", "/v1/caf\u00e9", "/v1/%00"],
)
def test_a_path_that_may_go_elsewhere_is_refused(cli, gateway, api_key, path):
    cli.cache_key(api_key)

    result = cli.script("api", path)

    assert result.code == 1
    assert "is not a plain path on the gateway" in result.err and "\x1b" not in result.err
    assert gateway.requests == []


def test_a_redirect_is_not_followed(cli, gateway, api_key):
    gateway.fail("/v1/models", status=302, body=b"", headers={"Location": gateway.recorder.url + "/v1/models"})

    result = cli.script("api", "/v1/models", "--key", api_key)

    assert result.code == 3
    assert "redirected to" in result.err and "not followed" in result.err
    assert gateway.recorder.requests == []


# ---------------------------------------------------------------- bodies, fields, headers


def test_fields_make_a_json_body_and_a_post(cli, gateway, api_key):
    result = cli.script(
        "api", "/v1/chat/completions", "--key", api_key, *CHAT,
        "-F", "max_tokens=5", "-F", "temperature=0.5", "-F", "logprobs=false", "-F", "user=null",
        "-F", "stop=[\"\\n\"]", "-F", "tag=hello", "-F", 'quoted="x"', "-f", "n=1", "-f", "handle=@alice",
    )

    assert (result.code, result.err) == (0, "")
    assert result.json()["choices"][0]["message"]["content"] == "OK"
    request = last(gateway)
    assert (request.method, request.header("Content-Type")) == ("POST", "application/json")
    assert request.json == {
        "model": "openai/gpt-4o-mini", "n": "1", "handle": "@alice",
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0.5, "logprobs": False,
        "user": None, "stop": ["\n"], "tag": "hello", "quoted": '"x"',
    }


def test_fields_with_get_go_in_the_query_string(cli, gateway):
    cli.login()

    result = cli.script("api", "-X", "get", "/api/v1/me/usage", "-F", "days=7")

    assert (result.code, result.err) == (0, "")
    assert result.json()["range_days"] == 7
    assert (last(gateway).method, last(gateway).path, last(gateway).body) == ("GET", "/api/v1/me/usage?days=7", b"")


def test_a_file_is_sent_as_the_body_as_it_is(cli, gateway, tmp_path):
    cli.login()
    body = b'{"amount_usd":  "12.50"}\n'
    (tmp_path / "topup.json").write_bytes(body)

    result = cli.script("api", "/api/v1/topup", "--input", str(tmp_path / "topup.json"))

    assert (result.code, result.err) == (0, "")
    assert result.json()["amount_usd"] == "12.50"
    request = last(gateway)
    assert (request.method, request.body, request.header("Content-Type")) == ("POST", body, "application/json")


def test_stdin_is_sent_as_the_body_and_fields_go_in_the_query(cli, gateway):
    cli.login()

    result = script_with_input(cli, "api", "/api/v1/me/keys", "--input", "-", "-f", "dry=yes", stdin=b'{"name": "piped"}')

    assert (result.code, result.err) == (0, "")
    request = last(gateway)
    assert (request.method, request.path, request.json) == ("POST", "/api/v1/me/keys?dry=yes", {"name": "piped"})


@pytest.mark.parametrize("path, message", [("/api/v1/me/keys", "not logged in"), ("/v1/models", "no API key")])
def test_stdin_is_not_read_when_the_credential_is_missing(cli, gateway, path, message):
    with subprocess.Popen([console_script(), "api", path, "--input", "-"], env=cli.process_env(),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as child:
        try:
            code = child.wait(timeout=30)  # a guard against a hang, not a timing: stdin stays open and empty
        finally:
            child.kill()  # nothing to do once it has exited
        out, err = child.stdout.read(), child.stderr.read()

    assert (code, out) == (1, b"")
    assert message in err.decode()
    assert gateway.requests == []


def test_stdin_at_a_terminal_says_that_it_is_read(cli, gateway):
    cli.login()

    result = cli.run("api", "/api/v1/me/keys", "--input", "-", tty=True, stdin=b'{"name": "typed"}')

    assert result.code == 0
    assert result.err.startswith("reading the body from stdin (end with Ctrl-")
    assert last(gateway).json == {"name": "typed"}


@pytest.mark.skipif(not POSIX, reason="a write-only standard input, as POSIX shells make with 0>FILE")
def test_a_failing_stdin_is_a_read_error_not_an_output_error(cli, gateway, tmp_path):
    cli.login()
    with open(tmp_path / "write-only", "wb") as stdin:  # reading it fails with EBADF
        done = subprocess.run([console_script(), "api", "/api/v1/me/keys", "--input", "-"], env=cli.process_env(),
                              stdin=stdin, capture_output=True, timeout=60)

    assert (done.returncode, done.stdout) == (1, b"")
    assert done.stderr.decode() == "error: --input -: cannot read the standard input: Bad file descriptor\n"
    assert gateway.requests == []


def test_a_method_without_a_body_sends_none(cli, gateway):
    cli.login()
    key = gateway.add_key()

    result = cli.script("api", "-X", "DELETE", f"/api/v1/me/keys/{key['id']}")

    assert (result.code, result.err) == (0, "")
    assert result.json()["status"] == "revoked"
    assert (last(gateway).method, last(gateway).body, last(gateway).header("Content-Type")) == ("DELETE", b"", None)


def test_headers_are_added_and_replace_the_defaults(cli, gateway, api_key):
    result = cli.script("api", "/v1/models", "--key", api_key, "-H", "X-Trace: abc 123", "-H", "accept: application/json")

    assert result.code == 0
    request = last(gateway)
    assert request.header("X-Trace") == "abc 123"
    assert [value for name, value in request.headers.items() if name.lower() == "accept"] == ["application/json"]


def test_header_names_take_every_token_character(cli, gateway, api_key):
    result = cli.script("api", "/v1/models", "--key", api_key, "-H", "X_Api_Key: k1", "-H", "X.Trace~2!: t")

    assert (result.code, result.err) == (0, "")
    assert (last(gateway).header("X_Api_Key"), last(gateway).header("X.Trace~2!")) == ("k1", "t")


@pytest.mark.parametrize(
    "header, message",
    [("Authorization: Bearer sk-tr-other", "tokenroute sets it itself"), ("host: evil.example", "sets it itself"),
     ("Content-Length: 5", "sets it itself"), ("Transfer-Encoding: chunked", "sets it itself"),
     ("X-Broken", "-H 'X-Broken': give 'Name: value'"), (": x", "give 'Name: value'"),
     ("X-Bad: a\x01b", "-H 'X-Bad: a\\x01b': the value must be printable ASCII"),
     ("X-Bad: caf\u00e9", "the value must be printable ASCII"),
     ("Bad Name: x", "-H 'Bad Name: x': 'Bad Name' is not a header name: use letters, digits and !#$%&'*+-.^_`|~"),
     ("X(1): x", "'X(1)' is not a header name"), ("X\u00e9: x", "is not a header name")],
)
def test_headers_tokenroute_sets_or_that_are_malformed_are_refused(cli, gateway, api_key, header, message):
    result = cli.script("api", "/v1/models", "--key", api_key, "-H", header)

    assert result.code == 1 and message in result.err, result
    assert gateway.requests == []
    assert_nothing_shows(result, "sk-tr-other")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-f", "novalue"], "give NAME=VALUE"),
        (["-F", "=5"], "give NAME=VALUE"),
        (["-f", "a[b]=c"], "no nested names"),
        (["-f", "a=1", "-F", "a=2"], "given twice"),
        (["-F", "key=@/etc/passwd"], "-F reads no file"),
        (["-F", "big=1e999"], "too large for JSON"),
        (["-F", "long=" + "9" * 5000], "-F long: JSON too large or too deep to send"),  # past Python's 4300 digits
        (["-F", "deep=" + "[" * 50_000 + "]" * 50_000], "-F deep: JSON too large or too deep to send"),
        (["--input", "/nonexistent/body.json"], "cannot read /nonexistent/body.json"),
        (["-X", "TRACE"], "invalid choice: 'TRACE' (choose from 'GET', 'POST'"),
    ],
)
def test_bad_fields_bodies_and_methods_are_refused_before_anything_is_sent(cli, gateway, argv, message):
    cli.login()

    result = cli.script("api", "/api/v1/me", *argv)

    assert result.code == 1 and message in result.err, result
    assert gateway.requests == []


@pytest.mark.parametrize("path", ["", " "])
def test_an_empty_path_is_refused(cli, gateway, path):
    result = cli.script("api", "--json", path)

    assert result.code == 1 and result.error()["code"] == "usage"
    assert "PATH is empty" in result.error()["message"]
    assert gateway.requests == []


# ---------------------------------------------------------------- output


def test_include_prints_the_status_and_headers_first_with_credentials_redacted(cli, gateway, api_key):
    gateway.fail(
        "/v1/models", status=200, body=b'{"ok": true}',
        headers={"Set-Cookie": "session=s3cret", "X-Echo": f"you sent {api_key}", "X-Other-Key": "sk-tr-abcdefghijkl",
                 f"X-{api_key}": "1"},
    )

    result = cli.script("api", "-i", "/v1/models", "--key", api_key)

    assert (result.code, result.err) == (0, "")
    head, _, body = result.out.partition("\n\n")
    lines = head.splitlines()
    assert lines[0] == "HTTP/1.0 200 OK"
    assert "Content-Type: application/json" in lines and "Content-Length: 12" in lines
    assert "Set-Cookie: (redacted)" in lines and "X-Echo: (redacted)" in lines
    assert "X-Other-Key: sk-tr-abcd..." in lines and "(redacted): 1" in lines
    assert body == '{"ok": true}'
    assert_nothing_shows(result, api_key, "s3cret", "sk-tr-abcdefghijkl")


@pytest.mark.parametrize(
    "reason, shown",
    [("Bad token {key}", "(redacted)"), ("Fine sk-tr-abcdefghijkl \x1b[31m", "Fine sk-tr-abcd... \\x1b[31m")],
)
def test_include_shows_the_reason_phrase_as_it_shows_header_values(cli, raw_gateway, api_key, reason, shown):
    status = f"HTTP/1.1 401 {reason.format(key=api_key)}".encode()
    server = raw_gateway(status + b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")

    result = cli.script("api", "-i", "/v1/models", "--key", api_key, env={"TOKENROUTE_API_URL": server.url})

    assert result.code == 1
    assert result.out.splitlines()[0] == f"HTTP/1.1 401 {shown}"
    assert "\x1b" not in result.out
    assert_nothing_shows(result, api_key, "sk-tr-abcdefghijkl")


def test_the_answer_goes_to_a_pipe_byte_for_byte(cli, gateway, api_key):
    body = b'{"a":1,  "text": "caf\xc3\xa9 \xff\x1b[31m"}'
    gateway.fail("/v1/models", status=200, body=body, content_type="application/json")

    done = subprocess.run([console_script(), "api", "/v1/models", "--key", api_key], env=cli.process_env(),
                          capture_output=True, timeout=60)

    assert (done.returncode, done.stdout, done.stderr) == (0, body, b"")


@pytest.mark.parametrize("content_type", ["application/octet-stream", "application/json"])
def test_an_answer_larger_than_4_mib_goes_to_a_pipe_byte_for_byte(cli, gateway, api_key, content_type):
    body = b'{"data": "' + bytes(range(256)) * (5_000_000 // 256) + b'"}'
    gateway.fail("/v1/models", status=200, body=body, content_type=content_type)

    done = subprocess.run([console_script(), "api", "/v1/models", "--key", api_key], env=cli.process_env(),
                          capture_output=True, timeout=60)

    assert (done.returncode, done.stderr) == (0, b"")
    assert done.stdout == body


def test_json_larger_than_4_mib_at_a_terminal_is_shown_as_it_came(cli, gateway, api_key):
    body = '{"data": "' + "x" * 5_000_000 + '"}'
    gateway.fail("/v1/models", status=200, body=body.encode())

    result = cli.run("api", "/v1/models", "--key", api_key, tty=True)

    assert (result.code, result.err) == (0, "")
    assert result.out == body + "\n"


def test_json_at_a_terminal_is_indented(cli, gateway, api_key):
    result = cli.run("api", "/v1/models", "--key", api_key, tty=True)

    assert result.code == 0
    assert result.out.startswith('{\n  "object": "list",\n  "data": [\n')


def test_json_at_a_terminal_keeps_text_readable_and_escapes_controls(cli, gateway, api_key):
    text = "caf\u00e9 \u65e5\u672c \U0001F600 \x1b[31m \x9b2J \u202e \U000E0041 \x7f"
    gateway.fail("/v1/models", status=200, body=json.dumps({"text": text}, ensure_ascii=False).encode())

    result = cli.run("api", "/v1/models", "--key", api_key, tty=True)

    assert result.code == 0
    escaped = "caf\u00e9 \u65e5\u672c \U0001F600 \\u001b[31m \\u009b2J \\u202e \\udb40\\udc41 \\u007f"
    assert result.out == '{\n  "text": "' + escaped + '"\n}\n'
    assert json.loads(result.out) == {"text": text}


def test_text_at_a_terminal_shows_control_characters_and_keeps_lines(cli, gateway, api_key):
    gateway.fail("/v1/models", status=200, body=b"one\x1b[2J\n\ttwo", content_type="text/plain")

    result = cli.run("api", "/v1/models", "--key", api_key, tty=True)

    assert result.code == 0
    assert result.out == "one\\x1b[2J\n\ttwo\n"


def test_a_stream_at_a_terminal_ends_its_last_line(cli, raw_gateway, api_key):
    server = raw_gateway(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nno newline \xe2\x9c\x93")

    result = cli.run("api", "/v1/models", "--key", api_key, tty=True, env={"TOKENROUTE_API_URL": server.url})

    assert (result.code, result.err) == (0, "")
    assert result.out == "no newline \u2713\n"


def test_a_streamed_chat_answer_arrives_before_the_stream_ends(cli, gateway, api_key):
    gateway.hold_streams()  # the gateway sends the first event, then waits for the test
    child = subprocess.Popen(
        [console_script(), "api", "/v1/chat/completions", "--key", api_key, *CHAT, "-F", "stream=true"],
        # PYTHONUNBUFFERED unset: the test sees each event only if tokenroute flushes it itself
        env=cli.process_env({"PYTHONUNBUFFERED": ""}), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    lines: queue.Queue[bytes] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in iter(child.stdout.readline, b"")])
    reader.start()
    try:
        first = lines.get(timeout=30)  # a guard against a hang, not a timing
        assert child.poll() is None  # still running: the gateway holds the rest of the stream
        assert json.loads(first.removeprefix(b"data: "))["choices"][0]["delta"]["content"] == "O"
    finally:
        gateway.release_streams()
    assert child.wait(timeout=30) == 0
    reader.join(timeout=30)
    out = first + b"".join(lines.get() for _ in range(lines.qsize()))
    assert child.stderr.read() == b""
    events = out.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""] and len(events) == 5
    assert json.loads(events[1].removeprefix(b"data: "))["choices"][0]["delta"]["content"] == "K"
    assert last(gateway).json["stream"] is True


# ---------------------------------------------------------------- errors and exit codes


@pytest.mark.parametrize(
    "status, body, exit_code, code",
    [
        (400, {"error": {"message": "bad model", "type": "invalid_request_error", "code": "x"}}, 1, "invalid_input"),
        (402, {"error": {"message": "Insufficient balance"}}, 1, "insufficient_balance"),
        (404, {"detail": "Not Found"}, 1, "not_found"),
        (429, {"error": {"message": "slow down"}}, 1, "rate_limited"),
        (500, {"detail": "boom"}, 3, "server"),
        (503, "<html>down</html>", 3, "server"),
    ],
)
def test_an_error_status_prints_the_body_and_exits_with_its_code(cli, gateway, api_key, status, body, exit_code, code):
    gateway.fail("/v1/models", status=status, body=body)

    plain = cli.script("api", "/v1/models", "--key", api_key)
    gateway.fail("/v1/models", status=status, body=body)
    as_json = cli.script("--json", "api", "/v1/models", "--key", api_key)

    sent = body if isinstance(body, str) else json.dumps(body)
    assert (plain.code, plain.out) == (as_json.code, as_json.out) == (exit_code, sent)
    assert len(plain.err.splitlines()) == 1 and plain.err.startswith("error: ")
    assert (as_json.error()["code"], as_json.error()["status"]) == (code, status)
    assert len(sent_to(gateway, "/v1/models")) == 2  # sent once each: api never retries


def sent_to(gateway: Any, path: str) -> list[Any]:
    return [r for r in gateway.requests if r.path_only == path]


def test_an_unreachable_gateway_exits_2(cli, api_key):
    result = cli.script("api", "/v1/models", "--key", api_key, env={"TOKENROUTE_API_URL": "http://127.0.0.1:9"})

    assert result.code == 2
    assert result.err.startswith("error: connection refused by 127.0.0.1")


def test_a_connection_dropped_before_the_answer_exits_2(cli, gateway, api_key):
    gateway.fail("/v1/models", close=True)

    result = cli.script("api", "/v1/models", "--key", api_key)

    assert (result.code, result.out) == (2, "")
    assert result.err.startswith("error: connection to 127.0.0.1 failed")


def test_a_gateway_that_never_answers_times_out_with_exit_2(cli, gateway, api_key):
    gateway.fail("/v1/models", hang=True)

    result = cli.script("api", "/v1/models", "--key", api_key, env={"TOKENROUTE_TIMEOUT": "0.5"})

    assert (result.code, result.out) == (2, "")
    assert result.err == "error: timed out waiting for 127.0.0.1 (TOKENROUTE_TIMEOUT to wait longer)\n"


def test_a_stream_cut_off_mid_chunk_prints_what_came_and_exits_2(cli, raw_gateway, api_key):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    server = raw_gateway(head + b"9\r\ndata: O\n\n\r\n")  # no last chunk: the connection closes

    result = cli.script("api", "/v1/chat/completions", "--key", api_key, env={"TOKENROUTE_API_URL": server.url})

    assert (result.code, result.out) == (2, "data: O\n\n")
    assert result.err == "error: the connection to 127.0.0.1 closed mid-answer\n"


def test_an_answer_shorter_than_its_length_prints_what_came_and_exits_2(cli, gateway, api_key):
    gateway.fail("/v1/models", status=200, body=b"0123456789", truncate=True, content_type="text/plain")

    result = cli.script("api", "/v1/models", "--key", api_key)

    assert (result.code, result.out) == (2, "01234")
    assert result.err == "error: the connection to 127.0.0.1 closed mid-answer\n"


@pytest.mark.parametrize("status, exit_code", [(200, 0), (404, 1)])
def test_head_prints_the_head_and_exits_by_the_status(cli, raw_gateway, api_key, status, exit_code):
    server = raw_gateway(f"HTTP/1.1 {status} Whatever\r\nContent-Type: application/json\r\n".encode()
                         + b"Content-Length: 12\r\n\r\n")  # HEAD: the length of a body not sent

    result = cli.script("api", "-X", "HEAD", "-i", "/v1/models", "--key", api_key,
                        env={"TOKENROUTE_API_URL": server.url})

    assert result.code == exit_code, result
    assert result.out == f"HTTP/1.1 {status} Whatever\nContent-Type: application/json\nContent-Length: 12\n\n"
    assert result.err == ("" if status == 200 else "error: HTTP 404\n")
    assert server.requests[0].startswith(b"HEAD /v1/models HTTP/1.1\r\n")


def test_not_modified_is_no_redirect(cli, gateway, api_key):
    gateway.fail("/v1/models", status=304, body=b"", headers={"ETag": '"v1"'})

    result = cli.script("api", "/v1/models", "--key", api_key, "-H", 'If-None-Match: "v1"')

    assert (result.code, result.out, result.err) == (0, "", "")
    assert last(gateway).header("If-None-Match") == '"v1"'


def test_an_error_echoing_the_key_shows_no_key_on_stderr(cli, gateway, api_key):
    gateway.fail("/v1/models", status=400, body={"error": {"message": f"bad key {api_key}"}})

    result = cli.script("--json", "api", "/v1/models", "--key", api_key)

    assert result.code == 1
    assert api_key not in result.err and api_key[:10] + "..." in result.err


# ---------------------------------------------------------------- the command's place


def test_api_is_in_the_help_and_the_completions_but_not_an_mcp_tool(cli):
    assert "  api " in cli.run("--help").out
    for shell in ("bash", "fish"):
        assert " api" in cli.run("completion", shell).out
    assert "'__fish_seen_subcommand_from api' -l raw-field" in cli.run("completion", "fish").out
    assert '"api>-X") words="GET POST PUT PATCH DELETE HEAD OPTIONS"' in cli.run("completion", "bash").out
    assert "api" not in tokenroute.mcp_tools()


def test_api_help_says_what_it_does(cli):
    result = cli.run("api", "-h")

    assert result.code == 0
    assert result.out.startswith("usage: tokenroute api ")
    assert "example: tokenroute api /api/v1/me" in result.out
    assert "/api/... is sent with your login, /v1/... with your API key (--key), any other path with no credential" \
        in " ".join(result.out.split())
