//! The wire format on the public API: every message round-trips, the encoding is pinned, and
//! hostile bytes give typed errors.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use attestplane_proto::{
    Body, ByteBuf, ED25519_PUBLIC_KEY_LEN, ErrorCode, Frame, FrameDecoder, LEN_PREFIX,
    MAX_ADMIN_KEYS, MAX_ENTRIES_PER_FRAME, MAX_FRAME_LEN, PROTOCOL_VERSION, ProtoError, Request,
    Response, ServerInfo, decode_frame, encode_frame,
};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

fn bytes(max: usize) -> impl Strategy<Value = ByteBuf> {
    vec(any::<u8>(), 0..max).prop_map(ByteBuf::from)
}

fn text() -> impl Strategy<Value = String> {
    ".{0,24}"
}

fn code() -> impl Strategy<Value = ErrorCode> {
    proptest::sample::select(ErrorCode::ALL.to_vec())
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        any::<u16>().prop_map(|version| Request::Hello { version }),
        (
            vec(
                proptest::array::uniform32(any::<u8>()).prop_map(|k| ByteBuf::from(k.to_vec())),
                0..4
            ),
            any::<u64>()
        )
            .prop_map(|(genesis_admin_keys, total_entries)| Request::ReplayBegin {
                genesis_admin_keys,
                total_entries
            }),
        vec(bytes(64), 0..5).prop_map(|entries| Request::ReplayEntries { entries }),
        Just(Request::ReplayEnd),
        any::<u64>().prop_map(|through_seq| Request::Durable { through_seq }),
        bytes(128).prop_map(|request| Request::Admin { request }),
        text().prop_map(|server_id| Request::AttestChallenge { server_id }),
        (text(), bytes(64), bytes(256)).prop_map(|(server_id, nonce, document)| {
            Request::AttestEvidence {
                server_id,
                nonce,
                document,
            }
        }),
        (text(), text()).prop_map(|(bearer, server_id)| Request::Resolve { bearer, server_id }),
        text().prop_map(|bearer| Request::Discover { bearer }),
        (text(), text(), text()).prop_map(|(bearer, server_id, tool)| Request::Authorize {
            bearer,
            server_id,
            tool
        }),
        Just(Request::Checkpoint),
        option::of(bytes(64)).prop_map(|nonce| Request::GetAttestation { nonce }),
        Just(Request::Status),
    ]
}

fn server() -> impl Strategy<Value = ServerInfo> {
    (text(), text(), text(), text(), any::<bool>()).prop_map(
        |(id, name, tenant, resource, attested)| ServerInfo {
            id,
            name,
            tenant,
            resource,
            attested,
        },
    )
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        (
            any::<u16>(),
            any::<bool>(),
            option::of(any::<u64>()),
            option::of(any::<u64>())
        )
            .prop_map(|(version, ready, epoch, head_seq)| Response::Hello {
                version,
                ready,
                epoch,
                head_seq
            }),
        Just(Response::Ack),
        (any::<u64>(), vec(bytes(64), 0..5))
            .prop_map(|(first_seq, entries)| Response::Persist { first_seq, entries }),
        (bytes(64), any::<u64>()).prop_map(|(nonce, expires_at_ms)| Response::Challenge {
            nonce,
            expires_at_ms
        }),
        (any::<bool>(), any::<u64>(), option::of(text())).prop_map(|(accepted, seq, reason)| {
            Response::AdminResult {
                accepted,
                seq,
                reason,
            }
        }),
        (
            any::<bool>(),
            any::<u64>(),
            option::of(text()),
            option::of(text())
        )
            .prop_map(
                |(verified, seq, measurement, reason)| Response::AttestResult {
                    verified,
                    seq,
                    measurement,
                    reason
                }
            ),
        (text(), any::<u64>(), any::<u64>()).prop_map(|(token, seq, expires_at)| {
            Response::Handle {
                token,
                seq,
                expires_at,
            }
        }),
        (any::<u64>(), text(), code()).prop_map(|(seq, reason, code)| Response::Denied {
            seq,
            reason,
            code
        }),
        (vec(server(), 0..4), any::<u64>())
            .prop_map(|(servers, seq)| Response::Servers { servers, seq }),
        (any::<bool>(), any::<u64>(), option::of(text())).prop_map(|(allowed, seq, reason)| {
            Response::Authorized {
                allowed,
                seq,
                reason,
            }
        }),
        text().prop_map(|note| Response::Checkpoint { note }),
        (bytes(256), text()).prop_map(|(document, jwks)| Response::Attestation { document, jwks }),
        (
            any::<bool>(),
            option::of(any::<u64>()),
            option::of(any::<u64>()),
            option::of(any::<u64>()),
            any::<u64>()
        )
            .prop_map(
                |(ready, epoch, head_seq, durable_seq, servers)| Response::Status {
                    ready,
                    epoch,
                    head_seq,
                    durable_seq,
                    servers,
                }
            ),
        (option::of(any::<u64>()), text())
            .prop_map(|(seq, message)| Response::BrokenLog { seq, message }),
        (code(), text()).prop_map(|(code, message)| Response::Error { code, message }),
    ]
}

/// A final reply wrapped in `Held`.
fn held() -> impl Strategy<Value = Response> {
    (
        any::<u64>(),
        response().prop_filter("a final reply", |r| !matches!(r, Response::Persist { .. })),
    )
        .prop_map(|(through_seq, reply)| Response::Held {
            through_seq,
            reply: Box::new(reply),
        })
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u64>(), request()).prop_map(|(id, r)| Frame::request(id, r)),
        (any::<u64>(), response()).prop_map(|(id, r)| Frame::response(id, r)),
        (any::<u64>(), held()).prop_map(|(id, r)| Frame::response(id, r)),
    ]
}

/// A length-prefixed frame around an arbitrary body.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// CBOR text string (short form, < 24 bytes).
fn t(s: &str) -> Vec<u8> {
    assert!(s.len() < 24);
    let mut out = vec![0x60 | u8::try_from(s.len()).unwrap()];
    out.extend_from_slice(s.as_bytes());
    out
}

proptest! {
    #[test]
    fn every_message_round_trips_through_the_frame_encoding(f in frame()) {
        let bytes = encode_frame(&f).unwrap();
        prop_assert_eq!(decode_frame(&bytes).unwrap(), f.clone());
        // And through the incremental decoder, split at an arbitrary point.
        let mut d = FrameDecoder::new();
        let split = bytes.len() / 2;
        prop_assert_eq!(d.push(&bytes[..split]).unwrap(), split);
        prop_assert_eq!(d.next_frame().unwrap(), None);
        prop_assert_eq!(d.push(&bytes[split..]).unwrap(), bytes.len() - split);
        prop_assert_eq!(d.next_frame().unwrap(), Some(f));
        prop_assert!(d.is_idle());
    }

    #[test]
    fn random_bytes_never_panic_decode_frame(input in vec(any::<u8>(), 0..512)) {
        let _ = decode_frame(&input);
    }

    #[test]
    fn random_bytes_never_panic_or_overfill_the_decoder(
        input in vec(any::<u8>(), 0..2048),
        chunk in 1usize..64,
    ) {
        let mut d = FrameDecoder::new();
        for piece in input.chunks(chunk) {
            let mut rest = piece;
            loop {
                match d.push(rest) {
                    Ok(n) => rest = &rest[n..],
                    Err(e) => {
                        let too_large = matches!(e, ProtoError::TooLarge { .. });
                        prop_assert!(too_large, "{}", e);
                        return Ok(());
                    }
                }
                match d.next_frame() {
                    Ok(Some(_)) | Err(_) => continue,
                    Ok(None) if rest.is_empty() => break,
                    Ok(None) => prop_assert!(false, "decoder took nothing and has no frame"),
                }
            }
            prop_assert!(d.buffered() <= LEN_PREFIX + MAX_FRAME_LEN);
        }
    }

    #[test]
    fn random_bodies_give_typed_errors(body in vec(any::<u8>(), 0..512)) {
        match decode_frame(&framed(&body)) {
            Ok(f) => prop_assert_eq!(f.version, PROTOCOL_VERSION),
            Err(e) => prop_assert!(matches!(
                e,
                ProtoError::Malformed { .. }
                    | ProtoError::TrailingBytes { .. }
                    | ProtoError::UnsupportedVersion { .. }
            ), "{}", e),
        }
    }

    #[test]
    fn corrupted_frames_never_panic(f in frame(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = encode_frame(&f).unwrap();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        let _ = decode_frame(&bytes);
        let mut d = FrameDecoder::new();
        if d.push(&bytes).is_ok() {
            let _ = d.next_frame();
        }
    }

    #[test]
    fn every_truncation_is_reported_as_truncated(f in frame(), at in any::<prop::sample::Index>()) {
        let bytes = encode_frame(&f).unwrap();
        let cut = at.index(bytes.len());
        let truncated = matches!(
            decode_frame(&bytes[..cut]),
            Err(ProtoError::Truncated { found, .. }) if found == cut
        );
        prop_assert!(truncated);
        let mut d = FrameDecoder::new();
        d.push(&bytes[..cut]).unwrap();
        prop_assert_eq!(d.next_frame().unwrap(), None);
        let eof = matches!(d.finish(), Err(ProtoError::UnexpectedEof { .. }));
        prop_assert!(eof || cut == 0);
    }
}

#[test]
fn status_request_encodes_to_pinned_bytes() {
    // {"version": 2, "id": 7, "body": {"request": "status"}}, written out by hand.
    let mut body = vec![0xa3];
    body.extend(t("version"));
    body.push(0x02);
    body.extend(t("id"));
    body.push(0x07);
    body.extend(t("body"));
    body.push(0xa1);
    body.extend(t("request"));
    body.extend(t("status"));
    let expected = framed(&body);
    assert_eq!(
        encode_frame(&Frame::request(7, Request::Status)).unwrap(),
        expected
    );
    assert_eq!(
        decode_frame(&expected).unwrap(),
        Frame::request(7, Request::Status)
    );
}

#[test]
fn entries_travel_as_cbor_byte_strings() {
    // {"version": 2, "id": 258, "body": {"response": {"persist": {"first_seq": 5,
    //   "entries": [h'010203', h'']}}}}
    let mut body = vec![0xa3];
    body.extend(t("version"));
    body.push(0x02);
    body.extend(t("id"));
    body.extend([0x19, 0x01, 0x02]);
    body.extend(t("body"));
    body.push(0xa1);
    body.extend(t("response"));
    body.push(0xa1);
    body.extend(t("persist"));
    body.push(0xa2);
    body.extend(t("first_seq"));
    body.push(0x05);
    body.extend(t("entries"));
    body.extend([0x82, 0x43, 1, 2, 3, 0x40]);
    let frame = Frame::response(
        258,
        Response::Persist {
            first_seq: 5,
            entries: vec![ByteBuf::from(vec![1, 2, 3]), ByteBuf::new()],
        },
    );
    assert_eq!(encode_frame(&frame).unwrap(), framed(&body));
}

#[test]
fn a_held_reply_encodes_to_pinned_bytes() {
    // {"version": 2, "id": 9, "body": {"response": {"held": {"through_seq": 4,
    //   "reply": "ack"}}}}
    let mut body = vec![0xa3];
    body.extend(t("version"));
    body.push(0x02);
    body.extend(t("id"));
    body.push(0x09);
    body.extend(t("body"));
    body.push(0xa1);
    body.extend(t("response"));
    body.push(0xa1);
    body.extend(t("held"));
    body.push(0xa2);
    body.extend(t("through_seq"));
    body.push(0x04);
    body.extend(t("reply"));
    body.extend(t("ack"));
    let frame = Frame::response(
        9,
        Response::Held {
            through_seq: 4,
            reply: Box::new(Response::Ack),
        },
    );
    assert_eq!(encode_frame(&frame).unwrap(), framed(&body));
    assert_eq!(decode_frame(&framed(&body)).unwrap(), frame);
}

/// A `Held` wraps a final reply: a `Persist` or a `Held` inside one is refused both ways (a
/// host must never take entries, or a second gate, from inside a reply it is holding).
#[test]
fn a_held_reply_wrapping_a_persist_or_a_held_is_refused() {
    let persist = Response::Persist {
        first_seq: 0,
        entries: vec![ByteBuf::from(vec![1])],
    };
    let inner = Response::Held {
        through_seq: 1,
        reply: Box::new(Response::Ack),
    };
    for bad in [persist, inner] {
        let frame = Frame::response(
            5,
            Response::Held {
                through_seq: 2,
                reply: Box::new(bad.clone()),
            },
        );
        assert!(encode_frame(&frame).is_err(), "encoded {bad:?} inside Held");
        // Written by hand: {"version": 2, "id": 5, "body": {"response": {"held":
        //   {"through_seq": 2, "reply": <bad>}}}}
        let mut inner_bytes = Vec::new();
        ciborium::into_writer(&bad, &mut inner_bytes).unwrap();
        let mut body = vec![0xa3];
        body.extend(t("version"));
        body.push(0x02);
        body.extend(t("id"));
        body.push(0x05);
        body.extend(t("body"));
        body.push(0xa1);
        body.extend(t("response"));
        body.push(0xa1);
        body.extend(t("held"));
        body.push(0xa2);
        body.extend(t("through_seq"));
        body.push(0x02);
        body.extend(t("reply"));
        body.extend(inner_bytes);
        let err = decode_frame(&framed(&body)).unwrap_err();
        assert!(
            matches!(err, ProtoError::Malformed { id: Some(5), .. }),
            "{bad:?}: {err}"
        );
    }
}

#[test]
fn error_codes_travel_as_their_machine_codes() {
    let frame = Frame::response(1, Response::error(ErrorCode::NotReady, "replay pending"));
    let bytes = encode_frame(&frame).unwrap();
    let needle = t("not_ready");
    assert!(bytes.windows(needle.len()).any(|w| w == needle.as_slice()));
}

#[test]
fn another_version_is_refused_with_its_number_and_id() {
    let mut f = Frame::request(77, Request::Status);
    f.version = 1;
    let err = decode_frame(&encode_frame(&f).unwrap()).unwrap_err();
    assert!(
        matches!(
            err,
            ProtoError::UnsupportedVersion {
                found: 1,
                expected: 2,
                id: 77
            }
        ),
        "{err}"
    );
    assert_eq!(err.code(), ErrorCode::UnsupportedVersion);
    assert_eq!(err.reply().id, 77);
}

#[test]
fn another_version_with_an_unknown_body_is_still_named() {
    // Version 9 with a request this crate does not know.
    let mut body = vec![0xa3];
    body.extend(t("version"));
    body.push(0x09);
    body.extend(t("id"));
    body.push(0x03);
    body.extend(t("body"));
    body.push(0xa1);
    body.extend(t("request"));
    body.extend(t("teleport"));
    let err = decode_frame(&framed(&body)).unwrap_err();
    assert!(
        matches!(
            err,
            ProtoError::UnsupportedVersion {
                found: 9,
                id: 3,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn malformed_body_with_a_readable_id_names_the_request() {
    let mut body = vec![0xa3];
    body.extend(t("version"));
    body.push(0x02);
    body.extend(t("id"));
    body.push(0x0b);
    body.extend(t("body"));
    body.push(0xa1);
    body.extend(t("request"));
    body.extend(t("teleport"));
    let err = decode_frame(&framed(&body)).unwrap_err();
    assert!(
        matches!(err, ProtoError::Malformed { id: Some(11), .. }),
        "{err}"
    );
    assert_eq!(err.code(), ErrorCode::BadFrame);
    assert_eq!(err.reply().id, 11);
}

#[test]
fn unknown_fields_are_refused() {
    let mut body = vec![0xa4];
    body.extend(t("version"));
    body.push(0x02);
    body.extend(t("id"));
    body.push(0x01);
    body.extend(t("body"));
    body.push(0xa1);
    body.extend(t("request"));
    body.extend(t("status"));
    body.extend(t("extra"));
    body.push(0xf6);
    let err = decode_frame(&framed(&body)).unwrap_err();
    assert!(
        matches!(err, ProtoError::Malformed { id: Some(1), .. }),
        "{err}"
    );
}

#[test]
fn duplicate_fields_are_refused() {
    let mut body = vec![0xa4];
    body.extend(t("version"));
    body.push(0x02);
    body.extend(t("id"));
    body.push(0x01);
    body.extend(t("id"));
    body.push(0x02);
    body.extend(t("body"));
    body.push(0xa1);
    body.extend(t("request"));
    body.extend(t("status"));
    assert!(matches!(
        decode_frame(&framed(&body)),
        Err(ProtoError::Malformed { .. })
    ));
}

fn replay_begin_with_keys(keys: Vec<ByteBuf>) -> Vec<u8> {
    // Encode by hand: the encoder itself refuses such keys.
    let mut body = vec![0xa3];
    body.extend(t("version"));
    body.push(0x02);
    body.extend(t("id"));
    body.push(0x01);
    body.extend(t("body"));
    body.push(0xa1);
    body.extend(t("request"));
    body.push(0xa1);
    body.extend(t("replay_begin"));
    body.push(0xa2);
    body.extend(t("genesis_admin_keys"));
    assert!(keys.len() < 24 || keys.len() < 256);
    if keys.len() < 24 {
        body.push(0x80 | u8::try_from(keys.len()).unwrap());
    } else {
        body.extend([0x98, u8::try_from(keys.len()).unwrap()]);
    }
    for k in &keys {
        assert!(k.len() < 256);
        body.extend([0x58, u8::try_from(k.len()).unwrap()]);
        body.extend(k.iter());
    }
    body.extend(t("total_entries"));
    body.push(0x00);
    framed(&body)
}

#[test]
fn admin_keys_must_be_32_bytes() {
    let good = vec![ByteBuf::from(vec![1u8; ED25519_PUBLIC_KEY_LEN])];
    let frame = decode_frame(&replay_begin_with_keys(good.clone())).unwrap();
    assert_eq!(
        frame.body,
        Body::Request(Request::ReplayBegin {
            genesis_admin_keys: good,
            total_entries: 0
        })
    );
    for len in [0, 31, 33, 64] {
        let bytes = replay_begin_with_keys(vec![ByteBuf::from(vec![1u8; len])]);
        assert!(
            matches!(
                decode_frame(&bytes),
                Err(ProtoError::Malformed { id: Some(1), .. })
            ),
            "{len}"
        );
        let f = Frame::request(
            1,
            Request::ReplayBegin {
                genesis_admin_keys: vec![ByteBuf::from(vec![1u8; len])],
                total_entries: 0,
            },
        );
        assert!(
            matches!(encode_frame(&f), Err(ProtoError::Encode { .. })),
            "{len}"
        );
    }
}

#[test]
fn too_many_admin_keys_are_refused_both_ways() {
    let key = ByteBuf::from(vec![2u8; ED25519_PUBLIC_KEY_LEN]);
    let at_limit = vec![key.clone(); MAX_ADMIN_KEYS];
    decode_frame(&replay_begin_with_keys(at_limit)).unwrap();
    let over = vec![key; MAX_ADMIN_KEYS + 1];
    assert!(matches!(
        decode_frame(&replay_begin_with_keys(over.clone())),
        Err(ProtoError::Malformed { .. })
    ));
    let f = Frame::request(
        1,
        Request::ReplayBegin {
            genesis_admin_keys: over,
            total_entries: 0,
        },
    );
    assert!(matches!(encode_frame(&f), Err(ProtoError::Encode { .. })));
}

#[test]
fn too_many_entries_are_refused_both_ways() {
    let at_limit = Frame::request(
        1,
        Request::ReplayEntries {
            entries: vec![ByteBuf::new(); MAX_ENTRIES_PER_FRAME],
        },
    );
    let bytes = encode_frame(&at_limit).unwrap();
    assert_eq!(decode_frame(&bytes).unwrap(), at_limit);

    let over = Frame::request(
        1,
        Request::ReplayEntries {
            entries: vec![ByteBuf::new(); MAX_ENTRIES_PER_FRAME + 1],
        },
    );
    assert!(matches!(
        encode_frame(&over),
        Err(ProtoError::Encode { .. })
    ));

    // Hand-built: one more empty entry in the array, its length header bumped by one. At the
    // limit the array header is 0x99 followed by a big-endian u16 count.
    let (count_at, _) = bytes
        .windows(3)
        .enumerate()
        .find(|(_, w)| {
            w[0] == 0x99 && u16::from_be_bytes([w[1], w[2]]) as usize == MAX_ENTRIES_PER_FRAME
        })
        .unwrap();
    let mut body = bytes[LEN_PREFIX..].to_vec();
    let i = count_at - LEN_PREFIX;
    body[i + 1..i + 3].copy_from_slice(
        &u16::try_from(MAX_ENTRIES_PER_FRAME + 1)
            .unwrap()
            .to_be_bytes(),
    );
    body.insert(i + 3, 0x40);
    assert!(matches!(
        decode_frame(&framed(&body)),
        Err(ProtoError::Malformed { id: Some(1), .. })
    ));
}

#[test]
fn a_huge_announced_array_costs_nothing_until_its_items_arrive() {
    // "entries" announces 2^32-1 items but the body ends: refused, with no large allocation.
    let mut body = vec![0xa3];
    body.extend(t("version"));
    body.push(0x02);
    body.extend(t("id"));
    body.push(0x01);
    body.extend(t("body"));
    body.push(0xa1);
    body.extend(t("request"));
    body.push(0xa1);
    body.extend(t("replay_entries"));
    body.push(0xa1);
    body.extend(t("entries"));
    body.extend([0x9a, 0xff, 0xff, 0xff, 0xff]);
    assert!(matches!(
        decode_frame(&framed(&body)),
        Err(ProtoError::Malformed { .. })
    ));
}

#[test]
fn a_huge_announced_byte_string_is_refused_not_allocated() {
    // A document announcing 2^64-1 bytes inside a tiny frame.
    let mut body = vec![0xa3];
    body.extend(t("version"));
    body.push(0x02);
    body.extend(t("id"));
    body.push(0x01);
    body.extend(t("body"));
    body.push(0xa1);
    body.extend(t("request"));
    body.push(0xa1);
    body.extend(t("admin"));
    body.push(0xa1);
    body.extend(t("request"));
    body.extend([0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    assert!(matches!(
        decode_frame(&framed(&body)),
        Err(ProtoError::Malformed { .. })
    ));
}

#[test]
fn deeply_nested_cbor_is_refused_without_exhausting_the_stack() {
    // The body is 100 000 nested arrays: the typed decode refuses it at once, and the header
    // read that follows (which skips the body generically) stops at the recursion limit.
    for opener in [
        0x81u8, 0xc6, /* tag 6 */
        0xa1, /* map of one, key nested */
    ] {
        let mut body = vec![0xa3];
        body.extend(t("version"));
        body.push(0x01);
        body.extend(t("id"));
        body.push(0x01);
        body.extend(t("body"));
        body.extend(std::iter::repeat_n(opener, 100_000));
        body.push(0x00);
        let err = decode_frame(&framed(&body)).unwrap_err();
        assert!(matches!(err, ProtoError::Malformed { .. }), "{err}");
    }
}

#[test]
fn oversized_announced_length_is_too_large() {
    let mut bytes = u32::MAX.to_be_bytes().to_vec();
    bytes.extend_from_slice(b"tiny");
    let err = decode_frame(&bytes).unwrap_err();
    assert!(
        matches!(err, ProtoError::TooLarge { len, max } if len == u64::from(u32::MAX) && max == MAX_FRAME_LEN),
        "{err}"
    );
    assert_eq!(err.code(), ErrorCode::TooLarge);
    assert!(err.is_fatal());
}
