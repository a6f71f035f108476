//! End-to-end test support: finds the workspace's binaries in the target directory and runs
//! them as child processes.
//!
//! The end-to-end tests in `tests/tests/` run the real programs against each other:
//! `attestplane-enclave` (on a mock NSM), `attestplane proxy` / `attestplane dev`, the client
//! commands of `attestplane`, `attestplane-demo-server` and the auditor's `attestplane-verify`.
//! This library holds what they share:
//!
//! - [`binary`]: a workspace binary, found next to the running test executable
//!   (`target/debug/deps/TEST` → `target/debug/NAME`). `cargo test --workspace` builds every
//!   workspace binary before it runs any test; `cargo test -p attestplane-tests` builds only this
//!   crate's own, so a missing binary fails the test with a message that says which command
//!   builds it.
//!   A binary left over from an earlier build is used as found: after changing another crate,
//!   run the tests through `cargo test --workspace` (or rebuild that binary) first.
//! - [`Proc`]: a child process with piped stdout, read on a thread so that [`Proc::wait_line`]
//!   can wait for the ready line with a timeout; its stderr goes to a file whose tail is quoted
//!   in failure messages. It is killed (SIGKILL) and reaped on drop, so a failing test leaves no
//!   process behind.
//! - [`DevStack`]: `attestplane dev` on free ports in a temp directory. [`SplitStack`]: the
//!   enclave (Unix socket, its own mock PCRs), the demo server and `attestplane proxy` as separate
//!   processes, keys made with `attestplane keys gen`, the starter policy and the development
//!   identity provider installed and the demo server registered and attested with the CLI, so a
//!   test can kill and restart each process. Both share [`StackFiles`]: the data directory's
//!   files (named as `attestplane dev` names them), `attestplane --config DIR/config.toml ...`
//!   and `attestplane-verify log ...`.
//! - The store as a host with disk access sees it ([`stored_entries`], [`flip_stored_entry`],
//!   [`rewrite_store`]): the segment record layout of `host-proxy/src/store/segment.rs`, for
//!   the tamper tests.
//! - Small helpers: running a command to completion ([`run`]), a blocking HTTP GET
//!   ([`http_get`], [`log_head`], [`ready_epoch`]), splitting an exported log (a CBOR sequence)
//!   into entries ([`split_log`]), temporary directories ([`temp_dir`], kept when
//!   `ATTESTPLANE_KEEP_TEST_DIRS` is set).
//!
//! Not here: assertions about the API (each test states its own), and any knowledge of the
//! proxy's internals beyond the on-disk layout of its store that the tamper tests edit.

use std::fmt;
use std::fs::File;
use std::io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a child may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The directory holding the workspace's binaries: the parent of the test executable's `deps/`.
pub fn target_bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("cannot find this test: {e}"));
    let deps = exe
        .parent()
        .unwrap_or_else(|| panic!("{} has no parent directory", exe.display()));
    // Integration tests run from target/PROFILE/deps/; examples and bins one level up.
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().unwrap_or(deps).to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// Which package builds each workspace binary, for the failure message of [`binary`].
fn package_of(name: &str) -> &'static str {
    match name {
        "attestplane" => "attestplane",
        "attestplane-enclave" => "attestplane-enclave",
        "attestplane-verify" => "attestplane-verifier",
        "attestplane-demo-server" => "attestplane-tests",
        "attestplane-eif" => "attestplane-eif",
        _ => "?",
    }
}

/// The path of workspace binary `name` in the target directory. Panics, saying how to build
/// it, when it is not there.
pub fn binary(name: &str) -> PathBuf {
    let path = target_bin_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        panic!(
            "the workspace binary `{name}` is not at {path}. `cargo test --workspace` builds every \
             workspace binary before running tests; `cargo test -p attestplane-tests` builds only \
             this crate's, so build it first (`cargo build -p {package} --bin {name}`, same \
             profile and target dir)",
            path = path.display(),
            package = package_of(name),
        );
    }
    path
}

/// A running child process, killed (SIGKILL) and reaped on drop.
pub struct Proc {
    name: String,
    child: Option<Child>,
    lines: Receiver<String>,
    seen: Arc<Mutex<Vec<String>>>,
    stderr: PathBuf,
}

impl fmt::Debug for Proc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proc")
            .field("name", &self.name)
            .field("pid", &self.child.as_ref().map(Child::id))
            .finish_non_exhaustive()
    }
}

impl Proc {
    /// Spawns `command` with piped stdout and stderr written to `stderr_file`.
    pub fn spawn(name: &str, mut command: Command, stderr_file: &Path) -> Proc {
        let err = File::create(stderr_file)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", stderr_file.display()));
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err));
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({command:?}): {e}"));
        let stdout = child
            .stdout
            .take()
            .unwrap_or_else(|| panic!("{name}: no stdout pipe"));
        let (tx, rx) = channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        // Drains stdout for the whole life of the child, so it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                seen2
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line.clone());
                let _ = tx.send(line);
            }
        });
        Proc {
            name: name.to_owned(),
            child: Some(child),
            lines: rx,
            seen,
            stderr: stderr_file.to_path_buf(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits until the child prints a stdout line starting with `prefix` and returns it.
    /// Panics (quoting the child's output) on timeout or if the child exits first.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        self.try_wait_line(prefix, timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Proc::wait_line`], but the timeout or an early exit is an `Err` quoting the
    /// child's output.
    pub fn try_wait_line(&mut self, prefix: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Ok(line),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "{} printed no line starting with {prefix:?} within {timeout:?}\n{}",
                        self.name,
                        self.diagnostics()
                    ));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.as_mut().and_then(|c| c.wait().ok());
                    return Err(format!(
                        "{} exited ({status:?}) before printing a line starting with {prefix:?}\n{}",
                        self.name,
                        self.diagnostics()
                    ));
                }
            }
        }
    }

    /// Everything the child printed on stdout so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The last few KiB of the child's stderr.
    pub fn stderr_tail(&self) -> String {
        tail_of(&self.stderr, 4096)
    }

    /// Stdout and stderr tail, for failure messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- {} stdout:\n{}\n--- {} stderr (tail):\n{}",
            self.name,
            self.stdout_lines().join("\n"),
            self.name,
            self.stderr_tail()
        )
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for the process to exit (then SIGKILL). Returns
    /// the exit status if it exited by itself.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `max` bytes of a file, lossily as text.
pub fn tail_of(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// A finished command: exit code and output as text.
#[derive(Debug)]
pub struct Ran {
    /// The command, for messages.
    pub command: String,
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Ran {
    fn from_output(command: String, out: Output) -> Ran {
        Ran {
            command,
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Panics unless the command exited with `code`; returns `self` for chaining.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Ran {
        assert_eq!(self.code, Some(code), "expected exit code {code}:\n{self}");
        self
    }

    /// Panics unless the command succeeded.
    #[track_caller]
    pub fn ok(&self) -> &Ran {
        self.expect_code(0)
    }

    /// Stdout parsed as JSON; panics (quoting the output) when it is not.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{self}"))
    }
}

impl fmt::Display for Ran {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "$ {}\n--- exit: {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.command, self.code, self.stdout, self.stderr
        )
    }
}

/// Runs a command to completion (stdin closed) and captures its output.
pub fn run(mut command: Command) -> Ran {
    let text = format!("{command:?}");
    let out = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {text}: {e}"));
    Ran::from_output(text, out)
}

/// Splits an exported log (an RFC 8742 CBOR sequence of entries) into its entries' bytes.
pub fn split_log(bytes: &[u8]) -> Vec<Vec<u8>> {
    attestplane_verifier::cbor::split_sequence(bytes)
        .unwrap_or_else(|e| panic!("the log is not a CBOR sequence: {e}"))
        .into_iter()
        .map(<[u8]>::to_vec)
        .collect()
}

/// A fresh temporary directory, removed on drop (kept when `ATTESTPLANE_KEEP_TEST_DIRS` is set,
/// for debugging).
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    let mut dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
    if std::env::var_os("ATTESTPLANE_KEEP_TEST_DIRS").is_some() {
        eprintln!("keeping {}", dir.path().display());
        dir.disable_cleanup(true);
    }
    dir
}

/// A minimal blocking HTTP/1.1 GET (`Connection: close`) to a `http://IP:PORT/...` URL:
/// status and body. For readiness polling and log heads without an async runtime.
pub fn http_get(url: &str) -> std::io::Result<(u16, Vec<u8>)> {
    use std::io::Write as _;
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| std::io::Error::other(format!("not an http:// URL: {url}")))?;
    let (host, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let mut stream = std::net::TcpStream::connect(host)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = data.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&data[..i]).trim(), 16).unwrap_or(0);
        if size == 0 || data.len() < i + 2 + size {
            break;
        }
        out.extend_from_slice(&data[i + 2..i + 2 + size]);
        data = &data[(i + 4 + size).min(data.len())..];
    }
    out
}

/// `GET {url}/v1/log/head`: the log's size and head hash.
pub fn log_head(url: &str) -> (u64, Option<String>) {
    let (status, body) =
        http_get(&format!("{url}/v1/log/head")).unwrap_or_else(|e| panic!("GET /v1/log/head: {e}"));
    let json: serde_json::Value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("/v1/log/head is not JSON ({e}): {body:?}"));
    assert_eq!(status, 200, "GET /v1/log/head: {json}");
    let size = json["size"]
        .as_u64()
        .unwrap_or_else(|| panic!("/v1/log/head has no size: {json}"));
    (size, json["head"].as_str().map(str::to_owned))
}

/// `GET {url}/v1/log/entries?start=1&end=2`: the hash of the log's genesis entry (entry 1),
/// which admin requests name, as the host serves it (tests that sign requests themselves).
pub fn genesis_hash(url: &str) -> attestplane_verifier::entry::EntryHash {
    let (status, body) = http_get(&format!("{url}/v1/log/entries?start=1&end=2"))
        .unwrap_or_else(|e| panic!("GET /v1/log/entries: {e}"));
    assert_eq!(status, 200, "GET /v1/log/entries?start=1&end=2");
    attestplane_verifier::entry::EntryHash::of(&body)
}

/// Polls `GET {url}/readyz` until it answers 200; false after `timeout`.
pub fn wait_ready(url: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if matches!(http_get(&format!("{url}/readyz")), Ok((200, _))) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// `GET {url}/readyz`: the epoch the proxy reports serving in (`ready (epoch N)`), or `None`
/// when it is not ready (or unreachable).
pub fn ready_epoch(url: &str) -> Option<u64> {
    match http_get(&format!("{url}/readyz")) {
        Ok((200, body)) => String::from_utf8_lossy(&body)
            .trim()
            .strip_prefix("ready (epoch ")?
            .strip_suffix(')')?
            .parse()
            .ok(),
        _ => None,
    }
}

/// The development identity provider's issuer and audience (as `attestplane dev` installs them).
pub const DEV_ISSUER: &str = "https://dev-idp.attestplane.local";
/// See [`DEV_ISSUER`].
pub const DEV_AUDIENCE: &str = "attestplane";
/// The log origin of `attestplane dev`'s enclave.
pub const DEV_ORIGIN: &str = "attestplane.dev/log";

/// The starter Cedar policy the verifier's tests and `attestplane dev` use.
pub fn starter_policy_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../verifier/testdata/policy/starter.cedar")
}

/// The files of a local stack's data directory, named as `attestplane dev` names them, and the
/// commands that use them.
#[derive(Debug)]
pub struct StackFiles {
    /// The data directory.
    pub dir: PathBuf,
}

impl StackFiles {
    /// `DIR/NAME`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `attestplane --config DIR/config.toml ARGS...`.
    pub fn cli(&self, args: &[&str]) -> Ran {
        let mut cmd = Command::new(binary("attestplane"));
        cmd.arg("--config").arg(self.path("config.toml")).args(args);
        cmd.env_remove("ATTESTPLANE_CONFIG")
            .env_remove("ATTESTPLANE_URL")
            .env_remove("ATTESTPLANE_TOKEN");
        run(cmd)
    }

    /// `attestplane-verify log FILE --pcrs --root --server-root [--checkpoint] --json`.
    pub fn verify_log(&self, log: &Path, checkpoint: Option<&Path>) -> (Ran, serde_json::Value) {
        let mut cmd = Command::new(binary("attestplane-verify"));
        cmd.arg("log")
            .arg(log)
            .arg("--pcrs")
            .arg(self.path("control-plane-pcrs.json"))
            .arg("--root")
            .arg(self.path("control-plane-root.pem"))
            .arg("--server-root")
            .arg(self.path("server-root.pem"))
            .arg("--json");
        if let Some(c) = checkpoint {
            cmd.arg("--checkpoint").arg(c);
        }
        let ran = run(cmd);
        let json = ran.json();
        (ran, json)
    }

    /// Registers the demo server at `demo_url` as `weather` (tenant `acme`, resource
    /// `{demo_url}/mcp`) and attests it.
    pub fn register_and_attest_weather(&self, demo_url: &str) {
        self.register_and_attest("weather", &format!("{demo_url}/mcp"), demo_url);
    }

    /// Registers the demo server at `endpoint` as `id` (tenant `acme`) with the given resource
    /// URI, its PCRs and (if `DIR/demo-server-tools.json` exists) its tools, and attests it.
    pub fn register_and_attest(&self, id: &str, resource: &str, endpoint: &str) {
        let pcrs = self.path("demo-server-pcrs.json").display().to_string();
        // The CLI's flag is `--server-pcrs` (the global `--pcrs` is the control plane's).
        let mut args = vec![
            "servers".to_owned(),
            "register".into(),
            "--id".into(),
            id.into(),
            "--name".into(),
            id.into(),
            "--tenant".into(),
            "acme".into(),
            "--resource".into(),
            resource.into(),
            "--endpoint".into(),
            endpoint.into(),
            "--server-pcrs".into(),
            pcrs,
        ];
        if let Ok(text) = std::fs::read_to_string(self.path("demo-server-tools.json")) {
            let tools: std::collections::BTreeMap<String, String> = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("demo-server-tools.json: {e}"));
            for (name, digest) in tools {
                args.push("--tool".into());
                args.push(format!("{name}={digest}"));
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.cli(&args).ok();
        self.cli(&["servers", "attest", id]).ok();
    }

    /// Mints an agent token (agent-7 for alice in acme, role tool-user) into `DIR/agent.jwt`
    /// and returns it.
    pub fn mint_agent_token(&self) -> String {
        self.mint_agent_token_for(None, "agent.jwt")
    }

    /// [`StackFiles::mint_agent_token`] with another audience (an MCP endpoint's resource URI)
    /// into `DIR/NAME`.
    pub fn mint_agent_token_for(&self, audience: Option<&str>, name: &str) -> String {
        self.mint_agent_token_as(audience, "tool-user", name)
    }

    /// [`StackFiles::mint_agent_token_for`] with another role.
    pub fn mint_agent_token_as(&self, audience: Option<&str>, role: &str, name: &str) -> String {
        let out = self.path(name);
        let _ = std::fs::remove_file(&out);
        let out_arg = out.display().to_string();
        let mut args = vec![
            "token", "mint", "--sub", "agent-7", "--user", "alice", "--tenant", "acme", "--role",
            role, "--out", &out_arg,
        ];
        if let Some(a) = audience {
            args.extend(["--audience", a]);
        }
        self.cli(&args).ok();
        std::fs::read_to_string(&out)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", out.display()))
            .trim()
            .to_owned()
    }

    /// `attestplane log export` into `DIR/NAME` (with `DIR/NAME.checkpoint`): the log's path
    /// and the checkpoint's.
    pub fn export(&self, name: &str) -> (PathBuf, PathBuf) {
        let out = self.path(name);
        let checkpoint = self.path(&format!("{name}.checkpoint"));
        self.cli(&[
            "log",
            "export",
            "--out",
            &out.display().to_string(),
            "--checkpoint",
            &checkpoint.display().to_string(),
        ])
        .ok();
        (out, checkpoint)
    }
}

/// `attestplane dev` in a temp directory, on free ports.
#[derive(Debug)]
pub struct DevStack {
    /// The data directory's files.
    pub files: StackFiles,
    /// The API's base URL.
    pub url: String,
    /// The demo server's base URL.
    pub demo_url: String,
    /// The `attestplane dev` process.
    pub proc: Proc,
    _dir: tempfile::TempDir,
}

impl DevStack {
    /// Starts `attestplane dev` with every port 0 (`--listen`, `--demo-server-listen`,
    /// `--mcp-listen`) and waits
    /// for its ready line.
    pub fn start() -> DevStack {
        let tmp = temp_dir("attestplane-dev-");
        let dir = tmp.path().join("dev");
        let mut cmd = Command::new(binary("attestplane"));
        cmd.arg("dev")
            .arg("--data-dir")
            .arg(&dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(["--demo-server-listen", "127.0.0.1:0"])
            .args(["--mcp-listen", "127.0.0.1:0"]);
        let mut proc = Proc::spawn("attestplane dev", cmd, &tmp.path().join("dev.stderr"));
        let line = proc.wait_line("attestplane dev ready: ", Duration::from_secs(60));
        let url = line
            .trim_start_matches("attestplane dev ready: ")
            .trim()
            .to_owned();
        let files = StackFiles { dir };
        let demo_url = std::fs::read_to_string(files.path("demo-server-url"))
            .unwrap_or_else(|e| panic!("attestplane dev wrote no demo-server-url: {e}"))
            .trim()
            .to_owned();
        DevStack {
            files,
            url,
            demo_url,
            proc,
            _dir: tmp,
        }
    }
}

/// Starts the demo server (its root, PCRs and tool digests written into the data directory).
fn start_demo(files: &StackFiles, listen: &str, control_plane: Option<&str>) -> (Proc, String) {
    let mut cmd = Command::new(binary("attestplane-demo-server"));
    cmd.args(["--listen", listen, "--print-mock-root"])
        .arg(files.path("server-root.pem"))
        .arg("--print-pcrs")
        .arg(files.path("demo-server-pcrs.json"))
        .arg("--print-tools")
        .arg(files.path("demo-server-tools.json"));
    if let Some(cp) = control_plane {
        cmd.args(["--control-plane", cp]);
    }
    let n = std::fs::read_dir(&files.dir).map_or(0, |d| d.count());
    let stderr = files.path(&format!("demo-{n}.stderr"));
    let mut demo = Proc::spawn("attestplane-demo-server", cmd, &stderr);
    let url = demo.wait_line("http://", READY_TIMEOUT);
    (demo, url)
}

impl DevStack {
    /// The gateway's agent-facing base URL (`http://IP:PORT`) that `attestplane dev` printed.
    pub fn gateway_url(&self) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(addr) = self.proc.stdout_lines().iter().find_map(|l| {
                l.strip_prefix("attestplane MCP relay: tcp:")
                    .map(str::to_owned)
            }) {
                return format!("http://{}", addr.trim());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "attestplane dev printed no MCP relay address"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops `attestplane dev` as Ctrl-C would (SIGTERM) and returns whether it exited
    /// successfully within `timeout`, and the processes still running with the data directory
    /// on their command line afterwards (its children, if it failed to stop them).
    pub fn stop(&mut self, timeout: Duration) -> (bool, Vec<String>) {
        let ok = self.proc.terminate(timeout).is_some_and(|s| s.success());
        std::thread::sleep(Duration::from_millis(200));
        (ok, processes_mentioning(&self.files.dir))
    }
}

impl Drop for DevStack {
    fn drop(&mut self) {
        // SIGTERM first: a SIGKILLed `attestplane dev` cannot stop its children.
        self.proc.terminate(Duration::from_secs(10));
    }
}

/// Command lines of running processes that mention `path` (Linux `/proc`).
pub fn processes_mentioning(path: &Path) -> Vec<String> {
    let needle = path.display().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect()
}

/// The local stack as three separate processes (enclave on a Unix socket with its own mock PCRs,
/// demo MCP server, `attestplane proxy`), so a test can kill and restart each. Keys and the
/// client configuration are made the way an operator would, with the CLI.
#[derive(Debug)]
pub struct SplitStack {
    /// The data directory's files (named as `attestplane dev` names them).
    pub files: StackFiles,
    /// The API's base URL (changes when the proxy restarts).
    pub url: String,
    /// The demo server's base URL.
    pub demo_url: String,
    /// The admin's public key (hex).
    pub admin_public: String,
    /// The enclave process.
    pub enclave: Option<Proc>,
    /// The proxy process.
    pub proxy: Option<Proc>,
    /// The demo server process.
    pub demo: Proc,
    /// The `origin = ` and `genesis = ` lines `attestplane deployment pin` wrote, kept in
    /// every rewrite of the config.
    pinned: String,
    starts: u32,
    _dir: tempfile::TempDir,
}

impl SplitStack {
    /// Starts the three processes, installs the starter policy and the development identity
    /// provider, registers and attests the demo server as `weather`.
    pub fn start() -> SplitStack {
        let tmp = temp_dir("attestplane-split-");
        let dir = tmp.path().to_path_buf();
        let files = StackFiles { dir: dir.clone() };

        let keys_gen = |name: &str| {
            let mut cmd = Command::new(binary("attestplane"));
            cmd.args(["keys", "gen", "--out"]).arg(files.path(name));
            let ran = run(cmd);
            ran.ok();
            ran.stdout.trim().to_owned()
        };
        let admin_public = keys_gen("admin.key");
        keys_gen("idp.key");

        // The control plane's image measurements: chosen here, so the auditor's expected PCRs
        // do not come from the thing being checked.
        let pcrs: serde_json::Map<String, serde_json::Value> = (0..3)
            .map(|i| {
                let digest = <sha2::Sha384 as sha2::Digest>::digest(
                    format!("e2e control plane pcr{i}").as_bytes(),
                );
                (format!("PCR{i}"), hex::encode(digest).into())
            })
            .collect();
        std::fs::write(
            files.path("control-plane-pcrs.json"),
            serde_json::to_string(&pcrs).unwrap_or_default(),
        )
        .unwrap_or_else(|e| panic!("cannot write the PCRs: {e}"));

        let (demo, demo_url) = start_demo(&files, "127.0.0.1:0", None);

        let mut stack = SplitStack {
            files,
            url: String::new(),
            demo_url,
            admin_public,
            enclave: None,
            proxy: None,
            demo,
            pinned: String::new(),
            starts: 0,
            _dir: tmp,
        };
        stack.start_enclave();
        if let Err(e) = stack.start_proxy() {
            panic!("{e}");
        }
        // Learned once from the attested control plane, as an operator does.
        stack.files.cli(&["deployment", "pin"]).ok();
        let config = std::fs::read_to_string(stack.files.path("config.toml"))
            .unwrap_or_else(|e| panic!("cannot read config.toml: {e}"));
        stack.pinned = config
            .lines()
            .filter(|l| l.starts_with("origin = ") || l.starts_with("genesis = "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(stack.pinned.lines().count(), 2, "{config}");
        stack
            .files
            .cli(&[
                "policy",
                "set",
                &starter_policy_path().display().to_string(),
            ])
            .ok();
        let idp_key = stack.files.path("idp.key").display().to_string();
        stack.files.cli(&["idp", "set", "--key", &idp_key]).ok();
        let demo_url = stack.demo_url.clone();
        stack.files.register_and_attest_weather(&demo_url);
        stack
    }

    /// Restarts the demo server on the same address, now accepting handles on `/mcp` from
    /// this stack's control plane (its URL is only known once the proxy runs).
    pub fn restart_demo_for_mcp(&mut self) {
        self.demo.kill();
        let addr = self.demo_url.trim_start_matches("http://").to_owned();
        let url = self.url.clone();
        let (demo, demo_url) = start_demo(&self.files, &addr, Some(&url));
        assert_eq!(demo_url, self.demo_url, "the demo server moved");
        self.demo = demo;
    }

    /// Starts the enclave (again) on `DIR/enclave.sock` and waits for its address line.
    pub fn start_enclave(&mut self) {
        let pcrs = self.files.path("control-plane-pcrs.json");
        self.start_enclave_image(&pcrs, &[]);
    }

    /// Starts the enclave (again) as the image whose measurements are in the PCR file `pcrs`
    /// (the mock reports them), with `extra` arguments, and waits for its address line.
    pub fn start_enclave_image(&mut self, pcrs: &Path, extra: &[&str]) {
        let f = &self.files;
        let mut cmd = Command::new(binary("attestplane-enclave"));
        cmd.args(["--nsm", "mock", "--listen"])
            .arg(format!("unix:{}", f.path("enclave.sock").display()))
            .arg("--mock-pcrs")
            .arg(pcrs)
            .args(extra)
            .arg("--print-mock-root")
            .arg(f.path("control-plane-root.pem"))
            .arg("--server-root")
            .arg(f.path("server-root.pem"))
            .args(["--genesis-admin-key", &self.admin_public])
            .args(["--origin", "attestplane.e2e/log"]);
        self.starts += 1;
        let stderr = f.path(&format!("enclave-{}.stderr", self.starts));
        let mut proc = Proc::spawn("attestplane-enclave", cmd, &stderr);
        proc.wait_line("", READY_TIMEOUT);
        self.enclave = Some(proc);
    }

    /// Starts `attestplane proxy` (again) on a free port and waits for its ready line; on
    /// success rewrites `DIR/config.toml` for the new URL. `Err` (with the proxy's output)
    /// when it exits or times out instead.
    pub fn start_proxy(&mut self) -> Result<(), String> {
        let f = &self.files;
        let mut cmd = Command::new(binary("attestplane"));
        cmd.arg("proxy")
            .arg("--enclave")
            .arg(format!("unix:{}", f.path("enclave.sock").display()))
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&f.dir)
            .args(["--genesis-admin-key", &self.admin_public]);
        self.starts += 1;
        let stderr = f.path(&format!("proxy-{}.stderr", self.starts));
        let mut proc = Proc::spawn("attestplane proxy", cmd, &stderr);
        let line = proc.try_wait_line("attestplane proxy ready: ", Duration::from_secs(60))?;
        self.url = line
            .trim_start_matches("attestplane proxy ready: ")
            .trim()
            .to_owned();
        self.proxy = Some(proc);
        let d = |name: &str| self.files.path(name).display().to_string();
        let config = format!(
            "[client]\nurl = \"{}\"\nadmin_key = \"{}\"\ntoken = \"{}\"\nidp_key = \"{}\"\n\
             idp_issuer = \"{DEV_ISSUER}\"\nidp_audience = \"{DEV_AUDIENCE}\"\nroot = \"{}\"\n\
             pcrs = \"{}\"\n{}",
            self.url,
            d("admin.key"),
            d("agent.jwt"),
            d("idp.key"),
            d("control-plane-root.pem"),
            d("control-plane-pcrs.json"),
            self.pinned,
        );
        std::fs::write(self.files.path("config.toml"), config)
            .map_err(|e| format!("cannot write config.toml: {e}"))?;
        Ok(())
    }
}

/// The proxy's store as a host with write access to its disk sees it: the records of the
/// segment files under `DATA_DIR/log/segments/` (STORE layout: `len: u32 BE ‖ check: u32 BE ‖
/// entry`, `check` = the first four bytes of the entry's SHA-256, files named by their first
/// seq).
#[derive(Debug)]
pub struct StoredEntry {
    /// The segment file.
    pub segment: PathBuf,
    /// Offset of the record header in it.
    pub offset: usize,
    /// The entry's bytes.
    pub entry: Vec<u8>,
}

/// Every stored entry in seq order.
pub fn stored_entries(data_dir: &Path) -> Vec<StoredEntry> {
    let dir = data_dir.join("log").join("segments");
    let mut segments: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segments.sort();
    let mut out = Vec::new();
    for segment in segments {
        let bytes = std::fs::read(&segment)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", segment.display()));
        let mut offset = 0;
        while offset + 8 <= bytes.len() {
            let len = u32::from_be_bytes(bytes[offset..offset + 4].try_into().unwrap()) as usize;
            let end = offset + 8 + len;
            assert!(
                end <= bytes.len(),
                "{}: record at {offset} runs past the end",
                segment.display()
            );
            out.push(StoredEntry {
                segment: segment.clone(),
                offset,
                entry: bytes[offset + 8..end].to_vec(),
            });
            offset = end;
        }
    }
    out
}

/// Flips one byte in the middle of stored entry `seq`; with `fix_check`, also rewrites the
/// record's checksum as a deliberate (not accidental) tamperer would.
pub fn flip_stored_entry(data_dir: &Path, seq: usize, fix_check: bool) {
    let entries = stored_entries(data_dir);
    let e = entries
        .get(seq)
        .unwrap_or_else(|| panic!("no stored entry {seq} (the store holds {})", entries.len()));
    let mut bytes = std::fs::read(&e.segment).unwrap();
    let body = e.offset + 8;
    bytes[body + e.entry.len() / 2] ^= 0x01;
    if fix_check {
        let digest = <sha2::Sha256 as sha2::Digest>::digest(&bytes[body..body + e.entry.len()]);
        bytes[e.offset + 4..e.offset + 8].copy_from_slice(&digest[..4]);
    }
    std::fs::write(&e.segment, bytes).unwrap();
}

/// Rewrites the store's segments as holding `entries` (valid records, checksums included): a
/// host deleting or reordering stored entries. All entries go into the first segment's file.
pub fn rewrite_store(data_dir: &Path, entries: &[Vec<u8>]) {
    let stored = stored_entries(data_dir);
    let mut segments: Vec<PathBuf> = stored.iter().map(|e| e.segment.clone()).collect();
    segments.dedup();
    let mut bytes = Vec::new();
    for e in entries {
        let digest = <sha2::Sha256 as sha2::Digest>::digest(e);
        bytes.extend_from_slice(&(e.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&digest[..4]);
        bytes.extend_from_slice(e);
    }
    for (i, s) in segments.iter().enumerate() {
        if i == 0 {
            std::fs::write(s, &bytes).unwrap();
        } else {
            std::fs::remove_file(s).unwrap();
        }
    }
}
