//! A minimal HTTP/1.1 client over one keep-alive connection.
//!
//! The load generator shares the machine with the stack it measures, so it should cost as
//! little as possible: a request is a few pre-formatted bytes written on a kept-alive TCP
//! connection, a response is a status line, headers up to the blank line and a body of
//! `Content-Length` bytes (the proxy always sends one). Anything else (chunked bodies, a closed
//! connection, an oversized header) is an error, and the caller reconnects.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest response header block accepted.
const MAX_HEAD: usize = 16 * 1024;
/// The largest response body accepted.
const MAX_BODY: usize = 1024 * 1024;

/// A response: status and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

/// One keep-alive connection.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends the complete request `raw` (see [`request_bytes`]) and reads the response.
    pub async fn send(&mut self, raw: &[u8]) -> Result<Reply> {
        self.stream.write_all(raw).await?;
        self.read_reply().await
    }

    async fn read_reply(&mut self) -> Result<Reply> {
        // Read until the end of the headers.
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            if self.buf.len() > MAX_HEAD {
                bail!("response headers longer than {MAX_HEAD} bytes");
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).context("response head")?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {status_line:?}"))?;
        let mut length = None;
        for line in lines {
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = Some(value.trim().parse::<usize>().context("Content-Length")?);
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    bail!("unsupported Transfer-Encoding {}", value.trim());
                }
            }
        }
        let length = length.context("response without Content-Length")?;
        if length > MAX_BODY {
            bail!("response body of {length} bytes");
        }
        while self.buf.len() < head_end + length {
            self.fill().await?;
        }
        let body = self.buf[head_end..head_end + length].to_vec();
        self.buf.drain(..head_end + length);
        Ok(Reply { status, body })
    }

    async fn fill(&mut self) -> Result<()> {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("the server closed the connection");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The bytes of a request. `bearer` adds an `Authorization` header; `json` a JSON body.
pub fn request_bytes(
    method: &str,
    host: SocketAddr,
    path: &str,
    bearer: Option<&str>,
    json: Option<&str>,
) -> Vec<u8> {
    request_bytes_with(method, host, path, bearer, &[], json)
}

/// [`request_bytes`] with `headers` (name, value) added.
pub fn request_bytes_with(
    method: &str,
    host: SocketAddr,
    path: &str,
    bearer: Option<&str>,
    headers: &[(&str, &str)],
    json: Option<&str>,
) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    if let Some(b) = bearer {
        r.push_str(&format!("Authorization: Bearer {b}\r\n"));
    }
    for (name, value) in headers {
        r.push_str(&format!("{name}: {value}\r\n"));
    }
    match json {
        Some(body) => {
            r.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ));
        }
        None => r.push_str("Content-Length: 0\r\n\r\n"),
    }
    r.into_bytes()
}

/// One request on a fresh connection (set-up calls).
pub async fn once(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    json: Option<&str>,
) -> Result<Reply> {
    let mut conn = Conn::connect(addr).await?;
    conn.send(&request_bytes(method, addr, path, bearer, json))
        .await
        .with_context(|| format!("{method} {path}"))
}
