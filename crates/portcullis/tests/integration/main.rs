//! End-to-end tests: real TCP on loopback, real rustls handshakes with certificates minted in
//! code, real Cedar evaluation, the real configuration loader. One test binary, one harness.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]
#![allow(unreachable_pub, reason = "a test binary has no public API")]

mod harness;

mod abuse;
mod analyze;
mod approval;
mod audit;
mod boundary;
mod config;
mod credentials;
mod delegation;
mod forwarding;
mod handshake;
mod live_identity;
mod policy;
mod policy_tools;
mod protocols;
mod python_clients;
mod telemetry;
mod webhook;
mod workload_api;
