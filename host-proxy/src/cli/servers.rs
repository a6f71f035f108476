//! `servers register|update|revoke|attest|list`.
//!
//! Registration, update and revocation are signed admin requests ([`super::submit`]). `attest`
//! asks the proxy to fetch the server's attestation document with a nonce from the enclave and
//! hand it over; the enclave verifies and logs the result. `list` is the agent's view (the
//! servers the policy lets its token discover).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use attestplane_verifier::admin::{
    AdminAction, Assurance, ClientRequest, Digest32, PcrHex, Price, ServerSpec,
};
use attestplane_verifier::attestation::{Pcr, PcrIndex};
use clap::{Args, Subcommand, ValueEnum};
use reqwest::Url;
use serde_json::json;

use super::http::Api;
use super::keys::admin_key;
use super::pcrs::{merge, parse_pcr_flag};
use super::submit::submit_admin;
use super::{CliError, CliResult, ClientContext, clean, print_json, read_bearer};
pub use crate::api::body::ListedServer;
use crate::api::body::{AttestVerified, ServerList};

/// `servers ...`.
#[derive(Debug, Subcommand)]
pub enum ServersCommand {
    /// Register an MCP server: with the measurements (PCRs) it must attest to, or with
    /// `--assurance none` (a plain server, never attested; its tools are still pinned).
    Register(ServerFlags),
    /// Replace a server's registration (its attestation must then be redone).
    Update(ServerFlags),
    /// Revoke a server: no handle is issued for it afterwards.
    Revoke {
        /// The server's id.
        id: String,
    },
    /// Have the control plane fetch and verify the server's attestation now.
    Attest {
        /// The server's id.
        id: String,
    },
    /// List the servers the agent's token (--token) may discover.
    List,
    /// Re-pin a server's tools to its live listing: fetch the listing from the registered
    /// endpoint, show the difference from the pinned set (added, removed and changed tools,
    /// invisible characters escaped), and on confirmation sign and submit the re-pin (an
    /// `update_server` act that changes only the pins), confirmed like every admin act.
    Pin {
        /// The server's id.
        id: String,
        /// Sign without asking.
        #[arg(long)]
        yes: bool,
    },
}

/// The flags of a server registration.
///
/// The server's PCR file is `--server-pcrs`, an argument with its own id: the global `--pcrs`
/// (and `ATTESTPLANE_PCRS`) names the *control plane's* PCRs, and clap hands a global's value to
/// every subcommand argument sharing its id, so sharing it would let the control plane's file
/// become a server's expected measurements.
#[derive(Debug, Args)]
pub struct ServerFlags {
    /// Stable id, unique in the registry.
    #[arg(long)]
    pub id: String,
    /// Human name (default: the id).
    #[arg(long)]
    pub name: Option<String>,
    /// The tenant that owns it.
    #[arg(long)]
    pub tenant: String,
    /// Its OAuth resource URI: the `aud` of the handles issued for it.
    #[arg(long, value_name = "URI")]
    pub resource: String,
    /// Base URL the proxy fetches `{URL}/attestation?nonce=HEX` from (http://).
    #[arg(long, value_name = "URL")]
    pub endpoint: String,
    /// JSON file of the PCRs the server's attestation must carry ({"PCR0": "hex", ...}, as the
    /// demo server's --print-pcrs and `attestplane-verify eif --json` write). Not the global
    /// --pcrs, which names the control plane's PCRs.
    #[arg(id = "server_pcrs", long = "server-pcrs", value_name = "FILE")]
    pub pcrs: Option<PathBuf>,
    /// An expected PCR as N=HEX (repeatable; combines with --server-pcrs).
    #[arg(long = "pcr", value_name = "N=HEX", value_parser = parse_pcr_flag)]
    pub pcr: Vec<(PcrIndex, Pcr)>,
    /// Accept attestations from a debug-mode enclave (all-zero PCRs). Never in production.
    #[arg(long)]
    pub allow_debug: bool,
    /// How old its verified attestation may get before it counts as unattested.
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    pub max_age: humantime::Duration,
    /// A pinned tool: NAME=SHA256HEX of its canonical definition (repeatable).
    #[arg(long = "tool", value_name = "NAME=SHA256HEX", value_parser = parse_tool)]
    pub tools: Vec<(String, [u8; 32])>,
    /// How the server's identity is established: `nitro` (its attestation document verified
    /// against the PCRs given) or `none` (a plain server: no PCRs, never attested; the policy
    /// sees `context.server_assurance`).
    #[arg(long, value_enum, default_value_t = AssuranceFlag::Nitro)]
    pub assurance: AssuranceFlag,
    /// The price of one call of a pinned tool: TOOL=AMOUNT:ASSET, AMOUNT in atomic units of
    /// ASSET (repeatable; e.g. `forecast=250:credits`).
    #[arg(long = "price", value_name = "TOOL=AMOUNT:ASSET", value_parser = parse_price)]
    pub prices: Vec<(String, Price)>,
    /// A server-to-client request the server may make through the gateway (repeatable; none
    /// by default).
    #[arg(long = "client-request", value_enum, value_name = "KIND")]
    pub client_requests: Vec<ClientRequestFlag>,
}

/// `--assurance`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AssuranceFlag {
    /// Attested: a Nitro Enclave's attestation document, verified against the PCRs.
    Nitro,
    /// None: a plain server (no PCRs, never attested).
    None,
}

/// `--client-request`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ClientRequestFlag {
    /// `sampling/createMessage`.
    Sampling,
    /// `elicitation/create`.
    Elicitation,
    /// `roots/list`.
    Roots,
}

/// Parses `TOOL=AMOUNT:ASSET` (a clap value parser).
pub fn parse_price(s: &str) -> Result<(String, Price), String> {
    let (tool, price) = s
        .split_once('=')
        .ok_or_else(|| format!("expected TOOL=AMOUNT:ASSET, got {s:?}"))?;
    let (amount, asset) = price
        .split_once(':')
        .ok_or_else(|| format!("expected TOOL=AMOUNT:ASSET, got {s:?}"))?;
    if tool.is_empty() || asset.is_empty() {
        return Err(format!("empty tool or asset in {s:?}"));
    }
    let amount = amount
        .parse::<u64>()
        .map_err(|_| format!("price of {tool:?}: {amount:?} is not a whole number of units"))?;
    Ok((
        tool.to_owned(),
        Price {
            amount,
            asset: asset.to_owned(),
        },
    ))
}

/// Parses `NAME=SHA256HEX` (a clap value parser).
pub fn parse_tool(s: &str) -> Result<(String, [u8; 32]), String> {
    let (name, digest) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("expected NAME=SHA256HEX, got {s:?}"))?;
    if name.is_empty() {
        return Err(format!("empty tool name in {s:?}"));
    }
    let mut raw = [0u8; 32];
    hex::decode_to_slice(digest, &mut raw)
        .map_err(|_| format!("tool {name:?}: the digest is not 64 hex digits"))?;
    Ok((name.to_owned(), raw))
}

impl ServerFlags {
    /// The registration these flags describe.
    pub fn spec(&self) -> CliResult<ServerSpec> {
        let pcrs = merge(self.pcrs.as_deref(), &self.pcr)?;
        let assurance = match self.assurance {
            AssuranceFlag::Nitro => Assurance::Nitro,
            AssuranceFlag::None => Assurance::None,
        };
        if assurance == Assurance::Nitro && pcrs.is_empty() {
            return Err(CliError::Usage(
                "give the PCRs the server must attest to: --server-pcrs FILE or --pcr N=HEX \
                 (ATTESTPLANE_PCRS is the control plane's and not used here), or register a \
                 plain server with --assurance none"
                    .into(),
            ));
        }
        if assurance == Assurance::None && (!pcrs.is_empty() || self.allow_debug) {
            return Err(CliError::Usage(
                "a server of --assurance none is never attested: give no PCRs and no \
                 --allow-debug"
                    .into(),
            ));
        }
        if assurance == Assurance::Nitro
            && !self.allow_debug
            && [0u8, 1, 2]
                .iter()
                .filter_map(|i| PcrIndex::try_from(*i).ok())
                .all(|i| pcrs.get(&i).is_some_and(Pcr::is_zero))
        {
            return Err(CliError::Usage(
                "PCR0, PCR1 and PCR2 are all zero: that is a debug-mode enclave; pass \
                 --allow-debug if you mean it (never in production)"
                    .into(),
            ));
        }
        let endpoint = Url::parse(&self.endpoint)
            .map_err(|e| CliError::Usage(format!("bad --endpoint {:?}: {e}", self.endpoint)))?;
        // http only: the proxy's fetch client has no TLS (the document is signed and carries
        // the enclave's nonce, so it needs none), and an https endpoint could never attest.
        if endpoint.scheme() != "http" || endpoint.host().is_none() {
            return Err(CliError::Usage(format!(
                "bad --endpoint {:?}: want an http:// URL",
                self.endpoint
            )));
        }
        let max_age: Duration = self.max_age.into();
        let max_attestation_age_ms = u64::try_from(max_age.as_millis())
            .ok()
            .filter(|ms| *ms > 0)
            .ok_or_else(|| CliError::Usage("--max-age must be positive".into()))?;
        let mut tools = BTreeMap::new();
        for (name, digest) in &self.tools {
            if tools.insert(name.clone(), Digest32(*digest)).is_some() {
                return Err(CliError::Usage(format!("tool {name:?} is pinned twice")));
            }
        }
        let mut prices = BTreeMap::new();
        for (tool, price) in &self.prices {
            if !tools.contains_key(tool) {
                return Err(CliError::Usage(format!(
                    "--price names {tool:?}, which no --tool pins"
                )));
            }
            if prices.insert(tool.clone(), price.clone()).is_some() {
                return Err(CliError::Usage(format!("tool {tool:?} is priced twice")));
            }
        }
        let client_requests: BTreeSet<ClientRequest> = self
            .client_requests
            .iter()
            .map(|c| match c {
                ClientRequestFlag::Sampling => ClientRequest::Sampling,
                ClientRequestFlag::Elicitation => ClientRequest::Elicitation,
                ClientRequestFlag::Roots => ClientRequest::Roots,
            })
            .collect();
        Ok(ServerSpec {
            id: self.id.clone(),
            name: self.name.clone().unwrap_or_else(|| self.id.clone()),
            tenant: self.tenant.clone(),
            resource: self.resource.clone(),
            endpoint: self.endpoint.clone(),
            pcrs: pcrs.into_iter().map(|(i, p)| (i, PcrHex(p))).collect(),
            allow_debug: self.allow_debug,
            max_attestation_age_ms,
            tools,
            assurance,
            prices,
            client_requests,
        })
    }
}

/// `GET /v1/servers` with the agent's token.
pub async fn list(api: &Api, bearer: &str) -> CliResult<ServerList> {
    api.get_json(&["v1", "servers"], &[], Some(bearer)).await
}

/// Runs a `servers` command.
pub async fn run(command: ServersCommand, context: &ClientContext) -> CliResult {
    match command {
        ServersCommand::Register(args) => {
            let spec = args.spec()?;
            let key = admin_key(context)?;
            submit_admin(context, &key, AdminAction::RegisterServer(spec)).await
        }
        ServersCommand::Update(args) => {
            let spec = args.spec()?;
            let key = admin_key(context)?;
            submit_admin(context, &key, AdminAction::UpdateServer(spec)).await
        }
        ServersCommand::Revoke { id } => {
            let key = admin_key(context)?;
            submit_admin(context, &key, AdminAction::RevokeServer { id }).await
        }
        ServersCommand::Attest { id } => {
            let api = Api::new(&context.url)?;
            let answer: AttestVerified = api
                .post_json(&["v1", "servers", &id, "attest"], None, None)
                .await?;
            if !answer.verified {
                return Err(CliError::Failed(format!(
                    "attestation_refused: the attestation of {id} did not verify (log entry {})",
                    answer.seq
                )));
            }
            if context.json {
                print_json(&json!(answer))
            } else {
                let m = answer.measurement.as_deref().map(clean).unwrap_or_default();
                outln!("verified: {id} measurement {m} (log entry {})", answer.seq);
                Ok(())
            }
        }
        ServersCommand::Pin { id, yes } => pin(context, &id, yes).await,
        ServersCommand::List => {
            let api = Api::new(&context.url)?;
            let bearer = read_bearer(context)?;
            let answer = list(&api, &bearer).await?;
            if context.json {
                return print_json(&json!(answer));
            }
            if answer.servers.is_empty() {
                outln!("no server visible to this agent (log entry {})", answer.seq);
                return Ok(());
            }
            outln!(
                "{:<20} {:<12} {:<9} {:<24} RESOURCE",
                "ID",
                "TENANT",
                "ATTESTED",
                "NAME"
            );
            for s in &answer.servers {
                outln!(
                    "{:<20} {:<12} {:<9} {:<24} {}",
                    clean(&s.id),
                    clean(&s.tenant),
                    if s.attested { "yes" } else { "no" },
                    clean(&s.name),
                    clean(&s.resource)
                );
            }
            Ok(())
        }
    }
}

/// The most pages of `tools/list` `servers pin` follows.
const MAX_PIN_PAGES: usize = 64;

/// The largest `tools/list` answer `servers pin` reads.
const MAX_PIN_ANSWER: usize = 4 * 1024 * 1024;

/// How long `servers pin` waits for each answer of the server.
const PIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The protocol version `servers pin` asks for first.
const PIN_MODERN: &str = "2026-07-28";

/// The legacy protocol version `servers pin` falls back to.
const PIN_LEGACY: &str = "2025-11-25";

/// The latest accepted registration of `id` in the log the host serves, and its entry's
/// sequence number (`None` when the server is not registered or was revoked).
async fn registration(api: &Api, id: &str) -> CliResult<Option<(u64, ServerSpec)>> {
    use attestplane_verifier::admin::SignedAdminRequest;
    use attestplane_verifier::entry::{Event, SignedEntry};

    use super::log::{PAGE, fetch, head};
    let size = head(api).await?;
    let mut latest = None;
    let mut next = 0u64;
    while next < size {
        let end = size.min(next.saturating_add(PAGE));
        let entries = fetch(api, next, end).await?;
        if entries.is_empty() {
            break;
        }
        for bytes in &entries {
            let Ok(entry) = SignedEntry::decode(bytes) else {
                continue;
            };
            let entry = entry.into_entry();
            let Event::Admin {
                request,
                accepted: true,
                ..
            } = entry.event
            else {
                continue;
            };
            let Ok(request) = SignedAdminRequest::decode(&request) else {
                continue;
            };
            match &request.request().action {
                AdminAction::RegisterServer(spec) | AdminAction::UpdateServer(spec)
                    if spec.id == id =>
                {
                    latest = Some((entry.seq, spec.clone()));
                }
                AdminAction::RevokeServer { id: revoked } if revoked == id => latest = None,
                _ => {}
            }
        }
        next = next.saturating_add(entries.len() as u64);
    }
    Ok(latest)
}

/// One tool of a server's live listing.
#[derive(Clone, Debug)]
struct LiveTool {
    digest: Digest32,
    /// The tool object as the server listed it.
    text: String,
}

/// The MCP URL of a registration: the registered endpoint (what the host dials) with its
/// resource URI's path.
fn mcp_url(spec: &ServerSpec) -> CliResult<Url> {
    let mut url = Url::parse(&spec.endpoint)
        .map_err(|e| CliError::Failed(format!("the registered endpoint is not a URL: {e}")))?;
    let path = Url::parse(&spec.resource)
        .map(|r| r.path().to_owned())
        .unwrap_or_else(|_| "/".to_owned());
    url.set_path(&path);
    Ok(url)
}

/// The JSON-RPC message in an answer: the body, or the first response event of an SSE body.
fn rpc_answer(content_type: &str, body: &[u8]) -> Option<Vec<u8>> {
    use attestplane_verifier::gateway::jsonrpc::{Kind, parse_message};
    if !content_type.starts_with("text/event-stream") {
        return Some(body.to_vec());
    }
    let text = std::str::from_utf8(body).ok()?;
    text.replace("\r\n", "\n").split("\n\n").find_map(|event| {
        let data: Vec<&str> = event
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect();
        let data = data.join("\n");
        let answers = parse_message(data.as_bytes())
            .is_ok_and(|m| matches!(m.kind(), Kind::Response | Kind::ErrorResponse));
        answers.then(|| data.into_bytes())
    })
}

/// Fetches the server's live `tools/list` (every page, in the modern era or, if the server
/// refuses it, the legacy one), as the gateway would: by name, with each tool's digest.
async fn live_tools(spec: &ServerSpec) -> CliResult<BTreeMap<String, LiveTool>> {
    use attestplane_verifier::gateway::jsonrpc::parse_message;
    use attestplane_verifier::gateway::pin::tool_digest;

    let url = mcp_url(spec)?;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(PIN_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| CliError::Io(format!("http client: {e}")))?;
    let unreachable =
        |e: String| CliError::Failed(format!("cannot fetch the live listing of {}: {e}", spec.id));
    let post =
        |body: String, version: &'static str, method: &'static str, session: Option<String>| {
            let client = client.clone();
            let url = url.clone();
            async move {
                let mut req = client
                    .post(url)
                    .header("content-type", "application/json")
                    .header("accept", "application/json, text/event-stream")
                    .header("mcp-protocol-version", version)
                    .header("mcp-method", method);
                if let Some(s) = session {
                    req = req.header("mcp-session-id", s);
                }
                let mut resp = req.body(body).send().await.map_err(|e| e.to_string())?;
                let status = resp.status();
                let session = resp
                    .headers()
                    .get("mcp-session-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let content_type = resp
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                if resp
                    .content_length()
                    .is_some_and(|n| n > MAX_PIN_ANSWER as u64)
                {
                    return Err("the answer is too large".to_owned());
                }
                // Read chunk by chunk: a chunked answer has no length to check up front, and
                // a hostile server must not make the operator's CLI buffer without bound.
                let mut bytes = Vec::new();
                while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
                    if bytes.len() + chunk.len() > MAX_PIN_ANSWER {
                        return Err(format!(
                            "the answer is too large (more than {MAX_PIN_ANSWER} bytes)"
                        ));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok::<_, String>((status, session, rpc_answer(&content_type, &bytes)))
            }
        };
    let list = |cursor: Option<&str>, legacy: bool| {
        let mut params = serde_json::Map::new();
        if let Some(c) = cursor {
            params.insert("cursor".into(), json!(c));
        }
        if !legacy {
            params.insert(
                "_meta".into(),
                json!({ "io.modelcontextprotocol/protocolVersion": PIN_MODERN }),
            );
        }
        json!({"jsonrpc": "2.0", "id": "attestplane-pin", "method": "tools/list", "params": params})
            .to_string()
    };
    // The modern era first; a server that refuses it is asked in the legacy era.
    let mut session = None;
    let mut legacy = false;
    let (status, _, first) = post(list(None, false), PIN_MODERN, "tools/list", None)
        .await
        .map_err(unreachable)?;
    let mut answer = if status.is_success() {
        first
    } else {
        legacy = true;
        let init = json!({"jsonrpc": "2.0", "id": "attestplane-pin-init", "method": "initialize",
            "params": {"protocolVersion": PIN_LEGACY, "capabilities": {},
                       "clientInfo": {"name": "attestplane-pin", "version": env!("CARGO_PKG_VERSION")}}});
        let (status, s, _) = post(init.to_string(), PIN_LEGACY, "initialize", None)
            .await
            .map_err(unreachable)?;
        if !status.is_success() {
            return Err(unreachable(format!("the server answered HTTP {status}")));
        }
        session = s;
        let done = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        post(
            done.to_string(),
            PIN_LEGACY,
            "notifications/initialized",
            session.clone(),
        )
        .await
        .map_err(unreachable)?;
        let (status, _, a) = post(list(None, true), PIN_LEGACY, "tools/list", session.clone())
            .await
            .map_err(unreachable)?;
        if !status.is_success() {
            return Err(unreachable(format!("the server answered HTTP {status}")));
        }
        a
    };
    let mut tools = BTreeMap::new();
    for page in 0..MAX_PIN_PAGES {
        let bytes = answer.ok_or_else(|| unreachable("no JSON-RPC answer".into()))?;
        let message = parse_message(&bytes).map_err(|e| unreachable(e.to_string()))?;
        let result = message
            .tools_list_result()
            .map_err(|e| unreachable(format!("not a tools/list result: {e}")))?;
        for raw in &result.tools {
            let d =
                tool_digest(raw.get()).map_err(|e| unreachable(format!("a listed tool: {e}")))?;
            let live = LiveTool {
                digest: d.digest,
                text: raw.get().to_owned(),
            };
            if tools.insert(d.name.clone(), live).is_some() {
                return Err(CliError::Failed(format!(
                    "the live listing of {} lists {:?} twice: refusing to pin an ambiguous listing",
                    spec.id,
                    escape_invisible(&d.name)
                )));
            }
        }
        let Some(cursor) = result.next_cursor else {
            return Ok(tools);
        };
        if page + 1 == MAX_PIN_PAGES {
            break;
        }
        let version = if legacy { PIN_LEGACY } else { PIN_MODERN };
        let (status, _, a) = post(
            list(Some(&cursor), legacy),
            version,
            "tools/list",
            session.clone(),
        )
        .await
        .map_err(unreachable)?;
        if !status.is_success() {
            return Err(unreachable(format!("the server answered HTTP {status}")));
        }
        answer = a;
    }
    Err(unreachable(format!("more than {MAX_PIN_PAGES} pages")))
}

/// Text for a terminal with every character that is not printable ASCII escaped (`\u{200b}`):
/// an invisible change to a description shows.
fn escape_invisible(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == ' ' || c.is_ascii_graphic() {
            out.push(c);
        } else {
            out.push_str(&format!("\\u{{{:04x}}}", u32::from(c)));
        }
    }
    out
}

/// A short summary of a tool object: its description and the names of its input schema's
/// properties, escaped.
fn tool_summary(text: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
    let description = v
        .get("description")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("");
    let mut properties: Vec<String> = v
        .get("inputSchema")
        .and_then(|s| s.get("properties"))
        .and_then(serde_json::Value::as_object)
        .map(|o| o.keys().map(|k| escape_invisible(k)).collect())
        .unwrap_or_default();
    properties.sort();
    let mut description = escape_invisible(description);
    if description.len() > 200 {
        let cut = (0..=200)
            .rev()
            .find(|i| description.is_char_boundary(*i))
            .unwrap_or(0);
        description.truncate(cut);
        description.push_str("...");
    }
    format!(
        "description \"{description}\"; arguments [{}]",
        properties.join(", ")
    )
}

/// `servers pin ID`.
async fn pin(context: &ClientContext, id: &str, yes: bool) -> CliResult {
    let api = Api::new(&context.url)?;
    let (seq, spec) = registration(&api, id).await?.ok_or_else(|| {
        CliError::Failed(format!(
            "{id} is not registered (no accepted registration in the log)"
        ))
    })?;
    let live = live_tools(&spec).await?;
    let pinned = &spec.tools;
    let mut lines = Vec::new();
    for (name, tool) in &live {
        match pinned.get(name) {
            None => lines.push(format!(
                "+ added    {}  {}\n    {}",
                escape_invisible(name),
                hex::encode(tool.digest.0),
                tool_summary(&tool.text)
            )),
            Some(old) if *old != tool.digest => lines.push(format!(
                "~ changed  {}  {} -> {}\n    now: {}",
                escape_invisible(name),
                hex::encode(old.0),
                hex::encode(tool.digest.0),
                tool_summary(&tool.text)
            )),
            Some(_) => {}
        }
    }
    for (name, old) in pinned {
        if !live.contains_key(name) {
            lines.push(format!(
                "- removed  {}  {}",
                escape_invisible(name),
                hex::encode(old.0)
            ));
        }
    }
    if lines.is_empty() {
        outln!(
            "the pins of {id} (registration at log entry {seq}) match its live listing ({} tools): nothing to sign",
            live.len()
        );
        return Ok(());
    }
    outln!(
        "live listing of {id} against its pins (registration at log entry {seq}; the log keeps \
         only digests of the pinned definitions):"
    );
    for l in &lines {
        outln!("{l}");
    }
    let mut repinned = spec.clone();
    repinned.tools = live.iter().map(|(n, t)| (n.clone(), t.digest)).collect();
    let dropped: Vec<String> = repinned
        .prices
        .keys()
        .filter(|t| !repinned.tools.contains_key(*t))
        .cloned()
        .collect();
    for t in &dropped {
        repinned.prices.remove(t);
        outln!(
            "  the price of removed tool {} is dropped",
            escape_invisible(t)
        );
    }
    if !yes {
        eprint!(
            "sign the re-pin of {id} ({} tools)? [y/N] ",
            repinned.tools.len()
        );
        let mut answer = String::new();
        let read = std::io::stdin().read_line(&mut answer);
        if !matches!(read, Ok(n) if n > 0) || !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Err(CliError::Failed(
                "the re-pin was not confirmed: nothing signed".into(),
            ));
        }
    }
    let key = admin_key(context)?;
    submit_admin(context, &key, AdminAction::UpdateServer(repinned)).await?;
    if spec.assurance == Assurance::Nitro {
        outln!("{id} must now be attested again: attestplane servers attest {id}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        server: ServerFlags,
    }

    fn args(extra: &[&str]) -> Result<ServerFlags, clap::Error> {
        let mut argv = vec![
            "t",
            "--id",
            "weather",
            "--tenant",
            "acme",
            "--resource",
            "https://weather.acme.example/mcp",
            "--endpoint",
            "http://127.0.0.1:7401",
        ];
        argv.extend_from_slice(extra);
        T::try_parse_from(argv).map(|t| t.server)
    }

    /// `main`'s shape: a global `--pcrs` (the control plane's) with an environment variable
    /// (`PATH`: one that is always set) above the client commands.
    #[derive(Debug, Parser)]
    struct Main {
        #[arg(long, global = true, env = "PATH")]
        pcrs: Option<PathBuf>,
        #[command(subcommand)]
        command: ServersCommand,
    }

    fn register(argv: &[&str]) -> Option<PathBuf> {
        let m = Main::try_parse_from(argv).unwrap();
        let ServersCommand::Register(args) = m.command else {
            panic!("{:?}", m.command)
        };
        args.pcrs
    }

    #[test]
    fn the_control_planes_pcrs_from_the_environment_never_become_the_servers() {
        let base = [
            "register",
            "--id",
            "w",
            "--tenant",
            "t",
            "--resource",
            "https://w/mcp",
            "--endpoint",
            "http://127.0.0.1:1",
        ];
        // Only the environment (the control plane's file): not the server's PCRs.
        assert_eq!(register(&[&["m"][..], &base[..]].concat()), None);
        // The global flag, before or after the command: still the control plane's.
        assert_eq!(
            register(&[&["m", "--pcrs", "/cp.json"][..], &base[..]].concat()),
            None
        );
        assert_eq!(
            register(&[&["m"][..], &base[..], &["--pcrs", "/cp.json"][..]].concat()),
            None
        );
        // --server-pcrs is the server's.
        assert_eq!(
            register(&[&["m"][..], &base[..], &["--server-pcrs", "/s.json"][..]].concat()),
            Some(PathBuf::from("/s.json"))
        );
    }

    #[test]
    fn builds_the_spec_from_flags() {
        let pcr0 = format!("0={}", hex::encode([1u8; 48]));
        let tool = format!("forecast={}", hex::encode([9u8; 32]));
        let spec = args(&["--pcr", &pcr0, "--tool", &tool, "--max-age", "90s"])
            .unwrap()
            .spec()
            .unwrap();
        assert_eq!(spec.name, "weather");
        assert_eq!(spec.max_attestation_age_ms, 90_000);
        assert_eq!(spec.pcrs.len(), 1);
        assert_eq!(spec.tools.get("forecast"), Some(&Digest32([9; 32])));
        assert!(!spec.allow_debug);
    }

    #[test]
    fn refuses_specs_the_enclave_should_never_see() {
        let pcr0 = format!("0={}", hex::encode([1u8; 48]));
        // No PCRs at all.
        assert!(args(&[]).unwrap().spec().is_err());
        // Debug-mode PCRs without --allow-debug, accepted with it.
        let zero: Vec<String> = (0..3)
            .map(|i| format!("{i}={}", hex::encode([0u8; 48])))
            .collect();
        let z: Vec<&str> = zero.iter().flat_map(|p| ["--pcr", p.as_str()]).collect();
        assert!(args(&z).unwrap().spec().is_err());
        let mut zd = z.clone();
        zd.push("--allow-debug");
        assert!(args(&zd).unwrap().spec().unwrap().allow_debug);
        // A tool pinned twice, a bad digest, a bad endpoint, a zero max age.
        let t1 = format!("a={}", hex::encode([1u8; 32]));
        let t2 = format!("a={}", hex::encode([2u8; 32]));
        assert!(
            args(&["--pcr", &pcr0, "--tool", &t1, "--tool", &t2])
                .unwrap()
                .spec()
                .is_err()
        );
        assert!(args(&["--pcr", &pcr0, "--tool", "a=abcd"]).is_err());
        assert!(args(&["--pcr", &pcr0, "--tool", "abcd"]).is_err());
        assert!(
            args(&["--pcr", &pcr0, "--max-age", "0s"])
                .unwrap()
                .spec()
                .is_err()
        );
        let mut bad_endpoint = args(&["--pcr", &pcr0]).unwrap();
        bad_endpoint.endpoint = "127.0.0.1:7401".into();
        assert!(bad_endpoint.spec().is_err());
        // https could never attest: the proxy's fetch client has no TLS.
        bad_endpoint.endpoint = "https://127.0.0.1:7401".into();
        assert!(bad_endpoint.spec().is_err());
    }

    #[test]
    fn builds_a_plain_server_with_prices_and_client_requests() {
        let tool = format!("echo={}", hex::encode([9u8; 32]));
        let spec = args(&[
            "--assurance",
            "none",
            "--tool",
            &tool,
            "--price",
            "echo=250:credits",
            "--client-request",
            "roots",
            "--client-request",
            "sampling",
        ])
        .unwrap()
        .spec()
        .unwrap();
        assert_eq!(spec.assurance, Assurance::None);
        assert!(spec.pcrs.is_empty());
        assert_eq!(
            spec.prices.get("echo"),
            Some(&Price {
                amount: 250,
                asset: "credits".into()
            })
        );
        assert_eq!(
            spec.client_requests,
            [ClientRequest::Roots, ClientRequest::Sampling].into()
        );
        // The default is nitro, with no client requests and no prices.
        let pcr0 = format!("0={}", hex::encode([1u8; 48]));
        let nitro = args(&["--pcr", &pcr0]).unwrap().spec().unwrap();
        assert_eq!(nitro.assurance, Assurance::Nitro);
        assert!(nitro.client_requests.is_empty() && nitro.prices.is_empty());
    }

    #[test]
    fn refuses_plain_servers_with_pcrs_and_prices_of_unpinned_tools() {
        let pcr0 = format!("0={}", hex::encode([1u8; 48]));
        let tool = format!("echo={}", hex::encode([9u8; 32]));
        // A plain server with PCRs, or allowed debug: there is nothing to attest.
        assert!(
            args(&["--assurance", "none", "--pcr", &pcr0])
                .unwrap()
                .spec()
                .is_err()
        );
        assert!(
            args(&["--assurance", "none", "--allow-debug"])
                .unwrap()
                .spec()
                .is_err()
        );
        // An unknown assurance level, client request, or a malformed price.
        assert!(args(&["--assurance", "webpki"]).is_err());
        assert!(args(&["--client-request", "resources"]).is_err());
        assert!(args(&["--price", "echo=-1:credits"]).is_err());
        assert!(args(&["--price", "echo=1"]).is_err());
        // A price for a tool no --tool pins, or priced twice.
        assert!(
            args(&["--assurance", "none", "--price", "echo=1:credits"])
                .unwrap()
                .spec()
                .is_err()
        );
        assert!(
            args(&[
                "--assurance",
                "none",
                "--tool",
                &tool,
                "--price",
                "echo=1:credits",
                "--price",
                "echo=2:credits"
            ])
            .unwrap()
            .spec()
            .is_err()
        );
    }
}
