//! `GET /polls/{id}/export?format=csv|json[&data=counts|ledger]`: a poll's counts for
//! anyone who may see them, and its per-vote ledger for admins, as a download.

use std::sync::Arc;

use pollcast_actors::domain::{now_millis, rfc3339};
use pollcast_actors::{LedgerRow, Poll, PollId};
use serde::Deserialize;
use warp::filters::BoxedFilter;
use warp::http::{HeaderValue, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::error::ApiError;
use super::models::PollView;
use super::{ApiContext, is_admin, with_ctx};

/// Ledger rows per page by default, and at most (`limit`); a page is held in memory.
const LEDGER_PAGE: i64 = 100_000;
const LEDGER_PAGE_MAX: i64 = 1_000_000;

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
enum Format {
    #[default]
    Json,
    Csv,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
enum Data {
    #[default]
    Counts,
    Ledger,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportQuery {
    #[serde(default)]
    format: Format,
    #[serde(default)]
    data: Data,
    /// Ledger paging: rows after this row number.
    #[serde(default)]
    after: i64,
    /// Ledger paging: rows per page.
    limit: Option<i64>,
}

pub fn routes(ctx: &ApiContext) -> BoxedFilter<(Response,)> {
    warp::path!("polls" / PollId / "export")
        .and(warp::get())
        .and(with_ctx(ctx))
        .and(is_admin(ctx))
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and_then(export)
        .boxed()
}

#[utoipa::path(get, path = "/polls/{id}/export", tag = "polls",
    params(
        ("id" = i64, Path, description = "The poll"),
        ("format" = Option<String>, Query, description = "`json` (default) or `csv`"),
        ("data" = Option<String>, Query, description = "`counts` (default) or `ledger` (admin)"),
        ("after" = Option<i64>, Query, description = "Ledger: rows after this row number"),
        ("limit" = Option<i64>, Query, description = "Ledger: rows per page"),
    ),
    responses(
        (status = 200, description = "A download: the poll with its counts, or a page of its ledger", content(
            (ExportView = "application/json"),
            (String = "text/csv"),
        )),
        (status = 401, description = "The ledger needs the admin token", body = crate::http::error::ErrorBody),
        (status = 403, description = "The poll hides its results until it closes", body = crate::http::error::ErrorBody),
        (status = 404, description = "No such poll", body = crate::http::error::ErrorBody),
        (status = 422, description = "A bad query", body = crate::http::error::ErrorBody),
    ))]
pub(super) async fn export(
    id: PollId,
    ctx: Arc<ApiContext>,
    admin: bool,
    query: String,
) -> Result<Response, Rejection> {
    let query: ExportQuery = serde_urlencoded::from_str(&query).map_err(|e| {
        ApiError::Invalid(format!(
            "bad query ({e}); use format=csv|json, data=counts|ledger, after, limit"
        ))
    })?;
    let poll = ctx
        .polls
        .get(id)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or(ApiError::PollNotFound(id))?;
    match query.data {
        Data::Counts => counts(poll, admin, query.format),
        Data::Ledger => ledger(&ctx, poll.id, admin, &query).await,
    }
}

fn counts(poll: Poll, admin: bool, format: Format) -> Result<Response, Rejection> {
    if !admin && !poll.results_visible_at(now_millis()) {
        return Err(ApiError::ResultsHidden(poll.id).into());
    }
    let id = poll.id;
    let body = match format {
        Format::Json => json(&PollView::with_counts(poll)),
        Format::Csv => {
            let mut out = csv_line(&["option_id", "option", "votes"]);
            for o in &poll.options {
                out.push_str(&csv_line(&[
                    &o.id.to_string(),
                    &o.text,
                    &o.votes.to_string(),
                ]));
            }
            out
        }
    };
    Ok(download(body, format, &format!("poll-{id}-counts")))
}

async fn ledger(
    ctx: &ApiContext,
    poll: PollId,
    admin: bool,
    query: &ExportQuery,
) -> Result<Response, Rejection> {
    if !admin {
        return Err(ApiError::Unauthorized.into());
    }
    let limit = query.limit.unwrap_or(LEDGER_PAGE);
    if !(1..=LEDGER_PAGE_MAX).contains(&limit) || query.after < 0 {
        return Err(ApiError::Invalid(format!(
            "limit must be 1 to {LEDGER_PAGE_MAX} and after not negative"
        ))
        .into());
    }
    // One more than asked: tells whether another page follows.
    let mut rows = ctx
        .polls
        .ledger(poll, query.after, limit + 1)
        .await
        .map_err(ApiError::unavailable)?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let body = match query.format {
        Format::Json => json(&rows),
        Format::Csv => ledger_csv(&rows),
    };
    let mut reply = download(body, query.format, &format!("poll-{poll}-ledger"));
    if more && let Some(last) = rows.last() {
        // Why a header: the body stays a plain array or CSV file a spreadsheet opens.
        reply
            .headers_mut()
            .insert("pollcast-next-after", HeaderValue::from(last.row));
    }
    Ok(reply)
}

fn ledger_csv(rows: &[LedgerRow]) -> String {
    let mut out = csv_line(&[
        "row",
        "user_id",
        "vote_id",
        "option_ids",
        "voted_at",
        "current",
    ]);
    for r in rows {
        let options: Vec<String> = r.option_ids.iter().map(|o| o.to_string()).collect();
        out.push_str(&csv_line(&[
            &r.row.to_string(),
            &r.user_id,
            &r.vote_id,
            &options.join(" "),
            &rfc3339(r.voted_at),
            if r.current { "true" } else { "false" },
        ]));
    }
    out
}

fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(value).expect("export serializes")
}

fn download(body: String, format: Format, name: &str) -> Response {
    let (content_type, ext) = match format {
        Format::Json => ("application/json", "json"),
        Format::Csv => ("text/csv; charset=utf-8", "csv"),
    };
    let mut reply = warp::reply::with_status(body, StatusCode::OK).into_response();
    let headers = reply.headers_mut();
    headers.insert("content-type", HeaderValue::from_static(content_type));
    let disposition = format!("attachment; filename=\"{name}.{ext}\"");
    if let Ok(value) = HeaderValue::from_str(&disposition) {
        headers.insert("content-disposition", value);
    }
    reply
}

/// One CSV record (RFC 4180). Why the apostrophe: user ids and option texts come from
/// voters and operators, and a cell starting with `=`, `+`, `-` or `@` would run as a
/// formula in the spreadsheet the export is opened in.
fn csv_line(fields: &[&str]) -> String {
    let cells: Vec<String> = fields
        .iter()
        .map(|f| {
            let f = if f.starts_with(['=', '+', '-', '@', '\t', '\r']) {
                format!("'{f}")
            } else {
                (*f).to_owned()
            };
            if f.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", f.replace('"', "\"\""))
            } else {
                f
            }
        })
        .collect();
    format!("{}\r\n", cells.join(","))
}

/// The JSON of an export: the poll with its counts (`data=counts`), or a page of its
/// ledger (`data=ledger`).
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(untagged)]
#[schema(as = Export)]
#[allow(dead_code)] // describes the export's JSON
pub enum ExportView {
    /// `data=counts`.
    Counts(PollView),
    /// `data=ledger`.
    Ledger(Vec<LedgerRowView>),
}

/// One row of a poll's ledger export (`data=ledger`): a counted ballot.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = LedgerRow)]
#[allow(dead_code)] // describes `pollcast_actors::LedgerRow`'s JSON; the core knows no OpenAPI
pub struct LedgerRowView {
    /// Position in the ledger (the paging cursor).
    row: i64,
    /// The voter.
    user_id: String,
    /// The vote's id.
    vote_id: String,
    /// The options chosen.
    option_ids: Vec<i64>,
    /// When the vote was accepted (Unix milliseconds).
    voted_at: i64,
    /// Whether this is the voter's ballot now (false: replaced by a change).
    current: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_and_formulas_defused() {
        assert_eq!(
            csv_line(&["a", "b,c", "say \"hi\""]),
            "a,\"b,c\",\"say \"\"hi\"\"\"\r\n"
        );
        assert_eq!(csv_line(&["=SUM(A1)", "-1"]), "'=SUM(A1),'-1\r\n");
    }
}
