//! `attestplane mcp connect SERVER`: a stdio MCP server that bridges any stdio-configured MCP
//! client (desktop apps, IDEs) to the control plane's gateway endpoint for SERVER.
//!
//! Before it bridges anything it verifies the control plane: a fresh nonce, the attestation
//! document chained to the pinned root with the expected PCRs (the same check as `handle
//! resolve`). Then it reads newline-delimited JSON-RPC messages on stdin and POSTs each, as it
//! came, to `{gateway}/mcp/{SERVER}` with the agent's bearer token; answers (plain JSON, or the
//! events of an SSE stream) are written to stdout, one message per line. It mirrors the modern
//! era's headers from the body (`MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name`) and keeps the
//! legacy era's session id; it parses nothing else and changes no message.
//!
//! What it does not do: it does not bind the HTTP connection to the attested enclave. Until
//! TLS ends inside the enclave (the confidential transport), the host between this bridge and
//! the enclave sees the token and the traffic; what the host cannot do is forge a decision, a
//! receipt or a log entry.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use clap::Subcommand;
use reqwest::StatusCode;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use super::attest::{ControlPlaneTrust, attested_control_plane};
use super::http::Api;
use super::{CliError, CliResult, ClientContext, read_bearer};

/// The longest line (one JSON-RPC message) read from stdin.
pub const MAX_LINE: usize = 4 * 1024 * 1024;

/// The largest answer read from the gateway.
pub const MAX_ANSWER: usize = 8 * 1024 * 1024;

/// The `mcp` commands.
#[derive(Debug, Subcommand)]
pub enum McpCommand {
    /// Serve MCP on stdin/stdout, bridged to the gateway's endpoint for SERVER, after
    /// verifying the control plane's attestation.
    Connect {
        /// The registered server id.
        server: String,
        /// The gateway's base URL (agents' MCP endpoints are `{gateway}/mcp/{id}`).
        #[arg(
            long,
            env = "ATTESTPLANE_GATEWAY",
            default_value = "http://127.0.0.1:7300"
        )]
        gateway: String,
    },
}

/// Runs an `mcp` command.
pub async fn run(command: McpCommand, context: &ClientContext) -> CliResult {
    let McpCommand::Connect { server, gateway } = command;
    if !server
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        || server.is_empty()
    {
        return Err(CliError::Usage(format!("{server:?} is not a server id")));
    }
    let bearer = read_bearer(context)?;
    let trust = ControlPlaneTrust::of(context)?;
    verify(&Api::new(&context.url)?, &trust).await?;
    let endpoint = format!("{}/mcp/{server}", gateway.trim_end_matches('/'));
    if !endpoint.starts_with("http://") {
        return Err(CliError::Usage(
            "--gateway takes an http:// URL (TLS to the enclave is not built yet)".into(),
        ));
    }
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| CliError::Failed(format!("cannot build the HTTP client: {e}")))?;
    bridge(&client, &endpoint, &bearer).await
}

/// Verifies the control plane's attestation with a fresh nonce.
async fn verify(api: &Api, trust: &ControlPlaneTrust) -> CliResult {
    attested_control_plane(api, trust).await?;
    eprintln!("attestplane mcp: the control plane's attestation verified; bridging stdio");
    Ok(())
}

/// The headers a modern-era message mirrors, read from its body.
fn mirrored(message: &serde_json::Value) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let version = message
        .pointer("/params/_meta/io.modelcontextprotocol~1protocolVersion")
        .and_then(|v| v.as_str());
    if let Some(v) = version {
        out.push(("mcp-protocol-version", v.to_owned()));
        if let Some(m) = message.get("method").and_then(|m| m.as_str()) {
            out.push(("mcp-method", m.to_owned()));
        }
        let name = message
            .pointer("/params/name")
            .or_else(|| message.pointer("/params/uri"))
            .and_then(|n| n.as_str());
        if let Some(n) = name {
            let value = if n.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                n.to_owned()
            } else {
                format!("=?base64?{}?=", BASE64.encode(n))
            };
            out.push(("mcp-name", value));
        }
    }
    out
}

async fn bridge(client: &reqwest::Client, endpoint: &str, bearer: &str) -> CliResult {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    let mut session: Option<String> = None;
    while let Some(line) = lines
        .next_line()
        .await
        .map_err(|e| CliError::Failed(format!("reading stdin: {e}")))?
    {
        if line.trim().is_empty() {
            continue;
        }
        if line.len() > MAX_LINE {
            return Err(CliError::Failed("a message on stdin is too long".into()));
        }
        // Only to mirror headers: the body is sent as it came.
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        let mut request = client
            .post(endpoint)
            .bearer_auth(bearer)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(line.clone());
        for (k, v) in mirrored(&parsed) {
            request = request.header(k, v);
        }
        if let Some(s) = &session {
            request = request.header("mcp-session-id", s.as_str());
        }
        let response = request
            .send()
            .await
            .map_err(|e| CliError::Failed(format!("the gateway is unreachable: {e}")))?;
        let status = response.status();
        if let Some(s) = response
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
        {
            session = Some(s.to_owned());
        }
        let sse = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let body = read_bounded(response).await?;
        if status == StatusCode::ACCEPTED || body.is_empty() {
            continue;
        }
        let messages: Vec<String> = if sse {
            sse_data(&body)
        } else {
            vec![String::from_utf8_lossy(&body).into_owned()]
        };
        for m in messages {
            // One message per line: JSON text has no raw newline outside strings, but a
            // pretty-printed answer would; compact it without reinterpreting anything.
            let one_line = if m.contains('\n') {
                m.replace(['\r', '\n'], "")
            } else {
                m
            };
            stdout
                .write_all(one_line.as_bytes())
                .await
                .and(stdout.write_all(b"\n").await)
                .and(stdout.flush().await)
                .map_err(|e| CliError::Failed(format!("writing stdout: {e}")))?;
        }
    }
    Ok(())
}

async fn read_bounded(mut response: reqwest::Response) -> CliResult<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| CliError::Failed(format!("reading the gateway's answer: {e}")))?
    {
        if body.len() + chunk.len() > MAX_ANSWER {
            return Err(CliError::Failed("the gateway's answer is too large".into()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The `data` of each event in an SSE stream.
fn sse_data(stream: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(stream);
    let mut out = Vec::new();
    let mut data = String::new();
    for line in text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)) {
        if line.is_empty() {
            if !data.is_empty() {
                out.push(std::mem::take(&mut data));
            }
        } else if let Some(d) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(d.strip_prefix(' ').unwrap_or(d));
        }
    }
    if !data.is_empty() {
        out.push(data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modern_messages_mirror_their_headers_legacy_ones_none() {
        let m: serde_json::Value = serde_json::from_str(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"wéather","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#,
        )
        .unwrap();
        assert_eq!(
            mirrored(&m),
            vec![
                ("mcp-protocol-version", "2026-07-28".to_owned()),
                ("mcp-method", "tools/call".to_owned()),
                ("mcp-name", "=?base64?d8OpYXRoZXI=?=".to_owned()),
            ]
        );
        let legacy: serde_json::Value =
            serde_json::from_str(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#).unwrap();
        assert!(mirrored(&legacy).is_empty());
    }

    #[test]
    fn sse_events_are_split() {
        assert_eq!(
            sse_data(b"event: message\r\ndata: {\"a\":1}\r\n\r\ndata: {\"b\":2}\n\n"),
            vec!["{\"a\":1}".to_owned(), "{\"b\":2}".to_owned()]
        );
    }
}
