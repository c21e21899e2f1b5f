//! The files: segments named by the offset of their first byte, and the record format,
//! `[len: u32 LE][crc32: u32 LE][JSON entry]`, with its one parser ([`split_record`]) for
//! both the reader and the scan that finds a torn tail.

use std::fs::{self, File};
use std::io;
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

/// Length of the valid prefix of a segment: its records up to the first that is torn (by a
/// crash), fails its checksum or cannot be read, or up to the zero-filled space.
pub(super) fn valid_length(path: &Path) -> io::Result<u64> {
    let file = File::open(path)?;
    let mut buf = vec![0u8; READ_CHUNK as usize];
    let mut valid = 0u64;
    loop {
        let Ok(read) = read_fully_at(&file, &mut buf, valid) else {
            return Ok(valid);
        };
        let mut used = 0;
        while let Ok(Split::Record(_, len)) = split_record(&buf[used..read]) {
            used += len;
        }
        if used == 0 {
            // A record that is not whole even at the start of a read: the valid data ends.
            return Ok(valid);
        }
        valid += used as u64;
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

#[cfg(test)]
mod tests {
    use pollcast_actors::Vote;

    use super::*;

    #[test]
    fn the_valid_prefix_spans_reads_and_ends_at_a_torn_record_or_the_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segment.log");
        // Over two reads' worth, so that records straddle where one read ends.
        let mut data = Vec::new();
        let mut n = 0;
        while (data.len() as u64) < 2 * READ_CHUNK + 1000 {
            let vote = Vote::single(1, 1, format!("user-{n}"));
            encode_into(&mut data, &LogEntry::Vote(vote));
            n += 1;
        }
        let whole = data.len() as u64;
        fs::write(&path, &data).unwrap();
        assert_eq!(valid_length(&path).unwrap(), whole);

        let mut torn = data.clone();
        torn.extend_from_slice(&[200, 0, 0, 0, 9, 9, 9, 9, b'{', b'"']);
        fs::write(&path, &torn).unwrap();
        assert_eq!(valid_length(&path).unwrap(), whole, "a torn record");

        let mut corrupt = data.clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 1;
        fs::write(&path, &corrupt).unwrap();
        assert!(valid_length(&path).unwrap() < whole, "a checksum mismatch");

        let mut zeros = data;
        zeros.extend_from_slice(&[0; 4096]);
        zeros.extend_from_slice(&[7; 100]);
        fs::write(&path, &zeros).unwrap();
        assert_eq!(valid_length(&path).unwrap(), whole, "the zero-filled space");
    }
}
