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

/// HTTP/1.1 connections go to the new generation, with what was read of their next
/// request.
#[test]
fn axum_server_hands_over_keep_alive_connections() {
    checks::hands_over_keep_alive_connections(&example("axum_server"));
}

/// `--no-handover`, the lame duck, on HTTP/1.1: nothing in flight or on the wire is lost.
#[test]
fn axum_server_lame_duck_finishes_requests_in_flight() {
    checks::lame_duck_finishes_requests_in_flight(&example("axum_server"));
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

/// 200 HTTP/1.1 keep-alive connections idle across 20 upgrades: none closed by the
/// server, each next request answered by the new generation (upgrade_check's idle pool).
#[test]
fn axum_server_keeps_idle_keep_alive_connections_across_upgrades() {
    let summary =
        upgrade_check::upgrade_check(&example("axum_server"), &["--http", "--idle", "200"]);
    assert!(summary.contains("idle keep-alive pool"), "{summary}");
}

/// The same pool, its requests sent around each upgrade, packed within ±10 ms of the
/// moments the old generation lets go: none fails.
#[test]
fn axum_server_answers_requests_sent_around_the_handover() {
    let args = ["--http", "--idle", "200", "--probe"];
    let summary = upgrade_check::upgrade_check(&example("axum_server"), &args);
    assert!(summary.contains("idle keep-alive pool"), "{summary}");
}

/// HTTP/2 (h2c): 32 connections × 10 streams (`h2_check`), an upgrade every 250 ms. The
/// client opens a new connection on `GOAWAY` and never sends a request again: none
/// fails, not even one it had opened just before it saw the `GOAWAY`.
#[test]
fn axum_server_http2_upgrades_with_zero_failed_requests() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let _lock = util::lock();
    let mut server = util::Server::start(&example("axum_server"), &[], http_probe);
    let mut client = Command::new(example("h2_check"))
        .args(["--addr", &server.addr.to_string(), "--seconds", "120"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start h2_check");
    std::thread::sleep(Duration::from_millis(500));
    let upgrades = 20;
    for _ in 0..upgrades {
        let started = Instant::now();
        server.upgrade();
        std::thread::sleep(Duration::from_millis(250).saturating_sub(started.elapsed()));
    }
    drop(client.stdin.take()); // the end
    let mut summary = String::new();
    client
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut summary)
        .unwrap();
    assert!(client.wait().unwrap().success(), "{summary}");
    eprintln!("{summary}");
    // "  requests     706943 answered, 0 failed (...)"
    let requests = summary
        .lines()
        .find_map(|l| l.trim().strip_prefix("requests"))
        .unwrap_or_else(|| panic!("no count of requests:\n{summary}"));
    let (answered, failed) = requests.split_once(" answered, ").unwrap();
    assert!(answered.trim().parse::<u64>().unwrap() > 0, "{summary}");
    assert!(failed.starts_with("0 failed"), "{summary}");
    assert!(!summary.contains("connect error"), "{summary}");
    // Every generation served: the clients moved on at each upgrade.
    let pids = summary
        .lines()
        .find_map(|l| l.trim().strip_prefix("pids"))
        .and_then(|p| p.split_whitespace().next()?.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no count of pids:\n{summary}"));
    assert!(pids > upgrades, "{summary}");
    server.stop(libc::SIGTERM);
}
