//! Ed25519 secret key files (admin keys, the development identity provider's key) and
//! `keys gen|show|rotate`.
//!
//! A key file holds the 32-byte secret as 64 hex digits and a newline, mode 0600. It is
//! created with `O_EXCL` (never overwriting a key), and its content never appears in output or
//! error messages: only the public key does.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use attestplane_verifier::admin::{AdminAction, MAX_ADMIN_KEYS};
use attestplane_verifier::entry::KeyId;
use clap::Subcommand;
use ed25519_dalek::{SigningKey, VerifyingKey};
use rand_core::{OsRng, RngCore as _};
use serde_json::json;

use super::submit::submit_admin;
use super::{CliError, CliResult, ClientContext, print_json};

/// The largest key file read (64 hex digits, a newline, some slack for `\r\n` or spaces).
const MAX_KEY_FILE_LEN: u64 = 256;

/// `keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate an Ed25519 key into a new file (mode 0600, hex) and print its public key.
    Gen {
        /// The key file to create; an existing file is never overwritten.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Print the public key (and admin key id) of a secret key file.
    Show {
        /// The key file.
        file: PathBuf,
    },
    /// Replace the admin key set (signed with the current admin key, --admin-key).
    Rotate {
        /// A public key (64 hex digits) of the new set, or a key file whose public half to use
        /// (repeatable; at most 16).
        #[arg(long = "key", value_name = "HEX|FILE", required = true)]
        keys: Vec<String>,
        /// Allow a new set without the key signing this request (you lose admin rights unless
        /// you hold another key of the set).
        #[arg(long)]
        drop_own_key: bool,
    },
}

/// Runs a `keys` command.
pub async fn run(command: KeysCommand, context: &ClientContext) -> CliResult {
    match command {
        KeysCommand::Gen { out } => {
            let key = generate()?;
            write_secret_key(&out, &key)?;
            print_public(&key.verifying_key(), context.json, Some(&out))
        }
        KeysCommand::Show { file } => {
            let key = read_secret_key(&file)?;
            print_public(&key.verifying_key(), context.json, Some(&file))
        }
        KeysCommand::Rotate { keys, drop_own_key } => {
            let admin = admin_key(context)?;
            let new = parse_key_set(&keys)?;
            let own = admin.verifying_key().to_bytes();
            if !drop_own_key && !new.contains(&own) {
                return Err(CliError::Usage(format!(
                    "the new key set does not hold the key signing this request ({}); add it, \
                     or pass --drop-own-key if you hold another key of the set",
                    hex::encode(own)
                )));
            }
            submit_admin(context, &admin, AdminAction::RotateAdminKeys { keys: new }).await
        }
    }
}

fn print_public(key: &VerifyingKey, json: bool, file: Option<&Path>) -> CliResult {
    let public = hex::encode(key.as_bytes());
    if json {
        print_json(&json!({
            "public_key": public,
            "key_id": KeyId::of(key).to_hex(),
            "file": file.map(|f| f.display().to_string()),
        }))
    } else {
        outln!("{public}");
        Ok(())
    }
}

/// A fresh key from the operating system's randomness.
pub fn generate() -> CliResult<SigningKey> {
    let mut secret = [0u8; 32];
    OsRng
        .try_fill_bytes(&mut secret)
        .map_err(|e| CliError::Io(format!("no randomness from the OS: {e}")))?;
    let key = SigningKey::from_bytes(&secret);
    secret.fill(0);
    Ok(key)
}

/// Writes `key` as hex into a new file, mode 0600; refuses an existing file.
pub fn write_secret_key(path: &Path, key: &SigningKey) -> CliResult {
    let mut text = hex::encode(key.to_bytes());
    text.push('\n');
    let result = write_new_private(path, text.as_bytes());
    // Best effort: overwrite our hex copy in place (the SigningKey zeroizes itself on drop).
    text.clear();
    text.push_str(&"0".repeat(65));
    result
}

/// Creates `path` (never overwriting) with mode 0600 and writes `bytes`, synced.
pub fn write_new_private(path: &Path, bytes: &[u8]) -> CliResult {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let io = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CliError::Usage(format!(
                "{} exists; refusing to overwrite it",
                path.display()
            ))
        } else {
            CliError::Io(format!("cannot write {}: {e}", path.display()))
        }
    };
    let mut file = options.open(path).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(())
}

/// Writes `bytes` to `path` with mode 0600, replacing an existing file (tokens, handles).
pub fn write_private(path: &Path, bytes: &[u8]) -> CliResult {
    let io = |e: std::io::Error| CliError::Io(format!("cannot write {}: {e}", path.display()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        // An existing file keeps its mode on open: tighten it before writing the secret.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
    }
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(())
}

/// Reads a hex Ed25519 secret key file. Warns (on stderr) when others may read it.
pub fn read_secret_key(path: &Path) -> CliResult<SigningKey> {
    let io = |e: std::io::Error| CliError::Io(format!("cannot read {}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            eprintln!(
                "warning: {} is readable by others (mode {:o}); chmod 600 it",
                path.display(),
                mode & 0o777
            );
        }
    }
    if meta.len() > MAX_KEY_FILE_LEN {
        return Err(not_a_key(path));
    }
    let mut text = String::new();
    file.take(MAX_KEY_FILE_LEN)
        .read_to_string(&mut text)
        .map_err(|_| not_a_key(path))?;
    let mut secret = [0u8; 32];
    let parsed = hex::decode_to_slice(text.trim(), &mut secret);
    text.clear();
    text.push_str(&"0".repeat(64));
    parsed.map_err(|_| not_a_key(path))?;
    let key = SigningKey::from_bytes(&secret);
    secret.fill(0);
    Ok(key)
}

// The message never quotes the file: it may hold a secret with a typo.
fn not_a_key(path: &Path) -> CliError {
    CliError::Usage(format!(
        "{} is not an Ed25519 secret key file (64 hex digits)",
        path.display()
    ))
}

/// The admin key named by `--admin-key`.
pub fn admin_key(context: &ClientContext) -> CliResult<SigningKey> {
    let path = context.admin_key.as_deref().ok_or_else(|| {
        CliError::Usage(
            "this command signs an admin request: give --admin-key FILE (or ATTESTPLANE_ADMIN_KEY, \
             or admin_key = in the [client] config)"
                .into(),
        )
    })?;
    read_secret_key(path)
}

/// Parses a public key: 64 hex digits, or else a secret key file whose public half to use.
pub fn parse_public_key(s: &str) -> CliResult<[u8; 32]> {
    let mut raw = [0u8; 32];
    if hex::decode_to_slice(s.trim(), &mut raw).is_ok() {
        VerifyingKey::from_bytes(&raw)
            .map_err(|_| CliError::Usage(format!("{s} is not an Ed25519 public key")))?;
        return Ok(raw);
    }
    let path = Path::new(s);
    if path.exists() {
        return Ok(read_secret_key(path)?.verifying_key().to_bytes());
    }
    Err(CliError::Usage(format!(
        "{s:?} is neither a public key (64 hex digits) nor a key file"
    )))
}

/// Parses a new admin key set: distinct keys, at most [`MAX_ADMIN_KEYS`].
pub fn parse_key_set(keys: &[String]) -> CliResult<Vec<[u8; 32]>> {
    if keys.is_empty() || keys.len() > MAX_ADMIN_KEYS {
        return Err(CliError::Usage(format!(
            "an admin key set holds 1 to {MAX_ADMIN_KEYS} keys, not {}",
            keys.len()
        )));
    }
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        let key = parse_public_key(k)?;
        if out.contains(&key) {
            return Err(CliError::Usage(format!(
                "key {} is given twice",
                hex::encode(key)
            )));
        }
        out.push(key);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_are_created_0600_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.key");
        let key = generate().unwrap();
        write_secret_key(&path, &key).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let back = read_secret_key(&path).unwrap();
        assert_eq!(back.to_bytes(), key.to_bytes());
        let other = generate().unwrap();
        assert_ne!(other.to_bytes(), key.to_bytes());
        let e = write_secret_key(&path, &other).unwrap_err();
        assert!(matches!(e, CliError::Usage(_)), "{e:?}");
        assert_eq!(read_secret_key(&path).unwrap().to_bytes(), key.to_bytes());
    }

    #[test]
    fn write_private_tightens_an_existing_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.jwt");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_bad_key_file_is_refused_without_quoting_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let secretish = format!("{}g", "ab".repeat(31));
        std::fs::write(&path, &secretish).unwrap();
        let e = read_secret_key(&path).unwrap_err().to_string();
        assert!(!e.contains("abab"), "{e}");
        std::fs::write(&path, "ab".repeat(31)).unwrap();
        assert!(read_secret_key(&path).is_err());
    }

    #[test]
    fn key_sets_refuse_duplicates_and_bad_keys() {
        let a = hex::encode(generate().unwrap().verifying_key().as_bytes());
        let b = hex::encode(generate().unwrap().verifying_key().as_bytes());
        assert_eq!(parse_key_set(&[a.clone(), b.clone()]).unwrap().len(), 2);
        assert!(parse_key_set(&[a.clone(), a.clone()]).is_err());
        assert!(parse_key_set(&[]).is_err());
        assert!(parse_key_set(&[a[..62].to_string()]).is_err());
        assert!(parse_key_set(&vec![a; MAX_ADMIN_KEYS + 1]).is_err());
    }
}
