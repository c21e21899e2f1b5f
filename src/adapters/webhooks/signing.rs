//! Signing: `X-Pollcast-Signature`, an HMAC-SHA256 of the timestamp and the body under the
//! poll's secret, so a receiver knows the event is from pollcast and fresh.

use std::fmt::Write as _;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A poll's signing key, made once from its secret.
pub(super) type HmacSha256 = Hmac<Sha256>;

/// The `X-Pollcast-Signature` value of `body` sent at `timestamp` (unix seconds):
/// `t=<timestamp>,v1=<lowercase hex HMAC-SHA256(key, "<timestamp>.<body>")>`.
pub(super) fn signature(key: &HmacSha256, timestamp: u64, body: &[u8]) -> String {
    let mut mac = key.clone();
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut header = format!("t={timestamp},v1=");
    for byte in digest {
        let _ = write!(header, "{byte:02x}");
    }
    header
}

pub(super) fn hmac_key(secret: &str) -> HmacSha256 {
    HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_an_independent_hmac() {
        // python3 -c 'import hmac; print(hmac.new(b"whsec-test",
        //   b"1700000000.{\"id\":\"1-poll.closed-7\"}", "sha256").hexdigest())'
        let body = br#"{"id":"1-poll.closed-7"}"#;
        assert_eq!(
            signature(&hmac_key("whsec-test"), 1_700_000_000, body),
            "t=1700000000,v1=618d7d3daea20a3d123ccc7ffc64b270f74e12e2c693662673162be578a46ede"
        );
        // The timestamp is signed too: a replay cannot move it.
        assert_eq!(
            signature(&hmac_key("whsec-test"), 1_700_000_001, body),
            "t=1700000001,v1=12672ad4c6b5345d3f1cd9c6ba6467c4b943f788dd29c1df64f696a04e523f9e"
        );
    }
}
