//! A connection that gives up on a peer that takes nothing for too long.
//!
//! Why at the socket and not per protocol: a client that sends requests (or WebSocket pings)
//! and never reads the answers would otherwise hold its connection, its task and whatever
//! waits to be written for as long as it likes, and hyper has no write timeout for HTTP/1.1
//! or HTTP/2. Every protocol pollcast speaks writes through this wrapper, but for WebSocket
//! sessions on plain TCP: they take the socket out of it after the upgrade, and bound what
//! waits for a client themselves (`ws::outlet`: a send timeout and a write budget).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// How long a write may wait for the peer to take anything before the connection fails.
pub const WRITE_STALL_LIMIT: Duration = Duration::from_secs(30);

/// Wraps a socket: a write (or flush) that makes no progress for `limit` fails with
/// `TimedOut`, which ends the connection.
pub struct WriteDeadline<I> {
    inner: I,
    limit: Duration,
    /// Running while writes are blocked; reset by any progress. Why boxed and optional: a
    /// timer costs an allocation, and only a blocked write needs one.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<I> WriteDeadline<I> {
    /// `inner`, whose writes may stall for `limit` at most.
    pub fn new(inner: I, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Called when the inner write is pending: fails once the stall has lasted `limit`.
    fn stall<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer took nothing for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<T>(
        &mut self,
        polled: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(result) => {
                self.stalled = None;
                Poll::Ready(result)
            }
            Poll::Pending => self.stall(cx),
        }
    }

    /// The socket, unwrapped.
    pub fn into_inner(self) -> I {
        self.inner
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteDeadline<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progress(polled, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.progress(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.progress(polled, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.progress(polled, cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_write_the_peer_never_takes_fails_after_the_limit() {
        let (near, _far) = tokio::io::duplex(64);
        let mut socket = WriteDeadline::new(near, Duration::from_millis(100));
        let started = tokio::time::Instant::now();
        let written = tokio::time::timeout(Duration::from_secs(5), socket.write_all(&[7; 1024]))
            .await
            .expect("gave up by itself");
        let err = written.expect_err("the peer never read");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_peer_that_keeps_reading_is_never_cut_off() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut socket = WriteDeadline::new(near, Duration::from_millis(100));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 16];
            // Slowly, a little at a time: each read is progress for the writer.
            while got.len() < 4096 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let n = far.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            got.len()
        });
        socket
            .write_all(&[1; 4096])
            .await
            .expect("never stalled for 100 ms");
        assert_eq!(reader.await.unwrap(), 4096);
    }
}
