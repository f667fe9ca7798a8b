//! Error codes shared by the REST API, the WebSocket protocol and the upload status.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A stable, machine-readable error code. The REST layer maps each to an HTTP status; agents send
/// the agent-side ones in `UploadFailed`; the upload status reports whichever ended an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    // Operator API.
    Unauthorized,
    Forbidden,
    InvalidClientId,
    InvalidUploadId,
    ClientNotConnected,
    DownloadInProgress,
    UploadNotFound,
    UploadFinished,
    NotFound,
    BadRequest,
    PayloadTooLarge,
    TooManyConnections,
    Timeout,
    Internal,
    // WebSocket protocol.
    ProtocolVersionMismatch,
    MalformedMessage,
    UnexpectedMessage,
    ConnectionReplaced,
    RateLimited,
    // Raised by the agent.
    FileNotFound,
    PermissionDenied,
    FileReadError,
    FileChanged,
    InvalidFileName,
    FileNotShared,
    FileTooLarge,
    UploadHostNotAllowed,
    PartUploadFailed,
    CompleteFailed,
    // Raised by the server while an upload runs.
    AgentDisconnected,
    AgentTimeout,
    Stalled,
    StorageError,
    VerificationFailed,
    ShuttingDown,
    Cancelled,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            Unauthorized => "UNAUTHORIZED",
            Forbidden => "FORBIDDEN",
            InvalidClientId => "INVALID_CLIENT_ID",
            InvalidUploadId => "INVALID_UPLOAD_ID",
            ClientNotConnected => "CLIENT_NOT_CONNECTED",
            DownloadInProgress => "DOWNLOAD_IN_PROGRESS",
            UploadNotFound => "UPLOAD_NOT_FOUND",
            UploadFinished => "UPLOAD_FINISHED",
            NotFound => "NOT_FOUND",
            BadRequest => "BAD_REQUEST",
            PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            TooManyConnections => "TOO_MANY_CONNECTIONS",
            Timeout => "TIMEOUT",
            Internal => "INTERNAL",
            ProtocolVersionMismatch => "PROTOCOL_VERSION_MISMATCH",
            MalformedMessage => "MALFORMED_MESSAGE",
            UnexpectedMessage => "UNEXPECTED_MESSAGE",
            ConnectionReplaced => "CONNECTION_REPLACED",
            RateLimited => "RATE_LIMITED",
            FileNotFound => "FILE_NOT_FOUND",
            PermissionDenied => "PERMISSION_DENIED",
            FileReadError => "FILE_READ_ERROR",
            FileChanged => "FILE_CHANGED",
            InvalidFileName => "INVALID_FILE_NAME",
            FileNotShared => "FILE_NOT_SHARED",
            UploadHostNotAllowed => "UPLOAD_HOST_NOT_ALLOWED",
            FileTooLarge => "FILE_TOO_LARGE",
            PartUploadFailed => "PART_UPLOAD_FAILED",
            CompleteFailed => "COMPLETE_FAILED",
            AgentDisconnected => "AGENT_DISCONNECTED",
            AgentTimeout => "AGENT_TIMEOUT",
            Stalled => "STALLED",
            StorageError => "STORAGE_ERROR",
            VerificationFailed => "VERIFICATION_FAILED",
            ShuttingDown => "SHUTTING_DOWN",
            Cancelled => "CANCELLED",
        }
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
        use ErrorCode::*;
        for code in [
            Unauthorized,
            Forbidden,
            InvalidClientId,
            InvalidUploadId,
            ClientNotConnected,
            DownloadInProgress,
            UploadNotFound,
            NotFound,
            BadRequest,
            PayloadTooLarge,
            TooManyConnections,
            Internal,
            ProtocolVersionMismatch,
            MalformedMessage,
            UnexpectedMessage,
            ConnectionReplaced,
            FileNotFound,
            PermissionDenied,
            FileReadError,
            FileChanged,
            InvalidFileName,
            FileTooLarge,
            PartUploadFailed,
            CompleteFailed,
            AgentDisconnected,
            AgentTimeout,
            Stalled,
            StorageError,
            VerificationFailed,
            ShuttingDown,
            Cancelled,
        ] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }
}
