//! A collection's settings, checked where they enter: from `POST /collections`, or from a
//! schedule's template when the schedule is created (so that a firing cannot fail on them).

use std::time::Duration;

use shared::api::collections::{CollectionTemplate, CreateCollection, Target};
use shared::encoding::Compression;
use shared::protocol::DEFAULT_SHARE;
use shared::{ErrorCode, FileName};
use time::OffsetDateTime;

use super::target::Matcher;
use crate::error::ApiError;

/// A collection's expiry when none is given.
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(24 * 3600);
/// The furthest a collection's expiry may be.
pub const MAX_EXPIRY: Duration = Duration::from_secs(90 * 24 * 3600);
/// How many stores upload at once when not given.
pub const DEFAULT_MAX_CONCURRENT: u32 = 50;
/// The most stores one collection may run at once.
pub const MAX_CONCURRENT: u32 = 10_000;

fn bad(message: String) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, message)
}

/// Who is asked for what, how many at once.
#[derive(Debug, Clone)]
pub struct Checked {
    pub matcher: Matcher,
    pub share: FileName,
    pub max_concurrent: u32,
    pub compression: Compression,
}

impl Checked {
    pub fn new(
        target: Target,
        file: Option<&str>,
        max_concurrent: Option<u32>,
        compression: Option<Compression>,
    ) -> Result<Self, ApiError> {
        let matcher = Matcher::new(target).map_err(|e| bad(format!("target: {e}")))?;
        let share = FileName::parse(file.unwrap_or(DEFAULT_SHARE))
            .map_err(|e| ApiError::new(ErrorCode::InvalidFileName, format!("file: {e}")))?;
        let max_concurrent = max_concurrent.unwrap_or(DEFAULT_MAX_CONCURRENT);
        if !(1..=MAX_CONCURRENT).contains(&max_concurrent) {
            return Err(bad(format!("max_concurrent must be 1 to {MAX_CONCURRENT}")));
        }
        Ok(Self {
            matcher,
            share,
            max_concurrent,
            compression: compression.unwrap_or_default(),
        })
    }
}

impl TryFrom<&CreateCollection> for Checked {
    type Error = ApiError;

    fn try_from(req: &CreateCollection) -> Result<Self, ApiError> {
        Checked::new(
            req.target.clone(),
            req.file.as_deref(),
            req.max_concurrent,
            req.encoding,
        )
    }
}

/// An expiry given as seconds from a moment.
pub fn expires_in(secs: Option<u64>) -> Result<Duration, ApiError> {
    match secs {
        None => Ok(DEFAULT_EXPIRY),
        Some(0) => Err(bad("expires_in_secs must be at least 1".into())),
        Some(s) if s <= MAX_EXPIRY.as_secs() => Ok(Duration::from_secs(s)),
        Some(_) => Err(bad(format!(
            "expires_in_secs must be at most {}",
            MAX_EXPIRY.as_secs()
        ))),
    }
}

/// The expiry of a collection created `now`.
pub fn expiry(req: &CreateCollection, now: OffsetDateTime) -> Result<OffsetDateTime, ApiError> {
    let expires = match (req.expires_at.as_deref(), req.expires_in_secs) {
        (Some(_), Some(_)) => {
            return Err(bad("give expires_at or expires_in_secs, not both".into()));
        }
        (Some(raw), None) => {
            OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc3339)
                .map_err(|e| bad(format!("expires_at {raw:?} is not RFC 3339: {e}")))?
        }
        (None, secs) => now + expires_in(secs)?,
    };
    if expires <= now {
        return Err(bad("the expiry is not in the future".into()));
    }
    if expires - now > MAX_EXPIRY {
        return Err(bad(format!(
            "the expiry is more than {} days away",
            MAX_EXPIRY.as_secs() / 86_400
        )));
    }
    Ok(expires)
}

/// A schedule's template, checked as a collection's settings would be.
pub fn template(t: &CollectionTemplate) -> Result<(Checked, Duration), ApiError> {
    Ok((
        Checked::new(
            t.target.clone(),
            t.file.as_deref(),
            t.max_concurrent,
            t.encoding,
        )?,
        expires_in(t.expires_in_secs)?,
    ))
}
