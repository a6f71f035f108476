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
//! - [`Proc`]: a child process with piped stdout, read on a thread so that [`Proc::wait_line`]
//!   can wait for the ready line with a timeout; its stderr goes to a file whose tail is quoted
//!   in failure messages. It is killed (SIGKILL) and reaped on drop, so a failing test leaves no
//!   process behind.
//! - Small helpers: running a command to completion ([`run`]), splitting an exported log (a CBOR
//!   sequence) into entries ([`split_log`]), temporary directories ([`temp_dir`]).
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
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{} printed no line starting with {prefix:?} within {timeout:?}\n{}",
                    self.name,
                    self.diagnostics()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.as_mut().and_then(|c| c.wait().ok());
                    panic!(
                        "{} exited ({status:?}) before printing a line starting with {prefix:?}\n{}",
                        self.name,
                        self.diagnostics()
                    )
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
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let len = attestplane_verifier::cbor::item_len(rest)
            .unwrap_or_else(|e| panic!("entry {} of the log is not CBOR: {e}", out.len()));
        let (item, tail) = rest.split_at(len);
        out.push(item.to_vec());
        rest = tail;
    }
    out
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
