//! Harness for `tests/examples.rs` (and the tests that include it by path, the tokio
//! example's among them): runs the example binaries as real processes, follows them
//! across upgrades, and makes sure none is left behind.
//!
//! Every generation runs in the process group of the first one, and this test process
//! is a child subreaper, so generations whose parent has exited are reparented to it:
//! each one can be reaped with `waitpid` and its exit status checked, and the whole set
//! can be killed with one `kill(-pgid, SIGKILL)`.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Upper bound for anything we wait for: generous, the machine may be loaded.
pub const DEADLINE: Duration = Duration::from_secs(20);
/// A test that runs longer than this has its processes killed.
const WATCHDOG: Duration = Duration::from_secs(240);
/// Timeout of each client socket operation.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Serialises the tests that start processes: they share the subreaper role, and the
/// machine has few cores.
pub fn lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The path of an example binary of this test's package, after building every example
/// of the package once (cargo does not build examples for `cargo test` by itself).
pub fn example(name: &str) -> PathBuf {
    example_of(env!("CARGO_PKG_NAME"), name)
}

/// The path of an example binary of the workspace's package `package` (a test of the
/// tokio example runs the main package's `upgrade_check`), after building every example
/// of that package once: `cargo build -p PACKAGE --examples`, through `$CARGO`, so that
/// the build has the workspace's lock file, target directory and toolchain.
pub fn example_of(package: &str, name: &str) -> PathBuf {
    static BUILT: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.contains(package) {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
        let out = Command::new(cargo)
            .args(["build", "--examples", "-p", package])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null())
            .output()
            .expect("cannot run cargo build --examples");
        assert!(
            out.status.success(),
            "cargo build --examples -p {package} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        built.insert(package.to_owned());
    }
    let path = examples_dir().join(name);
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// Where cargo puts the examples: `examples/` beside the `deps/` directory that holds
/// this test binary, in the workspace's target directory (wherever that is).
fn examples_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile = exe.parent().and_then(Path::parent);
    profile
        .unwrap_or_else(|| panic!("{} is not in a target directory", exe.display()))
        .join("examples")
}

/// A pseudo-terminal: the master, our copy of the terminal end, and its path.
pub fn open_pty() -> (OwnedFd, fs::File, PathBuf) {
    // SAFETY: posix_openpt(3) takes flags and returns a new fd or -1.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    assert!(fd >= 0, "posix_openpt: {}", io::Error::last_os_error());
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `master` is an open pty master; `name` is writable for its whole length.
    unsafe {
        assert_eq!(libc::unlockpt(master.as_raw_fd()), 0, "unlockpt");
        assert_eq!(
            libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()),
            0,
            "ptsname_r"
        );
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    let path = PathBuf::from(path.to_string_lossy().into_owned());
    let slave = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    (master, slave, path)
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "tableflip-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Asks a server for its pid over one new connection.
pub type Probe = fn(SocketAddr) -> io::Result<u32>;

/// The `pid=<digits>` in a reply.
pub fn parse_pid(reply: &str) -> Option<u32> {
    let rest = &reply[reply.find("pid=")? + 4..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let conn = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(conn)
}

/// Probe for `tcp_server` and `daemon`: one line with the pid, then EOF.
pub fn line_probe(addr: SocketAddr) -> io::Result<u32> {
    let mut reply = String::new();
    connect(addr)?.read_to_string(&mut reply)?;
    parse_pid(&reply).ok_or_else(|| other(format!("reply without a pid: {reply:?}")))
}

pub fn other(msg: String) -> io::Error {
    io::Error::other(msg)
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGKILL => "SIGKILL",
        _ => "signal",
    }
}

/// What runs in front of the first generation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Front {
    /// Nothing: it is started directly, in a process group of its own.
    None,
    /// A terminal whose session it leads.
    Terminal,
    /// A keeper (`--keeper`), started directly.
    Keeper,
}

/// An example server and every generation it has started.
pub struct Server {
    pub addr: SocketAddr,
    pub pid_file: PathBuf,
    log: PathBuf,
    probe: Probe,
    /// The process group of every generation: the first generation's pid.
    pgid: i32,
    /// The generation that serves now.
    pub current: u32,
    /// Every generation seen.
    pub generations: Vec<u32>,
    /// Set once the group is known to be empty: nothing left to kill.
    finished: bool,
    _watchdog: mpsc::Sender<()>,
    /// The terminal's master end, with [`start_in_terminal`](Server::start_in_terminal):
    /// closing it would hang the terminal up, so it is closed once the group is gone.
    _terminal: Option<OwnedFd>,
    /// Holds the pid file and the log; removed last.
    _dir: TempDir,
}

impl Server {
    /// Starts `binary` with `args` (plus `--listen` and `--pid-file` unless `args`
    /// gives them), and waits until it answers.
    pub fn start(binary: &Path, args: &[&str], probe: Probe) -> Server {
        Server::start_with_env(binary, args, &[], probe)
    }

    /// Like [`start`](Server::start), with `env` in the environment of the first
    /// generation (and so of every later one).
    pub fn start_with_env(
        binary: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        probe: Probe,
    ) -> Server {
        Server::start_with(binary, args, probe, Front::None, env)
    }

    /// Like [`start`](Server::start), run as from a terminal: the first generation leads
    /// a new session whose controlling terminal (and stdin) is a pseudo-terminal of the
    /// test's, as under `script -c`, in a tmux window or a terminal emulator. When it
    /// exits, the kernel sends `SIGHUP` to the terminal's foreground process group,
    /// where the later generations are.
    pub fn start_in_terminal(binary: &Path, args: &[&str], probe: Probe) -> Server {
        Server::start_with(binary, args, probe, Front::Terminal, &[])
    }

    /// Like [`start`](Server::start), with `--keeper`: the process started is the
    /// keeper, `generations[0]`, and the generation serving is its child.
    pub fn start_with_keeper(binary: &Path, args: &[&str], probe: Probe) -> Server {
        Server::start_with(binary, args, probe, Front::Keeper, &[])
    }

    fn start_with(
        binary: &Path,
        args: &[&str],
        probe: Probe,
        front: Front,
        env: &[(&str, &str)],
    ) -> Server {
        become_subreaper();
        let dir = TempDir::new(&binary.file_name().unwrap().to_string_lossy());
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let pid_file = dir.path().join("server.pid");
        let log = dir.path().join("server.log");
        let log_file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("create log file");
        let mut cmd = Command::new(binary);
        cmd.args(["--listen", &addr.to_string()])
            .arg("--pid-file")
            .arg(&pid_file)
            .args(args)
            .envs(env.iter().copied())
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log_file);
        if front == Front::Keeper {
            cmd.arg("--keeper");
        }
        let mut master = None;
        if front == Front::Terminal {
            let (m, slave, _) = open_pty();
            master = Some(m);
            cmd.stdin(slave);
            // SAFETY: setsid(2) and ioctl(2) are async-signal-safe, and the closure
            // touches no memory of the parent's.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                    // A session of its own (and a process group: its pid), whose
                    // controlling terminal is stdin, the pty; its group is in the
                    // terminal's foreground.
                    if libc::setsid() == -1 || libc::ioctl(0, libc::TIOCSCTTY, 0) == -1 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                })
            };
        } else {
            cmd.stdin(Stdio::null());
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        let child = cmd.spawn().expect("start example");
        let pid = child.id();
        // Reaped with waitpid like every later generation; dropping a Child neither
        // kills nor reaps it.
        drop(child);

        let (tx, rx) = mpsc::channel::<()>();
        thread::spawn(move || {
            // The sender is dropped with the Server: then this returns Disconnected.
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(WATCHDOG) {
                eprintln!("watchdog: killing process group {pid}");
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            }
        });

        let mut server = Server {
            addr,
            pid_file,
            log,
            probe,
            pgid: pid as i32,
            current: pid,
            generations: vec![pid],
            finished: false,
            _watchdog: tx,
            _terminal: master,
            _dir: dir,
        };
        let answered =
            server.wait_for("the first generation to answer", |s| (s.probe)(s.addr).ok());
        if front == Front::Keeper {
            server.current = answered;
            server.generations.push(answered);
        } else {
            assert_eq!(answered, pid, "answered by an unknown pid");
        }
        // A generation serves before it reports ready; the pid file follows.
        server.wait_for("the pid file", |s| {
            s.pid_from_file().filter(|&p| p == answered)
        });
        server
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `f` every 10 ms until it returns `Some`; panics after [`DEADLINE`] (the
    /// log is printed by `drop`).
    pub fn wait_for<T>(&self, what: &str, mut f: impl FnMut(&Self) -> Option<T>) -> T {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            if Instant::now() >= deadline {
                panic!("timed out after {DEADLINE:?} waiting for {what}");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid_from_file(&self) -> Option<u32> {
        fs::read_to_string(&self.pid_file).ok()?.trim().parse().ok()
    }

    pub fn assert_pid_file(&self, pid: u32) {
        assert_eq!(
            self.pid_from_file(),
            Some(pid),
            "the pid file names another pid"
        );
    }

    pub fn signal(&self, pid: u32, sig: i32) {
        assert!(self.generations.contains(&pid), "not one of ours: {pid}");
        // SAFETY: kill(2) has no memory-safety preconditions; `pid` is a generation we
        // have not reaped, so it cannot have been reused.
        let rc = unsafe { libc::kill(pid as i32, sig) };
        assert_eq!(rc, 0, "kill({pid}, {}) failed", signal_name(sig));
    }

    /// Sends SIGHUP to the current generation and follows the upgrade: a new pid
    /// answers, the pid file names it, and the old generation exits with status 0.
    /// Returns the new pid.
    pub fn upgrade(&mut self) -> u32 {
        let old = self.current;
        self.assert_pid_file(old);
        self.signal(old, libc::SIGHUP);
        let new = self.wait_for("a new generation to answer", |s| {
            (s.probe)(s.addr).ok().filter(|&pid| pid != old)
        });
        self.generations.push(new);
        self.current = new;
        let status = self.wait_exit(old);
        assert_exit_ok(old, status);
        // The new generation writes the pid file once the old one has committed, and
        // confirms it before the old one is told to exit.
        self.assert_pid_file(new);
        self.assert_drained();
        new
    }

    /// Like [`upgrade`](Server::upgrade), without a single connection until the old
    /// generation has exited: it must stop accepting without being woken by traffic.
    pub fn upgrade_quietly(&mut self) -> u32 {
        let old = self.current;
        self.assert_pid_file(old);
        self.signal(old, libc::SIGHUP);
        let new = self.wait_for("the pid file to name a new generation", |s| {
            s.pid_from_file().filter(|&pid| pid != old)
        });
        self.generations.push(new);
        self.current = new;
        let status = self.wait_exit(old);
        assert_exit_ok(old, status);
        self.assert_drained();
        assert_eq!((self.probe)(self.addr).expect("probe after upgrade"), new);
        new
    }

    /// No generation had to give up on a connection at its drain deadline.
    pub fn assert_drained(&self) {
        let log = self.log();
        assert!(!log.contains("drain timeout"), "a drain timed out:\n{log}");
    }

    /// Waits until `pid` (one of our generations) has exited, reaps it and returns its
    /// raw wait status.
    pub fn wait_exit(&self, pid: u32) -> i32 {
        self.wait_for(&format!("pid {pid} to exit"), |_| {
            let mut status = 0;
            // SAFETY: waitpid with a valid status pointer.
            let rc = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
            // ECHILD: not reparented to us yet (its parent is still alive); retry.
            (rc == pid as i32).then_some(status)
        })
    }

    /// Stops the current generation with `sig`, checks that it exits with status 0 and
    /// that no process of the group is left.
    pub fn stop(mut self, sig: i32) {
        let pid = self.current;
        self.signal(pid, sig);
        let status = self.wait_exit(pid);
        assert_exit_ok(pid, status);
        let pgid = self.pgid;
        self.wait_for("every generation to be gone", |_| {
            reap_group(pgid);
            group_empty(pgid).then_some(())
        });
        self.finished = true;
        self.assert_drained();
        let log = self.log();
        assert!(log.contains("exit"), "no exit logged:\n{log}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- log of the example (generations {:?}) ---\n{}---",
                self.generations,
                self.log()
            );
        }
        if self.finished {
            return;
        }
        // SAFETY: kill(2) has no memory-safety preconditions. The group is ours: its
        // leader has not been reaped unless every member was (see `finished`).
        unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            reap_group(self.pgid);
            if group_empty(self.pgid) {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        eprintln!("process group {} still has members", self.pgid);
    }
}

fn assert_exit_ok(pid: u32, status: i32) {
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "pid {pid} did not exit with status 0 (raw wait status {status:#x})"
    );
}

/// Reaps every exited member of `pgid` that is our child.
pub fn reap_group(pgid: i32) {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer.
        if unsafe { libc::waitpid(-pgid, &mut status, libc::WNOHANG) } <= 0 {
            return;
        }
    }
}

/// Whether no process (not even a zombie) is left in `pgid`.
pub fn group_empty(pgid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(-pgid, 0) == -1 && errno() == libc::ESRCH }
}

/// Makes this process the reaper of orphaned descendants, so that every generation,
/// whose parent (the previous generation) exits first, can be reaped and checked here.
pub fn become_subreaper() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // SAFETY: PR_SET_CHILD_SUBREAPER takes one integer argument.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) };
        assert_eq!(
            rc,
            0,
            "prctl(PR_SET_CHILD_SUBREAPER): {}",
            io::Error::last_os_error()
        );
    });
}

/// What the client threads saw.
#[derive(Debug, Default)]
pub struct Stats {
    pub ok: u64,
    pub failures: Vec<String>,
    pub pids: BTreeSet<u32>,
    /// Requests retried because a reused keep-alive connection was closed before any
    /// byte of the response arrived (allowed by HTTP; see the http_server example).
    pub retries: u64,
    /// Most requests served on one connection.
    pub max_per_conn: u64,
    /// Responses that carried `Connection: close`.
    pub closes: u64,
    /// The longest a connection took to be answered (probing clients).
    pub slowest: Duration,
}

impl Stats {
    fn merge(&mut self, other: Stats) {
        self.ok += other.ok;
        self.failures.extend(other.failures);
        self.pids.extend(other.pids);
        self.retries += other.retries;
        self.max_per_conn = self.max_per_conn.max(other.max_per_conn);
        self.closes += other.closes;
        self.slowest = self.slowest.max(other.slowest);
    }

    pub fn fail(&mut self, e: impl std::fmt::Display) {
        if self.failures.len() < 20 {
            self.failures.push(e.to_string());
        } else {
            self.failures.push(String::new()); // counted, not shown
        }
    }
}

/// What client threads share with the test.
#[derive(Debug, Default)]
pub struct Shared {
    /// Set to end the clients.
    pub stop: AtomicBool,
    /// Requests answered so far, by all clients.
    pub answered: AtomicU64,
}

impl Shared {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::SeqCst)
    }

    fn answered(&self) {
        self.answered.fetch_add(1, Ordering::SeqCst);
    }
}

/// A client thread's body: loops until `shared.stop`.
pub type Client = fn(SocketAddr, &Shared) -> Stats;

/// Client threads that run until [`Load::finish`].
pub struct Load {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<Stats>>,
}

impl Load {
    /// One thread per client.
    pub fn start(addr: SocketAddr, clients: &[Client]) -> Load {
        let shared = Arc::new(Shared::default());
        let threads = clients
            .iter()
            .map(|&client| {
                let shared = Arc::clone(&shared);
                thread::spawn(move || client(addr, &shared))
            })
            .collect();
        Load { shared, threads }
    }

    /// Waits until the clients have had `n` more requests answered.
    pub fn wait_answered(&self, server: &Server, n: u64) {
        let target = self.answered() + n;
        server.wait_for(&format!("{n} more answers"), |_| {
            (self.answered() >= target).then_some(())
        });
    }

    /// Requests answered so far, by all clients.
    pub fn answered(&self) -> u64 {
        self.shared.answered.load(Ordering::SeqCst)
    }

    pub fn finish(mut self) -> Stats {
        self.shared.stop.store(true, Ordering::SeqCst);
        let mut stats = Stats::default();
        for t in self.threads.drain(..) {
            stats.merge(t.join().expect("client thread panicked"));
        }
        stats
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

/// A client that opens a new connection for every probe, without pause.
pub fn probing_client<const TCP: bool>(addr: SocketAddr, shared: &Shared) -> Stats {
    let probe: Probe = if TCP { line_probe } else { http_probe };
    let mut stats = Stats::default();
    while shared.running() {
        let t = Instant::now();
        match probe(addr) {
            Ok(pid) => {
                shared.answered();
                stats.ok += 1;
                stats.pids.insert(pid);
                stats.slowest = stats.slowest.max(t.elapsed());
            }
            Err(e) => stats.fail(format!("new connection: {e}")),
        }
    }
    stats.max_per_conn = stats.max_per_conn.max(1);
    stats
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub close: bool,
    pub body: String,
}

/// Why reading a response failed, and whether any of it had arrived.
#[derive(Debug)]
pub struct ResponseError {
    pub started: bool,
    pub error: io::Error,
}

/// Reads one response (with a Content-Length body) from `conn`; `buf` keeps bytes that
/// arrived beyond it.
pub fn read_response(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Response, ResponseError> {
    let mut chunk = [0u8; 4096];
    let fail = |buf: &Vec<u8>, error: io::Error| ResponseError {
        started: !buf.is_empty(),
        error,
    };
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match conn.read(&mut chunk) {
            Ok(0) => return Err(fail(buf, io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(fail(buf, e)),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let bad = |msg: &str| ResponseError {
        started: true,
        error: other(format!("{msg}: {head:?}")),
    };
    let status: u16 = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let mut len = None;
    let mut close = false;
    for line in head.split("\r\n").skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                len = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.eq_ignore_ascii_case("close");
            }
        }
    }
    let len = len.ok_or_else(|| bad("no Content-Length"))?;
    while buf.len() < head_end + len {
        match conn.read(&mut chunk) {
            Ok(0) => return Err(bad("body cut off")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => {
                return Err(ResponseError {
                    started: true,
                    error: e,
                })
            }
        }
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned();
    buf.drain(..head_end + len);
    Ok(Response {
        status,
        close,
        body,
    })
}

pub const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n";

/// Probe for `http_server`: one GET on a new connection, with `Connection: close`.
pub fn http_probe(addr: SocketAddr) -> io::Result<u32> {
    let mut conn = connect(addr)?;
    conn.write_all(b"GET /probe HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    let resp = read_response(&mut conn, &mut buf).map_err(|e| e.error)?;
    if resp.status != 200 || !resp.close {
        return Err(other(format!("unexpected response {resp:?}")));
    }
    // The server closes after a `Connection: close` response.
    if conn.read(&mut [0u8; 1])? != 0 {
        return Err(other("data after the response".into()));
    }
    parse_pid(&resp.body).ok_or_else(|| other(format!("no pid in {resp:?}")))
}

/// A client that keeps one connection for as many requests as the server allows,
/// reconnecting when it says `Connection: close` (or closes an idle connection).
pub fn keep_alive_client(addr: SocketAddr, shared: &Shared) -> Stats {
    let mut stats = Stats::default();
    let mut conn: Option<(TcpStream, Vec<u8>, u64)> = None;
    while shared.running() {
        let (stream, buf, served) = match &mut conn {
            Some(c) => c,
            None => match connect(addr) {
                Ok(s) => conn.insert((s, Vec::new(), 0)),
                Err(e) => {
                    stats.fail(format!("connect: {e}"));
                    continue;
                }
            },
        };
        let sent = stream.write_all(GET);
        let result = match sent {
            Ok(()) => read_response(stream, buf),
            Err(error) => Err(ResponseError {
                started: false,
                error,
            }),
        };
        match result {
            Ok(resp) => match parse_pid(&resp.body).filter(|_| resp.status == 200) {
                Some(pid) => {
                    shared.answered();
                    stats.ok += 1;
                    stats.pids.insert(pid);
                    *served += 1;
                    stats.max_per_conn = stats.max_per_conn.max(*served);
                    if resp.close {
                        stats.closes += 1;
                        conn = None;
                    }
                }
                None => {
                    stats.fail(format!("bad response {resp:?}"));
                    conn = None;
                }
            },
            // The server closed a reused idle connection as the request went out:
            // nothing of a response arrived, so the request was not processed; retry
            // on a new connection, as HTTP clients do.
            Err(e) if !e.started && *served > 0 => {
                stats.retries += 1;
                conn = None;
            }
            Err(e) => {
                stats.fail(format!(
                    "request {} on a connection: {:?}, started: {}",
                    *served + 1,
                    e.error,
                    e.started
                ));
                conn = None;
            }
        }
    }
    stats
}
