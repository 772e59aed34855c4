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

OLD_PYTHON = REPO / ".venv-mcp-old" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
pytestmark = pytest.mark.skipif(
    not OLD_PYTHON.exists(), reason="no .venv-mcp-old with the MCP Python SDK 1.9.4 (.ci/run makes it)"
)


def test_the_python_sdk_1_9_connects_and_calls_tools(cli: Cli, api_key: str) -> None:
    cli.login()
    cli.cache_key(api_key)
    assert cli.run("login", "--no-wait", "--force").code == 0  # a login nobody approves, for login_finish to wait on
    done = subprocess.run([str(OLD_PYTHON), str(Path(__file__).with_name("mcp_old_client.py")), console_script()],
                          env=cli.process_env(), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    got = json.loads(done.stdout)
    assert got["protocolVersion"] == "2024-11-05"  # the newest this server speaks that is not newer than 2025-03-26
    assert len(got["tools"]) == 13
    balance, keys, topup, login = (got["calls"][name] for name in ("balance", "keys_list", "topup", "login_finish"))
    assert balance["isError"] is False
    assert json.loads(balance["content"][0]["text"]) == cli.run("balance", "--json").json()
    assert json.loads(keys["content"][0]["text"]) == {"items": cli.run("keys", "list", "--json").json()}
    assert topup["isError"] is True and json.loads(topup["content"][0]["text"])["error"]["code"] == "usage"
    assert login["isError"] is True and json.loads(login["content"][0]["text"])["error"]["code"] == "login_pending"
    [(elapsed, total)] = got["progress"]  # one wait, from the first poll to the end of the second
    assert total == 1.0 and 0 <= elapsed < 1
