//! A deterministic initramfs: newc cpio, uncompressed.
//!
//! The Linux kernel unpacks an initramfs from the "new ASCII" cpio format (`070701`): each
//! entry is a 110-byte header of thirteen 8-digit hex fields (inode, mode, uid, gid, nlink,
//! mtime, file size, device major/minor, rdev major/minor, name size, checksum), the NUL-ended
//! name padded to a multiple of four, then the data padded likewise; `TRAILER!!!` ends the
//! archive.
//!
//! Everything a file system or a build machine could vary is fixed here, so the same tree
//! always yields the same bytes:
//!
//! - entries are sorted by path (byte order), which also puts every directory before its
//!   contents; missing parent directories are added with mode 0755;
//! - uid and gid are 0, mtime is the caller's (0, or `SOURCE_DATE_EPOCH`), nlink is 2 for
//!   directories and 1 otherwise, inode numbers count up from 1 in archive order, device fields
//!   and checksums are 0;
//! - permissions read from a tree are normalised (directories 0755, files 0755 if any execute
//!   bit is set else 0644, symlinks 0777), because a checkout's modes depend on the umask; a
//!   manifest states modes explicitly.
//!
//! ## What this module deliberately does not do
//!
//! - No device nodes, FIFOs, sockets or hard links (the enclave's `init` mounts devtmpfs).
//! - No compression.
//! - No ownership other than root, and no extended attributes.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The longest path accepted (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// The most entries an archive may hold.
pub const MAX_ENTRIES: usize = 1 << 20;
/// The largest file: newc stores sizes in eight hex digits.
pub const MAX_FILE_LEN: u64 = u32::MAX as u64;

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

/// Why an archive could not be built.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CpioError {
    /// A path is empty, absolute, has an empty, `.` or `..` component, a NUL, or is too long.
    #[error("bad archive path {path:?}: {reason}")]
    BadPath {
        /// The path.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A mode has bits outside 0o7777.
    #[error("mode {mode:#o} of {path:?} has bits outside 0o7777")]
    BadMode {
        /// The path.
        path: String,
        /// The mode.
        mode: u32,
    },
    /// The same path was added twice (directories merge; anything else does not).
    #[error("{path:?} is added twice")]
    Duplicate {
        /// The path.
        path: String,
    },
    /// A path's parent is not a directory.
    #[error("{path:?} needs {parent:?} to be a directory")]
    ParentNotADirectory {
        /// The path.
        path: String,
        /// Its parent.
        parent: String,
    },
    /// A file is larger than [`MAX_FILE_LEN`].
    #[error("{path:?} is {len} bytes; newc holds at most {MAX_FILE_LEN}")]
    FileTooLarge {
        /// The path.
        path: String,
        /// Its length.
        len: u64,
    },
    /// More than [`MAX_ENTRIES`] entries.
    #[error("more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    /// A tree holds something other than directories, regular files and symlinks.
    #[error("{path}: not a directory, regular file or symlink")]
    UnsupportedFileType {
        /// The file.
        path: PathBuf,
    },
    /// A file name in a tree is not UTF-8.
    #[error("{path}: file name is not utf-8")]
    NonUtf8Name {
        /// The file.
        path: PathBuf,
    },
    /// Reading a tree failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A manifest line could not be understood.
    #[error("manifest line {line}: {reason}")]
    Manifest {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// What an entry is.
#[derive(Clone, PartialEq, Eq)]
enum Kind {
    /// A directory; `implicit` when only added as some entry's parent.
    Dir { implicit: bool },
    /// A regular file and its bytes.
    File(Vec<u8>),
    /// A symbolic link and its target.
    Symlink(String),
}

#[derive(Clone, PartialEq, Eq)]
struct Entry {
    mode: u32,
    kind: Kind,
}

/// An initramfs under construction: a sorted map from path to entry.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

impl fmt::Debug for Initramfs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Initramfs")
            .field("entries", &self.entries.len())
            .finish()
    }
}

fn check_path(path: &str) -> Result<(), CpioError> {
    let bad = |reason| {
        Err(CpioError::BadPath {
            path: path.chars().take(256).collect(),
            reason,
        })
    };
    if path.is_empty() {
        return bad("empty");
    }
    if path.len() > MAX_PATH_LEN {
        return bad("longer than PATH_MAX");
    }
    if path.starts_with('/') {
        return bad("absolute (archive paths are relative to the root)");
    }
    if path.contains('\0') {
        return bad("contains a nul byte");
    }
    if path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("has an empty, \".\" or \"..\" component");
    }
    Ok(())
}

fn check_mode(path: &str, mode: u32) -> Result<(), CpioError> {
    if mode & !0o7777 != 0 {
        return Err(CpioError::BadMode {
            path: path.to_string(),
            mode,
        });
    }
    Ok(())
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of entries (the trailer excluded).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the archive has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds a directory with permission bits `mode`. Adding an existing directory again sets
    /// its mode.
    pub fn add_dir(&mut self, path: &str, mode: u32) -> Result<(), CpioError> {
        self.insert(
            path,
            Entry {
                mode,
                kind: Kind::Dir { implicit: false },
            },
        )
    }

    /// Adds a regular file with permission bits `mode`.
    pub fn add_file(&mut self, path: &str, mode: u32, bytes: Vec<u8>) -> Result<(), CpioError> {
        let len = bytes.len() as u64;
        if len > MAX_FILE_LEN {
            return Err(CpioError::FileTooLarge {
                path: path.to_string(),
                len,
            });
        }
        self.insert(
            path,
            Entry {
                mode,
                kind: Kind::File(bytes),
            },
        )
    }

    /// Adds a symbolic link to `target` (mode 0777).
    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        if target.is_empty() || target.contains('\0') || target.len() > MAX_PATH_LEN {
            return Err(CpioError::BadPath {
                path: target.chars().take(256).collect(),
                reason: "not a usable symlink target",
            });
        }
        self.insert(
            path,
            Entry {
                mode: 0o777,
                kind: Kind::Symlink(target.to_string()),
            },
        )
    }

    fn insert(&mut self, path: &str, entry: Entry) -> Result<(), CpioError> {
        check_path(path)?;
        check_mode(path, entry.mode)?;
        // Parents first, so that a file cannot be added under a non-directory.
        let mut parent_end = 0;
        while let Some(i) = path.get(parent_end..).and_then(|rest| rest.find('/')) {
            let end = parent_end + i;
            let parent = path.get(..end).unwrap_or_default();
            match self.entries.get(parent) {
                Some(Entry {
                    kind: Kind::Dir { .. },
                    ..
                }) => {}
                Some(_) => {
                    return Err(CpioError::ParentNotADirectory {
                        path: path.to_string(),
                        parent: parent.to_string(),
                    });
                }
                None => {
                    self.check_room()?;
                    self.entries.insert(
                        parent.to_string(),
                        Entry {
                            mode: 0o755,
                            kind: Kind::Dir { implicit: true },
                        },
                    );
                }
            }
            parent_end = end + 1;
        }
        match self.entries.get_mut(path) {
            None => {
                self.check_room()?;
                self.entries.insert(path.to_string(), entry);
                Ok(())
            }
            Some(existing) => match (&existing.kind, &entry.kind) {
                (Kind::Dir { implicit: true }, Kind::Dir { .. }) => {
                    *existing = entry;
                    Ok(())
                }
                (Kind::Dir { .. }, Kind::Dir { implicit: false })
                    if existing.mode == entry.mode =>
                {
                    Ok(())
                }
                _ => Err(CpioError::Duplicate {
                    path: path.to_string(),
                }),
            },
        }
    }

    fn check_room(&self) -> Result<(), CpioError> {
        if self.entries.len() >= MAX_ENTRIES {
            return Err(CpioError::TooManyEntries);
        }
        Ok(())
    }

    /// Adds everything under `root` (not `root` itself) below the archive directory `prefix`
    /// (`""` for the archive root). Symlinks are stored as links, never followed; permissions
    /// are normalised (see the module documentation).
    pub fn add_tree(&mut self, root: &Path, prefix: &str) -> Result<(), CpioError> {
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty() {
            self.add_dir(prefix, 0o755)?;
        }
        self.walk(root, prefix)
    }

    fn walk(&mut self, dir: &Path, at: &str) -> Result<(), CpioError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CpioError::Io { path, source }
        };
        let mut children = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            children.push(entry.path());
        }
        // Order does not change the archive (it is sorted), but it makes errors repeatable.
        children.sort();
        for path in children {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| CpioError::NonUtf8Name { path: path.clone() })?;
            let archive_path = if at.is_empty() {
                name.to_string()
            } else {
                format!("{at}/{name}")
            };
            let meta = std::fs::symlink_metadata(&path).map_err(io(&path))?;
            let ft = meta.file_type();
            if ft.is_symlink() {
                let target = std::fs::read_link(&path).map_err(io(&path))?;
                let target = target
                    .to_str()
                    .ok_or_else(|| CpioError::NonUtf8Name { path: path.clone() })?
                    .to_string();
                self.add_symlink(&archive_path, &target)?;
            } else if ft.is_dir() {
                self.add_dir(&archive_path, 0o755)?;
                self.walk(&path, &archive_path)?;
            } else if ft.is_file() {
                if meta.len() > MAX_FILE_LEN {
                    return Err(CpioError::FileTooLarge {
                        path: archive_path,
                        len: meta.len(),
                    });
                }
                let mode = if executable(&meta) { 0o755 } else { 0o644 };
                let bytes = std::fs::read(&path).map_err(io(&path))?;
                self.add_file(&archive_path, mode, bytes)?;
            } else {
                return Err(CpioError::UnsupportedFileType { path });
            }
        }
        Ok(())
    }

    /// Adds a manifest's entries, reading each file's bytes from its source path.
    pub fn add_manifest(&mut self, manifest: &Manifest) -> Result<(), CpioError> {
        for e in &manifest.entries {
            match e {
                ManifestEntry::Dir { path, mode } => self.add_dir(path, *mode)?,
                ManifestEntry::File { path, mode, source } => {
                    let bytes = std::fs::read(source).map_err(|source_err| CpioError::Io {
                        path: source.clone(),
                        source: source_err,
                    })?;
                    self.add_file(path, *mode, bytes)?;
                }
                ManifestEntry::Symlink { path, target } => self.add_symlink(path, target)?,
            }
        }
        Ok(())
    }

    /// The archive: every entry in path order, then the trailer. `mtime` is written as every
    /// entry's modification time (seconds since the epoch).
    pub fn to_bytes(&self, mtime: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut ino: u32 = 0;
        for (path, e) in &self.entries {
            ino = ino.saturating_add(1);
            let (kind, nlink, data): (u32, u32, &[u8]) = match &e.kind {
                Kind::Dir { .. } => (S_IFDIR, 2, &[]),
                Kind::File(b) => (S_IFREG, 1, b),
                Kind::Symlink(t) => (S_IFLNK, 1, t.as_bytes()),
            };
            write_entry(&mut out, ino, kind | e.mode, nlink, mtime, path, data);
        }
        write_entry(&mut out, 0, 0, 1, 0, TRAILER, &[]);
        out
    }
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// One newc record. Sizes were bounded when the entry was added: file and name lengths fit in
/// eight hex digits.
fn write_entry(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    name: &str,
    data: &[u8],
) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        mtime,
        data.len() as u32,
        0, // devmajor
        0, // devminor
        0, // rdevmajor
        0, // rdevminor
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(MAGIC.as_bytes());
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

#[cfg(unix)]
fn executable(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn executable(_meta: &std::fs::Metadata) -> bool {
    false
}

/// One line of a manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManifestEntry {
    /// `dir PATH MODE`
    Dir {
        /// Archive path.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// `file PATH MODE SOURCE`
    File {
        /// Archive path.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Where to read the bytes (relative to the current directory).
        source: PathBuf,
    },
    /// `symlink PATH TARGET`
    Symlink {
        /// Archive path.
        path: String,
        /// Link target.
        target: String,
    },
}

/// A list of entries to archive, one per line:
///
/// ```text
/// # comment
/// dir     rootfs/dev                 0755
/// file    init                       0755  /usr/share/nitro_enclaves/blobs/init
/// symlink rootfs/bin/sh              busybox
/// ```
///
/// Fields are separated by whitespace, so paths cannot contain spaces; modes are octal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    /// The entries in file order (the archive sorts them).
    pub entries: Vec<ManifestEntry>,
}

impl Manifest {
    /// Parses manifest text.
    pub fn parse(text: &str) -> Result<Self, CpioError> {
        let mut entries = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |reason: String| CpioError::Manifest { line, reason };
            let content = raw.split('#').next().unwrap_or_default().trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            let mode = |s: &str| {
                u32::from_str_radix(s, 8).map_err(|_| err(format!("mode {s:?} is not octal")))
            };
            let entry = match fields.as_slice() {
                ["dir", path, m] => ManifestEntry::Dir {
                    path: path.to_string(),
                    mode: mode(m)?,
                },
                ["file", path, m, source] => ManifestEntry::File {
                    path: path.to_string(),
                    mode: mode(m)?,
                    source: PathBuf::from(source),
                },
                ["symlink", path, target] => ManifestEntry::Symlink {
                    path: path.to_string(),
                    target: target.to_string(),
                },
                _ => {
                    return Err(err(format!(
                        "expected `dir PATH MODE`, `file PATH MODE SOURCE` or \
                         `symlink PATH TARGET`, got {content:?}"
                    )));
                }
            };
            entries.push(entry);
        }
        Ok(Self { entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_archive_is_just_the_trailer() {
        let b = Initramfs::new().to_bytes(0);
        // ino, mode, uid, gid, nlink 1, mtime, size, 4 device fields, namesize 11, check.
        let fields = [0u32, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 11, 0];
        let mut expect = String::from("070701");
        for f in fields {
            expect.push_str(&format!("{f:08X}"));
        }
        expect.push_str("TRAILER!!!\0");
        // 110 header bytes and 11 name bytes, padded to 124.
        assert_eq!(&b[..121], expect.as_bytes());
        assert_eq!(b.len(), 124);
        assert_eq!(&b[121..], &[0, 0, 0]);
    }

    #[test]
    fn rejects_paths_that_escape_or_are_ambiguous() {
        let mut a = Initramfs::new();
        for p in ["", "/init", "a//b", "./a", "a/../b", "a/.", "a/", "a\0b"] {
            assert!(
                matches!(a.add_file(p, 0o644, vec![]), Err(CpioError::BadPath { .. })),
                "{p:?}"
            );
        }
        assert!(matches!(
            a.add_file("x", 0o10644, vec![]),
            Err(CpioError::BadMode { .. })
        ));
    }

    #[test]
    fn parents_are_added_and_must_be_directories() {
        let mut a = Initramfs::new();
        a.add_file("rootfs/bin/app", 0o755, b"x".to_vec()).unwrap();
        assert_eq!(a.len(), 3);
        assert!(matches!(
            a.add_file("rootfs/bin/app/x", 0o644, vec![]),
            Err(CpioError::ParentNotADirectory { .. })
        ));
        // An explicit mode replaces the implicit directory's.
        a.add_dir("rootfs", 0o700).unwrap();
        assert_eq!(a.entries["rootfs"].mode, 0o700);
        // Files do not merge.
        assert!(matches!(
            a.add_file("rootfs/bin/app", 0o755, b"y".to_vec()),
            Err(CpioError::Duplicate { .. })
        ));
        // Explicit directories merge only when they agree.
        assert!(a.add_dir("rootfs", 0o700).is_ok());
        assert!(matches!(
            a.add_dir("rootfs", 0o755),
            Err(CpioError::Duplicate { .. })
        ));
    }

    #[test]
    fn insertion_order_does_not_change_the_bytes() {
        let mut a = Initramfs::new();
        a.add_file("b", 0o644, b"2".to_vec()).unwrap();
        a.add_file("a/x", 0o755, b"1".to_vec()).unwrap();
        a.add_symlink("c", "b").unwrap();
        let mut b = Initramfs::new();
        b.add_symlink("c", "b").unwrap();
        b.add_file("a/x", 0o755, b"1".to_vec()).unwrap();
        b.add_file("b", 0o644, b"2".to_vec()).unwrap();
        assert_eq!(a.to_bytes(7), b.to_bytes(7));
        assert_ne!(a.to_bytes(7), a.to_bytes(8));
    }

    #[test]
    fn manifest_lines_parse_and_errors_name_the_line() {
        let m = Manifest::parse(
            "# bootstrap\n\ndir dev 0755\nfile init 0755 /blobs/init # the init\nsymlink sh busybox\n",
        )
        .unwrap();
        assert_eq!(
            m.entries,
            vec![
                ManifestEntry::Dir {
                    path: "dev".into(),
                    mode: 0o755
                },
                ManifestEntry::File {
                    path: "init".into(),
                    mode: 0o755,
                    source: "/blobs/init".into()
                },
                ManifestEntry::Symlink {
                    path: "sh".into(),
                    target: "busybox".into()
                },
            ]
        );
        let e = Manifest::parse("dir dev 0755\nfile init 0855 /x\n").unwrap_err();
        assert!(matches!(e, CpioError::Manifest { line: 2, .. }), "{e}");
        let e = Manifest::parse("device null 0666\n").unwrap_err();
        assert!(matches!(e, CpioError::Manifest { line: 1, .. }), "{e}");
    }
}
