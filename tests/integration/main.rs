//! gatehouse's integration tests: one test binary (one link step), one module per area.
//!
//! `helpers::spawn_app()` starts a server in-process on a temporary data file, port 0
//! and a fixed clock; `binary` starts the compiled `gatehouse` and talks to it as a user
//! would.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// A test harness reads `CI`, a tool's path and the real time (certificates from a real
// CA); clippy.toml keeps those reads out of gatehouse itself.
#![allow(clippy::disallowed_methods)]
// Helpers are `pub` for the other test modules; the test binary exports nothing.
#![allow(unreachable_pub)]

mod acme;
mod acme_cluster;
mod admin_ui;
mod admin_users;
mod audit;
mod authz;
mod binary;
mod cli;
mod cluster;
mod contract;
mod device_grants;
mod devices;
mod docs;
mod dpop;
mod fixtures;
mod front;
mod front_failures;
mod helpers;
mod http;
mod interop;
mod jwt_negative;
mod layers;
mod lockout;
mod pebble;
mod postgres;
mod postgres_store;
mod proxy;
mod ratelimit;
mod restore;
mod routes;
mod schedule;
mod sessions;
mod status_list;
mod store;
mod systemd;
mod test_ca;
mod tls;
mod tokens;
mod ws;
