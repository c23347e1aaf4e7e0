//! Serving the control socket: access, connections, the upgrade aside.

use super::protocol::*;
use super::*;
use std::io;
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::sys::os;
use crate::sys::socket;
use crate::unix_addr::UnixAddr;
use crate::upgrader::Upgrader;

// ---- The server ------------------------------------------------------------------------

/// How a [`Server`] creates its socket and whom it serves.
#[derive(Debug, Clone)]
pub struct Config {
    mode: u32,
    uids: Vec<u32>,
    any_uid: bool,
    request_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: 0o600,
            uids: Vec::new(),
            any_uid: false,
            request_timeout: Duration::from_secs(5),
        }
    }
}

impl Config {
    /// The defaults: mode `0600`, root and the server's own user only, requests must
    /// arrive within 5 s.
    pub fn new() -> Config {
        Config::default()
    }

    /// The permission bits of a socket file this server creates (default `0o600`). An
    /// inherited socket keeps its file; abstract names have none.
    pub fn mode(mut self, mode: u32) -> Config {
        self.mode = mode & 0o777;
        self
    }

    /// Also serves peers running as `uid` (besides root and the server's own user).
    pub fn allow_uid(mut self, uid: u32) -> Config {
        self.uids.push(uid);
        self
    }

    /// Serves every peer that can connect, relying on the socket file's mode alone
    /// (with an abstract name: every process in the network namespace).
    pub fn allow_any_uid(mut self) -> Config {
        self.any_uid = true;
        self
    }

    /// How long a client may take to send its request once connected (default 5 s);
    /// then it gets `RequestTimeout` and is disconnected.
    pub fn request_timeout(mut self, timeout: Duration) -> Config {
        self.request_timeout = timeout;
        self
    }
}

/// A control socket, served by the application (see the [module docs](crate::control)).
#[derive(Debug)]
pub struct Server {
    listener: OwnedFd,
    addr: UnixAddr,
    config: Config,
    euid: u32,
}

impl Server {
    /// The control socket on `addr` (a path, or [`UnixAddr::Abstract`]) with the
    /// default [`Config`]: the one inherited from the previous generation, or a new one,
    /// registered so that it travels to the next generation.
    pub fn listen(upg: &Upgrader, addr: impl Into<UnixAddr>) -> Result<Server> {
        Server::listen_with(upg, addr, Config::new())
    }

    /// [`listen`](Server::listen) with a [`Config`].
    ///
    /// Fails with [`Error::Listen`] when the socket cannot be made, and with the
    /// registry's errors ([`Error::WrongKind`] if `addr` was passed on as something
    /// other than a stream listener).
    pub fn listen_with(
        upg: &Upgrader,
        addr: impl Into<UnixAddr>,
        config: Config,
    ) -> Result<Server> {
        let addr = addr.into();
        let listen_err = |source| Error::Listen {
            addr: addr.to_string(),
            source,
        };
        let listener = match upg.fds().take::<UnixListener>(addr.clone())? {
            // Its file keeps the mode it has.
            Some(inherited) => inherited,
            None => {
                let listener = upg.fds().listen_with::<UnixListener>(addr.clone(), |fd| {
                    restrict(fd, &addr, config.mode)
                })?;
                if let UnixAddr::Path(path) = &addr {
                    set_mode(path, config.mode).map_err(listen_err)?;
                }
                listener
            }
        };
        // Non-blocking in every generation: see the module docs.
        let listener = OwnedFd::from(listener);
        rustix::io::ioctl_fionbio(&listener, true).map_err(|e| listen_err(e.into()))?;
        Ok(Server {
            listener,
            addr,
            config,
            euid: rustix::process::geteuid().as_raw(),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> &UnixAddr {
        &self.addr
    }

    /// Serves requests until this process should exit (the [exit
    /// notification](Upgrader::exit) fires), then answers the requests already
    /// received and returns. An upgrade runs on a scoped thread that ends before
    /// `serve` returns (see [Concurrency](crate::control#concurrency)); the answer to the request
    /// that ended this generation is sent before `serve` returns, so join the thread
    /// that runs `serve` before exiting.
    ///
    /// Fails only when `poll(2)` or `accept(2)` fail in a way that retrying cannot fix
    /// ([`Error::Io`]); a failure of one connection ends that connection.
    pub fn serve(&self, upg: &Upgrader) -> Result<()> {
        thread::scope(|scope| {
            let mut worker = None;
            let mut pending: Vec<Pending> = Vec::new();
            let result = loop {
                let accepting = pending.len() < MAX_PENDING;
                let mut fds = vec![upg.exit().as_fd()];
                if accepting {
                    fds.push(self.listener.as_fd());
                }
                fds.extend(pending.iter().map(|p| p.conn.as_fd()));
                let deadline = pending.iter().map(|p| p.deadline).min();
                let ready = match os::poll_in(&fds, deadline) {
                    Ok(ready) => ready,
                    Err(e) => break Err(Error::io("poll", Some(self.listener.as_raw_fd()), e)),
                };
                if ready[0] {
                    break Ok(());
                }
                let first = if accepting { 2 } else { 1 };
                let now = Instant::now();
                // From the end, so that swap_remove moves only entries already seen.
                for i in (0..pending.len()).rev() {
                    match pending[i].progress(ready[first + i], now) {
                        Progress::Waiting => {}
                        Progress::Request(command) => {
                            let conn = pending.swap_remove(i).conn;
                            match command {
                                Command::Status => reply(&conn, &status_answer(&upg.status())),
                                Command::Upgrade => upgrade_aside(scope, &mut worker, upg, conn),
                            }
                        }
                        Progress::Refuse(kind, message) => {
                            reply(&pending.swap_remove(i).conn, &Answer::error(kind, &message))
                        }
                        Progress::Gone => drop(pending.swap_remove(i)),
                    }
                }
                if accepting && ready[1] {
                    if let Err(e) = self.accept_into(&mut pending, MAX_PENDING) {
                        break Err(e);
                    }
                }
            };
            // Told to exit (or failed): answer what has arrived; the others may ask the
            // next generation. (An upgrade asked for once this process should exit is
            // refused at once: AlreadyUpgraded, or Stopped.)
            for mut p in pending {
                match p.progress(true, Instant::now()) {
                    Progress::Request(Command::Status) => {
                        reply(&p.conn, &status_answer(&upg.status()))
                    }
                    Progress::Request(Command::Upgrade) => {
                        upgrade_aside(scope, &mut worker, upg, p.conn)
                    }
                    Progress::Refuse(kind, message) => {
                        reply(&p.conn, &Answer::error(kind, &message))
                    }
                    Progress::Waiting => reply(
                        &p.conn,
                        &Answer::error(
                            EXITING,
                            &format!(
                                "this generation (pid {}) is exiting; ask again",
                                std::process::id()
                            ),
                        ),
                    ),
                    Progress::Gone => {}
                }
            }
            result
        })
    }

    /// Serves one connection on the calling thread, if one is waiting (`Ok(false)` if
    /// none was), and returns. For a poll loop: call it when [`as_fd`](AsFd::as_fd) is readable.
    ///
    /// It reads the request (waiting at most [`Config::request_timeout`]) and answers
    /// it; an `upgrade` request runs [`Upgrader::upgrade`] here, so the call returns
    /// only when the upgrade has ended, and meanwhile nobody else is answered. Use
    /// [`serve`](Server::serve) where a second client must hear `UpgradeInProgress` at
    /// once.
    pub fn serve_one(&self, upg: &Upgrader) -> Result<bool> {
        let mut pending = Vec::new();
        let accepted = self.accept_into(&mut pending, 1)? > 0;
        for mut p in pending {
            loop {
                let readable = os::readable(p.conn.as_fd(), Some(p.deadline))
                    .map_err(|e| Error::io("poll", Some(p.conn.as_raw_fd()), e))?;
                match p.progress(readable, Instant::now()) {
                    Progress::Waiting => continue,
                    Progress::Request(Command::Status) => {
                        reply(&p.conn, &status_answer(&upg.status()))
                    }
                    Progress::Request(Command::Upgrade) => {
                        reply(&p.conn, &upgrade_answer(&upg.upgrade()))
                    }
                    Progress::Refuse(kind, message) => {
                        reply(&p.conn, &Answer::error(kind, &message))
                    }
                    Progress::Gone => {}
                }
                break;
            }
        }
        Ok(accepted)
    }

    /// Accepts the connections waiting while `pending` has fewer than `limit`, checks
    /// each peer, and adds the ones allowed to `pending` (the others are answered
    /// `PermissionDenied`). Returns how many it accepted.
    fn accept_into(&self, pending: &mut Vec<Pending>, limit: usize) -> Result<usize> {
        let mut accepted = 0;
        // Bounded, so that a flood of refused peers cannot keep this thread here.
        while pending.len() < limit && accepted < ACCEPT_BATCH {
            let conn = match accept(self.listener.as_fd()) {
                Ok(Some(conn)) => conn,
                Ok(None) => break,
                Err(e) if is_transient(&e) => {
                    // Out of fds or memory: the connection stays queued; do not spin on
                    // a listener that poll keeps reporting readable.
                    thread::sleep(ACCEPT_BACKOFF);
                    break;
                }
                Err(e) => return Err(Error::io("accept", Some(self.listener.as_raw_fd()), e)),
            };
            accepted += 1;
            match self.check_peer(conn.as_fd()) {
                Ok(()) => pending.push(Pending {
                    conn,
                    buf: Vec::new(),
                    deadline: Instant::now()
                        .checked_add(self.config.request_timeout)
                        .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
                }),
                Err(why) => reply(&conn, &Answer::error(PERMISSION_DENIED, &why)),
            }
        }
        Ok(accepted)
    }

    /// Whether the peer may use this socket; the reason if not.
    fn check_peer(&self, conn: BorrowedFd<'_>) -> std::result::Result<(), String> {
        if self.config.any_uid {
            return Ok(());
        }
        let (uid, _) = socket::peer_ids(conn)
            .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
        if uid == 0 || uid == self.euid || self.config.uids.contains(&uid) {
            Ok(())
        } else {
            Err(format!(
                "uid {uid} may not use the control socket {}",
                self.addr
            ))
        }
    }
}

impl AsFd for Server {
    /// The listening socket: readable when a client waits to be served by
    /// [`serve_one`](Server::serve_one).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

/// The thread running an upgrade for a client, and whether its `upgrade()` returned.
pub(super) struct Worker<'scope> {
    thread: ScopedJoinHandle<'scope, ()>,
    returned: Arc<AtomicBool>,
}

/// Runs an upgrade on a scoped thread that answers `conn` when it ends, unless one
/// started here is still running (then `conn` hears `UpgradeInProgress` now). If no
/// thread can be started, the upgrade runs on this one.
pub(super) fn upgrade_aside<'scope, 'env>(
    scope: &'scope Scope<'scope, 'env>,
    worker: &mut Option<Worker<'scope>>,
    upg: &'env Upgrader,
    conn: OwnedFd,
) {
    if let Some(w) = worker.take() {
        if !w.returned.load(Ordering::SeqCst) {
            *worker = Some(w);
            reply(&conn, &upgrade_answer(&Err(Error::UpgradeInProgress)));
            return;
        }
        // Its upgrade has ended; at most its (non-blocking) answer is still being sent.
        let _ = w.thread.join();
    }
    let returned = Arc::new(AtomicBool::new(false));
    let slot = Arc::new(Mutex::new(Some(conn)));
    let (theirs, done) = (Arc::clone(&slot), Arc::clone(&returned));
    let take = |s: &Mutex<Option<OwnedFd>>| s.lock().unwrap_or_else(|e| e.into_inner()).take();
    let spawned = thread::Builder::new()
        .name("tableflip-control".into())
        .spawn_scoped(scope, move || {
            if let Some(conn) = take(&theirs) {
                let result = upg.upgrade();
                done.store(true, Ordering::SeqCst);
                // The client may have hung up: the upgrade went on, the answer is lost.
                reply(&conn, &upgrade_answer(&result));
            }
        });
    match spawned {
        Ok(thread) => *worker = Some(Worker { thread, returned }),
        Err(_) => {
            if let Some(conn) = take(&slot) {
                reply(&conn, &upgrade_answer(&upg.upgrade()));
            }
        }
    }
}

/// A connection whose request has not fully arrived.
pub(super) struct Pending {
    conn: OwnedFd,
    buf: Vec<u8>,
    deadline: Instant,
}

pub(super) enum Progress {
    Waiting,
    Request(Command),
    /// An error to answer with, then close.
    Refuse(&'static str, String),
    /// The client went away (or the connection failed): close without an answer.
    Gone,
}

impl Pending {
    /// Reads what has arrived (if `readable`) and decides.
    fn progress(&mut self, readable: bool, now: Instant) -> Progress {
        if readable {
            let mut chunk = [0u8; MAX_REQUEST + 1];
            let room = MAX_REQUEST + 1 - self.buf.len().min(MAX_REQUEST);
            match os::read(&self.conn, &mut chunk[..room]) {
                Ok(0) => {
                    return match parse(&self.buf) {
                        Parsed::Partial if self.buf.is_empty() => Progress::Gone,
                        Parsed::Partial => {
                            Progress::Refuse(BAD_REQUEST, "the request was cut off".into())
                        }
                        Parsed::Done(command) => Progress::Request(command),
                        Parsed::Bad(kind, message) => Progress::Refuse(kind, message),
                    }
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Progress::Gone,
            }
        }
        match parse(&self.buf) {
            Parsed::Done(command) => Progress::Request(command),
            Parsed::Bad(kind, message) => Progress::Refuse(kind, message),
            Parsed::Partial if now >= self.deadline => Progress::Refuse(
                REQUEST_TIMEOUT,
                "no complete request in time; send one line: tableflip-control/1 COMMAND".into(),
            ),
            Parsed::Partial => Progress::Waiting,
        }
    }
}

/// `accept(2)`: a close-on-exec, non-blocking connection, or `None` if none waits.
pub(super) fn accept(listener: BorrowedFd<'_>) -> io::Result<Option<OwnedFd>> {
    loop {
        #[cfg(not(target_vendor = "apple"))]
        let result = os::retry(|| {
            rustix::net::accept_with(
                listener,
                rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
            )
        });
        #[cfg(target_vendor = "apple")]
        let result = os::retry(|| rustix::net::accept(listener)).and_then(|fd| {
            // No accept4: set both at once (see `os::pipe` for what the window means).
            rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)?;
            rustix::io::ioctl_fionbio(&fd, true)?;
            rustix::net::sockopt::set_socket_nosigpipe(&fd, true)?;
            Ok(fd)
        });
        match result {
            Ok(fd) => return Ok(Some(fd)),
            Err(Errno::AGAIN) => return Ok(None),
            // A client that gave up before we accepted: next one.
            Err(Errno::CONNABORTED) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether an `accept` error will pass (fds or memory run out for now).
pub(super) fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EPROTO)
    )
}

/// Before `bind()`: on Linux the socket inode's mode, less the umask, becomes the
/// file's mode at `bind()`, so the file never exists with a wider one. Elsewhere
/// `fchmod` does not reach the file: [`set_mode`] after `bind()` is all there is.
pub(super) fn restrict(fd: BorrowedFd<'_>, addr: &UnixAddr, mode: u32) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if matches!(addr, UnixAddr::Path(_)) {
        rustix::fs::fchmod(fd, rustix::fs::Mode::from_raw_mode(mode as _))?;
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = (fd, addr, mode);
    Ok(())
}

/// Sets exactly `mode` on the socket file this process has just bound at `path`: the
/// umask may have taken bits the caller asked for, and outside Linux the file got the
/// default mode.
pub(super) fn set_mode(path: &std::path::Path, mode: u32) -> io::Result<()> {
    #[allow(clippy::unnecessary_cast)]
    let have = rustix::fs::lstat(path)?.st_mode as u32 & 0o7777;
    if have != mode {
        rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(mode as _))?;
    }
    Ok(())
}
