"""`tokenroute mcp` (issues 11, 17) driven by the official MCP Python SDK over stdio.

Each test starts the installed console script as the SDK's stdio server against
the fake gateway, and checks that a tool's structured result is the `--json`
output (or `--json` error) of the same command run in process. These need the
SDK (Python 3.10+) and skip without it; tests/test_mcp_lines.py drives the
server line by line without it, and tests/test_mcp_compat.py with an old SDK.
"""
from __future__ import annotations

import asyncio
import json
import tempfile
from typing import Any

import pytest

from conftest import Cli, console_script
from test_mcp_lines import TOOLS, ready  # noqa: F401  (ready: a fixture)

mcp = pytest.importorskip("mcp", reason="the MCP Python SDK (pip install mcp, Python 3.10+) drives these tests")
from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: E402

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



def session(cli: Cli, calls: Any, *, mode: str = "auto", env: dict[str, str] | None = None,
            args: tuple[str, ...] = ()) -> Any:
    """Run `calls(client)` against `tokenroute mcp ARGS` with the SDK client; returns what it returns.

    The server's stderr is checked to be empty: it must never need to say anything.
    """

    async def main() -> Any:
        params = StdioServerParameters(command=console_script(), args=["mcp", *args], env=cli.process_env(env))
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
def test_each_read_tool_returns_the_json_of_its_command_as_an_object(ready: Cli, mode: str) -> None:
    """One shape on every protocol version: a list comes as {"items": [...]}."""
    ready.gateway.record_usage(100, 20, "0.01")

    async def calls(client: Any) -> Any:
        return [await client.call_tool(name, arguments) for name, arguments, _ in READ_TOOLS]

    results = session(ready, calls, mode=mode)
    for (name, _, argv), result in zip(READ_TOOLS, results):
        expected = ready.run(*argv, "--json").json()
        expected = {"items": expected} if isinstance(expected, list) else expected
        assert result.is_error is False, (name, result)
        assert result.structured_content == expected, name
        assert json.loads(result.content[0].text) == expected, name


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


def test_keys_revoke_returns_what_the_command_returns(ready: Cli) -> None:
    first, second = ready.gateway.add_key(name="one"), ready.gateway.add_key(name="two")
    result = call(ready, "keys_revoke", {"id": first["id"]})
    by_cli = ready.run("keys", "revoke", second["id"], "--json").json()
    assert result.structured_content == {**by_cli, "id": first["id"], "name": "one", "key_prefix": first["key_prefix"]}
    assert ready.gateway.keys[first["id"]]["status"] == "revoked"


def test_topup_returns_the_checkout_url_for_the_user_and_pays_nothing(ready: Cli) -> None:
    result = call(ready, "topup", {"amount": "5"})
    session_data = result.structured_content
    assert set(session_data) == set(ready.run("topup", "--amount", "5", "--json").json())
    assert session_data["amount_usd"] == "5"
    assert session_data["checkout_url"].startswith("https://checkout.stripe.com/")
    assert result.content[1].text == (
        "Give the user the checkout_url of this result: they pay 5 USD in a browser; nothing is paid until they do."
    )
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
    code = pending["user_code"]
    assert pending["status"] == "pending" and pending["next"] == "login_finish"  # the tool, not the command
    assert started.content[1].text == (
        f"Ask the user to open the verification_uri_complete of this result and approve the code {code} "
        f"(or enter it at the verification_uri), then call login_finish with user_code {code}."
    )
    assert finished.structured_content == {"status": "logged_in", "api_url": cli.gateway.url}
    assert cli.run("whoami", "--json").code == 0


def test_login_finish_before_approval_is_the_login_pending_error(cli: Cli) -> None:
    async def calls(client: Any) -> Any:
        started = await client.call_tool("login_start", {})
        return started, await client.call_tool("login_finish", {"timeout": 0})

    started, finished = session(cli, calls)
    assert finished.is_error is True
    error = finished.structured_content["error"]
    command = cli.run("login", "--resume", "--timeout", "0", "--json").error()
    assert command["next"] == command["pending"]["next"] == "tokenroute login --resume"
    assert error == dict(command, next="login_finish", pending=dict(command["pending"], next="login_finish"))
    assert error["code"] == "login_pending" and error["pending"] == started.structured_content
    assert json.loads(finished.content[0].text) == {"error": error}


def test_login_start_when_logged_in_says_so(ready: Cli) -> None:
    result = call(ready, "login_start")
    assert result.structured_content == {"status": "logged_in", "api_url": ready.gateway.url}
    assert ready.gateway.device_codes == {}


def test_login_finish_finishes_the_login_its_server_started_not_a_newer_one(cli: Cli) -> None:
    """Another host (or `login --no-wait`) starting a login later takes nothing from this one."""

    async def calls(client: Any) -> Any:
        started = await client.call_tool("login_start", {})
        assert cli.run("login", "--no-wait").code == 0  # another login, started later
        cli.gateway.approve(started.structured_content["user_code"])  # the person approves the agent's
        return await client.call_tool("login_finish", {"timeout": 0})

    finished = session(cli, calls)
    assert finished.structured_content == {"status": "logged_in", "api_url": cli.gateway.url}
    [other] = cli.gateway.device_codes.values()  # the later login ended with this one: it would replace it
    assert cli.run("login", "--resume", "--user-code", other.user_code, "--json").json()["status"] == "logged_in"
    assert not (cli.config_dir / "pending_login.json").exists()


# ---------------------------------------------------------------- errors


def test_logged_out_account_tools_fail_like_the_commands(cli: Cli) -> None:
    names = [("whoami", ["whoami"]), ("balance", ["balance"]), ("keys_list", ["keys", "list"])]

    async def calls(client: Any) -> Any:
        return [await client.call_tool(name, {}) for name, _ in names]

    for (name, argv), result in zip(names, session(cli, calls)):
        expected = cli.run(*argv, "--json").error()
        assert expected["code"] == "auth_required" and expected["next"] == "tokenroute login"
        expected["next"] = "login_start"  # the tool that does it
        assert result.is_error is True
        assert result.structured_content == {"error": expected}, name
        assert json.loads(result.content[0].text) == {"error": expected}


def test_a_gateway_failure_is_a_tool_error_and_the_server_keeps_serving(ready: Cli) -> None:
    ready.gateway.fail("/api/v1/balance", status=402, body={"detail": "no credit"})

    async def calls(client: Any) -> Any:
        return await client.call_tool("balance", {}), await client.call_tool("balance", {})

    failed, retried = session(ready, calls)
    ready.gateway.fail("/api/v1/balance", status=402, body={"detail": "no credit"})
    expected = ready.run("balance", "--json").error()
    assert expected["code"] == "insufficient_balance" and expected["next"] == "tokenroute topup --amount 5"
    assert failed.structured_content == {"error": dict(expected, next="topup")}
    assert retried.is_error is False and retried.structured_content["balance_usd"] == "5.00"


def test_a_hanging_gateway_is_bounded_by_tokenroute_timeout(ready: Cli) -> None:
    ready.gateway.fail("/api/v1/balance", hang=True)

    async def calls(client: Any) -> Any:
        return await client.call_tool("balance", {}), await client.call_tool("whoami", {})

    hung, after = session(ready, calls, env={"TOKENROUTE_TIMEOUT": "1"})
    assert hung.is_error is True and hung.structured_content["error"]["code"] == "network"
    assert after.is_error is False


def test_env_without_a_key_is_the_no_key_error(cli: Cli) -> None:
    result = call(cli, "env")
    expected = cli.run("env", "--json").error()
    assert expected["next"] == "tokenroute keys create --name NAME"
    assert result.structured_content == {"error": dict(expected, next="keys_create")}


def test_a_bad_value_is_a_usage_error_result(ready: Cli) -> None:
    result = call(ready, "topup", {"amount": "lots"})
    assert result.is_error is True
    assert result.structured_content["error"]["code"] == "usage"
    assert result.structured_content["error"]["message"].startswith("amount: 'lots' is not an amount")
    assert ready.gateway.checkouts == {}


def test_an_unknown_tool_is_invalid_params(cli: Cli) -> None:
    async def calls(client: Any) -> Any:
        with pytest.raises(mcp.MCPError) as raised:
            await client.call_tool("nope", {})
        return raised.value.error

    error = session(cli, calls)
    assert (error.code, error.message) == (-32602, "Unknown tool: nope")



def test_a_whole_number_written_as_a_float_is_an_integer(ready: Cli) -> None:
    result = call(ready, "usage", {"days": 7.0})
    assert result.is_error is False
    assert result.structured_content == ready.run("usage", "--days", "7", "--json").json()
    assert [r.path for r in ready.gateway.requests][0] == "/api/v1/me/usage?days=7"
