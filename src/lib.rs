//! gatehouse: one self-contained binary that gives a small app a hardened security layer
//! (device pairing, a token authority, rate limits, an audit log, automatic TLS) with all
//! state in one data file and every secret in it sealed under a master key kept outside.
//!
//! Calls flow one way: the edges (`cli`, `http`, `admin_socket`, `app`) call the wiring
//! (`services`, `schedule`), which calls the domain modules (`pairing`, `tokens`, `keys`,
//! …), which call the store (`crates/store`, the only code that names redb).
//! `docs/ARCHITECTURE.md` is the map; `tests/integration/layers.rs` checks it.
//!
//! Everything is `pub(crate)` unless another crate needs it (lint `unreachable_pub`).
//! What the library exports, and for whom:
//!
//! - `cli::main`, for the `gatehouse` binary;
//! - the layers the integration tests, benches and fuzz targets drive directly: `app`
//!   (start and stop a server), `config`, `services` and the domain modules they hold,
//!   `http` (the router), `schedule`, `backup`, and the leaves `ids`, `jwt`, `dpop`, `clock` and
//!   `store`.
//!
//! Within each exported module only the items those callers use are `pub`.

// The edges: command line, HTTP, the admin socket, process start and stop.
mod admin_socket;
pub mod app;
pub mod cli;
mod front;
pub mod http;
mod manage;
mod systemd;
mod telemetry;

// The wiring: the services of one instance, and the scheduled and background work.
pub mod schedule;
pub mod services;
mod status;

// The domain.
mod admin_sessions;
pub mod admin_tokens;
mod admin_users;
pub mod audit;
pub mod backup;
pub mod clients;
pub mod device_grants;
pub mod devices;
pub mod keys;
pub mod live;
pub mod pairing;
pub mod ratelimit;
pub mod revocation;
pub mod status_list;
pub mod tls;
pub mod tokens;

// The leaves.
pub mod config;
pub mod dpop;
mod error_kind;
pub mod ids;
pub mod jwt;
mod qr;

/// The injected clock (`crates/clock`).
pub use gatehouse_clock as clock;
/// The data file (`crates/store`): the only code that names redb.
pub use gatehouse_store as store;
