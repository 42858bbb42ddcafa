//! gatehouse: one self-contained binary that gives a small app a hardened security layer
//! (device pairing, a token authority, rate limits, an audit log, automatic TLS) with all
//! state in one redb file and every secret in it sealed under a master key kept outside.
//!
//! Calls flow one way: `cli`, `http` and `admin_socket` call the domain modules
//! (`pairing`, `tokens`, `keys`, `revocation`, `devices`, `clients`,
//! `admin_tokens`, `ratelimit`, `audit`), which call `store`, the only module that touches redb.
//! `app` builds the long-lived parts from a validated `config::Config` and runs them.

mod admin_sessions;
mod admin_socket;
pub mod admin_tokens;
mod admin_users;
pub mod app;
pub mod audit;
pub mod backup;
pub mod cli;
pub mod clients;
pub mod config;
pub mod devices;
mod error_kind;
pub mod http;
pub mod ids;
pub mod jwt;
pub mod keys;
pub mod live;
mod manage;
pub mod pairing;
mod qr;
pub mod ratelimit;
pub mod revocation;
pub mod schedule;
pub mod services;
mod systemd;
mod telemetry;
pub mod tls;
pub mod tokens;

/// The injected clock (`crates/clock`).
pub use gatehouse_clock as clock;
/// The data file (`crates/store`): the only code that names redb.
pub use gatehouse_store as store;
