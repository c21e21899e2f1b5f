//! Joining a poll from a phone: the short link `GET /j/{id}` and its QR code
//! `GET /polls/{id}/qr.svg`, which the presenter screen shows.
//!
//! The QR code is made here, as SVG, so that a room's join code never depends on an outside
//! service and never leaves the server.

use std::sync::Arc;

use pollcast_actors::PollId;
use qrcode::QrCode;
use qrcode::render::svg;
use warp::filters::BoxedFilter;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::error::ApiError;
use super::{ApiContext, with_ctx};

/// Pixels of one QR module in the SVG's own size (it scales as a vector anyway).
const MODULE_PX: u32 = 8;

pub fn routes(ctx: &ApiContext) -> BoxedFilter<(Response,)> {
    let short = warp::path!("j" / PollId)
        .and(warp::get())
        .map(|id: PollId| {
            // The audience view of the page; a redirect keeps the printed link short.
            let mut reply = StatusCode::FOUND.into_response();
            let to = HeaderValue::from_str(&format!("/#/vote/{id}")).expect("ASCII");
            reply.headers_mut().insert(header::LOCATION, to);
            reply
        });
    let qr = warp::path!("polls" / PollId / "qr.svg")
        .and(warp::get())
        .and(warp::host::optional())
        .and(with_ctx(ctx))
        .and_then(qr_svg);
    short.or(qr).unify().boxed()
}

/// The join link of a poll: under `http.public_url` when it is set, else under the host the
/// request was sent to (what the presenter's browser shows is what the room can reach).
pub fn join_url(public_url: Option<&str>, host: Option<&str>, tls: bool, id: PollId) -> String {
    let base = match (public_url, host) {
        (Some(base), _) => base.trim_end_matches('/').to_owned(),
        (None, Some(host)) => format!("{}://{host}", if tls { "https" } else { "http" }),
        (None, None) => String::new(),
    };
    format!("{base}/j/{id}")
}

#[utoipa::path(get, path = "/polls/{id}/qr.svg", tag = "live",
    params(("id" = i64, Path, description = "The poll")),
    responses(
        (status = 200, description = "The QR code of the poll's join link `/j/{id}`", content_type = "image/svg+xml", body = String),
        (status = 404, description = "No such poll", body = crate::http::error::ErrorBody),
    ))]
pub(super) async fn qr_svg(
    id: PollId,
    host: Option<warp::host::Authority>,
    ctx: Arc<ApiContext>,
) -> Result<Response, Rejection> {
    // Only for polls that exist: the code would send a room to a 404.
    if !ctx.polls.exists(id).await.map_err(ApiError::unavailable)? {
        return Err(ApiError::PollNotFound(id).into());
    }
    let url = join_url(
        ctx.settings.public_url.as_deref(),
        host.as_ref().map(|h| h.as_str()),
        ctx.settings.tls,
        id,
    );
    let svg = render(&url);
    let mut reply = svg.into_response();
    let headers = reply.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("image/svg+xml"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(reply)
}

/// The QR code of `url` as an SVG document, carrying the URL itself in `data-join-url` so
/// that a page showing the code can print the same link under it.
pub fn render(url: &str) -> String {
    // A URL of a few dozen bytes always fits a QR code (up to 2,953 bytes); `M` error
    // correction survives a projector's glare and a phone's angle.
    let code = QrCode::with_error_correction_level(url.as_bytes(), qrcode::EcLevel::M)
        .expect("a join URL fits a QR code");
    let svg = code
        .render::<svg::Color>()
        .module_dimensions(MODULE_PX, MODULE_PX)
        .quiet_zone(true)
        .build();
    let attribute = format!("<svg data-join-url=\"{}\" ", escape_attribute(url));
    svg.replacen("<svg ", &attribute, 1)
}

fn escape_attribute(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_join_link_uses_the_public_url_else_the_requests_host() {
        assert_eq!(
            join_url(
                Some("https://polls.example.com/"),
                Some("10.0.0.5:8080"),
                false,
                7
            ),
            "https://polls.example.com/j/7"
        );
        assert_eq!(
            join_url(None, Some("10.0.0.5:8080"), false, 7),
            "http://10.0.0.5:8080/j/7"
        );
        assert_eq!(
            join_url(None, Some("polls.local"), true, 7),
            "https://polls.local/j/7"
        );
    }

    #[test]
    fn the_svg_carries_its_link_escaped() {
        let svg = render("http://x/j/1?a=\"<b>&c");
        assert!(
            svg.contains(r#"data-join-url="http://x/j/1?a=&quot;&lt;b&gt;&amp;c""#),
            "{svg}"
        );
        assert!(svg.contains("<path"), "{svg}");
    }
}
