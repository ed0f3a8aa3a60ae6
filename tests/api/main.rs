//! The black-box tests: one binary, one module per part of the service.
//! Each test starts the real server (in process through
//! `Application::build` on port 0, or as the `billing-mode` binary) on a
//! fresh database and talks to it as a client would. A test that runs on
//! both backends is declared once with [`helpers::backends!`] and runs as
//! two tests, `<name>::sqlite` and `<name>::postgres`.
//!
//! `tests/canary.rs` stays a binary of its own: it installs the process's
//! global tracing subscriber, which would capture every other test's logs.

mod helpers;
#[path = "../support/otlp.rs"]
mod otlp;
mod private_postgres;
mod server_process;

mod abuse;
mod adopt;
mod auth;
mod cli;
mod grpc_api;
mod ops;
mod readme;
mod seed_cases;
mod spend;
mod tls;
mod traces;
mod watch;
