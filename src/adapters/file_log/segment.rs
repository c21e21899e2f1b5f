//! The files: segments named by the offset of their first byte, and the record format,
//! `[len: u32 LE][crc32: u32 LE][JSON entry]`: its encoder, and its parsers for the reader
//! and for the scan that finds a torn tail.

use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use pollcast_actors::LogEntry;

/// Bytes of a record header: length, then checksum.
pub(super) const HEADER: u64 = 8;
/// Largest record accepted (a vote is well under 1 KiB).
const RECORD_MAX: u32 = 1 << 20;
/// Bytes read from a segment at once; a whole record of the largest size fits.
pub(super) const READ_CHUNK: u64 = RECORD_MAX as u64 + HEADER;

/// The segment whose first byte is at offset `base`.
pub(super) fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

/// The bases of the segments in `dir`, oldest first.
pub(super) fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut bases: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".log")?.parse().ok()
        })
        .collect();
    bases.sort_unstable();
    Ok(bases)
}

/// Makes the creation, removal or renaming of files in `dir` durable.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Appends `entry` to `buf` as a record; returns its length with the header.
pub(super) fn encode_into(buf: &mut Vec<u8>, entry: &LogEntry) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER as usize]);
    entry.write_json(&mut *buf);
    let payload = &buf[start + HEADER as usize..];
    let (len, crc) = (payload.len() as u32, crc32fast::hash(payload));
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    buf.len() - start
}

/// What lies at the start of a buffer read from a segment.
pub(super) enum Split<'a> {
    /// A whole record: its payload and its length with the header.
    Record(&'a [u8], usize),
    /// The buffer ends inside a record.
    Partial,
    /// A zero header: the end of the segment's data.
    End,
}

/// Parses the record at the start of `buf`, checking its length and checksum.
pub(super) fn split_record(buf: &[u8]) -> io::Result<Split<'_>> {
    let Some((header, rest)) = buf.split_first_chunk::<{ HEADER as usize }>() else {
        return Ok(Split::Partial);
    };
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if len == 0 {
        return Ok(Split::End);
    }
    if len > RECORD_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "record too long",
        ));
    }
    let Some(payload) = rest.get(..len as usize) else {
        return Ok(Split::Partial);
    };
    if crc32fast::hash(payload) != crc {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "checksum mismatch",
        ));
    }
    Ok(Split::Record(payload, HEADER as usize + payload.len()))
}

/// Reads one record at the reader's position: `Ok(None)` at a clean end of data.
fn read_record(reader: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut header = [0u8; HEADER as usize];
    match reader.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if len == 0 {
        // The zero-filled space ahead of the data.
        return Ok(None);
    }
    if len > RECORD_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "record too long",
        ));
    }
    let mut payload = vec![0u8; len as usize];
    match reader.read_exact(&mut payload) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    if crc32fast::hash(&payload) != crc {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "checksum mismatch",
        ));
    }
    Ok(Some(payload))
}

/// Length of the valid prefix of a segment: a record torn by a crash ends it.
pub(super) fn valid_length(path: &Path) -> io::Result<u64> {
    let mut reader = BufReader::new(File::open(path)?);
    let mut valid = 0u64;
    loop {
        match read_record(&mut reader) {
            Ok(Some(payload)) => valid += HEADER + payload.len() as u64,
            Ok(None) | Err(_) => return Ok(valid),
        }
    }
}

/// Whether the record header at `at` is all zeros (or the file ends there).
pub(super) fn zeros_at(file: &File, at: u64) -> io::Result<bool> {
    let mut header = [0u8; HEADER as usize];
    let read = read_fully_at(file, &mut header, at)?;
    Ok(header[..read].iter().all(|b| *b == 0))
}

/// Fills `buf` from `file` at `at` up to its end of file: the number of bytes read.
pub(super) fn read_fully_at(file: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], at + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Writes zeros over `from..to` of `file`.
pub(super) fn write_zeros(file: &File, from: u64, to: u64) -> io::Result<()> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}
