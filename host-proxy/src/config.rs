//! The `attestplane` configuration file (TOML).
//!
//! Every setting can also be given as a flag or an environment variable; a flag wins over the
//! environment, which wins over the file, which wins over the built-in default. Unknown keys are
//! refused, so a misspelt setting is an error rather than a silently ignored line.
//!
//! ```toml
//! [proxy]
//! listen = "127.0.0.1:7400"            # the HTTP API
//! enclave = "vsock:16:5005"            # vsock:CID:PORT, unix:PATH or tcp:IP:PORT
//! data_dir = "/var/lib/attestplane"    # the log store and checkpoints
//! genesis_admin_keys = ["<hex ed25519 public key>"]
//! connections = 4                      # persistent connections to the enclave
//! request_timeout = "10s"
//! max_in_flight = 4096                 # requests in flight to the enclave before 503
//! enclave_mcp = "vsock:16:5006"        # the enclave's MCP port: turns on the MCP relays
//! dial_listen = "vsock:any:5007"       # where the enclave dials registered MCP servers
//! mcp_listen = "127.0.0.1:7300"        # agents' MCP connections
//! max_mcp_connections = 1024
//! mcp_idle_timeout = "5m"
//!
//! [client]
//! url = "http://127.0.0.1:7400"
//! admin_key = "admin.key"              # relative paths are relative to this file
//! token = "agent.jwt"
//! idp_key = "idp.key"
//! idp_issuer = "https://dev-idp.attestplane.local"
//! idp_audience = "attestplane"
//! root = "control-plane-root.pem"
//! pcrs = "control-plane-pcrs.json"
//! allow_debug = false
//! origin = "attestplane.example/log"  # the pinned deployment (`attestplane deployment pin`):
//! genesis = "<hex SHA-256 of entry 1>" # admin requests are signed for this log only
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The largest configuration file read.
const MAX_CONFIG_LEN: u64 = 1024 * 1024;

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// `[proxy]`.
    #[serde(default)]
    pub proxy: ProxySection,
    /// `[client]`.
    #[serde(default)]
    pub client: ClientSection,
}

/// `[proxy]`: the server side.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    /// Address of the HTTP API.
    pub listen: Option<String>,
    /// Address of the enclave.
    pub enclave: Option<String>,
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Genesis admin keys (hex).
    pub genesis_admin_keys: Option<Vec<String>>,
    /// Persistent enclave connections.
    pub connections: Option<usize>,
    /// Request timeout (humantime, e.g. `10s`).
    pub request_timeout: Option<String>,
    /// Requests in flight to the enclave before the proxy answers 503.
    pub max_in_flight: Option<usize>,
    /// The enclave's MCP address (turns on the MCP relays).
    pub enclave_mcp: Option<String>,
    /// Where the enclave dials upstream connections.
    pub dial_listen: Option<String>,
    /// Agent-facing address of the MCP relay.
    pub mcp_listen: Option<String>,
    /// Relayed MCP connections at once (agents, and separately upstreams).
    pub max_mcp_connections: Option<usize>,
    /// Idle timeout of relayed MCP connections (humantime).
    pub mcp_idle_timeout: Option<String>,
}

/// `[client]`: the CLI's client commands.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSection {
    /// The proxy's base URL.
    pub url: Option<String>,
    /// Admin key file.
    pub admin_key: Option<PathBuf>,
    /// Agent token file.
    pub token: Option<PathBuf>,
    /// Development identity provider key file.
    pub idp_key: Option<PathBuf>,
    /// Development identity provider issuer.
    pub idp_issuer: Option<String>,
    /// Development identity provider audience.
    pub idp_audience: Option<String>,
    /// Control plane root PEM.
    pub root: Option<PathBuf>,
    /// Control plane expected PCRs (JSON).
    pub pcrs: Option<PathBuf>,
    /// Accept a debug-mode control plane.
    pub allow_debug: Option<bool>,
    /// The pinned deployment's log origin.
    pub origin: Option<String>,
    /// The pinned deployment's genesis entry hash (hex).
    pub genesis: Option<String>,
}

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is larger than anything sensible.
    #[error("the configuration file {path} is larger than {MAX_CONFIG_LEN} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("the configuration file {path} is invalid: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
}

impl ConfigFile {
    /// Reads `path`; relative paths inside it are resolved against the file's directory.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let read = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let len = std::fs::metadata(path).map_err(read)?.len();
        if len > MAX_CONFIG_LEN {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        let mut config = ConfigFile::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        Ok(config)
    }

    /// Parses TOML text; the error is the parser's message.
    pub fn parse(text: &str) -> Result<ConfigFile, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut Option<PathBuf>| {
            if let Some(path) = p.as_mut()
                && path.is_relative()
            {
                *path = base.join(&*path);
            }
        };
        fix(&mut self.proxy.data_dir);
        fix(&mut self.client.admin_key);
        fix(&mut self.client.token);
        fix(&mut self.client.idp_key);
        fix(&mut self.client.root);
        fix(&mut self.client.pcrs);
        for address in [
            &mut self.proxy.enclave,
            &mut self.proxy.enclave_mcp,
            &mut self.proxy.dial_listen,
        ] {
            if let Some(address) = address.as_mut()
                && let Some(rest) = address.strip_prefix("unix:")
                && Path::new(rest).is_relative()
            {
                *address = format!("unix:{}", base.join(rest).display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_refused() {
        let err =
            ConfigFile::parse("[proxy]\nlisten = \"127.0.0.1:1\"\nlistne = \"x\"\n").unwrap_err();
        assert!(err.contains("listne"), "{err}");
        assert!(ConfigFile::parse("[proxi]\n").is_err());
    }

    #[test]
    fn relative_paths_resolve_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[proxy]\ndata_dir = \"data\"\nenclave = \"unix:e.sock\"\n[client]\nadmin_key = \"/abs/admin.key\"\ntoken = \"t.jwt\"\n",
        )
        .unwrap();
        let c = ConfigFile::load(&path).unwrap();
        assert_eq!(c.proxy.data_dir.unwrap(), dir.path().join("data"));
        assert_eq!(
            c.proxy.enclave.unwrap(),
            format!("unix:{}", dir.path().join("e.sock").display())
        );
        assert_eq!(c.client.admin_key.unwrap(), PathBuf::from("/abs/admin.key"));
        assert_eq!(c.client.token.unwrap(), dir.path().join("t.jwt"));
    }
}
