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
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/axum_server/main.rs");
    let source = std::fs::read_to_string(source).expect("read examples/axum_server/main.rs");
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

/// A new generation that does not know the handover format of the old one (another
/// binary deployed: here `http_server` after `axum_server`, then `axum_server` again)
/// refuses every connection it is handed, and the old generation keeps serving them, as
/// a lame duck: the next request on each is answered, by the old pid, with `Connection:
/// close`. Nothing fails.
#[test]
fn a_new_generation_refuses_connections_in_a_format_it_does_not_know() {
    use std::io::Write;
    let _lock = util::lock();
    let dir = util::TempDir::new("swap");
    let binary = dir.path().join("server");
    let install = |from: &std::path::Path| {
        let tmp = dir.path().join("server.new");
        std::fs::copy(from, &tmp).expect("copy binary");
        std::fs::rename(&tmp, &binary).expect("rename binary");
    };
    let (axum, http) = (
        example("axum_server"),
        util::example_of("tableflip", "http_server"),
    );
    install(&axum);
    let mut server = util::Server::start(&binary, &[], http_probe);
    for (next, known_by_old) in [(&http, "axum_server"), (&axum, "http_server")] {
        let old = server.current;
        let mut conn = util::connect(server.addr).unwrap();
        let mut buf = Vec::new();
        conn.write_all(util::GET).unwrap();
        let resp = util::read_response(&mut conn, &mut buf).unwrap();
        assert_eq!(util::parse_pid(&resp.body), Some(old), "{resp:?}");

        install(next);
        server.signal(old, libc::SIGHUP);
        let new = server.wait_for("a new generation to answer", |s| {
            http_probe(s.addr).ok().filter(|&pid| pid != old)
        });
        server.generations.push(new);
        server.current = new;
        // Refused by the new generation, kept by the old one.
        server.wait_for("the connection to come back", |s| {
            s.log()
                .contains(&format!("[{known_by_old} pid={old}] connection 1 stays"))
                .then_some(())
        });
        conn.write_all(util::GET).unwrap();
        let resp = util::read_response(&mut conn, &mut buf).expect("the lame duck's answer");
        assert_eq!(util::parse_pid(&resp.body), Some(old), "{resp:?}");
        assert!(resp.close, "{resp:?}");
        let status = server.wait_exit(old);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        let log = server.log();
        assert!(
            log.contains(&format!("pid={new}] handover: refusing")),
            "{log}"
        );
    }
    server.assert_drained();
    server.stop(libc::SIGTERM);
}
