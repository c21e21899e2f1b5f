//! The live results page: `GET /`, `/app.js`, `/app.css`.
//!
//! The files are compiled into the binary so that a deployment stays one file and the page
//! can never drift from the API it was written against; there is no build step and the page
//! loads nothing from other hosts.

use warp::filters::BoxedFilter;
use warp::http::HeaderValue;
use warp::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
};
use warp::reply::Response;
use warp::{Filter, Reply};

const INDEX_HTML: &str = include_str!("page/index.html");
const APP_JS: &str = include_str!("page/app.js");
const APP_CSS: &str = include_str!("page/app.css");

/// No inline script or style and no other origin: an injected string cannot run, and the
/// admin token kept by the page cannot be sent anywhere but to this server. Why `connect-src
/// 'self'` alone: CSP Level 3 lets it match `ws:`/`wss:` to this very host, and a bare `ws:`
/// would let an injected script open a WebSocket to any host.
pub const CONTENT_SECURITY: &str = "default-src 'self'; connect-src 'self'; \
     img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'";

/// The page's three files.
pub fn routes() -> BoxedFilter<(Response,)> {
    let index = warp::path::end().map(|| asset(INDEX_HTML, "text/html; charset=utf-8"));
    let script = warp::path!("app.js").map(|| asset(APP_JS, "text/javascript; charset=utf-8"));
    let style = warp::path!("app.css").map(|| asset(APP_CSS, "text/css; charset=utf-8"));
    warp::get()
        .and(index.or(script).unify().or(style).unify())
        .boxed()
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The files change with the binary; revalidating keeps a browser from pairing a new
    // index.html with a stale app.js after an upgrade.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY),
    );
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Poll ids in the URL's fragment are not sent anyway; this keeps the path private too.
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The policy forbids these; a slip would leave the page silently broken in browsers.
    /// (Serving, types and headers are checked over HTTP in tests/browser.)
    #[test]
    fn the_page_has_no_inline_script_style_or_handler_and_loads_nothing_from_elsewhere() {
        let html = INDEX_HTML.to_ascii_lowercase();
        assert!(!html.contains("<script>"), "inline script");
        assert!(!html.contains("<style"), "inline style");
        assert!(!html.contains(" style="), "style attribute");
        let handler = html.split(" on").skip(1).any(|rest| {
            let name_len = rest.bytes().take_while(u8::is_ascii_lowercase).count();
            name_len > 0 && rest[name_len..].starts_with('=')
        });
        assert!(!handler, "inline event handler attribute");
        for attr in ["src=\"", "href=\""] {
            for rest in html.split(attr).skip(1) {
                assert!(
                    rest.starts_with('/') || rest.starts_with('#') || rest.starts_with("data:"),
                    "{attr}{} leaves the origin",
                    &rest[..rest.find('"').unwrap_or(rest.len())]
                );
            }
        }
        assert!(!APP_CSS.contains("@import") && !APP_CSS.contains("url("));
        assert!(
            !APP_JS.contains("innerHTML"),
            "text goes in with textContent"
        );
        assert!(
            !APP_JS.contains("setAttribute(\"style\""),
            "style attributes are blocked"
        );
    }
}
