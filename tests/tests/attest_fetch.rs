//! The host fetches a server's attestation document from the registered endpoint and nowhere
//! else: a redirect is not followed (a registered server could otherwise point the host at
//! services on its own network). The redirect here leads to a server that would produce a
//! valid document for the nonce, so following it would make the attestation succeed.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;

use attestplane_tests::{DevStack, log_head};
use serde_json::Value;

/// Answers every request with a 302 to the same path and query on `target`.
fn redirector(target: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut request_line = String::new();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let path = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .to_owned();
            let response = format!(
                "HTTP/1.1 302 Found\r\nLocation: {target}{path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = stream.write_all(response.as_bytes());
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attestation_fetch_does_not_follow_redirects() {
    let stack = DevStack::start();
    let files = &stack.files;
    let endpoint = redirector(stack.demo_url.clone());
    let pcrs = files.path("demo-server-pcrs.json").display().to_string();
    files
        .cli(&[
            "servers",
            "register",
            "--id",
            "redirected",
            "--tenant",
            "acme",
            "--resource",
            &format!("{endpoint}/mcp"),
            "--endpoint",
            &endpoint,
            "--server-pcrs",
            &pcrs,
        ])
        .ok();
    let (size_before, _) = log_head(&stack.url);

    let response = reqwest::Client::new()
        .post(format!("{}/v1/servers/redirected/attest", stack.url))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "upstream", "{body}");
    // Nothing reached the enclave's log: no document was handed over.
    assert_eq!(log_head(&stack.url).0, size_before);

    // The same server registered at its real endpoint attests fine (the redirect target was
    // good: only the redirect was refused).
    files.register_and_attest_weather(&stack.demo_url);
}
