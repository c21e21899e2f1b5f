//! The reading side, the ingest actor's [`VoteSource`]: records from the writer's tail while
//! the reader keeps up, else from the files; and the committed offset, in `consumer.offset`
//! (replaced atomically), below which whole segments are deleted.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use pollcast_actors::{
    LogError, LogRecord, Offset, Partition, SourceEvent, VoteSource, VoteSourceFactory,
};
use tokio::sync::watch;

use super::reader::Reader;
use super::segment::{segment_path, segments, sync_dir};
use super::tail::{SharedTail, lock};

const OFFSET_FILE: &str = "consumer.offset";

/// Opens readers at the committed offset.
pub(super) struct FileSourceFactory {
    pub(super) dir: PathBuf,
    pub(super) durable_end: watch::Receiver<u64>,
    pub(super) tail: SharedTail,
}

#[async_trait]
impl VoteSourceFactory for FileSourceFactory {
    async fn open(&self) -> Result<Box<dyn VoteSource>, LogError> {
        let committed = match fs::read_to_string(self.dir.join(OFFSET_FILE)) {
            Ok(text) => text
                .trim()
                .parse::<u64>()
                .map_err(|e| LogError::new("read the committed offset", e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let bases =
                    segments(&self.dir).map_err(|e| LogError::new("list log segments", e))?;
                bases.first().copied().unwrap_or(0)
            }
            Err(e) => return Err(LogError::new("read the committed offset", e)),
        };
        tracing::info!(
            offset = committed,
            "reading the vote log from its committed offset"
        );
        Ok(Box::new(FileVoteSource {
            reader: Some(Reader::new(self.dir.clone(), committed)),
            durable_end: self.durable_end.clone(),
            tail: self.tail.clone(),
        }))
    }
}

/// A reader of the log: from the writer's tail while it holds the position, else from the
/// files.
struct FileVoteSource {
    reader: Option<Reader>,
    durable_end: watch::Receiver<u64>,
    tail: SharedTail,
}

impl FileVoteSource {
    fn reader(&mut self) -> &mut Reader {
        self.reader
            .as_mut()
            .expect("reader is only taken during a read")
    }

    /// The next records from the writer's tail, if it holds the reader's position.
    fn take_from_tail(&mut self, max: usize) -> Option<Vec<LogRecord>> {
        let position = self.reader().position();
        let records = lock(&self.tail).take_from(position, max)?;
        // The position may have moved into a later segment: found again if the next read
        // is from the files.
        self.reader()
            .seek(records.last().expect("never empty").next_offset as u64);
        Some(records)
    }
}

fn commit_offset(dir: &Path, offset: u64) -> io::Result<()> {
    let tmp = dir.join(format!("{OFFSET_FILE}.tmp"));
    let mut file = File::create(&tmp)?;
    file.write_all(offset.to_string().as_bytes())?;
    file.sync_all()?;
    fs::rename(&tmp, dir.join(OFFSET_FILE))?;
    sync_dir(dir)?;
    // Segments wholly below the committed offset are never read again.
    let bases = segments(dir)?;
    for pair in bases.windows(2) {
        if pair[1] <= offset {
            fs::remove_file(segment_path(dir, pair[0]))?;
        }
    }
    Ok(())
}

#[async_trait]
impl VoteSource for FileVoteSource {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<SourceEvent, LogError> {
        let position = self.reader().position();
        if *self.durable_end.borrow() <= position {
            // Why ignore the result: a timeout or a stopped writer both mean "nothing new".
            let _ = tokio::time::timeout(wait, self.durable_end.changed()).await;
        }
        let end = *self.durable_end.borrow_and_update();
        if end <= position {
            return Ok(SourceEvent::Records(Vec::new()));
        }
        if let Some(records) = self.take_from_tail(max) {
            return Ok(SourceEvent::Records(records));
        }
        let mut reader = self.reader.take().expect("not reading concurrently");
        let (reader, result) = tokio::task::spawn_blocking(move || {
            let result = reader.read(max, end);
            (reader, result)
        })
        .await
        .map_err(|e| LogError::new("read the log", e))?;
        self.reader = Some(reader);
        result
            .map(SourceEvent::Records)
            .map_err(|e| LogError::new("read the log", e))
    }

    async fn commit(&mut self, positions: &[(Partition, Offset)]) -> Result<(), LogError> {
        let Some(&(_, offset)) = positions.iter().find(|(p, _)| *p == 0) else {
            return Ok(());
        };
        let dir = self.reader().dir().to_owned();
        tokio::task::spawn_blocking(move || commit_offset(&dir, offset as u64))
            .await
            .map_err(|e| LogError::new("commit", e))?
            .map_err(|e| LogError::new("commit", e))
    }

    fn end_offsets(&self) -> Vec<(Partition, Offset)> {
        vec![(0, *self.durable_end.borrow() as Offset)]
    }

    async fn seek(&mut self, _partition: Partition, offset: Offset) -> Result<(), LogError> {
        self.reader().seek(offset as u64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::file_log::FileVoteLog;
    use crate::adapters::file_log::tail::TAIL_RECORDS;
    use crate::adapters::file_log::tests::{
        assert_contiguous, log_of_200_votes, log_of_votes, read_all, user_of, vote,
    };
    use crate::background::Background;
    use pollcast_actors::VoteAppender;

    #[tokio::test]
    async fn records_taken_from_memory_are_the_records_on_disk() {
        let (_dir, log) = log_of_200_votes(TAIL_RECORDS).await;
        let mut source = log.source_factory().open().await.unwrap();
        let from_memory = read_all(&mut source).await;
        assert!(lock(&log.tail).is_empty(), "all taken from the tail");
        // A second reader from the start finds the tail gone and reads the segments.
        let mut source = log.source_factory().open().await.unwrap();
        let from_disk = read_all(&mut source).await;
        assert_eq!(from_memory.len(), 200);
        assert_eq!(from_memory, from_disk);
    }

    #[tokio::test]
    async fn a_reader_behind_the_tail_reads_the_files_until_it_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let log = FileVoteLog::open_with_tail(dir.path(), 4096, 8, &Background::new()).unwrap();
        for i in 0..100 {
            log.append(vote(&format!("u{i}"))).await.unwrap();
        }
        let mut source = log.source_factory().open().await.unwrap();
        let mut records = Vec::new();
        // Small reads, so that the last ones come from the tail, across segment ends.
        while records.len() < 100 {
            match source.poll(7, Duration::from_millis(20)).await.unwrap() {
                SourceEvent::Records(r) => {
                    assert!(!r.is_empty(), "stalled after {} records", records.len());
                    records.extend(r);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(
            lock(&log.tail).is_empty(),
            "the last ones came from the tail"
        );
        log.append(vote("late")).await.unwrap();
        records.extend(read_all(&mut source).await);
        let users: Vec<_> = records.iter().map(user_of).collect();
        let mut expected: Vec<_> = (0..100).map(|i| format!("u{i}")).collect();
        expected.push("late".into());
        assert_eq!(users, expected);
        assert_contiguous(&records);
    }

    #[tokio::test]
    async fn reading_resumes_at_the_committed_offset_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = log_of_votes(dir.path(), 10).await;
            let mut source = log.source_factory().open().await.unwrap();
            let records = read_all(&mut source).await;
            source.commit(&[(0, records[4].next_offset)]).await.unwrap();
        }
        let log = FileVoteLog::open(dir.path(), 1 << 20, &Background::new()).unwrap();
        let mut source = log.source_factory().open().await.unwrap();
        let records = read_all(&mut source).await;
        assert_eq!(records.len(), 5);
        assert_eq!(user_of(&records[0]), "u5");
    }

    #[tokio::test]
    async fn seek_replays_from_an_earlier_offset() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_of_votes(dir.path(), 5).await;
        let mut source = log.source_factory().open().await.unwrap();
        let first = read_all(&mut source).await;
        // What the first read took from memory is read again from the files.
        source.seek(0, first[2].offset).await.unwrap();
        assert_eq!(read_all(&mut source).await, first[2..].to_vec());
    }

    #[tokio::test]
    async fn committed_segments_are_deleted() {
        let (dir, log) = log_of_200_votes(TAIL_RECORDS).await;
        let before = segments(dir.path()).unwrap().len();
        let mut source = log.source_factory().open().await.unwrap();
        let records = read_all(&mut source).await;
        source
            .commit(&[(0, records.last().unwrap().next_offset)])
            .await
            .unwrap();
        assert_eq!(
            segments(dir.path()).unwrap().len(),
            1,
            "from {before} segments"
        );
    }
}
