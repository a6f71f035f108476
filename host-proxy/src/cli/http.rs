//! The HTTP client of the proxy's API (docs/http-api.md): requests, bounded bodies, and the
//! API's error shape decoded into [`CliError::Api`].
//!
//! Plain HTTP only: this build of `attestplane` has no TLS. That is deliberate, not a
//! security gap: nothing the proxy serves needs to be believed (the CLI verifies what matters:
//! attestation documents, handles; auditors verify the log offline), and the proxy listens on
//! the parent instance's loopback or private network. Bearer tokens do travel in the clear, so
//! reach a remote proxy through an SSH tunnel or a TLS-terminating reverse proxy, never over an
//! untrusted network.
//!
//! Environment proxy settings (`HTTP_PROXY`…) are ignored: the CLI talks to the proxy
//! directly, so a bearer token is never handed to a third party by an environment variable.

use std::time::Duration;

use reqwest::{Method, RequestBuilder, StatusCode, Url};
use serde::de::DeserializeOwned;

use super::{CliError, clean};
use crate::api::body::ErrorBody;

/// The largest JSON response read.
pub const MAX_JSON_LEN: usize = 4 * 1024 * 1024;

/// The largest page of log entries read (4096 entries of up to a few KiB each).
pub const MAX_ENTRIES_PAGE_LEN: usize = 256 * 1024 * 1024;

/// The largest checkpoint note read.
pub const MAX_NOTE_LEN: usize = 64 * 1024;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a whole request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The longest part of an undecodable error body quoted in a message.
const MAX_QUOTED_ERROR: usize = 200;

/// A client of one proxy.
#[derive(Debug, Clone)]
pub struct Api {
    base: Url,
    client: reqwest::Client,
}

impl Api {
    /// A client of the proxy at `base` (`http://HOST:PORT`, optionally with a path prefix).
    pub fn new(base: &str) -> Result<Self, CliError> {
        let base = Url::parse(base)
            .map_err(|e| CliError::Usage(format!("bad proxy URL {base:?}: {e}")))?;
        match base.scheme() {
            "http" => {}
            "https" => {
                return Err(CliError::Usage(format!(
                    "{base}: this build of attestplane speaks plain HTTP only (no TLS); reach a \
                     remote proxy through an SSH tunnel or a local TLS-terminating proxy"
                )));
            }
            other => {
                return Err(CliError::Usage(format!(
                    "{base}: unsupported URL scheme {other:?} (want http://)"
                )));
            }
        }
        if base.cannot_be_a_base() || base.host().is_none() {
            return Err(CliError::Usage(format!("{base}: not a base URL")));
        }
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("attestplane/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CliError::Io(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self { base, client })
    }

    /// The URL of `segments` (each percent-encoded as one path segment) under the base.
    pub fn url(&self, segments: &[&str]) -> Result<Url, CliError> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| CliError::Usage(format!("{}: not a base URL", self.base)))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    fn request(&self, method: Method, segments: &[&str]) -> Result<RequestBuilder, CliError> {
        Ok(self.client.request(method, self.url(segments)?))
    }

    /// `GET` a JSON document.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
        bearer: Option<&str>,
    ) -> Result<T, CliError> {
        let mut rb = self.request(Method::GET, segments)?.query(query);
        if let Some(token) = bearer {
            rb = rb.bearer_auth(token);
        }
        let body = self.send(rb, MAX_JSON_LEN).await?;
        decode_json(&body)
    }

    /// `POST` (a JSON body if given) and read a JSON answer.
    pub async fn post_json<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: Option<&serde_json::Value>,
        bearer: Option<&str>,
    ) -> Result<T, CliError> {
        let mut rb = self.request(Method::POST, segments)?;
        if let Some(body) = body {
            rb = rb.json(body);
        }
        if let Some(token) = bearer {
            rb = rb.bearer_auth(token);
        }
        let body = self.send(rb, MAX_JSON_LEN).await?;
        decode_json(&body)
    }

    /// A request answered with raw bytes (at most `max` of them).
    pub async fn bytes(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        max: usize,
    ) -> Result<Vec<u8>, CliError> {
        let rb = self.request(method, segments)?.query(query);
        self.send(rb, max).await
    }

    /// Sends a request; a 2xx answer's body (at most `max` bytes), or the API error.
    async fn send(&self, rb: RequestBuilder, max: usize) -> Result<Vec<u8>, CliError> {
        let mut response = rb.send().await.map_err(|e| self.transport(e))?;
        let status = response.status();
        let limit = if status.is_success() {
            max
        } else {
            MAX_JSON_LEN.min(max)
        };
        if let Some(len) = response.content_length()
            && len > limit as u64
        {
            return Err(CliError::Io(format!(
                "the proxy's answer is {len} bytes, more than the limit of {limit}"
            )));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| self.transport(e))? {
            if body.len().saturating_add(chunk.len()) > limit {
                return Err(CliError::Io(format!(
                    "the proxy's answer is more than the limit of {limit} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        if status.is_success() {
            Ok(body)
        } else {
            Err(api_error(status, &body))
        }
    }

    fn transport(&self, e: reqwest::Error) -> CliError {
        // Show the chain without the URL's query (which may carry a nonce, never a secret,
        // but keeps messages short) and never a header.
        let what = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "cannot connect"
        } else if e.is_body() || e.is_decode() {
            "bad response body"
        } else {
            "request failed"
        };
        let mut detail = String::new();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            detail = s.to_string();
            source = s.source();
        }
        let detail = if detail.is_empty() {
            String::new()
        } else {
            format!(": {detail}")
        };
        CliError::Io(format!(
            "{what} talking to the proxy at {}{detail}",
            self.base
        ))
    }
}

fn decode_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, CliError> {
    serde_json::from_slice(body)
        .map_err(|e| CliError::Io(format!("the proxy's answer is not the expected JSON: {e}")))
}

/// Decodes an error answer; a body not in the API's shape becomes `http_<status>`.
pub fn api_error(status: StatusCode, body: &[u8]) -> CliError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { error }) => CliError::Api {
            status: status.as_u16(),
            code: clean(&error.code),
            message: clean(&error.message),
            seq: error.seq,
        },
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let mut quoted: String = text.trim().chars().take(MAX_QUOTED_ERROR).collect();
            if quoted.is_empty() {
                quoted = status.canonical_reason().unwrap_or("no message").to_owned();
            }
            CliError::Api {
                status: status.as_u16(),
                code: format!("http_{}", status.as_u16()),
                message: clean(&quoted),
                seq: None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_api_error_shape_with_and_without_seq() {
        let e = api_error(
            StatusCode::FORBIDDEN,
            br#"{"error":{"code":"denied","message":"no policy permits resolve","seq":42}}"#,
        );
        assert_eq!(
            e.to_string(),
            "denied: no policy permits resolve (log entry 42)"
        );
        assert_eq!(e.exit_code(), 1);
        let e = api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"error":{"code":"not_ready","message":"enclave replaying"}}"#,
        );
        assert_eq!(e.to_string(), "not_ready: enclave replaying");
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn a_foreign_error_body_is_quoted_cleaned_and_bounded() {
        let mut body = b"\x1b[31mboom\x07".to_vec();
        body.extend(std::iter::repeat_n(b'x', 1000));
        let e = api_error(StatusCode::NOT_FOUND, &body);
        let CliError::Api { code, message, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(code, "http_404");
        assert!(message.starts_with("?[31mboom?x"), "{message}");
        assert_eq!(message.chars().count(), MAX_QUOTED_ERROR);
        let e = api_error(StatusCode::METHOD_NOT_ALLOWED, b"");
        assert_eq!(e.to_string(), "http_405: Method Not Allowed");
    }

    #[test]
    fn refuses_https_and_other_schemes() {
        for bad in [
            "https://127.0.0.1:7400",
            "ftp://x",
            "unix:/tmp/s",
            "127.0.0.1:7400",
        ] {
            let e = Api::new(bad).unwrap_err();
            assert!(matches!(e, CliError::Usage(_)), "{bad}: {e:?}");
        }
        assert!(Api::new("http://127.0.0.1:7400").is_ok());
    }

    #[test]
    fn path_segments_are_escaped_under_the_base_path() {
        let api = Api::new("http://127.0.0.1:7400/prefix/").unwrap();
        let url = api.url(&["v1", "servers", "a/b?c", "handle"]).unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:7400/prefix/v1/servers/a%2Fb%3Fc/handle"
        );
        let api = Api::new("http://127.0.0.1:7400").unwrap();
        assert_eq!(
            api.url(&["v1", "jwks"]).unwrap().as_str(),
            "http://127.0.0.1:7400/v1/jwks"
        );
    }
}
