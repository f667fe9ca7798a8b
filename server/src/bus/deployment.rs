//! A deployment on the NATS bus: the names it uses there (`NATS_PREFIX`), the credentials of
//! `NATS_URL`, and its identity, kept in the presence bucket so that a replica of another
//! deployment (another database) under the same prefix is refused at start rather than let the
//! two take each other's stores and commands for their own.

use anyhow::Context;
use async_nats::jetstream::kv;

/// The presence bucket's key for the deployment's identity; a store id starts with a letter or
/// a digit.
const DEPLOYMENT_KEY: &str = "_deployment";

/// A deployment's names on NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub(super) prefix: String,
    /// What the replica driving collections hears.
    pub(super) driver: String,
    /// News for every replica.
    pub(super) broadcast: String,
}

impl Names {
    /// The names under `prefix` (checked by the configuration: a subject token, and part of a
    /// bucket's name).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            driver: format!("{prefix}.collections"),
            broadcast: format!("{prefix}.broadcast"),
        }
    }

    pub(super) fn bucket(&self) -> String {
        format!("{}_presence", self.prefix)
    }

    /// Where `replica` takes its commands.
    pub(super) fn replica(&self, replica: &str) -> String {
        format!("{}.replica.{replica}", self.prefix)
    }
}

/// `options` with the user and password (`nats://user:password@host`), or the token
/// (`nats://token@host`), that `url` carries, percent-decoded: async-nats reads credentials from
/// its options only, and would connect without them.
pub(super) fn with_credentials(
    options: async_nats::ConnectOptions,
    url: &str,
) -> anyhow::Result<async_nats::ConnectOptions> {
    let addr: async_nats::ServerAddr = url.parse().context("NATS_URL is not a NATS server URL")?;
    let decoded = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|s| s.into_owned())
            .context("NATS_URL's credentials are not UTF-8 once decoded")
    };
    Ok(match (addr.username(), addr.password()) {
        (Some(user), Some(password)) => {
            options.user_and_password(decoded(user)?, decoded(password)?)
        }
        (Some(token), None) => options.token(decoded(token)?),
        (None, _) => options,
    })
}

/// Writes `deployment` into the presence bucket where it is not yet, and refuses to go on where
/// another deployment's is.
pub(super) async fn ours(
    presence: &kv::Store,
    names: &Names,
    deployment: &str,
) -> anyhow::Result<()> {
    let written = match presence
        .create(DEPLOYMENT_KEY, deployment.to_owned().into())
        .await
    {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => presence
            .get(DEPLOYMENT_KEY)
            .await
            .context("reading the deployment in the presence bucket")?,
        Err(e) => return Err(e).context("writing the deployment in the presence bucket"),
    };
    match written {
        Some(id) if id.as_ref() == deployment.as_bytes() => Ok(()),
        other => anyhow::bail!(
            "NATS_PREFIX {prefix} is in use on this NATS server by another deployment (one on \
             another database, {}; this one is {deployment}): deployments that share a NATS \
             server need a NATS_PREFIX each. If that deployment is gone for good, remove the key \
             {DEPLOYMENT_KEY} from the bucket {bucket}",
            other.map_or_else(
                || "its entry deleted".to_owned(),
                |id| String::from_utf8_lossy(&id).into_owned()
            ),
            prefix = names.prefix,
            bucket = names.bucket(),
        ),
    }
}
