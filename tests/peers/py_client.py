"""The PyPI `mcp` 2.x SDK's client, unmodified, driven by the end-to-end peer tests.

    py_client.py SESSIONS

SESSIONS is a JSON list (one Python start for many sessions: starting Python is the slow
part) of `{"url": ..., "token": ..., "mode": ..., "ops": [...]}`. `mode` is the SDK's `mode=`:
`legacy` (the initialize handshake, 2025-11-25) or `2026-07-28` (the modern, stateless era).
An op is `{"op": "list"}` or `{"op": "call", "name": ..., "arguments": {...}}`. Prints one
JSON list: per session, the negotiated protocol version and one outcome per op
(`{"ok": true, "tools": [...]}`, `{"ok": true, "text": ..., "is_error": ...}` or
`{"ok": false, "error": ...}`), or the session's own failure.

A session with `"sampling": TEXT` has a sampling callback (the client's model) that answers
every `sampling/createMessage` with TEXT; the texts it was asked are reported as `sampled`.
"""

import asyncio
import json
import sys

from mcp import Client, types
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


async def session(url: str, token: str, mode: str, ops: list, sampling: str | None = None) -> dict:
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    outcomes = []
    sampled = []

    async def model(context, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        for m in params.messages:
            sampled.append(getattr(m.content, "text", ""))
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text=sampling),
            model="peer-model",
        )

    extra = {"sampling_callback": model} if sampling is not None else {}
    async with http:
        async with Client(
            streamable_http_client(url, http_client=http), mode=mode, cache=None, **extra
        ) as client:
            for op in ops:
                try:
                    if op["op"] == "list":
                        listed = await client.list_tools()
                        outcomes.append({"ok": True, "tools": sorted(t.name for t in listed.tools)})
                    elif op["op"] == "call":
                        result = await client.call_tool(op["name"], op.get("arguments") or {})
                        text = " ".join(getattr(c, "text", "") for c in result.content)
                        outcomes.append({"ok": True, "text": text, "is_error": bool(result.is_error)})
                    else:
                        raise ValueError(f"unknown op {op['op']!r}")
                except Exception as e:  # the test asserts on the message
                    outcomes.append({"ok": False, "error": f"{type(e).__name__}: {e}"})
            version = client.protocol_version
    return {"protocol_version": version, "outcomes": outcomes, "sampled": sampled}


async def run(sessions: list) -> list:
    out = []
    for s in sessions:
        try:
            out.append(await session(s["url"], s["token"], s["mode"], s["ops"], s.get("sampling")))
        except BaseException as e:  # noqa: BLE001 - reported to the test, which fails on it
            out.append({"failed": f"{type(e).__name__}: {e!r}"})
    return out


def main() -> int:
    print(json.dumps(asyncio.run(run(json.loads(sys.argv[1])))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
