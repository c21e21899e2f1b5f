//! A connection whose reads can be held to a slow rate once it has become a Socket.IO
//! WebSocket.
//!
//! Why: socketioxide 0.16 (the newest for this crate's Rust version) builds its WebSocket
//! with tungstenite's default message limit, 64 MiB, so one client could make pollcast hold
//! that much per connection. A Socket.IO client sends little (pongs, `subscribe`), so its
//! socket is read at [`RATE`] bytes a second after a burst of [`BURST`]: what a client can
//! make the server buffer then grows with time at that rate, not with what it sends, while
//! Engine.IO's heartbeat (a pong stuck behind a huge message times out in 45 s) and the
//! connection caps bound the rest. Other connections are never throttled.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Bytes a second a throttled connection is read at, and at once.
pub const RATE: f64 = 4.0 * 1024.0;
pub const BURST: f64 = 64.0 * 1024.0;

/// Turns the throttle of one connection on; cheap to clone.
#[derive(Clone, Default)]
pub struct Throttle(Arc<AtomicBool>);

impl Throttle {
    /// From now on the connection is read at [`RATE`].
    pub fn engage(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Wraps a socket whose reads follow its [`Throttle`].
pub struct ReadBudget<I> {
    inner: I,
    throttle: Throttle,
    tokens: f64,
    at: Option<Instant>,
    waiting: Option<Pin<Box<Sleep>>>,
}

impl<I> ReadBudget<I> {
    /// `inner`, read freely until `throttle` is engaged.
    pub fn new(inner: I, throttle: Throttle) -> Self {
        Self {
            inner,
            throttle,
            tokens: BURST,
            at: None,
            waiting: None,
        }
    }

    /// The socket, unwrapped.
    pub fn into_inner(self) -> I {
        self.inner
    }

    /// Bytes that may be read now (refilled at [`RATE`] since the last read).
    fn allowance(&mut self, now: Instant) -> f64 {
        if let Some(at) = self.at {
            let refill = now.duration_since(at).as_secs_f64() * RATE;
            self.tokens = (self.tokens + refill).min(BURST);
        }
        self.at = Some(now);
        self.tokens
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for ReadBudget<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.throttle.0.load(Ordering::Relaxed) {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if let Some(waiting) = &mut this.waiting {
            if waiting.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.waiting = None;
        }
        let allowed = this.allowance(Instant::now()).floor() as usize;
        if allowed == 0 {
            // Wait until a kilobyte (or what is missing of one) has accrued.
            let wait = Duration::from_secs_f64((1024.0 - this.tokens).max(1.0) / RATE);
            let mut sleep = Box::pin(tokio::time::sleep(wait));
            let pending = sleep.as_mut().poll(cx).is_pending();
            this.waiting = Some(sleep);
            if pending {
                return Poll::Pending;
            }
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let limit = allowed.min(buf.remaining());
        let mut part = ReadBuf::new(buf.initialize_unfilled_to(limit));
        let polled = Pin::new(&mut this.inner).poll_read(cx, &mut part);
        let n = part.filled().len();
        if let Poll::Ready(Ok(())) = polled {
            buf.advance(n);
            this.tokens -= n as f64;
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for ReadBudget<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Bytes read within `within` from a peer that sends as fast as it can.
    async fn read_within(throttled: bool, within: Duration) -> usize {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let throttle = Throttle::default();
        if throttled {
            throttle.engage();
        }
        let mut socket = ReadBudget::new(near, throttle);
        tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            while far.write_all(&chunk).await.is_ok() {}
        });
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        let _ = tokio::time::timeout(within, async {
            loop {
                got += socket.read(&mut buf).await.unwrap();
            }
        })
        .await;
        got
    }

    #[tokio::test(start_paused = true)]
    async fn an_engaged_throttle_holds_reads_to_the_burst_and_the_rate() {
        let got = read_within(true, Duration::from_secs(10)).await as f64;
        let most = BURST + 10.0 * RATE;
        assert!(got <= most + 1024.0, "{got} bytes read, at most {most}");
        assert!(
            got >= BURST + 8.0 * RATE,
            "{got} bytes read: the rate is served"
        );
    }

    #[tokio::test]
    async fn a_connection_is_read_freely_until_the_throttle_is_engaged() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut socket = ReadBudget::new(near, Throttle::default());
        let sent = vec![7u8; 4 << 20];
        tokio::spawn(async move { far.write_all(&sent).await });
        let mut got = vec![0u8; 4 << 20];
        // Four megabytes at once: a throttled socket would take over 15 minutes.
        tokio::time::timeout(Duration::from_secs(10), socket.read_exact(&mut got))
            .await
            .expect("read at full speed")
            .unwrap();
    }
}
