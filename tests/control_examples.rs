//! The examples' `--control PATH --upgrade`: a good upgrade prints the new pid and exits
//! 0; a deploy that exits 3 makes it exit 1 with the reason, and the old generation
//! serves on; the next good deploy upgrades again.
#![cfg(target_os = "linux")]

// The load clients and the SIGHUP helpers are not used here.
#[allow(dead_code)]
#[path = "util/examples.rs"]
mod util;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use util::*;

/// Runs `binary --control SOCK --upgrade` (a client, under a watchdog of its own).
fn ask_upgrade(binary: &Path, sock: &Path) -> Output {
    Command::new("timeout")
        .arg("60")
        .arg(binary)
        .arg("--control")
        .arg(sock)
        .arg("--upgrade")
        .stdin(Stdio::null())
        .output()
        .expect("run the client")
}

/// The new pid printed by a successful `--upgrade`.
fn upgraded(out: &Output) -> u32 {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "--upgrade failed: {:?}, stdout {stdout:?}, stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.trim().parse().expect("a pid on stdout")
}

/// Follows an upgrade that `--upgrade` reported: `new` answers, the pid file names it,
/// and the old generation exits with status 0.
fn follow(server: &mut Server, new: u32, probe: Probe) {
    let old = server.current;
    server.generations.push(new);
    server.current = new;
    // The answer comes after the commit: the new generation has written the pid file.
    server.assert_pid_file(new);
    let status = server.wait_exit(old);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "pid {old}: raw wait status {status:#x}"
    );
    server.wait_for("the new generation to answer", |s| {
        probe(s.addr).ok().filter(|&pid| pid == new)
    });
}

/// Copies the example to a directory of its own, so that a deploy can replace it.
struct Deploy {
    dir: TempDir,
    binary: PathBuf,
    good: PathBuf,
}

impl Deploy {
    fn new(name: &str) -> Deploy {
        let dir = TempDir::new("ctl-bin");
        let binary = dir.path().join(name);
        let deploy = Deploy {
            binary,
            good: example(name),
            dir,
        };
        deploy.install_good();
        deploy
    }

    fn install(&self, from: &Path) {
        let tmp = self.dir.path().join("new");
        std::fs::copy(from, &tmp).expect("copy");
        std::fs::rename(&tmp, &self.binary).expect("rename");
    }

    fn install_good(&self) {
        self.install(&self.good);
    }

    /// A deploy whose server dies with status 3 before it is ready, while its client
    /// mode (`--upgrade`) still works: the failure the client reports is the server's.
    fn install_exit3(&self) {
        let script = self.dir.path().join("exit3.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = --upgrade ] && exec {} \"$@\"; done\nexit 3\n",
                self.good.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, PermissionsExt::from_mode(0o755)).unwrap();
        self.install(&script);
    }
}

fn control_upgrades(name: &str, probe: Probe) {
    let _lock = lock();
    let deploy = Deploy::new(name);
    let sock = deploy.dir.path().join("ctl.sock");
    let sock_arg = sock.to_string_lossy().into_owned();
    let mut server = Server::start(
        &deploy.binary,
        &["--control", &sock_arg, "--upgrade-timeout", "15"],
        probe,
    );
    let first = server.current;

    // A good upgrade: the new pid on stdout, exit 0.
    let second = upgraded(&ask_upgrade(&deploy.binary, &sock));
    assert_ne!(second, first);
    follow(&mut server, second, probe);

    // A deploy that exits 3: exit 1, and the reason is the server's.
    deploy.install_exit3();
    let out = ask_upgrade(&deploy.binary, &sock);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr {stderr:?}");
    assert!(out.stdout.is_empty(), "{:?}", out.stdout);
    assert!(stderr.contains("upgrade failed"), "{stderr}");
    assert!(
        stderr.contains("exited before it was ready: exit status: 3"),
        "{stderr}"
    );
    // Nothing changed: the same generation serves, the pid file names it.
    assert_eq!(probe(server.addr).expect("still answering"), second);
    server.assert_pid_file(second);

    // The next good deploy upgrades.
    deploy.install_good();
    let third = upgraded(&ask_upgrade(&deploy.binary, &sock));
    follow(&mut server, third, probe);
    server.stop(libc::SIGTERM);
    assert!(
        !sock.exists(),
        "the control socket file outlived the service"
    );
}

#[test]
fn tcp_server_upgrade_flag() {
    control_upgrades("tcp_server", line_probe);
}

#[test]
fn http_server_upgrade_flag() {
    control_upgrades("http_server", http_probe);
}

#[test]
fn daemon_upgrade_flag() {
    control_upgrades("daemon", line_probe);
}

#[test]
fn upgrade_flag_without_a_server_exits_1() {
    let _lock = lock();
    let dir = TempDir::new("ctl-none");
    let out = ask_upgrade(&example("tcp_server"), &dir.path().join("nobody.sock"));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("connect failed: No such file or directory"),
        "{stderr}"
    );
}

/// `--status` of a generation that an upgrade started says so, and from which pid; the
/// first generation says it has run no upgrade, until it runs one.
#[test]
fn tcp_server_status_names_the_upgrade_that_started_it() {
    let _lock = lock();
    let dir = TempDir::new("ctl-status");
    let sock = dir.path().join("ctl.sock");
    let sock_arg = sock.to_string_lossy().into_owned();
    let binary = example("tcp_server");
    let mut server = Server::start(&binary, &["--control", &sock_arg], line_probe);
    let first = server.current;
    let status = |server: &Server| {
        let out = Command::new("timeout")
            .arg("60")
            .arg(&binary)
            .args(["--control", &sock_arg, "--status"])
            .stdin(Stdio::null())
            .output()
            .expect("run the client");
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(out.status.success(), "--status: {out:?}\n{}", server.log());
        stdout
    };
    let before = status(&server);
    assert!(
        before.starts_with(&format!("pid {first}, ready")),
        "{before}"
    );
    assert!(before.contains("no upgrade yet"), "{before}");
    assert!(!before.contains("started by"), "{before}");

    let second = upgraded(&ask_upgrade(&binary, &sock));
    follow(&mut server, second, line_probe);
    let after = status(&server);
    assert!(
        after.starts_with(&format!("pid {second}, ready")),
        "{after}"
    );
    assert!(
        after.contains(&format!("started by an upgrade from pid {first}")),
        "{after}"
    );
    assert!(!after.contains("no upgrade yet"), "{after}");
    server.stop(libc::SIGTERM);
}
