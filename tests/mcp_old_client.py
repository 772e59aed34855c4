"""A host of the 2025-03-26 era: the official MCP Python SDK 1.9.4 (tests/test_mcp_compat.py runs
this with the interpreter of .venv-mcp-old). It starts `COMMAND mcp`, talks to it as that SDK
does, and prints what it got as one JSON object. Not a test: pytest does not collect it."""
from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


async def main(command: str) -> dict[str, Any]:
    params = StdioServerParameters(command=command, args=["mcp"], env=dict(os.environ))
    progress: list[list[float | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None = None) -> None:
        progress.append([value, total])

    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            initialized = await session.initialize()
            tools = await session.list_tools()
            await session.send_ping()
            calls = {
                "balance": await session.call_tool("balance", {}),
                "keys_list": await session.call_tool("keys_list", {}),
                "topup": await session.call_tool("topup", {"amount": "lots"}),
                "login_finish": await session.call_tool("login_finish", {"timeout": 20}, progress_callback=on_progress),
            }
    return {
        "protocolVersion": initialized.protocolVersion,
        "tools": sorted(tool.name for tool in tools.tools),
        "calls": {name: result.model_dump(mode="json", by_alias=True) for name, result in calls.items()},
        "progress": progress,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1]))))
