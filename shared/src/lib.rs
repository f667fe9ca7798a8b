//! The serialization boundary of Backhaul: everything that crosses a process boundary is defined
//! here and nowhere else. That is the WebSocket protocol between server and agent
//! ([`protocol`]), the JSON bodies of the operator REST API ([`api`]), the JWT claims and the
//! helpers that mint and check them ([`auth`]), validated identifiers ([`ids`]) and the error codes
//! callers match on ([`error`]).
//!
//! This crate deliberately has no async runtime, HTTP framework, AWS or WebSocket dependency, so
//! that the wire format can be read and changed in one place without dragging in transport
//! concerns.

pub mod api;
pub mod auth;
pub mod encoding;
pub mod error;
pub mod hash;
pub mod ids;
pub mod labels;
pub mod protocol;
pub mod sealed;

pub use error::ErrorCode;
pub use ids::{ClientId, CollectionId, FileName, IdError, PartNumber, ScheduleId, UploadId};
