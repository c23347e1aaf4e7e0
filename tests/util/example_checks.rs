//! The checks that every example server passes, as functions of its binary:
//! tests/examples.rs runs them on the main package's examples, and
//! tokio-example/tests/axum_server.rs on the tokio example. Include this file beside
//! util/examples.rs, which must be the module `util`:
//!
//! ```ignore
//! #[path = "util/examples.rs"]
//! mod util;
//! #[path = "util/example_checks.rs"]
//! mod checks;
//! ```

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

/// After the upgrade the old generation hands its keep-alive connections to the new one
/// instead of closing them, each between two requests: a connection idle across the
/// upgrade stays open, and its next request is answered by the new generation; a
/// request that had started to arrive is answered, without `Connection: close` (by the
/// old generation, or by the new one if the old one handed the connection over with
/// the start of the request: `http_server` reads a request whole once it has started,
/// hyper hands over what it has not parsed yet), and the start of the next request,
/// which came with its end, travels with the connection: the new generation answers
/// that request once it is whole. The old generation exits without waiting for a lame
/// duck, and its record says what it handed over.
pub fn hands_over_keep_alive_connections(binary: &Path) {
    let _lock = lock();
    let mut server = Server::start(binary, &[], http_probe);
    let old = server.current;

    let mut idle = connect(server.addr).unwrap();
    let mut in_flight = connect(server.addr).unwrap();
    let (mut idle_buf, mut flight_buf) = (Vec::new(), Vec::new());
    for (conn, buf) in [
        (&mut idle, &mut idle_buf),
        (&mut in_flight, &mut flight_buf),
    ] {
        conn.write_all(GET).unwrap();
        let resp = read_response(conn, buf).unwrap();
        assert_eq!(parse_pid(&resp.body), Some(old), "{resp:?}");
        assert!(!resp.close, "{resp:?}");
    }
    // Half a request: the old generation has started reading it.
    in_flight
        .write_all(b"GET /slow HTTP/1.1\r\nHost: test\r\n")
        .unwrap();

    server.signal(old, libc::SIGHUP);
    let new = server.wait_for("a new generation to answer", |s| {
        http_probe(s.addr).ok().filter(|&pid| pid != old)
    });
    server.generations.push(new);
    server.current = new;

    // The request in flight: its end, with the start of the next request. It is
    // answered, and the connection kept alive.
    in_flight
        .write_all(b"\r\nGET /next HTTP/1.1\r\nHost: test\r\n")
        .unwrap();
    let resp = read_response(&mut in_flight, &mut flight_buf).expect("complete response");
    assert_eq!(resp.status, 200, "{resp:?}");
    let pid = parse_pid(&resp.body);
    assert!(pid == Some(old) || pid == Some(new), "{resp:?}");
    assert!(!resp.close, "told to close: {resp:?}");

    // Both connections handed over, the old generation is gone.
    let status = server.wait_exit(old);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    server.assert_pid_file(new);

    // The next requests on the same connections: the new generation answers.
    in_flight.write_all(b"\r\n").unwrap();
    let resp = read_response(&mut in_flight, &mut flight_buf).expect("the handed-over request");
    assert_eq!(parse_pid(&resp.body), Some(new), "{resp:?}");
    assert!(!resp.close, "{resp:?}");
    idle.write_all(GET).unwrap();
    let resp = read_response(&mut idle, &mut idle_buf).expect("a request after the upgrade");
    assert_eq!(parse_pid(&resp.body), Some(new), "{resp:?}");
    assert!(!resp.close, "{resp:?}");

    // "upgrade OLD -> NEW: ...; 2 handed over, 0 drained, 0 force-closed; ..."
    let log = server.log();
    let record = log
        .lines()
        .find(|l| l.contains(&format!("upgrade {old} -> {new}:")))
        .unwrap_or_else(|| panic!("no record of the upgrade:\n{log}"));
    assert!(
        record.contains("2 handed over, 0 drained, 0 force-closed"),
        "{record}"
    );
    server.assert_drained();
    server.stop(libc::SIGTERM);
}

/// With `--no-handover` the old generation is a lame duck after the upgrade (what a
/// server whose connections cannot move does): a request on a keep-alive connection
/// that was idle is answered, with `Connection: close`; a request in flight across the
/// upgrade gets its whole response, with `Connection: close`; a connection that stays
/// idle is closed at the end of the lame-duck phase, without a response.
pub fn lame_duck_finishes_requests_in_flight(binary: &Path) {
    let _lock = lock();
    let args = ["--lame-duck", "0.5", "--no-handover"];
    let mut server = Server::start(binary, &args, http_probe);
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
    // The new generation accepts before it is ready, and writes the pid file only once
    // the old one has committed: its first answer can come before the file names it.
    server.wait_for("the pid file to name the new generation", |s| {
        s.pid_from_file().filter(|&pid| pid == new)
    });

    // A keep-alive connection idle at the upgrade is still served, and told to close.
    let sent = Instant::now();
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
    assert!(sent.elapsed() < Duration::from_secs(5), "closed late");

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

/// Run from a terminal (`script -c`, a tmux window, a terminal emulator), the first
/// generation leads the session. When it exits after the upgrade, the kernel sends
/// `SIGHUP` to the terminal's foreground process group, which holds the new generation.
/// That `SIGHUP` is no upgrade request: one `kill -HUP`, one upgrade; the new generation
/// serves on.
pub fn one_upgrade_per_sighup_from_a_terminal(binary: &Path, probe: Probe) {
    let _lock = lock();
    let mut server = Server::start_in_terminal(binary, &[], probe);
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

/// The log says where each generation's listener came from, and the old generation's
/// success line names the new pid.
pub fn logs_say_inherited_or_new_and_the_new_pid(binary: &Path, probe: Probe) {
    let _lock = lock();
    let name = binary.display();
    let mut server = Server::start(binary, &[], probe);
    let first = server.current;
    let second = server.upgrade();
    // A line may still be on its way: the old generation logs its success after the new
    // one already answers.
    let line = |pid: u32, what: &str| {
        let tag = format!(" pid={pid}] {what}");
        let deadline = Instant::now() + DEADLINE;
        loop {
            let log = server.log();
            if let Some(l) = log.lines().find(|l| l.contains(&tag)) {
                return l.to_owned();
            }
            if Instant::now() > deadline {
                panic!("{name}: no {what:?} line from pid {pid}:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let listening = line(first, "listening on");
    assert!(listening.contains("new socket"), "{name}: {listening}");
    let listening = line(second, "listening on");
    assert!(listening.contains("inherited"), "{name}: {listening}");
    let succeeded = line(first, "upgrade succeeded");
    assert!(
        succeeded.contains(&format!("pid {second}")),
        "{name}: the new pid is missing: {succeeded}"
    );
    server.stop(libc::SIGTERM);
}

/// `binary` answers `--help` with exit 0 and a usage naming the flags that the header
/// of its `source` documents, and accepts each flag the usage names.
pub fn answers_help_with_its_flags(binary: &Path, source: &str) {
    let name = binary.display();
    let out = run(binary, &["--help"]);
    let usage = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{name} --help: {:?}, stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(usage.starts_with("usage: "), "{name} --help: {usage:?}");
    let documented = flags(header_synopsis(source));
    let listed = flags(&usage);
    let names = |f: &[(String, Option<String>)]| {
        f.iter()
            .map(|(flag, _)| flag.clone())
            .collect::<BTreeSet<_>>()
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
        let out = run(binary, &args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name} {args:?}: the usage names a flag it refuses: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn run(binary: &Path, args: &[&str]) -> Output {
    Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
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
