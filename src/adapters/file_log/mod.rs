//! The embedded vote log: an append-only, fsync'd, group-committed log in local files.
//!
//! Layout of the log directory:
//! - `00000000000000000000.log`, …: segments named by the offset of their first byte. A
//!   record is `[len: u32 LE][crc32: u32 LE][JSON vote]`; a record's offset is the position of
//!   its first byte in the whole log.
//! - `consumer.offset`: the committed read position (replaced atomically).
//!
//! One writer thread takes every pending append, writes them together and fsyncs once, then
//! answers them all: a 202 always means "on disk", yet a burst of votes costs one fsync. The
//! reader only sees data that is already durable, and a torn tail left by a crash is cut off
//! when the log is opened.
//!
//! The reader takes what the writer made durable last from memory while it keeps up, and
//! from the files otherwise.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | [`FileVoteLog`]: opening the log (cutting a torn tail off), appending |
//! | `segment.rs` | segment files and the record format, its encoder and its one parser |
//! | `writer.rs` | the writer thread: group commit, zero-filling, rolling over |
//! | `tail.rs` | the last durable records, kept in memory for the reader |
//! | `source.rs` | the reading side: from the tail or the files; the committed offset |
//! | `reader.rs` | the blocking read of segment files |

mod reader;
mod segment;
mod source;
mod tail;
mod writer;

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pollcast_actors::{LogEntry, LogError, SourceEvent, VoteAppender, VoteSourceFactory, Voter};
use tokio::sync::{mpsc, oneshot, watch};

use self::segment::{segment_path, segments, sync_dir, valid_length, zeros_at};
use self::source::FileSourceFactory;
use self::tail::{SharedTail, TAIL_RECORDS, Tail};
use self::writer::{Append, Writer};
use crate::background::Background;

/// Appends queued before callers wait (backpressure on the HTTP handlers).
const QUEUE: usize = 64 * 1024;

/// The embedded vote log: appends from HTTP handlers, reads by the ingest actor.
#[derive(Debug, Clone)]
pub struct FileVoteLog {
    dir: PathBuf,
    appends: mpsc::Sender<Append>,
    durable_end: watch::Receiver<u64>,
    tail: SharedTail,
}

impl FileVoteLog {
    /// Opens the log in `dir` (created if missing), repairing a torn tail, and starts its
    /// writer thread in `background`'s `Storage` stage. Segments roll over at
    /// `segment_bytes`.
    pub fn open(dir: &Path, segment_bytes: u64, background: &Background) -> Result<Self, LogError> {
        Self::open_with_tail(dir, segment_bytes, TAIL_RECORDS, background)
    }

    /// [`FileVoteLog::open`], keeping `tail_records` durable entries in memory for the
    /// reader (0: it reads everything from the files).
    fn open_with_tail(
        dir: &Path,
        segment_bytes: u64,
        tail_records: usize,
        background: &Background,
    ) -> Result<Self, LogError> {
        let io_err = |what| move |e| LogError::new(what, e);
        fs::create_dir_all(dir).map_err(io_err("create the log directory"))?;
        let mut bases = segments(dir).map_err(io_err("list log segments"))?;
        if bases.is_empty() {
            File::create(segment_path(dir, 0)).map_err(io_err("create a log segment"))?;
            sync_dir(dir).map_err(io_err("sync the log directory"))?;
            bases.push(0);
        }
        let base = *bases.last().expect("at least one segment");
        let path = segment_path(dir, base);
        let valid = valid_length(&path).map_err(io_err("scan the last log segment"))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err("open the last log segment"))?;
        let on_disk = file
            .metadata()
            .map_err(io_err("stat the log"))
            .map(|m| m.len())?;
        if on_disk > valid {
            // Why cut the zero-filled space too: bytes of a torn group may lie beyond the
            // first zeros, and the writer fills afresh what it needs.
            if !zeros_at(&file, valid).map_err(io_err("read the log tail"))? {
                tracing::warn!(segment = %path.display(), at = valid, "cutting a torn record off the vote log");
            }
            file.set_len(valid).map_err(io_err("truncate the log"))?;
            file.sync_all().map_err(io_err("sync the log"))?;
        }
        let (durable_tx, durable_end) = watch::channel(base + valid);
        let (appends, rx) = mpsc::channel(QUEUE);
        let tail = Tail::shared(tail_records);
        Writer::new(
            dir,
            segment_bytes,
            base,
            file,
            valid,
            durable_tx,
            tail.clone(),
        )
        .spawn(rx, background)
        .map_err(io_err("start the log writer"))?;
        Ok(Self {
            dir: dir.to_owned(),
            appends,
            durable_end,
            tail,
        })
    }

    /// The voters of every vote after the committed offset: accepted, but maybe not yet
    /// counted (after a crash), so the duplicate guard must know them too.
    pub async fn unapplied_voters(&self) -> Result<Vec<Voter>, LogError> {
        let mut source = self.source_factory().open().await?;
        let mut voters = Vec::new();
        loop {
            match source.poll(4096, Duration::ZERO).await? {
                SourceEvent::Records(records) if records.is_empty() => return Ok(voters),
                SourceEvent::Records(records) => voters.extend(
                    records
                        .into_iter()
                        .filter_map(|r| match r.entry {
                            Some(LogEntry::Vote(v)) => Some(v),
                            _ => None,
                        })
                        .map(|v| Voter {
                            vote_id: v.ledger_id().to_owned(),
                            poll_id: v.poll_id,
                            user_id: v.user_id,
                            choices: v.choices,
                        }),
                ),
                _ => {}
            }
        }
    }

    /// A factory of readers positioned at the committed offset.
    pub fn source_factory(&self) -> Arc<dyn VoteSourceFactory> {
        Arc::new(FileSourceFactory {
            dir: self.dir.clone(),
            durable_end: self.durable_end.clone(),
            tail: self.tail.clone(),
        })
    }
}

#[async_trait]
impl VoteAppender for FileVoteLog {
    async fn append(&self, entry: LogEntry) -> Result<(), LogError> {
        let (done, durable) = oneshot::channel();
        let append = Append { entry, done };
        let closed = || LogError::new("append", "the log writer has stopped");
        self.appends.send(append).await.map_err(|_| closed())?;
        match durable.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(LogError::new("append", e)),
            Err(_) => Err(closed()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    use pollcast_actors::{LogRecord, Offset, VoteSource};

    use super::*;

    pub(super) fn vote(user: &str) -> LogEntry {
        LogEntry::Vote(pollcast_actors::Vote::single(1, 1, user))
    }

    pub(super) fn user_of(record: &LogRecord) -> String {
        match &record.entry {
            Some(LogEntry::Vote(v)) => v.user_id.clone(),
            other => panic!("not a vote: {other:?}"),
        }
    }

    pub(super) async fn read_all(source: &mut Box<dyn VoteSource>) -> Vec<LogRecord> {
        let mut all = Vec::new();
        loop {
            match source.poll(1000, Duration::from_millis(20)).await.unwrap() {
                SourceEvent::Records(r) if r.is_empty() => return all,
                SourceEvent::Records(r) => all.extend(r),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// A log in 4 KiB segments (so it rolls over) holding votes of `user-0` to `user-199`,
    /// with `tail` entries kept in memory.
    pub(super) async fn log_of_200_votes(tail: usize) -> (tempfile::TempDir, FileVoteLog) {
        let dir = tempfile::tempdir().unwrap();
        let log = FileVoteLog::open_with_tail(dir.path(), 4096, tail, &Background::new()).unwrap();
        for i in 0..200 {
            log.append(vote(&format!("user-{i}"))).await.unwrap();
        }
        (dir, log)
    }

    /// A log in `dir` in one large segment, holding votes of `u0` to `u{n-1}`.
    pub(super) async fn log_of_votes(dir: &Path, n: usize) -> FileVoteLog {
        let log = FileVoteLog::open(dir, 1 << 20, &Background::new()).unwrap();
        for i in 0..n {
            log.append(vote(&format!("u{i}"))).await.unwrap();
        }
        log
    }

    /// Every record follows the one before it, with no gap and no overlap.
    pub(super) fn assert_contiguous(records: &[LogRecord]) {
        for pair in records.windows(2) {
            assert_eq!(pair[0].next_offset, pair[1].offset, "{pair:?}");
        }
    }

    #[tokio::test]
    async fn appended_votes_are_read_back_across_segments() {
        let (dir, log) = log_of_200_votes(0).await;
        assert!(segments(dir.path()).unwrap().len() > 1, "log rolled over");
        let mut source = log.source_factory().open().await.unwrap();
        let records = read_all(&mut source).await;
        let users: Vec<_> = records.iter().map(user_of).collect();
        assert_eq!(
            users,
            (0..200).map(|i| format!("user-{i}")).collect::<Vec<_>>()
        );
        assert_contiguous(&records);
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_off_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = FileVoteLog::open(dir.path(), 1 << 20, &Background::new()).unwrap();
            log.append(vote("whole")).await.unwrap();
        }
        let path = segment_path(dir.path(), 0);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[42, 0, 0, 0, 1, 2]).unwrap();
        let log = FileVoteLog::open(dir.path(), 1 << 20, &Background::new()).unwrap();
        log.append(vote("after")).await.unwrap();
        let mut source = log.source_factory().open().await.unwrap();
        let users: Vec<_> = read_all(&mut source)
            .await
            .into_iter()
            .map(|r| user_of(&r))
            .collect();
        assert_eq!(users, ["whole", "after"]);
    }

    #[tokio::test]
    async fn a_record_torn_inside_the_zero_filled_space_is_cut_off_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let end = {
            let log = FileVoteLog::open(dir.path(), 1 << 20, &Background::new()).unwrap();
            log.append(vote("whole")).await.unwrap();
            *log.durable_end.borrow()
        };
        // What a crash in the middle of a group leaves: a header and part of its payload.
        let file = OpenOptions::new()
            .write(true)
            .open(segment_path(dir.path(), 0))
            .unwrap();
        file.write_all_at(&[200, 0, 0, 0, 9, 9, 9, 9, b'{', b'"'], end)
            .unwrap();
        let log = FileVoteLog::open(dir.path(), 1 << 20, &Background::new()).unwrap();
        log.append(vote("after")).await.unwrap();
        let mut source = log.source_factory().open().await.unwrap();
        let records = read_all(&mut source).await;
        let users: Vec<_> = records.iter().map(user_of).collect();
        assert_eq!(users, ["whole", "after"]);
        assert_eq!(
            records[1].offset, end as Offset,
            "written where the torn record was"
        );
    }
}
