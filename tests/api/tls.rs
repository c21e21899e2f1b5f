use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{ADMIN_TOKEN, Backend, RunningApp, SETTLE, TestApp};

/// A pollcast serving TLS with a fresh self-signed certificate, and a client that trusts it.
struct TlsApp {
    app: RunningApp,
    connector: TlsConnector,
    _dir: tempfile::TempDir,
}

impl TlsApp {
    async fn start(backend: Backend) -> Self {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_path, cert.cert.pem()).unwrap();
        std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
        let app = TestApp::start_without_waiting(backend, |s| {
            s.http.tls_cert_path = Some(cert_path.clone());
            s.http.tls_key_path = Some(key_path.clone());
        })
        .await;
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(cert.cert.der().to_vec()))
            .unwrap();
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self {
            app,
            connector: TlsConnector::from(Arc::new(config)),
            _dir: dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.app.addr
    }

    async fn connect(&self) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.addr()).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        self.connector.connect(name, tcp).await.expect("handshake")
    }

    /// One request on a connection of its own, with the admin token; the status and body.
    async fn request(&self, method: &str, path: &str, body: &Value) -> (u16, Value) {
        let body = body.to_string();
        let mut tls = self.connect().await;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\
             authorization: Bearer {ADMIN_TOKEN}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        let mut response = String::new();
        tls.read_to_string(&mut response).await.unwrap();
        let status = response[9..12].parse().expect("a status line");
        let body = response
            .split_once("\r\n\r\n")
            .and_then(|(_, body)| serde_json::from_str(body).ok())
            .unwrap_or(Value::Null);
        (status, body)
    }
}

async fn with_a_certificate_the_api_is_served_over_tls_only(backend: Backend) {
    let tls_app = TlsApp::start(backend).await;
    let app = &tls_app.app;
    let mut tls = tls_app.connect().await;
    tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tls.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/healthz", app.addr))
        .timeout(std::time::Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
}

/// Why a test of its own: over TLS a WebSocket session cannot hand its socket to the poll's
/// fan-out, so its frames take the other way out, through the session (`ws::outlet`).
async fn a_websocket_over_tls_gets_its_snapshot_then_the_counts_of_each_flush(backend: Backend) {
    let tls_app = TlsApp::start(backend).await;
    let deadline = tokio::time::Instant::now() + SETTLE;
    let poll = loop {
        let (status, body) = tls_app
            .request(
                "POST",
                "/polls",
                &json!({"question": "q", "options": ["a", "b"]}),
            )
            .await;
        if status == 201 {
            break body["id"].as_i64().unwrap();
        }
        // With Kafka the server answers 503 until its consumer is in.
        assert!(tokio::time::Instant::now() < deadline, "{status} {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (mut socket, _) = tokio_tungstenite::client_async(
        format!("wss://localhost/ws/polls/{poll}"),
        tls_app.connect().await,
    )
    .await
    .expect("upgrade");
    let mut next = async || loop {
        let msg = tokio::time::timeout(SETTLE, socket.next())
            .await
            .expect("a message in time")
            .expect("open")
            .expect("a valid frame");
        if let Message::Text(text) = msg {
            return serde_json::from_str::<Value>(&text).unwrap();
        }
    };
    let snapshot = next().await;
    assert_eq!(snapshot["type"], "snapshot");
    let option = snapshot["poll"]["options"][1]["id"].as_i64().unwrap();
    for user in ["u1", "u2"] {
        let vote = json!({"pollId": poll, "optionId": option, "userId": user});
        let (status, body) = tls_app.request("POST", "/vote", &vote).await;
        assert_eq!(status, 202, "{body}");
    }
    let mut seen = 0;
    while seen < 2 {
        let counts = next().await;
        assert_eq!(counts["type"], "counts", "{counts}");
        seen = counts["counts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["optionId"] == option)
            .map_or(seen, |c| c["newCount"].as_i64().unwrap());
    }
}

crate::contract_tests!(
    with_a_certificate_the_api_is_served_over_tls_only,
    a_websocket_over_tls_gets_its_snapshot_then_the_counts_of_each_flush,
);
