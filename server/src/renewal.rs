//! Agent tokens that renew themselves. Stores sit behind NAT for years, and a token that
//! expires means a visit to the store; so while an agent is connected, the server hands it a
//! fresh token once its current one is past half the configured lifetime (`AGENT_TOKEN_TTL_SECS`).
//! A store installed with a short-lived token is renewed at its first connection.
//!
//! Only agents of protocol [`TOKEN_RENEWAL_SINCE`] or later are sent a token; older ones keep
//! theirs, and the server warns when one of them is close to expiry.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use shared::ClientId;
use shared::auth::{Role, unix_now};
use shared::protocol::{ServerMessage, TOKEN_RENEWAL_SINCE};
use tokio::time::Instant;

use crate::registry::{HeldToken, TokenIds};
use crate::tokens::Tokens;

/// A token closer than this to its expiry is reported (`/metrics`, the log).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);
/// The ledger's `issued_by` of a renewed token.
pub const RENEWAL_ISSUER: &str = "renewal";

/// The token of one agent connection, and how to replace it. Owned by the connection's writer.
pub struct Renewal {
    tokens: Arc<Tokens>,
    client_id: ClientId,
    ttl: Duration,
    /// After a key rotation, the token is replaced at a random moment within this.
    spread: Duration,
    held: Arc<HeldToken>,
    /// When a token signed by a key other than the active one is replaced.
    rekey_at: Option<Instant>,
}

impl Renewal {
    /// `None` for an agent too old to accept a token: it keeps the one it has.
    pub fn for_agent(
        tokens: Arc<Tokens>,
        client_id: ClientId,
        protocol_version: u32,
        (ttl, spread): (Duration, Duration),
        held: Arc<HeldToken>,
    ) -> Option<Self> {
        (protocol_version >= TOKEN_RENEWAL_SINCE).then_some(Self {
            tokens,
            client_id,
            ttl,
            spread,
            held,
            rekey_at: None,
        })
    }

    /// How long until the current token is due: once less than half the lifetime is left, or
    /// (within the spread) once it is signed by a key that is no longer the active one.
    pub fn due_in(&mut self) -> Duration {
        let held = self.held.get();
        let by_age = due_in(held.expires_at, unix_now(), self.ttl);
        if held.kid.as_deref() == Some(self.tokens.active_kid().as_str()) {
            self.rekey_at = None;
            return by_age;
        }
        let spread = self.spread;
        let at = *self.rekey_at.get_or_insert_with(|| {
            Instant::now() + rand::thread_rng().gen_range(Duration::ZERO..=spread)
        });
        by_age.min(at.saturating_duration_since(Instant::now()))
    }

    /// A fresh token for the agent, signed by the active key; from now on, the one the registry
    /// reports.
    pub fn renew(&mut self) -> anyhow::Result<ServerMessage> {
        let minted = self.tokens.mint(
            self.client_id.as_str(),
            Role::Agent,
            self.ttl,
            RENEWAL_ISSUER,
        )?;
        let entry = minted.entry;
        self.held.replace(TokenIds {
            jti: Some(entry.jti.clone()),
            kid: Some(entry.kid.clone()),
            expires_at: entry.expires_at,
        });
        self.rekey_at = None;
        tracing::info!(
            client_id = %self.client_id,
            expires_at = entry.expires_at,
            jti = entry.jti,
            kid = entry.kid,
            "agent token renewed"
        );
        Ok(ServerMessage::TokenRenewed {
            token: minted.token,
            expires_at: entry.expires_at,
        })
    }
}

/// Time until a token expiring at `exp` (unix seconds) is past half of `ttl`, from `now`.
fn due_in(exp: u64, now: u64, ttl: Duration) -> Duration {
    let renew_at = exp.saturating_sub(ttl.as_secs() / 2);
    Duration::from_secs(renew_at.saturating_sub(now))
}

/// Logs a warning for a connecting agent whose token expires within [`EXPIRY_WARNING`] and will
/// not be renewed now.
pub fn warn_if_expiring(client_id: &ClientId, protocol_version: u32, exp: u64, renews_now: bool) {
    let left = exp.saturating_sub(unix_now());
    if renews_now || left > EXPIRY_WARNING.as_secs() {
        return;
    }
    if protocol_version >= TOKEN_RENEWAL_SINCE {
        tracing::warn!(%client_id, expires_in_secs = left, "agent token expires soon");
    } else {
        tracing::warn!(
            %client_id,
            expires_in_secs = left,
            protocol_version,
            "agent token expires soon and this agent is too old to be sent a new one: upgrade it or install a new token"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_due_past_half_its_lifetime() {
        let day = 24 * 3600;
        let ttl = Duration::from_secs(30 * day);
        let now = 1_000_000_000;
        // Fresh: due in 15 days.
        assert_eq!(
            due_in(now + 30 * day, now, ttl),
            Duration::from_secs(15 * day)
        );
        // Past half: due now.
        assert_eq!(due_in(now + 10 * day, now, ttl), Duration::ZERO);
        // An install token of 7 days: renewed at the first connection.
        assert_eq!(due_in(now + 7 * day, now, ttl), Duration::ZERO);
        // Already expired (within the leeway): due now.
        assert_eq!(due_in(now - 5, now, ttl), Duration::ZERO);
    }

    fn tokens(dir: &std::path::Path) -> Arc<Tokens> {
        Arc::new(
            Tokens::open(
                &dir.join("keys.json"),
                &crate::db::Location::Sqlite(dir.join("b.db")),
                None,
            )
            .unwrap(),
        )
    }

    #[test]
    fn only_agents_that_accept_a_token_are_sent_one() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = tokens(dir.path());
        let id = ClientId::parse("store-1").unwrap();
        let held = Arc::new(HeldToken::new(TokenIds {
            jti: None,
            kid: Some(tokens.active_kid()),
            expires_at: unix_now() + 1,
        }));
        let times = (Duration::from_secs(3600), Duration::ZERO);
        assert!(
            Renewal::for_agent(tokens.clone(), id.clone(), 3, times, held.clone()).is_none(),
            "protocol 3 agents do not know the message"
        );
        let mut renewal =
            Renewal::for_agent(tokens.clone(), id, TOKEN_RENEWAL_SINCE, times, held.clone())
                .expect("protocol 4 agents are renewed");
        assert_eq!(renewal.due_in(), Duration::ZERO);
        let ServerMessage::TokenRenewed { token, expires_at } = renewal.renew().unwrap() else {
            panic!("a renewal is a token_renewed");
        };
        let claims = tokens.verify(&token).unwrap().claims;
        assert_eq!(claims.sub, "store-1");
        assert_eq!(claims.role, Role::Agent);
        assert_eq!(claims.exp, expires_at);
        assert_eq!(held.expires_at(), expires_at);
        assert!(renewal.due_in() >= Duration::from_secs(1799));

        // A rotation makes the token due (at once, with no spread), whatever its age.
        let new_kid = tokens.rotate().unwrap();
        assert_eq!(renewal.due_in(), Duration::ZERO);
        renewal.renew().unwrap();
        assert_eq!(held.get().kid.as_deref(), Some(new_kid.as_str()));
        assert!(renewal.due_in() >= Duration::from_secs(1799));
    }
}
