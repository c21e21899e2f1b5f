//! The fan-out's ceiling: a bare WebSocket broadcaster that does the least any server must do
//! to put one update on every viewer's screen, one `write` of a ready-made frame per viewer,
//! so that the large-audience scenario can say how much of its fan-out delay is pollcast's
//! and how much is the machine's (the kernel's TCP send and loopback receive, and the viewers'
//! load generators, which share its cores). Measured side by side with pollcast in the same
//! run (`scripts/bench viewers`, phase `ceiling`), with the same load generators.
//!
//! What it leaves out, on purpose: no Kafka, no store, no task per viewer, no queue for a
//! viewer whose socket is full (its update is skipped and counted), no reading of what viewers
//! send. Every process sends on the same wall-clock ticks (multiples of `EVERY`), as pollcast's
//! processes all receive a flush's update at once from `poll-updates`, and stamps the tick as
//! the message's `flushedAt`, so that the load generator times it from the same instant.
//!
//! `cargo run --release --example fanout_ceiling -- 127.0.0.1:8090`
//!
//! It speaks just enough HTTP and WebSocket for `pollcast-loadgen`'s subscribers on
//! `GET /ws/polls/{id}`: the handshake, a `snapshot`, then a `counts` message per tick.

use std::io::ErrorKind;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// How often an update goes out: pollcast's default flush interval.
const EVERY: Duration = Duration::from_secs(2);
/// The options of the one poll; the update moves the first one by one each tick.
const OPTIONS: i64 = 4;

#[tokio::main]
async fn main() {
    let addr: std::net::SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8090".into())
        .parse()
        .expect("an address like 127.0.0.1:8090");
    let listener = TcpListener::bind(addr).await.expect("bind");
    let viewers: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let seq = Arc::new(AtomicU64::new(1));
    let skipped = Arc::new(AtomicU64::new(0));
    tokio::spawn(broadcast(viewers.clone(), seq.clone(), skipped.clone()));
    println!("fan-out ceiling listening on {addr}");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of files, say: the load generator sees the refusal; do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let (viewers, seq) = (viewers.clone(), seq.clone());
        tokio::spawn(async move {
            let Some(stream) = handshake(stream).await else {
                return;
            };
            // The snapshot is sent under the list's lock, so that no tick falls between it
            // and the viewer's first update.
            let mut viewers = viewers.lock().expect("not poisoned");
            let snapshot = frame(snapshot(seq.load(Ordering::Relaxed)).as_bytes());
            if matches!(stream.try_write(&snapshot), Ok(n) if n == snapshot.len()) {
                viewers.push(stream);
            }
        });
    }
}

/// Reads the upgrade request and answers 101.
async fn handshake(mut stream: TcpStream) -> Option<TcpStream> {
    let _ = stream.set_nodelay(true);
    let mut request = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 || request.len() > 8192 {
            return None;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&request);
    let key = text.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim().to_owned())
    })?;
    let reply = format!(
        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    stream.write_all(reply.as_bytes()).await.ok()?;
    Some(stream)
}

/// The poll at `seq`, as pollcast's snapshot shows it.
fn snapshot(seq: u64) -> String {
    let options: Vec<_> = (1..=OPTIONS)
        .map(|id| {
            let votes = if id == 1 { seq as i64 } else { 0 };
            serde_json::json!({ "id": id, "text": format!("option {id}"), "votes": votes })
        })
        .collect();
    serde_json::json!({
        "type": "snapshot",
        "seq": seq,
        "poll": { "id": 1, "question": "viewers", "options": options },
    })
    .to_string()
}

/// On every tick of the wall clock, one `counts` frame, made once and written to every viewer
/// with a single non-blocking write each.
async fn broadcast(
    viewers: Arc<Mutex<Vec<TcpStream>>>,
    seq: Arc<AtomicU64>,
    skipped: Arc<AtomicU64>,
) {
    loop {
        let now = unix_ms();
        let every = EVERY.as_millis() as u64;
        let tick = (now / every + 1) * every;
        tokio::time::sleep(Duration::from_millis(tick - now)).await;
        let next = seq.fetch_add(1, Ordering::Relaxed) + 1;
        let message = serde_json::json!({
            "type": "counts",
            "pollId": 1,
            "seq": next,
            // Every option, as pollcast's update of a poll voted on all four carries.
            "counts": (1..=OPTIONS)
                .map(|id| serde_json::json!({ "optionId": id, "newCount": if id == 1 { next } else { 0 } }))
                .collect::<Vec<_>>(),
            "flushedAt": tick,
        });
        let bytes = frame(message.to_string().as_bytes());
        let mut viewers = viewers.lock().expect("not poisoned");
        let before = viewers.len();
        viewers.retain(|stream| match stream.try_write(&bytes) {
            Ok(n) if n == bytes.len() => true,
            // A partial frame would corrupt the stream: this viewer is dropped.
            Ok(_) => false,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                skipped.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => false,
        });
        let sent = viewers.len();
        drop(viewers);
        if sent != before || skipped.load(Ordering::Relaxed) > 0 {
            eprintln!(
                "tick {next}: {sent} viewers ({} gone), {} updates skipped so far",
                before - sent,
                skipped.load(Ordering::Relaxed)
            );
        }
    }
}

/// An unmasked WebSocket text frame (RFC 6455 §5.2), as a server sends.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    out.push(0x81);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= u16::MAX as usize => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
