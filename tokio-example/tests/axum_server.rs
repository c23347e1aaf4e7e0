//! Runs the `axum_server` example as a real process and upgrades it, with the main
//! package's harness and checks (its tests/util, included by path): the same checks as
//! the std examples get in tests/examples.rs and tests/upgrade_check.rs.
//!
//! The example is built with `cargo build -p tokio-example --examples` (util's
//! `example`), and the main package's `upgrade_check` with `cargo build -p tableflip
//! --examples` (`example_of`): cargo cannot make one package's test depend on another
//! package's example, and the nested build, which `cargo test` has mostly done already,
//! is how the main package's tests find their examples too. An example rather than a
//! binary, so that `cargo run --example axum_server` works as for every other example.
#![cfg(target_os = "linux")]

#[allow(dead_code)]
#[path = "../../tests/util/examples.rs"]
mod util;

#[allow(dead_code)]
#[path = "../../tests/util/example_checks.rs"]
mod checks;

#[path = "../../tests/util/upgrade_check.rs"]
mod upgrade_check;

use util::{example, http_probe};

/// The lame duck, on HTTP/1.1: nothing in flight or on the wire is lost.
#[test]
fn axum_server_finishes_requests_in_flight() {
    checks::finishes_requests_in_flight(&example("axum_server"));
}

#[test]
fn axum_server_upgrades_once_per_sighup_from_a_terminal() {
    checks::one_upgrade_per_sighup_from_a_terminal(&example("axum_server"), http_probe);
}

#[test]
fn axum_server_logs_say_inherited_or_new_and_the_new_pid() {
    checks::logs_say_inherited_or_new_and_the_new_pid(&example("axum_server"), http_probe);
}

#[test]
fn axum_server_answers_help_with_its_flags() {
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/axum_server.rs");
    let source = std::fs::read_to_string(source).expect("read examples/axum_server.rs");
    checks::answers_help_with_its_flags(&example("axum_server"), &source);
}

/// Keep-alive clients and `Connection: close` clients, 20 upgrades; every request counts.
#[test]
fn axum_server_upgrades_with_zero_failed_requests() {
    let summary = upgrade_check::upgrade_check(&example("axum_server"), &["--http"]);
    assert!(summary.contains("requests "), "{summary}");
}
