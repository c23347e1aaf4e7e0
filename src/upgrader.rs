//! The `Upgrader`: one per process, the story of a generation.
//!
//! A generation is born ([`Upgrader::new`]: it adopts what its parent passed), becomes
//! ready ([`Upgrader::ready`]: it reports to its parent, which commits), serves, and
//! ends by handing over ([`Upgrader::upgrade`]: it starts the next generation and
//! commits to it) or by stopping ([`Upgrader::stop`]). How the two generations talk is
//! in [`handshake`](crate::handshake).

use std::fmt;
use std::io;
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::adoption::Adoption;
use crate::error::{Error, Result};
use crate::fds::Fds;
use crate::handshake::{Decision, Handoff, Parent};
use crate::inherit::{self, Inheritance};
use crate::options::Options;
use crate::os;
use crate::spawn::Program;
use crate::status::{LastUpgrade, Status};
use crate::systemd::{self, Notifier};

/// One `Upgrader` at a time per process.
static ALIVE: AtomicBool = AtomicBool::new(false);
/// The inherited fd table is read by the first `Upgrader` only.
static TABLE_READ: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not ready yet (possibly waiting for the parent to commit: see `State::busy`).
    Starting,
    Ready,
    /// An upgrade succeeded; this generation should exit.
    Upgraded,
    Stopped,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// While an upgrade runs, or `ready()` waits for the parent's commit.
    busy: bool,
    /// The write end of the busy operation's cancel pipe: dropping it wakes the waiting
    /// thread, which gives up (killing and reaping a child it started).
    cancel: Option<OwnedFd>,
    /// How the last upgrade that ran ended, for [`Upgrader::status`].
    last_upgrade: Option<LastUpgrade>,
}

/// Runs graceful upgrades for this process: Go tableflip's `Upgrader`.
///
/// Create one early in `main` with [`Upgrader::new`], get your sockets from
/// [`fds`](Upgrader::fds), start serving, call [`ready`](Upgrader::ready), call
/// [`upgrade`](Upgrader::upgrade) (from a signal-handling thread, say) to start the next
/// generation, and exit when [`wait_for_exit`](Upgrader::wait_for_exit) returns.
///
/// Every method takes `&self`, so an `Upgrader` can be shared through an `Arc`.
/// Dropping it is [`stop`](Upgrader::stop).
pub struct Upgrader {
    fds: Fds,
    program: Program,
    timeout: Duration,
    probation: Duration,
    pid_file: Option<PathBuf>,
    upgrade_during_drain: bool,
    /// Keep the sockets in systemd's fd store.
    fd_store: bool,
    /// The previous generation, if this one was started by an upgrade.
    parent: Option<Parent>,
    /// systemd's notify socket, if `$NOTIFY_SOCKET` was set at start.
    notify: Option<Notifier>,
    state: Mutex<State>,
    changed: Condvar,
    exit: ExitSignal,
    /// Whether an upgrade ever succeeded.
    upgraded: AtomicBool,
    /// The state to hand to the next generation (`set_state`).
    state_out: Mutex<Option<OwnedFd>>,
    /// The state handed over by the previous generation, until `take_state` or `ready`.
    state_in: Mutex<Option<OwnedFd>>,
}

impl fmt::Debug for Upgrader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upgrader")
            .field("state", &*self.lock())
            .field("parent", &self.parent.as_ref().map(Parent::pid))
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
        let program = Program::current(options.executable)?;
        let inheritance = if TABLE_READ.swap(true, Ordering::SeqCst) {
            Inheritance::default()
        } else {
            inherited()?
        };
        let exit = ExitSignal::new()?;
        let pid_file = options.pid_file.map(|p| program.cwd().join(p));
        guard.0 = true;
        Ok(Upgrader {
            fds: Fds::new(inheritance.fds, options.before_bind, options.backlog),
            program,
            timeout: options.upgrade_timeout,
            probation: options.probation,
            pid_file,
            upgrade_during_drain: options.upgrade_during_drain,
            fd_store: options.fd_store || systemd::store_offered(),
            parent: inheritance.parent,
            notify: Notifier::from_env(),
            state: Mutex::new(State {
                phase: Phase::Starting,
                busy: false,
                cancel: None,
                last_upgrade: None,
            }),
            changed: Condvar::new(),
            exit,
            upgraded: AtomicBool::new(false),
            state_out: Mutex::new(None),
            state_in: Mutex::new(inheritance.state),
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
            Some(p) => p.gone_by(os::deadline(Some(timeout))),
        }
    }

    /// Tells the previous generation that this one is ready to serve, waits for it to
    /// commit the upgrade, then takes over: writes the pid file, closes the inherited fds
    /// nobody took (removing their Unix socket files) and returns.
    ///
    /// Start serving *before* calling it: with a probation
    /// ([`Options::probation`]) the previous generation commits only once the window has
    /// passed, and both serve meanwhile. If the previous generation gives up on this one
    /// instead (a timeout, or `stop()` there), this process is killed before it has
    /// changed anything outside: no pid file, no message to systemd, no unlinked file.
    /// If the previous generation has died meanwhile, this one carries on alone (and
    /// tells systemd its pid itself).
    ///
    /// Returns the [adoption report](Adoption): which inherited fds were taken and which
    /// were closed because nobody asked for them. State handed over with
    /// [`set_state`](Upgrader::set_state) and not read by now is discarded. Calling it
    /// again does nothing (and reports nothing); after [`stop`](Upgrader::stop) it fails
    /// with [`Error::Stopped`].
    pub fn ready(&self) -> Result<Adoption> {
        let (decision, mut st) = match &self.parent {
            None => (Decision::Alone, self.lock()),
            Some(parent) => {
                let Some(cancel) = self.begin_ready()? else {
                    return Ok(Adoption::default());
                };
                let decision = parent.report_ready(cancel.as_fd());
                let st = self.end_busy();
                (decision?, st)
            }
        };
        match st.phase {
            Phase::Starting if decision != Decision::Stopped => {}
            Phase::Ready | Phase::Upgraded => return Ok(Adoption::default()),
            Phase::Starting | Phase::Stopped => return Err(Error::Stopped),
        }
        let adoption = self.take_over(decision == Decision::Alone)?;
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
        if let Some(parent) = &self.parent {
            parent.fail(&reason);
        }
        std::process::exit(1)
    }

    /// Sets the state to hand to the next generation: an opaque blob (TLS session-ticket
    /// keys, counters, a configuration digest) of at most
    /// [`MAX_STATE_SIZE`](crate::MAX_STATE_SIZE) bytes. Call it before
    /// [`upgrade`](Upgrader::upgrade); calling it again replaces it.
    ///
    /// The bytes are copied now into a sealed memory file (`memfd`, Linux) or an unlinked
    /// temporary file (elsewhere), which travels in the fd table: the next generation
    /// finds the whole blob as soon as it starts, so a parent that dies meanwhile cannot
    /// leave it half-written.
    pub fn set_state(&self, state: &[u8]) -> Result<()> {
        let fd = crate::state::store(state)?;
        *lock(&self.state_out) = Some(fd);
        Ok(())
    }

    /// Takes the state the previous generation handed over with
    /// [`set_state`](Upgrader::set_state): `Ok(None)` if there is none, or it was taken
    /// already, or [`ready`](Upgrader::ready) has discarded it.
    pub fn take_state(&self) -> Result<Option<Vec<u8>>> {
        match lock(&self.state_in).take() {
            None => Ok(None),
            Some(fd) => crate::state::load(fd.as_fd()).map(Some),
        }
    }

    /// Starts the next generation, waits until it is ready (and, with
    /// [`Options::probation`], until it has stayed alive for the window), commits, and
    /// returns its pid.
    ///
    /// On success this generation should stop accepting, finish its work and exit: the
    /// [exit notification](Upgrader::wait_for_exit) has fired (just before `upgrade`
    /// returns, once the new generation has confirmed the commit) and the registry has
    /// let go of the passed fds (its copies are closed when the `Upgrader` is dropped).
    /// On failure nothing changed: this generation keeps its fds and keeps serving, it
    /// is systemd's main pid and its pid file names it, the child (if any) was reaped,
    /// and another upgrade may be tried. The error says what happened: [`Error::Exec`],
    /// [`Error::ChildExited`], [`Error::ChildFailed`] (with the child's own reason),
    /// [`Error::Timeout`] (the child was killed), [`Error::ChildDiedAfterReady`] (it
    /// died during the probation), [`Error::Notify`], or [`Error::Stopped`].
    ///
    /// Refused with [`Error::NotReady`] before [`ready`](Upgrader::ready),
    /// [`Error::UpgradeInProgress`] while another upgrade runs, [`Error::AlreadyUpgraded`]
    /// after a successful one, [`Error::Stopped`] after [`stop`](Upgrader::stop), and
    /// [`Error::ParentAlive`] while this generation's own parent has not exited.
    pub fn upgrade(&self) -> Result<u32> {
        let cancel = match self.begin_upgrade() {
            Ok(cancel) => cancel,
            Err(e) => {
                if let (Some(n), Error::ParentAlive { .. }) = (&self.notify, &e) {
                    n.refused(&e);
                }
                return Err(e);
            }
        };
        if let Some(n) = &self.notify {
            n.reloading();
        }
        let result = self.hand_over(cancel.as_fd());
        if let (Some(n), Err(e)) = (&self.notify, &result) {
            // Whatever the commit may have told systemd: this generation is the main one.
            n.upgrade_failed(e);
        }
        let mut st = self.end_busy();
        st.last_upgrade = Some(LastUpgrade::of(&result));
        if result.is_ok() {
            if st.phase != Phase::Stopped {
                st.phase = Phase::Upgraded;
            }
            self.upgraded.store(true, Ordering::SeqCst);
            // Exit first: this generation stops accepting as soon as it can.
            self.exit.fire();
            self.fds.retire_all();
        }
        result
    }

    /// The upgrade itself: start, wait for ready, probation, commit.
    fn hand_over(&self, cancel: BorrowedFd<'_>) -> Result<u32> {
        let exe = self.program.resolve()?;
        // A handle of our own, so that set_state() during the spawn cannot close it.
        let state = match &*lock(&self.state_out) {
            Some(fd) => Some(
                fd.try_clone()
                    .map_err(|e| Error::io("fcntl(F_DUPFD_CLOEXEC)", Some(fd.as_raw_fd()), e))?,
            ),
            None => None,
        };
        let handoff = self.fds.with_passed(|passed| {
            Handoff::start(
                &self.program,
                &exe,
                state.as_ref().map(|s| s.as_fd()),
                passed,
            )
        })?;
        // Under a keeper: the child is named before it can claim the service.
        if let Some(n) = &self.notify {
            n.announce(handoff.pid());
        }
        let handoff = handoff
            .wait_ready(self.timeout, cancel)?
            .probation(self.probation, cancel)?;
        // The commit: systemd hears it from this process, still its main one.
        if let Some(n) = &self.notify {
            if let Err(e) = n.commit(handoff.pid()) {
                return Err(handoff.kill(e));
            }
        }
        let pid = handoff.commit(self.timeout, cancel).map_err(|e| {
            // The child may have written its pid into the pid file before it died.
            if let Some(path) = &self.pid_file {
                let _ = crate::pidfile::write(path, std::process::id());
            }
            e
        })?;
        // Not gone before systemd knows who follows (see `wait_commit_read`).
        if let Some(n) = &self.notify {
            n.wait_commit_read();
        }
        Ok(pid)
    }

    /// Stops upgrading: no upgrade starts after this, and one in progress is cancelled
    /// (its child killed and reaped, its `upgrade()` returning [`Error::Stopped`]) before
    /// the exit notification fires and `stop` returns. A `ready()` waiting for the
    /// previous generation's commit returns [`Error::Stopped`] (the previous generation
    /// then serves on). If no upgrade ever succeeded, the socket files of the Unix
    /// sockets this process listened on are removed, except, in a new generation that
    /// never became ready, those it inherited (the previous generation still serves on
    /// them). Calling it again does nothing.
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
        while st.busy {
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
        self.exit.fire();
    }

    /// Blocks until this process should exit: an upgrade succeeded or [`stop`](Upgrader::stop)
    /// was called.
    pub fn wait_for_exit(&self) {
        self.exit.wait();
    }

    /// An fd that becomes readable (and stays readable) when this process should exit,
    /// at the same moment [`wait_for_exit`](Upgrader::wait_for_exit) returns. Register it
    /// with `poll`, epoll, mio or tokio's `AsyncFd` next to your listeners. Do not read
    /// from it or change its flags. [`exit_handle`](Upgrader::exit_handle) gives an owned
    /// one, for code that must not borrow the `Upgrader`.
    pub fn exit_fd(&self) -> BorrowedFd<'_> {
        self.exit.fd()
    }

    /// An owned, `'static` handle on the exit notification: an fd of its own (a
    /// duplicate) that becomes readable when this process should exit, with
    /// [`AsFd`](std::os::fd::AsFd), so an async runtime can wait on it without `unsafe`
    /// and without a thread parked in [`wait_for_exit`](Upgrader::wait_for_exit). It is
    /// the read end of a pipe: tokio takes it as a `tokio::net::unix::pipe::Receiver`
    /// (see [the tokio guide](crate::guide::tokio)); for mio, register
    /// `SourceFd(&handle.as_raw_fd())`.
    pub fn exit_handle(&self) -> Result<ExitHandle> {
        let fd = self.exit.fd();
        fd.try_clone_to_owned()
            .map(|fd| ExitHandle { fd })
            .map_err(|e| Error::io("fcntl(F_DUPFD_CLOEXEC)", Some(fd.as_raw_fd()), e))
    }

    /// Waits until `fd` is readable (a connection waits on a listener, say), this
    /// process should exit, or `timeout` passes (`None`: no timeout). The exit
    /// notification wins a tie, so a generation stops accepting as soon as it is told.
    ///
    /// The accept loop of a std server, without `unsafe`:
    ///
    /// ```no_run
    /// # fn serve(upg: &tableflip::Upgrader, listener: std::net::TcpListener) -> std::io::Result<()> {
    /// use tableflip::Wake;
    /// listener.set_nonblocking(true)?; // in every generation alike: the flag is shared
    /// while upg.wait_readable(&listener, None) == Wake::Readable {
    ///     // Accept a bounded batch, without blocking, so the exit check comes soon.
    ///     for _ in 0..64 {
    ///         match listener.accept() {
    ///             Ok((conn, _)) => { /* hand it to a thread */ drop(conn) }
    ///             Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
    ///             Err(e) => { eprintln!("accept: {e}"); break }
    ///         }
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn wait_readable(&self, fd: impl AsFd, timeout: Option<Duration>) -> Wake {
        self.exit.wait_with(fd.as_fd(), timeout)
    }

    /// Whether an upgrade succeeded: the exit notification fired because a new
    /// generation took over (rather than because of [`stop`](Upgrader::stop)).
    pub fn upgraded(&self) -> bool {
        self.upgraded.load(Ordering::SeqCst)
    }

    /// What this generation is doing: its pid, whether it is ready, whether an upgrade
    /// runs now, and how the last one ended. The control socket's `status` command
    /// answers with it.
    pub fn status(&self) -> Status {
        let st = self.lock();
        Status {
            pid: std::process::id(),
            ready: st.phase == Phase::Ready,
            // While not ready, `busy` is ready() waiting for the commit.
            upgrading: st.busy && st.phase != Phase::Starting,
            started_by: self.parent.as_ref().map(|p| p.pid()),
            last_upgrade: st.last_upgrade.clone(),
        }
    }

    /// Whether this process should exit now (the exit fd is readable).
    pub fn should_exit(&self) -> bool {
        self.exit.fired()
    }

    /// Marks `ready()` busy waiting for the commit, with a cancel pipe for `stop()`.
    /// `None` if there is nothing to do.
    fn begin_ready(&self) -> Result<Option<OwnedFd>> {
        let mut st = self.lock();
        while st.busy {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        match st.phase {
            Phase::Starting => {}
            Phase::Ready | Phase::Upgraded => return Ok(None),
            Phase::Stopped => return Err(Error::Stopped),
        }
        Ok(Some(self.set_busy(&mut st)?))
    }

    /// Checks that an upgrade may start, and marks it running.
    fn begin_upgrade(&self) -> Result<OwnedFd> {
        let mut st = self.lock();
        match st.phase {
            Phase::Starting => return Err(Error::NotReady),
            Phase::Upgraded => return Err(Error::AlreadyUpgraded),
            Phase::Stopped => return Err(Error::Stopped),
            Phase::Ready => {}
        }
        if st.busy {
            return Err(Error::UpgradeInProgress);
        }
        if let Some(p) = self.parent.as_ref().filter(|_| !self.upgrade_during_drain) {
            if !p.gone_by(Some(std::time::Instant::now()))? {
                return Err(Error::ParentAlive { pid: p.pid() });
            }
        }
        self.set_busy(&mut st)
    }

    fn set_busy(&self, st: &mut State) -> Result<OwnedFd> {
        let (cancel_rd, cancel_wr) = os::pipe().map_err(|e| Error::io("pipe2", None, e))?;
        st.cancel = Some(cancel_wr);
        st.busy = true;
        Ok(cancel_rd)
    }

    /// Ends a busy operation; returns the state, still locked.
    fn end_busy(&self) -> MutexGuard<'_, State> {
        let mut st = self.lock();
        st.busy = false;
        st.cancel = None;
        self.changed.notify_all();
        st
    }

    /// This generation takes over: `alone` when no parent committed to it (a first
    /// start, or a parent that died undecided).
    fn take_over(&self, alone: bool) -> Result<Adoption> {
        if let Some(path) = &self.pid_file {
            if let Err(source) = crate::pidfile::write(path, std::process::id()) {
                let err = Error::PidFile {
                    path: path.clone(),
                    source,
                };
                // The parent rolls back.
                if let Some(parent) = &self.parent {
                    parent.fail(&err.to_string());
                }
                return Err(err);
            }
        }
        if let Some(n) = self.notify.as_ref().filter(|_| alone) {
            n.ready_alone();
        }
        if let Some(parent) = &self.parent {
            parent.confirm();
        }
        drop(lock(&self.state_in).take());
        let (adoption, closed) = self.fds.close_unused();
        if let Some(n) = self.notify.as_ref().filter(|_| self.fd_store) {
            self.keep_in_store(n, &closed);
        }
        Ok(adoption)
    }

    /// The fd store follows this generation: what it closed out, what it uses in (in
    /// that order: a socket group that shrank keeps its name).
    fn keep_in_store(&self, n: &Notifier, closed: &[(crate::wire::Key, crate::wire::Extra)]) {
        let mut gone: Vec<String> = closed
            .iter()
            .filter_map(|(key, extra)| systemd::store_name(key, *extra))
            .collect();
        gone.sort();
        gone.dedup();
        for name in &gone {
            n.unstore(name);
        }
        self.fds.with_passed(|passed| {
            let kept: Vec<(String, BorrowedFd<'_>)> = passed
                .iter()
                .filter_map(|(fd, key, extra)| Some((systemd::store_name(key, *extra)?, *fd)))
                .collect();
            n.store(&kept);
        });
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl Drop for Upgrader {
    fn drop(&mut self) {
        self.stop();
        ALIVE.store(false, Ordering::SeqCst);
    }
}

/// What this process inherits: from the previous generation, or else from systemd's
/// socket activation.
fn inherited() -> Result<Inheritance> {
    let mut inheritance = inherit::from_env()?;
    if inheritance.parent.is_none() {
        inheritance.fds = systemd::activated()?;
    }
    Ok(inheritance)
}

/// A lock that survives a panic of another holder: every state guarded here stays
/// consistent between statements.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What [`Upgrader::wait_readable`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The fd is readable: accept (without blocking) until `WouldBlock`.
    Readable,
    /// This process should exit: stop accepting, finish what is in flight.
    Exit,
    /// The timeout passed.
    TimedOut,
}

/// An owned handle on the exit notification, from [`Upgrader::exit_handle`]: readable
/// once the process should exit. It outlives the `Upgrader` (then it is readable).
#[derive(Debug)]
pub struct ExitHandle {
    fd: OwnedFd,
}

impl ExitHandle {
    /// Blocks until the process should exit.
    pub fn wait(&self) {
        while os::readable(self.fd.as_fd(), None).is_err() {
            // poll on a valid fd fails only for lack of memory: back off, retry.
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process should exit now.
    pub fn fired(&self) -> bool {
        matches!(
            os::readable(self.fd.as_fd(), Some(std::time::Instant::now())),
            Ok(true)
        )
    }
}

impl AsFd for ExitHandle {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for ExitHandle {
    fn as_raw_fd(&self) -> std::os::unix::io::RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<ExitHandle> for OwnedFd {
    fn from(handle: ExitHandle) -> OwnedFd {
        handle.fd
    }
}

/// The exit notification: a pipe whose only write end is closed when this process
/// should exit, so the read end is readable (EOF) for every waiter from then on.
#[derive(Debug)]
struct ExitSignal {
    rd: OwnedFd,
    wr: Mutex<Option<OwnedFd>>,
}

impl ExitSignal {
    fn new() -> Result<ExitSignal> {
        let (rd, wr) = os::pipe().map_err(|e| Error::io("pipe2", None, e))?;
        Ok(ExitSignal {
            rd,
            wr: Mutex::new(Some(wr)),
        })
    }

    fn fire(&self) {
        drop(lock(&self.wr).take());
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.rd.as_fd()
    }

    fn fired(&self) -> bool {
        matches!(
            os::readable(self.rd.as_fd(), Some(std::time::Instant::now())),
            Ok(true)
        )
    }

    fn wait(&self) {
        loop {
            match os::readable(self.rd.as_fd(), None) {
                Ok(true) => return,
                Ok(false) => {}
                // poll on a valid fd fails only for lack of memory: back off, retry.
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Waits for the exit notification, `fd` readable, or the timeout.
    fn wait_with(&self, fd: BorrowedFd<'_>, timeout: Option<Duration>) -> Wake {
        let deadline = os::deadline(timeout);
        loop {
            match os::poll_in(&[self.rd.as_fd(), fd], deadline) {
                Ok(ready) if ready[0] => return Wake::Exit,
                Ok(ready) if ready[1] => return Wake::Readable,
                Ok(_) if os::left(deadline) == Some(Duration::ZERO) => return Wake::TimedOut,
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

// An Upgrader is shared between the serving threads and the one that upgrades.
const _: () = {
    const fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<Upgrader>();
    is_send_sync::<Options>();
};
