//! The `Upgrader`: one per process, the state machine of a generation.

use std::ffi::{CString, OsString};
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::pipe::{pipe_with, PipeFlags};

use crate::error::{Error, Result};
use crate::fds::{self, Adoption, BeforeBind, Fds};
use crate::spawn;
use crate::wire::{self, Key};

/// One `Upgrader` at a time per process.
static ALIVE: AtomicBool = AtomicBool::new(false);
/// The inherited fd table is read by the first `Upgrader` only.
static TABLE_READ: AtomicBool = AtomicBool::new(false);

/// The byte the new generation writes to the readiness pipe when it is ready.
const READY_BYTE: u8 = b'R';
/// The byte that starts a failure message on the readiness pipe (`Upgrader::fail`).
const FAIL_BYTE: u8 = b'F';
/// The longest failure reason passed to the parent, in bytes.
const MAX_REASON: usize = 4096;

/// The largest state [`Upgrader::set_state`] accepts: 64 MiB.
pub const MAX_STATE_SIZE: u64 = 64 << 20;

/// Settings for an [`Upgrader`], built with chained calls:
///
/// ```
/// # use std::time::Duration;
/// let options = tableflip::Options::new()
///     .upgrade_timeout(Duration::from_secs(30))
///     .pid_file("/run/myapp.pid");
/// ```
#[derive(Clone)]
pub struct Options {
    upgrade_timeout: Duration,
    pid_file: Option<PathBuf>,
    executable: Option<PathBuf>,
    before_bind: Option<BeforeBind>,
    backlog: i32,
    upgrade_during_drain: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            upgrade_timeout: Duration::from_secs(60),
            pid_file: None,
            executable: None,
            before_bind: None,
            backlog: libc::SOMAXCONN,
            upgrade_during_drain: false,
        }
    }
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("upgrade_timeout", &self.upgrade_timeout)
            .field("pid_file", &self.pid_file)
            .field("executable", &self.executable)
            .field("before_bind", &self.before_bind.as_ref().map(|_| "Fn"))
            .field("backlog", &self.backlog)
            .field("upgrade_during_drain", &self.upgrade_during_drain)
            .finish()
    }
}

impl Options {
    /// The defaults: a 60 s upgrade timeout, no pid file, `argv[0]` as the executable,
    /// a listen backlog of `SOMAXCONN`.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long a new generation may take to call [`Upgrader::ready`] before it is
    /// killed and the upgrade fails. Default: 60 s.
    pub fn upgrade_timeout(mut self, timeout: Duration) -> Self {
        self.upgrade_timeout = timeout;
        self
    }

    /// A file that [`Upgrader::ready`] writes this process's pid to (atomically). A
    /// relative path is resolved against the working directory at [`Upgrader::new`].
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.pid_file = Some(path.into());
        self
    }

    /// The executable to start for the next generation. By default it is `argv[0]`,
    /// resolved at upgrade time against the initial working directory and `$PATH`, so
    /// a binary replaced on disk (by rename) is what runs next.
    pub fn executable(mut self, path: impl Into<PathBuf>) -> Self {
        self.executable = Some(path.into());
        self
    }

    /// A function called on every socket the registry creates, after `socket()` and
    /// before `bind()`: set `SO_REUSEPORT`, buffer sizes, `IPV6_V6ONLY`, ... (Go's
    /// `ListenConfig`). Wrap the fd with `socket2::SockRef::from(&fd)` for a typed API.
    pub fn before_bind(
        mut self,
        f: impl Fn(BorrowedFd<'_>) -> io::Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.before_bind = Some(Arc::new(f));
        self
    }

    /// Allows [`Upgrader::upgrade`] while the previous generation is still draining.
    ///
    /// By default a generation refuses to upgrade until its parent has exited
    /// ([`Error::ParentAlive`]), so there are never more than two generations, and at most
    /// one of them not ready. A drain that waits on long-lived connections then blocks
    /// every deploy for as long as they last. With this option the upgrade goes ahead:
    /// the draining generation has already handed over its listeners, so a third process
    /// costs only its memory, and each old generation keeps draining and exits on its own.
    /// The price: three (or more) generations can run at once, and a chain of quick
    /// upgrades can pile up old ones. Bound your drain time.
    pub fn upgrade_during_drain(mut self, allow: bool) -> Self {
        self.upgrade_during_drain = allow;
        self
    }

    /// The backlog passed to `listen()` for listeners the registry creates.
    /// Default: `SOMAXCONN` (the kernel caps it at `net.core.somaxconn`).
    pub fn backlog(mut self, backlog: i32) -> Self {
        self.backlog = backlog;
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not ready yet.
    Starting,
    Ready,
    /// An upgrade succeeded; this generation should exit.
    Upgraded,
    Stopped,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// While an upgrade runs: the write end of its cancel pipe. Dropping it wakes the
    /// upgrading thread, which kills and reaps the child.
    cancel: Option<OwnedFd>,
    upgrading: bool,
}

/// The link to the previous generation, in an upgrade child.
#[derive(Debug)]
struct Parent {
    pid: u32,
    /// Write end of the readiness pipe; taken by `ready()`.
    ready: Mutex<Option<OwnedFd>>,
    /// Read end of a pipe whose write end only the parent holds: EOF once it has exited.
    lifeline: OwnedFd,
}

/// Runs graceful upgrades for this process: Go tableflip's `Upgrader`.
///
/// Create one early in `main` with [`Upgrader::new`], get your sockets from
/// [`fds`](Upgrader::fds), call [`ready`](Upgrader::ready) when you serve, call
/// [`upgrade`](Upgrader::upgrade) (from a signal-handling thread, say) to start the next
/// generation, and exit when [`wait_for_exit`](Upgrader::wait_for_exit) returns.
///
/// Every method takes `&self`, so an `Upgrader` can be shared through an `Arc`.
/// Dropping it is [`stop`](Upgrader::stop).
pub struct Upgrader {
    fds: Fds,
    timeout: Duration,
    pid_file: Option<PathBuf>,
    executable: Option<PathBuf>,
    argv: Vec<CString>,
    argv0: OsString,
    cwd: PathBuf,
    cwd_c: CString,
    parent: Option<Parent>,
    state: Mutex<State>,
    changed: Condvar,
    exit_rd: OwnedFd,
    exit_wr: Mutex<Option<OwnedFd>>,
    /// Whether an upgrade ever succeeded.
    upgraded: AtomicBool,
    /// systemd's notify socket, if `$NOTIFY_SOCKET` was set at start.
    notify: Option<crate::systemd::Notifier>,
    upgrade_during_drain: bool,
    /// The state to hand to the next generation (`set_state`).
    state_out: Mutex<Option<OwnedFd>>,
    /// The state handed over by the previous generation, until `take_state` or `ready`.
    state_in: Mutex<Option<OwnedFd>>,
}

impl fmt::Debug for Upgrader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upgrader")
            .field("state", &*self.lock())
            .field("parent", &self.parent.as_ref().map(|p| p.pid))
            .field("fds", &self.fds)
            .finish()
    }
}

/// Resets [`ALIVE`] if `Upgrader::new` fails half-way.
struct AliveGuard(bool);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        if !self.0 {
            ALIVE.store(false, Ordering::SeqCst);
        }
    }
}

impl Upgrader {
    /// Creates the process's `Upgrader`, adopting the fds passed by the previous
    /// generation when this process is an upgrade child.
    ///
    /// Fails with [`Error::AlreadyCreated`] while another `Upgrader` is alive, and with
    /// [`Error::FdTable`] when the inherited fd table is malformed or names an fd that is
    /// not open or was not inherited. A table addressed to another process (one this
    /// process merely inherited) is ignored: this is then a fresh start.
    ///
    /// Call it early: the working directory and `argv` it sees are the ones the next
    /// generation gets.
    pub fn new(options: Options) -> Result<Upgrader> {
        if ALIVE
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(Error::AlreadyCreated);
        }
        let mut guard = AliveGuard(false);

        let cwd = std::env::current_dir().map_err(|e| Error::io("getcwd", None, e))?;
        let cwd_c = CString::new(cwd.as_os_str().as_bytes())
            .map_err(|_| Error::io("getcwd", None, io::ErrorKind::InvalidData))?;
        let args: Vec<OsString> = std::env::args_os().collect();
        let argv0 = args.first().cloned().unwrap_or_default();
        let argv = args
            .iter()
            .filter_map(|a| CString::new(a.as_bytes()).ok())
            .collect();

        let (inherited, parent, state_in) = if TABLE_READ.swap(true, Ordering::SeqCst) {
            (Vec::new(), None, None)
        } else {
            match read_table()? {
                // A first start: adopt what systemd passed (socket activation), if anything.
                (_, None, _) => {
                    let activated = crate::systemd::activated()?;
                    let fds = activated.into_iter().map(|(fd, key)| (fd, key, None));
                    (fds.collect(), None, None)
                }
                from_parent => from_parent,
            }
        };
        let notify = crate::systemd::Notifier::from_env();

        let (exit_rd, exit_wr) =
            pipe_with(PipeFlags::CLOEXEC).map_err(|e| Error::io("pipe2", None, e))?;
        let pid_file = options.pid_file.map(|p| cwd.join(p));
        guard.0 = true;
        Ok(Upgrader {
            fds: Fds::new(inherited, options.before_bind, options.backlog),
            timeout: options.upgrade_timeout,
            pid_file,
            executable: options.executable,
            argv,
            argv0,
            cwd,
            cwd_c,
            parent,
            state: Mutex::new(State {
                phase: Phase::Starting,
                cancel: None,
                upgrading: false,
            }),
            changed: Condvar::new(),
            exit_rd,
            exit_wr: Mutex::new(Some(exit_wr)),
            upgraded: AtomicBool::new(false),
            notify,
            upgrade_during_drain: options.upgrade_during_drain,
            state_out: Mutex::new(None),
            state_in: Mutex::new(state_in),
        })
    }

    /// The fd registry: listen on, inherit and add the sockets that travel to the next
    /// generation.
    pub fn fds(&self) -> &Fds {
        &self.fds
    }

    /// Whether this process was started by an upgrade (it has a previous generation,
    /// which may have exited since).
    pub fn has_parent(&self) -> bool {
        self.parent.is_some()
    }

    /// Waits until the previous generation has exited (every one of its threads).
    /// Returns `Ok(true)` once it has, or when there is none; `Ok(false)` if it is still
    /// running after `timeout`.
    pub fn wait_for_parent(&self, timeout: Duration) -> Result<bool> {
        match &self.parent {
            None => Ok(true),
            Some(p) => poll_readable(p.lifeline.as_fd(), Some(timeout))
                .map_err(|e| Error::io("poll", Some(p.lifeline.as_raw_fd()), e)),
        }
    }

    /// Tells the previous generation that this one is ready to serve, after closing the
    /// inherited fds nobody took (removing their Unix socket files) and writing the pid
    /// file. The previous generation then steps aside.
    ///
    /// Returns the [adoption report](Adoption): which inherited fds were taken and which
    /// were closed because nobody asked for them. State handed over with
    /// [`set_state`](Upgrader::set_state) and not read by now is discarded.
    ///
    /// If the previous generation has died meanwhile this still succeeds: this process
    /// is simply the only generation now. Calling it again does nothing (and reports
    /// nothing).
    pub fn ready(&self) -> Result<Adoption> {
        let mut st = self.lock();
        match st.phase {
            Phase::Starting => {}
            Phase::Ready | Phase::Upgraded => return Ok(Adoption::default()),
            Phase::Stopped => return Err(Error::Stopped),
        }
        let adoption = self.fds.close_unused();
        drop(
            self.state_in
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        if let Some(path) = &self.pid_file {
            crate::pidfile::write(path, std::process::id()).map_err(|source| Error::PidFile {
                path: path.clone(),
                source,
            })?;
        }
        // systemd first: it must know the new main pid before the old one exits.
        if let Some(n) = &self.notify {
            n.ready();
        }
        if let Some(fd) = self.take_ready_pipe() {
            match write_all(fd.as_fd(), &[READY_BYTE]) {
                // The parent is gone: we are the only generation now.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
                Err(e) => {
                    return Err(Error::io(
                        "write to readiness pipe",
                        Some(fd.as_raw_fd()),
                        e,
                    ))
                }
                Ok(()) => {}
            }
        }
        st.phase = Phase::Ready;
        Ok(adoption)
    }

    /// Gives up instead of becoming ready: reports `reason` to the previous generation,
    /// whose [`upgrade`](Upgrader::upgrade) fails with [`Error::ChildFailed`] carrying
    /// it, and exits with status 1. For a new generation that cannot take over (a bad
    /// configuration, a port it cannot get), so that whoever asked for the upgrade sees
    /// why. The reason is also written to stderr; at most 4 KiB of it reaches the parent.
    pub fn fail(&self, reason: impl fmt::Display) -> ! {
        let reason = reason.to_string();
        let line = format!("tableflip: new generation gives up: {reason}\n");
        let _ = io::Write::write_all(&mut io::stderr().lock(), line.as_bytes());
        if let Some(fd) = self.take_ready_pipe() {
            let mut end = reason.len().min(MAX_REASON);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            let mut msg = Vec::with_capacity(1 + end);
            msg.push(FAIL_BYTE);
            msg.extend_from_slice(&reason.as_bytes()[..end]);
            let _ = write_all(fd.as_fd(), &msg);
        }
        std::process::exit(1)
    }

    /// Sets the state to hand to the next generation: an opaque blob (TLS session-ticket
    /// keys, counters, a configuration digest) of at most [`MAX_STATE_SIZE`] bytes. Call
    /// it before [`upgrade`](Upgrader::upgrade); calling it again replaces it.
    ///
    /// The bytes are copied now into a sealed memory file (`memfd`, Linux) or an unlinked
    /// temporary file (elsewhere), which travels in the fd table: the next generation
    /// finds the whole blob as soon as it starts, so a parent that dies meanwhile cannot
    /// leave it half-written.
    pub fn set_state(&self, state: &[u8]) -> Result<()> {
        let size = state.len() as u64;
        if size > MAX_STATE_SIZE {
            return Err(Error::StateTooLarge {
                size,
                max: MAX_STATE_SIZE,
            });
        }
        let fd = crate::state::store(state)?;
        *self.state_out.lock().unwrap_or_else(|e| e.into_inner()) = Some(fd);
        Ok(())
    }

    /// Takes the state the previous generation handed over with
    /// [`set_state`](Upgrader::set_state): `Ok(None)` if there is none, or it was taken
    /// already, or [`ready`](Upgrader::ready) has discarded it.
    pub fn take_state(&self) -> Result<Option<Vec<u8>>> {
        let fd = self
            .state_in
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match fd {
            None => Ok(None),
            Some(fd) => crate::state::load(fd.as_fd()).map(Some),
        }
    }

    /// Starts the next generation and blocks until it is ready (`Ok`) or has failed.
    ///
    /// On success this generation should stop accepting, finish its work and exit: the
    /// [exit notification](Upgrader::wait_for_exit) fires and the registry drops its
    /// copies of the passed fds. On failure nothing changed: this generation keeps its
    /// fds and keeps serving, the child (if any) was reaped, and another upgrade may
    /// be tried. The error says what happened: [`Error::Exec`], [`Error::ChildExited`],
    /// [`Error::ChildFailed`] (with the child's own reason), [`Error::Timeout`] (the child
    /// was killed), or [`Error::Stopped`].
    ///
    /// Refused with [`Error::NotReady`] before [`ready`](Upgrader::ready),
    /// [`Error::UpgradeInProgress`] while another upgrade runs, [`Error::AlreadyUpgraded`]
    /// after a successful one, [`Error::Stopped`] after [`stop`](Upgrader::stop), and
    /// [`Error::ParentAlive`] while this generation's own parent has not exited.
    pub fn upgrade(&self) -> Result<()> {
        let cancel = {
            let mut st = self.lock();
            match st.phase {
                Phase::Starting => return Err(Error::NotReady),
                Phase::Upgraded => return Err(Error::AlreadyUpgraded),
                Phase::Stopped => return Err(Error::Stopped),
                Phase::Ready => {}
            }
            if st.upgrading {
                return Err(Error::UpgradeInProgress);
            }
            if let Some(p) = self.parent.as_ref().filter(|_| !self.upgrade_during_drain) {
                let gone = poll_readable(p.lifeline.as_fd(), Some(Duration::ZERO))
                    .map_err(|e| Error::io("poll", Some(p.lifeline.as_raw_fd()), e))?;
                if !gone {
                    return Err(Error::ParentAlive { pid: p.pid });
                }
            }
            let (cancel_rd, cancel_wr) =
                pipe_with(PipeFlags::CLOEXEC).map_err(|e| Error::io("pipe2", None, e))?;
            st.cancel = Some(cancel_wr);
            st.upgrading = true;
            drop(st);
            cancel_rd
        };
        if let Some(n) = &self.notify {
            n.reloading();
        }
        let result = self.run_upgrade(cancel.as_fd());
        if let (Some(n), Err(e)) = (&self.notify, &result) {
            n.upgrade_failed(e);
        }
        let mut st = self.lock();
        st.upgrading = false;
        st.cancel = None;
        if result.is_ok() {
            if st.phase != Phase::Stopped {
                st.phase = Phase::Upgraded;
            }
            self.upgraded.store(true, Ordering::SeqCst);
            self.fds.drop_all();
            self.fire_exit();
        }
        self.changed.notify_all();
        result
    }

    fn run_upgrade(&self, cancel: BorrowedFd<'_>) -> Result<()> {
        let exe = spawn::resolve_executable(self.executable.as_deref(), &self.argv0, &self.cwd)?;
        let pipe = || pipe_with(PipeFlags::CLOEXEC).map_err(|e| Error::io("pipe2", None, e));
        let (ready_rd, ready_wr) = pipe()?;
        let (life_rd, life_wr) = pipe()?;
        // A handle of our own, so that set_state() during the spawn cannot close it.
        let state = match &*self.state_out.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(fd) => Some(
                fd.try_clone()
                    .map_err(|e| Error::io("fcntl(F_DUPFD_CLOEXEC)", Some(fd.as_raw_fd()), e))?,
            ),
            None => None,
        };
        let pid = self.fds.with_passed(|passed| {
            let mut entries: Vec<(RawFd, &Key, Option<wire::FileId>)> =
                Vec::with_capacity(passed.len() + 3);
            entries.push((ready_wr.as_raw_fd(), &Key::Ready, None));
            entries.push((life_rd.as_raw_fd(), &Key::Parent, None));
            if let Some(state) = &state {
                entries.push((state.as_raw_fd(), &Key::State, None));
            }
            entries.extend_from_slice(passed);
            let table = wire::encode_with_ids(entries.iter().copied());
            if table.len() > wire::MAX_LEN {
                return Err(Error::Exec {
                    path: exe.clone(),
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "the fd table for {} fds is {} bytes, over the limit of {}",
                            entries.len(),
                            table.len(),
                            wire::MAX_LEN
                        ),
                    ),
                });
            }
            let fds: Vec<RawFd> = entries.iter().map(|(fd, _, _)| *fd).collect();
            spawn::spawn(&exe, &self.argv, &self.cwd_c, &table, &fds)
        })?;
        drop(ready_wr);
        drop(life_rd);
        let child = Child::new(pid);
        self.wait_ready(&child, ready_rd.as_fd(), cancel)?;
        // The new generation watches this pipe to learn when we have exited: keep its
        // write end open until the process ends.
        std::mem::forget(life_wr);
        Ok(())
    }

    /// Waits for the readiness byte, the child's death, `stop()` or the timeout.
    fn wait_ready(
        &self,
        child: &Child,
        ready: BorrowedFd<'_>,
        cancel: BorrowedFd<'_>,
    ) -> Result<()> {
        let deadline = Instant::now().checked_add(self.timeout);
        loop {
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if remaining == Some(Duration::ZERO) {
                child.kill_and_reap();
                return Err(Error::Timeout {
                    pid: child.pid as u32,
                    timeout: self.timeout,
                });
            }
            let mut pfds = vec![pollfd(ready), pollfd(cancel)];
            if let Some(pidfd) = &child.pidfd {
                pfds.push(pollfd(pidfd.as_fd()));
            }
            poll(&mut pfds, remaining)
                .map_err(|e| Error::io("poll", Some(ready.as_raw_fd()), e))?;
            if pfds[0].revents != 0 {
                let mut byte = [0u8; 1];
                match read_some(ready, &mut byte) {
                    Ok(1) if byte[0] == READY_BYTE => return Ok(()),
                    Ok(1) if byte[0] == FAIL_BYTE => {
                        let reason = read_reason(ready, deadline);
                        return match child.wait_exit(deadline) {
                            Some(Ok(status)) => Err(Error::ChildFailed {
                                pid: child.pid as u32,
                                reason,
                                status,
                            }),
                            Some(Err(e)) => Err(e),
                            None => {
                                let status = child.kill_and_reap();
                                Err(Error::ChildFailed {
                                    pid: child.pid as u32,
                                    reason,
                                    status,
                                })
                            }
                        };
                    }
                    // EOF (or garbage): the child closed the pipe without being ready.
                    _ => {
                        let status = child.wait_exit(deadline);
                        return match status {
                            Some(Ok(status)) => Err(Error::ChildExited {
                                pid: child.pid as u32,
                                status,
                            }),
                            Some(Err(e)) => Err(e),
                            None => {
                                child.kill_and_reap();
                                Err(Error::Timeout {
                                    pid: child.pid as u32,
                                    timeout: self.timeout,
                                })
                            }
                        };
                    }
                }
            }
            if pfds[1].revents != 0 {
                child.kill_and_reap();
                return Err(Error::Stopped);
            }
            if pfds.get(2).is_some_and(|p| p.revents != 0) {
                match child.wait_exit(deadline) {
                    Some(Ok(status)) => {
                        return Err(Error::ChildExited {
                            pid: child.pid as u32,
                            status,
                        })
                    }
                    Some(Err(e)) => return Err(e),
                    None => {}
                }
            }
        }
    }

    /// Stops upgrading: no upgrade starts after this, and one in progress is cancelled
    /// (its child killed and reaped, its `upgrade()` returning [`Error::Stopped`]) before
    /// the exit notification fires and `stop` returns. If no upgrade ever succeeded, the
    /// socket files of the Unix sockets this process listened on are removed, except,
    /// in a new generation that never became ready, those it inherited (the previous
    /// generation still serves on them). Calling it again does nothing.
    pub fn stop(&self) {
        let mut st = self.lock();
        if st.phase == Phase::Stopped {
            return;
        }
        let upgraded = st.phase == Phase::Upgraded;
        // A generation that never became ready was not serving: the previous one (if
        // any) still is, on the same sockets, and systemd must not hear STOPPING.
        let was_ready = st.phase != Phase::Starting;
        st.phase = Phase::Stopped;
        drop(st.cancel.take());
        while st.upgrading {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        // An upgrade that completed while we waited counts.
        if !upgraded && !self.upgraded.load(Ordering::SeqCst) {
            self.fds
                .unlink_socket_files(was_ready || self.parent.is_none());
            if let Some(n) = self.notify.as_ref().filter(|_| was_ready) {
                n.stopping();
            }
        }
        drop(st);
        self.fire_exit();
    }

    /// Blocks until this process should exit: an upgrade succeeded or [`stop`](Upgrader::stop)
    /// was called.
    pub fn wait_for_exit(&self) {
        loop {
            match poll_readable(self.exit_rd.as_fd(), None) {
                Ok(true) => return,
                Ok(false) => {}
                // poll on a valid fd fails only for lack of memory: back off, retry.
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// An fd that becomes readable (and stays readable) when this process should exit,
    /// at the same moment [`wait_for_exit`](Upgrader::wait_for_exit) returns. Register it
    /// with `poll`, epoll, mio or tokio's `AsyncFd` next to your listeners. Do not read
    /// from it or change its flags.
    pub fn exit_fd(&self) -> BorrowedFd<'_> {
        self.exit_rd.as_fd()
    }

    /// Whether an upgrade succeeded: the exit notification fired because a new
    /// generation took over (rather than because of [`stop`](Upgrader::stop)).
    pub fn upgraded(&self) -> bool {
        self.upgraded.load(Ordering::SeqCst)
    }

    /// Whether this process should exit now (the exit fd is readable).
    pub fn should_exit(&self) -> bool {
        matches!(
            poll_readable(self.exit_rd.as_fd(), Some(Duration::ZERO)),
            Ok(true)
        )
    }

    /// The write end of the readiness pipe, once: `ready()` or `fail()` uses it up.
    fn take_ready_pipe(&self) -> Option<OwnedFd> {
        let parent = self.parent.as_ref()?;
        let mut ready = parent.ready.lock().unwrap_or_else(|e| e.into_inner());
        ready.take()
    }

    fn fire_exit(&self) {
        // Closing the only write end makes the read end readable (EOF) for everyone.
        drop(
            self.exit_wr
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Upgrader {
    fn drop(&mut self) {
        self.stop();
        ALIVE.store(false, Ordering::SeqCst);
    }
}

/// What a process inherits: the registry's fds (with their socket files' identity), the
/// link to its parent, the state.
type Inheritance = (
    Vec<(OwnedFd, Key, Option<wire::FileId>)>,
    Option<Parent>,
    Option<OwnedFd>,
);

fn read_table() -> Result<Inheritance> {
    let Some(value) = std::env::var_os(wire::VAR) else {
        return Ok((Vec::new(), None, None));
    };
    let table_err = |entry: String, reason: String| Error::FdTable {
        var: wire::VAR,
        entry,
        reason,
        source: None,
    };
    let table = match wire::decode(value.as_bytes(), std::process::id()) {
        Ok(Some(t)) => t,
        Ok(None) => return Ok((Vec::new(), None, None)),
        Err(e) => return Err(table_err(e.entry, e.reason)),
    };
    for needed in [Key::Ready, Key::Parent] {
        if !table.entries.iter().any(|(_, k)| *k == needed) {
            // No entry is at fault: name the whole value (bounded).
            let mut whole = value.to_string_lossy().into_owned();
            if whole.len() > 200 {
                let mut end = 200;
                while !whole.is_char_boundary(end) {
                    end -= 1;
                }
                whole.truncate(end);
                whole.push_str("...");
            }
            return Err(table_err(whole, format!("no {} entry", needed.tag())));
        }
    }
    let file_ids = table.file_ids;
    let adopted = fds::adopt(wire::VAR, table.entries)?;
    let mut ready = None;
    let mut lifeline = None;
    let mut state = None;
    let mut rest = Vec::with_capacity(adopted.len());
    for (fd, key) in adopted {
        match key {
            Key::Ready => ready = Some(fd),
            Key::Parent => lifeline = Some(fd),
            Key::State => state = Some(fd),
            _ => {
                let id = file_ids.get(&fd.as_raw_fd()).copied();
                rest.push((fd, key, id));
            }
        }
    }
    let parent = match (ready, lifeline) {
        (Some(ready), Some(lifeline)) => Some(Parent {
            pid: std::os::unix::process::parent_id(),
            ready: Mutex::new(Some(ready)),
            lifeline,
        }),
        _ => None,
    };
    Ok((rest, parent, state))
}

/// A child process we started and have not reaped.
struct Child {
    pid: libc::pid_t,
    /// Readable when the child exits (Linux 5.3+); `None` elsewhere.
    pidfd: Option<OwnedFd>,
}

impl Child {
    fn new(pid: libc::pid_t) -> Child {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let pidfd = rustix::process::Pid::from_raw(pid).and_then(|p| {
            rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
        });
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let pidfd = None;
        Child { pid, pidfd }
    }

    fn kill_and_reap(&self) -> ExitStatus {
        // SAFETY: `pid` is our unreaped child, so the pid cannot have been reused.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        ExitStatus::from_raw(reap(self.pid))
    }

    /// Waits for the child to exit until `deadline`, and reaps it. `None` on timeout.
    fn wait_exit(&self, deadline: Option<Instant>) -> Option<Result<ExitStatus>> {
        loop {
            match try_reap(self.pid) {
                Ok(Some(raw)) => return Some(Ok(ExitStatus::from_raw(raw))),
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if remaining == Some(Duration::ZERO) {
                return None;
            }
            match &self.pidfd {
                Some(fd) => {
                    let _ = poll_readable(fd.as_fd(), remaining);
                }
                // No pidfd: poll the exit with a short sleep. Only reached on systems
                // without pidfd, and only once the child closed its readiness pipe.
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }
}

/// Reaps `pid` without blocking: `Ok(Some(raw status))` once it has exited. An error
/// (`ECHILD`) means somebody else reaped it: `SIGCHLD` ignored, or a `waitpid(-1)`
/// elsewhere in the process.
fn try_reap(pid: libc::pid_t) -> Result<Option<i32>> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child with a valid status pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        match rc {
            0 => return Ok(None),
            -1 => {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io(
                    "waitpid for the new generation (reaped elsewhere? SIGCHLD ignored?)",
                    None,
                    err,
                ));
            }
            _ => return Ok(Some(status)),
        }
    }
}

/// Reaps `pid`, blocking until it exits. Returns its raw wait status.
pub(crate) fn reap(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child with a valid status pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return status;
    }
}

fn pollfd(fd: BorrowedFd<'_>) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }
}

/// `poll(2)` that retries on `EINTR` with the time left.
fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    loop {
        let ms: libc::c_int = match (timeout, deadline) {
            (None, _) | (Some(_), None) => -1,
            (Some(_), Some(d)) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up so a sub-millisecond remainder does not spin.
                let ms = left.as_micros().div_ceil(1000);
                ms.min(libc::c_int::MAX as u128) as libc::c_int
            }
        };
        // SAFETY: `fds` is a valid slice of pollfd for its whole length.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Whether `fd` becomes readable (or hung up) within `timeout` (`None`: forever).
fn poll_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    let mut pfd = [pollfd(fd)];
    Ok(poll(&mut pfd, timeout)? > 0 && pfd[0].revents != 0)
}

/// Reads a failure reason (after its first byte) until EOF, `MAX_REASON` bytes or the
/// deadline.
fn read_reason(fd: BorrowedFd<'_>, deadline: Option<Instant>) -> String {
    let mut buf = vec![0u8; MAX_REASON];
    let mut len = 0;
    while len < buf.len() {
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if remaining == Some(Duration::ZERO) || !matches!(poll_readable(fd, remaining), Ok(true)) {
            break;
        }
        match read_some(fd, &mut buf[len..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => len += n,
        }
    }
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

fn read_some(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match rustix::io::read(fd, &mut *buf) {
            Ok(n) => return Ok(n),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

fn write_all(fd: BorrowedFd<'_>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match rustix::io::write(fd, buf) {
            Ok(n) => buf = &buf[n..],
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

// An Upgrader is shared between the serving threads and the one that upgrades.
const _: () = {
    const fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<Upgrader>();
    is_send_sync::<Options>();
};
