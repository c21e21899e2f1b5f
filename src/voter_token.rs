//! Signed voter identity: the operator's backend, which knows who its users are, issues each
//! voter a token; pollcast takes the userId from a token whose signature and expiry check out,
//! so voters cannot vote as someone else by editing a request body.
//!
//! Format (all ASCII, URL-safe): `v1.<base64url(userId)>.<expires, unix seconds>.<base64url(
//! HMAC-SHA256(secret, "v1.<base64url(userId)>.<expires>"))>`, base64url without padding.
//! For example, in Python:
//!
//! ```text
//! b = lambda x: base64.urlsafe_b64encode(x).rstrip(b"=").decode()
//! body = f"v1.{b(user.encode())}.{int(time.time()) + 3600}"
//! token = body + "." + b(hmac.new(secret, body.encode(), "sha256").digest())
//! ```

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token of this format.
    #[error("malformed voter token")]
    Malformed,
    /// Signed with another secret, or altered.
    #[error("voter token signature does not match")]
    BadSignature,
    /// Past its expiry.
    #[error("voter token expired")]
    Expired,
}

/// Issues and verifies voter tokens with one shared secret.
#[derive(Clone)]
pub struct VoterTokens {
    key: HmacSha256,
}

impl VoterTokens {
    /// Tokens signed with `secret`.
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length"),
        }
    }

    /// A token for `user`, valid until `expires_at` (unix seconds).
    pub fn issue(&self, user: &str, expires_at: u64) -> String {
        let body = format!("v1.{}.{expires_at}", URL_SAFE_NO_PAD.encode(user));
        let mut mac = self.key.clone();
        mac.update(body.as_bytes());
        format!(
            "{body}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        )
    }

    /// The userId of a valid token at time `now` (unix seconds).
    pub fn verify(&self, token: &str, now: u64) -> Result<String, TokenError> {
        let (body, signature) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let mut parts = body.split('.');
        let (Some("v1"), Some(user), Some(expires), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Malformed)?;
        let mut mac = self.key.clone();
        mac.update(body.as_bytes());
        // verify_slice compares in constant time.
        mac.verify_slice(&signature)
            .map_err(|_| TokenError::BadSignature)?;
        let expires: u64 = expires.parse().map_err(|_| TokenError::Malformed)?;
        if expires <= now {
            return Err(TokenError::Expired);
        }
        let user = URL_SAFE_NO_PAD
            .decode(user)
            .map_err(|_| TokenError::Malformed)?;
        String::from_utf8(user).map_err(|_| TokenError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> VoterTokens {
        VoterTokens::new(b"a-shared-secret-of-the-operator-backend")
    }

    #[test]
    fn an_issued_token_names_its_user_until_it_expires() {
        let token = tokens().issue("u-17 ünïcode", 2000);
        assert_eq!(tokens().verify(&token, 1999).unwrap(), "u-17 ünïcode");
        assert_eq!(tokens().verify(&token, 2000), Err(TokenError::Expired));
    }

    #[test]
    fn a_token_signed_with_another_secret_or_altered_is_refused() {
        let forged = VoterTokens::new(b"guess").issue("admin", 2000);
        assert_eq!(tokens().verify(&forged, 1), Err(TokenError::BadSignature));
        let token = tokens().issue("alice", 2000);
        let (_, sig) = token.rsplit_once('.').unwrap();
        let as_bob = format!("v1.{}.2000.{sig}", URL_SAFE_NO_PAD.encode("bob"));
        assert_eq!(tokens().verify(&as_bob, 1), Err(TokenError::BadSignature));
        let later = token.replace(".2000.", ".9999.");
        assert_eq!(tokens().verify(&later, 1), Err(TokenError::BadSignature));
    }

    #[test]
    fn garbage_is_malformed() {
        for junk in [
            "",
            "v1",
            "v1.a.b",
            "v2.YQ.2000.sig",
            "v1.YQ.2000.!!!",
            "v1.YQ.x.y.z",
        ] {
            assert_eq!(
                tokens().verify(junk, 1),
                Err(TokenError::Malformed),
                "{junk:?}"
            );
        }
    }
}
