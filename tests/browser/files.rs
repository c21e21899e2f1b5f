//! The page's files over HTTP: what a browser needs to accept them under the policy.

use crate::helpers::{Backend, TestApp};

const POLICY: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; \
                      style-src 'self'; script-src 'self'; frame-ancestors 'none'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_files_are_served_with_their_types_no_cache_and_a_strict_policy() {
    let app = TestApp::spawn(Backend::Embedded).await;
    for (path, content_type, marker) in [
        (
            "/",
            "text/html; charset=utf-8",
            "<script src=\"/app.js\" defer></script>",
        ),
        (
            "/app.js",
            "text/javascript; charset=utf-8",
            "\"use strict\";",
        ),
        ("/app.css", "text/css; charset=utf-8", ".bar-fill"),
    ] {
        let response = app.api.http.get(app.api.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(header("content-type"), content_type, "{path}");
        assert_eq!(header("cache-control"), "no-cache", "{path}");
        assert_eq!(header("content-security-policy"), POLICY, "{path}");
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        let body = response.text().await.unwrap();
        assert!(body.contains(marker), "{path} lacks {marker:?}");
    }
    // The page does not shadow the API: unknown paths are still JSON 404s.
    let (status, body) = app.api.get("/app.js/more").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "not_found", "{body}");
}
