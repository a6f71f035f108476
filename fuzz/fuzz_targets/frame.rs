//! Fuzzes the wire-protocol frame decoders, whole-buffer and incremental: they may reject
//! anything, but never panic and never allocate beyond the frame limit.
#![no_main]

use attestplane_proto::{FrameDecoder, decode_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_frame(data);
    let (mut decoder, mut rest) = (FrameDecoder::new(), data);
    while let Ok(n @ 1..) = decoder.push(rest) {
        rest = rest.get(n..).unwrap_or_default();
        while let Ok(Some(_)) = decoder.next_frame() {}
    }
});
