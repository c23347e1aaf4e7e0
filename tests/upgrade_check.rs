//! Runs `examples/upgrade_check` against the `tcp_server` example (20 upgrades under
//! load and every fault scenario; 200 connections held across 5 upgrades), and in its
//! HTTP mode against `http_server` (20 upgrades under keep-alive and `Connection: close`
//! load, then with 200 idle keep-alive connections as well), with no failed connection or
//! request and nothing left behind; the tokio example's tests run it against
//! `axum_server` and `ws_server`. The full measurements (100 upgrades, release build) are
//! in the guide docs/zero-downtime.md; the fd counts it gives are checked against this
//! run's.
#![cfg(target_os = "linux")]

// The examples' harness: `lock()` and `example()` (which builds the examples once).
#[allow(dead_code)]
#[path = "util/examples.rs"]
mod util;

#[path = "util/upgrade_check.rs"]
mod upgrade_check;

#[allow(dead_code)]
#[path = "util/docs.rs"]
mod docs;

use upgrade_check::upgrade_check;
use util::example;

#[test]
fn tcp_server_upgrades_with_zero_downtime() {
    let summary = upgrade_check(&example("tcp_server"), &["--faults"]);
    assert!(summary.contains("connections "), "{summary}");
    docs_give_the_fd_counts(&summary);
}

/// The fd counts the docs give for `tcp_server` (idle, in the first and in an upgraded
/// generation) are the ones measured.
fn docs_give_the_fd_counts(summary: &str) {
    // "server fds, idle    11 in the first generation, 13 in each upgraded one"
    let measured = summary
        .lines()
        .find_map(|l| l.trim().strip_prefix("server fds, idle"))
        .unwrap_or_else(|| panic!("no fd count in the summary:\n{summary}"));
    let (first, upgraded) = measured
        .split_once(" in the first generation, ")
        .unwrap_or_else(|| panic!("unexpected fd count: {measured}"));
    let first = docs::first_number(first).expect("first generation's count");
    let upgraded = docs::first_number(upgraded).expect("upgraded generations' count");
    let mut found = 0;
    for doc in docs::docs() {
        // "| fds, idle | 13 in every upgraded generation (11 in the first, ...) |"
        for row in doc.text.lines().filter(|l| l.starts_with("| fds, idle |")) {
            found += 1;
            let claim = &row["| fds, idle |".len()..];
            let (said_upgraded, said_first) = claim
                .split_once("in every upgraded generation")
                .unwrap_or_else(|| panic!("unexpected row in {}: {row}", doc.path.display()));
            assert_eq!(
                (
                    docs::first_number(said_first),
                    docs::first_number(said_upgraded)
                ),
                (Some(first), Some(upgraded)),
                "{}: {row}\nmeasured: {measured}",
                doc.path.display()
            );
        }
    }
    if found == 0 {
        docs::not_found("tcp_server's fd count");
    }
}

/// The case: 200 connections that write a byte every 500 ms, held across 5
/// upgrades. `tcp_server` hands them to each new generation: none is reset, and the
/// next deploy (1 s later) is not refused. (Before, the old generation kept them until
/// its drain deadline, 10 s, then reset them all, and refused every deploy meanwhile.)
#[test]
fn tcp_server_hands_over_held_connections() {
    let args = ["--hold", "200", "--upgrades", "5", "--pace", "1"];
    let summary = upgrade_check(&example("tcp_server"), &args);
    assert!(summary.contains("200 TCP connections"), "{summary}");
}

/// Keep-alive clients and `Connection: close` clients; every request counts.
#[test]
fn http_server_upgrades_with_zero_failed_requests() {
    let summary = upgrade_check(&example("http_server"), &["--http"]);
    assert!(summary.contains("requests "), "{summary}");
}

/// 200 keep-alive connections idle across 20 upgrades: none closed by the server, each
/// next request answered by the new generation (the idle pool); the tokio example's
/// tests check `axum_server` likewise.
#[test]
fn http_server_keeps_idle_keep_alive_connections_across_upgrades() {
    let summary = upgrade_check(&example("http_server"), &["--http", "--idle", "200"]);
    assert!(summary.contains("idle keep-alive pool"), "{summary}");
}

/// The same pool, its requests sent around each upgrade, packed within ±10 ms of the
/// moments the old generation lets go: none fails.
#[test]
fn http_server_answers_requests_sent_around_the_handover() {
    let args = ["--http", "--idle", "200", "--probe"];
    let summary = upgrade_check(&example("http_server"), &args);
    assert!(summary.contains("idle keep-alive pool"), "{summary}");
}
