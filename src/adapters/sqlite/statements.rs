//! The SQL texts of the writer's multi-row statements, made once per length, and the
//! packed rows they read back.

use std::str::FromStr;
use std::sync::LazyLock;

use pollcast_actors::StoreError;

/// Rows per multi-row INSERT or IN list (6 bound parameters per ledger row: 6000, under the
/// 32766 of the SQLite that sqlx bundles).
pub(super) const INSERT_CHUNK: usize = 1000;

/// The lengths [`sized_chunks`] cuts into, largest first; each divides the one before.
pub(super) const CHUNK_SIZES: [usize; 5] = [INSERT_CHUNK, 200, 40, 8, 1];

/// Splits `items` into runs whose lengths all come from [`CHUNK_SIZES`], largest first.
///
/// Why: a statement with a row per item has one SQL text per length, sqlx caches prepared
/// statements by text, and SQLite parses and plans every new text again. With 10,000 active
/// polls nearly every flush group had new lengths, and preparing them was a large share of
/// the embedded server's instructions (docs/BENCHMARKS.md, "Fast paths"); five lengths per
/// statement are prepared once and reused.
pub(super) fn sized_chunks<T>(items: &[T]) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        let size = *CHUNK_SIZES.iter().find(|size| **size <= rest.len())?;
        let (chunk, after) = rest.split_at(size);
        rest = after;
        Some(chunk)
    })
}

/// A statement with one group of placeholders per row, its SQL text written once for each
/// length of [`CHUNK_SIZES`]. Why not `QueryBuilder`: it wrote the same text again,
/// placeholder by placeholder, for every chunk of every flush (its cost with thousands of
/// polls per group: docs/BENCHMARKS.md, "Fast paths").
pub(super) struct RowsStatement {
    texts: [String; CHUNK_SIZES.len()],
}

impl RowsStatement {
    /// `head`, then `row` once per row separated by commas, then `tail`.
    pub(super) fn new(head: &str, row: &str, tail: &str) -> Self {
        Self {
            texts: CHUNK_SIZES.map(|rows| format!("{head}{}{tail}", vec![row; rows].join(", "))),
        }
    }

    /// The text for `rows` rows; `rows` is a length [`sized_chunks`] cuts.
    pub(super) fn sql(&self, rows: usize) -> &str {
        let i = CHUNK_SIZES
            .iter()
            .position(|size| *size == rows)
            .expect("chunks come from sized_chunks");
        &self.texts[i]
    }
}

pub(super) static INSERT_FIRST_BALLOTS: LazyLock<RowsStatement> = LazyLock::new(|| {
    RowsStatement::new(
        "INSERT INTO votes (poll_id, user_id, vote_id, choices, voted_at, current) VALUES ",
        "(?, ?, ?, ?, ?, ?)",
        " ON CONFLICT DO NOTHING",
    )
});

// The current ballots of (poll, user) pairs. Why `current`: the only index on the voter is
// `votes_one_ballot`, partial to current ballots; without it the ledger is scanned
// (`ledger_reads_use_its_indexes`).
pub(super) static CURRENT_BALLOTS: LazyLock<RowsStatement> = LazyLock::new(|| {
    RowsStatement::new(
        "SELECT poll_id, user_id, vote_id, choices FROM votes \
         WHERE current AND (poll_id, user_id) IN (VALUES ",
        "(?, ?)",
        ")",
    )
});

// Every ballot of some voters of one poll (the voters first, then the poll): the current
// ones through `votes_one_ballot`, the replaced ones through `votes_replaced`. Why two
// halves: each index holds only its half of the rows (the migration
// `0003_ledger_lean_keys` says why).
pub(super) static BALLOTS_OF_VOTERS: LazyLock<RowsStatement> = LazyLock::new(|| {
    RowsStatement::new(
        "WITH u(user_id) AS (VALUES ",
        "(?)",
        "), p(poll_id) AS (VALUES (?)) \
         SELECT user_id, vote_id, choices, current FROM votes \
         WHERE current AND poll_id = (SELECT poll_id FROM p) AND user_id IN u \
         UNION ALL \
         SELECT user_id, vote_id, choices, current FROM votes \
         WHERE NOT current AND poll_id = (SELECT poll_id FROM p) AND user_id IN u",
    )
});

pub(super) static ADD_TO_COUNTS: LazyLock<RowsStatement> = LazyLock::new(|| {
    RowsStatement::new(
        "WITH d(poll_id, id, n) AS (VALUES ",
        "(?, ?, ?)",
        ") UPDATE poll_options SET votes = votes + d.n FROM d \
         WHERE poll_options.poll_id = d.poll_id AND poll_options.id = d.id",
    )
});

pub(super) static BUMP_VERSIONS: LazyLock<RowsStatement> = LazyLock::new(|| {
    RowsStatement::new(
        "WITH d(poll_id, n) AS (VALUES ",
        "(?, ?)",
        ") UPDATE polls SET version = version + 1, voters = voters + d.n FROM d \
         WHERE polls.id = d.poll_id",
    )
});

// One row per poll: its version and its counts packed as `option:votes,…` (`packed_pairs`).
pub(super) static READ_COUNTS: LazyLock<RowsStatement> = LazyLock::new(|| {
    RowsStatement::new(
        "SELECT id, version, (SELECT group_concat(o.id || ':' || o.votes, ',') \
         FROM poll_options o WHERE o.poll_id = polls.id) FROM polls WHERE id IN (",
        "?",
        ")",
    )
});

/// Parses `a:b` pairs separated by `separator`, as the flush statements pack them with
/// `group_concat`. Why packed: sqlx hands every row from its worker thread to the flush
/// one at a time, with allocations each; with thousands of polls in a group a row per
/// option and per ballot cost more than one row per poll (docs/BENCHMARKS.md, "Fast
/// paths").
pub(super) fn packed_pairs<A: FromStr, B: FromStr>(
    text: &str,
    separator: char,
) -> Result<Vec<(A, B)>, StoreError> {
    text.split(separator)
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            pair.split_once(':')
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                .ok_or_else(|| StoreError::new("flush", format!("malformed row {pair:?}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_come_in_a_handful_of_lengths_and_cover_every_item() {
        let items: Vec<usize> = (0..2_357).collect();
        let chunks: Vec<&[usize]> = sized_chunks(&items).collect();
        let lengths: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
        assert_eq!(
            lengths,
            [1000, 1000, 200, 40, 40, 40, 8, 8, 8, 8, 1, 1, 1, 1, 1]
        );
        assert_eq!(chunks.concat(), items);
        assert_eq!(sized_chunks::<u8>(&[]).count(), 0);
    }

    #[test]
    fn statements_have_one_placeholder_group_per_row() {
        let sql = BUMP_VERSIONS.sql(8);
        assert_eq!(sql.matches("(?, ?)").count(), 8);
        assert!(sql.starts_with("WITH d(poll_id, n) AS (VALUES (?, ?), (?, ?),"));
        assert_eq!(READ_COUNTS.sql(1).matches('?').count(), 1);
    }

    #[test]
    fn packed_rows_parse_into_pairs_and_malformed_ones_are_errors() {
        assert_eq!(
            packed_pairs::<i64, String>("3:1;2:1,3", ';').unwrap(),
            [(3, "1".to_string()), (2, "1,3".to_string())]
        );
        assert_eq!(packed_pairs::<i64, i64>("", ',').unwrap(), []);
        assert!(packed_pairs::<i64, i64>("1:x", ',').is_err());
        assert!(packed_pairs::<i64, i64>("17", ',').is_err());
    }
}
