//! The real stack as child processes, and what the bench needs to watch them.
//!
//! The binaries are found next to the bench's own executable (the same target directory) or in
//! `--bin-dir`. Each child's stdout is read until the line that says it is ready (then drained,
//! so that it never blocks on a full pipe); its stderr goes to a file in the run's directory,
//! shown if the set-up fails. Children are killed (by their own handle) when the bench ends.
//!
//! The attested server is `attestplane-demo-server` when it is there, or [`DocumentServer`], a
//! document source inside the bench on a mock NSM with the demo server's measurements, which
//! answers `GET /attestation?nonce=HEX` the same way.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use attestplane_enclave::nsm::{Clock, MockNsm, Nsm};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::Command;

/// How long a child may take to say it is ready.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A started child process.
#[derive(Debug)]
pub struct Child {
    pub name: String,
    pub pid: u32,
    child: tokio::process::Child,
    stderr: PathBuf,
}

impl Child {
    /// Kills it and waits for it.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// The last lines of a child's stderr file, for an error message.
pub fn stderr_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Starts `exe` with `args`; returns it and the first stdout line for which `ready` gives a
/// value.
pub async fn spawn(
    exe: &Path,
    args: &[String],
    run_dir: &Path,
    ready: impl Fn(&str) -> Option<String>,
) -> Result<(Child, String)> {
    if !exe.exists() {
        bail!(
            "{} not found; build the binaries first: cargo build --release -p attestplane-enclave \
             -p attestplane -p attestplane-tests -p attestplane-load (same target dir), or give --bin-dir",
            exe.display()
        );
    }
    let name = exe
        .file_name()
        .map_or_else(|| "child".into(), |n| n.to_string_lossy().into_owned());
    let stderr = run_dir.join(format!("{name}.stderr"));
    let file = std::fs::File::create(&stderr)
        .with_context(|| format!("cannot create {}", stderr.display()))?;
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(file))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let pid = child.id().context("the child has no pid")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let found = tokio::time::timeout(START_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(v) = ready(line.trim()) {
                return Ok(Some(v));
            }
        }
        Ok::<_, std::io::Error>(None)
    })
    .await;
    let value = match found {
        Ok(Ok(Some(v))) => v,
        Ok(Ok(None)) => bail!(
            "{name} exited before it was ready; its stderr:\n{}",
            stderr_tail(&stderr)
        ),
        Ok(Err(e)) => bail!("reading {name}'s stdout: {e}"),
        Err(_) => bail!(
            "{name} was not ready within {START_TIMEOUT:?}; its stderr:\n{}",
            stderr_tail(&stderr)
        ),
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((
        Child {
            name,
            pid,
            child,
            stderr,
        },
        value,
    ))
}

impl Child {
    /// The tail of its stderr.
    pub fn stderr_tail(&self) -> String {
        stderr_tail(&self.stderr)
    }
}

/// CPU time (user + system) a process (`Some(pid)`) or this process (`None`) has used so far,
/// from `/proc/PID/stat`.
pub fn cpu_time(pid: Option<u32>) -> Option<Duration> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".into(),
    };
    stat_cpu(&path)
}

/// CPU time used so far by each thread of process `pid`, by thread id.
pub fn threads_cpu_time(pid: u32) -> BTreeMap<u32, Duration> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return BTreeMap::new();
    };
    dir.filter_map(|e| {
        let name = e.ok()?.file_name();
        let tid: u32 = name.to_str()?.parse().ok()?;
        Some((tid, stat_cpu(&format!("/proc/{pid}/task/{tid}/stat"))?))
    })
    .collect()
}

/// CPU time the calling thread has used so far.
pub fn thread_cpu_time() -> Option<Duration> {
    stat_cpu("/proc/thread-self/stat")
}

fn stat_cpu(path: &str) -> Option<Duration> {
    let text = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let rest = text.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux configuration the bench runs on.
    Some(Duration::from_millis((utime + stime) * 10))
}

/// The bench's own attested server: a mock NSM with the demo server's measurements behind
/// `GET /attestation?nonce=HEX`.
#[derive(Debug)]
pub struct DocumentServer {
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl DocumentServer {
    /// Listens on a free loopback port; returns it and the PEM of its mock root.
    pub async fn start(pcrs: &[[u8; 48]; 3]) -> Result<(Self, String)> {
        let nsm = MockNsm::builder(*b"attestplane load: document serve", Clock::System)
            .image_measurements(pcrs[0], pcrs[1], pcrs[2])
            .build();
        let root = nsm.root_pem()?;
        let nsm = Arc::new(nsm);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let nsm = Arc::clone(&nsm);
                tokio::spawn(async move {
                    let _ = serve_one(stream, &nsm).await;
                });
            }
        });
        Ok((
            Self {
                url: format!("http://{addr}"),
                task,
            },
            root,
        ))
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

/// Answers one request and closes the connection.
async fn serve_one(mut stream: tokio::net::TcpStream, nsm: &MockNsm) -> Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() > 16 * 1024 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let target = head.split(' ').nth(1).unwrap_or_default();
    let nonce = target
        .strip_prefix("/attestation?nonce=")
        .and_then(|h| hex::decode(h).ok())
        .filter(|n| n.len() <= 512);
    let (status, body, kind) = match nonce {
        Some(n) => match nsm.attest(None, Some(n), None) {
            Ok(doc) => ("200 OK", doc, "application/cbor"),
            Err(e) => (
                "500 Internal Server Error",
                e.to_string().into_bytes(),
                "text/plain",
            ),
        },
        None => ("400 Bad Request", b"bad request".to_vec(), "text/plain"),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await?;
    Ok(())
}
