//! A tiny HTTP/1.1 client on one keep-alive connection, shared by the vote workers, the
//! retries and the probe.

use std::net::{IpAddr, SocketAddr};

use anyhow::Context;
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// A request that never went out: the connection had closed (the server let it go) before
/// it could be sent, so the server never saw it.
#[derive(Debug, thiserror::Error)]
#[error("the connection closed before the request was sent")]
pub struct NotSent;

/// A tiny HTTP/1.1 client on one keep-alive connection.
pub struct Connection {
    sender: SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    host: String,
    source: Option<IpAddr>,
}

impl Connection {
    /// The `host:port` it talks to.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Another connection to the same server.
    pub async fn reopen(&self) -> anyhow::Result<Self> {
        Self::open(self.addr, &self.host, self.source).await
    }

    /// A connection to `addr` (`host` for the Host header), from `source` when given.
    pub async fn open(
        addr: SocketAddr,
        host: &str,
        source: Option<IpAddr>,
    ) -> anyhow::Result<Self> {
        let stream = crate::net::connect(addr, source)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Self {
            sender,
            addr,
            host: host.to_owned(),
            source,
        })
    }

    /// Sends a request and reads the whole answer.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Bytes,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.host)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req.body(Full::new(body))?;
        // Why tell these apart: a keep-alive connection the server closed before the request
        // went out is not a request the server dropped (see `NotSent`).
        if self.sender.ready().await.is_err() {
            return Err(NotSent.into());
        }
        let resp = match self.sender.send_request(req).await {
            Err(e) if e.is_canceled() => return Err(NotSent.into()),
            sent => sent?,
        };
        let status = resp.status();
        Ok((status, resp.into_body().collect().await?.to_bytes()))
    }

    /// Sends a JSON body and parses the JSON answer (`null` if it is not JSON).
    pub async fn json(
        &mut self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let (status, bytes) = self
            .send(method, path, token, Bytes::from(body.to_string()))
            .await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }
}
