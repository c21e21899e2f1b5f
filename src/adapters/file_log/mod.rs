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
//! Segments are zero-filled ahead of the data, a chunk at a time, so that most groups
//! overwrite blocks that already exist: `fdatasync` then has no file size to journal, which
//! on ext4 made a write + sync 0.10 ms and 40 µs of CPU instead of 0.165 ms and 62 µs
//! (docs/BENCHMARKS.md). A zero record header (a record is never empty) marks the end of a
//! segment's data.
//!
//! The writer also keeps the entries it made durable last, in memory, and the reader takes
//! them from there while it keeps up: reading back and decoding every vote it had just
//! written was a twentieth of the embedded server's instructions. The files stay the truth;
//! a reader behind that tail (after a restart, a rewind, or a backlog) reads them.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use pollcast_actors::{
    LogEntry, LogError, LogRecord, Offset, Partition, SourceEvent, VoteAppender, VoteSource,
    VoteSourceFactory, Voter,
};
use tokio::sync::{mpsc, oneshot, watch};

const HEADER: u64 = 8;
/// Appends queued before callers wait (backpressure on the HTTP handlers).
const QUEUE: usize = 64 * 1024;
/// Appends written together at most (bounds the latency of a group commit).
const GROUP_MAX: usize = 4096;
/// Largest record accepted (a vote is well under 1 KiB).
const RECORD_MAX: u32 = 1 << 20;
/// Zeros written ahead of the data when a group would go past them.
const PREALLOCATE: u64 = 1 << 20;
const OFFSET_FILE: &str = "consumer.offset";
/// Durable entries kept in memory for the reader (about 200 bytes each). Why this many: the
/// reader takes them every few milliseconds, so this is a backlog of a second or more at
/// full rate before it has to read the files.
const TAIL_RECORDS: usize = 64 * 1024;

struct Append {
    entry: LogEntry,
    done: oneshot::Sender<Result<(), String>>,
}

/// The last durable records, decoded and contiguous: each one's `offset` is the previous
/// one's `next_offset`.
#[derive(Debug)]
struct Tail {
    records: VecDeque<LogRecord>,
    capacity: usize,
}

type SharedTail = Arc<Mutex<Tail>>;

fn lock(tail: &Mutex<Tail>) -> MutexGuard<'_, Tail> {
    // Why not give up on a poisoned lock: the tail only ever holds whole records, and the
    // files hold all of them anyway.
    tail.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Tail {
    fn push(&mut self, record: LogRecord) {
        if self
            .records
            .back()
            .is_some_and(|last| last.next_offset != record.offset)
        {
            self.records.clear();
        }
        if self.records.len() == self.capacity {
            self.records.pop_front();
        }
        if self.capacity > 0 {
            self.records.push_back(record);
        }
    }

    /// Up to `max` records from exactly `position` on, or `None` if the tail does not hold
    /// `position`. Records before it are dropped: their reader is past them.
    fn take_from(&mut self, position: u64, max: usize) -> Option<Vec<LogRecord>> {
        while let Some(first) = self.records.front()
            && (first.offset as u64) < position
        {
            self.records.pop_front();
        }
        if self.records.front()?.offset as u64 != position {
            return None;
        }
        let n = self.records.len().min(max);
        (n > 0).then(|| self.records.drain(..n).collect())
    }
}

/// The embedded vote log: appends from HTTP handlers, reads by the ingest actor.
#[derive(Debug, Clone)]
pub struct FileVoteLog {
    dir: PathBuf,
    appends: mpsc::Sender<Append>,
    durable_end: watch::Receiver<u64>,
    tail: SharedTail,
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

fn segments(dir: &Path) -> io::Result<Vec<u64>> {
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

/// Appends `entry` to `buf` as a record; returns its length with the header.
fn encode_into(buf: &mut Vec<u8>, entry: &LogEntry) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER as usize]);
    entry.write_json(&mut *buf);
    let payload = &buf[start + HEADER as usize..];
    let (len, crc) = (payload.len() as u32, crc32fast::hash(payload));
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    buf.len() - start
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
fn valid_length(path: &Path) -> io::Result<u64> {
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
fn zeros_at(file: &File, at: u64) -> io::Result<bool> {
    let mut header = [0u8; HEADER as usize];
    let read = read_fully_at(file, &mut header, at)?;
    Ok(header[..read].iter().all(|b| *b == 0))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl FileVoteLog {
    /// Opens the log in `dir` (created if missing), repairing a torn tail, and starts its
    /// writer thread. Segments roll over at `segment_bytes`.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<Self, LogError> {
        Self::open_with_tail(dir, segment_bytes, TAIL_RECORDS)
    }

    /// [`FileVoteLog::open`], keeping `tail_records` durable entries in memory for the
    /// reader (0: it reads everything from the files).
    fn open_with_tail(
        dir: &Path,
        segment_bytes: u64,
        tail_records: usize,
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
        let end = base + valid;
        let (durable_tx, durable_end) = watch::channel(end);
        let (appends, rx) = mpsc::channel(QUEUE);
        let tail = Arc::new(Mutex::new(Tail {
            records: VecDeque::new(),
            capacity: tail_records,
        }));
        let writer = Writer {
            dir: dir.to_owned(),
            segment_bytes,
            base,
            file,
            end,
            allocated: valid,
            durable: durable_tx,
            tail: tail.clone(),
        };
        std::thread::Builder::new()
            .name("vote-log-writer".into())
            .spawn(move || writer.run(rx))
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

struct Writer {
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
    fn run(mut self, mut rx: mpsc::Receiver<Append>) {
        let mut group = Vec::with_capacity(GROUP_MAX);
        let mut lengths = Vec::with_capacity(GROUP_MAX);
        let mut answers = Vec::with_capacity(GROUP_MAX);
        let mut buf = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            group.push(first);
            while group.len() < GROUP_MAX {
                match rx.try_recv() {
                    Ok(next) => group.push(next),
                    Err(_) => break,
                }
            }
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
            .and_then(|_| self.file.sync_data());
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

/// Writes zeros over `from..to` of `file`.
fn write_zeros(file: &File, from: u64, to: u64) -> io::Result<()> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

struct FileSourceFactory {
    dir: PathBuf,
    durable_end: watch::Receiver<u64>,
    tail: SharedTail,
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
            reader: Some(Reader {
                dir: self.dir.clone(),
                position: committed,
                segment: None,
                buf: Vec::new(),
            }),
            durable_end: self.durable_end.clone(),
            tail: self.tail.clone(),
        }))
    }
}

/// Blocking part of the reader; moved into `spawn_blocking` for each read.
struct Reader {
    dir: PathBuf,
    position: u64,
    /// The segment holding `position`: its base and the open file. Kept open between reads:
    /// listing the directory and opening the file again for every batch cost more system
    /// calls than the votes themselves.
    segment: Option<(u64, File)>,
    /// Bytes of the last read, reused.
    buf: Vec<u8>,
}

/// Bytes read from a segment at once; a whole record of the largest size fits.
const READ_CHUNK: u64 = RECORD_MAX as u64 + HEADER;

/// What lies at the start of a buffer read from a segment.
enum Split<'a> {
    /// A whole record: its payload and its length with the header.
    Record(&'a [u8], usize),
    /// The buffer ends inside a record.
    Partial,
    /// A zero header: the end of the segment's data.
    End,
}

fn split_record(buf: &[u8]) -> io::Result<Split<'_>> {
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

/// Fills `buf` from `file` at `at` up to its end of file: the number of bytes read.
fn read_fully_at(file: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
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

impl Reader {
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
    fn read(&mut self, max: usize, durable_end: u64) -> io::Result<Vec<LogRecord>> {
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
        let position = self.reader().position;
        let records = lock(&self.tail).take_from(position, max)?;
        let reader = self.reader();
        reader.position = records.last().expect("never empty").next_offset as u64;
        // The position may have moved into a later segment: find it again if the next
        // read is from the files.
        reader.segment = None;
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
        let position = self.reader().position;
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
        let dir = self.reader().dir.clone();
        tokio::task::spawn_blocking(move || commit_offset(&dir, offset as u64))
            .await
            .map_err(|e| LogError::new("commit", e))?
            .map_err(|e| LogError::new("commit", e))
    }

    fn end_offsets(&self) -> Vec<(Partition, Offset)> {
        vec![(0, *self.durable_end.borrow() as Offset)]
    }

    async fn seek(&mut self, _partition: Partition, offset: Offset) -> Result<(), LogError> {
        let reader = self.reader();
        reader.position = offset as u64;
        reader.segment = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vote(user: &str) -> LogEntry {
        LogEntry::Vote(pollcast_actors::Vote::single(1, 1, user))
    }

    fn user_of(record: &LogRecord) -> String {
        match &record.entry {
            Some(LogEntry::Vote(v)) => v.user_id.clone(),
            other => panic!("not a vote: {other:?}"),
        }
    }

    async fn read_all(source: &mut Box<dyn VoteSource>) -> Vec<LogRecord> {
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
    async fn log_of_200_votes(tail: usize) -> (tempfile::TempDir, FileVoteLog) {
        let dir = tempfile::tempdir().unwrap();
        let log = FileVoteLog::open_with_tail(dir.path(), 4096, tail).unwrap();
        for i in 0..200 {
            log.append(vote(&format!("user-{i}"))).await.unwrap();
        }
        (dir, log)
    }

    /// Every record follows the one before it, with no gap and no overlap.
    fn assert_contiguous(records: &[LogRecord]) {
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
    async fn records_taken_from_memory_are_the_records_on_disk() {
        let (_dir, log) = log_of_200_votes(TAIL_RECORDS).await;
        let mut source = log.source_factory().open().await.unwrap();
        let from_memory = read_all(&mut source).await;
        assert!(
            lock(&log.tail).records.is_empty(),
            "all taken from the tail"
        );
        // A second reader from the start finds the tail gone and reads the segments.
        let mut source = log.source_factory().open().await.unwrap();
        let from_disk = read_all(&mut source).await;
        assert_eq!(from_memory.len(), 200);
        assert_eq!(from_memory, from_disk);
    }

    #[tokio::test]
    async fn a_reader_behind_the_tail_reads_the_files_until_it_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let log = FileVoteLog::open_with_tail(dir.path(), 4096, 8).unwrap();
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
            lock(&log.tail).records.is_empty(),
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
            let log = FileVoteLog::open(dir.path(), 1 << 20).unwrap();
            for i in 0..10 {
                log.append(vote(&format!("u{i}"))).await.unwrap();
            }
            let mut source = log.source_factory().open().await.unwrap();
            let records = read_all(&mut source).await;
            source.commit(&[(0, records[4].next_offset)]).await.unwrap();
        }
        let log = FileVoteLog::open(dir.path(), 1 << 20).unwrap();
        let mut source = log.source_factory().open().await.unwrap();
        let records = read_all(&mut source).await;
        assert_eq!(records.len(), 5);
        assert_eq!(user_of(&records[0]), "u5");
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_off_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = FileVoteLog::open(dir.path(), 1 << 20).unwrap();
            log.append(vote("whole")).await.unwrap();
        }
        let path = segment_path(dir.path(), 0);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[42, 0, 0, 0, 1, 2]).unwrap();
        let log = FileVoteLog::open(dir.path(), 1 << 20).unwrap();
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
    async fn segments_are_zero_filled_ahead_and_reopen_with_every_record() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = FileVoteLog::open(dir.path(), 1 << 20).unwrap();
            for i in 0..3 {
                log.append(vote(&format!("u{i}"))).await.unwrap();
            }
        }
        let on_disk = fs::metadata(segment_path(dir.path(), 0)).unwrap().len();
        assert!(
            on_disk >= PREALLOCATE,
            "{on_disk} bytes: zeros written ahead"
        );
        let log = FileVoteLog::open(dir.path(), 1 << 20).unwrap();
        log.append(vote("u3")).await.unwrap();
        let mut source = log.source_factory().open().await.unwrap();
        let users: Vec<_> = read_all(&mut source).await.iter().map(user_of).collect();
        assert_eq!(users, ["u0", "u1", "u2", "u3"]);
    }

    #[tokio::test]
    async fn a_record_torn_inside_the_zero_filled_space_is_cut_off_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let end = {
            let log = FileVoteLog::open(dir.path(), 1 << 20).unwrap();
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
        let log = FileVoteLog::open(dir.path(), 1 << 20).unwrap();
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

    #[tokio::test]
    async fn seek_replays_from_an_earlier_offset() {
        let dir = tempfile::tempdir().unwrap();
        let log = FileVoteLog::open(dir.path(), 1 << 20).unwrap();
        for i in 0..5 {
            log.append(vote(&format!("u{i}"))).await.unwrap();
        }
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
