//! Hostile input. The fd table arrives through the environment, which whoever starts the
//! process controls; the pid file and Unix socket paths live in directories others may
//! write to. None of that may crash the process, make it adopt the wrong fd, or make it
//! write or delete the wrong file.
//!
//! The fd-table tests start this test binary again (only the ignored `hostile_entry`
//! test, see [`child_main`]) with real fds placed at fixed numbers and a table in
//! `$TABLEFLIP_FDS`. A table addressed to the child itself needs the child's pid before
//! it exists: a shell writes it (`$$` is the pid that `exec` keeps). The child reports
//! what happened as lines `@@ <key> <value>` on stdout.

mod util;

use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::Instant;

use tableflip::__private::{decode_fd_table, FD_TABLE_VAR};
use tableflip::{Error, Options, Upgrader};

/// The longest value Linux passes through `execve`: one environment string, `NAME=value`
/// and its NUL, is at most 128 KiB (`MAX_ARG_STRLEN`).
const MAX_VALUE: usize = 128 * 1024 - FD_TABLE_VAR.len() - 2;

/// Not a test: the body of the processes the other tests start.
#[test]
#[ignore = "entry point of the processes the other tests start"]
fn hostile_entry() {
    if std::env::var_os("TF_HOSTILE").is_some() {
        child_main();
    }
}

// ---------------------------------------------------------------------------------------
// The child: creates an Upgrader from the table it was given, and reports.
// ---------------------------------------------------------------------------------------

fn say(key: &str, value: impl std::fmt::Display) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "\n@@ {key} {value}");
    let _ = out.flush();
}

/// `inherited` (open, close-on-exec clear: untouched since exec), `cloexec` or `closed`.
fn fd_state(fd: RawFd) -> &'static str {
    // SAFETY: F_GETFD reads the flags of an fd number and touches no memory; a number
    // that is not open gives EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        "closed"
    } else if flags & libc::FD_CLOEXEC != 0 {
        "cloexec"
    } else {
        "inherited"
    }
}

fn report_fds(when: &str, fds: &[RawFd]) {
    let states: Vec<String> = fds
        .iter()
        .map(|&fd| format!("{fd}={}", fd_state(fd)))
        .collect();
    say(&format!("fds-{when}"), states.join(","));
}

fn report_error(what: &str, e: &Error) {
    say(&format!("{what}-error"), util::kind(e));
    say(
        &format!("{what}-debug"),
        format!("{e:?}").replace('\n', " "),
    );
    say(&format!("{what}-message"), e);
    match e {
        Error::FdTable {
            var, entry, reason, ..
        } => {
            say(&format!("{what}-var"), var);
            say(&format!("{what}-entry"), format!("{entry:?}"));
            say(&format!("{what}-reason"), format!("{reason:?}"));
        }
        Error::PidFile { path, .. } => say(&format!("{what}-path"), path.display()),
        _ => {}
    }
    if let Some(source) = e.io_error() {
        say(&format!("{what}-source"), source);
    }
}

/// `TF_TAKE`: `KIND ADDR`. The listen-or-inherit kinds (`listen-tcp`) and the inherit-only
/// ones (`tcp`, `udp`, `unix`).
fn take(upg: &Upgrader, what: &str) -> tableflip::Result<Option<OwnedFd>> {
    let (kind, addr) = what.split_once(' ').expect("TF_TAKE is KIND ADDR");
    let fds = upg.fds();
    match kind {
        "listen-tcp" => fds.listen::<TcpListener>(addr).map(|l| Some(l.into())),
        "tcp" => fds.take::<TcpListener>(addr).map(|l| l.map(Into::into)),
        "udp" => fds.take::<UdpSocket>(addr).map(|s| s.map(Into::into)),
        "unix" => fds.take::<UnixListener>(addr).map(|l| l.map(Into::into)),
        _ => panic!("unknown TF_TAKE kind {kind}"),
    }
}

/// Environment: `TF_WATCH` (fds to report the state of), `TF_TAKE` (a socket to take
/// after `new`, then to look up again), `TF_PIDFILE`, `TF_UMASK` (octal), `TF_NOBODY`
/// (drop to uid/gid 65534 when root), `TF_PLANT` (`symlink:VICTIM` or `dir`: planted at
/// `.NAME.PID.tmp`, the temporary name a guesser would try, before `ready`), `TF_READY`.
fn child_main() -> ! {
    // Watchdog: a child never outlives half a minute.
    // SAFETY: alarm(2) only arms a timer.
    unsafe { libc::alarm(30) };
    if let Ok(name) = std::env::var("TF_SEQPACKET_LISTENER") {
        seqpacket_listener(&name);
    }
    say("pid", std::process::id());
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let watch: Vec<RawFd> = var("TF_WATCH")
        .unwrap_or_default()
        .split(',')
        .filter_map(|f| f.parse().ok())
        .collect();
    report_fds("before", &watch);

    if let Some(mask) = var("TF_UMASK") {
        let mask = libc::mode_t::from_str_radix(&mask, 8).unwrap();
        // SAFETY: umask(2) only sets the process's file mode mask.
        unsafe { libc::umask(mask) };
    }
    // SAFETY: geteuid(2) has no preconditions.
    if var("TF_NOBODY").is_some() && unsafe { libc::geteuid() } == 0 {
        // SAFETY: setgroups with an empty list reads no memory; setgid and setuid take
        // integers. Each result is checked.
        unsafe {
            assert_eq!(libc::setgroups(0, std::ptr::null()), 0, "setgroups");
            assert_eq!(libc::setgid(65534), 0, "setgid");
            assert_eq!(libc::setuid(65534), 0, "setuid");
        }
    }
    let pid_file = var("TF_PIDFILE").map(PathBuf::from);
    let mut opts = Options::new();
    if let Some(p) = &pid_file {
        opts = opts.pid_file(p);
    }

    let upg = match Upgrader::new(opts) {
        Ok(u) => u,
        Err(e) => {
            report_error("new", &e);
            report_fds("after", &watch);
            quit();
        }
    };
    say("new", format!("has_parent={}", upg.has_parent()));
    let inherited: Vec<String> = upg
        .fds()
        .inherited()
        .iter()
        .map(|i| i.to_string())
        .collect();
    say("inherited", inherited.join("|"));

    if let Some(what) = var("TF_TAKE") {
        match take(&upg, &what) {
            Ok(found) => say("take", format!("found={}", found.is_some())),
            Err(e) => report_error("take", &e),
        }
        // Asked again, the inherit-only lookup: a rejected fd is not handed out later.
        let again = what.replace("listen-", "");
        match take(&upg, &again) {
            Ok(found) => say("retake", format!("found={}", found.is_some())),
            Err(e) => report_error("retake", &e),
        }
        say("registry", format!("{:?}", upg.fds()).replace(' ', ""));
    }

    if let (Some(plant), Some(path)) = (var("TF_PLANT"), &pid_file) {
        let name = path.file_name().unwrap().to_str().unwrap();
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        match plant.strip_prefix("symlink:") {
            Some(victim) => std::os::unix::fs::symlink(victim, &tmp).unwrap(),
            None => std::fs::create_dir(&tmp).unwrap(),
        }
        say("planted", tmp.display());
    }

    if var("TF_READY").is_some() {
        match upg.ready() {
            Ok(mut adoption) => {
                say("ready", "ok");
                let records = upg.status().upgrades;
                say("records", records.len());
                if let Some(r) = records.last() {
                    say("record", format!("{} -> {:?}", r.pid, r.result));
                }
                let closed: Vec<String> = adoption.closed.iter().map(|i| i.to_string()).collect();
                say("closed", closed.join("|"));
                let events = var("TF_HANDOVER_EVENTS").map_or(1, |n| n.parse().unwrap());
                match adoption.handover.take() {
                    Some(rx) => receive(rx, events),
                    None => say("handover", "none"),
                }
            }
            Err(e) => report_error("ready", &e),
        }
    }
    report_fds("after", &watch);
    quit();
}

/// Reports what the handover channel gives, `events` times: `handover-N-error` (and
/// the rest of [`report_error`]) or `handover-N-accepted id=I unread=U`.
fn receive(mut rx: tableflip::handover::Receiver, events: usize) {
    say("handover", format!("pid={}", rx.pid()));
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let mut n = 0;
    while n < events && Instant::now() < deadline {
        match rx.recv() {
            Ok(Some(incoming)) => {
                let id = incoming.id();
                match incoming.accept() {
                    Ok((_stream, unread, _)) => say(
                        &format!("handover-{n}-accepted"),
                        format!("id={id} unread={}", String::from_utf8_lossy(&unread)),
                    ),
                    Err(e) => report_error(&format!("handover-{n}"), &e),
                }
                n += 1;
            }
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(5)),
            Err(e) => {
                report_error(&format!("handover-{n}"), &e);
                n += 1;
                if !matches!(e, Error::HandoverRefused { .. }) {
                    break;
                }
            }
        }
    }
}

/// Exits at once, without running exit handlers: `exit(3)` from the test thread races
/// with the harness's main thread (after `setuid`, a child crashed in one run of three).
fn quit() -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // SAFETY: _exit(2) ends the process; nothing runs after it.
    unsafe { libc::_exit(0) }
}

// ---------------------------------------------------------------------------------------
// The parent side.
// ---------------------------------------------------------------------------------------

/// What `$TABLEFLIP_FDS` holds in the child.
enum Table {
    /// `HEAD`, the child's own pid in ten digits, then `TAIL` (written by a shell).
    Own { head: String, tail: String },
    /// Exactly this value.
    Raw(OsString),
    /// No variable at all.
    Unset,
}

/// A child to start: its table, the fds it gets, and what it should do.
struct Spec {
    table: Table,
    /// `(fd in this process, fd number in the child)`.
    pass: Vec<(RawFd, RawFd)>,
    /// Fd numbers that must not be open in the child.
    closed: Vec<RawFd>,
    watch: Vec<RawFd>,
    env: Vec<(&'static str, OsString)>,
    dir: Option<PathBuf>,
}

impl Spec {
    /// A table for the child itself: `tableflip1;pid=<its pid>` followed by `tail`.
    fn own(tail: impl Into<String>) -> Spec {
        Spec::with(Table::Own {
            head: "tableflip1;pid=".into(),
            tail: tail.into(),
        })
    }

    fn with(table: Table) -> Spec {
        Spec {
            table,
            pass: Vec::new(),
            closed: Vec::new(),
            watch: Vec::new(),
            env: Vec::new(),
            dir: None,
        }
    }

    fn pass(mut self, fd: &impl AsFd, at: RawFd) -> Spec {
        self.pass.push((fd.as_fd().as_raw_fd(), at));
        self.watch.push(at);
        self
    }

    fn closed(mut self, at: RawFd) -> Spec {
        self.closed.push(at);
        self.watch.push(at);
        self
    }

    fn env(mut self, key: &'static str, value: impl Into<OsString>) -> Spec {
        self.env.push((key, value.into()));
        self
    }

    fn take(self, what: impl Into<OsString>) -> Spec {
        self.env("TF_TAKE", what)
    }

    /// Starts the child and collects its report; the child must exit within the deadline.
    #[track_caller]
    fn run(self) -> Outcome {
        let _lock = util::fork_lock();
        let exe = std::env::current_exe().unwrap();
        let args = ["hostile_entry", "--exact", "--ignored", "--nocapture"];
        let mut cmd = match &self.table {
            Table::Own { .. } => {
                let mut c = Command::new("/bin/sh");
                c.arg("-c")
                    .arg(
                        r#"TABLEFLIP_FDS="$TF_HEAD$(printf %010d $$)$TF_TAIL"; export TABLEFLIP_FDS; unset TF_HEAD TF_TAIL; exec "$0" "$@""#,
                    )
                    .arg(&exe);
                c
            }
            _ => Command::new(&exe),
        };
        cmd.args(args)
            .env_remove(FD_TABLE_VAR)
            .env_remove("RUST_TEST_THREADS")
            .env("TF_HOSTILE", "1")
            .env(
                "TF_WATCH",
                self.watch
                    .iter()
                    .map(|f| f.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        match &self.table {
            Table::Own { head, tail } => {
                cmd.env("TF_HEAD", head).env("TF_TAIL", tail);
            }
            Table::Raw(v) => {
                cmd.env(FD_TABLE_VAR, v);
            }
            Table::Unset => {}
        }
        if let Some(dir) = &self.dir {
            cmd.current_dir(dir);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        // Place the fds at their numbers in the child, close-on-exec clear, as an
        // upgrading parent would. Two steps, so that a source number that is also a
        // target is not overwritten before it is copied.
        let pairs = self.pass.clone();
        let closed = self.closed.clone();
        let mut tmp: Vec<RawFd> = vec![-1; pairs.len()];
        let place = move || -> std::io::Result<()> {
            for (i, &(src, _)) in pairs.iter().enumerate() {
                // SAFETY: fcntl(F_DUPFD_CLOEXEC) on an fd number is async-signal-safe and
                // touches no memory; the copy lands at 100 or above, clear of the targets.
                tmp[i] = unsafe { libc::fcntl(src, libc::F_DUPFD_CLOEXEC, 100) };
                if tmp[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &(_, dst)) in pairs.iter().enumerate() {
                // SAFETY: dup2 is async-signal-safe; it replaces `dst` (clearing its
                // close-on-exec flag) in this child only.
                if unsafe { libc::dup2(tmp[i], dst) } < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for &fd in &closed {
                // SAFETY: closes a number in this child only; EBADF (not open) is fine.
                unsafe { libc::close(fd) };
            }
            Ok(())
        };
        // SAFETY: the hook runs between fork and exec and only calls fcntl, dup2 and
        // close on numbers prepared above: no allocation, no lock.
        unsafe { cmd.pre_exec(place) };

        let mut child = Reaper(cmd.spawn().expect("spawn the child"));
        let rx = util::lines(child.0.stdout.take().unwrap());
        let deadline = Instant::now() + util::DEADLINE;
        let mut transcript = Vec::new();
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => transcript.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "the child did not finish within {:?}:\n{}",
                    util::DEADLINE,
                    transcript.join("\n")
                ),
            }
        }
        let status = loop {
            if let Some(st) = child.0.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "the child did not exit");
            std::thread::sleep(std::time::Duration::from_millis(2));
        };
        let lines = transcript
            .iter()
            .filter_map(|l| l.strip_prefix("@@ ")?.split_once(' '))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let out = Outcome {
            lines,
            transcript: transcript.join("\n"),
        };
        assert!(
            status.success(),
            "the child failed ({status}):\n{}",
            out.transcript
        );
        out
    }
}

/// Kills and reaps the child if the test panics before it has exited.
struct Reaper(std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// What a child reported.
struct Outcome {
    lines: Vec<(String, String)>,
    transcript: String,
}

impl Outcome {
    #[track_caller]
    fn get(&self, key: &str) -> &str {
        self.lines
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {key:?} in the child's report:\n{}", self.transcript))
    }

    fn has(&self, key: &str) -> bool {
        self.lines.iter().any(|(k, _)| k == key)
    }

    /// `what` failed with `Error::FdTable` naming the variable, an entry containing
    /// `entry` and a reason containing `reason`.
    #[track_caller]
    fn table_error(&self, what: &str, entry: &str, reason: &str) {
        let t = &self.transcript;
        assert_eq!(self.get(&format!("{what}-error")), "FdTable", "{t}");
        assert_eq!(self.get(&format!("{what}-var")), "TABLEFLIP_FDS", "{t}");
        let got = self.get(&format!("{what}-entry"));
        assert!(got.contains(entry), "entry {got} lacks {entry:?}:\n{t}");
        let got = self.get(&format!("{what}-reason"));
        assert!(got.contains(reason), "reason {got} lacks {reason:?}:\n{t}");
        let msg = self.get(&format!("{what}-message"));
        assert!(msg.contains("$TABLEFLIP_FDS"), "{msg}");
    }

    /// `Upgrader::new` refused the table, and left every passed fd as it was.
    #[track_caller]
    fn refused(&self, entry: &str, reason: &str) {
        self.table_error("new", entry, reason);
        assert!(
            !self.has("new"),
            "an Upgrader was made:\n{}",
            self.transcript
        );
        self.untouched();
    }

    /// The watched fds are in the same state after as before (nothing adopted or closed).
    #[track_caller]
    fn untouched(&self) {
        assert_eq!(
            self.get("fds-after"),
            self.get("fds-before"),
            "{}",
            self.transcript
        );
    }

    /// `Upgrader::new` accepted the table (this is an upgrade child), taking the socket
    /// failed with `Error::FdTable`, and the socket was not handed out or registered.
    #[track_caller]
    fn take_refused(&self, entry: &str, reason: &str) {
        assert_eq!(self.get("new"), "has_parent=true", "{}", self.transcript);
        self.table_error("take", entry, reason);
        assert_eq!(self.get("retake"), "found=false", "{}", self.transcript);
        assert_eq!(
            self.get("registry"),
            "Fds{inherited:0,used:0}",
            "{}",
            self.transcript
        );
    }
}

/// The handshake pipes of an upgrade: (ready write end, parent read end, commit read end) for the
/// child, and the other ends, kept open by the test.
fn handshake() -> [OwnedFd; 5] {
    let (ready_rd, ready_wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
    let (life_rd, life_wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
    // The commit pipe's write end is closed at once: a child that reports ready finds
    // its parent undecided and gone, and carries on alone (it does not wait).
    let (commit_rd, _) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
    [ready_wr, life_rd, ready_rd, life_wr, commit_rd]
}

/// A spec for a table `3,ready;4,parent;8,commit` + `rest`, with real pipes at 3, 4
/// and 8.
fn upgrade_child(pipes: &[OwnedFd; 5], rest: &str) -> Spec {
    Spec::own(format!(";3,ready;4,parent;8,commit{rest}"))
        .pass(&pipes[0], 3)
        .pass(&pipes[1], 4)
        .pass(&pipes[4], 8)
}

fn tcp_listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

// ---------------------------------------------------------------------------------------
// Tables that `Upgrader::new` refuses.
// ---------------------------------------------------------------------------------------

#[test]
fn standard_fds_are_refused() {
    let pipes = handshake();
    for (fd, kind) in [(0, "tcp,127.0.0.1:80"), (1, "fd,out"), (2, "unix,/tmp/x")] {
        let entry = format!("{fd},{kind}");
        let out = upgrade_child(&pipes, &format!(";{entry}")).run();
        out.refused(&entry, "standard input, output or error");
    }
}

#[test]
fn negative_and_huge_fds_are_refused() {
    let pipes = handshake();
    for (entry, reason) in [
        ("-1,tcp,127.0.0.1:80", "not a non-negative decimal number"),
        ("+5,fd,x", "not a non-negative decimal number"),
        ("99999999999,fd,x", "not a non-negative decimal number"),
        ("2147483648,fd,x", "out of range"),
        // A valid number that is not open: refused when adopting.
        ("2147483647,fd,x", "fd 2147483647 is not open"),
    ] {
        let out = upgrade_child(&pipes, &format!(";{entry}")).run();
        out.refused(entry.split(',').next().unwrap(), reason);
    }
}

#[test]
fn the_same_fd_twice_is_refused() {
    let pipes = handshake();
    let (l, a) = tcp_listener();
    let out = upgrade_child(&pipes, &format!(";5,tcp,{a};5,udp,{a}"))
        .pass(&l, 5)
        .run();
    out.refused("5,udp", "fd 5 appears more than once");
    let out = upgrade_child(&pipes, ";4,ready").run();
    out.refused("4,ready", "more than once");
    let out = upgrade_child(&pipes, &format!(";5,tcp,{a};6,ready"))
        .pass(&l, 5)
        .run();
    out.refused("6,ready", "more than one ready entry");
}

/// The closed fd comes last: the fds before it are not adopted either.
#[test]
fn a_closed_fd_is_refused_and_nothing_is_adopted() {
    let pipes = handshake();
    let (l, a) = tcp_listener();
    let out = upgrade_child(&pipes, &format!(";5,tcp,{a};60,fd,gone"))
        .pass(&l, 5)
        .closed(60)
        .run();
    assert_eq!(
        out.get("fds-before"),
        "3=inherited,4=inherited,8=inherited,5=inherited,60=closed"
    );
    out.refused("60,fd", "fd 60 is not open");
    assert!(out.get("new-source").contains("Bad file descriptor"));
}

#[test]
fn an_unknown_version_is_refused() {
    let pipes = handshake();
    for head in [
        "tableflip2;pid=",
        "TABLEFLIP1;pid=",
        "tableflip;pid=",
        " tableflip1;pid=",
    ] {
        let magic = head.split(';').next().unwrap();
        let out = Spec::with(Table::Own {
            head: head.into(),
            tail: ";3,ready;4,parent".into(),
        })
        .pass(&pipes[0], 3)
        .pass(&pipes[1], 4)
        .run();
        out.refused(&format!("{magic:?}"), "unknown format");
    }
}

#[test]
fn a_truncated_value_is_refused() {
    let pipes = handshake();
    for (value, entry, reason) in [
        ("tableflip1;pid=00000", "pid=00000", "ten digits"),
        ("tableflip1;pid", "pid", "ten digits"),
        ("tableflip1", "", "ten digits"),
        ("tablefl", "tablefl", "unknown format"),
    ] {
        let out = Spec::with(Table::Raw(value.into()))
            .pass(&pipes[0], 3)
            .pass(&pipes[1], 4)
            .run();
        out.refused(entry, reason);
    }
    for (tail, entry, reason) in [
        (
            ";3,ready;4,parent;5,tcp,127.0.",
            "5,tcp,127.0.",
            "not a socket address",
        ),
        (
            ";3,ready;4,parent;5,tcp,",
            "5,tcp,",
            "tcp needs a socket address",
        ),
        // A cut kind may read as a kind this version does not know: its fd must still
        // be one that was passed (here it is not).
        (
            ";3,ready;4,parent;8,commit;5,tc",
            "5,tc",
            "fd 5 is not open",
        ),
        (";3,ready;4,parent;5", "5", "expected FD,KIND"),
        (";3,ready;4,par", "tableflip1;pid=", "no parent entry"),
        (
            ";3,ready;4,parent;5,unix,/tmp/a%2",
            "%2",
            "bad percent escape",
        ),
        (";3,ready;4,parent;", "", "expected FD,KIND"),
    ] {
        let out = Spec::own(tail)
            .pass(&pipes[0], 3)
            .pass(&pipes[1], 4)
            .pass(&pipes[4], 8)
            .run();
        out.refused(entry, reason);
    }
}

/// Linux refuses to exec with a longer value, so an oversized table can only come from
/// the process itself; the decoder refuses it, and a value of the largest size that does
/// get through is refused with a short message.
#[test]
fn an_oversized_value_is_refused() {
    let mut big = format!("tableflip1;pid={:010};3,ready;4,parent;5,fd,", 42).into_bytes();
    big.resize(MAX_VALUE + 1, b'a');
    let (entry, reason) = decode_fd_table(&big, 42).unwrap_err();
    assert!(reason.contains("longer than the limit"), "{reason}");
    assert!(entry.len() <= 203 && entry.ends_with("..."), "{entry}");
    big.pop();
    assert_eq!(decode_fd_table(&big, 42), Ok(Some(3)));

    let mut over = Vec::with_capacity(MAX_VALUE + 1);
    over.resize(MAX_VALUE + 1, b'a');
    let err = {
        let _lock = util::fork_lock();
        Command::new("/bin/true")
            .env(
                FD_TABLE_VAR,
                std::ffi::OsStr::new(std::str::from_utf8(&over).unwrap()),
            )
            .status()
            .unwrap_err()
    };
    assert_eq!(err.raw_os_error(), Some(libc::E2BIG), "{err}");

    // The largest value exec passes, for the child itself, with one huge unknown kind.
    let pipes = handshake();
    let head = "tableflip1;pid=0000000000;3,ready;4,parent;5,";
    let out = Spec::own(format!(
        ";3,ready;4,parent;5,{}",
        "x".repeat(MAX_VALUE - head.len())
    ))
    .pass(&pipes[0], 3)
    .pass(&pipes[1], 4)
    .run();
    // The reason is reported Debug-quoted: the kind's first 16 bytes, quoted.
    out.refused("5,xxxx", r#"unknown kind \"xxxxxxxxxxxxxxxx\""#);
    assert!(out.get("new-entry").len() < 250);
    assert!(out.get("new-message").len() < 400);
}

#[test]
fn an_empty_variable_is_refused() {
    let pipes = handshake();
    let out = Spec::with(Table::Raw(OsString::new()))
        .pass(&pipes[0], 3)
        .pass(&pipes[1], 4)
        .run();
    out.refused("\"\"", "the variable is empty");
}

#[test]
fn a_value_that_is_not_utf8_is_refused() {
    use std::os::unix::ffi::OsStringExt;
    let out = Spec::with(Table::Raw(OsString::from_vec(
        b"tableflip1;pid=0000000001;3,unix,/tmp/\xff".to_vec(),
    )))
    .run();
    out.refused("tableflip1", "not ASCII");
}

#[test]
fn a_table_without_its_handshake_entries_is_refused() {
    let pipes = handshake();
    let (l, a) = tcp_listener();
    for (tail, reason) in [
        (format!(";5,tcp,{a}"), "no ready entry"),
        (format!(";3,ready;5,tcp,{a}"), "no parent entry"),
        (format!(";4,parent;5,tcp,{a}"), "no ready entry"),
        (format!(";3,ready;4,parent;5,tcp,{a}"), "no commit entry"),
        (String::new(), "no ready entry"),
    ] {
        let out = Spec::own(tail)
            .pass(&pipes[0], 3)
            .pass(&pipes[1], 4)
            .pass(&l, 5)
            .run();
        // There is no entry to name: the table as a whole is at fault, and named.
        out.refused("tableflip1;pid=", reason);
    }
}

/// A newer generation may pass kinds this one does not know: an older binary taking over
/// skips them, lists them among what it inherited, and closes them when it is ready.
#[test]
fn an_entry_of_an_unknown_kind_is_skipped_and_closed_at_ready() {
    let pipes = handshake();
    let (l, a) = tcp_listener();
    let null = std::fs::File::open("/dev/null").unwrap();
    let out = upgrade_child(&pipes, &format!(";5,tcp,{a};6,quic,[::1]:443,v2"))
        .pass(&l, 5)
        .pass(&null, 6)
        .take(format!("tcp {a}"))
        .env("TF_READY", "1")
        .run();
    let t = &out.transcript;
    assert_eq!(out.get("new"), "has_parent=true", "{t}");
    assert!(
        out.get("inherited")
            .contains("entry of an unknown kind quic,[::1]:443,v2 (fd 6)"),
        "{t}"
    );
    assert_eq!(out.get("take"), "found=true", "{t}");
    assert_eq!(out.get("ready"), "ok", "{t}");
    assert_eq!(
        out.get("closed"),
        "entry of an unknown kind quic,[::1]:443,v2 (fd 6)",
        "{t}"
    );
    assert!(out.get("fds-after").contains("6=closed"), "{t}");
}

#[test]
fn a_table_for_another_process_is_ignored() {
    let pipes = handshake();
    let (l, a) = tcp_listener();
    // Addressed to this test process: the child merely inherited it.
    let value = format!(
        "tableflip1;pid={:010};3,ready;4,parent;5,tcp,{a}",
        std::process::id()
    );
    let out = Spec::with(Table::Raw(value.into()))
        .pass(&pipes[0], 3)
        .pass(&pipes[1], 4)
        .pass(&l, 5)
        .take(format!("tcp {a}"))
        .run();
    assert_eq!(out.get("new"), "has_parent=false", "{}", out.transcript);
    assert_eq!(out.get("take"), "found=false");
    out.untouched();
    assert_eq!(out.get("fds-after"), "3=inherited,4=inherited,5=inherited");
}

// ---------------------------------------------------------------------------------------
// Tables that `Upgrader::new` accepts, with fds that are not what they claim: refused
// when taken.
// ---------------------------------------------------------------------------------------

#[test]
fn a_regular_file_declared_as_a_socket() {
    let pipes = handshake();
    let null = std::fs::File::open("/dev/null").unwrap();
    let out = upgrade_child(&pipes, ";5,tcp,127.0.0.1:9")
        .pass(&null, 5)
        .take("tcp 127.0.0.1:9")
        .run();
    out.take_refused(
        "5,tcp",
        "fd 5 is not the TCP listener 127.0.0.1:9 it was declared as: not a socket",
    );
    // Not closed: whatever it is, it is not ours to close.
    assert!(
        out.get("fds-after").contains("5=cloexec"),
        "{}",
        out.transcript
    );
}

#[test]
fn a_stream_socket_declared_as_datagram() {
    let pipes = handshake();
    let (l, a) = tcp_listener();
    let out = upgrade_child(&pipes, &format!(";5,udp,{a}"))
        .pass(&l, 5)
        .take(format!("udp {a}"))
        .run();
    out.take_refused("5,udp", "a stream socket, not a datagram socket");
}

#[test]
fn a_bound_socket_that_does_not_listen_declared_as_a_listener() {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let pipes = handshake();
    let sock = rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    rustix::net::bind(&sock, &any).unwrap();
    let a = SocketAddr::try_from(rustix::net::getsockname(&sock).unwrap()).unwrap();
    // listen_tcp, not only the inherit-only lookup, refuses it rather than binding anew.
    let out = upgrade_child(&pipes, &format!(";5,tcp,{a}"))
        .pass(&sock, 5)
        .take(format!("listen-tcp {a}"))
        .run();
    out.take_refused("5,tcp", "not listening");
}

#[test]
fn an_address_that_getsockname_contradicts() {
    let pipes = handshake();
    let (l, a) = tcp_listener();
    let mut claimed = a;
    claimed.set_port(if a.port() == u16::MAX {
        a.port() - 1
    } else {
        a.port() + 1
    });
    let out = upgrade_child(&pipes, &format!(";5,tcp,{claimed}"))
        .pass(&l, 5)
        .take(format!("tcp {claimed}"))
        .run();
    out.take_refused("5,tcp", &format!("bound to {a}, not {claimed}"));

    let dir = util::scratch_dir("hostile-addr");
    let real = dir.join("real.sock");
    let claimed = dir.join("claimed.sock");
    let u = UnixListener::bind(&real).unwrap();
    let out = upgrade_child(&pipes, &format!(";5,unix,{}", claimed.display()))
        .pass(&u, 5)
        .take(format!("unix {}", claimed.display()))
        .run();
    out.take_refused(
        "5,unix",
        &format!("bound to {}, not {}", real.display(), claimed.display()),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `DEV:INO` field for a socket file, as the previous generation records it.
fn file_id(path: &std::path::Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).unwrap();
    format!("{}:{}", m.dev(), m.ino())
}

/// An unused inherited Unix socket's file is removed by `ready()`, but only when the fd
/// really is bound at the path the table names and the file there is the one the
/// previous generation recorded (`DEV:INO`).
#[test]
fn ready_removes_only_the_socket_file_of_the_declared_fd() {
    let pipes = handshake();
    let dir = util::scratch_dir("hostile-ready");
    let victim = dir.join("victim.sock");
    let other = dir.join("other.sock");
    let _victim_listener = UnixListener::bind(&victim).unwrap();
    let other_listener = UnixListener::bind(&other).unwrap();
    // The fd is bound at other.sock, the table claims victim.sock (with its identity).
    let out = upgrade_child(
        &pipes,
        &format!(";5,unix,{},{}", victim.display(), file_id(&victim)),
    )
    .pass(&other_listener, 5)
    .env("TF_READY", "1")
    .run();
    assert_eq!(out.get("ready"), "ok", "{}", out.transcript);
    assert!(
        is_socket(&victim),
        "ready() removed a socket file it did not own"
    );
    assert!(is_socket(&other));
    // Declared truthfully but without the file's identity (as systemd's sockets are):
    // left alone.
    let out = upgrade_child(&pipes, &format!(";5,unix,{}", other.display()))
        .pass(&other_listener, 5)
        .env("TF_READY", "1")
        .run();
    assert_eq!(out.get("ready"), "ok", "{}", out.transcript);
    assert!(is_socket(&other), "a file of unknown identity was removed");
    // The control: declared truthfully with its identity and left unused, it is removed.
    let out = upgrade_child(
        &pipes,
        &format!(";5,unix,{},{}", other.display(), file_id(&other)),
    )
    .pass(&other_listener, 5)
    .env("TF_READY", "1")
    .run();
    assert_eq!(out.get("ready"), "ok", "{}", out.transcript);
    assert!(
        !other.exists(),
        "the unused inherited socket file was not removed"
    );
    assert!(is_socket(&victim));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The socket's file was unlinked and somebody else bound a socket at the same path:
/// the name still matches, but the file is not the recorded one, so it stays.
#[test]
fn ready_leaves_a_socket_file_swapped_in_by_someone_else() {
    let pipes = handshake();
    let dir = util::scratch_dir("hostile-swap");
    let path = dir.join("s.sock");
    let ours = UnixListener::bind(&path).unwrap();
    let recorded = file_id(&path);
    std::fs::remove_file(&path).unwrap();
    let _theirs = UnixListener::bind(&path).unwrap();
    assert_ne!(file_id(&path), recorded);
    let out = upgrade_child(&pipes, &format!(";5,unix,{},{recorded}", path.display()))
        .pass(&ours, 5)
        .env("TF_READY", "1")
        .run();
    assert_eq!(out.get("ready"), "ok", "{}", out.transcript);
    assert!(
        is_socket(&path),
        "ready() removed somebody else's socket file"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// Regressions found by the fuzzer (`fuzz/`).
// ---------------------------------------------------------------------------------------

/// An unknown kind was quoted whole in the reason (and Debug-escaped, so a 108-byte
/// kind made a 670-byte reason): the reason now quotes its first 16 bytes.
#[test]
fn fuzz_unknown_kind_reason_is_bounded() {
    let mut value = b"tableflip1;pid=0000000042;3,read".to_vec();
    value.extend_from_slice(&[0x1c; 108]);
    value.extend_from_slice(b"y@4,parent;5,tcp,:[::1]:80");
    let (entry, reason) = decode_fd_table(&value, 42).unwrap_err();
    assert!(reason.starts_with("unknown kind"), "{reason}");
    assert!(reason.len() <= 256, "{} bytes: {reason}", reason.len());
    assert!(entry.len() <= 203, "{} bytes: {entry}", entry.len());
}

// ---------------------------------------------------------------------------------------
// The pid file.
// ---------------------------------------------------------------------------------------

fn is_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// A child that writes `dir/app.pid` in `ready()`.
fn pid_file_child(dir: &Path) -> Spec {
    let mut spec = Spec::with(Table::Unset)
        .env("TF_PIDFILE", dir.join("app.pid"))
        .env("TF_READY", "1");
    spec.dir = Some(dir.to_path_buf());
    spec
}

#[test]
fn pid_file_is_world_readable_whatever_the_umask() {
    let dir = util::scratch_dir("hostile-pid");
    let out = pid_file_child(&dir).env("TF_UMASK", "077").run();
    assert_eq!(out.get("ready"), "ok", "{}", out.transcript);
    let pid_file = dir.join("app.pid");
    let content = std::fs::read_to_string(&pid_file).unwrap();
    assert_eq!(content, format!("{}\n", out.get("pid")));
    let meta = std::fs::symlink_metadata(&pid_file).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o644);
    assert_eq!(
        util::listing(&dir),
        ["app.pid"],
        "a temporary file was left behind"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A symlink planted at the temporary name a writer could once be expected to use
/// (`.NAME.PID.tmp`) is neither followed nor removed: the temporary name has a random
/// part nobody can guess, and what the crate did not make it leaves alone.
#[test]
fn pid_file_symlink_at_a_guessed_temp_name_is_left_alone() {
    let dir = util::scratch_dir("hostile-pid-link");
    let victim = dir.join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = pid_file_child(&dir)
        .env("TF_PLANT", format!("symlink:{}", victim.display()))
        .run();
    let planted = format!(".app.pid.{}.tmp", out.get("pid"));
    assert!(out.get("planted").ends_with(&planted));
    assert_eq!(out.get("ready"), "ok", "{}", out.transcript);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    let vm = std::fs::metadata(&victim).unwrap();
    assert_eq!(vm.permissions().mode() & 0o7777, 0o600);
    let pid_file = dir.join("app.pid");
    assert!(std::fs::symlink_metadata(&pid_file)
        .unwrap()
        .file_type()
        .is_file());
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap(),
        format!("{}\n", out.get("pid"))
    );
    assert_eq!(util::listing(&dir), [planted.as_str(), "app.pid", "victim"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pid file path that is a symlink is replaced by a file; its target is untouched.
#[test]
fn pid_file_that_is_a_symlink_is_replaced_not_followed() {
    let dir = util::scratch_dir("hostile-pid-target");
    let victim = dir.join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("app.pid")).unwrap();
    let victim_ino = std::fs::metadata(&victim).unwrap().ino();
    let out = pid_file_child(&dir).run();
    assert_eq!(out.get("ready"), "ok", "{}", out.transcript);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert_eq!(std::fs::metadata(&victim).unwrap().ino(), victim_ino);
    let meta = std::fs::symlink_metadata(dir.join("app.pid")).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(util::listing(&dir), ["app.pid", "victim"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[track_caller]
fn pid_file_error(out: &Outcome, dir: &Path) {
    assert_eq!(out.get("ready-error"), "PidFile", "{}", out.transcript);
    assert_eq!(Path::new(out.get("ready-path")), dir.join("app.pid"));
    assert!(out
        .get("ready-message")
        .contains(&dir.join("app.pid").display().to_string()));
}

#[test]
fn pid_file_over_a_directory_fails_and_leaves_no_temp_file() {
    let dir = util::scratch_dir("hostile-pid-dir");
    std::fs::create_dir(dir.join("app.pid")).unwrap();
    std::fs::write(dir.join("app.pid").join("keep"), "").unwrap();
    let out = pid_file_child(&dir).run();
    pid_file_error(&out, &dir);
    assert_eq!(
        util::listing(&dir),
        ["app.pid"],
        "a temporary file was left behind"
    );
    assert_eq!(util::listing(&dir.join("app.pid")), ["keep"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A directory planted at the temporary name a writer could once be expected to use
/// does not stop the write (it did: `File exists`, at every start and every upgrade),
/// and is not removed.
#[test]
fn pid_file_directory_at_a_guessed_temp_name_does_not_block_it() {
    let dir = util::scratch_dir("hostile-pid-tmpdir");
    let out = pid_file_child(&dir).env("TF_PLANT", "dir").run();
    assert_eq!(out.get("ready"), "ok", "{}", out.transcript);
    assert_eq!(
        std::fs::read_to_string(dir.join("app.pid")).unwrap(),
        format!("{}\n", out.get("pid"))
    );
    let planted = PathBuf::from(out.get("planted"));
    assert!(planted.is_dir());
    assert_eq!(util::listing(&dir).len(), 2, "{:?}", util::listing(&dir));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The child runs as `nobody` when the tests run as root (root may write anywhere).
#[test]
fn pid_file_in_an_unwritable_directory_fails_cleanly() {
    let dir = util::scratch_dir("hostile-pid-ro");
    let target = dir.join("ro");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = pid_file_child(&target).env("TF_NOBODY", "1").run();
    pid_file_error(&out, &target);
    assert!(
        out.get("ready-source").contains("ermission denied"),
        "{}",
        out.transcript
    );
    assert!(util::listing(&target).is_empty());
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// Unix socket files: removed by stop() only while they are still the socket bound.
// In-process: one Upgrader at a time, so each test holds the process-wide lock and
// drops its Upgrader before releasing it.
// ---------------------------------------------------------------------------------------

/// Binds a Unix listener at `dir/s.sock` through a fresh Upgrader, lets `replace` do
/// its worst to the path, then stops the Upgrader.
fn bind_replace_stop(tag: &str, replace: impl FnOnce(&Path)) -> PathBuf {
    let _lock = util::fork_lock();
    let dir = util::scratch_dir(tag);
    let path = dir.join("s.sock");
    let upg = Upgrader::new(Options::new()).unwrap();
    let listener = upg.fds().listen::<UnixListener>(&path).unwrap();
    assert!(is_socket(&path));
    replace(&path);
    upg.stop();
    drop(listener);
    drop(upg);
    path
}

#[test]
fn stop_removes_its_own_socket_file() {
    let path = bind_replace_stop("hostile-sock-own", |_| {});
    assert!(!path.exists(), "stop() left its socket file");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn stop_leaves_a_regular_file_at_the_socket_path_alone() {
    let path = bind_replace_stop("hostile-sock-file", |p| {
        std::fs::remove_file(p).unwrap();
        std::fs::write(p, "not a socket\n").unwrap();
    });
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket\n");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn stop_leaves_another_socket_at_the_socket_path_alone() {
    let mut other = None;
    let path = bind_replace_stop("hostile-sock-other", |p| {
        std::fs::remove_file(p).unwrap();
        let l = UnixListener::bind(p).unwrap();
        other = Some((l, std::fs::symlink_metadata(p).unwrap().ino()));
    });
    let (other, ino) = other.unwrap();
    assert!(is_socket(&path), "stop() removed a socket it had not bound");
    assert_eq!(std::fs::symlink_metadata(&path).unwrap().ino(), ino);
    drop(other);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn stop_leaves_a_symlink_at_the_socket_path_alone() {
    let mut target = PathBuf::new();
    let path = bind_replace_stop("hostile-sock-link", |p| {
        // The link points at the very socket file we bound, moved aside.
        target = p.with_file_name("moved.sock");
        std::fs::rename(p, &target).unwrap();
        std::os::unix::fs::symlink(&target, p).unwrap();
    });
    assert!(std::fs::symlink_metadata(&path)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(is_socket(&target));
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

// ---------------------------------------------------------------------------------------
// The handover channel's end: a `handover` entry that is not the parent's socket pair,
// and a parent that sends what the protocol does not allow. The parent commits here
// (the channel is used only after a commit).
// ---------------------------------------------------------------------------------------

/// A helper process: listens on the abstract `SOCK_SEQPACKET` name `name`, says so, and
/// waits to be killed. A socket connected to it has the helper for its peer.
fn seqpacket_listener(name: &str) -> ! {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};
    let fd = rustix::net::socket(AddressFamily::UNIX, SocketType::SEQPACKET, None).unwrap();
    let addr = SocketAddrUnix::new_abstract_name(name.as_bytes()).unwrap();
    rustix::net::bind(&fd, &addr).unwrap();
    rustix::net::listen(&fd, 8).unwrap();
    say("listening", name);
    std::thread::sleep(std::time::Duration::from_secs(25));
    quit();
}

/// The parent's side of a committing handshake, on a thread: reads `R`, writes `C`,
/// then reads the confirmation (`D`, or `H` and two versions) and runs `then`. Returns
/// what the child wrote on the readiness pipe, and what `then` returned.
fn committing<T: Send + 'static>(
    ready_rd: OwnedFd,
    commit_wr: OwnedFd,
    then: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<(Vec<u8>, Option<T>)> {
    committing_with(ready_rd, commit_wr, |_| b"C".to_vec(), then)
}

/// [`committing`], with `commit(child pid)` for the bytes written at the commit.
fn committing_with<T: Send + 'static>(
    ready_rd: OwnedFd,
    commit_wr: OwnedFd,
    commit: impl FnOnce(u32) -> Vec<u8> + Send + 'static,
    then: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<(Vec<u8>, Option<T>)> {
    let mut commit = Some(commit);
    std::thread::spawn(move || {
        let deadline = Instant::now() + util::DEADLINE;
        let mut said = Vec::new();
        while Instant::now() < deadline {
            let mut pfd = libc::pollfd {
                fd: ready_rd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd on our stack.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            if pfd.revents == 0 {
                continue;
            }
            let mut b = [0u8; 8];
            let n = rustix::io::read(&ready_rd, &mut b).unwrap_or(0);
            if n == 0 {
                break;
            }
            said.extend_from_slice(&b[..n]);
            if let (b"R", Some(commit)) = (said.as_slice(), commit.take()) {
                let bytes = commit(hostile_child());
                rustix::io::write(&commit_wr, &bytes).unwrap();
            }
            if said.starts_with(b"RD") || (said.starts_with(b"RH") && said.len() >= 4) {
                return (said, Some(then()));
            }
        }
        (said, None)
    })
}

/// Pipes for a child that reports ready and is committed to: (the child's ends
/// ready-write, lifeline-read, commit-read; the parent's ends ready-read, lifeline-write,
/// commit-write).
fn committing_pipes() -> ([OwnedFd; 3], [OwnedFd; 3]) {
    let pipe = || rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
    let (ready_rd, ready_wr) = pipe();
    let (life_rd, life_wr) = pipe();
    let (commit_rd, commit_wr) = pipe();
    (
        [ready_wr, life_rd, commit_rd],
        [ready_rd, life_wr, commit_wr],
    )
}

/// A child whose table names `handover` (at 9) as its handover channel; it becomes
/// ready, is committed to, and reports what the channel gives.
fn handover_child(child: &[OwnedFd; 3], handover: &impl AsFd) -> Spec {
    Spec::own(";3,ready;4,parent;8,commit;9,handover")
        .pass(&child[0], 3)
        .pass(&child[1], 4)
        .pass(&child[2], 8)
        .pass(handover, 9)
        .env("TF_READY", "1")
}

/// The channel named by a forged entry: refused with a reason naming the fd, left open
/// (it may be somebody else's), and the upgrade itself goes on.
#[track_caller]
fn forged_channel(handover: &impl AsFd, reason: &str) {
    let (child, parent) = committing_pipes();
    let [ready_rd, _life_wr, commit_wr] = parent;
    let confirm = committing(ready_rd, commit_wr, || ());
    let out = handover_child(&child, handover).run();
    let (said, _) = confirm.join().unwrap();
    let t = &out.transcript;
    assert_eq!(out.get("ready"), "ok", "{t}");
    assert_eq!(said, b"RH\x01\x01", "confirmed, with the channel: {t}");
    assert_eq!(out.get("handover-0-error"), "HandoverUnavailable", "{t}");
    let msg = out.get("handover-0-message");
    assert!(msg.contains("fd 9, named as the handover channel"), "{msg}");
    assert!(msg.contains(reason), "{msg} lacks {reason:?}");
    // Not used, not closed: still open (close-on-exec, as every adopted fd).
    assert!(out.get("fds-after").contains("9=cloexec"), "{t}");
}

#[test]
fn a_pipe_named_as_the_handover_channel_is_refused() {
    let (rd, _wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
    forged_channel(&rd, "is not a socket");
}

#[test]
fn a_stream_socket_named_as_the_handover_channel_is_refused() {
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    forged_channel(&a, "a stream socket, not a seqpacket socket");
}

#[test]
fn a_seqpacket_socket_of_another_process_named_as_the_handover_channel_is_refused() {
    let name = format!("tf-hostile-helper-{}", std::process::id());
    let _lock = util::fork_lock();
    let mut helper = Reaper(
        Command::new(std::env::current_exe().unwrap())
            .args(["hostile_entry", "--exact", "--ignored", "--nocapture"])
            .env("TF_HOSTILE", "1")
            .env("TF_SEQPACKET_LISTENER", &name)
            .env_remove(FD_TABLE_VAR)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = util::lines(helper.0.stdout.take().unwrap());
    loop {
        let line = lines
            .recv_timeout(util::DEADLINE)
            .expect("the helper listens");
        if line.starts_with("@@ listening") {
            break;
        }
    }
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};
    let fd = rustix::net::socket(AddressFamily::UNIX, SocketType::SEQPACKET, None).unwrap();
    let addr = SocketAddrUnix::new_abstract_name(name.as_bytes()).unwrap();
    rustix::net::connect(&fd, &addr).unwrap();
    drop(_lock);
    let helper_pid = helper.0.id();
    forged_channel(
        &fd,
        &format!(
            "is connected to pid {helper_pid}, not to the previous generation (pid {})",
            std::process::id()
        ),
    );
}

/// The parent's own pair, but what it sends is hostile: garbage, a version from the
/// future, a blob over its limit, a pipe declared as a TCP connection, then one real
/// connection. Each is refused with its reason (the parent is told which, by message
/// number or connection id), nothing the parent sent is used but the real connection,
/// and the channel carries on to it.
#[test]
fn a_hostile_old_generation_is_refused_message_by_message() {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let (mine, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    let (pipe_rd, _pipe_wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
    let (listener, addr) = tcp_listener();
    let client = std::net::TcpStream::connect(addr).unwrap();
    let (conn, _) = listener.accept().unwrap();
    let (child, parent) = committing_pipes();
    let [ready_rd, _life_wr, commit_wr] = parent;
    let confirm = committing(ready_rd, commit_wr, move || {
        let send = |msg: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]| {
            let mut space =
                vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
            let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
            if !fds.is_empty() {
                control.push(rustix::net::SendAncillaryMessage::ScmRights(fds));
            }
            let iov = [std::io::IoSlice::new(msg)];
            rustix::net::sendmsg(&mine, &iov, &mut control, rustix::net::SendFlags::empty())
                .unwrap();
        };
        send(b"\x00\x01 not a handover message", &[]);
        let mut future = conns(2, 1, 1, b"", b"");
        future[4] = 9;
        send(&future, &[conn.as_fd()]);
        let mut big = conns(3, 2, 1, b"", b"");
        big[28..32].copy_from_slice(&(1u32 << 20).to_le_bytes());
        send(&big, &[conn.as_fd()]);
        send(&conns(4, 3, 1, b"", b""), &[pipe_rd.as_fd()]);
        send(&conns(5, 4, 1, b"hello", b"\x07"), &[conn.as_fd()]);
        // The answers: read until the child is done.
        let mut answers = Vec::new();
        let mut buf = vec![0u8; 4096];
        let deadline = Instant::now() + util::DEADLINE;
        while answers.len() < 4 && Instant::now() < deadline {
            match rustix::net::recv(&mine, &mut buf, rustix::net::RecvFlags::DONTWAIT) {
                Ok((n, _)) if n > 0 => answers.push(buf[..n].to_vec()),
                Ok(_) => break,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
        (answers, pipe_rd, conn, client)
    });
    let out = handover_child(&child, &theirs)
        .env("TF_HANDOVER_EVENTS", "5")
        .run();
    drop(theirs);
    let (said, answers) = confirm.join().unwrap();
    let t = &out.transcript;
    assert_eq!(said, b"RH\x01\x01", "{t}");
    let (answers, pipe_rd, _conn, _client) = answers.expect("the child confirmed");
    for (i, want) in [
        "bad magic",
        "version 9 is not understood",
        "1048576 unread bytes is over the limit of 65536",
        "for connection 3 is not a socket, not the TCP connection its record says",
    ]
    .iter()
    .enumerate()
    {
        let key = format!("handover-{i}-error");
        assert_eq!(out.get(&key), "HandoverRefused", "{t}");
        let msg = out.get(&format!("handover-{i}-message"));
        assert!(msg.contains(want), "{key}: {msg} lacks {want:?}");
    }
    assert_eq!(out.get("handover-4-accepted"), "id=4 unread=hello", "{t}");
    // Told which: message 2 and 3 rejected by number, connection 3 refused, 4 accepted.
    let kinds: Vec<(u8, Vec<u8>)> = answers.iter().map(|a| (a[5], a[12..].to_vec())).collect();
    assert_eq!(kinds[0].0, b'R');
    assert_eq!(&kinds[0].1[..4], &2u32.to_le_bytes());
    assert_eq!(kinds[1].0, b'R');
    assert_eq!(&kinds[1].1[..4], &3u32.to_le_bytes());
    assert_eq!(kinds[2].0, b'A');
    assert_eq!(
        (&kinds[2].1[..8], kinds[2].1[8]),
        (&3u64.to_le_bytes()[..], 2),
        "refused"
    );
    assert_eq!(kinds[3].0, b'A');
    assert_eq!(
        (&kinds[3].1[..8], kinds[3].1[8]),
        (&4u64.to_le_bytes()[..], 1),
        "accepted"
    );
    // The pipe the "old generation" sent is its own, still open.
    assert!(rustix::io::fcntl_getfd(&pipe_rd).is_ok());
}

/// A `C` message with one record, written by hand from the module docs' table (the
/// test does not use the crate's encoder): sequence `seq`, connection `id`, kind
/// `kind`, `unread` and `state`.
fn conns(seq: u32, id: u64, kind: u8, unread: &[u8], state: &[u8]) -> Vec<u8> {
    let mut m = b"TFHO\x01C".to_vec();
    m.extend_from_slice(&1u16.to_le_bytes());
    m.extend_from_slice(&seq.to_le_bytes());
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&0x4c49_4e31u32.to_le_bytes());
    m.extend_from_slice(&[kind, 0, 0, 0]);
    m.extend_from_slice(&(unread.len() as u32).to_le_bytes());
    m.extend_from_slice(&(state.len() as u32).to_le_bytes());
    m.extend_from_slice(unread);
    m.extend_from_slice(state);
    m
}

// ---------------------------------------------------------------------------------------
// The upgrade records that come with the commit: believed only when well formed and
// addressed to this upgrade; anything else is ignored as a whole, and the upgrade goes on.
// ---------------------------------------------------------------------------------------

/// The child this test started (the one process of ours running `hostile_entry`).
fn hostile_child() -> u32 {
    let me = std::process::id();
    util::children_of(me)
        .into_iter()
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(13).any(|w| w == b"hostile_entry"))
        })
        .expect("the child")
}

/// What a fake parent writes at the commit, given the child's pid.
type CommitBytes = dyn FnOnce(u32) -> Vec<u8> + Send;

/// `C`, then a payload of `lines` with a header that counts them right.
fn commit_with(lines: &[String]) -> Vec<u8> {
    let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
    format!("Ctableflip-records/1 {}\n{body}", body.len()).into_bytes()
}

/// A child committed to with `commit(its pid)`: how many records it then keeps.
fn records_after(commit: impl FnOnce(u32) -> Vec<u8> + Send + 'static) -> (String, Outcome) {
    let (child, parent) = committing_pipes();
    let [ready_rd, _life_wr, commit_wr] = parent;
    let confirm = committing_with(ready_rd, commit_wr, commit, || ());
    let out = Spec::own(";3,ready;4,parent;8,commit")
        .pass(&child[0], 3)
        .pass(&child[1], 4)
        .pass(&child[2], 8)
        .env("TF_READY", "1")
        .run();
    let (said, done) = confirm.join().unwrap();
    let t = &out.transcript;
    // The upgrade went on: the child took over and confirmed.
    assert_eq!(out.get("ready"), "ok", "{t}");
    assert!(done.is_some(), "no confirmation: {said:?}\n{t}");
    (out.get("records").to_string(), out)
}

#[test]
fn commit_records_are_believed_only_when_well_formed() {
    let me = std::process::id();
    let line = move |child: u32| {
        format!(
            "pid={me} started=1767225600250 result=ok new={child} ended=1500 ready=1000 age=2000"
        )
    };
    // Well formed and addressed to this upgrade: kept (so the refusals below mean
    // something), with an older record before it.
    let (n, out) = records_after(move |child| {
        let older = format!("pid={me} started=1767225500000 result=error kind=ChildExited message=exit%20status:%203 ended=900");
        commit_with(&[older, line(child)])
    });
    assert_eq!(n, "2", "{}", out.transcript);
    assert_eq!(
        out.get("record"),
        format!("{me} -> Ok({})", hostile_child_pid(&out))
    );

    let bad: Vec<(&str, Box<CommitBytes>)> = vec![
        (
            "another child's",
            Box::new(move |c| commit_with(&[line(c + 1)])),
        ),
        (
            "another parent's",
            Box::new(move |c| commit_with(&[line(c).replace(&format!("pid={me} "), "pid=1 ")])),
        ),
        (
            "no age",
            Box::new(move |c| commit_with(&[line(c).replace(" age=2000", "")])),
        ),
        (
            "an age on an older record",
            Box::new(move |c| commit_with(&[line(c), line(c)])),
        ),
        (
            "a phase after the end",
            Box::new(move |c| commit_with(&[line(c).replace("ready=1000", "ready=9000")])),
        ),
        (
            "an unescaped message",
            Box::new(move |c| {
                commit_with(&[
                    format!("pid={me} started=1 result=error kind=X message=a b ended=1"),
                    line(c),
                ])
            }),
        ),
        (
            "a count past u64",
            Box::new(move |c| commit_with(&[format!("{} handed=99999999999999999999", line(c))])),
        ),
        (
            "a length that lies",
            Box::new(move |c| {
                let mut b = commit_with(&[line(c)]);
                b.extend_from_slice(b"pid=1\n");
                b
            }),
        ),
        (
            "nine records",
            Box::new(move |c| {
                let older = format!("pid={me} started=1 result=ok new=5 ended=1");
                let mut lines = vec![older; 8];
                lines.push(line(c));
                commit_with(&lines)
            }),
        ),
        (
            "4 KiB of garbage",
            Box::new(|_| {
                let mut b = b"C".to_vec();
                b.extend(std::iter::repeat_n(0xffu8, 4200));
                b
            }),
        ),
        (
            "a newer format",
            Box::new(move |c| {
                let mut b = commit_with(&[line(c)]);
                b[19] = b'2';
                b
            }),
        ),
    ];
    for (what, commit) in bad {
        let (n, out) = records_after(commit);
        assert_eq!(n, "0", "{what}: believed\n{}", out.transcript);
    }
}

/// The child's pid, from its report.
fn hostile_child_pid(out: &Outcome) -> String {
    out.get("pid").to_string()
}
