//! Values that must not reach a log: secrets, and URLs that may carry a password.

use std::fmt;
use std::sync::Arc;

/// A secret (a token, a signing key). Its Debug output never shows it: read it with
/// [`Secret::expose`] where it is used, and nowhere else. Cloning is cheap.
#[derive(Clone)]
pub struct Secret(Arc<str>);

impl Secret {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(secret: String) -> Self {
        Self(secret.into())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The URL of a service, which may name a password (`postgres://user:password@host/db`):
/// Debug and Display show it with the password masked. [`ServiceUrl::expose`] gives the
/// URL itself, for the client that connects.
#[derive(Clone)]
pub struct ServiceUrl(String);

impl ServiceUrl {
    /// The URL, password included.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for ServiceUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl fmt::Display for ServiceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl fmt::Debug for ServiceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&redact_url(&self.0), f)
    }
}

/// A URL with its password masked, for logs, errors and debug output.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!("{}:***{}", &url[..scheme + 3 + colon], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}
