//! The blocking read of segment files, for a reader behind the writer's tail.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use pollcast_actors::{LogEntry, LogRecord, Offset};

use super::segment::{READ_CHUNK, Split, read_fully_at, segment_path, segments, split_record};

/// Blocking part of the reader; moved into `spawn_blocking` for each read.
pub(super) struct Reader {
    dir: PathBuf,
    position: u64,
    /// The segment holding `position`: its base and the open file. Kept open between reads:
    /// listing the directory and opening the file again for every batch cost more system
    /// calls than the votes themselves.
    segment: Option<(u64, File)>,
    /// Bytes of the last read, reused.
    buf: Vec<u8>,
}

impl Reader {
    /// A reader of the log in `dir` from `position` on.
    pub(super) fn new(dir: PathBuf, position: u64) -> Self {
        Self {
            dir,
            position,
            segment: None,
            buf: Vec::new(),
        }
    }

    /// The log's directory.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The offset of the next record to read.
    pub(super) fn position(&self) -> u64 {
        self.position
    }

    /// Moves to `position`, which may be in another segment.
    pub(super) fn seek(&mut self, position: u64) {
        self.position = position;
        self.segment = None;
    }

    fn open_segment_at(&mut self, position: u64) -> io::Result<()> {
        let bases = segments(&self.dir)?;
        let base = bases
            .iter()
            .rev()
            .find(|b| **b <= position)
            .copied()
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "offset below the oldest segment")
            })?;
        let file = File::open(segment_path(&self.dir, base))?;
        self.segment = Some((base, file));
        Ok(())
    }

    /// Reads up to `max` records, never past `durable_end`. Why only durable bytes: past it
    /// may lie a group whose write failed and whose offsets the writer reuses.
    pub(super) fn read(&mut self, max: usize, durable_end: u64) -> io::Result<Vec<LogRecord>> {
        let mut records = Vec::new();
        while records.len() < max && self.position < durable_end {
            if self.segment.is_none() {
                self.open_segment_at(self.position)?;
            }
            let (base, file) = self.segment.as_ref().expect("opened above");
            let want = (durable_end - self.position).min(READ_CHUNK) as usize;
            self.buf.resize(want, 0);
            let read = read_fully_at(file, &mut self.buf, self.position - base)?;
            let mut used = 0;
            let mut data_ended = false;
            while records.len() < max {
                let (payload, len) = match split_record(&self.buf[used..read])? {
                    Split::Record(payload, len) => (payload, len),
                    Split::Partial => break,
                    Split::End => {
                        data_ended = true;
                        break;
                    }
                };
                let offset = self.position + used as u64;
                used += len;
                let entry = match LogEntry::from_json(payload) {
                    Ok(entry) => Some(entry),
                    Err(e) => {
                        tracing::warn!(offset, error = %e, "skipping a vote log record that is not a vote");
                        None
                    }
                };
                records.push(LogRecord {
                    partition: 0,
                    offset: offset as Offset,
                    next_offset: (self.position + used as u64) as Offset,
                    entry,
                });
            }
            self.position += used as u64;
            if data_ended || (read < want && used == read) {
                // The end of this segment's data (its zero-filled space, or the file's end)
                // while durable data lies beyond: the next segment starts exactly here.
                self.segment = None;
                if !segment_path(&self.dir, self.position).exists() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "vote log segment missing",
                    ));
                }
            } else if used == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a vote log segment ends inside a record",
                ));
            }
        }
        Ok(records)
    }
}
