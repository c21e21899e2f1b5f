//! The stores' own contract, against a real SQLite file and a real PostgreSQL database.

use std::sync::Arc;
use std::time::Duration;

use pollcast::adapters::{PgPoolSettings, PostgresStore, SqliteStore};
use pollcast_actors::{NewPoll, PollId, PollStore};

use crate::helpers::Production;

async fn sqlite() -> (tempfile::TempDir, Arc<dyn PollStore>) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    (dir, Arc::new(SqliteStore::open(&url).await.unwrap()))
}

async fn postgres() -> Arc<dyn PollStore> {
    let db = Production::create().await;
    let settings = PgPoolSettings {
        max_connections: 4,
        acquire_timeout: Duration::from_secs(10),
        statement_timeout: Duration::from_secs(10),
    };
    let store = PostgresStore::connect(&db.database_url, settings).unwrap();
    store.migrate().await.unwrap();
    Arc::new(store)
}

async fn create_polls(store: &dyn PollStore, n: usize) -> Vec<PollId> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let poll = NewPoll {
            question: format!("Q{i}"),
            options: vec!["A".into(), "B".into()],
            settings: Default::default(),
        };
        ids.push(store.create_poll(poll).await.unwrap().id);
    }
    ids
}

/// More ids than the stores read in one statement (1,000), and some that are no poll.
async fn get_polls_reads_every_poll_among_the_ids(store: &dyn PollStore) {
    let created = create_polls(store, 1_001).await;
    let mut asked = created.clone();
    asked.extend([-1, 1_000_000]);
    let mut read = store.get_polls(&asked).await.unwrap();
    read.sort_by_key(|p| p.id);
    assert_eq!(read.iter().map(|p| p.id).collect::<Vec<_>>(), created);
    let last = read.last().unwrap();
    assert_eq!(last.question, "Q1000");
    assert_eq!(
        last.options
            .iter()
            .map(|o| o.text.as_str())
            .collect::<Vec<_>>(),
        ["A", "B"]
    );
    assert_eq!(store.get_polls(&[]).await.unwrap().len(), 0);
}

#[tokio::test]
async fn sqlite_get_polls_reads_every_poll_among_the_ids() {
    let (_dir, store) = sqlite().await;
    get_polls_reads_every_poll_among_the_ids(store.as_ref()).await;
}

#[tokio::test]
async fn postgres_get_polls_reads_every_poll_among_the_ids() {
    get_polls_reads_every_poll_among_the_ids(postgres().await.as_ref()).await;
}
