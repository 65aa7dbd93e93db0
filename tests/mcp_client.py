"""Drives `tunnel-svc mcp` with the reference MCP client (the `mcp` package):
initialize, list the tools, explain the monitor's own port, then wait for
a port that opens a moment later. Prints one JSON line of what it got.

Usage: mcp_client.py PORT MONITOR_PORT STATE_DIR TUNNEL-SVC ARGS...
"""

import asyncio
import json
import os
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


def field(obj, snake, camel):
    """A field by the name this version of the package gives it."""
    return getattr(obj, snake) if hasattr(obj, snake) else getattr(obj, camel)


def data(result):
    assert not field(result, "is_error", "isError"), result
    structured = field(result, "structured_content", "structuredContent")
    if structured is not None:
        return structured
    return json.loads(result.content[0].text)


async def main():
    port, monitor_port, state_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    argv = sys.argv[4:]
    env = {"PATH": os.environ.get("PATH", ""), "NO_COLOR": "1", "PORTHOLE_STATE_DIR": state_dir}
    params = StdioServerParameters(command=argv[0], args=argv[1:], env=env)
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            tools = [t.name for t in (await session.list_tools()).tools]
            why = data(await session.call_tool("explain_port", {"port": monitor_port}))
            print("calling wait_for_port", flush=True)
            ready = data(await session.call_tool("wait_for_port", {"port": port, "timeout_seconds": 20}))
            print(json.dumps({
                "server": field(init, "server_info", "serverInfo").name,
                "tools": tools,
                "why": why["explanation"],
                "url": ready["url"],
            }), flush=True)


asyncio.run(main())
