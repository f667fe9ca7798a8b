//! End-to-end tests: the real server and agent (as libraries, on ephemeral ports), the real `cli`
//! binary, and real S3 implementations: the embedded s3s-fs store and LocalStack.

mod auth;
mod child;
mod collection_crashes;
mod collections;
mod compression;
mod config_docs;
mod crash_completion;
mod credentials;
mod download;
mod embedded_store;
mod encryption;
mod failures;
mod fetch;
mod harness;
mod holdout;
mod inventory;
mod kms;
mod part_copy;
mod protocol;
mod proxy;
mod reconnect;
mod records;
mod relay;
mod renewal;
mod replicas;
mod resilience;
mod responsive;
mod sessions;
mod sharing;
mod state;
mod tls;
mod tokens;
mod ui;
mod verification;
