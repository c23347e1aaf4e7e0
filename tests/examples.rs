//! Runs the examples as real processes and upgrades them under load: every connection
//! is answered, by a known generation, and every generation exits with status 0.
#![cfg(target_os = "linux")]

#[path = "util/examples.rs"]
mod util;

#[path = "util/example_checks.rs"]
mod checks;

use util::*;

/// How many upgrades each load test runs: 3, or `$TABLEFLIP_TEST_UPGRADES` (for a soak
/// test by hand).
fn upgrades() -> usize {
    std::env::var("TABLEFLIP_TEST_UPGRADES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// Upgrades `binary` several times while clients hammer it, then stops it.
fn upgrades_under_load(binary: &str, probe: Probe, clients: &[Client]) -> Stats {
    upgrades_under_load_with(binary, &[], probe, clients)
}

fn upgrades_under_load_with(
    binary: &str,
    args: &[&str],
    probe: Probe,
    clients: &[Client],
) -> Stats {
    let _lock = lock();
    let mut server = Server::start(&example(binary), args, probe);
    let load = Load::start(server.addr, clients);
    let upgrades = upgrades();
    for _ in 0..upgrades {
        // Traffic in every generation, then the switch.
        load.wait_answered(&server, 300);
        server.upgrade();
    }
    load.wait_answered(&server, 300);
    let last = server.current;
    let stats = load.finish();
    eprintln!("{binary}: generations {:?}, {stats:?}", server.generations);
    assert!(
        stats.failures.is_empty(),
        "{} failed requests: {:#?}",
        stats.failures.len(),
        stats.failures
    );
    assert!(stats.ok > 0, "no request succeeded");
    for pid in &stats.pids {
        assert!(
            server.generations.contains(pid),
            "answered by unknown pid {pid}"
        );
    }
    let log = server.log();
    assert!(!log.contains("upgrade failed"), "an upgrade failed:\n{log}");
    assert_eq!(log.matches("] ready").count(), upgrades + 1, "{log}");
    assert_eq!(server.current, last);
    server.stop(libc::SIGTERM);
    stats
}

#[test]
fn tcp_server_upgrades_under_load() {
    upgrades_under_load(
        "tcp_server",
        line_probe,
        &[probing_client::<true> as Client; 4],
    );
}

#[test]
fn thread_per_core_upgrades_under_load() {
    // Three SO_REUSEPORT listeners, on two cores: the group travels whole.
    let stats = upgrades_under_load_with(
        "thread_per_core",
        &["--workers", "3"],
        line_probe,
        &[probing_client::<true> as Client; 4],
    );
    assert!(stats.ok > 0);
}

#[test]
fn daemon_upgrades_under_load() {
    upgrades_under_load("daemon", line_probe, &[probing_client::<true> as Client; 4]);
}

#[test]
fn http_server_upgrades_under_load() {
    let stats = upgrades_under_load(
        "http_server",
        http_probe,
        &[probing_client::<false>, keep_alive_client],
    );
    // Keep-alive works, and the keep-alive client crossed the upgrades (each reconnect
    // after a `Connection: close` or an idle close moves it on).
    assert!(
        stats.max_per_conn > 1,
        "keep-alive never reused a connection"
    );
    assert!(stats.pids.len() > 1, "clients saw one generation only");
}

#[test]
fn daemon_requires_pid_file() {
    let _lock = lock();
    let out = std::process::Command::new(example("daemon"))
        .args(["--listen", "127.0.0.1:0"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run daemon");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--pid-file"), "{stderr}");
}

/// A failed upgrade is logged with its reason and the old generation keeps serving;
/// the next upgrade works. SIGINT stops it like SIGTERM.
#[test]
fn tcp_server_survives_failed_upgrades() {
    let _lock = lock();
    // Run a copy, so that the binary can be swapped like a deployment would.
    let dir = TempDir::new("bin");
    let binary = dir.path().join("tcp_server");
    let install = |from: &std::path::Path| {
        let tmp = dir.path().join("tcp_server.new");
        std::fs::copy(from, &tmp).expect("copy binary");
        std::fs::rename(&tmp, &binary).expect("rename binary");
    };
    install(&example("tcp_server"));
    let mut server = Server::start(&binary, &["--upgrade-timeout", "15"], line_probe);
    let first = server.current;

    // 1. The new binary exits before it is ready.
    let script = dir.path().join("fail.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 3\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    install(&script);
    server.signal(first, libc::SIGHUP);
    let line = server.wait_for("the failure to be logged", |s| {
        s.log()
            .lines()
            .find(|l| l.contains("upgrade failed"))
            .map(str::to_owned)
    });
    assert!(line.contains("exit status: 3"), "{line}");

    // 2. The binary is missing: the reason includes the OS error (the error's source).
    std::fs::remove_file(&binary).unwrap();
    server.signal(first, libc::SIGHUP);
    let line = server.wait_for("the second failure to be logged", |s| {
        s.log()
            .lines()
            .filter(|l| l.contains("upgrade failed"))
            .nth(1)
            .map(str::to_owned)
    });
    assert!(line.contains("No such file or directory"), "{line}");

    // Still serving, from the same process, and the pid file is unchanged.
    assert_eq!(line_probe(server.addr).expect("still answering"), first);
    server.assert_pid_file(first);

    // 3. A good binary again: the upgrade goes through.
    install(&example("tcp_server"));
    let second = server.upgrade_quietly();
    assert_ne!(second, first);
    server.stop(libc::SIGINT);
}

/// The handover of keep-alive connections (tests/util/example_checks.rs); the tokio
/// example's tests do the same.
#[test]
fn http_server_hands_over_keep_alive_connections() {
    checks::hands_over_keep_alive_connections(&example("http_server"));
}

/// `--no-handover`: the lame duck.
#[test]
fn http_server_lame_duck_finishes_requests_in_flight() {
    checks::lame_duck_finishes_requests_in_flight(&example("http_server"));
}

/// The examples that upgrade on `SIGHUP`, with the probe each answers (the tokio
/// example's tests check `axum_server` likewise).
const SIGHUP_EXAMPLES: [(&str, Probe); 4] = [
    ("tcp_server", line_probe),
    ("daemon", line_probe),
    ("thread_per_core", line_probe),
    ("http_server", http_probe),
];

/// One `kill -HUP`, one upgrade, from a terminal too (tests/util/example_checks.rs).
#[test]
fn tcp_server_upgrades_once_per_sighup_from_a_terminal() {
    checks::one_upgrade_per_sighup_from_a_terminal(&example("tcp_server"), line_probe);
}

#[test]
fn daemon_upgrades_once_per_sighup_from_a_terminal() {
    checks::one_upgrade_per_sighup_from_a_terminal(&example("daemon"), line_probe);
}

#[test]
fn thread_per_core_upgrades_once_per_sighup_from_a_terminal() {
    checks::one_upgrade_per_sighup_from_a_terminal(&example("thread_per_core"), line_probe);
}

#[test]
fn http_server_upgrades_once_per_sighup_from_a_terminal() {
    checks::one_upgrade_per_sighup_from_a_terminal(&example("http_server"), http_probe);
}

/// The log says where each generation's listener came from, and the old generation's
/// success line names the new pid.
#[test]
fn logs_say_inherited_or_new_and_the_new_pid() {
    for (name, probe) in SIGHUP_EXAMPLES {
        checks::logs_say_inherited_or_new_and_the_new_pid(&example(name), probe);
    }
}

/// A generation the keeper starts again after the serving one died takes the listener
/// the keeper held (its fd store): the log says it is inherited, as the adoption report
/// does, not "new socket".
#[test]
fn tcp_server_restarted_by_the_keeper_says_inherited() {
    let _lock = lock();
    let mut server = Server::start_with_keeper(&example("tcp_server"), &[], line_probe);
    let keeper = server.generations[0];
    let first = server.current;
    server.signal(first, libc::SIGKILL);
    let second = server.wait_for("the keeper to start another generation", |s| {
        line_probe(s.addr).ok().filter(|&pid| pid != first)
    });
    server.generations.push(second);
    // It serves before it reports ready.
    let ready = format!(" pid={second}] ready");
    let log = server.wait_for("the new generation to be ready", |s| {
        Some(s.log()).filter(|log| log.contains(&ready))
    });
    let line = |what: &str| {
        log.lines()
            .find(|l| l.contains(&format!(" pid={second}] {what}")))
            .unwrap_or_else(|| panic!("no {what:?} line from pid {second}:\n{log}"))
    };
    let listening = line("listening on");
    assert!(
        listening.contains("inherited") && !listening.contains("new socket"),
        "{listening}"
    );
    // What the adoption report said already.
    assert!(line("ready").contains("took 1 inherited fd(s)"), "{log}");
    // SIGTERM to the keeper stops the service; it exits once every process is gone.
    server.current = keeper;
    server.stop(libc::SIGTERM);
}

/// Every example answers `--help` with exit 0 and a usage naming the flags its header
/// documents, and accepts each flag the usage names.
#[test]
fn every_example_answers_help_with_its_flags() {
    let _lock = lock();
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        let (name, source) = if path.is_dir() {
            (path.file_name(), path.join("main.rs"))
        } else {
            (path.file_stem(), path.clone())
        };
        let name = name.unwrap().to_string_lossy().into_owned();
        let Ok(source) = std::fs::read_to_string(&source) else {
            continue;
        };
        seen += 1;
        checks::answers_help_with_its_flags(&example(&name), &source);
    }
    assert!(
        seen >= 6,
        "only {seen} examples found in {}",
        examples.display()
    );
}
