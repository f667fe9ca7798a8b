//! Error codes shared by the REST API, the WebSocket protocol and the upload status.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Declares [`ErrorCode`] from one list, so that its variants, [`ErrorCode::ALL`] and
/// [`ErrorCode::as_str`] cannot drift apart.
macro_rules! error_codes {
    ($($(#[$attr:meta])* $variant:ident => $wire:literal,)*) => {
        /// A stable, machine-readable error code. The REST layer maps each to an HTTP status; agents
        /// send the agent-side ones in `UploadFailed`; the upload status reports whichever ended an
        /// upload.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        pub enum ErrorCode {
            $($(#[$attr])* $variant,)*
        }

        impl ErrorCode {
            /// Every code, in declaration order (for tests and documentation checks).
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $wire,)*
                }
            }
        }
    };
}

error_codes! {
    // Operator API.
    Unauthorized => "UNAUTHORIZED",
    Forbidden => "FORBIDDEN",
    InvalidClientId => "INVALID_CLIENT_ID",
    InvalidUploadId => "INVALID_UPLOAD_ID",
    ClientNotConnected => "CLIENT_NOT_CONNECTED",
    DownloadInProgress => "DOWNLOAD_IN_PROGRESS",
    UploadNotFound => "UPLOAD_NOT_FOUND",
    UploadFinished => "UPLOAD_FINISHED",
    UploadNotCompleted => "UPLOAD_NOT_COMPLETED",
    NotFound => "NOT_FOUND",
    InvalidTokenId => "INVALID_TOKEN_ID",
    TokenNotFound => "TOKEN_NOT_FOUND",
    KeyNotFound => "KEY_NOT_FOUND",
    KeyInUse => "KEY_IN_USE",
    InvalidCollectionId => "INVALID_COLLECTION_ID",
    CollectionNotFound => "COLLECTION_NOT_FOUND",
    CollectionFinished => "COLLECTION_FINISHED",
    InvalidScheduleId => "INVALID_SCHEDULE_ID",
    ScheduleNotFound => "SCHEDULE_NOT_FOUND",
    InvalidEncoding => "INVALID_ENCODING",
    BadRequest => "BAD_REQUEST",
    TooManyConnections => "TOO_MANY_CONNECTIONS",
    Timeout => "TIMEOUT",
    Internal => "INTERNAL",
    // WebSocket protocol.
    ProtocolVersionMismatch => "PROTOCOL_VERSION_MISMATCH",
    MalformedMessage => "MALFORMED_MESSAGE",
    UnexpectedMessage => "UNEXPECTED_MESSAGE",
    ConnectionReplaced => "CONNECTION_REPLACED",
    RateLimited => "RATE_LIMITED",
    // Raised by the agent.
    FileNotFound => "FILE_NOT_FOUND",
    PermissionDenied => "PERMISSION_DENIED",
    FileReadError => "FILE_READ_ERROR",
    FileChanged => "FILE_CHANGED",
    InvalidFileName => "INVALID_FILE_NAME",
    FileNotShared => "FILE_NOT_SHARED",
    FileTooLarge => "FILE_TOO_LARGE",
    UploadHostNotAllowed => "UPLOAD_HOST_NOT_ALLOWED",
    PartUploadFailed => "PART_UPLOAD_FAILED",
    CompleteFailed => "COMPLETE_FAILED",
    // Raised by the server while an upload runs.
    AgentTimeout => "AGENT_TIMEOUT",
    Stalled => "STALLED",
    StorageError => "STORAGE_ERROR",
    VerificationFailed => "VERIFICATION_FAILED",
    ShuttingDown => "SHUTTING_DOWN",
    Cancelled => "CANCELLED",
}

/// A wire name that is no [`ErrorCode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an error code")]
pub struct UnknownErrorCode(pub String);

impl std::str::FromStr for ErrorCode {
    type Err = UnknownErrorCode;

    /// The code of a wire name, as `as_str` writes it.
    fn from_str(wire: &str) -> Result<Self, UnknownErrorCode> {
        ErrorCode::ALL
            .iter()
            .copied()
            .find(|c| c.as_str() == wire)
            .ok_or_else(|| UnknownErrorCode(wire.to_owned()))
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn as_str_matches_serde() {
        for &code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
            assert_eq!(code.as_str().parse::<ErrorCode>(), Ok(code));
        }
        assert!("NOT_A_CODE".parse::<ErrorCode>().is_err());
    }

    #[test]
    fn codes_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for &code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "{code} twice");
        }
    }
}
