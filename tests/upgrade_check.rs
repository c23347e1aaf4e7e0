//! Runs `examples/upgrade_check` against the `tcp_server` example (20 upgrades under
//! load and every fault scenario), and in its HTTP mode against `http_server` and
//! `axum_server` (20 upgrades under keep-alive and `Connection: close` load), with no
//! failed connection or request and nothing left behind. The full measurements (100
//! upgrades, release build) are in the README; the fd counts it gives are checked
//! against this run's.
#![cfg(target_os = "linux")]

// The examples' harness: `lock()` and `example()` (which builds the examples once).
#[allow(dead_code)]
#[path = "util/examples.rs"]
mod util;

#[allow(dead_code)]
#[path = "util/docs.rs"]
mod docs;

use std::io::{ErrorKind, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// A run that takes longer than this is killed, and the test fails.
const WATCHDOG: Duration = Duration::from_secs(240);

/// A process started in a new process group (which every process it starts joins),
/// killed as a group on drop or when the watchdog fires.
struct Group {
    child: Child,
    waited: bool,
    _watchdog: mpsc::Sender<()>,
}

impl Group {
    fn spawn(cmd: &mut Command) -> Group {
        std::os::unix::process::CommandExt::process_group(cmd, 0);
        let child = cmd.spawn().expect("cannot start upgrade_check");
        let pgid = child.id() as i32;
        let (tx, rx) = mpsc::channel::<()>();
        thread::spawn(move || {
            // The sender is dropped with the Group: then this returns Disconnected.
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(WATCHDOG) {
                eprintln!("watchdog: killing process group {pgid} after {WATCHDOG:?}");
                kill_group(pgid);
            }
        });
        Group {
            child,
            waited: false,
            _watchdog: tx,
        }
    }

    /// Waits for the leader to exit, kills whatever it left in the group, and reaps it.
    fn wait(&mut self) -> ExitStatus {
        // Without reaping: until then the zombie leader keeps the group id ours.
        loop {
            // SAFETY: all-zero bytes are a valid siginfo_t.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid with a valid pointer to a siginfo_t.
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    self.child.id() as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            if rc == 0 || std::io::Error::last_os_error().kind() != ErrorKind::Interrupted {
                break;
            }
        }
        kill_group(self.child.id() as i32);
        self.waited = true;
        self.child.wait().expect("reap upgrade_check")
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if !self.waited {
            kill_group(self.child.id() as i32);
            let _ = self.child.wait();
        }
    }
}

fn kill_group(pgid: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions. The group is ours: its leader
    // is our child and has not been reaped (see `Group::wait`).
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
}

#[test]
fn tcp_server_upgrades_with_zero_downtime() {
    let summary = upgrade_check("tcp_server", &["--faults"]);
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

/// Keep-alive clients and `Connection: close` clients; every request counts.
#[test]
fn http_server_upgrades_with_zero_failed_requests() {
    let summary = upgrade_check("http_server", &["--http"]);
    assert!(summary.contains("requests "), "{summary}");
}

/// The same load against axum on tokio and hyper.
#[test]
fn axum_server_upgrades_with_zero_failed_requests() {
    let summary = upgrade_check("axum_server", &["--http"]);
    assert!(summary.contains("requests "), "{summary}");
}

/// Runs upgrade_check against the example `server` (20 upgrades under load, 4 clients,
/// then `args`), checks that it passed, and returns its summary.
fn upgrade_check(server: &str, args: &[&str]) -> String {
    let _lock = util::lock();
    let mut cmd = Command::new(util::example("upgrade_check"));
    cmd.arg("--server")
        .arg(util::example(server))
        .args(["--upgrades", "20", "--clients", "4"])
        .args(args)
        .args(["--time-limit", "200"])
        // Pid files and server copies on tmpfs when there is one: an fsync of the pid
        // file on a disk busy with other work can stall an upgrade for seconds.
        .env("TMPDIR", tmpdir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut group = Group::spawn(&mut cmd);

    let mut stderr = group.child.stderr.take().unwrap();
    let progress = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut summary = String::new();
    let _ = group
        .child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut summary);
    let status = group.wait();
    let progress = progress.join().unwrap();
    eprintln!("{progress}{summary}");
    assert!(
        status.success(),
        "upgrade_check failed ({status}):\n{progress}{summary}"
    );
    assert!(summary.contains("result: PASS"), "{summary}");
    summary
}

fn tmpdir() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.into()
    } else {
        std::env::temp_dir()
    }
}
