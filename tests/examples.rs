//! Runs the examples as real processes and upgrades them under load: every connection
//! is answered, by a known generation, and every generation exits with status 0.
#![cfg(target_os = "linux")]

#[path = "util/examples.rs"]
mod util;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

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

/// After the upgrade the old generation is a lame duck: a request on a keep-alive
/// connection that was idle is answered, with `Connection: close`; a request in flight
/// across the upgrade gets its whole response, with `Connection: close`; a connection
/// that stays idle is closed at the end of the lame-duck phase, without a response.
#[test]
fn http_server_finishes_requests_in_flight() {
    finishes_requests_in_flight("http_server");
}

/// The same with axum, tokio and hyper, on HTTP/1.1.
#[test]
fn axum_server_finishes_requests_in_flight() {
    finishes_requests_in_flight("axum_server");
}

fn finishes_requests_in_flight(binary: &str) {
    let _lock = lock();
    let args = ["--lame-duck", "0.5"];
    let mut server = Server::start(&example(binary), &args, http_probe);
    let first = server.current;

    let mut idle = connect(server.addr).unwrap();
    let mut lame = connect(server.addr).unwrap();
    let mut in_flight = connect(server.addr).unwrap();
    let (mut idle_buf, mut lame_buf, mut flight_buf) = (Vec::new(), Vec::new(), Vec::new());
    for (conn, buf) in [
        (&mut idle, &mut idle_buf),
        (&mut lame, &mut lame_buf),
        (&mut in_flight, &mut flight_buf),
    ] {
        conn.write_all(GET).unwrap();
        let resp = read_response(conn, buf).unwrap();
        assert_eq!(parse_pid(&resp.body), Some(first), "{resp:?}");
        assert!(!resp.close, "{resp:?}");
    }
    // Half a request: the old generation has started reading it.
    in_flight
        .write_all(b"GET /slow HTTP/1.1\r\nHost: test\r\n")
        .unwrap();

    let old = server.current;
    server.signal(old, libc::SIGHUP);
    let new = server.wait_for("a new generation to answer", |s| {
        http_probe(s.addr).ok().filter(|&pid| pid != old)
    });
    server.generations.push(new);
    server.current = new;
    server.assert_pid_file(new);

    // A keep-alive connection idle at the upgrade is still served, and told to close.
    let sent = std::time::Instant::now();
    lame.write_all(GET).unwrap();
    let resp = read_response(&mut lame, &mut lame_buf).expect("lame-duck response");
    assert_eq!(parse_pid(&resp.body), Some(old), "{resp:?}");
    assert!(resp.close, "no Connection: close: {resp:?}");
    assert_eq!(lame.read(&mut [0u8; 16]).unwrap(), 0, "not closed");

    // The connection that stays idle is closed without a response, after the lame duck.
    let mut rest = Vec::new();
    idle.read_to_end(&mut rest)
        .expect("idle connection closed cleanly");
    assert!(rest.is_empty(), "unexpected data: {rest:?}");
    assert!(
        sent.elapsed() < std::time::Duration::from_secs(5),
        "closed late"
    );

    // The request in flight completes, answered by the old generation.
    in_flight.write_all(b"\r\n").unwrap();
    let resp = read_response(&mut in_flight, &mut flight_buf).expect("complete response");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(parse_pid(&resp.body), Some(old), "{resp:?}");
    assert!(resp.close, "no Connection: close: {resp:?}");
    assert_eq!(in_flight.read(&mut [0u8; 16]).unwrap(), 0, "not closed");

    let status = server.wait_exit(old);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    // Neither connection was cut off by the drain deadline.
    server.assert_drained();
    server.stop(libc::SIGTERM);
}

/// The examples that upgrade on `SIGHUP`, with the probe each answers.
const SIGHUP_EXAMPLES: [(&str, Probe); 5] = [
    ("tcp_server", line_probe),
    ("daemon", line_probe),
    ("thread_per_core", line_probe),
    ("http_server", http_probe),
    ("axum_server", http_probe),
];

/// Run from a terminal (`script -c`, a tmux window, a terminal emulator), the first
/// generation leads the session. When it exits after the upgrade, the kernel sends
/// `SIGHUP` to the terminal's foreground process group, which holds the new generation.
/// That `SIGHUP` is no upgrade request: one `kill -HUP`, one upgrade; the new generation
/// serves on.
fn one_upgrade_per_sighup_from_a_terminal(binary: &str, probe: Probe) {
    let _lock = lock();
    let mut server = Server::start_in_terminal(&example(binary), &[], probe);
    let second = server.upgrade();
    // The kernel's SIGHUP went out as the first generation exited: upgrade() saw it go.
    let log = server.wait_for("the kernel's SIGHUP to be handled", |s| {
        let log = s.log();
        let done = log.contains("SIGHUP from the kernel")
            || log.contains("upgrade failed")
            || log.matches("] ready").count() > 2;
        done.then_some(log)
    });
    assert_eq!(
        log.matches("] ready").count(),
        2,
        "one SIGHUP, more than one upgrade:\n{log}"
    );
    assert!(!log.contains("upgrade failed"), "{log}");
    assert_eq!(probe(server.addr).expect("probe after the hangup"), second);
    server.assert_pid_file(second);
    server.stop(libc::SIGTERM);
}

#[test]
fn tcp_server_upgrades_once_per_sighup_from_a_terminal() {
    one_upgrade_per_sighup_from_a_terminal("tcp_server", line_probe);
}

#[test]
fn daemon_upgrades_once_per_sighup_from_a_terminal() {
    one_upgrade_per_sighup_from_a_terminal("daemon", line_probe);
}

#[test]
fn thread_per_core_upgrades_once_per_sighup_from_a_terminal() {
    one_upgrade_per_sighup_from_a_terminal("thread_per_core", line_probe);
}

#[test]
fn http_server_upgrades_once_per_sighup_from_a_terminal() {
    one_upgrade_per_sighup_from_a_terminal("http_server", http_probe);
}

#[test]
fn axum_server_upgrades_once_per_sighup_from_a_terminal() {
    one_upgrade_per_sighup_from_a_terminal("axum_server", http_probe);
}

/// The log says where each generation's listener came from, and the old generation's
/// success line names the new pid.
#[test]
fn logs_say_inherited_or_new_and_the_new_pid() {
    let _lock = lock();
    for (binary, probe) in SIGHUP_EXAMPLES {
        let mut server = Server::start(&example(binary), &[], probe);
        let first = server.current;
        let second = server.upgrade();
        // A line may still be on its way: the old generation logs its success after the
        // new one already answers.
        let line = |pid: u32, what: &str| {
            let tag = format!(" pid={pid}] {what}");
            let deadline = Instant::now() + DEADLINE;
            loop {
                let log = server.log();
                if let Some(l) = log.lines().find(|l| l.contains(&tag)) {
                    return l.to_owned();
                }
                if Instant::now() > deadline {
                    panic!("{binary}: no {what:?} line from pid {pid}:\n{log}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let listening = line(first, "listening on");
        assert!(listening.contains("new socket"), "{binary}: {listening}");
        let listening = line(second, "listening on");
        assert!(listening.contains("inherited"), "{binary}: {listening}");
        let succeeded = line(first, "upgrade succeeded");
        assert!(
            succeeded.contains(&format!("pid {second}")),
            "{binary}: the new pid is missing: {succeeded}"
        );
        server.stop(libc::SIGTERM);
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
        let binary = example(&name);
        let out = run(&binary, &["--help"]);
        let usage = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name} --help: {:?}, stderr {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(usage.starts_with("usage: "), "{name} --help: {usage:?}");
        let documented = flags(header_synopsis(&source));
        let listed = flags(&usage);
        let names = |f: &[(String, Option<String>)]| {
            f.iter()
                .map(|(flag, _)| flag.clone())
                .collect::<std::collections::BTreeSet<_>>()
        };
        assert_eq!(
            names(&listed),
            names(&documented),
            "{name}: --help and the header's synopsis name different flags"
        );
        for (flag, value) in &listed {
            let mut args = vec![flag.as_str()];
            if let Some(placeholder) = value {
                args.push(sample_value(placeholder));
            }
            args.push("--help");
            let out = run(&binary, &args);
            assert_eq!(
                out.status.code(),
                Some(0),
                "{name} {args:?}: the usage names a flag it refuses: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    assert!(
        seen >= 6,
        "only {seen} examples found in {}",
        examples.display()
    );
}

fn run(binary: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(binary)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run example")
}

/// The first ```text block of the module docs: the example's synopsis.
fn header_synopsis(source: &str) -> &str {
    let start = source.find("//! ```text\n").expect("a ```text synopsis") + 12;
    let len = source[start..].find("//! ```").expect("its end");
    &source[start..start + len]
}

/// The flags a usage text names (`--flag`), each with its value's placeholder, if it
/// takes one (`--listen HOST:PORT`).
fn flags(usage: &str) -> Vec<(String, Option<String>)> {
    let words: Vec<&str> = usage
        .split(|c: char| c.is_whitespace() || c == '[' || c == ']')
        .map(|w| w.trim_start_matches("//!"))
        .filter(|w| !w.is_empty())
        .collect();
    let mut out: Vec<(String, Option<String>)> = Vec::new();
    for (i, w) in words.iter().enumerate() {
        if let Some(flag) = w.strip_prefix("--").filter(|f| !f.is_empty()) {
            let value = words
                .get(i + 1)
                .filter(|v| v.starts_with(|c: char| c.is_ascii_uppercase()))
                .map(|v| v.to_string());
            if !out.iter().any(|(f, _)| f[2..] == *flag) {
                out.push((format!("--{flag}"), value));
            }
        }
    }
    out
}

/// A value that each placeholder accepts.
fn sample_value(placeholder: &str) -> &'static str {
    match placeholder {
        "HOST:PORT" => "127.0.0.1:1",
        "PATH|@NAME" => "@tableflip-help-test",
        "PATH" => "/nonexistent",
        _ => "1", // SECS, N, K
    }
}
