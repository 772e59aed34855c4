"""`tokenroute mcp` with a host of the 2025-03-26 era (issue 17): the official MCP Python SDK 1.9.4.

That SDK offers protocol 2025-03-26 and refuses any newer answer; it is a dev-only
dependency in its own venv, .venv-mcp-old (made by .ci/run: it needs pydantic < 2.12,
which the current SDK does not accept). tests/mcp_old_client.py runs with that venv's
Python against the installed console script.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, Cli, console_script
from test_mcp_lines import device_polls, wait_for

OLD_PYTHON = REPO / ".venv-mcp-old" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
pytestmark = pytest.mark.skipif(
    not OLD_PYTHON.exists(), reason="no .venv-mcp-old with the MCP Python SDK 1.9.4 (.ci/run makes it)"
)


def test_the_python_sdk_1_9_connects_and_calls_tools(cli: Cli, api_key: str) -> None:
    cli.login()
    cli.cache_key(api_key)
    cli.gateway.interval = 1
    assert cli.run("login", "--no-wait", "--force").code == 0  # approved once login_finish waits for it
    client = subprocess.Popen([str(OLD_PYTHON), str(Path(__file__).with_name("mcp_old_client.py")), console_script()],
                              env=cli.process_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: device_polls(cli) >= 1)
        cli.gateway.approve()
        out, err = client.communicate(timeout=120)
    finally:
        client.kill()
    assert client.returncode == 0, err.decode()
    got = json.loads(out)
    assert got["protocolVersion"] == "2024-11-05"  # the newest this server speaks that is not newer than 2025-03-26
    assert len(got["tools"]) == 13
    balance, keys, topup, login = (got["calls"][name] for name in ("balance", "keys_list", "topup", "login_finish"))
    assert balance["isError"] is False
    assert json.loads(balance["content"][0]["text"]) == cli.run("balance", "--json").json()
    assert json.loads(keys["content"][0]["text"]) == {"items": cli.run("keys", "list", "--json").json()}
    assert topup["isError"] is True and json.loads(topup["content"][0]["text"])["error"]["code"] == "usage"
    assert login["isError"] is False and json.loads(login["content"][0]["text"])["status"] == "logged_in"
    elapsed = [value for value, _ in got["progress"]]  # one per wait between polls, each later
    assert elapsed and elapsed == sorted(set(elapsed)) and 0 <= elapsed[0] and elapsed[-1] <= 20
    assert {total for _, total in got["progress"]} == {20}
