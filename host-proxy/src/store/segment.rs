//! Segment files and their records: the on-disk format (`len: u32 BE ‖ check: u32 BE ‖
//! entry`), segment names, the scan that rebuilds the index at open, torn-tail recovery with
//! quarantine, and reads of indexed records that re-check each entry's hash.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use attestplane_verifier::entry::EntryHash;
use attestplane_verifier::merkle;
use thiserror::Error;

use super::{
    Index, Location, MAX_ENTRY_LEN, MAX_SEGMENT_FILE_BYTES, MAX_SEGMENTS, MAX_TAIL_SCAN_HASH_BYTES,
    MAX_UNSYNCED_BYTES, RECORD_HEADER_LEN, Recovery, SegmentMeta, StoreError, TornTail, sync_dir,
};

/// The segments' directory, under the store's.
pub(super) const SEGMENTS_DIR: &str = "segments";
const SEGMENT_SUFFIX: &str = ".log";
const SEGMENT_NAME_DIGITS: usize = 20;
const QUARANTINE_DIR: &str = "quarantine";
const SCAN_BUFFER: usize = 1024 * 1024;
/// Most saved tails for one segment offset.
const MAX_QUARANTINE_VERSIONS: u32 = 100;

/// What is wrong with one record of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RecordFault {
    /// Fewer bytes than a header remain at the end of the file.
    #[error("only {have} bytes of an 8-byte header")]
    ShortHeader {
        /// Bytes left in the file.
        have: u64,
    },
    /// The length field is zero (the store never writes an empty entry).
    #[error("length is zero")]
    ZeroLength,
    /// The length field exceeds [`MAX_ENTRY_LEN`].
    #[error("length {len} exceeds the maximum entry length {max}")]
    TooLong {
        /// The length found.
        len: u64,
        /// [`MAX_ENTRY_LEN`].
        max: usize,
    },
    /// The length field runs past the end of the file.
    #[error("length {len} runs past the end of the file ({have} bytes left)")]
    ShortBody {
        /// The length found.
        len: u64,
        /// Bytes left after the header.
        have: u64,
    },
    /// The checksum does not match the entry's bytes.
    #[error("checksum {stored:08x} does not match the entry's {computed:08x}")]
    BadChecksum {
        /// The checksum in the header.
        stored: u32,
        /// The checksum of the bytes found.
        computed: u32,
    },
}

/// Why a bad record found at open is not a torn tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum NotTorn {
    /// Only the last segment can end in a torn write.
    #[error("it is not in the last segment")]
    NotLastSegment,
    /// A valid record starts after it, so it is not at the end of what was written.
    #[error("a valid record follows at offset {offset}")]
    ValidRecordFollows {
        /// Offset of the valid record.
        offset: u64,
    },
    /// More bytes follow it than one batch can leave unsynced.
    #[error("{len} bytes follow it, more than one batch ({max})")]
    TailTooLong {
        /// Bytes from the bad record to the end of the file.
        len: u64,
        /// [`MAX_UNSYNCED_BYTES`].
        max: u64,
    },
    /// The search for a valid record after it exceeded [`MAX_TAIL_SCAN_HASH_BYTES`].
    #[error("the bytes after it are too costly to search for valid records")]
    ScanBudgetExhausted,
}

/// Reads entries at `locs` (consecutive seqs), one read per segment, checking each against
/// its indexed hash.
pub(super) fn read_locations(locs: &[Location]) -> Result<Vec<Vec<u8>>, StoreError> {
    let mut out = Vec::with_capacity(locs.len());
    let mut rest = locs;
    while let Some(first) = rest.first() {
        let same = rest
            .iter()
            .take_while(|l| Arc::ptr_eq(&l.path, &first.path))
            .count();
        let (group, tail) = rest.split_at(same);
        rest = tail;
        let Some(last) = group.last() else { break };
        let start = first.offset;
        let end = last.offset + (RECORD_HEADER_LEN + last.len) as u64;
        let span = usize::try_from(end.saturating_sub(start))
            .map_err(|_| StoreError::Index { seq: last.seq })?;
        let file = File::open(&first.path).map_err(StoreError::io("open segment", &first.path))?;
        let mut buf = vec![0u8; span];
        file.read_exact_at(&mut buf, start)
            .map_err(StoreError::io("read segment", &first.path))?;
        for loc in group {
            let changed = || StoreError::Changed {
                path: loc.path.to_path_buf(),
                offset: loc.offset,
                seq: loc.seq,
            };
            let from =
                usize::try_from(loc.offset - start).map_err(|_| changed())? + RECORD_HEADER_LEN;
            let entry = buf.get(from..from + loc.len).ok_or_else(changed)?;
            if merkle::leaf_hash(EntryHash::of(entry).as_bytes()) != loc.leaf {
                return Err(changed());
            }
            out.push(entry.to_vec());
        }
    }
    Ok(out)
}

/// Appends one record to `buf`: `len` is the entry's length, `hash` its hash.
pub(super) fn encode_record(buf: &mut Vec<u8>, len: u32, hash: &EntryHash, entry: &[u8]) {
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&checksum(hash).to_be_bytes());
    buf.extend_from_slice(entry);
}

/// The record checksum: the first four bytes of the entry hash.
fn checksum(hash: &EntryHash) -> u32 {
    let [a, b, c, d, ..] = *hash.as_bytes();
    u32::from_be_bytes([a, b, c, d])
}

pub(super) fn segment_name(first_seq: u64) -> String {
    format!(
        "{first_seq:0width$}{SEGMENT_SUFFIX}",
        width = SEGMENT_NAME_DIGITS
    )
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Lists the segments, sorted by first seq.
fn list_segments(segments_dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    let entries =
        fs::read_dir(segments_dir).map_err(StoreError::io("list segments", segments_dir))?;
    for entry in entries {
        let entry = entry.map_err(StoreError::io("list segments", segments_dir))?;
        let path = entry.path();
        let is_file = entry
            .file_type()
            .map_err(StoreError::io("stat", &path))?
            .is_file();
        let first = entry.file_name().to_str().and_then(parse_segment_name);
        let Some(first) = first.filter(|_| is_file) else {
            return Err(StoreError::UnexpectedFile { path });
        };
        if out.len() >= MAX_SEGMENTS {
            return Err(StoreError::TooManySegments {
                path: segments_dir.to_path_buf(),
                max: MAX_SEGMENTS,
            });
        }
        out.push((first, path));
    }
    out.sort_unstable_by_key(|(first, _)| *first);
    Ok(out)
}

/// Scans every segment, cuts a torn tail off the last, and builds the index.
pub(super) fn rebuild_index(
    dir: &Path,
    segments_dir: &Path,
) -> Result<(Index, Recovery), StoreError> {
    let segments = list_segments(segments_dir)?;
    let mut index = Index::default();
    let mut recovery = Recovery {
        entries: 0,
        segments: segments.len(),
        bytes: 0,
        torn_tail: None,
        unused_tail: 0,
        elapsed: Duration::ZERO,
    };
    let mut expected = 0u64;
    for (i, (first_seq, path)) in segments.iter().enumerate() {
        if *first_seq != expected {
            return Err(StoreError::SegmentGap {
                path: path.clone(),
                expected,
                found: *first_seq,
            });
        }
        let is_last = i + 1 == segments.len();
        let scan = scan_segment(path, &mut index)?;
        recovery.bytes = recovery.bytes.saturating_add(scan.file_len);
        let mut len = scan.file_len;
        // Zeros after the last record hold no record: room the writer made ahead of its
        // records (see `Writer::write`), or a size that reached the disk before the data did.
        // They are cut, and nothing of them is kept.
        // The tail after the last record ends at its last non-zero byte (read once).
        let bad = match scan.bad {
            Some((offset, fault)) => {
                Some((offset, fault, written_end(path, offset, scan.file_len)?))
            }
            None => None,
        };
        let bad = match bad {
            Some((offset, _, end)) if end == offset => {
                truncate(path, offset)?;
                len = offset;
                recovery.unused_tail = recovery
                    .unused_tail
                    .saturating_add(scan.file_len.saturating_sub(offset));
                None
            }
            bad => bad,
        };
        if let Some((offset, fault, end)) = bad {
            let seq = first_seq.saturating_add(scan.count);
            let corrupt = |not_torn| StoreError::Corrupt {
                path: path.clone(),
                offset,
                seq,
                fault,
                not_torn,
            };
            if !is_last {
                return Err(corrupt(NotTorn::NotLastSegment));
            }
            // The torn write ends at its last non-zero byte (`end`); zeros after it are unused
            // room.
            let tail = read_torn_tail(path, end, offset).map_err(|e| match e {
                TailError::NotTorn(why) => corrupt(why),
                TailError::Store(e) => e,
            })?;
            let saved_to = quarantine(dir, *first_seq, offset, &tail)?;
            truncate(path, offset)?;
            len = offset;
            recovery.torn_tail = Some(TornTail {
                segment: path.clone(),
                offset,
                len: tail.len() as u64,
                seq,
                fault,
                saved_to,
            });
        }
        index.segments.push(SegmentMeta {
            first_seq: *first_seq,
            path: path.as_path().into(),
            len,
        });
        expected = first_seq
            .checked_add(scan.count)
            .ok_or(StoreError::SeqOverflow)?;
    }
    recovery.entries = index.len();
    Ok((index, recovery))
}

struct Scan {
    file_len: u64,
    /// Valid records.
    count: u64,
    /// The first bad record: its offset and fault.
    bad: Option<(u64, RecordFault)>,
}

/// Reads a segment's records in order, indexing each valid one, up to the first bad one.
fn scan_segment(path: &Path, index: &mut Index) -> Result<Scan, StoreError> {
    let file = File::open(path).map_err(StoreError::io("open segment", path))?;
    let file_len = file
        .metadata()
        .map_err(StoreError::io("stat segment", path))?
        .len();
    if file_len > MAX_SEGMENT_FILE_BYTES {
        return Err(StoreError::SegmentTooLarge {
            path: path.to_path_buf(),
            len: file_len,
            max: MAX_SEGMENT_FILE_BYTES,
        });
    }
    let mut reader = BufReader::with_capacity(SCAN_BUFFER, file);
    let mut offset = 0u64;
    let mut count = 0u64;
    let mut body = Vec::new();
    let read_err = StoreError::io("read segment", path);
    let mut result = Ok(());
    let bad = loop {
        let remaining = file_len - offset;
        if remaining == 0 {
            break None;
        }
        if remaining < RECORD_HEADER_LEN as u64 {
            break Some((offset, RecordFault::ShortHeader { have: remaining }));
        }
        let mut header = [0u8; RECORD_HEADER_LEN];
        if let Err(e) = reader.read_exact(&mut header) {
            result = Err(e);
            break None;
        }
        let (len, stored) = parse_header(header);
        let have = remaining - RECORD_HEADER_LEN as u64;
        if len == 0 {
            break Some((offset, RecordFault::ZeroLength));
        }
        if len > MAX_ENTRY_LEN as u64 {
            break Some((
                offset,
                RecordFault::TooLong {
                    len,
                    max: MAX_ENTRY_LEN,
                },
            ));
        }
        if len > have {
            break Some((offset, RecordFault::ShortBody { len, have }));
        }
        // len <= MAX_ENTRY_LEN, so it fits a usize.
        body.resize(len as usize, 0);
        if let Err(e) = reader.read_exact(&mut body) {
            result = Err(e);
            break None;
        }
        let hash = EntryHash::of(&body);
        let computed = checksum(&hash);
        if computed != stored {
            break Some((offset, RecordFault::BadChecksum { stored, computed }));
        }
        // offset < file_len <= MAX_SEGMENT_FILE_BYTES < u32::MAX.
        index.offsets.push(offset as u32);
        index.leaves.push(merkle::leaf_hash(hash.as_bytes()));
        index.head = Some(hash);
        offset += RECORD_HEADER_LEN as u64 + len;
        count += 1;
    };
    result.map_err(read_err)?;
    Ok(Scan {
        file_len,
        count,
        bad,
    })
}

/// The offset just past the last non-zero byte of `path` in `from..to` (`from` when all are
/// zero), read in blocks.
fn written_end(path: &Path, from: u64, to: u64) -> Result<u64, StoreError> {
    const BLOCK: usize = 64 * 1024;
    let file = File::open(path).map_err(StoreError::io("open segment", path))?;
    let mut buf = vec![0u8; BLOCK];
    let mut end = from;
    let mut at = from;
    while at < to {
        // to - at > 0; at most BLOCK.
        let n = usize::try_from((to - at).min(BLOCK as u64)).unwrap_or(BLOCK);
        let block = buf.get_mut(..n).unwrap_or_default();
        file.read_exact_at(block, at)
            .map_err(StoreError::io("read segment", path))?;
        if let Some(i) = block.iter().rposition(|&b| b != 0) {
            end = at + i as u64 + 1;
        }
        at += n as u64;
    }
    Ok(end)
}

fn parse_header(header: [u8; RECORD_HEADER_LEN]) -> (u64, u32) {
    let [l0, l1, l2, l3, c0, c1, c2, c3] = header;
    (
        u64::from(u32::from_be_bytes([l0, l1, l2, l3])),
        u32::from_be_bytes([c0, c1, c2, c3]),
    )
}

enum TailError {
    NotTorn(NotTorn),
    Store(StoreError),
}

/// Reads the bytes from a bad record at `offset` to the end of the last segment, if they can
/// be a torn write: no longer than one batch, and no valid record anywhere in them.
fn read_torn_tail(path: &Path, file_len: u64, offset: u64) -> Result<Vec<u8>, TailError> {
    let len = file_len.saturating_sub(offset);
    if len > MAX_UNSYNCED_BYTES {
        return Err(TailError::NotTorn(NotTorn::TailTooLong {
            len,
            max: MAX_UNSYNCED_BYTES,
        }));
    }
    let file = File::open(path)
        .map_err(StoreError::io("open segment", path))
        .map_err(TailError::Store)?;
    // len <= MAX_UNSYNCED_BYTES, a few MiB.
    let mut tail = vec![0u8; len as usize];
    file.read_exact_at(&mut tail, offset)
        .map_err(StoreError::io("read segment", path))
        .map_err(TailError::Store)?;
    match find_valid_record(&tail, MAX_TAIL_SCAN_HASH_BYTES) {
        Ok(None) => Ok(tail),
        Ok(Some(at)) => Err(TailError::NotTorn(NotTorn::ValidRecordFollows {
            offset: offset.saturating_add(at as u64),
        })),
        Err(()) => Err(TailError::NotTorn(NotTorn::ScanBudgetExhausted)),
    }
}

/// The first position after 0 in `tail` where a whole valid record starts, hashing at most
/// `budget` bytes (`Err` when the budget runs out).
fn find_valid_record(tail: &[u8], mut budget: u64) -> Result<Option<usize>, ()> {
    for at in 1..tail.len() {
        let Some(header) = tail
            .get(at..at + RECORD_HEADER_LEN)
            .and_then(|h| <[u8; RECORD_HEADER_LEN]>::try_from(h).ok())
        else {
            break;
        };
        let (len, stored) = parse_header(header);
        if len == 0 || len > MAX_ENTRY_LEN as u64 {
            continue;
        }
        let start = at + RECORD_HEADER_LEN;
        // len <= MAX_ENTRY_LEN fits a usize.
        let Some(body) = tail.get(start..start + len as usize) else {
            continue;
        };
        budget = budget.checked_sub(len).ok_or(())?;
        if checksum(&EntryHash::of(body)) == stored {
            return Ok(Some(at));
        }
    }
    Ok(None)
}

/// Saves a torn tail under `DIR/quarantine/` (durably) before it is cut.
fn quarantine(dir: &Path, first_seq: u64, offset: u64, tail: &[u8]) -> Result<PathBuf, StoreError> {
    let qdir = dir.join(QUARANTINE_DIR);
    if !qdir.is_dir() {
        fs::create_dir(&qdir).map_err(StoreError::io("create quarantine directory", &qdir))?;
        sync_dir(dir)?;
    }
    // A tail cut at the same place before (a crash between saving and cutting, or a later
    // torn write at the same offset) keeps its file: identical bytes reuse it, others get the
    // next free suffix.
    for version in 0..MAX_QUARANTINE_VERSIONS {
        let suffix = if version == 0 {
            String::new()
        } else {
            format!(".{version}")
        };
        let path = qdir.join(format!(
            "{first_seq:0w$}-{offset:0w$}{suffix}.torn",
            w = SEGMENT_NAME_DIGITS
        ));
        let mut file = match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if fs::read(&path).map_err(StoreError::io("read", &path))? == tail {
                    return Ok(path);
                }
                continue;
            }
            Err(e) => return Err(StoreError::io("create", &path)(e)),
        };
        file.write_all(tail)
            .map_err(StoreError::io("write", &path))?;
        file.sync_all().map_err(StoreError::io("fsync", &path))?;
        sync_dir(&qdir)?;
        return Ok(path);
    }
    Err(StoreError::io("save torn tail in", &qdir)(
        io::Error::other("too many saved tails at this offset"),
    ))
}

fn truncate(path: &Path, len: u64) -> Result<(), StoreError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(StoreError::io("open segment", path))?;
    file.set_len(len)
        .map_err(StoreError::io("truncate segment", path))?;
    file.sync_all()
        .map_err(StoreError::io("fsync segment", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64) -> Vec<u8> {
        let mut e = format!("entry {seq} ").into_bytes();
        e.resize(64, b'.');
        e
    }

    #[test]
    fn segment_names_round_trip_and_reject_others() {
        assert_eq!(segment_name(31337), "00000000000000031337.log");
        assert_eq!(parse_segment_name(&segment_name(31337)), Some(31337));
        assert_eq!(parse_segment_name(&segment_name(u64::MAX)), Some(u64::MAX));
        for bad in [
            "0000000000000003133.log",
            "000000000000000313370.log",
            "0000000000000003133a.log",
            "00000000000000031337.lo",
            "99999999999999999999.log",
            "+0000000000000031337.log",
        ] {
            assert_eq!(parse_segment_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn find_valid_record_skips_zeros_and_respects_the_budget() {
        assert_eq!(find_valid_record(&[0u8; 4096], 0), Ok(None));
        let e = entry(9);
        let hash = EntryHash::of(&e);
        let mut tail = vec![0u8; 100];
        tail.extend_from_slice(&(e.len() as u32).to_be_bytes());
        tail.extend_from_slice(&checksum(&hash).to_be_bytes());
        tail.extend_from_slice(&e);
        assert_eq!(find_valid_record(&tail, u64::MAX), Ok(Some(100)));
        assert_eq!(find_valid_record(&tail, 10), Err(()));
    }
}
