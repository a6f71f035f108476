//! The one shutdown signal of the workspace's long-running programs (the enclave, the host
//! proxy with `attestplane dev`, the demo MCP server): this crate is the one both sides of the
//! channel already depend on, so the programs share it instead of keeping copies.

/// Completes on SIGINT or SIGTERM (on SIGINT alone where there is no SIGTERM), then says on
/// stderr that `program` is shutting down. A signal that cannot be listened for is reported on
/// stderr and never completes, so the other one still stops the program.
pub async fn shutdown_signal(program: &str) {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            eprintln!("{program}: cannot listen for SIGINT: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                eprintln!("{program}: cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    eprintln!("{program}: shutting down");
}
