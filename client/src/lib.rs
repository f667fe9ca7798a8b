//! The Backhaul store agent. It dials out to the server over one WebSocket (so it works behind
//! NAT and firewalls), authenticates with its own JWT, and when asked uploads its shared file
//! straight to S3 through presigned URLs. It never holds AWS credentials.
//!
//! [`run`] is the entry point: a reconnect loop that returns only on shutdown.

pub mod agent;
pub mod backoff;
pub mod config;
pub mod config_file;
pub mod connection;
mod session;
pub mod store_keys;
pub mod token;
pub mod uploader;

pub use agent::run;
pub use config::Config;
