//! Votes that outlive a process (`--retries`): a vote answered 5xx, or whose request got no
//! answer, is sent again with the same voteId, after a short backoff, to the next `--url`.
//!
//! Why the same voteId: pollcast takes a vote id once (its duplicate guard holds the id and
//! the ballot, its ledger the id), so a retry of a vote that did get in is answered 202 and
//! counted once, and one of a vote that did not is counted now. A client that retried with a
//! new id could double a vote whose answer was lost, and one that gave up could lose it; with
//! the same id, a vote lost or doubled is the server's doing, which is what a rolling-restart
//! run is to find out. Why the next process: the one that failed is likely the one stopping.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::client::{Connection, NotSent};
use crate::net::Target;

/// What became of one attempt of a vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 202: it will be counted.
    Accepted,
    /// 409: this voter already voted (a vote of the duplicate ratio).
    Duplicate,
    /// Any other answer below 500: the server decided, and sending it again would not change
    /// that (404, 410, 422, 429, …).
    Refused(StatusCode),
    /// Not decided: worth another attempt.
    Failed(Failure),
}

/// Why an attempt decided nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A 5xx: 503 is "not known to be counted", and a retry with the same id is safe.
    Status(StatusCode),
    /// The request was sent but no answer came: the connection closed, as when its process
    /// stopped. The vote may or may not have got in.
    Transport,
    /// The request never went out: the server had closed the keep-alive connection first
    /// (a stopping process lets its idle connections go). The vote did not get in.
    NotSent,
    /// No server took a connection: the vote was never sent.
    Unreachable,
}

impl Failure {
    /// The key under which reports count it: the status code, `error` or `connect`.
    pub fn key(self) -> String {
        match self {
            Failure::Status(status) => status.as_u16().to_string(),
            Failure::Transport => "error".into(),
            Failure::NotSent => "closed".into(),
            Failure::Unreachable => "connect".into(),
        }
    }
}

/// Sorts an attempt's answer.
pub fn classify(answer: &anyhow::Result<(StatusCode, Bytes)>) -> Answer {
    match answer {
        Ok((StatusCode::ACCEPTED, _)) => Answer::Accepted,
        Ok((StatusCode::CONFLICT, _)) => Answer::Duplicate,
        Ok((status, _)) if status.is_server_error() => Answer::Failed(Failure::Status(*status)),
        Ok((status, _)) => Answer::Refused(*status),
        Err(e) if e.is::<NotSent>() => Answer::Failed(Failure::NotSent),
        Err(_) => Answer::Failed(Failure::Transport),
    }
}

/// Exponential backoff with jitter, as the live page reconnects: the ceiling doubles from
/// `first` up to `max`, and each wait is between half the ceiling and all of it, so that the
/// clients one stopped process cut off do not all come back in the same instant.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    /// Votes: short, since another process is up and a voter waits.
    pub const VOTES: Backoff = Backoff {
        first: Duration::from_millis(50),
        max: Duration::from_secs(1),
    };
    /// Subscribers: the live page's (`RECONNECT_FIRST_MS`, `RECONNECT_MAX_MS` in app.js).
    pub const SUBSCRIBERS: Backoff = Backoff {
        first: Duration::from_millis(500),
        max: Duration::from_secs(10),
    };

    /// The wait before retry number `retry` (0 for the first).
    pub fn delay(&self, retry: u32) -> Duration {
        let ceiling = self.first.saturating_mul(1 << retry.min(16)).min(self.max);
        ceiling / 2 + ceiling.mul_f64(rand::random::<f64>() / 2.0)
    }
}

/// How long a worker that left its own target stays away before trying it again. Why go
/// back at all: after a rolling restart every process is up again, and without it the
/// workers would have piled up on whichever process came back first.
const HOME_AFTER: Duration = Duration::from_secs(3);

/// A worker's way to the servers: its own target (`home`), or, with failover, the next one
/// while that fails.
pub struct Route {
    targets: Arc<[Target]>,
    source: Option<IpAddr>,
    home: usize,
    at: usize,
    conn: Option<Connection>,
    failover: bool,
    left_home: Option<Instant>,
    /// Connections a server refused (the vote then went to the next one).
    pub connect_failures: u64,
}

impl Route {
    /// Sends to `targets[home]`; with `failover`, to the next one while a target fails.
    pub fn new(
        targets: Arc<[Target]>,
        home: usize,
        source: Option<IpAddr>,
        failover: bool,
    ) -> Self {
        Self {
            targets,
            source,
            home,
            at: home,
            conn: None,
            failover,
            left_home: None,
            connect_failures: 0,
        }
    }

    /// The connection to send on, opened if needed: the current target's, or with failover
    /// the first of the others that takes one. `None`: no target did.
    pub async fn connection(&mut self) -> Option<&mut Connection> {
        if self
            .left_home
            .is_some_and(|left| left.elapsed() >= HOME_AFTER)
        {
            self.conn = None;
            self.at = self.home;
            self.left_home = None;
        }
        let tries = if self.failover { self.targets.len() } else { 1 };
        for _ in 0..tries {
            if self.conn.is_some() {
                break;
            }
            let target = &self.targets[self.at];
            match Connection::open(target.addr, &target.host, self.source).await {
                Ok(conn) => self.conn = Some(conn),
                Err(_) => {
                    self.connect_failures += 1;
                    if self.failover {
                        self.advance();
                    }
                }
            }
        }
        self.conn.as_mut()
    }

    /// The current target failed a request: with failover, the next request goes to the
    /// next target (a 5xx's connection still works, but its process may be stopping);
    /// without, the same target, on a new connection if this one broke.
    pub fn failed(&mut self, failure: Failure) {
        if self.failover {
            self.conn = None;
            self.advance();
        } else if !matches!(failure, Failure::Status(_)) {
            self.conn = None;
        }
    }

    /// `host:port` of the target the next request goes to.
    #[cfg(test)]
    pub fn current(&self) -> &str {
        &self.targets[self.at].host
    }

    fn advance(&mut self) {
        self.at = (self.at + 1) % self.targets.len();
        if self.at == self.home {
            self.left_home = None;
        } else if self.left_home.is_none() {
            self.left_home = Some(Instant::now());
        }
    }
}

/// How a vote ended, over all its attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The last attempt's answer: `Failed` only when every attempt failed.
    pub answer: Answer,
    /// Why each failed attempt failed, in turn (empty when the first was decided).
    pub failures: Vec<Failure>,
}

impl Sent {
    /// Attempts after the first.
    pub fn retries(&self) -> usize {
        match self.answer {
            Answer::Failed(_) => self.failures.len() - 1,
            _ => self.failures.len(),
        }
    }
}

/// Sends `body` to `route` until it is decided (202, 409 or another 4xx), or `retries`
/// more times at most, each after a backoff and on the next target. The body is the same
/// every time: with its voteId, a retry of a vote that got in is the same vote.
pub async fn send_vote(route: &mut Route, body: &Bytes, retries: u32, backoff: Backoff) -> Sent {
    let mut failures = Vec::new();
    loop {
        let answer = match route.connection().await {
            Some(conn) => classify(&conn.send(Method::POST, "/vote", None, body.clone()).await),
            None => Answer::Failed(Failure::Unreachable),
        };
        let Answer::Failed(failure) = answer else {
            return Sent { answer, failures };
        };
        failures.push(failure);
        route.failed(failure);
        let retry = failures.len() as u32 - 1;
        if retry >= retries {
            return Sent { answer, failures };
        }
        tokio::time::sleep(backoff.delay(retry)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Mutex;

    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    use super::*;

    const QUICK: Backoff = Backoff {
        first: Duration::from_millis(5),
        max: Duration::from_millis(20),
    };

    /// What a fake server does with each `POST /vote`.
    #[derive(Clone, Copy)]
    enum Behaviour {
        Answer(u16),
        /// Answers 202 with `Connection: close` and closes, as a stopping server does.
        AnswerAndClose,
        /// Reads the request and closes the connection without answering.
        Hang,
    }

    /// A fake pollcast taking votes: answers each with `behaviour`, and keeps every body.
    struct Fake {
        target: Target,
        bodies: Arc<Mutex<Vec<String>>>,
    }

    async fn fake(behaviour: Behaviour) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let kept = bodies.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let kept = kept.clone();
                tokio::spawn(async move {
                    let (closed_tx, mut closed) = tokio::sync::mpsc::channel::<()>(1);
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (kept, closed_tx) = (kept.clone(), closed_tx.clone());
                        async move {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            kept.lock()
                                .unwrap()
                                .push(String::from_utf8(body.to_vec()).unwrap());
                            let status = match behaviour {
                                Behaviour::Answer(status) => status,
                                Behaviour::AnswerAndClose => 202,
                                Behaviour::Hang => {
                                    let _ = closed_tx.send(()).await;
                                    std::future::pending::<()>().await;
                                    unreachable!()
                                }
                            };
                            let resp = http::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from_static(b"{}")))
                                .unwrap();
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .keep_alive(!matches!(behaviour, Behaviour::AnswerAndClose))
                        .serve_connection(TokioIo::new(stream), service);
                    // Hang: the request was read, then the connection goes unanswered.
                    tokio::select! {
                        _ = conn => {}
                        _ = closed.recv() => {}
                    }
                });
            }
        });
        Fake {
            target: Target {
                addr,
                host: addr.to_string(),
            },
            bodies,
        }
    }

    fn vote(id: &str) -> Bytes {
        Bytes::from(format!(
            r#"{{"pollId":1,"optionId":1,"userId":"u-{id}","voteId":"{id}"}}"#
        ))
    }

    fn route(fakes: &[&Fake], failover: bool) -> Route {
        let targets: Vec<Target> = fakes.iter().map(|f| f.target.clone()).collect();
        Route::new(targets.into(), 0, None, failover)
    }

    #[tokio::test]
    async fn a_vote_answered_503_is_sent_again_with_the_same_body_to_the_next_server() {
        let (refusing, taking) = (
            fake(Behaviour::Answer(503)).await,
            fake(Behaviour::Answer(202)).await,
        );
        let mut route = route(&[&refusing, &taking], true);
        let sent = send_vote(&mut route, &vote("v1"), 3, QUICK).await;
        assert_eq!(
            sent,
            Sent {
                answer: Answer::Accepted,
                failures: vec![Failure::Status(StatusCode::SERVICE_UNAVAILABLE)],
            }
        );
        let first = refusing.bodies.lock().unwrap().clone();
        let second = taking.bodies.lock().unwrap().clone();
        assert_eq!(first.len(), 1);
        assert_eq!(second, first, "the retry is the same vote, voteId and all");
        assert!(first[0].contains(r#""voteId":"v1""#));
    }

    #[tokio::test]
    async fn a_vote_whose_connection_closed_unanswered_is_retried_with_the_same_vote_id() {
        let (hanging, taking) = (
            fake(Behaviour::Hang).await,
            fake(Behaviour::Answer(202)).await,
        );
        let mut route = route(&[&hanging, &taking], true);
        let sent = send_vote(&mut route, &vote("v2"), 3, QUICK).await;
        assert_eq!(sent.answer, Answer::Accepted);
        assert_eq!(sent.failures, [Failure::Transport]);
        assert_eq!(
            hanging.bodies.lock().unwrap().clone(),
            taking.bodies.lock().unwrap().clone(),
            "the server that went silent had the vote; the retry carries the same id"
        );
    }

    #[tokio::test]
    async fn a_vote_on_a_connection_the_server_let_go_was_not_sent_and_goes_to_the_next() {
        let (closing, taking) = (
            fake(Behaviour::AnswerAndClose).await,
            fake(Behaviour::Answer(202)).await,
        );
        let mut route = route(&[&closing, &taking], true);
        let first = send_vote(&mut route, &vote("v7"), 3, QUICK).await;
        assert_eq!((first.answer, first.failures.len()), (Answer::Accepted, 0));
        let second = send_vote(&mut route, &vote("v8"), 3, QUICK).await;
        assert_eq!(second.answer, Answer::Accepted);
        assert_eq!(second.failures, [Failure::NotSent]);
        assert_eq!(
            closing.bodies.lock().unwrap().len(),
            1,
            "v8 never reached it"
        );
        assert_eq!(taking.bodies.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_definite_refusal_is_not_retried() {
        let (refusing, taking) = (
            fake(Behaviour::Answer(422)).await,
            fake(Behaviour::Answer(202)).await,
        );
        let mut route = route(&[&refusing, &taking], true);
        let sent = send_vote(&mut route, &vote("v3"), 3, QUICK).await;
        assert_eq!(
            sent.answer,
            Answer::Refused(StatusCode::UNPROCESSABLE_ENTITY)
        );
        assert_eq!((sent.failures.first(), sent.retries()), (None, 0));
        assert!(taking.bodies.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn retries_are_bounded_and_alternate_between_the_servers() {
        let (a, b) = (
            fake(Behaviour::Answer(503)).await,
            fake(Behaviour::Answer(500)).await,
        );
        let mut route = route(&[&a, &b], true);
        let sent = send_vote(&mut route, &vote("v4"), 4, QUICK).await;
        assert_eq!(sent.retries(), 4);
        assert_eq!(sent.failures.len(), 5);
        assert_eq!(
            sent.answer,
            Answer::Failed(Failure::Status(StatusCode::SERVICE_UNAVAILABLE)),
            "the last attempt's answer"
        );
        assert_eq!(a.bodies.lock().unwrap().len(), 3, "attempts 1, 3 and 5");
        assert_eq!(b.bodies.lock().unwrap().len(), 2, "attempts 2 and 4");
    }

    #[tokio::test]
    async fn without_retries_an_answer_counts_as_it_came() {
        let (refusing, taking) = (
            fake(Behaviour::Answer(503)).await,
            fake(Behaviour::Answer(202)).await,
        );
        let mut route = route(&[&refusing, &taking], false);
        let sent = send_vote(&mut route, &vote("v5"), 0, QUICK).await;
        assert_eq!(
            sent.answer,
            Answer::Failed(Failure::Status(StatusCode::SERVICE_UNAVAILABLE))
        );
        assert!(taking.bodies.lock().unwrap().is_empty());
        assert_eq!(
            route.current(),
            refusing.target.host,
            "no failover: it stays"
        );
    }

    #[tokio::test]
    async fn a_server_that_refuses_connections_is_skipped_without_a_failed_attempt() {
        // A port nothing listens on, as while a stopped process's replacement starts.
        let down = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let taking = fake(Behaviour::Answer(202)).await;
        let targets: Vec<Target> = vec![
            Target {
                addr: down,
                host: down.to_string(),
            },
            taking.target.clone(),
        ];
        let mut route = Route::new(targets.into(), 0, None, true);
        let sent = send_vote(&mut route, &vote("v6"), 2, QUICK).await;
        assert_eq!(
            (sent.answer, sent.failures.first()),
            (Answer::Accepted, None)
        );
        assert_eq!(route.connect_failures, 1);
    }

    #[test]
    fn backoff_grows_to_its_ceiling_with_jitter_below_it() {
        for retry in 0..20 {
            let ceiling = Backoff::SUBSCRIBERS
                .first
                .saturating_mul(1 << retry.min(16))
                .min(Backoff::SUBSCRIBERS.max);
            for _ in 0..20 {
                let d = Backoff::SUBSCRIBERS.delay(retry);
                assert!(d >= ceiling / 2 && d <= ceiling, "retry {retry}: {d:?}");
            }
        }
        assert!(Backoff::VOTES.delay(0) <= Duration::from_millis(50));
        assert!(Backoff::VOTES.delay(30) >= Duration::from_millis(500));
    }
}
