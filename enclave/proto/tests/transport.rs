//! Frames over real sockets (loopback TCP on port 0, a Unix socket in a temp dir) and over
//! in-memory pipes that deliver them a byte at a time.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use attestplane_proto::{
    Address, Body, ByteBuf, ErrorCode, Frame, FrameDecoder, Listener, ProtoError, Request,
    Response, Stream, VSOCK_ANY, connect, encode_frame, read_frame, write_frame,
};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::time::timeout;

const DEADLINE: Duration = Duration::from_secs(10);

/// Answers every request with `Persist` under the request's id, in reverse order of arrival per
/// batch of `batch` requests (out-of-order replies), and every undecodable frame with its error
/// reply. Returns at a clean close.
async fn serve_one(listener: Listener, batch: usize) -> Result<(), ProtoError> {
    let stream = listener.accept().await?;
    let (read, mut write) = tokio::io::split(stream);
    let mut read = BufReader::new(read);
    let mut decoder = FrameDecoder::new();
    let mut pending = Vec::new();
    loop {
        match read_frame(&mut read, &mut decoder).await {
            Ok(Some(frame)) => {
                let Body::Request(Request::Admin { request }) = frame.body else {
                    let reply = Frame::response(
                        frame.id,
                        Response::error(ErrorCode::BadRequest, "expected admin"),
                    );
                    write_frame(&mut write, &reply).await?;
                    continue;
                };
                pending.push(Frame::response(
                    frame.id,
                    Response::Persist {
                        first_seq: frame.id,
                        entries: vec![request],
                    },
                ));
                if pending.len() == batch {
                    while let Some(reply) = pending.pop() {
                        write_frame(&mut write, &reply).await?;
                    }
                }
            }
            Ok(None) => return Ok(()),
            Err(e) if !e.is_fatal() => write_frame(&mut write, &e.reply()).await?,
            Err(e) => return Err(e),
        }
    }
}

/// Sends `n` admin requests over `stream`, one malformed frame, and checks every reply.
async fn exercise(stream: Stream, n: u64) {
    let (read, mut write) = tokio::io::split(stream);
    let mut read = BufReader::new(read);
    for id in 1..=n {
        let payload = ByteBuf::from(vec![u8::try_from(id % 251).unwrap(); id as usize * 100]);
        write_frame(
            &mut write,
            &Frame::request(id, Request::Admin { request: payload }),
        )
        .await
        .unwrap();
    }
    let mut decoder = FrameDecoder::new();
    let mut seen = Vec::new();
    for _ in 0..n {
        let frame = read_frame(&mut read, &mut decoder).await.unwrap().unwrap();
        let Body::Response(Response::Persist { first_seq, entries }) = frame.body else {
            panic!("unexpected reply {frame:?}");
        };
        assert_eq!(first_seq, frame.id);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].len(), frame.id as usize * 100);
        seen.push(frame.id);
    }
    // Replies came out of order, each under its own id.
    assert_ne!(seen, (1..=n).collect::<Vec<_>>());
    seen.sort_unstable();
    assert_eq!(seen, (1..=n).collect::<Vec<_>>());

    // A malformed frame with a readable id is answered under that id; the connection survives.
    let mut bad = encode_frame(&Frame::request(99, Request::Status)).unwrap();
    let status = b"status";
    let at = bad.windows(status.len()).position(|w| w == status).unwrap();
    bad[at..at + status.len()].copy_from_slice(b"statue"); // same length, unknown variant
    write.write_all(&bad).await.unwrap();
    let reply = read_frame(&mut read, &mut decoder).await.unwrap().unwrap();
    assert_eq!(reply.id, 99);
    assert!(
        matches!(
            reply.body,
            Body::Response(Response::Error {
                code: ErrorCode::BadFrame,
                ..
            })
        ),
        "{reply:?}"
    );
    write_frame(&mut write, &Frame::request(100, Request::Status))
        .await
        .unwrap();
    let reply = read_frame(&mut read, &mut decoder).await.unwrap().unwrap();
    assert_eq!(reply.id, 100);
    write.shutdown().await.unwrap();
}

#[tokio::test]
async fn tcp_loopback_carries_multiplexed_frames_answered_out_of_order() {
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let address = listener.local_addr().unwrap();
    let Address::Tcp(sock) = address else {
        panic!("not tcp: {address}");
    };
    assert_ne!(sock.port(), 0);
    let server = tokio::spawn(serve_one(listener, 4));
    let stream = connect(&address).await.unwrap();
    assert!(matches!(stream, Stream::Tcp(_)));
    timeout(DEADLINE, exercise(stream, 12)).await.unwrap();
    timeout(DEADLINE, server).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn unix_socket_carries_multiplexed_frames_answered_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let address = Address::Unix(dir.path().join("enclave.sock"));
    let listener = Listener::bind(&address).await.unwrap();
    assert_eq!(listener.local_addr().unwrap(), address);
    let server = tokio::spawn(serve_one(listener, 3));
    let stream = connect(&address).await.unwrap();
    assert!(matches!(stream, Stream::Unix(_)));
    timeout(DEADLINE, exercise(stream, 9)).await.unwrap();
    timeout(DEADLINE, server).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn unix_bind_refuses_an_existing_path() {
    let dir = tempfile::tempdir().unwrap();
    let address = Address::Unix(dir.path().join("taken.sock"));
    let _first = Listener::bind(&address).await.unwrap();
    assert!(Listener::bind(&address).await.is_err());
}

#[tokio::test]
async fn frames_delivered_a_byte_at_a_time_decode_intact() {
    let (mut client, server) = tokio::io::duplex(1);
    let frames: Vec<Frame> = (0..20)
        .map(|i| {
            Frame::response(
                i,
                Response::Checkpoint {
                    note: "x".repeat(i as usize * 7),
                },
            )
        })
        .collect();
    let sent = frames.clone();
    let writer = tokio::spawn(async move {
        for f in &sent {
            write_frame(&mut client, f).await.unwrap();
        }
    });
    let mut server = server;
    let mut decoder = FrameDecoder::new();
    for want in &frames {
        let got = timeout(DEADLINE, read_frame(&mut server, &mut decoder))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(&got, want);
    }
    writer.await.unwrap();
    assert!(
        timeout(DEADLINE, read_frame(&mut server, &mut decoder))
            .await
            .unwrap()
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn read_frame_is_cancel_safe() {
    let (mut client, mut server) = tokio::io::duplex(1 << 16);
    let frame = Frame::request(5, Request::Discover { bearer: "b".into() });
    let bytes = encode_frame(&frame).unwrap();
    let (head, tail) = bytes.split_at(bytes.len() / 2);
    client.write_all(head).await.unwrap();
    let mut decoder = FrameDecoder::new();
    // Abandon a read in the middle of the frame...
    assert!(
        timeout(
            Duration::from_millis(50),
            read_frame(&mut server, &mut decoder)
        )
        .await
        .is_err()
    );
    assert_eq!(decoder.buffered(), head.len());
    // ...and the next call picks up where it stopped.
    client.write_all(tail).await.unwrap();
    let got = timeout(DEADLINE, read_frame(&mut server, &mut decoder))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, Some(frame));
}

#[tokio::test]
async fn oversized_prefix_fails_at_once_without_waiting_for_the_body() {
    let (mut client, mut server) = tokio::io::duplex(64);
    client.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    // The client stays open and sends nothing more: the error must not wait for a body.
    let err = timeout(DEADLINE, read_frame(&mut server, &mut FrameDecoder::new()))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, ProtoError::TooLarge { .. }), "{err}");
    assert!(err.is_fatal());
    drop(client);
}

#[tokio::test]
async fn close_mid_frame_is_unexpected_eof_and_at_a_boundary_is_none() {
    let bytes = encode_frame(&Frame::request(1, Request::Status)).unwrap();

    let (mut client, mut server) = tokio::io::duplex(1024);
    client.write_all(&bytes[..bytes.len() - 1]).await.unwrap();
    drop(client);
    let err = read_frame(&mut server, &mut FrameDecoder::new())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ProtoError::UnexpectedEof { buffered } if buffered == bytes.len() - 1),
        "{err}"
    );

    let (mut client, mut server) = tokio::io::duplex(1024);
    client.write_all(&bytes).await.unwrap();
    drop(client);
    let mut decoder = FrameDecoder::new();
    assert!(
        read_frame(&mut server, &mut decoder)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        read_frame(&mut server, &mut decoder)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn write_frame_refuses_an_unencodable_frame_and_writes_nothing() {
    let (mut client, mut server) = tokio::io::duplex(1024);
    let bad = Frame::request(
        1,
        Request::ReplayBegin {
            genesis_admin_keys: vec![ByteBuf::from(vec![0u8; 31])],
            total_entries: 1,
        },
    );
    assert!(matches!(
        write_frame(&mut client, &bad).await,
        Err(ProtoError::Encode { .. })
    ));
    drop(client);
    assert!(
        read_frame(&mut server, &mut FrameDecoder::new())
            .await
            .unwrap()
            .is_none()
    );
}

/// This machine may have no vsock support at all; binding must then fail with an error, never
/// a panic. Nothing connects anywhere (never to CID 2 or 3).
#[tokio::test]
async fn vsock_bind_succeeds_or_fails_cleanly() {
    let address = Address::Vsock {
        cid: VSOCK_ANY,
        port: VSOCK_ANY,
    };
    match Listener::bind(&address).await {
        Ok(listener) => {
            let local = listener.local_addr().unwrap();
            assert!(
                matches!(local, Address::Vsock { port, .. } if port != VSOCK_ANY),
                "{local}"
            );
            assert!(matches!(listener, Listener::Vsock(_)));
            eprintln!("vsock listener bound at {local} (not connecting)");
        }
        Err(e) => eprintln!("skipping: vsock unavailable ({e})"),
    }
}
