//! Broker check, no pollcast code: does the broker hand a live consumer every record it acked?
//!
//! PRODUCERS idempotent producers (acks=all, linger.ms=1, as pollcast's) append keyed records
//! to a fresh 6-partition topic for SECONDS while one consumer reads it live; then every acked
//! (partition, offset) must have been read, and each partition in offset order without gaps.
//! Apache Kafka passes. The tansu build the tests use (memory storage) does not, now and then:
//! it advances a partition's high watermark before it stores the batch, and its fetch returns
//! the batches stored below the watermark, so a later producer's batch can be served before an
//! earlier one is stored and the consumer's position passes the earlier one for good (see
//! notes-eo.md). Run two at once to load the broker as the cluster test does:
//!
//! `cargo run --example broker_gap_check -- 127.0.0.1:PORT [SECONDS=10] [PRODUCERS=2]`
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

/// A record's place: (partition, offset).
type At = (i32, i64);

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let broker = args[1].clone();
    let secs: u64 = args.get(2).map_or(10, |s| s.parse().unwrap());
    let producers: usize = args.get(3).map_or(2, |s| s.parse().unwrap());
    let topic = format!("gap-{}", std::process::id());
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &broker)
        .set("broker.address.family", "v4")
        .create()
        .unwrap();
    admin
        .create_topics(
            &[NewTopic::new(&topic, 6, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Live consumer: what it read, in order.
    let read: Arc<Mutex<Vec<(At, String)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let consumer_thread = {
        let (read, stop, broker, topic) =
            (read.clone(), stop.clone(), broker.clone(), topic.clone());
        std::thread::spawn(move || {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &broker)
                .set("broker.address.family", "v4")
                .set("group.id", format!("{topic}-g"))
                .set("enable.auto.commit", "false")
                .set("fetch.wait.max.ms", "50")
                .create()
                .unwrap();
            let mut tpl = rdkafka::TopicPartitionList::new();
            for part in 0..6 {
                tpl.add_partition_offset(&topic, part, rdkafka::Offset::Beginning)
                    .unwrap();
            }
            c.assign(&tpl).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                    let p = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
                    read.lock().unwrap().push(((m.partition(), m.offset()), p));
                }
            }
        })
    };

    // Each producer has two concurrent senders.
    let acked: Arc<Mutex<BTreeMap<At, String>>> = Arc::default();
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for p in 0..producers {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &broker)
            .set("broker.address.family", "v4")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .create()
            .unwrap();
        for s in 0..2usize {
            let (producer, topic, acked) = (producer.clone(), topic.clone(), acked.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = 0usize;
                while Instant::now() < until {
                    let payload = format!("p{p}-s{s}-{i}");
                    let key = ((i * 7 + s * 3 + p) % 8 + 1).to_string();
                    let record = FutureRecord::to(&topic).key(&key).payload(&payload);
                    let d = producer
                        .send(record, Timeout::After(Duration::from_secs(10)))
                        .await
                        .map_err(|(e, _)| e)
                        .unwrap();
                    acked
                        .lock()
                        .unwrap()
                        .insert((d.partition, d.offset), payload);
                    i += 1;
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    consumer_thread.join().unwrap();

    let acked = acked.lock().unwrap();
    let read = read.lock().unwrap();
    let read_offsets: std::collections::BTreeSet<At> = read.iter().map(|(o, _)| *o).collect();
    let missed: Vec<_> = acked
        .iter()
        .filter(|(o, _)| !read_offsets.contains(o))
        .collect();
    let mut jumps = Vec::new();
    let mut last: BTreeMap<i32, i64> = BTreeMap::new();
    for ((part, offset), _) in read.iter() {
        if let Some(prev) = last.insert(*part, *offset)
            && *offset != prev + 1
        {
            jumps.push((*part, prev, *offset));
        }
    }
    let lost = !missed.is_empty() || !jumps.is_empty();
    println!(
        "{} topic {topic}: {} records acked, {} read live; acked but never read live: {:?}; \
         non-consecutive reads (partition, from, to): {:?}",
        if lost { "FAIL" } else { "ok" },
        acked.len(),
        read.len(),
        &missed[..missed.len().min(20)],
        &jumps[..jumps.len().min(20)]
    );
    if lost {
        std::process::exit(1);
    }
}
