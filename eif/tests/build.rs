//! The builder against two independent references: the verifier's EIF parser
//! (`attestplane_verifier::eif::measure_eif`) and the PCR formula recomputed here with `sha2`;
//! a newc reader written here for the initramfs. And determinism: the same inputs give the same
//! bytes, through the library and through the `attestplane-eif` binary.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::process::Command;

use attestplane_eif::{Arch, EifSpec, Initramfs, Metadata, build_eif};
use attestplane_verifier::eif::{SectionKind, measure_eif};
use proptest::prelude::*;
use sha2::{Digest, Sha384};

/// 2026-11-22T00:00:00Z.
const EPOCH: u32 = 1_795_305_600;

fn formula(parts: &[&[u8]]) -> [u8; 48] {
    let mut h = Sha384::new();
    for p in parts {
        h.update(p);
    }
    let mut reg = Sha384::new();
    reg.update([0u8; 48]);
    reg.update(h.finalize());
    reg.finalize().into()
}

fn synthetic_kernel() -> Vec<u8> {
    (0..10_000u32)
        .map(|i| (i.wrapping_mul(31) >> 3) as u8)
        .collect()
}

fn spec<'a>(kernel: &'a [u8], ramdisks: Vec<&'a [u8]>) -> EifSpec<'a> {
    EifSpec {
        kernel,
        cmdline: "reboot=k panic=30 pci=off nomodules console=ttyS0",
        ramdisks,
        arch: Arch::X86_64,
        metadata: Metadata::default(),
    }
}

#[test]
fn builder_output_measures_equal_to_the_independent_formula() {
    let kernel = synthetic_kernel();
    let (r0, r1, r2) = (b"bootstrap".repeat(50), b"app".repeat(70), b"more".to_vec());
    let s = spec(&kernel, vec![&r0, &r1, &r2]);
    let built = build_eif(&s).unwrap();
    let parsed = measure_eif(&built.bytes).unwrap();
    let c = s.cmdline.as_bytes();
    let expect = (
        formula(&[&kernel, c, &r0, &r1, &r2]),
        formula(&[&kernel, c, &r0]),
        formula(&[&r1, &r2]),
    );
    assert_eq!(
        (
            *parsed.pcr0.as_bytes(),
            *parsed.pcr1.as_bytes(),
            *parsed.pcr2.as_bytes()
        ),
        expect
    );
    let own = built.measurements;
    assert_eq!((own.pcr0, own.pcr1, own.pcr2), expect);
    assert_eq!(parsed.pcr8, None);
    assert!(parsed.crc_checked);
}

#[test]
fn builder_lays_the_file_out_as_nitro_cli_does() {
    let kernel = synthetic_kernel();
    let (r0, r1) = (b"bootstrap".to_vec(), b"app".to_vec());
    let built = build_eif(&spec(&kernel, vec![&r0, &r1])).unwrap();
    let b = &built.bytes;
    assert_eq!(&b[..4], b".eif");
    assert_eq!(u16::from_be_bytes([b[4], b[5]]), 4, "version");
    assert_eq!(u16::from_be_bytes([b[6], b[7]]), 0, "flags: x86_64");
    assert_eq!(u64::from_be_bytes(b[8..16].try_into().unwrap()), 1 << 30);
    assert_eq!(u64::from_be_bytes(b[16..24].try_into().unwrap()), 2);
    let m = measure_eif(b).unwrap();
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
    assert_eq!(m.sections[0].size, kernel.len() as u64);
    // The metadata section is the JSON nitro-cli's describe-eif reads.
    let meta = &m.sections[2];
    let at = meta.offset as usize + 12;
    let v: serde_json::Value = serde_json::from_slice(&b[at..at + meta.size as usize]).unwrap();
    assert_eq!(v["ImageName"], "attestplane-enclave");
    assert_eq!(v["BuildMetadata"]["BuildTime"], "1970-01-01T00:00:00Z");

    let arm = build_eif(&EifSpec {
        arch: Arch::Aarch64,
        ..spec(&kernel, vec![&r0])
    })
    .unwrap();
    assert_eq!(
        measure_eif(&arm.bytes).unwrap().arch,
        attestplane_verifier::eif::Arch::Aarch64
    );
}

#[test]
fn two_eif_builds_are_byte_identical() {
    let kernel = synthetic_kernel();
    let r0 = b"bootstrap".repeat(10);
    let a = build_eif(&spec(&kernel, vec![&r0])).unwrap();
    let b = build_eif(&spec(&kernel.clone(), vec![&r0.clone()])).unwrap();
    assert_eq!(a.bytes, b.bytes);
    assert_eq!(a.measurements, b.measurements);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_built_image_parses_to_its_own_measurements(
        kernel in proptest::collection::vec(any::<u8>(), 1..512),
        cmdline in "[ -~]{0,80}",
        ramdisks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..256), 1..6),
    ) {
        let s = EifSpec {
            kernel: &kernel,
            cmdline: &cmdline,
            ramdisks: ramdisks.iter().map(Vec::as_slice).collect(),
            arch: Arch::X86_64,
            metadata: Metadata::default(),
        };
        let built = build_eif(&s).unwrap();
        let m = measure_eif(&built.bytes).unwrap();
        prop_assert_eq!(m.pcr0.as_bytes(), &built.measurements.pcr0);
        prop_assert_eq!(m.pcr1.as_bytes(), &built.measurements.pcr1);
        prop_assert_eq!(m.pcr2.as_bytes(), &built.measurements.pcr2);
        prop_assert_eq!(m.cmdline, cmdline);
    }
}

// ---- initramfs ----

/// One newc record, as read back by the reader below.
#[derive(Debug, PartialEq, Eq)]
struct Record {
    name: String,
    ino: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    mtime: u32,
    data: Vec<u8>,
}

/// A strict newc reader: checks magic, alignment and zero device/check fields.
fn read_newc(mut b: &[u8]) -> Vec<Record> {
    let mut out = Vec::new();
    let total = b.len();
    loop {
        assert_eq!(&b[..6], b"070701", "magic at {}", total - b.len());
        let field = |i: usize| {
            u32::from_str_radix(std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                .unwrap()
        };
        let (size, namesize) = (field(6) as usize, field(11) as usize);
        for i in [7, 8, 9, 10, 12] {
            assert_eq!(field(i), 0, "device/check field {i}");
        }
        let name = std::str::from_utf8(&b[110..110 + namesize - 1])
            .unwrap()
            .to_string();
        assert_eq!(b[110 + namesize - 1], 0);
        let data_at = (110 + namesize).next_multiple_of(4);
        assert!(b[110 + namesize..data_at].iter().all(|x| *x == 0));
        let rec = Record {
            name,
            ino: field(0),
            mode: field(1),
            uid: field(2),
            gid: field(3),
            nlink: field(4),
            mtime: field(5),
            data: b[data_at..data_at + size].to_vec(),
        };
        let next = (data_at + size).next_multiple_of(4);
        assert!(b[data_at + size..next].iter().all(|x| *x == 0));
        b = &b[next..];
        if rec.name == "TRAILER!!!" {
            assert!(b.is_empty(), "bytes after the trailer");
            return out;
        }
        out.push(rec);
    }
}

#[test]
fn initramfs_reads_back_sorted_rootless_and_timeless() {
    let mut a = Initramfs::new();
    a.add_file("rootfs/attestplane-enclave", 0o755, b"\x7fELF...".to_vec())
        .unwrap();
    a.add_file("cmd", 0o644, b"/attestplane-enclave\n".to_vec())
        .unwrap();
    a.add_dir("rootfs/dev", 0o755).unwrap();
    a.add_symlink("rootfs/init", "attestplane-enclave").unwrap();
    let recs = read_newc(&a.to_bytes(EPOCH));
    let names: Vec<&str> = recs.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "cmd",
            "rootfs",
            "rootfs/attestplane-enclave",
            "rootfs/dev",
            "rootfs/init"
        ]
    );
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.ino, i as u32 + 1);
        assert_eq!((r.uid, r.gid), (0, 0));
        assert_eq!(r.mtime, EPOCH);
    }
    assert_eq!((recs[0].mode, recs[0].nlink), (0o100644, 1));
    assert_eq!((recs[1].mode, recs[1].nlink), (0o040755, 2));
    assert_eq!(recs[2].mode, 0o100755);
    assert_eq!(recs[2].data, b"\x7fELF...");
    assert_eq!(recs[4].mode, 0o120777);
    assert_eq!(recs[4].data, b"attestplane-enclave");
}

/// Writes the same tree with different creation order, timestamps and permissions.
fn make_tree(root: &Path, reverse: bool, mtime_secs: u64, private: bool) {
    let files: Vec<(&str, &[u8], bool)> = vec![
        ("bin/attestplane-enclave", b"\x7fELF binary", true),
        ("etc/config.json", b"{}", false),
        ("etc/nested/deeper/file", b"x", false),
        ("README", b"hello", false),
    ];
    let order: Vec<_> = if reverse {
        files.into_iter().rev().collect()
    } else {
        files
    };
    for (path, data, exec) in order {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
        let mode = match (exec, private) {
            (true, false) => 0o755,
            (true, true) => 0o700,
            (false, false) => 0o644,
            (false, true) => 0o600,
        };
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime_secs))
            .unwrap();
    }
    std::os::unix::fs::symlink("bin/attestplane-enclave", root.join("init")).unwrap();
}

fn eif_bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_attestplane-eif"));
    c.env("SOURCE_DATE_EPOCH", EPOCH.to_string());
    c
}

#[test]
fn two_initramfs_builds_of_the_same_tree_are_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let (t1, t2) = (dir.path().join("t1"), dir.path().join("t2"));
    make_tree(&t1, false, 1_000_000_000, false);
    make_tree(&t2, true, 1_700_000_000, true);
    let mut outs = Vec::new();
    for (i, t) in [&t1, &t2].into_iter().enumerate() {
        let out = dir.path().join(format!("initrd{i}.cpio"));
        let st = eif_bin()
            .args(["initramfs", "--prefix", "rootfs", "--root"])
            .arg(t)
            .arg("--out")
            .arg(&out)
            .status()
            .unwrap();
        assert!(st.success());
        outs.push(std::fs::read(&out).unwrap());
    }
    assert_eq!(outs[0], outs[1]);
    let recs = read_newc(&outs[0]);
    let names: Vec<&str> = recs.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "rootfs",
            "rootfs/README",
            "rootfs/bin",
            "rootfs/bin/attestplane-enclave",
            "rootfs/etc",
            "rootfs/etc/config.json",
            "rootfs/etc/nested",
            "rootfs/etc/nested/deeper",
            "rootfs/etc/nested/deeper/file",
            "rootfs/init",
        ]
    );
    assert!(recs.iter().all(|r| r.mtime == EPOCH));
    let mode = |n: &str| recs.iter().find(|r| r.name == n).unwrap().mode;
    assert_eq!(mode("rootfs/bin/attestplane-enclave"), 0o100755);
    assert_eq!(mode("rootfs/README"), 0o100644);
    assert_eq!(mode("rootfs/init"), 0o120777);
}

#[test]
fn cli_builds_byte_identical_images_and_writes_the_pcrs_the_verifier_computes() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("bzImage"), synthetic_kernel()).unwrap();
    std::fs::write(p("cmdline"), "reboot=k console=ttyS0\n").unwrap();
    std::fs::write(
        p("manifest"),
        format!("dir dev 0755\nfile init 0755 {}\n", p("bzImage").display()),
    )
    .unwrap();
    let st = eif_bin()
        .args(["initramfs", "--manifest"])
        .arg(p("manifest"))
        .arg("--out")
        .arg(p("boot.cpio"))
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::write(p("app.cpio"), b"application ramdisk").unwrap();
    let mut images = Vec::new();
    for n in ["a", "b"] {
        let out = eif_bin()
            .arg("build")
            .arg("--kernel")
            .arg(p("bzImage"))
            .arg("--cmdline-file")
            .arg(p("cmdline"))
            .arg("--ramdisk")
            .arg(p("boot.cpio"))
            .arg("--ramdisk")
            .arg(p("app.cpio"))
            .arg("--out")
            .arg(p(&format!("{n}.eif")))
            .arg("--pcrs-out")
            .arg(p(&format!("{n}.json")))
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        images.push(std::fs::read(p(&format!("{n}.eif"))).unwrap());
    }
    assert_eq!(images[0], images[1]);
    let m = measure_eif(&images[0]).unwrap();
    assert_eq!(m.cmdline, "reboot=k console=ttyS0");
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p("a.json")).unwrap()).unwrap();
    assert_eq!(written, m.to_pcrs_json());
    // The build time comes from SOURCE_DATE_EPOCH.
    let meta = m
        .sections
        .iter()
        .find(|s| s.kind == SectionKind::Metadata)
        .unwrap();
    let at = meta.offset as usize + 12;
    let v: serde_json::Value =
        serde_json::from_slice(&images[0][at..at + meta.size as usize]).unwrap();
    assert_eq!(v["BuildMetadata"]["BuildTime"], "2026-11-22T00:00:00Z");
}

#[test]
fn cli_exit_codes_separate_bad_inputs_from_io_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("k"), b"kernel").unwrap();
    std::fs::write(p("r"), b"ramdisk").unwrap();
    std::fs::write(p("cmdline"), b"a\0b").unwrap();
    let run = |cmdline_file: &Path, kernel: &Path| {
        eif_bin()
            .arg("build")
            .arg("--kernel")
            .arg(kernel)
            .arg("--cmdline-file")
            .arg(cmdline_file)
            .arg("--ramdisk")
            .arg(p("r"))
            .arg("--out")
            .arg(p("out.eif"))
            .status()
            .unwrap()
            .code()
    };
    assert_eq!(run(&p("cmdline"), &p("k")), Some(1), "nul in the cmdline");
    assert_eq!(
        run(&p("cmdline"), &p("missing")),
        Some(2),
        "unreadable kernel"
    );
    let st = eif_bin()
        .args(["build", "--kernel"])
        .arg(p("k"))
        .args(["--cmdline", "x", "--out"])
        .arg(p("out.eif"))
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(2), "no ramdisk is a usage error");
}
