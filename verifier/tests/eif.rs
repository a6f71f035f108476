//! `measure_eif` against images assembled here, byte by byte, independently of the parser and
//! of the `attestplane-eif` builder (which the verifier must not depend on).
//!
//! Known answers: the PCRs and the CRC of the fixed image below were computed with Python's
//! `hashlib` and `zlib` from the same inputs, and the tests also recompute them with `sha2` by
//! the published formula `SHA-384(48 zero bytes ‖ SHA-384(section data))`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::Command;

use attestplane_verifier::attestation::{AWS_NITRO_ROOT_G1_PEM, Pcr};
use attestplane_verifier::eif::{
    Arch, EifError, MAX_EIF_VERSION, MAX_SECTIONS, SectionKind, measure_eif,
};
use base64::Engine;
use proptest::prelude::*;
use sha2::{Digest, Sha256, Sha384};

const KERNEL: u16 = 1;
const CMDLINE: u16 = 2;
const RAMDISK: u16 = 3;
const SIGNATURE: u16 = 4;
const METADATA: u16 = 5;

const KAT_PCR0: &str = "eb7c710147d639a8b436ed43c02d3862b1b6dab9f6fa3523f2d8349b9eeb19dc3953a79b1b90f6c07d05c090e0509a14";
const KAT_PCR1: &str = "823f21e4b3464796984a3f337773d539c746a1df2fb7736d906dcdd718690637d73e2c397471e196f976994d7478fb48";
const KAT_PCR2: &str = "c1cb3dfaa2e3ff7e0256feb7fe51f3e57c3d10dfcce379810207b68dcc35e0d1a53a5e3e7a49507ed52d6157602a66d2";
/// PCR2 of an image with a single ramdisk: the extend of SHA-384("").
const EMPTY_PCR2: &str = "21b9efbc184807662e966d34f390821309eeac6802309798826296bf3e8bec7c10edb30948c90ba67310f7b964fc500a";
const KAT_CRC: u32 = 0xc097_dac2;
const KAT_LEN: usize = 8972;
/// PCR8 of an image signed with the AWS Nitro root certificate (as a stand-in certificate).
const ROOT_PCR8: &str = "df3a0511a411c6a5628d91a189a052d281dec8153ffecde6bdc1a059825c32e4bfb7fc95b367564a64812a8795af8f8a";
const ROOT_DER_SHA256: &str = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b";

fn kernel() -> Vec<u8> {
    (0..4096u32).map(|i| ((i * 7 + 3) % 256) as u8).collect()
}
const CMDLINE_TEXT: &[u8] = b"reboot=k panic=30 pci=off nomodules console=ttyS0";
fn ramdisk0() -> Vec<u8> {
    b"bootstrap".repeat(100)
}
fn ramdisk1() -> Vec<u8> {
    b"application".repeat(300)
}
const META: &[u8] = br#"{"ImageName":"kat"}"#;

/// CRC-32/ISO-HDLC, bit by bit (the parser uses a table).
fn crc32(parts: &[&[u8]]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for p in parts {
        for b in *p {
            c ^= u32::from(*b);
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    (c >> 1) ^ 0xEDB8_8320
                } else {
                    c >> 1
                };
            }
        }
    }
    !c
}

/// Assembles an image: sections back to back after the header, table filled, CRC right.
fn assemble(version: u16, flags: u16, sections: &[(u16, &[u8])]) -> Vec<u8> {
    let mut offsets = Vec::new();
    let mut sizes = Vec::new();
    let mut at = 548u64;
    for (_, d) in sections {
        offsets.push(at);
        sizes.push(d.len() as u64);
        at += 12 + d.len() as u64;
    }
    let mut out = Vec::new();
    out.extend_from_slice(b".eif");
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&(1u64 << 30).to_be_bytes());
    out.extend_from_slice(&2u64.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&(sections.len() as u16).to_be_bytes());
    for i in 0..32 {
        out.extend_from_slice(&offsets.get(i).copied().unwrap_or(0).to_be_bytes());
    }
    for i in 0..32 {
        out.extend_from_slice(&sizes.get(i).copied().unwrap_or(0).to_be_bytes());
    }
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    for (t, d) in sections {
        out.extend_from_slice(&t.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&(d.len() as u64).to_be_bytes());
        out.extend_from_slice(d);
    }
    fix_crc(&mut out);
    out
}

/// Recomputes the header CRC of a back-to-back image after a test mutated it.
fn fix_crc(img: &mut [u8]) {
    let crc = crc32(&[&img[..544], &img[548..]]);
    img[544..548].copy_from_slice(&crc.to_be_bytes());
}

fn set_u64(img: &mut [u8], at: usize, v: u64) {
    img[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn offset_slot(i: usize) -> usize {
    28 + 8 * i
}

fn size_slot(i: usize) -> usize {
    28 + 8 * (32 + i)
}

/// The layout nitro-cli writes: kernel, cmdline, metadata, ramdisks.
fn kat_image() -> Vec<u8> {
    let (k, r0, r1) = (kernel(), ramdisk0(), ramdisk1());
    assemble(
        4,
        0,
        &[
            (KERNEL, &k),
            (CMDLINE, CMDLINE_TEXT),
            (METADATA, META),
            (RAMDISK, &r0),
            (RAMDISK, &r1),
        ],
    )
}

fn formula(parts: &[&[u8]]) -> String {
    let mut h = Sha384::new();
    for p in parts {
        h.update(p);
    }
    let mut reg = Sha384::new();
    reg.update([0u8; 48]);
    reg.update(h.finalize());
    hex::encode(reg.finalize())
}

#[test]
fn known_answer_pcrs_for_fixed_inputs() {
    let img = kat_image();
    assert_eq!(img.len(), KAT_LEN);
    assert_eq!(
        u32::from_be_bytes(img[544..548].try_into().unwrap()),
        KAT_CRC
    );
    let m = measure_eif(&img).unwrap();
    let (k, r0, r1) = (kernel(), ramdisk0(), ramdisk1());
    // The formula, recomputed here.
    assert_eq!(m.pcr0.to_hex(), formula(&[&k, CMDLINE_TEXT, &r0, &r1]));
    assert_eq!(m.pcr1.to_hex(), formula(&[&k, CMDLINE_TEXT, &r0]));
    assert_eq!(m.pcr2.to_hex(), formula(&[&r1]));
    // And pinned (Python hashlib over the same inputs).
    assert_eq!(m.pcr0.to_hex(), KAT_PCR0);
    assert_eq!(m.pcr1.to_hex(), KAT_PCR1);
    assert_eq!(m.pcr2.to_hex(), KAT_PCR2);
    assert_eq!(m.pcr8, None);
    assert_eq!(m.crc32, KAT_CRC);
    assert!(m.crc_checked);
    assert_eq!(m.version, 4);
    assert_eq!(m.arch, Arch::X86_64);
    assert_eq!((m.default_mem, m.default_cpus), (1 << 30, 2));
    assert_eq!(m.cmdline.as_bytes(), CMDLINE_TEXT);
    let kinds: Vec<SectionKind> = m.sections.iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        [
            SectionKind::Kernel,
            SectionKind::Cmdline,
            SectionKind::Metadata,
            SectionKind::Ramdisk,
            SectionKind::Ramdisk
        ]
    );
    assert_eq!(m.sections[0].offset, 548);
    assert_eq!(m.sections[0].size, 4096);
}

#[test]
fn pcrs_json_is_the_shape_the_log_command_reads() {
    let m = measure_eif(&kat_image()).unwrap();
    let v = m.to_pcrs_json();
    let obj = v.as_object().unwrap();
    assert_eq!(
        obj.keys().cloned().collect::<Vec<_>>(),
        ["PCR0", "PCR1", "PCR2"]
    );
    assert_eq!(obj["PCR0"], KAT_PCR0);
    assert_eq!(obj["PCR1"], KAT_PCR1);
    assert_eq!(obj["PCR2"], KAT_PCR2);
    let pcrs = m.pcrs();
    assert_eq!(pcrs.len(), 3);
    assert_eq!(
        pcrs.values().map(Pcr::to_hex).collect::<Vec<_>>(),
        [KAT_PCR0, KAT_PCR1, KAT_PCR2]
    );
}

#[test]
fn single_ramdisk_gives_pcr2_of_nothing_and_pcr0_equal_to_pcr1() {
    let (k, r0) = (kernel(), ramdisk0());
    let img = assemble(
        4,
        0,
        &[(KERNEL, &k), (CMDLINE, CMDLINE_TEXT), (RAMDISK, &r0)],
    );
    let m = measure_eif(&img).unwrap();
    assert_eq!(m.pcr2.to_hex(), EMPTY_PCR2);
    assert_eq!(m.pcr2.to_hex(), formula(&[]));
    assert_eq!(m.pcr0, m.pcr1);
    assert_eq!(m.pcr1.to_hex(), KAT_PCR1);
}

#[test]
fn metadata_is_not_measured() {
    let (k, r0, r1) = (kernel(), ramdisk0(), ramdisk1());
    let with = measure_eif(&kat_image()).unwrap();
    let other = assemble(
        4,
        0,
        &[
            (KERNEL, &k),
            (CMDLINE, CMDLINE_TEXT),
            (METADATA, br#"{"BuildTime":"another day"}"#),
            (RAMDISK, &r0),
            (RAMDISK, &r1),
        ],
    );
    let without = assemble(
        3,
        0,
        &[
            (KERNEL, &k),
            (CMDLINE, CMDLINE_TEXT),
            (RAMDISK, &r0),
            (RAMDISK, &r1),
        ],
    );
    for img in [other, without] {
        let m = measure_eif(&img).unwrap();
        assert_eq!((m.pcr0, m.pcr1, m.pcr2), (with.pcr0, with.pcr1, with.pcr2));
    }
}

#[test]
fn every_measured_byte_and_the_ramdisk_order_count() {
    let (k, r0, r1) = (kernel(), ramdisk0(), ramdisk1());
    let base = measure_eif(&kat_image()).unwrap();
    let swapped = assemble(
        4,
        0,
        &[
            (KERNEL, &k),
            (CMDLINE, CMDLINE_TEXT),
            (RAMDISK, &r1),
            (RAMDISK, &r0),
        ],
    );
    let s = measure_eif(&swapped).unwrap();
    assert_ne!(s.pcr0, base.pcr0);
    assert_ne!(s.pcr1, base.pcr1);
    assert_ne!(s.pcr2, base.pcr2);

    let mut k2 = k.clone();
    k2[4095] ^= 1;
    let one_byte = assemble(
        4,
        0,
        &[
            (KERNEL, &k2),
            (CMDLINE, CMDLINE_TEXT),
            (RAMDISK, &r0),
            (RAMDISK, &r1),
        ],
    );
    let o = measure_eif(&one_byte).unwrap();
    assert_ne!(o.pcr0, base.pcr0);
    assert_ne!(o.pcr1, base.pcr1);
    assert_eq!(o.pcr2, base.pcr2, "the kernel is not part of PCR2");

    // Moving a byte from the kernel to the cmdline keeps the concatenation, hence the PCRs:
    // the formula hashes section data only, not the section headers.
    let moved = assemble(
        4,
        0,
        &[
            (KERNEL, &k[..4095]),
            (CMDLINE, &[&k[4095..], CMDLINE_TEXT].concat()),
            (RAMDISK, &r0),
            (RAMDISK, &r1),
        ],
    );
    let mv = measure_eif(&moved).unwrap();
    assert_eq!(
        (mv.pcr0, mv.pcr1, mv.pcr2),
        (base.pcr0, base.pcr1, base.pcr2)
    );
}

#[test]
fn aarch64_flag_and_older_versions_are_read() {
    let (k, r0) = (kernel(), ramdisk0());
    let secs: &[(u16, &[u8])] = &[(KERNEL, &k), (CMDLINE, CMDLINE_TEXT), (RAMDISK, &r0)];
    let m = measure_eif(&assemble(4, 1, secs)).unwrap();
    assert_eq!(m.arch, Arch::Aarch64);
    // Version 1 has no CRC: a wrong one is not checked.
    let mut v1 = assemble(1, 0, secs);
    v1[547] ^= 0xff;
    let m = measure_eif(&v1).unwrap();
    assert!(!m.crc_checked);
    assert_eq!(m.pcr1.to_hex(), KAT_PCR1);
}

fn root_der() -> Vec<u8> {
    let body: String = AWS_NITRO_ROOT_G1_PEM
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

/// The signature section as serde_cbor writes `Vec<PcrSignature>`: byte vectors as arrays of
/// integers (or, with `as_bytes`, as CBOR byte strings).
fn signature_section(pem: &[u8], as_bytes: bool) -> Vec<u8> {
    use ciborium::Value;
    let bytes = |b: &[u8]| {
        if as_bytes {
            Value::Bytes(b.to_vec())
        } else {
            Value::Array(b.iter().map(|x| Value::Integer((*x).into())).collect())
        }
    };
    let sig = Value::Array(vec![Value::Map(vec![
        (Value::Text("signing_certificate".into()), bytes(pem)),
        (
            Value::Text("signature".into()),
            bytes(b"\x84\x40\xa0\xf6\x40"),
        ),
    ])]);
    let mut out = Vec::new();
    ciborium::into_writer(&sig, &mut out).unwrap();
    out
}

#[test]
fn signed_image_measures_pcr8_from_the_certificate_der() {
    assert_eq!(hex::encode(Sha256::digest(root_der())), ROOT_DER_SHA256);
    let (k, r0, r1) = (kernel(), ramdisk0(), ramdisk1());
    for as_bytes in [false, true] {
        let sig = signature_section(AWS_NITRO_ROOT_G1_PEM.as_bytes(), as_bytes);
        let img = assemble(
            4,
            0,
            &[
                (KERNEL, &k),
                (CMDLINE, CMDLINE_TEXT),
                (METADATA, META),
                (RAMDISK, &r0),
                (RAMDISK, &r1),
                (SIGNATURE, &sig),
            ],
        );
        let m = measure_eif(&img).unwrap();
        let pcr8 = m.pcr8.unwrap();
        assert_eq!(pcr8.to_hex(), formula(&[&root_der()]));
        assert_eq!(pcr8.to_hex(), ROOT_PCR8);
        // The signature section is not part of PCR0/1/2.
        assert_eq!(m.pcr0.to_hex(), KAT_PCR0);
        assert_eq!(m.pcr2.to_hex(), KAT_PCR2);
        assert_eq!(m.to_pcrs_json()["PCR8"], ROOT_PCR8);
        assert_eq!(m.pcrs().len(), 4);
    }
}

#[test]
fn rejects_signature_sections_without_a_certificate() {
    let (k, r0) = (kernel(), ramdisk0());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not cbor", vec![0xff, 0x00]),
        ("empty array", vec![0x80]),
        ("not pem", signature_section(b"hello", false)),
        (
            "pem of a key",
            signature_section(
                b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
                false,
            ),
        ),
        (
            "pem of garbage",
            signature_section(
                b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                true,
            ),
        ),
        (
            "trailing cbor",
            [
                signature_section(AWS_NITRO_ROOT_G1_PEM.as_bytes(), true),
                vec![0],
            ]
            .concat(),
        ),
    ];
    for (name, sig) in cases {
        let img = assemble(
            4,
            0,
            &[
                (KERNEL, &k),
                (CMDLINE, CMDLINE_TEXT),
                (RAMDISK, &r0),
                (SIGNATURE, &sig),
            ],
        );
        let e = measure_eif(&img).unwrap_err();
        assert!(
            matches!(e, EifError::Signature { index: 3, .. }),
            "{name}: {e}"
        );
    }
}

#[test]
fn rejects_truncated_images_at_every_length() {
    let (k, r0) = (kernel()[..300].to_vec(), ramdisk0());
    let img = assemble(
        4,
        0,
        &[(KERNEL, &k), (CMDLINE, CMDLINE_TEXT), (RAMDISK, &r0)],
    );
    for len in 0..img.len() {
        let e = measure_eif(&img[..len]).unwrap_err();
        if len < 548 {
            assert_eq!(e, EifError::TruncatedHeader { len }, "at {len}");
        } else {
            assert!(
                matches!(e, EifError::SectionPastEnd { .. }),
                "at {len}: {e}"
            );
        }
    }
}

#[test]
fn rejects_bad_magic() {
    let mut img = kat_image();
    img[..4].copy_from_slice(b"\x7fELF");
    assert_eq!(
        measure_eif(&img).unwrap_err(),
        EifError::BadMagic { found: *b"\x7fELF" }
    );
}

#[test]
fn rejects_unknown_versions_and_flags() {
    for v in [0, MAX_EIF_VERSION + 1, u16::MAX] {
        let mut img = kat_image();
        img[4..6].copy_from_slice(&v.to_be_bytes());
        fix_crc(&mut img);
        assert_eq!(
            measure_eif(&img).unwrap_err(),
            EifError::UnsupportedVersion { found: v }
        );
    }
    let mut img = kat_image();
    img[6..8].copy_from_slice(&0x0002u16.to_be_bytes());
    fix_crc(&mut img);
    assert_eq!(
        measure_eif(&img).unwrap_err(),
        EifError::UnknownFlags { flags: 2 }
    );
}

#[test]
fn rejects_crc_mismatch() {
    let mut img = kat_image();
    // One bit of the second ramdisk: structure intact, data changed behind the CRC's back.
    let last = img.len() - 1;
    img[last] ^= 0x01;
    assert!(matches!(
        measure_eif(&img).unwrap_err(),
        EifError::CrcMismatch {
            stored: KAT_CRC,
            ..
        }
    ));
    // The CRC field itself.
    let mut img = kat_image();
    img[547] ^= 0x01;
    assert_eq!(
        measure_eif(&img).unwrap_err(),
        EifError::CrcMismatch {
            stored: KAT_CRC ^ 1,
            computed: KAT_CRC
        }
    );
}

#[test]
fn rejects_too_many_sections() {
    let mut img = kat_image();
    img[26..28].copy_from_slice(&(MAX_SECTIONS as u16 + 1).to_be_bytes());
    fix_crc(&mut img);
    assert_eq!(
        measure_eif(&img).unwrap_err(),
        EifError::TooManySections { found: 33 }
    );
    // A declared count below the real one leaves the rest of the table non-zero.
    let mut img = kat_image();
    img[26..28].copy_from_slice(&4u16.to_be_bytes());
    fix_crc(&mut img);
    assert_eq!(
        measure_eif(&img).unwrap_err(),
        EifError::UnusedSlotNotZero { index: 4, count: 4 }
    );
}

#[test]
fn accepts_a_full_section_table() {
    let (k, r0) = (kernel(), ramdisk0());
    let mut secs: Vec<(u16, &[u8])> = vec![(KERNEL, &k), (CMDLINE, CMDLINE_TEXT)];
    secs.extend(std::iter::repeat_n((RAMDISK, &r0[..]), MAX_SECTIONS - 2));
    let m = measure_eif(&assemble(4, 0, &secs)).unwrap();
    assert_eq!(m.sections.len(), MAX_SECTIONS);
}

#[test]
fn rejects_a_section_past_the_end() {
    let mut img = kat_image();
    // The last ramdisk claims one byte more than the file holds, in both size fields.
    let real = u64::from_be_bytes(img[size_slot(4)..size_slot(4) + 8].try_into().unwrap());
    set_u64(&mut img, size_slot(4), real + 1);
    let at = u64::from_be_bytes(img[offset_slot(4)..offset_slot(4) + 8].try_into().unwrap());
    set_u64(&mut img, at as usize + 4, real + 1);
    fix_crc(&mut img);
    assert_eq!(
        measure_eif(&img).unwrap_err(),
        EifError::SectionPastEnd {
            index: 4,
            offset: at,
            size: real + 1,
            len: KAT_LEN as u64
        }
    );
    // A size so large that offset + size overflows.
    let mut img = kat_image();
    set_u64(&mut img, size_slot(0), u64::MAX - 10);
    fix_crc(&mut img);
    assert!(matches!(
        measure_eif(&img).unwrap_err(),
        EifError::SectionPastEnd { index: 0, .. }
    ));
}

#[test]
fn rejects_overlapping_and_gapped_sections() {
    let mut img = kat_image();
    // Section 1 (cmdline) pointed back into the kernel.
    set_u64(&mut img, offset_slot(1), 600);
    fix_crc(&mut img);
    assert_eq!(
        measure_eif(&img).unwrap_err(),
        EifError::OverlappingSection {
            index: 1,
            offset: 600,
            expected: 548 + 12 + 4096
        }
    );
    let mut img = kat_image();
    set_u64(&mut img, offset_slot(1), 548 + 12 + 4096 + 4);
    fix_crc(&mut img);
    assert!(matches!(
        measure_eif(&img).unwrap_err(),
        EifError::GapBeforeSection { index: 1, .. }
    ));
    // The first section must start right after the header.
    let mut img = kat_image();
    set_u64(&mut img, offset_slot(0), 0);
    fix_crc(&mut img);
    assert!(matches!(
        measure_eif(&img).unwrap_err(),
        EifError::OverlappingSection { index: 0, .. }
    ));
}

#[test]
fn rejects_trailing_bytes() {
    let mut img = kat_image();
    img.extend_from_slice(&[0; 12]);
    fix_crc(&mut img);
    assert_eq!(
        measure_eif(&img).unwrap_err(),
        EifError::TrailingBytes {
            offset: KAT_LEN as u64,
            len: 12
        }
    );
}

#[test]
fn rejects_section_headers_that_disagree_with_the_table() {
    // Size.
    let mut img = kat_image();
    set_u64(&mut img, 548 + 4, 4095);
    fix_crc(&mut img);
    assert_eq!(
        measure_eif(&img).unwrap_err(),
        EifError::SizeMismatch {
            index: 0,
            table: 4096,
            section: 4095
        }
    );
    // Flags.
    let mut img = kat_image();
    img[548 + 2..548 + 4].copy_from_slice(&1u16.to_be_bytes());
    fix_crc(&mut img);
    assert_eq!(
        measure_eif(&img).unwrap_err(),
        EifError::SectionFlags { index: 0, flags: 1 }
    );
    // Type 0 and an unknown type.
    for code in [0u16, 6, 0xffff] {
        let mut img = kat_image();
        img[548..550].copy_from_slice(&code.to_be_bytes());
        fix_crc(&mut img);
        assert_eq!(
            measure_eif(&img).unwrap_err(),
            EifError::InvalidSectionType { index: 0, code }
        );
    }
}

/// Section types and data, in file order.
type Sections<'a> = Vec<(u16, &'a [u8])>;

#[test]
fn rejects_layouts_nitro_cli_does_not_write() {
    let (k, r0) = (kernel(), ramdisk0());
    let cases: Vec<(Sections<'_>, EifError)> = vec![
        (
            vec![(CMDLINE, CMDLINE_TEXT), (KERNEL, &k), (RAMDISK, &r0)],
            EifError::MisplacedSection {
                index: 0,
                expected: SectionKind::Kernel,
                found: SectionKind::Cmdline,
            },
        ),
        (
            vec![(KERNEL, &k), (RAMDISK, &r0), (CMDLINE, CMDLINE_TEXT)],
            EifError::MisplacedSection {
                index: 1,
                expected: SectionKind::Cmdline,
                found: SectionKind::Ramdisk,
            },
        ),
        (
            vec![(KERNEL, &k), (CMDLINE, CMDLINE_TEXT)],
            EifError::MissingSection {
                kind: SectionKind::Ramdisk,
            },
        ),
        (
            vec![(KERNEL, &k)],
            EifError::MissingSection {
                kind: SectionKind::Cmdline,
            },
        ),
        (
            vec![],
            EifError::MissingSection {
                kind: SectionKind::Kernel,
            },
        ),
        (
            vec![
                (KERNEL, &k),
                (CMDLINE, CMDLINE_TEXT),
                (RAMDISK, &r0),
                (KERNEL, &k),
            ],
            EifError::DuplicateSection {
                index: 3,
                kind: SectionKind::Kernel,
            },
        ),
        (
            vec![
                (KERNEL, &k),
                (CMDLINE, CMDLINE_TEXT),
                (METADATA, META),
                (RAMDISK, &r0),
                (METADATA, META),
            ],
            EifError::DuplicateSection {
                index: 4,
                kind: SectionKind::Metadata,
            },
        ),
    ];
    for (secs, want) in cases {
        assert_eq!(measure_eif(&assemble(4, 0, &secs)).unwrap_err(), want);
    }
}

#[test]
fn rejects_oversized_cmdline() {
    let (k, r0) = (kernel(), ramdisk0());
    let long = vec![b'a'; 64 * 1024 + 1];
    let img = assemble(4, 0, &[(KERNEL, &k), (CMDLINE, &long), (RAMDISK, &r0)]);
    assert!(matches!(
        measure_eif(&img).unwrap_err(),
        EifError::SectionTooLarge {
            index: 1,
            kind: SectionKind::Cmdline,
            ..
        }
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = measure_eif(&bytes);
    }

    #[test]
    fn random_headers_never_panic(header in proptest::collection::vec(any::<u8>(), 544..=544),
                                  body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut img = b".eif".to_vec();
        img.extend_from_slice(&header);
        img.extend_from_slice(&body);
        let _ = measure_eif(&img);
    }

    #[test]
    fn mutated_images_never_panic_and_measure_by_the_formula(
        edits in proptest::collection::vec((0usize..KAT_LEN, any::<u8>()), 1..8),
        refix in any::<bool>(),
    ) {
        let mut img = kat_image();
        for (at, v) in &edits {
            img[*at] = *v;
        }
        if refix {
            fix_crc(&mut img);
        }
        if let Ok(m) = measure_eif(&img) {
            // Whatever survived parsing measures to the formula over the sections it reports.
            let data = |s: &attestplane_verifier::eif::EifSection| {
                let at = s.offset as usize + 12;
                img[at..at + s.size as usize].to_vec()
            };
            let of = |k: SectionKind| -> Vec<Vec<u8>> {
                m.sections.iter().filter(|s| s.kind == k).map(data).collect()
            };
            let boot = [of(SectionKind::Kernel), of(SectionKind::Cmdline)].concat();
            let rds = of(SectionKind::Ramdisk);
            let all: Vec<&[u8]> = boot.iter().chain(rds.iter()).map(Vec::as_slice).collect();
            let first: Vec<&[u8]> = boot.iter().chain(rds.iter().take(1)).map(Vec::as_slice).collect();
            let rest: Vec<&[u8]> = rds.iter().skip(1).map(Vec::as_slice).collect();
            prop_assert_eq!(m.pcr0.to_hex(), formula(&all));
            prop_assert_eq!(m.pcr1.to_hex(), formula(&first));
            prop_assert_eq!(m.pcr2.to_hex(), formula(&rest));
        }
    }
}

// ---- the `attestplane-verify eif` command ----

fn verify_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_attestplane-verify"))
}

#[test]
fn cli_prints_the_pcrs_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kat.eif");
    std::fs::write(&path, kat_image()).unwrap();
    let out = verify_bin().arg("eif").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    for p in [KAT_PCR0, KAT_PCR1, KAT_PCR2] {
        assert!(text.contains(p), "{text}");
    }
    let out = verify_bin()
        .args(["eif", "--json"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["PCR0"], KAT_PCR0);
    assert_eq!(v["PCR1"], KAT_PCR1);
    assert_eq!(v["PCR2"], KAT_PCR2);
    assert_eq!(v["valid"], true);
    assert_eq!(v["eif"]["version"], 4);
    // Every other top-level value is a non-string, so `--pcrs` takes the output as it is.
    for (k, val) in v.as_object().unwrap() {
        assert!(k.starts_with("PCR") || !val.is_string(), "{k}");
    }
}

#[test]
fn cli_exits_one_on_a_malformed_image_and_two_on_io_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.eif");
    let mut img = kat_image();
    img[0] = b'x';
    std::fs::write(&path, img).unwrap();
    let out = verify_bin().arg("eif").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("bad magic"));
    let out = verify_bin()
        .args(["eif", "--json"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert!(v["error"].as_str().unwrap().contains("bad magic"));

    let out = verify_bin()
        .arg("eif")
        .arg(dir.path().join("missing.eif"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
