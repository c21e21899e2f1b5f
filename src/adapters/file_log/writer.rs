//! The writer thread: takes every pending append, writes them together and fsyncs once,
//! then answers them all, so a 202 always means "on disk" yet a burst of votes costs one
//! fsync. It rolls over to a new segment when one is full.
//!
//! Segments are zero-filled ahead of the data, a chunk at a time, so that most groups
//! overwrite blocks that already exist: `fdatasync` then has no file size to journal, which
//! makes a write + sync both faster and cheaper (docs/BENCHMARKS.md, "Fast paths"). A zero
//! record header (a record is never empty) marks the end of a segment's data.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use pollcast_actors::{LogEntry, LogRecord, Offset};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::segment::{encode_into, segment_path, sync_dir, write_zeros};
use super::tail::{SharedTail, lock};
use crate::background::{Background, Stage, next_batch};

/// Appends written together at most (bounds the latency of a group commit).
const GROUP_MAX: usize = 4096;
/// Zeros written ahead of the data when a group would go past them.
const PREALLOCATE: u64 = 1 << 20;

/// One entry to append, and who waits for it to be durable.
pub(super) struct Append {
    pub(super) entry: LogEntry,
    pub(super) done: oneshot::Sender<Result<(), String>>,
}

/// The writer thread's state: the segment it appends to and where its data ends.
pub(super) struct Writer {
    dir: PathBuf,
    segment_bytes: u64,
    base: u64,
    file: File,
    end: u64,
    /// Bytes of the current segment that exist on disk (data, then zeros).
    allocated: u64,
    durable: watch::Sender<u64>,
    tail: SharedTail,
}

impl Writer {
    /// A writer that continues the segment at `base`, open as `file`, whose data is its first
    /// `valid` bytes.
    pub(super) fn new(
        dir: &Path,
        segment_bytes: u64,
        base: u64,
        file: File,
        valid: u64,
        durable: watch::Sender<u64>,
        tail: SharedTail,
    ) -> Self {
        Self {
            dir: dir.to_owned(),
            segment_bytes,
            base,
            file,
            end: base + valid,
            allocated: valid,
            durable,
            tail,
        }
    }

    /// Starts the writer thread in `background`'s `Storage` stage. It takes `appends` until
    /// every sender is gone or the stage stops, and writes every append queued before that.
    pub(super) fn spawn(
        self,
        appends: mpsc::Receiver<Append>,
        background: &Background,
    ) -> io::Result<()> {
        background.spawn_thread(Stage::Storage, "vote-log-writer", move |stop| {
            self.run(appends, stop)
        })
    }

    fn run(mut self, mut rx: mpsc::Receiver<Append>, stop: CancellationToken) {
        // Why a runtime of its own: to wait for an append or the stop at once, on this
        // thread, without a timer or I/O driver.
        let waiter = match tokio::runtime::Builder::new_current_thread().build() {
            Ok(waiter) => waiter,
            Err(e) => {
                tracing::error!(error = %e, "the vote log writer could not start; votes refused");
                return;
            }
        };
        let mut group = Vec::with_capacity(GROUP_MAX);
        let mut lengths = Vec::with_capacity(GROUP_MAX);
        let mut answers = Vec::with_capacity(GROUP_MAX);
        let mut buf = Vec::new();
        // Every append waiting at that moment, up to GROUP_MAX; after the stop, those queued
        // before it (their callers wait for an answer).
        while waiter.block_on(next_batch(&mut rx, &mut group, GROUP_MAX, &stop)) > 0 {
            // Why encode here rather than in the handlers: straight into the group's
            // buffer, with no record of its own to allocate and copy per vote.
            buf.clear();
            lengths.clear();
            for append in &group {
                lengths.push(encode_into(&mut buf, &append.entry) as u64);
            }
            let start = self.end;
            let result = self.write_durably(&buf).map_err(|e| e.to_string());
            match &result {
                Ok(()) => {
                    let mut tail = lock(&self.tail);
                    let mut at = start;
                    for (append, len) in group.drain(..).zip(&lengths) {
                        tail.push(LogRecord {
                            partition: 0,
                            offset: at as Offset,
                            next_offset: (at + len) as Offset,
                            entry: Some(append.entry),
                        });
                        answers.push(append.done);
                        at += len;
                    }
                    drop(tail);
                    // Why before answering: whoever got `Ok` finds the log's end past its
                    // vote, and a reader woken by the new end finds the tail holding it.
                    self.durable.send_replace(self.end);
                }
                Err(e) => {
                    tracing::error!(error = %e, votes = group.len(), "vote log write failed; votes refused");
                    answers.extend(group.drain(..).map(|append| append.done));
                }
            }
            for done in answers.drain(..) {
                let _ = done.send(result.clone());
            }
            if result.is_ok() {
                self.roll_if_full();
            }
        }
        tracing::debug!("vote log writer stopped");
    }

    fn write_durably(&mut self, buf: &[u8]) -> io::Result<()> {
        let at = self.end - self.base;
        let data_end = at + buf.len() as u64;
        // Past the zeros: write more, in the same sync, so later groups overwrite.
        let allocate_to = (data_end > self.allocated).then_some(data_end + PREALLOCATE);
        let written = self
            .file
            .write_all_at(buf, at)
            .and_then(|_| match allocate_to {
                Some(to) => write_zeros(&self.file, data_end, to),
                None => Ok(()),
            })
            .and_then(|_| {
                metrics::counter!("pollcast_log_syncs_total").increment(1);
                self.file.sync_data()
            });
        if let Err(e) = written {
            // Leave no partial group behind: the callers are told it failed.
            let _ = self.file.set_len(at);
            self.allocated = at;
            return Err(e);
        }
        if let Some(to) = allocate_to {
            self.allocated = to;
        }
        self.end += buf.len() as u64;
        Ok(())
    }

    fn roll_if_full(&mut self) {
        if self.end - self.base >= self.segment_bytes
            && let Err(e) = self.roll()
        {
            // The group is durable all the same: keep writing to this segment and try to
            // roll again after the next group.
            tracing::error!(error = %e, "could not start a new vote log segment; continuing in the current one");
        }
    }

    fn roll(&mut self) -> io::Result<()> {
        let path = segment_path(&self.dir, self.end);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        if let Err(e) = sync_dir(&self.dir) {
            // A segment that might not survive a crash must not exist at all: the log would
            // continue there while this one keeps growing.
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        self.file = file;
        self.base = self.end;
        self.allocated = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::time::Duration;

    use super::*;
    use crate::adapters::file_log::FileVoteLog;
    use crate::adapters::file_log::tests::{log_of_votes, read_all, user_of, vote};
    use pollcast_actors::VoteAppender;

    #[tokio::test]
    async fn segments_are_zero_filled_ahead_and_reopen_with_every_record() {
        let dir = tempfile::tempdir().unwrap();
        log_of_votes(dir.path(), 3).await;
        let on_disk = fs::metadata(segment_path(dir.path(), 0)).unwrap().len();
        assert!(
            on_disk >= PREALLOCATE,
            "{on_disk} bytes: zeros written ahead"
        );
        let log = FileVoteLog::open(dir.path(), 1 << 20, &Background::new()).unwrap();
        log.append(vote("u3")).await.unwrap();
        let mut source = log.source_factory().open().await.unwrap();
        let users: Vec<_> = read_all(&mut source).await.iter().map(user_of).collect();
        assert_eq!(users, ["u0", "u1", "u2", "u3"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopping_the_writer_writes_every_acknowledged_append_and_refuses_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let background = Background::new();
        let log = FileVoteLog::open(dir.path(), 1 << 20, &background).unwrap();
        let appends: Vec<_> = (0..500)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { (i, log.append(vote(&format!("u{i}"))).await) })
            })
            .collect();
        tokio::task::yield_now().await;
        tokio::time::timeout(Duration::from_secs(10), background.stop(Stage::Storage))
            .await
            .expect("the writer stops once its queue is written");
        let mut acknowledged = Vec::new();
        for append in appends {
            if let (i, Ok(())) = append.await.unwrap() {
                acknowledged.push(format!("u{i}"));
            }
        }
        let refused = log.append(vote("late")).await.unwrap_err();
        assert!(refused.to_string().contains("stopped"), "{refused}");
        drop(log);
        let reopened = FileVoteLog::open(dir.path(), 1 << 20, &Background::new()).unwrap();
        let mut source = reopened.source_factory().open().await.unwrap();
        let mut written: Vec<_> = read_all(&mut source).await.iter().map(user_of).collect();
        written.sort();
        acknowledged.sort();
        assert_eq!(
            written, acknowledged,
            "on disk exactly what was acknowledged"
        );
    }
}
