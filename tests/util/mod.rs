//! Shared helpers for the multi-process tests.
//!
//! A test starts its own test binary again (running only the ignored `scenario_entry`
//! test) with `TF_SCENARIO` set: that process, and every generation it upgrades to, runs
//! [`scenario`]. Generations report what happens as lines `@@ <pid> <event> ...` on the
//! stdout pipe they all share; the test reads them with a deadline. Behaviour of the next
//! generation is chosen by writing a file `next` in the run's directory before sending
//! SIGHUP.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use std::os::unix::net::{UnixDatagram, UnixListener};

use tableflip::{Error, Options, SeqpacketListener, UnixAddr, Upgrader};

/// Tests that start processes hold this lock until their processes are gone, so that
/// parallel tests never see (or reap) each other's children.
static FORK_LOCK: Mutex<()> = Mutex::new(());

/// How long any single expected event may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn fork_lock() -> MutexGuard<'static, ()> {
    FORK_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A unique scratch directory, removed on drop of the [`Run`].
pub fn scratch_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("tf-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The names in `dir`, sorted.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// One event line: `@@ <pid> <event> <rest>`.
#[derive(Debug, Clone)]
pub struct Event {
    pub pid: u32,
    pub name: String,
    pub rest: String,
}

impl Event {
    /// The value of `key=value` in the rest of the line.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.rest
            .split(' ')
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }
}

/// A running scenario: the first generation and the event stream of all of them.
pub struct Run {
    pub dir: PathBuf,
    first: Child,
    events: Receiver<String>,
    backlog: VecDeque<Event>,
    history: Vec<String>,
    pids: Vec<u32>,
    _lock: MutexGuard<'static, ()>,
}

/// The argv the scenario processes run with (argv[0] is added by the caller). The odd
/// filter argument checks that argv travels byte for byte.
pub fn scenario_args() -> Vec<OsString> {
    [
        "scenario_entry",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
        "odd arg;x=%41 é",
    ]
    .iter()
    .map(OsString::from)
    .collect()
}

impl Run {
    pub fn start(scenario: &str, env: &[(&str, String)]) -> Run {
        Run::start_with(scenario, env, None, |_| {})
    }

    /// Starts with `mode` already in the `next` file, for the first generation.
    pub fn start_mode(scenario: &str, env: &[(&str, String)], mode: &str) -> Run {
        Run::start_with(scenario, env, Some(mode), |_| {})
    }

    pub fn start_with(
        scenario: &str,
        env: &[(&str, String)],
        mode: Option<&str>,
        configure: impl FnOnce(&mut Command),
    ) -> Run {
        Run::start_inner(scenario, env, mode, None, configure)
    }

    /// Starts the scenario through `sh -c SCRIPT`, which must end with `exec "$@"`
    /// (the test binary and its arguments follow).
    pub fn start_via_shell(
        scenario: &str,
        env: &[(&str, String)],
        script: &str,
        configure: impl FnOnce(&mut Command),
    ) -> Run {
        Run::start_inner(scenario, env, None, Some(script), configure)
    }

    fn start_inner(
        scenario: &str,
        env: &[(&str, String)],
        mode: Option<&str>,
        script: Option<&str>,
        configure: impl FnOnce(&mut Command),
    ) -> Run {
        let lock = fork_lock();
        let dir = scratch_dir(scenario);
        if let Some(mode) = mode {
            std::fs::write(dir.join("next"), mode).unwrap();
        }
        let exe = std::env::current_exe().unwrap();
        let mut cmd = match script {
            None => Command::new(&exe),
            Some(script) => {
                let mut c = Command::new("/bin/sh");
                c.arg("-c").arg(script).arg(&exe);
                c
            }
        };
        cmd.args(scenario_args())
            .env("TF_SCENARIO", scenario)
            .env("TF_DIR", &dir)
            .env_remove("TABLEFLIP_FDS")
            .env_remove("RUST_TEST_THREADS")
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        configure(&mut cmd);
        let mut first = cmd.spawn().expect("spawn scenario");
        let rx = lines(first.stdout.take().unwrap());
        let pid = first.id();
        Run {
            dir,
            first,
            events: rx,
            backlog: VecDeque::new(),
            history: Vec::new(),
            pids: vec![pid],
            _lock: lock,
        }
    }

    /// The next event named `name` (earlier events of other names are kept for later).
    #[track_caller]
    pub fn expect(&mut self, name: &str) -> Event {
        self.expect_where(name, |_| true)
    }

    /// The next event named `name` from a process other than `pid`.
    #[track_caller]
    pub fn expect_not_from(&mut self, name: &str, pid: u32) -> Event {
        self.expect_where(name, |e| e.pid != pid)
    }

    /// The next event named `name` from process `pid`.
    #[track_caller]
    pub fn expect_from(&mut self, name: &str, pid: u32) -> Event {
        self.expect_where(name, |e| e.pid == pid)
    }

    /// The outcome of an upgrade started by `pid`: its `upgrade-ok` or `upgrade-error`.
    #[track_caller]
    pub fn expect_upgrade_result(&mut self, pid: u32) -> std::result::Result<u32, Event> {
        let pos = |run: &Self| {
            run.backlog
                .iter()
                .position(|e| e.pid == pid && e.name.starts_with("upgrade-"))
        };
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(i) = pos(self) {
                let ev = self.backlog.remove(i).unwrap();
                return match ev.name.as_str() {
                    "upgrade-ok" => Ok(ev.field("pid").unwrap().parse().unwrap()),
                    _ => Err(ev),
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(line) => {
                    self.history.push(line.clone());
                    if let Some(ev) = parse(&line) {
                        if !self.pids.contains(&ev.pid) {
                            self.pids.push(ev.pid);
                        }
                        self.backlog.push_back(ev);
                    }
                }
                Err(e) => panic!(
                    "no upgrade result from {pid} ({e:?}); output so far:\n{}",
                    self.history.join("\n")
                ),
            }
        }
    }

    #[track_caller]
    pub fn expect_where(&mut self, name: &str, pred: impl Fn(&Event) -> bool) -> Event {
        if let Some(i) = self.backlog.iter().position(|e| e.name == name && pred(e)) {
            return self.backlog.remove(i).unwrap();
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(line) => {
                    self.history.push(line.clone());
                    let Some(ev) = parse(&line) else { continue };
                    if !self.pids.contains(&ev.pid) {
                        self.pids.push(ev.pid);
                    }
                    if ev.name == name && pred(&ev) {
                        return ev;
                    }
                    self.backlog.push_back(ev);
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "no {name:?} event within {DEADLINE:?}; output so far:\n{}",
                    self.history.join("\n")
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "every process exited before a {name:?} event; output:\n{}",
                    self.history.join("\n")
                ),
            }
        }
    }

    /// Waits until every process of the run has closed stdout (they have all exited).
    #[track_caller]
    pub fn expect_all_exited(&mut self) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(line) => self.history.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "processes still running after {DEADLINE:?}; output:\n{}",
                    self.history.join("\n")
                ),
            }
        }
        let _ = self.first.wait();
    }

    /// Takes in the events printed so far, without waiting (see [`seen`](Run::seen)).
    pub fn take_printed(&mut self) {
        while let Ok(line) = self.events.try_recv() {
            self.history.push(line.clone());
            if let Some(ev) = parse(&line) {
                if !self.pids.contains(&ev.pid) {
                    self.pids.push(ev.pid);
                }
                self.backlog.push_back(ev);
            }
        }
    }

    /// Events seen so far (backlog), for assertions that something did *not* happen.
    pub fn seen(&self, name: &str) -> bool {
        self.backlog.iter().any(|e| e.name == name)
    }

    /// Chooses what the next generation does (see [`scenario`]).
    pub fn next(&self, mode: &str) {
        std::fs::write(self.dir.join("next"), mode).unwrap();
    }

    pub fn first_pid(&self) -> u32 {
        self.first.id()
    }

    pub fn wait_first(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(st) = self.first.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "first generation did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        for &pid in &self.pids {
            signal(pid, libc::SIGKILL);
        }
        let _ = self.first.kill();
        let _ = self.first.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The lines of `out`, read on a thread of their own, as they arrive.
pub fn lines(out: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn parse(line: &str) -> Option<Event> {
    let rest = line.strip_prefix("@@ ")?;
    let mut it = rest.splitn(3, ' ');
    let pid = it.next()?.parse().ok()?;
    let name = it.next()?.to_string();
    let rest = it.next().unwrap_or("").to_string();
    Some(Event { pid, name, rest })
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid and a signal number has no memory effects.
    unsafe { libc::kill(pid as i32, sig) };
}

/// Whether a process exists at all (a zombie counts: it has not been reaped).
pub fn exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether `pid` has exited: gone, or a zombie waiting for its reaper (an old
/// generation is reparented to PID 1, which may take its time to reap it). Every
/// thread counts: a main thread shows as a zombie while the others still run.
pub fn exited(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat")).map_or(true, |stat| {
            // The state follows the parenthesised command name.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state == "Z" || state == "X")
        })
    })
}

/// Polls until `pid` has exited (see [`exited`]); every one of its threads is done then.
#[track_caller]
pub fn wait_gone(pid: u32) {
    let deadline = Instant::now() + DEADLINE;
    while !exited(pid) {
        assert!(Instant::now() < deadline, "process {pid} still exists");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Connects and reads the reply; returns the pid that answered.
pub fn ask(addr: SocketAddr) -> std::io::Result<u32> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    reply
        .trim()
        .strip_prefix("pid=")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad reply {reply:?}")))
}

/// Children of `pid` (all threads), from /proc.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    out
}

/// The inode of a socket fd, as `/proc/self/fd` shows it (`socket:[123]` → `123`).
pub fn socket_inode(fd: i32) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| {
            p.to_string_lossy()
                .trim_start_matches("socket:[")
                .trim_end_matches(']')
                .to_string()
        })
        .unwrap_or_default()
}

/// The inodes of every socket this process has open, sorted.
pub fn open_socket_inodes() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|p| p.to_string_lossy().into_owned())
                .filter_map(|p| {
                    Some(
                        p.strip_prefix("socket:[")?
                            .trim_end_matches(']')
                            .to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The state a process with `pid` hands over: `n` bytes that depend on the pid.
pub fn state_bytes(pid: u32, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(pid) as u8)
        .collect()
}

/// FNV-1a, to compare blobs through one event line.
pub fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// The scenario program: what every generation runs.
// ---------------------------------------------------------------------------------------

pub fn say(msg: impl AsRef<str>) {
    let line = format!("\n@@ {} {}\n", std::process::id(), msg.as_ref());
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

/// A short name for an error variant, for the test to match on.
pub fn kind(e: &Error) -> &'static str {
    match e {
        Error::AlreadyCreated => "AlreadyCreated",
        Error::FdTable { .. } => "FdTable",
        Error::WrongKind { .. } => "WrongKind",
        Error::Listen { .. } => "Listen",
        Error::NotReady => "NotReady",
        Error::UpgradeInProgress => "UpgradeInProgress",
        Error::AlreadyUpgraded => "AlreadyUpgraded",
        Error::Stopped => "Stopped",
        Error::ParentAlive { .. } => "ParentAlive",
        Error::Exec { .. } => "Exec",
        Error::ChildExited { .. } => "ChildExited",
        Error::Timeout { .. } => "Timeout",
        Error::ChildFailed { .. } => "ChildFailed",
        Error::ChildDiedAfterReady { .. } => "ChildDiedAfterReady",
        Error::WorkingDirectory { .. } => "WorkingDirectory",
        Error::Notify { .. } => "Notify",
        Error::StateTooLarge { .. } => "StateTooLarge",
        Error::PidFile { .. } => "PidFile",
        Error::Control { .. } => "Control",
        Error::ControlPeer { .. } => "ControlPeer",
        Error::Remote { .. } => "Remote",
        Error::HandoverUnavailable { .. } => "HandoverUnavailable",
        Error::HandoverEnded { .. } => "HandoverEnded",
        Error::HandoverRefused { .. } => "HandoverRefused",
        Error::Io { .. } => "Io",
        _ => "Other",
    }
}

fn describe(e: &Error) -> String {
    let mut s = format!("kind={} msg={}", kind(e), e.to_string().replace(' ', "_"));
    if let Some(io) = e.io_error() {
        s.push_str(&format!(" cause={}", io.to_string().replace(' ', "_")));
    }
    s
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The signals whose disposition is `SIG_IGN`, comma-separated.
fn ignored_signals() -> String {
    let ignored = (1..=libc::SIGRTMAX()).filter(|&sig| {
        // SAFETY: a zeroed sigaction is a valid value to be overwritten.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: a query: no new action, the current one written to `old`.
        let rc = unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) };
        rc == 0 && old.sa_sigaction == libc::SIG_IGN
    });
    ignored.map(|s| s.to_string()).collect::<Vec<_>>().join(",")
}

/// Entry point of every scenario process. Never returns.
///
/// Environment: `TF_DIR` (scratch dir, also the initial working directory), `TF_TCP`
/// (comma-separated addresses to listen on), `TF_UNIX` (a path), `TF_ABSTRACT` (a name),
/// `TF_PIDFILE`, `TF_EXE`, `TF_TIMEOUT_MS`, `TF_FAILS` (run that many upgrades in a row
/// right after ready and report fd counts), `TF_FD_STORE` (`1`/`0`: `Options::fd_store`),
/// `TF_EXIT_WAITER` (a thread on the exit handle reports what it learns, and the process
/// exits when it is done).
///
/// The file `$TF_DIR/next` holds space-separated words for the generation that reads it
/// at start-up: `exit N` (exit before `Upgrader::new`), `abort` (die by SIGABRT),
/// `hang` (never become ready), `noreq` (take no fds), `wrongkind` (ask for the Unix
/// listener as a datagram socket first), `chdir` (change directory after `new`),
/// `crash MS` (abort that long after reporting ready), `delay-us N` (report ready that
/// much later), with `TF_PROBATION_MS` for `Options::probation`.
/// (A file `linger` holding milliseconds makes a generation linger after exit fires.)
pub fn scenario(name: &str) -> ! {
    // Watchdog: a scenario process never outlives a minute.
    // SAFETY: alarm(2) only arms a timer.
    unsafe { libc::alarm(60) };
    // `TF_SIGPIPE_DEFAULT`: die of SIGPIPE like a C program, so that a write to a closed
    // socket without MSG_NOSIGNAL shows. (The handshake's pipes never see one here.)
    if env("TF_SIGPIPE_DEFAULT").is_some() {
        // SAFETY: setting a signal's disposition to its default has no memory effects.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let dir = PathBuf::from(env("TF_DIR").expect("TF_DIR"));
    let mode = std::fs::read_to_string(dir.join("next")).unwrap_or_default();
    let words: Vec<&str> = mode.split_whitespace().collect();
    let arg = |w: &str| -> Option<u64> {
        let i = words.iter().position(|x| *x == w)?;
        words.get(i + 1)?.parse().ok()
    };
    let has = |w: &str| words.contains(&w);
    let args: Vec<String> = std::env::args_os()
        .map(|a| format!("{a:?}").replace(' ', "_"))
        .collect();
    say(format!(
        "start mode={} args={}",
        words.join("+"),
        args.join("|")
    ));

    // `TF_IGNORE_SIGNALS`: report the signals this process started with ignored, then
    // ignore SIGUSR2 and SIGRTMAX, which the next generation must find at their default.
    if env("TF_IGNORE_SIGNALS").is_some() {
        say(format!("signals ignored={}", ignored_signals()));
        for sig in [libc::SIGUSR2, libc::SIGRTMAX()] {
            // SAFETY: SIG_IGN installs no handler.
            unsafe { libc::signal(sig, libc::SIG_IGN) };
        }
    }

    if let Some(code) = arg("exit") {
        std::process::exit(code as i32);
    }
    if has("abort") {
        std::process::abort();
    }
    if has("hang") {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }

    let mut opts = Options::new();
    if let Some(ms) = env("TF_TIMEOUT_MS") {
        opts = opts.upgrade_timeout(Duration::from_millis(ms.parse().unwrap()));
    }
    if let Some(p) = env("TF_PIDFILE") {
        opts = opts.pid_file(p);
    }
    if let Some(p) = env("TF_EXE") {
        opts = opts.executable(p);
    }
    if env("TF_OVERLAP").is_some() {
        opts = opts.upgrade_during_drain(true);
    }
    // `TF_FD_STORE=1` asks for the fd store, `0` refuses it (unset: as `$FDSTORE` says).
    if let Some(v) = env("TF_FD_STORE") {
        opts = opts.fd_store(v != "0");
    }
    if let Some(ms) = env("TF_PROBATION_MS") {
        opts = opts.probation(Duration::from_millis(ms.parse().unwrap()));
    }
    // `TF_CLOEXEC3`: mark fd 3 close-on-exec first, as libsystemd's sd_listen_fds() does.
    if env("TF_CLOEXEC3").is_some() {
        // SAFETY: F_SETFD on fd 3 changes only its descriptor flag.
        unsafe { libc::fcntl(3, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    let upg = match Upgrader::new(opts) {
        Ok(u) => Arc::new(u),
        Err(e) => {
            say(format!("new-error {}", describe(&e)));
            std::process::exit(2);
        }
    };
    say(format!("new has_parent={}", upg.has_parent()));
    // `TF_EXIT_WAITER`: a thread that waits on the exit handle, as a tokio task would,
    // and then reports what it can learn: whether it was an upgrade, and the new pid.
    // The process then exits as soon as that thread is done, as a program whose `main`
    // ends with that task would: the upgrade threads are not waited for.
    let exit_waiter = env("TF_EXIT_WAITER").map(|_| {
        let handle = upg.exit().try_clone().unwrap();
        let u = Arc::clone(&upg);
        std::thread::spawn(move || {
            handle.wait();
            let last = u.status().last_upgrade().map(|l| l.result.clone());
            say(format!(
                "exit-waiter upgraded={} new_pid={}",
                u.exit().upgraded(),
                match last {
                    Some(Ok(pid)) => pid.to_string(),
                    Some(Err(e)) => format!("error:{}", e.kind),
                    None => "none".into(),
                }
            ));
        })
    });
    let inherited: Vec<String> = upg
        .fds()
        .inherited()
        .iter()
        .map(|i| format!("{}:{}", i.kind, i.key).replace(' ', "_"))
        .collect();
    say(format!("inherited list={}", inherited.join(",")));

    if has("fail") {
        upg.fail("config line 12: unknown key");
    }
    // `TF_STATE_BYTES=N`: report the state handed over (unless `nostate`), then hand
    // over N bytes of our own (see `state_bytes`).
    if let Some(n) = env("TF_STATE_BYTES") {
        if !has("nostate") {
            match upg.fds().take_state() {
                Ok(Some(b)) => say(format!("state len={} sum={}", b.len(), checksum(&b))),
                Ok(None) => say("state none"),
                Err(e) => say(format!("state-error {}", describe(&e))),
            }
        }
        let bytes = state_bytes(std::process::id(), n.parse().unwrap());
        match upg.fds().set_state(&bytes) {
            Ok(()) => say("state-set ok"),
            Err(e) => say(format!("state-set {}", describe(&e))),
        }
    }

    if name == "api" {
        api_checks(&upg);
    }
    if has("chdir") {
        std::env::set_current_dir("/").unwrap();
    }

    let mut listeners = Vec::new();
    if !has("noreq") {
        for addr in env("TF_TCP")
            .unwrap_or_default()
            .split(',')
            .filter(|a| !a.is_empty())
        {
            match upg.fds().listen::<TcpListener>(addr) {
                Ok(ln) => {
                    say(format!("tcp addr={}", ln.local_addr().unwrap()));
                    listeners.push(ln);
                }
                Err(e) => say(format!("listen-error {}", describe(&e))),
            }
        }
        let unix = env("TF_UNIX")
            .map(|p| UnixAddr::Path(p.into()))
            .or_else(|| env("TF_ABSTRACT").map(UnixAddr::abstract_name));
        if let Some(addr) = unix {
            if has("wrongkind") {
                match upg.fds().listen::<UnixDatagram>(addr.clone()) {
                    Ok(_) => say("wrongkind result=accepted"),
                    Err(e) => say(format!("wrongkind {}", describe(&e))),
                }
                match upg.fds().take::<UnixListener>(addr.clone()) {
                    Ok(found) => say(format!("unix-lookup found={}", found.is_some())),
                    Err(e) => say(format!("unix-lookup {}", describe(&e))),
                }
            }
            match upg.fds().listen::<UnixListener>(addr) {
                Ok(ln) => {
                    say("unix ok");
                    std::mem::forget(ln);
                }
                Err(e) => say(format!("listen-error {}", describe(&e))),
            }
        }
        // `TF_AUTOBIND`: a Unix listener whose name the kernel chooses.
        if env("TF_AUTOBIND").is_some() {
            match upg.fds().listen::<UnixListener>("") {
                Ok(ln) => {
                    let name = match ln.local_addr().ok().and_then(|a| {
                        std::os::linux::net::SocketAddrExt::as_abstract_name(&a).map(<[u8]>::to_vec)
                    }) {
                        Some(n) => String::from_utf8_lossy(&n).into_owned(),
                        None => "(none)".into(),
                    };
                    say(format!(
                        "autobind name={name} inode={}",
                        socket_inode(ln.as_raw_fd())
                    ));
                    std::mem::forget(ln);
                }
                Err(e) => say(format!("listen-error {}", describe(&e))),
            }
        }
        // `TF_SEQPACKET=PATH`: a SOCK_SEQPACKET listener.
        if let Some(path) = env("TF_SEQPACKET") {
            match upg.fds().listen::<SeqpacketListener>(path.as_str()) {
                Ok(ln) => {
                    say(format!("seqpacket inode={}", socket_inode(ln.as_raw_fd())));
                    std::mem::forget(ln);
                }
                Err(e) => say(format!("listen-error {}", describe(&e))),
            }
        }
        // `extra` with `TF_EXTRA_UNIX=PATH`: a Unix listener only this generation binds.
        if let (true, Some(path)) = (has("extra"), env("TF_EXTRA_UNIX")) {
            match upg.fds().listen::<UnixListener>(path.as_str()) {
                Ok(ln) => {
                    say("extra ok");
                    std::mem::forget(ln);
                }
                Err(e) => say(format!("listen-error {}", describe(&e))),
            }
        }
    }
    // `dropfail`: give up before ready by returning an error, dropping the Upgrader
    // (unlike `exit N`, which never runs destructors).
    if has("dropfail") {
        drop(listeners);
        // The only reference: this runs Upgrader's destructor (stop()).
        drop(Arc::into_inner(upg).expect("one reference"));
        say("dropped");
        std::process::exit(4);
    }
    // Signals: SIGHUP upgrades (each on its own thread, so two can overlap), SIGTERM stops.
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGHUP, libc::SIGTERM]).unwrap();
    let u = Arc::clone(&upg);
    static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
    std::thread::spawn(move || {
        for sig in signals.forever() {
            let u = Arc::clone(&u);
            if sig == libc::SIGTERM {
                u.stop();
                say("stopped");
                continue;
            }
            IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                match u.upgrade() {
                    Ok(pid) => say(format!("upgrade-ok pid={pid}")),
                    Err(e) => say(format!(
                        "upgrade-error {} children={}",
                        describe(&e),
                        children_of(std::process::id()).len()
                    )),
                }
                IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });

    // `TF_GROUP=ADDR` with the word `group N` in `next` (default 2): a SO_REUSEPORT group.
    if let Some(addr) = env("TF_GROUP") {
        let n = arg("group").unwrap_or(2) as usize;
        match upg.fds().listen_group::<TcpListener>(addr.as_str(), n) {
            Ok(group) => {
                let inodes: Vec<String> =
                    group.iter().map(|l| socket_inode(l.as_raw_fd())).collect();
                say(format!(
                    "group port={} inodes={}",
                    group[0].local_addr().unwrap().port(),
                    inodes.join(",")
                ));
                listeners.extend(group);
            }
            Err(e) => say(format!("listen-error {}", describe(&e))),
        }
    }
    // `crash MS`: die by SIGABRT that long after reporting ready (from another thread:
    // ready() may still be waiting for the commit).
    if let Some(ms) = arg("crash") {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            say("crashing");
            std::process::abort();
        });
    }
    // `hang-after-listen`: never report ready, with every socket taken or bound.
    if has("hang-after-listen") {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    // `delay-us N`: report ready that much later.
    if let Some(us) = arg("delay-us") {
        std::thread::sleep(Duration::from_micros(us));
    }
    // `TF_CONTROL=PATH` (or `@NAME`): a control socket, taken before ready() and served
    // once ready, with `TF_CONTROL_REQUEST_MS` as its request timeout,
    // `TF_CONTROL_MODE` (octal) as its file mode, `TF_CONTROL_ALLOW_UID` as one more uid
    // allowed; `TF_CONTROL_ONE` serves it with `serve_one` in a poll loop.
    #[cfg(feature = "control")]
    let control = env("TF_CONTROL").and_then(|addr| {
        let addr = match addr.strip_prefix('@') {
            Some(name) => UnixAddr::abstract_name(name),
            None => UnixAddr::Path(addr.into()),
        };
        let mut config = tableflip::control::Config::new();
        if let Some(ms) = env("TF_CONTROL_REQUEST_MS") {
            config = config.request_timeout(Duration::from_millis(ms.parse().unwrap()));
        }
        if let Some(mode) = env("TF_CONTROL_MODE") {
            config = config.mode(u32::from_str_radix(&mode, 8).unwrap());
        }
        if let Some(uid) = env("TF_CONTROL_ALLOW_UID") {
            config = config.allow_uid(uid.parse().unwrap());
        }
        match tableflip::control::Server::listen_with(&upg, addr, config) {
            Ok(server) => {
                say("control ok");
                Some(server)
            }
            Err(e) => {
                say(format!("control-error {}", describe(&e)));
                None
            }
        }
    });
    say("reporting");
    let adoption = match upg.ready() {
        Ok(a) => Some(a),
        Err(e) => {
            say(format!("ready-error {}", describe(&e)));
            std::process::exit(3);
        }
    };
    let adoption = adoption.expect("ready");
    say(format!(
        "ready fds={} sockets={} taken={} closed={}",
        fd_count(),
        open_socket_inodes().join(","),
        adoption.taken.len(),
        adoption.closed.len()
    ));

    if let Some(n) = env("TF_FAILS") {
        std::fs::write(dir.join("next"), "exit 1").unwrap();
        let before = fd_count();
        let mut kinds = Vec::new();
        for _ in 0..n.parse::<usize>().unwrap() {
            kinds.push(upg.upgrade().map(|_| "Ok").unwrap_or_else(|e| kind(&e)));
        }
        kinds.dedup();
        say(format!(
            "fails before={before} after={} kinds={} children={}",
            fd_count(),
            kinds.join(","),
            children_of(std::process::id()).len()
        ));
    }

    #[cfg(feature = "control")]
    let control = control.map(|server| {
        let u = Arc::clone(&upg);
        let one = env("TF_CONTROL_ONE").is_some();
        std::thread::spawn(move || {
            let result = if one {
                serve_one_by_one(&server, &u)
            } else {
                server.serve(&u)
            };
            if let Err(e) = result {
                say(format!("control-serve-error {}", describe(&e)));
            }
        })
    });
    serve(&upg, &listeners);
    if let Some(waiter) = exit_waiter {
        let _ = waiter.join();
        say("exit");
        std::process::exit(0);
    }
    // The control socket answers the request that ended this generation, then returns.
    #[cfg(feature = "control")]
    if let Some(control) = control {
        let _ = control.join();
        say("control-done");
    }
    // Let the upgrade threads report before exiting.
    let deadline = Instant::now() + Duration::from_secs(5);
    while IN_FLIGHT.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    // `TF_DRAIN_COUNTS="D F"`: after an upgrade, a drain that reports D connections
    // drained and F cut (before the linger below: the new generation sees the gap).
    if let (Some(counts), true) = (env("TF_DRAIN_COUNTS"), upg.exit().upgraded()) {
        let (d, f) = counts.split_once(' ').expect("TF_DRAIN_COUNTS=\"D F\"");
        let drain = upg.exit().drain(Duration::from_secs(5));
        let _ = drain.tick();
        drain.finish(d.parse().unwrap(), f.parse().unwrap());
        say("drained");
    }
    // `$TF_DIR/linger` (read at exit time): keep running that many ms after being told
    // to exit, like a generation draining long connections.
    if let Some(ms) = std::fs::read_to_string(dir.join("linger"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
    say("exit");
    std::process::exit(0);
}

/// A poll loop around `Server::serve_one`, until the exit fd fires.
#[cfg(feature = "control")]
fn serve_one_by_one(server: &tableflip::control::Server, upg: &Upgrader) -> tableflip::Result<()> {
    loop {
        match upg.exit().wait_readable(server, None) {
            tableflip::Wake::Exit => return Ok(()),
            _ => {
                server.serve_one(upg)?;
            }
        }
    }
}

/// Accepts on every listener until the exit fd fires, answering `pid=<pid>`.
fn serve(upg: &Upgrader, listeners: &[std::net::TcpListener]) {
    for ln in listeners {
        ln.set_nonblocking(true).unwrap();
    }
    loop {
        let mut pfds: Vec<libc::pollfd> = listeners
            .iter()
            .map(|l| l.as_raw_fd())
            .chain([upg.exit().as_raw_fd()])
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: a valid, exclusively borrowed array of pollfd.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as _, -1) };
        if rc < 0 {
            continue;
        }
        if pfds.last().unwrap().revents != 0 {
            return;
        }
        for ln in listeners {
            while let Ok((mut conn, _)) = ln.accept() {
                let _ = conn.set_nonblocking(false);
                let _ = writeln!(conn, "pid={}", std::process::id());
            }
        }
    }
}

fn api_checks(upg: &Upgrader) {
    let second = Upgrader::new(Options::new());
    say(format!(
        "second-new {}",
        second
            .err()
            .map(|e| describe(&e))
            .unwrap_or("kind=Ok".into())
    ));
    let r = upg.upgrade();
    say(format!(
        "upgrade-before-ready {}",
        r.err().map(|e| describe(&e)).unwrap_or("kind=Ok".into())
    ));
    upg.ready().unwrap();
    let again = upg.ready();
    say(format!("ready-again ok={}", again.is_ok()));
    say(format!("should-exit before-stop={}", upg.exit().fired()));
    // The helpers for accept loops, before and after the exit notification.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let handle = upg.exit().try_clone().unwrap();
    let short = Some(Duration::from_millis(20));
    let idle = upg.exit().wait_readable(&listener, short);
    let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let pending = upg.exit().wait_readable(&listener, short);
    say(format!(
        "wait before-stop idle={idle:?} pending={pending:?} handle-fired={}",
        handle.fired()
    ));
    upg.stop();
    say(format!("should-exit after-stop={}", upg.exit().fired()));
    handle.wait();
    say(format!(
        "wait after-stop pending={:?} handle-fired={}",
        upg.exit().wait_readable(&listener, None),
        handle.fired()
    ));
    upg.exit().wait();
    let r = upg.upgrade();
    say(format!(
        "upgrade-after-stop {}",
        r.err().map(|e| describe(&e)).unwrap_or("kind=Ok".into())
    ));
    say(format!("ready-after-stop ok={}", upg.ready().is_ok()));
    say("exit");
    std::process::exit(0);
}

/// Reads a whole stream with a deadline (for Unix sockets).
pub fn read_all(mut r: impl Read) -> String {
    let mut s = String::new();
    let _ = r.read_to_string(&mut s);
    s
}
