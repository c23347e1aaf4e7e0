//! An upgrade is a transaction: the old generation alone commits, a new generation that
//! is killed before the commit has changed nothing outside, and a probation rolls back
//! one that dies after it became ready. Real processes, sockets and signals.
#![cfg(target_os = "linux")]

mod util;

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use util::{ask, signal, wait_gone, Run};

#[test]
#[ignore = "entry point of the processes the other tests start"]
fn scenario_entry() {
    if let Ok(name) = std::env::var("TF_SCENARIO") {
        util::scenario(&name);
    }
}

/// A notify socket standing in for systemd's. Like systemd it reads as messages come (on
/// a thread): the commit waits until its `MAINPID=` has been read.
struct Notify {
    sock: UnixDatagram,
    target: String,
    /// Messages read so far; `None` for a socket nobody reads.
    read: Option<Arc<Mutex<Vec<String>>>>,
}

impl Notify {
    fn new(tag: &str) -> Notify {
        let mut notify = Notify::unread(tag);
        let read = Arc::new(Mutex::new(Vec::new()));
        let (sock, sink) = (notify.sock.try_clone().unwrap(), Arc::clone(&read));
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Until the test drops its `Notify`.
            while Arc::strong_count(&sink) > 1 {
                if let Ok(n) = sock.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    sink.lock().unwrap().push(msg);
                }
            }
        });
        notify.read = Some(read);
        notify
    }

    /// A socket that nobody reads.
    fn unread(tag: &str) -> Notify {
        let name = format!("tf-{tag}-{}", std::process::id());
        let addr = <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        Notify {
            sock,
            target: format!("@{name}"),
            read: None,
        }
    }

    /// The last `MAINPID=` received so far.
    fn main_pid(&mut self) -> Option<u32> {
        let read = self.read.as_ref()?.lock().unwrap();
        read.iter()
            .flat_map(|msg| msg.lines())
            .filter_map(|line| line.strip_prefix("MAINPID="))
            .next_back()
            .and_then(|pid| pid.parse().ok())
    }

    /// The last `MAINPID=`, once it is `want` or a few seconds have passed: the reading
    /// thread may not have caught up with a message already sent (a loaded machine).
    fn main_pid_settled(&mut self, want: Option<u32>) -> Option<u32> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let last = self.main_pid();
            if last == want || Instant::now() > deadline {
                return last;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn pid_file(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn start(tag: &str, notify: &Notify, extra: &[(&str, String)]) -> (Run, u32, SocketAddr) {
    let mut env = vec![
        ("TF_TCP", "127.0.0.1:0".to_string()),
        ("TF_PIDFILE", "app.pid".to_string()),
        ("NOTIFY_SOCKET", notify.target.clone()),
    ];
    env.extend(extra.iter().cloned());
    let mut run = Run::start(tag, &env);
    let addr: SocketAddr = run.expect("tcp").field("addr").unwrap().parse().unwrap();
    let pid = run.expect("ready").pid;
    (run, pid, addr)
}

#[test]
fn probation_rolls_back_a_generation_that_dies_after_ready() {
    let mut notify = Notify::new("probation");
    let (mut run, pid1, addr) = start("probation", &notify, &[("TF_PROBATION_MS", "1000".into())]);
    let pid_path = run.path("app.pid");
    assert_eq!(pid_file(&pid_path), Some(pid1));
    let fds = fd_count(pid1);

    // Ready, then dead 300 ms later: within the probation.
    run.next("crash 300");
    signal(pid1, libc::SIGHUP);
    let pid2 = run.expect_not_from("reporting", pid1).pid;
    run.expect_from("crashing", pid2);
    let err = run.expect_upgrade_result(pid1).unwrap_err();
    assert!(err.rest.contains("kind=ChildDiedAfterReady"), "{err:?}");
    assert!(err.rest.contains("SIGABRT"), "{err:?}");
    assert!(err.rest.contains("children=0"), "{err:?}");
    assert!(
        !run.seen("ready"),
        "the crashing generation never took over"
    );
    // Nothing changed: the pid file, systemd's main pid, the fds; it serves on.
    assert_eq!(pid_file(&pid_path), Some(pid1));
    assert_eq!(notify.main_pid_settled(Some(pid1)), Some(pid1));
    assert_eq!(fd_count(pid1), fds);
    assert_eq!(ask(addr).unwrap(), pid1);

    // The next good deploy upgrades, after its probation.
    run.next("");
    let t = Instant::now();
    signal(pid1, libc::SIGHUP);
    let pid3 = run.expect_upgrade_result(pid1).unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(1000),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(pid_file(&pid_path), Some(pid3));
    assert_eq!(notify.main_pid_settled(Some(pid3)), Some(pid3));
    run.wait_first();
    assert_eq!(ask(addr).unwrap(), pid3);
    signal(pid3, libc::SIGTERM);
    run.expect_all_exited();
}

/// The new generation's report aimed at the old one's deadline, again and again: the
/// delay moves towards the boundary (later after a success, earlier after a timeout),
/// so most trials land within a fraction of a millisecond of it. Whatever the outcome,
/// the pid file and the last `MAINPID=` agree with what `upgrade()` returned.
#[test]
fn a_report_at_the_deadline_is_committed_whole_or_not_at_all() {
    const TRIALS: usize = 50;
    let mut notify = Notify::new("deadline");
    let (mut run, mut current, _) = start(
        "deadline",
        &notify,
        &[("TF_TIMEOUT_MS", "40".into()), ("TF_OVERLAP", "1".into())],
    );
    let pid_path = run.path("app.pid");
    let mut delay_us: u64 = 36_000;
    let (mut ok, mut timeouts) = (0, 0);
    for trial in 0..TRIALS {
        run.next(&format!("delay-us {delay_us}"));
        signal(current, libc::SIGHUP);
        match run.expect_upgrade_result(current) {
            Ok(pid) => {
                ok += 1;
                current = pid;
                delay_us += 150;
            }
            Err(err) => {
                assert!(err.rest.contains("kind=Timeout"), "trial {trial}: {err:?}");
                assert!(err.rest.contains("children=0"), "trial {trial}: {err:?}");
                timeouts += 1;
                delay_us = delay_us.saturating_sub(450);
            }
        }
        assert_eq!(pid_file(&pid_path), Some(current), "trial {trial}");
        assert_eq!(
            notify.main_pid_settled(Some(current)),
            Some(current),
            "trial {trial}"
        );
    }
    eprintln!("{ok} committed, {timeouts} timed out, last delay {delay_us} µs");
    signal(current, libc::SIGTERM);
    run.expect_all_exited();
}

#[test]
fn a_new_generation_whose_parent_dies_undecided_carries_on_alone() {
    let mut notify = Notify::new("orphan");
    let (mut run, pid1, addr) = start("orphan", &notify, &[("TF_PROBATION_MS", "20000".into())]);
    let pid_path = run.path("app.pid");
    signal(pid1, libc::SIGHUP);
    let pid2 = run.expect_not_from("reporting", pid1).pid;
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        pid_file(&pid_path),
        Some(pid1),
        "nothing written on probation"
    );
    signal(pid1, libc::SIGKILL);
    let ready = run.expect_from("ready", pid2);
    assert_eq!(ready.pid, pid2);
    assert_eq!(pid_file(&pid_path), Some(pid2));
    assert_eq!(notify.main_pid_settled(Some(pid2)), Some(pid2));
    assert_eq!(ask(addr).unwrap(), pid2);
    signal(pid2, libc::SIGTERM);
    run.expect_all_exited();
}

#[test]
fn stop_during_probation_kills_the_new_generation_and_changes_nothing() {
    let mut notify = Notify::new("stop-probation");
    let (mut run, pid1, _) = start(
        "stop-probation",
        &notify,
        &[("TF_PROBATION_MS", "20000".into())],
    );
    signal(pid1, libc::SIGHUP);
    let pid2 = run.expect_not_from("reporting", pid1).pid;
    signal(pid1, libc::SIGTERM);
    let err = run.expect_upgrade_result(pid1).unwrap_err();
    assert!(err.rest.contains("kind=Stopped"), "{err:?}");
    wait_gone(pid2);
    assert_eq!(notify.main_pid_settled(Some(pid1)), Some(pid1));
    run.expect_all_exited();
    // The stopped generation removed its own pid file; one the new generation had
    // written (naming pid2) would have been left.
    assert_eq!(pid_file(&run.path("app.pid")), None);
}

#[test]
fn a_new_generation_stopped_on_probation_gives_the_old_one_back() {
    let mut notify = Notify::new("child-stop");
    let (mut run, pid1, addr) = start(
        "child-stop",
        &notify,
        &[("TF_PROBATION_MS", "20000".into())],
    );
    signal(pid1, libc::SIGHUP);
    let pid2 = run.expect_not_from("reporting", pid1).pid;
    // SIGTERM to the new generation while it waits for the commit: its stop() ends the
    // wait. (Should the signal land before its report, it never was ready: either way
    // the old generation gets everything back.)
    std::thread::sleep(Duration::from_millis(200));
    signal(pid2, libc::SIGTERM);
    let ready_err = run.expect_from("ready-error", pid2);
    assert!(ready_err.rest.contains("kind=Stopped"), "{ready_err:?}");
    let err = run.expect_upgrade_result(pid1).unwrap_err();
    assert!(
        err.rest.contains("kind=ChildDiedAfterReady") || err.rest.contains("kind=ChildExited"),
        "{err:?}"
    );
    assert_eq!(pid_file(&run.path("app.pid")), Some(pid1));
    assert_eq!(notify.main_pid_settled(Some(pid1)), Some(pid1));
    assert_eq!(ask(addr).unwrap(), pid1);
    signal(pid1, libc::SIGTERM);
    run.expect_all_exited();
}

/// A notify socket nobody reads: its queue fills, and nothing may hang on it.
#[test]
fn a_full_notify_socket_fails_the_commit_and_hangs_nothing() {
    let notify = Notify::unread("full");
    let _fillers = fill(&notify.sock);
    let (mut run, pid1, tcp) = start("full", &notify, &[]);
    let t = Instant::now();
    signal(pid1, libc::SIGHUP);
    let err = run.expect_upgrade_result(pid1).unwrap_err();
    assert!(err.rest.contains("kind=Notify"), "{err:?}");
    assert!(err.rest.contains("children=0"), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(ask(tcp).unwrap(), pid1);
    assert_eq!(pid_file(&run.path("app.pid")), Some(pid1));
    // Stopping does not wait on the socket either.
    signal(pid1, libc::SIGTERM);
    run.expect_all_exited();
}

/// Fills `sock`'s receive queue. One sender's own send buffer runs out first (about 277
/// small datagrams at the default `wmem_default`), long before the queue is full when
/// `net.unix.max_dgram_qlen` is 512 (as systemd sets it at boot): so senders are added
/// until a fresh one cannot queue a single datagram. Keep them until the test ends (their
/// datagrams stay queued only while they live).
fn fill(sock: &UnixDatagram) -> Vec<UnixDatagram> {
    let addr = sock.local_addr().unwrap();
    let mut fillers = Vec::new();
    loop {
        let filler = UnixDatagram::unbound().unwrap();
        filler.set_nonblocking(true).unwrap();
        let mut sent = 0;
        while filler.send_to_addr(b"X=1", &addr).is_ok() {
            sent += 1;
            assert!(sent < 100_000);
        }
        fillers.push(filler);
        if sent == 0 {
            return fillers;
        }
        assert!(fillers.len() < 1_000, "the queue never fills");
    }
}
