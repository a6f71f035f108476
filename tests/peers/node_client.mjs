// The npm TypeScript SDK's client (@modelcontextprotocol/sdk), unmodified, driven by the
// end-to-end peer tests.
//
//     node node_client.mjs SESSIONS
//
// SESSIONS is a JSON list of {"url", "token", "ops"}; an op is {"op": "list"} or
// {"op": "call", "name", "arguments"}. Prints one JSON list: per session, the negotiated
// protocol version and one outcome per op ({"ok": true, "tools": [...]},
// {"ok": true, "text", "is_error"} or {"ok": false, "error"}), or the session's own failure.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

async function session({ url, token, ops }) {
  const transport = new StreamableHTTPClientTransport(new URL(url), {
    requestInit: { headers: { Authorization: `Bearer ${token}` } },
  });
  const client = new Client({ name: "attestplane-peer-test", version: "1.0.0" });
  await client.connect(transport);
  const outcomes = [];
  for (const op of ops) {
    try {
      if (op.op === "list") {
        const listed = await client.listTools();
        outcomes.push({ ok: true, tools: listed.tools.map((t) => t.name).sort() });
      } else if (op.op === "call") {
        const result = await client.callTool({ name: op.name, arguments: op.arguments ?? {} });
        const text = (result.content ?? []).map((c) => c.text ?? "").join(" ");
        outcomes.push({ ok: true, text, is_error: Boolean(result.isError) });
      } else {
        throw new Error(`unknown op ${op.op}`);
      }
    } catch (e) {
      outcomes.push({ ok: false, error: `${e?.name}: ${e?.message}` });
    }
  }
  const version = transport.protocolVersion ?? null;
  await transport.terminateSession().catch(() => {});
  await client.close();
  return { protocol_version: version, outcomes };
}

const out = [];
for (const s of JSON.parse(process.argv[2])) {
  try {
    out.push(await session(s));
  } catch (e) {
    out.push({ failed: `${e?.name}: ${e?.message}` });
  }
}
console.log(JSON.stringify(out));
