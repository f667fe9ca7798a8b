//! `ApiError`: the one error type of the HTTP surface.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use shared::ErrorCode;
use shared::api::{ErrorBody, ErrorDetail, UploadState};

/// An error answered to an HTTP caller. The code decides the status; the message is meant for the
/// caller and never carries internal details (those are logged once, here).
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    state: Option<UploadState>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            state: None,
        }
    }

    /// The same error, naming the state of the upload it is about.
    pub fn with_state(mut self, state: UploadState) -> Self {
        self.state = Some(state);
        self
    }

    /// A 500 whose cause is logged but not shown.
    pub fn internal(cause: &anyhow::Error) -> Self {
        tracing::error!(error = format!("{cause:#}"), "internal error");
        Self::new(ErrorCode::Internal, "internal server error")
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn state(&self) -> Option<UploadState> {
        self.state
    }

    pub fn status(&self) -> StatusCode {
        status_of(self.code)
    }
}

/// The HTTP status of each code. The match is exhaustive, so a new code gets a status on purpose.
/// Codes that only travel on the WebSocket or in an upload's status never answer a REST request;
/// they map to 500 should one ever reach it.
pub fn status_of(code: ErrorCode) -> StatusCode {
    use ErrorCode::*;
    match code {
        Unauthorized => StatusCode::UNAUTHORIZED,
        Forbidden => StatusCode::FORBIDDEN,
        InvalidClientId | InvalidUploadId | InvalidTokenId | InvalidCollectionId
        | InvalidScheduleId | InvalidEncoding | InvalidFileName | BadRequest | MalformedMessage => {
            StatusCode::BAD_REQUEST
        }
        ClientNotConnected | UploadNotFound | TokenNotFound | KeyNotFound | CollectionNotFound
        | ScheduleNotFound | NotFound => StatusCode::NOT_FOUND,
        DownloadInProgress | UploadFinished | UploadNotCompleted | KeyInUse
        | CollectionFinished => StatusCode::CONFLICT,
        ShuttingDown | TooManyConnections | Timeout => StatusCode::SERVICE_UNAVAILABLE,
        Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ProtocolVersionMismatch
        | UnexpectedMessage
        | ConnectionReplaced
        | RateLimited
        | FileNotFound
        | PermissionDenied
        | FileReadError
        | FileChanged
        | FileNotShared
        | FileTooLarge
        | UploadHostNotAllowed
        | PartUploadFailed
        | CompleteFailed
        | AgentTimeout
        | Stalled
        | StorageError
        | VerificationFailed
        | Cancelled => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
            },
            state: self.state,
        };
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row of the README's table of REST error codes gives the status the server answers.
    #[test]
    fn readme_error_table_matches_the_statuses() {
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
        let by_name: std::collections::HashMap<&str, ErrorCode> =
            ErrorCode::ALL.iter().map(|c| (c.as_str(), *c)).collect();
        let mut rows = 0;
        for line in readme.lines() {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // `| `CODE` / `CODE` | 404 | when |` splits into ["", codes, status, when, ""].
            let [_, codes, status, _, _] = cells[..] else {
                continue;
            };
            let Ok(status) = status.parse::<u16>() else {
                continue;
            };
            let names: Vec<&str> = codes.split('`').skip(1).step_by(2).collect();
            if names.is_empty() {
                continue;
            }
            for name in names {
                let code = by_name
                    .get(name)
                    .unwrap_or_else(|| panic!("README names {name}, which is no error code"));
                assert_eq!(status_of(*code).as_u16(), status, "README row for {name}");
                rows += 1;
            }
        }
        assert!(
            rows >= 10,
            "the README's error table was not found ({rows} codes)"
        );
    }
}
