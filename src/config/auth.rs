//! `[admin]` and `[voters]`: who may create and close polls, and who a voter is.

use serde::Deserialize;

use super::ConfigError;
use super::secret::Secret;

/// `[admin]` as written.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    /// Creating and closing polls needs `Authorization: Bearer <token>`. When unset, a random
    /// token is generated at start and logged once.
    pub token: Option<String>,
}

/// `[admin]`, checked.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// The admin bearer token (8+ characters); `None`: one is generated at start.
    pub token: Option<Secret>,
}

impl RawAdmin {
    /// Checks every key.
    pub(super) fn parse(self) -> Result<AdminSettings, ConfigError> {
        if self.token.as_deref().is_some_and(|t| t.len() < 8) {
            return Err(ConfigError::invalid(
                "admin.token",
                "must be at least 8 characters",
            ));
        }
        Ok(AdminSettings {
            token: self.token.map(Secret::from),
        })
    }
}

/// Where a vote's userId comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VoterIdentity {
    /// The request body's `userId` (the seed app's way; trusts the client).
    Body,
    /// A token signed by the operator's backend (`Authorization: Bearer <token>`).
    Signed,
}

/// `[voters]` as written.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawVoters {
    /// Where the userId comes from.
    pub identity: VoterIdentity,
    /// The secret shared with the backend that signs voter tokens (`signed` mode).
    pub secret: Option<String>,
}

impl Default for RawVoters {
    fn default() -> Self {
        Self {
            identity: VoterIdentity::Body,
            secret: None,
        }
    }
}

/// `[voters]`, checked: where a vote's userId comes from.
#[derive(Debug, Clone)]
pub enum VoterSettings {
    /// The request body's `userId`.
    Body,
    /// A voter token signed with this secret (32+ characters).
    Signed(Secret),
}

impl RawVoters {
    /// Checks every key (the secret only when signed identity needs it).
    pub(super) fn parse(self) -> Result<VoterSettings, ConfigError> {
        match (self.identity, self.secret) {
            (VoterIdentity::Body, _) => Ok(VoterSettings::Body),
            (VoterIdentity::Signed, Some(secret)) if secret.len() >= 32 => {
                Ok(VoterSettings::Signed(secret.into()))
            }
            (VoterIdentity::Signed, _) => Err(ConfigError::invalid(
                "voters.secret",
                "signed voter identity needs a secret of at least 32 characters",
            )),
        }
    }
}
