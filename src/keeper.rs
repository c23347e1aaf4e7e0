//! The keeper: one process with one pid for the service's whole life, in front of the
//! generations (for containers, journald and supervisors that watch one pid).
//!
//! It runs no application code. It is the generations' service manager and speaks the
//! protocol the crate already speaks to systemd: each generation gets `$NOTIFY_SOCKET`
//! naming the keeper's socket, and the keeper follows `MAINPID=`, `READY=1`,
//! `RELOADING=1`, `STOPPING=1` and `STATUS=`, and holds the sockets sent with `FDSTORE=1`
//! (the fd store: the same generation code runs under systemd or under the keeper). It
//! forwards `SIGHUP`, `SIGTERM`, `SIGINT`, `SIGQUIT`, `SIGUSR1` and `SIGUSR2` to the
//! current generation, reaps every descendant (it is PID 1 or a child subreaper), and
//! when the current generation dies without a successor, it starts a new one on the
//! sockets it holds (`$LISTEN_FDS`), with a bounded number of restarts and a back-off.
//! `SIGTERM`, `SIGINT` and `SIGQUIT` stop the service: the keeper exits with the last
//! generation's status once every process is gone. With a `$NOTIFY_SOCKET` of its own
//! (under systemd), it relays readiness and status with its own pid as the main one.
//!
//! The loop starts no thread; it waits in one `poll` on its notify socket and a
//! `signalfd`, and allocates per event only what reading a message or `/proc` needs.
//!
//! Linux only (a child subreaper, `signalfd`): elsewhere the machinery below is compiled
//! but never called, and [`Keeper::run`] fails with [`Error::Unsupported`].
#![cfg_attr(
    not(any(target_os = "linux", target_os = "android")),
    allow(dead_code, unused_imports)
)]

use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::io::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SocketAddrUnix, SocketType,
};
use rustix::process::{Pid, Signal, WaitOptions};

use crate::error::{Error, Result};
use crate::os;
use crate::process::Child;
use crate::spawn::{PidVar, Program};
use crate::systemd::Notifier;

/// Set in the environment of every generation a keeper starts (and so inherited by
/// their upgrades): its value is the keeper's pid.
const VAR: &str = "TABLEFLIP_KEEPER";
/// The signals the keeper forwards to the current generation.
const FORWARDED: [libc::c_int; 6] = [
    libc::SIGHUP,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];
/// The most fds the keeper holds for the generations.
const MAX_HELD: usize = 1024;

/// A keeper for this service: call [`Keeper::run`] first thing in `main` when asked for
/// one (the examples take `--keeper`).
///
/// ```no_run
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     if std::env::args().any(|a| a == "--keeper") {
///         // In the keeper this never returns; in the generations it starts (same
///         // binary, same arguments) it returns at once.
///         tableflip::Keeper::new().run()?;
///     }
///     let upg = tableflip::Upgrader::new(tableflip::Options::new())?;
///     // ... serve as usual.
///     # drop(upg);
///     Ok(())
/// }
/// ```
///
/// Linux only (it needs a child subreaper and `signalfd`); elsewhere `run` fails.
#[derive(Debug, Clone)]
pub struct Keeper {
    restarts: usize,
    window: Duration,
    backoff: Duration,
    max_backoff: Duration,
}

impl Default for Keeper {
    fn default() -> Self {
        Keeper {
            restarts: 5,
            window: Duration::from_secs(60),
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl Keeper {
    /// The defaults: at most 5 restarts within 60 s, waiting 100 ms before the first and
    /// doubling up to 5 s.
    pub fn new() -> Keeper {
        Keeper::default()
    }

    /// Gives up (exits with a non-zero status) when the current generation had to be
    /// started again more than `restarts` times within `within`.
    pub fn restart_limit(mut self, restarts: usize, within: Duration) -> Self {
        self.restarts = restarts;
        self.window = within;
        self
    }

    /// How long to wait before starting a generation again after a crash: `first`,
    /// doubling with each restart within the window, up to `max`.
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.backoff = first;
        self.max_backoff = max;
        self
    }

    /// Turns this process into the keeper and starts the first generation: this binary
    /// (`argv[0]`, resolved as for an upgrade) with the same arguments. Never returns in
    /// the keeper. In a generation a keeper started (or an upgrade of one), returns
    /// `Ok(())` at once, so the same `main` runs in both.
    pub fn run(self) -> Result<()> {
        if std::env::var_os(VAR).is_some() {
            return Ok(());
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            let mut keeper = State::new(self)?;
            let code = keeper.run();
            std::process::exit(code)
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        Err(Error::Unsupported {
            op: "Keeper::run",
            needs: "Linux",
        })
    }
}

/// An fd held for the generations, under the name it was stored with.
struct Held {
    name: String,
    fd: OwnedFd,
    id: (u64, u64),
}

/// The keeper at work.
struct State {
    config: Keeper,
    program: Program,
    pid: u32,
    socket: OwnedFd,
    target: String,
    signals: OwnedFd,
    /// The keeper's own systemd, if any.
    upstream: Option<Notifier>,
    held: Vec<Held>,
    /// The generation that serves (or is starting), as `MAINPID=` named it.
    main: Option<u32>,
    /// The direct child the keeper started last, until reaped.
    started: Option<Child>,
    ready: bool,
    stopping: bool,
    /// How the last generation that was the main one ended.
    last_status: Option<ExitStatus>,
    restarts: VecDeque<Instant>,
    /// When to start a generation again after a crash.
    restart_at: Option<Instant>,
}

#[cfg(any(target_os = "linux", target_os = "android"))]
impl State {
    fn new(config: Keeper) -> Result<State> {
        let pid = std::process::id();
        if pid != 1 {
            // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) takes integers only.
            if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } == -1 {
                return Err(Error::io(
                    "prctl(PR_SET_CHILD_SUBREAPER)",
                    None,
                    io::Error::last_os_error(),
                ));
            }
        }
        let name = format!("tableflip-keeper/{pid}");
        let socket = notify_socket(name.as_bytes())
            .map_err(|e| Error::io("bind the keeper's notify socket", None, e))?;
        let signals = signal_fd().map_err(|e| Error::io("signalfd", None, e))?;
        // Sockets systemd passed to the keeper (socket activation) go to the generations.
        let held = crate::systemd::activated()?
            .into_iter()
            .filter_map(|i| {
                let name =
                    crate::systemd::store_name(&i.key, i.extra).unwrap_or_else(|| i.key.key_text());
                hold(name, i.fd)
            })
            .collect();
        Ok(State {
            config,
            program: Program::current(None)?,
            pid,
            socket,
            target: format!("@{name}"),
            signals,
            upstream: Notifier::from_env(),
            held,
            main: None,
            started: None,
            ready: false,
            stopping: false,
            last_status: None,
            restarts: VecDeque::new(),
            restart_at: None,
        })
    }

    /// The loop; returns the exit code.
    fn run(&mut self) -> i32 {
        if let Err(e) = self.start_generation() {
            eprintln!("tableflip keeper: cannot start the service: {e}");
            return 1;
        }
        loop {
            let ready = match os::poll_in(
                &[self.socket.as_fd(), self.signals.as_fd()],
                self.restart_at,
            ) {
                Ok(ready) => ready,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            // Messages first: a `MAINPID=` is always sent before its sender exits.
            if ready[0] {
                self.read_messages();
            }
            if ready[1] {
                if let Some(code) = self.read_signals() {
                    return code;
                }
            }
            if self.restart_at.is_some_and(|t| Instant::now() >= t) {
                self.restart_at = None;
                if let Err(e) = self.start_generation() {
                    eprintln!("tableflip keeper: cannot start the service again: {e}");
                    self.restart_later();
                }
            }
            if let Some(code) = self.done() {
                return code;
            }
        }
    }

    /// Starts a generation on the held sockets.
    fn start_generation(&mut self) -> Result<()> {
        let exe = self.program.resolve()?;
        let names: Vec<&str> = self.held.iter().map(|h| h.name.as_str()).collect();
        let count = self.held.len().to_string();
        let names = names.join(":");
        let keeper = self.pid.to_string();
        let store_max = MAX_HELD.to_string();
        // `$FDSTORE` (as systemd 254+ sets it) turns the generations' fd store on.
        let mut env: Vec<(&str, &str)> = vec![
            ("NOTIFY_SOCKET", &self.target),
            (VAR, &keeper),
            ("FDSTORE", &store_max),
        ];
        let moves: Vec<[RawFd; 2]> = self
            .held
            .iter()
            .zip(3..)
            .map(|(h, to)| [h.fd.as_raw_fd(), to])
            .collect();
        let pid_var = (!moves.is_empty()).then_some(PidVar {
            name: "LISTEN_PID",
            value: "0000000000",
            slot: 0,
        });
        if !moves.is_empty() {
            env.push(("LISTEN_FDS", &count));
            env.push(("LISTEN_FDNAMES", &names));
        }
        let child = self.program.spawn(&exe, &env, pid_var, &[], &moves)?;
        self.main = Some(child.pid());
        self.started = Some(child);
        Ok(())
    }

    /// Reads every queued notification.
    fn read_messages(&mut self) {
        let mut buf = [0u8; 4096];
        let mut space =
            [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(253), ScmCredentials(1))];
        loop {
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            let flags = RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC;
            let Ok(msg) = rustix::net::recvmsg(&self.socket, &mut iov, &mut control, flags) else {
                return;
            };
            let mut sender = None;
            let mut fds: Vec<OwnedFd> = Vec::new();
            for m in control.drain() {
                match m {
                    RecvAncillaryMessage::ScmCredentials(c) => {
                        sender = Some(c.pid.as_raw_nonzero().get() as u32)
                    }
                    RecvAncillaryMessage::ScmRights(rights) => fds.extend(rights),
                    _ => {}
                }
            }
            let text = String::from_utf8_lossy(&buf[..msg.bytes.min(buf.len())]).into_owned();
            // Only the service's own processes speak for it (`NotifyAccess=all` within
            // the keeper's tree); fds from anyone else are closed.
            if sender.is_some_and(|pid| self.is_descendant(pid)) {
                self.message(&text, fds);
            }
        }
    }

    /// One notification: `KEY=value` lines.
    fn message(&mut self, text: &str, fds: Vec<OwnedFd>) {
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        };
        if let Some(pid) = field("MAINPID").and_then(|p| p.parse().ok()) {
            self.main = Some(pid);
        }
        let mut relay: Vec<String> = Vec::new();
        if field("RELOADING") == Some("1") {
            relay.push("RELOADING=1".into());
        }
        if field("READY") == Some("1") {
            self.ready = true;
            relay.push("READY=1".into());
        }
        if field("STOPPING") == Some("1") {
            relay.push("STOPPING=1".into());
        }
        if let Some(status) = field("STATUS") {
            relay.push(format!("STATUS={status}"));
        }
        let name = field("FDNAME").unwrap_or("stored").to_string();
        if field("FDSTOREREMOVE") == Some("1") {
            self.held.retain(|h| h.name != name);
        }
        if field("FDSTORE") == Some("1") {
            for fd in fds {
                self.keep(&name, fd);
            }
        }
        if let (Some(up), false) = (&self.upstream, relay.is_empty()) {
            up.relay(&relay.join("\n"));
        }
    }

    /// Holds `fd` under `name`, once (systemd's fd store keeps one copy of a socket too).
    fn keep(&mut self, name: &str, fd: OwnedFd) {
        let Some(held) = hold(name.to_string(), fd) else {
            return;
        };
        if self.held.len() < MAX_HELD && !self.held.iter().any(|h| h.id == held.id) {
            self.held.push(held);
        }
    }

    /// Whether `pid` is this keeper's descendant (its ancestry in `/proc` reaches us).
    fn is_descendant(&self, mut pid: u32) -> bool {
        for _ in 0..64 {
            if pid == self.pid {
                return true;
            }
            match parent_of(pid) {
                Some(ppid) if ppid > 1 || self.pid == 1 => pid = ppid,
                _ => return false,
            }
        }
        false
    }

    /// Handles the signals that arrived; `Some(code)` to exit now.
    fn read_signals(&mut self) -> Option<i32> {
        // SAFETY: an all-zero signalfd_siginfo is a valid value of this plain C struct.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        loop {
            // SAFETY: reading at most `size` bytes into `info`, which has that size.
            let n = unsafe {
                libc::read(
                    self.signals.as_raw_fd(),
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    size,
                )
            };
            if n != size as isize {
                return None;
            }
            let sig = info.ssi_signo as libc::c_int;
            if sig == libc::SIGCHLD {
                self.reap();
            } else {
                if matches!(sig, libc::SIGTERM | libc::SIGINT | libc::SIGQUIT) {
                    self.stopping = true;
                    self.restart_at = None;
                }
                if let Some(main) = self.main {
                    forward(main, sig);
                }
            }
        }
    }

    /// Reaps every exited descendant; restarts the service when the main one died.
    fn reap(&mut self) {
        loop {
            match rustix::process::waitpid(None, WaitOptions::NOHANG) {
                Ok(Some((pid, status))) => {
                    let pid = pid.as_raw_nonzero().get() as u32;
                    let status = ExitStatus::from_raw(status.as_raw());
                    if self.started.as_ref().is_some_and(|c| c.pid() == pid) {
                        self.started = None;
                    }
                    if self.main == Some(pid) {
                        self.main_died(status);
                    }
                }
                Ok(None) => return,
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => return,
            }
        }
    }

    fn main_died(&mut self, status: ExitStatus) {
        self.main = None;
        self.last_status = Some(status);
        if self.stopping {
            return;
        }
        if status.success() {
            // It stopped on purpose: so does the service.
            self.stopping = true;
            return;
        }
        eprintln!("tableflip keeper: the service died ({status}); starting it again");
        self.restart_later();
    }

    /// Schedules a restart after the back-off, or gives up past the limit.
    fn restart_later(&mut self) {
        let now = Instant::now();
        while self
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.config.window)
        {
            self.restarts.pop_front();
        }
        if self.restarts.len() >= self.config.restarts {
            eprintln!(
                "tableflip keeper: {} restarts within {:?}: giving up",
                self.restarts.len(),
                self.config.window
            );
            self.stopping = true;
            self.last_status = Some(ExitStatus::from_raw(1 << 8));
            return;
        }
        let shift = self.restarts.len().min(16) as u32;
        let delay = self
            .config
            .backoff
            .saturating_mul(1 << shift)
            .min(self.config.max_backoff);
        self.restarts.push_back(now);
        self.restart_at = now.checked_add(delay);
    }

    /// When stopping and every process is gone: the exit code.
    fn done(&mut self) -> Option<i32> {
        if !self.stopping {
            return None;
        }
        // Anyone left? (`ECHILD`: no child at all, reparented orphans included.)
        match rustix::process::waitpid(None, WaitOptions::NOHANG) {
            Err(rustix::io::Errno::CHILD) => Some(exit_code(self.last_status)),
            Ok(Some(_)) => {
                self.reap();
                None
            }
            _ => None,
        }
    }
}

/// The keeper's exit code for the last generation's status (128 + signal when killed).
fn exit_code(status: Option<ExitStatus>) -> i32 {
    match status {
        Some(s) => s.code().or(s.signal().map(|sig| 128 + sig)).unwrap_or(1),
        None => 0,
    }
}

fn forward(pid: u32, sig: libc::c_int) {
    if let (Some(pid), Some(sig)) = (Pid::from_raw(pid as i32), Signal::from_named_raw(sig)) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// The parent pid of `pid`, from `/proc/<pid>/stat`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `fd` with its identity, to hold.
fn hold(name: String, fd: OwnedFd) -> Option<Held> {
    let st = rustix::fs::fstat(&fd).ok()?;
    #[allow(clippy::unnecessary_cast)]
    let id = (st.st_dev as u64, st.st_ino as u64);
    Some(Held { name, fd, id })
}

/// The keeper's notify socket: a datagram socket on an abstract name, non-blocking,
/// with the senders' credentials.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn notify_socket(name: &[u8]) -> io::Result<OwnedFd> {
    let fd = crate::socket::new_socket(AddressFamily::UNIX, SocketType::DGRAM)?;
    rustix::io::ioctl_fionbio(&fd, true)?;
    rustix::net::sockopt::set_socket_passcred(&fd, true)?;
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&fd, 1 << 20);
    rustix::net::bind(&fd, &SocketAddrUnix::new_abstract_name(name)?)?;
    Ok(fd)
}

/// A `signalfd` for the forwarded signals and `SIGCHLD`, which are blocked from now on
/// (the generations start with an empty mask: the child resets it before `execve`).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn signal_fd() -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is a plain C value; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to the set above.
    unsafe { libc::sigemptyset(&mut set) };
    for sig in FORWARDED.into_iter().chain([libc::SIGCHLD]) {
        // SAFETY: valid pointer, valid signal number.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    // SAFETY: valid set pointer; the keeper has no other thread.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: -1 asks for a new signalfd; valid set pointer.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
