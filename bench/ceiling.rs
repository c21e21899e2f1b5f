//! The benchmark's ceiling: a bare warp endpoint that parses the same vote JSON as pollcast
//! and answers 202 with no I/O. pollcast's throughput is reported as a ratio of this one's,
//! measured side by side in the same run on the same machine.
//!
//! `cargo run --release --example ceiling -- 127.0.0.1:8090`

use pollcast::http::models::{VoteAccepted, VoteRequest, parse_json};
use warp::Filter;
use warp::http::StatusCode;

#[tokio::main]
async fn main() {
    let addr: std::net::SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8090".into())
        .parse()
        .expect("an address like 127.0.0.1:8090");
    let vote = warp::path!("vote")
        .and(warp::post())
        .and(warp::body::content_length_limit(16 * 1024))
        .and(warp::body::bytes())
        .map(|body: bytes::Bytes| {
            let accepted = parse_json::<VoteRequest>(&body).and_then(|v| v.validate(None, None));
            let (reply, status) = match accepted {
                Ok(_) => (
                    serde_json::to_value(VoteAccepted {
                        status: "Vote queued",
                    })
                    .unwrap(),
                    StatusCode::ACCEPTED,
                ),
                Err(e) => (
                    serde_json::json!({ "error": e.to_string() }),
                    StatusCode::UNPROCESSABLE_ENTITY,
                ),
            };
            warp::reply::with_status(warp::reply::json(&reply), status)
        });
    // The load generator creates polls first; the ceiling hands out ids without storing them.
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let polls = warp::path!("polls").and(warp::post()).map(move || {
        let id = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        warp::reply::with_status(
            warp::reply::json(&serde_json::json!({ "id": id })),
            StatusCode::CREATED,
        )
    });
    println!("ceiling listening on {addr}");
    warp::serve(vote.or(polls)).run(addr).await;
}
