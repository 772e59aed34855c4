"""`tokenroute mcp` (issue 11) driven by the official MCP Python SDK over stdio.

Each test starts the installed console script as the SDK's stdio server against
the fake gateway, and checks that a tool's structured result is exactly the
`--json` output (or `--json` error) of the same command run in process. The
raw-protocol tests write lines to the process themselves: malformed input,
version negotiation, notifications and EOF.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tempfile
from typing import Any

import pytest

from conftest import Cli, console_script
from test_tls import tls_contexts  # noqa: F401  (a fixture)

mcp = pytest.importorskip("mcp", reason="the MCP Python SDK (pip install mcp, Python 3.10+) drives these tests")
from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: E402

TOOLS = {
    "whoami", "balance", "usage", "models", "keys_list", "keys_create", "keys_revoke", "topup", "env", "test",
    "doctor", "login_start", "login_finish",
}
# Tools and the command line that gives the same --json data.
READ_TOOLS = [
    ("whoami", {}, ["whoami"]),
    ("balance", {}, ["balance"]),
    ("usage", {"days": 7}, ["usage", "--days", "7"]),
    ("models", {}, ["models"]),
    ("keys_list", {}, ["keys", "list"]),
    ("env", {}, ["env"]),
]


# ---------------------------------------------------------------- helpers


def session(cli: Cli, calls: Any, *, mode: str = "auto", env: dict[str, str] | None = None) -> Any:
    """Run `calls(client)` against `tokenroute mcp` with the SDK client; returns what it returns.

    The server's stderr is checked to be empty: it must never need to say anything.
    """

    async def main() -> Any:
        params = StdioServerParameters(command=console_script(), args=["mcp"], env=cli.process_env(env))
        with tempfile.TemporaryFile("w+") as errlog:
            async with mcp.Client(stdio_client(params, errlog=errlog), mode=mode) as client:
                outcome = await calls(client)
            errlog.seek(0)
            assert errlog.read() == ""
        return outcome

    return asyncio.run(main())


def call(cli: Cli, name: str, arguments: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    async def calls(client: Any) -> Any:
        return await client.call_tool(name, arguments or {})

    return session(cli, calls, **kwargs)


def serve(cli: Cli, lines: list[bytes], env: dict[str, str] | None = None) -> tuple[int, list[dict], str]:
    """`tokenroute mcp` in process (fake clock) reading `lines`; the exit code, answers and stderr."""
    result = cli.run("mcp", stdin=b"".join(line + b"\n" for line in lines), env=env)
    return result.code, [json.loads(line) for line in result.out.splitlines()], result.err


def raw_exchange(cli: Cli, lines: list[bytes], env: dict[str, str] | None = None) -> tuple[int, list[dict], str]:
    """Write raw lines to `tokenroute mcp`, close stdin; the exit code, answers and stderr."""
    done = subprocess.run(
        [console_script(), "mcp"], input=b"".join(line + b"\n" for line in lines),
        env=cli.process_env(env), capture_output=True, timeout=60,
    )
    answers = [json.loads(line) for line in done.stdout.decode("ascii").splitlines()]
    return done.returncode, answers, done.stderr.decode()


def request(method: str, params: dict[str, Any] | None = None, id: int = 1) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        message["params"] = params
    return json.dumps(message).encode()


def modern(params: dict[str, Any] | None = None, version: str = "2026-07-28") -> dict[str, Any]:
    meta = {"io.modelcontextprotocol/protocolVersion": version, "io.modelcontextprotocol/clientCapabilities": {}}
    return {**(params or {}), "_meta": meta}


def error_of(answer: dict[str, Any]) -> tuple[int, str]:
    return answer["error"]["code"], answer["error"]["message"]


@pytest.fixture
def ready(cli: Cli, api_key: str) -> Cli:
    """Logged in, with a key of $5.00 cached as `keys create` would."""
    cli.login()
    cli.cache_key(api_key)
    return cli


# ---------------------------------------------------------------- tools


def test_tools_list_has_every_tool_with_schema_from_the_command_options(cli: Cli) -> None:
    async def calls(client: Any) -> Any:
        return (await client.list_tools()).tools, client.protocol_version

    tools, version = session(cli, calls)
    assert version == "2026-07-28"  # the SDK's discover probe found a modern server
    by_name = {tool.name: tool for tool in tools}
    assert set(by_name) == TOOLS
    create = by_name["keys_create"].input_schema
    assert create["required"] == ["name"]
    assert create["properties"]["no_cache"] == {
        "type": "boolean", "default": False, "description": "do not cache the raw key in last_key.txt",
    }
    assert create["additionalProperties"] is False
    assert by_name["usage"].input_schema["properties"]["days"]["default"] == 30
    assert by_name["keys_revoke"].input_schema["required"] == ["id"]
    assert by_name["keys_revoke"].annotations.destructive_hint is True
    assert by_name["balance"].annotations.read_only_hint is True
    assert by_name["topup"].annotations.read_only_hint is False
    assert "never pays" in by_name["topup"].description


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_each_read_tool_returns_the_json_of_its_command(ready: Cli, mode: str) -> None:
    ready.gateway.record_usage(100, 20, "0.01")

    async def calls(client: Any) -> Any:
        return [await client.call_tool(name, arguments) for name, arguments, _ in READ_TOOLS]

    results = session(ready, calls, mode=mode)
    for (name, _, argv), result in zip(READ_TOOLS, results):
        expected = ready.run(*argv, "--json").json()
        assert result.is_error is False, (name, result)
        if isinstance(expected, list) and mode == "legacy":  # before 2026-07-28 it must be an object
            expected = {"items": expected}
        assert result.structured_content == expected, name
        assert json.loads(result.content[0].text) == ready.run(*argv, "--json").json(), name


def test_test_sends_one_chat_completion_like_the_command(ready: Cli) -> None:
    result = call(ready, "test", {"model": "openai/gpt-4o"})
    assert result.structured_content == ready.run("test", "--model", "openai/gpt-4o", "--json").json()
    assert result.structured_content["model"] == "openai/gpt-4o"
    chats = [r for r in ready.gateway.requests if r.path == "/v1/chat/completions"]
    assert [r.json["model"] for r in chats] == ["openai/gpt-4o", "openai/gpt-4o"]


def test_keys_create_returns_the_raw_key_once_and_caches_it(ready: Cli) -> None:
    result = call(ready, "keys_create", {"name": "agent"})
    key = result.structured_content
    assert result.is_error is False
    assert key["name"] == "agent" and key["raw"].startswith("sk-tr-")
    assert ready.gateway.keys[key["id"]]["raw"] == key["raw"]
    assert ready.cached_key() == key["raw"]
    assert set(key) == set(ready.run("keys", "create", "--name", "cli", "--json").json())
    assert result.content[1].text == f"The raw key is shown only this once; cached in {ready.last_key}."


def test_keys_create_with_no_cache_leaves_the_cache_alone(ready: Cli, api_key: str) -> None:
    result = call(ready, "keys_create", {"name": "agent", "no_cache": True})
    assert result.structured_content["raw"].startswith("sk-tr-")
    assert ready.cached_key() == api_key


def test_a_key_that_cannot_be_cached_still_reaches_the_agent(cli: Cli) -> None:
    cli.login()
    cli.last_key.mkdir()  # the cache cannot be written
    result = call(cli, "keys_create", {"name": "agent"})
    error = result.structured_content
    assert result.is_error is True and error["code"] == "config"
    assert error["message"].startswith("the key was created but not cached: cannot write")
    assert error["key"]["raw"] == cli.gateway.keys[error["key"]["id"]]["raw"]


def test_keys_revoke_returns_what_the_command_returns(ready: Cli) -> None:
    first, second = ready.gateway.add_key(name="one"), ready.gateway.add_key(name="two")
    result = call(ready, "keys_revoke", {"id": first["id"]})
    by_cli = ready.run("keys", "revoke", second["id"], "--json").json()
    assert result.structured_content == {**by_cli, "id": first["id"], "name": "one", "key_prefix": first["key_prefix"]}
    assert ready.gateway.keys[first["id"]]["status"] == "revoked"


def test_topup_returns_the_checkout_url_for_the_user_and_pays_nothing(ready: Cli) -> None:
    result = call(ready, "topup", {"amount": 5})
    session_data = result.structured_content
    assert set(session_data) == set(ready.run("topup", "--amount", "5", "--json").json())
    assert session_data["amount_usd"] == "5"
    assert session_data["checkout_url"] in result.content[1].text
    assert result.content[1].text.startswith("Give this checkout URL to the user")
    assert not any(checkout["completed"] for checkout in ready.gateway.checkouts.values())
    assert ready.run("balance", "--json").json()["balance_usd"] == "5.00"


def test_doctor_reports_the_same_checks_as_the_command(ready: Cli) -> None:
    """The whole report: the command runs as the same installed script (the python check names its interpreter)."""
    result = call(ready, "doctor")
    by_cli = ready.script("doctor", "--json").json()
    report = result.structured_content
    assert report["ok"] is True
    assert report == by_cli


def test_doctor_with_problems_is_a_report_not_an_error(cli: Cli) -> None:
    result = call(cli, "doctor")
    assert result.is_error is False
    assert result.structured_content["ok"] is False
    login = next(c for c in result.structured_content["checks"] if c["name"] == "login")
    detail = f"not logged in to {cli.gateway.url}"
    assert login == {"name": "login", "status": "problem", "detail": detail, "fix": "tokenroute login"}


# ---------------------------------------------------------------- login in two steps


def test_login_start_then_finish_logs_in(cli: Cli) -> None:
    async def calls(client: Any) -> Any:
        started = await client.call_tool("login_start", {})
        cli.gateway.approve(started.structured_content["user_code"])
        return started, await client.call_tool("login_finish", {"timeout": 0})

    started, finished = session(cli, calls)
    pending = started.structured_content
    assert pending["status"] == "pending" and pending["next"] == "tokenroute login --resume"
    assert pending["user_code"] in started.content[1].text
    assert finished.structured_content == {"status": "logged_in", "api_url": cli.gateway.url}
    assert cli.run("whoami", "--json").code == 0


def test_login_finish_before_approval_is_the_login_pending_error(cli: Cli) -> None:
    async def calls(client: Any) -> Any:
        started = await client.call_tool("login_start", {})
        return started, await client.call_tool("login_finish", {"timeout": 0})

    started, finished = session(cli, calls)
    assert finished.is_error is True
    error = finished.structured_content
    assert error == cli.run("login", "--resume", "--timeout", "0", "--json").error()
    assert error["code"] == "login_pending" and error["pending"] == started.structured_content
    assert json.loads(finished.content[0].text) == {"error": error}


def test_login_start_when_logged_in_says_so(ready: Cli) -> None:
    result = call(ready, "login_start")
    assert result.structured_content == {"status": "logged_in", "api_url": ready.gateway.url}
    assert ready.gateway.device_codes == {}


# ---------------------------------------------------------------- errors


def test_logged_out_account_tools_fail_like_the_commands(cli: Cli) -> None:
    names = [("whoami", ["whoami"]), ("balance", ["balance"]), ("keys_list", ["keys", "list"])]

    async def calls(client: Any) -> Any:
        return [await client.call_tool(name, {}) for name, _ in names]

    for (name, argv), result in zip(names, session(cli, calls)):
        expected = cli.run(*argv, "--json").error()
        assert expected["code"] == "auth_required" and expected["next"] == "tokenroute login"
        assert result.is_error is True
        assert result.structured_content == expected, name
        assert json.loads(result.content[0].text) == {"error": expected}


def test_a_gateway_failure_is_a_tool_error_and_the_server_keeps_serving(ready: Cli) -> None:
    ready.gateway.fail("/api/v1/balance", status=402, body={"detail": "no credit"})

    async def calls(client: Any) -> Any:
        return await client.call_tool("balance", {}), await client.call_tool("balance", {})

    failed, retried = session(ready, calls)
    ready.gateway.fail("/api/v1/balance", status=402, body={"detail": "no credit"})
    expected = ready.run("balance", "--json").error()
    assert failed.structured_content == expected
    assert expected["code"] == "insufficient_balance" and expected["next"] == "tokenroute topup --amount 5"
    assert retried.is_error is False and retried.structured_content["balance_usd"] == "5.00"


def test_a_hanging_gateway_is_bounded_by_tokenroute_timeout(ready: Cli) -> None:
    ready.gateway.fail("/api/v1/balance", hang=True)

    async def calls(client: Any) -> Any:
        return await client.call_tool("balance", {}), await client.call_tool("whoami", {})

    hung, after = session(ready, calls, env={"TOKENROUTE_TIMEOUT": "1"})
    assert hung.is_error is True and hung.structured_content["code"] == "network"
    assert after.is_error is False


def test_env_without_a_key_is_the_no_key_error(cli: Cli) -> None:
    result = call(cli, "env")
    assert result.structured_content == cli.run("env", "--json").error()
    assert result.structured_content["next"] == "tokenroute keys create --name NAME"


def test_a_bad_value_is_a_usage_error_result(ready: Cli) -> None:
    result = call(ready, "topup", {"amount": "lots"})
    assert result.is_error is True
    assert result.structured_content["code"] == "usage"
    assert result.structured_content["message"].startswith("amount: 'lots' is not an amount")
    assert ready.gateway.checkouts == {}


def test_an_unknown_tool_is_invalid_params(cli: Cli) -> None:
    async def calls(client: Any) -> Any:
        with pytest.raises(mcp.MCPError) as raised:
            await client.call_tool("nope", {})
        return raised.value.error

    error = session(cli, calls)
    assert (error.code, error.message) == (-32602, "Unknown tool: nope")


@pytest.mark.parametrize(
    "name, arguments, message",
    [
        ("usage", {"days": "7"}, "days must be integer"),
        ("usage", {"days": 7.5}, "days must be integer"),
        ("usage", {"weeks": 1}, "unknown argument 'weeks' (see the tool's inputSchema)"),
        ("keys_create", {}, "name is required"),
    ],
)
def test_arguments_that_do_not_fit_are_usage_error_results(
    ready: Cli, name: str, arguments: dict, message: str
) -> None:
    """SEP-1303: the model sees what to correct, as a tool error, not a protocol error."""
    result = call(ready, name, arguments)
    assert result.is_error is True
    assert result.structured_content == {"code": "usage", "message": message, "status": None}
    assert [r.path for r in ready.gateway.requests] == []


def test_a_whole_number_written_as_a_float_is_an_integer(ready: Cli) -> None:
    result = call(ready, "usage", {"days": 7.0})
    assert result.is_error is False
    assert result.structured_content == ready.run("usage", "--days", "7", "--json").json()
    assert [r.path for r in ready.gateway.requests][0] == "/api/v1/me/usage?days=7"


@pytest.mark.parametrize("name, arguments", [("keys_revoke", {"id": "\ud800"}), ("keys_create", {"name": "a\ud800b"})])
def test_text_that_is_not_utf8_is_a_usage_error_and_never_sent(ready: Cli, name: str, arguments: dict) -> None:
    code, answers, err = serve(ready, [request("tools/call", {"name": name, "arguments": arguments})])
    assert code == 0 and err == ""
    result = answers[0]["result"]
    assert result["isError"] is True
    assert result["structuredContent"]["code"] == "usage"
    assert result["structuredContent"]["message"] == f"{next(iter(arguments))} is not valid UTF-8 text"
    assert ready.gateway.requests == []


# ---------------------------------------------------------------- the protocol, line by line


def test_initialize_answers_the_clients_version_or_the_latest(cli: Cli) -> None:
    code, answers, err = raw_exchange(cli, [
        request("initialize", {"protocolVersion": "2025-06-18", "capabilities": {}}, id=1),
        request("initialize", {"protocolVersion": "1999-01-01", "capabilities": {}}, id=2),
        request("initialize", {"protocolVersion": "2025-03-26", "capabilities": {}}, id=3),
        b'{"jsonrpc": "2.0", "method": "notifications/initialized"}',
        request("ping", id=4),
    ])
    assert code == 0 and err == ""
    assert [a["id"] for a in answers] == [1, 2, 3, 4]
    assert answers[0]["result"]["protocolVersion"] == "2025-06-18"
    assert answers[0]["result"]["capabilities"] == {"tools": {"listChanged": False}}
    assert answers[0]["result"]["serverInfo"]["name"] == "tokenroute"
    assert answers[1]["result"]["protocolVersion"] == "2025-11-25"
    # 2025-03-26 requires JSON-RPC batches, which this server refuses: it is not offered.
    assert answers[2]["result"]["protocolVersion"] == "2025-11-25"
    assert answers[3] == {"jsonrpc": "2.0", "id": 4, "result": {}}


def test_modern_requests_carry_their_version_and_get_result_types(cli: Cli) -> None:
    code, answers, _ = raw_exchange(cli, [
        request("server/discover", modern(), id=1),
        request("tools/list", modern(), id=2),
        request("tools/list", modern(version="2099-01-01"), id=3),
        request("tools/list", {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}, id=4),
    ])
    assert code == 0
    discover, listing = answers[0]["result"], answers[1]["result"]
    assert discover["supportedVersions"][0] == "2026-07-28" and "2025-11-25" in discover["supportedVersions"]
    assert discover["resultType"] == "complete" and discover["capabilities"] == {"tools": {}}
    assert discover["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "tokenroute"
    assert listing["resultType"] == "complete" and listing["cacheScope"] == "public" and listing["ttlMs"] > 0
    assert answers[2]["error"]["code"] == -32022
    assert answers[2]["error"]["data"]["requested"] == "2099-01-01"
    assert error_of(answers[3]) == (-32602, "Invalid params: _meta lacks io.modelcontextprotocol/clientCapabilities")


def test_malformed_lines_get_json_rpc_errors_and_the_server_goes_on(cli: Cli) -> None:
    code, answers, err = raw_exchange(cli, [
        b"{not json",
        b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": "x"}',
        b'\xff\xfe{"jsonrpc": "2.0", "id": 2, "method": "ping"}',
        b'{"id": 3, "method": "ping"}',
        b'[{"jsonrpc": "2.0", "id": 4, "method": "ping"}]',
        b'{"jsonrpc": "2.0", "id": null, "method": "ping"}',
        b'{"jsonrpc": "2.0", "id": 5, "method": "resources/list"}',
        b'{"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": "balance", "arguments": [1]}}',
        b'{"jsonrpc": "2.0", "id": 7, "method": "ping", "params": [1]}',
        b'{"jsonrpc": "2.0", "id": 8, "method": "ping", "params": {"n": NaN}}',
        b'{"jsonrpc": "2.0", "method": "no/such/notification"}',
        b'{"jsonrpc": "2.0", "id": 9, "result": {}}',
        b"",
        request("ping", id=10),
    ])
    assert code == 0
    assert err == ""
    assert [(a.get("id"), a["error"]["code"] if "error" in a else "ok") for a in answers] == [
        (None, -32700),
        (1, -32600),
        (None, -32700),
        (3, -32600),
        (None, -32600),
        (None, -32600),
        (5, -32601),
        (6, -32602),
        (7, -32602),
        (None, -32700),
        (10, "ok"),
    ]
    assert error_of(answers[6]) == (-32601, "Method not found: resources/list")


def test_eof_on_stdin_ends_the_server_with_exit_0(cli: Cli) -> None:
    assert raw_exchange(cli, []) == (0, [], "")


def test_no_stdin_is_end_of_input(cli: Cli) -> None:
    result = cli.run("mcp")  # a Context without stdin, as a process started with <&- gets
    assert (result.code, result.out, result.err) == (0, "", "")


@pytest.mark.skipif(os.name != "posix", reason="<&- is a POSIX shell's")
def test_the_script_started_with_stdin_closed_exits_0(cli: Cli) -> None:
    done = subprocess.run(["/bin/sh", "-c", 'exec "$0" mcp <&-', console_script()], env=cli.process_env(),
                          capture_output=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")


def test_a_calls_notes_reach_stderr_never_the_result(ready: Cli) -> None:
    key = ready.gateway.add_key(name="cached")
    ready.cache_key(key["raw"], key["id"])
    code, answers, err = serve(ready, [request("tools/call", {"name": "keys_revoke", "arguments": {"id": key["id"]}})])
    note = f"Removed it from the key cache ({ready.last_key})."
    assert code == 0 and err == note + "\n"
    result = answers[0]["result"]
    assert result["isError"] is False and result["structuredContent"]["id"] == key["id"]
    assert len(result["content"]) == 1 and "key cache" not in json.dumps(result)  # stdout is protocol only
    assert ready.cached_key() is None


def test_tool_calls_share_one_tls_context(tls_cli: Cli, tls_contexts: list) -> None:  # noqa: F811
    tls_cli.login()
    calls = [request("tools/call", {"name": name}, id=n) for n, name in enumerate(["balance", "whoami", "keys_list"])]
    code, answers, err = serve(tls_cli, calls)
    assert code == 0 and err == ""
    assert [a["result"]["isError"] for a in answers] == [False, False, False]
    assert tls_cli.gateway.handshakes["ok"] == 3
    assert len(tls_contexts) == 1


def test_a_call_that_runs_out_of_time_leaves_nothing_running(cli: Cli, api_key: str) -> None:
    """A slow refresh, then a slow key creation, 1.4 s in all with TOKENROUTE_TIMEOUT=1:
    either the key reaches the agent, or the call fails and no key was created."""
    cli.login(expires_in=0)
    cli.cache_key(api_key)
    cli.gateway.slow("/oidc/token", 0.7)
    cli.gateway.slow("/api/v1/me/keys", 0.7, method="POST")
    cli.gateway.slow("/api/v1/balance", 0.8)  # answered after a late key creation would have landed

    async def calls(client: Any) -> Any:
        created = await client.call_tool("keys_create", {"name": "late"})
        return created, await client.call_tool("balance", {})

    created, after = session(cli, calls, env={"TOKENROUTE_TIMEOUT": "1"})
    new_keys = [k for k in cli.gateway.keys.values() if k["name"] == "late"]
    if created.is_error:
        assert created.structured_content["code"] == "network"
        assert new_keys == []
        assert cli.cached_key() == api_key
    else:
        assert [k["raw"] for k in new_keys] == [created.structured_content["raw"]]
        assert cli.cached_key() == created.structured_content["raw"]
    assert after.is_error is False


def test_stdout_carries_only_protocol_messages_even_for_a_failing_tool(cli: Cli) -> None:
    code, answers, err = raw_exchange(cli, [request("tools/call", {"name": "whoami"}, id=1)])
    assert code == 0 and err == ""
    assert answers == [{"jsonrpc": "2.0", "id": 1, "result": {
        "content": [{"type": "text", "text": json.dumps({"error": cli.run("whoami", "--json").error()})}],
        "structuredContent": cli.run("whoami", "--json").error(),
        "isError": True,
    }}]


def test_a_list_result_is_the_array_itself_on_2026_07_28(ready: Cli) -> None:
    _, answers, _ = raw_exchange(ready, [request("tools/call", modern({"name": "keys_list"}))])
    assert answers[0]["result"]["structuredContent"] == ready.run("keys", "list", "--json").json()
    assert answers[0]["result"]["resultType"] == "complete"

