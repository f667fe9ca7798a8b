//! Agent tokens that renew themselves. Stores sit behind NAT for years, and a token that
//! expires means a visit to the store; so while an agent is connected, the server hands it a
//! fresh token once its current one is past half the configured lifetime (`AGENT_TOKEN_TTL_SECS`).
//! A store installed with a short-lived token is renewed at its first connection.
//!
//! Only agents of protocol [`TOKEN_RENEWAL_SINCE`] or later are sent a token; older ones keep
//! theirs, and the server warns when one of them is close to expiry.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use shared::ClientId;
use shared::auth::{AuthError, Role, TokenKeys, unix_now};
use shared::protocol::{ServerMessage, TOKEN_RENEWAL_SINCE};

/// A token closer than this to its expiry is reported (`/metrics`, the log).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);

/// The token of one agent connection: when it expires, shared with the registry so operators
/// see it, and how to replace it.
pub struct Renewal {
    keys: TokenKeys,
    client_id: ClientId,
    ttl: Duration,
    expires_at: Arc<AtomicU64>,
}

impl Renewal {
    /// `None` for an agent too old to accept a token: it keeps the one it has.
    pub fn for_agent(
        keys: TokenKeys,
        client_id: ClientId,
        protocol_version: u32,
        ttl: Duration,
        expires_at: Arc<AtomicU64>,
    ) -> Option<Self> {
        (protocol_version >= TOKEN_RENEWAL_SINCE).then_some(Self {
            keys,
            client_id,
            ttl,
            expires_at,
        })
    }

    /// How long until the current token is due: once less than half the lifetime is left.
    pub fn due_in(&self) -> Duration {
        due_in(
            self.expires_at.load(Ordering::Relaxed),
            unix_now(),
            self.ttl,
        )
    }

    /// A fresh token for the agent; from now on, the one the registry reports.
    pub fn renew(&self) -> Result<ServerMessage, AuthError> {
        let (token, claims) = self
            .keys
            .mint(self.client_id.as_str(), Role::Agent, self.ttl)?;
        self.expires_at.store(claims.exp, Ordering::Relaxed);
        tracing::info!(
            client_id = %self.client_id,
            expires_at = claims.exp,
            jti = claims.jti.as_deref().unwrap_or_default(),
            "agent token renewed"
        );
        Ok(ServerMessage::TokenRenewed {
            token,
            expires_at: claims.exp,
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

    #[test]
    fn only_agents_that_accept_a_token_are_sent_one() {
        let keys = TokenKeys::new(b"0123456789abcdef0123456789abcdef").unwrap();
        let id = ClientId::parse("store-1").unwrap();
        let exp = Arc::new(AtomicU64::new(unix_now() + 1));
        let ttl = Duration::from_secs(3600);
        assert!(
            Renewal::for_agent(keys.clone(), id.clone(), 3, ttl, exp.clone()).is_none(),
            "protocol 3 agents do not know the message"
        );
        let renewal = Renewal::for_agent(keys.clone(), id, TOKEN_RENEWAL_SINCE, ttl, exp.clone())
            .expect("protocol 4 agents are renewed");
        assert_eq!(renewal.due_in(), Duration::ZERO);
        let ServerMessage::TokenRenewed { token, expires_at } = renewal.renew().unwrap() else {
            panic!("a renewal is a token_renewed");
        };
        let claims = keys.verify(&token).unwrap();
        assert_eq!(claims.sub, "store-1");
        assert_eq!(claims.role, Role::Agent);
        assert_eq!(claims.exp, expires_at);
        assert_eq!(exp.load(Ordering::Relaxed), expires_at);
        assert!(renewal.due_in() >= Duration::from_secs(1799));
    }
}
