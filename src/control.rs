//! The control socket: whoever asks for an upgrade gets its result.
//!
//! A signal cannot carry an answer back: `systemctl reload` with
//! `ExecReload=/bin/kill -HUP $MAINPID` reports success whatever the upgrade did. A
//! [`Server`] listens on a Unix stream socket (a path or an abstract name); a client,
//! [`request_upgrade`], asks the running generation to upgrade and waits for the new
//! generation's pid or the error, with the new generation's own reason when it gave up
//! ([`Upgrader::fail`]). [`status`] asks what a generation is doing. The examples use it
//! as their own `ExecReload=`: `tcp_server --control /run/tcp_server.sock --upgrade`.
//!
//! # Serving
//!
//! The crate starts no thread of its own accord: run [`Server::serve`] on a thread of
//! yours. It returns when the [exit notification](Upgrader::exit_fd) fires. For a poll
//! loop there is [`Server::serve_one`] and [`AsFd`].
//!
//! The socket travels to the next generation like any other listener: [`Server::listen`]
//! takes the inherited one from the [registry](crate::Fds) when there is one, so the
//! next generation serves on the same path and the same queue, and a client that
//! connects during the handover is answered by one generation or the other. Create the
//! `Server` before [`Upgrader::ready`] (which closes inherited fds nobody took), and
//! start serving once `ready()` has returned, so that requests that arrive meanwhile
//! are answered by the previous generation, still in charge.
//!
//! # Concurrency
//!
//! [`Upgrader::upgrade`] blocks until the new generation is ready (or has failed): up to
//! the upgrade timeout plus the probation. While it runs, `serve` must still answer: a
//! second `upgrade` request gets `UpgradeInProgress` at once, `status` says
//! `upgrading: yes`. So `serve` runs each upgrade on a [scoped
//! thread](std::thread::scope) of its own, named `tableflip-control`, at most one at a
//! time; it exists only while that upgrade runs and never outlives the `serve` call
//! that started it. Every other request (reading it, checking the peer, answering) is
//! handled by the serving thread itself with `poll(2)`, without blocking: a client that
//! sends half a request and stalls holds nothing but its own slot (at most
//! [`MAX_PENDING`] connections wait for their request; more stay in the kernel's
//! queue). A client that hangs up does not cancel the upgrade it asked for: the answer
//! is written when the upgrade ends, and lost if nobody reads it.
//!
//! [`Server::serve_one`] runs an upgrade on the calling thread: while it does, that
//! thread answers nobody else (later clients wait in the queue).
//!
//! # Access
//!
//! A socket file this crate creates has mode `0600` (or [`Config::mode`]). On Linux the
//! mode is set with `fchmod(2)` on the socket before `bind(2)`, which creates the file
//! with that mode (less the umask) from the start: there is no moment when the file is
//! more open than asked. If the umask removed bits the caller asked for, they are added
//! back with `chmod(2)` right after `bind`. Elsewhere `fchmod` does not reach the file,
//! so the mode is set with `chmod(2)` after `bind`, and for that moment the file has the
//! default mode less the umask: put the socket in a directory only the service's user
//! can enter (systemd's `RuntimeDirectory=` with `RuntimeDirectoryMode=0700`). An
//! abstract name has no file and no mode at all.
//!
//! Whatever the mode, every connection's peer is checked (`SO_PEERCRED` on Linux,
//! `getpeereid(3)` on BSD and macOS): by default only root and the user the server
//! runs as (its effective uid) are served; [`Config::allow_uid`] and
//! [`Config::allow_any_uid`] change that. Others get `PermissionDenied`.
//!
//! A socket file nobody listens on any more (a crashed process's: `connect` is
//! refused) is replaced when binding; a live one is never touched.
//!
//! The listening socket is non-blocking (`O_NONBLOCK`), in every generation alike: both
//! generations poll it during a handover, and a blocking `accept` could wait for a
//! connection the other one took. It is the one socket whose flags the crate changes.
//! Never `SIGPIPE`: answers are sent with `MSG_NOSIGNAL` (`SO_NOSIGPIPE` on Apple).
//!
//! # The protocol, version 1
//!
//! One request per connection. The client sends one line (at most [`MAX_REQUEST`]
//! bytes with its `\n`; a `\r` before it is ignored):
//!
//! ```text
//! tableflip-control/1 upgrade
//! ```
//!
//! The commands are `upgrade` and `status`. The server answers with a status line, then
//! `key: value` lines, then an empty line, and closes the connection:
//!
//! ```text
//! tableflip-control/1 ok
//! pid: 4250
//!
//! ```
//!
//! ```text
//! tableflip-control/1 error ChildFailed
//! message: new generation (pid 4250) gave up: config line 12: unknown key (exit status: 1)
//!
//! ```
//!
//! An `upgrade` answer comes once the upgrade has ended: `pid:` is the new generation's.
//! An error's kind is the name of the server's [`Error`] variant (`ChildFailed`,
//! `ChildExited`, `ChildDiedAfterReady`, `Timeout`, `Exec`, `Notify`, `Stopped`,
//! `UpgradeInProgress`, `NotReady`, `AlreadyUpgraded`, `ParentAlive`, ...) or one of the
//! protocol's: `BadRequest` (not the protocol, too long, not UTF-8, cut off),
//! `UnsupportedVersion`, `UnknownCommand`, `RequestTimeout` (no complete request within
//! [`Config::request_timeout`], 5 s by default), `PermissionDenied`, `Exiting` (this
//! generation is exiting: ask again, the next one answers). `message:` is the error's
//! message (with the OS error behind it, if any) on one line.
//!
//! A `status` answer:
//!
//! ```text
//! tableflip-control/1 ok
//! pid: 4242
//! ready: yes
//! upgrading: no
//! last-upgrade: error ChildExited
//! last-upgrade-message: new generation (pid 4249) exited before it was ready: exit status: 3
//! last-upgrade-ended: 1767225600.250
//!
//! ```
//!
//! `last-upgrade` is `none`, `ok` (with `last-upgrade-pid:`) or `error KIND` (with
//! `last-upgrade-message:`); `last-upgrade-ended` is in seconds since the Unix epoch.
//! Values are one line each, control characters replaced by spaces, at most
//! [`MAX_VALUE`] bytes; an answer is at most [`MAX_ANSWER`] bytes. Clients ignore keys
//! they do not know; a later version adds keys or commands and changes the version
//! token only for changes an old client would misread. By hand:
//! `printf 'tableflip-control/1 status\n' | socat - UNIX-CONNECT:/run/tcp_server.sock`.
//!
//! # References
//! - [unix(7)](https://man7.org/linux/man-pages/man7/unix.7.html): `SO_PEERCRED`,
//!   socket file permissions, abstract names
//! - [getpeereid(3)](https://man.freebsd.org/cgi/man.cgi?query=getpeereid)
//! - [send(2)](https://man7.org/linux/man-pages/man2/send.2.html): `MSG_NOSIGNAL`

use std::fmt;
use std::io;
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, Scope, ScopedJoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketType};

use crate::error::{clip, Error, Result};
use crate::os;
use crate::socket;
use crate::upgrader::Upgrader;
use crate::wire::UnixAddr;

/// The protocol and its version: the first word of every request and answer.
pub const VERSION: &str = "tableflip-control/1";
/// The longest request, in bytes, its `\n` included.
pub const MAX_REQUEST: usize = 256;
/// The longest answer a client reads, in bytes.
pub const MAX_ANSWER: usize = 16 * 1024;
/// The longest value in an answer, in bytes.
pub const MAX_VALUE: usize = 4096;
/// How many accepted connections may wait for their request at once.
pub const MAX_PENDING: usize = 32;

/// What every version token starts with.
const PROTOCOL: &[u8] = b"tableflip-control/";
/// Connections accepted per wake-up, at most, before the exit notification and the
/// waiting clients are looked at again.
const ACCEPT_BATCH: usize = 64;
/// How long `serve` backs off after `accept` failed for lack of fds or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

// ---- What a generation reports -------------------------------------------------------

/// What a generation says about itself: [`Upgrader::status`], or a control socket's
/// `status` command ([`status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// The generation's pid.
    pub pid: u32,
    /// Whether it is ready and in charge: [`ready`](Upgrader::ready) has returned, and
    /// it has neither handed over nor stopped.
    pub ready: bool,
    /// Whether an upgrade is running now.
    pub upgrading: bool,
    /// How the last upgrade this generation ran ended, if it ran one. Refused attempts
    /// (`UpgradeInProgress`, `NotReady`, `ParentAlive`, ...) do not count.
    pub last_upgrade: Option<LastUpgrade>,
}

/// How an upgrade ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LastUpgrade {
    /// When it ended (to the millisecond, when it came over a control socket).
    pub ended: SystemTime,
    /// The new generation's pid, or why the upgrade failed.
    pub result: std::result::Result<u32, UpgradeFailure>,
}

/// Why an upgrade failed, as text that survives a trip over the control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UpgradeFailure {
    /// The name of the [`Error`] variant (`ChildFailed`, `Timeout`, ...).
    pub kind: String,
    /// The error's message (with the OS error behind it, if any), on one line.
    pub message: String,
}

impl LastUpgrade {
    /// The record of an upgrade that ends now with `result`.
    pub(crate) fn of(result: &Result<u32>) -> LastUpgrade {
        LastUpgrade {
            ended: SystemTime::now(),
            result: match result {
                Ok(pid) => Ok(*pid),
                Err(e) => Err(UpgradeFailure {
                    kind: e.kind_name().to_string(),
                    message: e.to_string(),
                }),
            },
        }
    }
}

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

/// A control socket, served by the application (see the [module docs](self)).
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
        let listener = match upg.fds().unix_listener(addr.clone())? {
            // Its file keeps the mode it has.
            Some(inherited) => inherited,
            None => {
                let listener = upg
                    .fds()
                    .listen_unix_with(addr.clone(), |fd| restrict(fd, &addr, config.mode))?;
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
    /// notification](Upgrader::exit_fd) fires), then answers the requests already
    /// received and returns. An upgrade runs on a scoped thread that ends before
    /// `serve` returns (see [Concurrency](self#concurrency)); the answer to the request
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
                let mut fds = vec![upg.exit_fd()];
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
        let uid = peer_uid(conn).map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
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
struct Worker<'scope> {
    thread: ScopedJoinHandle<'scope, ()>,
    returned: Arc<AtomicBool>,
}

/// Runs an upgrade on a scoped thread that answers `conn` when it ends, unless one
/// started here is still running (then `conn` hears `UpgradeInProgress` now). If no
/// thread can be started, the upgrade runs on this one.
fn upgrade_aside<'scope, 'env>(
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
struct Pending {
    conn: OwnedFd,
    buf: Vec<u8>,
    deadline: Instant,
}

enum Progress {
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
fn accept(listener: BorrowedFd<'_>) -> io::Result<Option<OwnedFd>> {
    loop {
        #[cfg(not(target_vendor = "apple"))]
        let result = rustix::net::accept_with(
            listener,
            rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
        );
        #[cfg(target_vendor = "apple")]
        let result = rustix::net::accept(listener).and_then(|fd| {
            // No accept4: set both at once (see `os::pipe` for what the window means).
            rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)?;
            rustix::io::ioctl_fionbio(&fd, true)?;
            rustix::net::sockopt::set_socket_nosigpipe(&fd, true)?;
            Ok(fd)
        });
        match result {
            Ok(fd) => return Ok(Some(fd)),
            Err(Errno::AGAIN) => return Ok(None),
            // A client that gave up before we accepted, or a signal: next one.
            Err(Errno::INTR) | Err(Errno::CONNABORTED) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether an `accept` error will pass (fds or memory run out for now).
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EPROTO)
    )
}

/// The uid of the process at the other end of a Unix stream connection.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn peer_uid(conn: BorrowedFd<'_>) -> io::Result<u32> {
    Ok(rustix::net::sockopt::socket_peercred(conn)?.uid.as_raw())
}

/// The uid of the process at the other end of a Unix stream connection.
#[cfg(any(
    target_vendor = "apple",
    target_os = "freebsd",
    target_os = "openbsd",
    target_os = "netbsd",
    target_os = "dragonfly"
))]
fn peer_uid(conn: BorrowedFd<'_>) -> io::Result<u32> {
    let mut uid: libc::uid_t = 0;
    let mut gid: libc::gid_t = 0;
    // SAFETY: getpeereid writes one uid_t and one gid_t through the two pointers, which
    // point to locals that outlive the call; `conn` is an open fd for the whole call.
    let rc = unsafe { libc::getpeereid(conn.as_raw_fd(), &mut uid, &mut gid) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(uid)
}

/// No way to know the peer here: nobody is served unless `allow_any_uid`.
#[cfg(not(any(
    target_os = "linux",
    target_os = "android",
    target_vendor = "apple",
    target_os = "freebsd",
    target_os = "openbsd",
    target_os = "netbsd",
    target_os = "dragonfly"
)))]
fn peer_uid(_conn: BorrowedFd<'_>) -> io::Result<u32> {
    Err(io::ErrorKind::Unsupported.into())
}

/// Before `bind()`: on Linux the socket inode's mode, less the umask, becomes the
/// file's mode at `bind()`, so the file never exists with a wider one. Elsewhere
/// `fchmod` does not reach the file: [`set_mode`] after `bind()` is all there is.
fn restrict(fd: BorrowedFd<'_>, addr: &UnixAddr, mode: u32) -> io::Result<()> {
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
fn set_mode(path: &std::path::Path, mode: u32) -> io::Result<()> {
    #[allow(clippy::unnecessary_cast)]
    let have = rustix::fs::lstat(path)?.st_mode as u32 & 0o7777;
    if have != mode {
        rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(mode as _))?;
    }
    Ok(())
}

// ---- Requests and answers --------------------------------------------------------------

/// The protocol's own error kinds (the others are [`Error`] variant names).
const BAD_REQUEST: &str = "BadRequest";
const UNSUPPORTED_VERSION: &str = "UnsupportedVersion";
const UNKNOWN_COMMAND: &str = "UnknownCommand";
const REQUEST_TIMEOUT: &str = "RequestTimeout";
const PERMISSION_DENIED: &str = "PermissionDenied";
const EXITING: &str = "Exiting";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Upgrade,
    Status,
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// No complete line yet.
    Partial,
    Done(Command),
    Bad(&'static str, String),
}

/// Parses what a client has sent so far.
fn parse(buf: &[u8]) -> Parsed {
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() >= MAX_REQUEST {
            return Parsed::Bad(
                BAD_REQUEST,
                format!("request longer than {MAX_REQUEST} bytes"),
            );
        }
        // Garbage is refused as soon as it cannot be the start of a request.
        let n = buf.len().min(PROTOCOL.len());
        if buf[..n] != PROTOCOL[..n] {
            return Parsed::Bad(BAD_REQUEST, not_the_protocol());
        }
        return Parsed::Partial;
    };
    if end >= MAX_REQUEST {
        return Parsed::Bad(
            BAD_REQUEST,
            format!("request longer than {MAX_REQUEST} bytes"),
        );
    }
    let line = &buf[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(line) = std::str::from_utf8(line) else {
        return Parsed::Bad(BAD_REQUEST, "the request is not UTF-8".into());
    };
    let mut words = line.split(' ');
    let version = words.next().unwrap_or("");
    if version != VERSION {
        return if version.as_bytes().starts_with(PROTOCOL) {
            Parsed::Bad(
                UNSUPPORTED_VERSION,
                format!(
                    "{:?} is not supported; this server speaks {VERSION}",
                    clip(version, 32)
                ),
            )
        } else {
            Parsed::Bad(BAD_REQUEST, not_the_protocol())
        };
    }
    let command = match words.next() {
        Some("upgrade") => Command::Upgrade,
        Some("status") => Command::Status,
        Some("") | None => return Parsed::Bad(BAD_REQUEST, "no command".into()),
        Some(other) => {
            return Parsed::Bad(
                UNKNOWN_COMMAND,
                format!(
                    "unknown command {:?}; the commands are upgrade and status",
                    clip(other, 32)
                ),
            )
        }
    };
    if words.next().is_some() {
        return Parsed::Bad(BAD_REQUEST, "the commands take no arguments".into());
    }
    Parsed::Done(command)
}

fn not_the_protocol() -> String {
    format!("not a control request; send one line: {VERSION} upgrade|status")
}

/// An answer: `ok` or `error KIND`, then its fields.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    /// `None` for `ok`, else the error kind.
    error: Option<String>,
    fields: Vec<(String, String)>,
}

impl Answer {
    fn ok(fields: Vec<(&str, String)>) -> Answer {
        Answer {
            error: None,
            fields: fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        }
    }

    fn error(kind: &str, message: &str) -> Answer {
        Answer {
            error: Some(kind.to_string()),
            fields: vec![("message".to_string(), message.to_string())],
        }
    }

    fn field(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = String::with_capacity(128);
        out.push_str(VERSION);
        match &self.error {
            None => out.push_str(" ok\n"),
            Some(kind) => {
                out.push_str(" error ");
                out.push_str(&one_line(kind));
                out.push('\n');
            }
        }
        for (key, value) in &self.fields {
            out.push_str(key);
            out.push_str(": ");
            out.push_str(&one_line(value));
            out.push('\n');
        }
        out.push('\n');
        out.into_bytes()
    }

    /// Parses a whole answer (up to and including its empty line).
    fn decode(bytes: &[u8]) -> std::result::Result<Answer, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "the answer is not UTF-8".to_string())?;
        // The empty line that ends the answer.
        let Some(end) = text.find("\n\n") else {
            return Err("the answer was cut off".into());
        };
        let mut lines = text[..end].split('\n');
        let first = lines.next().unwrap_or("");
        let Some(status) = first
            .strip_prefix(VERSION)
            .and_then(|rest| rest.strip_prefix(' '))
        else {
            return Err(format!("not a {VERSION} answer: {:?}", clip(first, 64)));
        };
        let error = match status {
            "ok" => None,
            _ => match status.strip_prefix("error ") {
                Some(kind) if !kind.is_empty() => Some(kind.to_string()),
                _ => return Err(format!("bad status line {:?}", clip(first, 64))),
            },
        };
        let mut fields = Vec::new();
        for line in lines {
            let Some((key, value)) = line.split_once(": ") else {
                return Err(format!("bad line {:?}", clip(line, 64)));
            };
            fields.push((key.to_string(), value.to_string()));
        }
        Ok(Answer { error, fields })
    }
}

/// `value` on one line: control characters become spaces; at most [`MAX_VALUE`] bytes.
fn one_line(value: &str) -> String {
    clip(value, MAX_VALUE)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn upgrade_answer(result: &Result<u32>) -> Answer {
    match result {
        Ok(pid) => Answer::ok(vec![("pid", pid.to_string())]),
        Err(e) => Answer::error(e.kind_name(), &e.to_string()),
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

fn status_answer(status: &Status) -> Answer {
    let mut fields = vec![
        ("pid", status.pid.to_string()),
        ("ready", yes_no(status.ready)),
        ("upgrading", yes_no(status.upgrading)),
    ];
    match &status.last_upgrade {
        None => fields.push(("last-upgrade", "none".into())),
        Some(last) => {
            match &last.result {
                Ok(pid) => {
                    fields.push(("last-upgrade", "ok".into()));
                    fields.push(("last-upgrade-pid", pid.to_string()));
                }
                Err(f) => {
                    fields.push(("last-upgrade", format!("error {}", f.kind)));
                    fields.push(("last-upgrade-message", f.message.clone()));
                }
            }
            let since = last.ended.duration_since(UNIX_EPOCH).unwrap_or_default();
            fields.push((
                "last-upgrade-ended",
                format!("{}.{:03}", since.as_secs(), since.subsec_millis()),
            ));
        }
    }
    Answer::ok(fields)
}

/// Sends an answer and closes the connection. Best effort: the client may be gone, and
/// a client that does not read is not waited for (the socket is non-blocking, and an
/// answer fits in its buffer many times over).
fn reply(conn: &OwnedFd, answer: &Answer) {
    let _ = os::send_all(conn, &answer.encode());
}

// ---- The client ------------------------------------------------------------------------

/// Asks the generation serving the control socket at `addr` to upgrade, and returns the
/// new generation's pid once it has taken over.
///
/// `timeout` bounds the whole exchange. The server answers when its upgrade has ended,
/// which may take the upgrade timeout ([`Options::upgrade_timeout`], 60 s by default)
/// plus the probation ([`Options::probation`]) plus the time to spawn: pass at least
/// their sum and a margin. A client that gives up does not cancel the upgrade.
///
/// Errors: [`Error::Remote`] when the server answered with an error (its `kind` is the
/// server's `Error` variant, `message` says why, with the new generation's own reason
/// for `ChildFailed`); [`Error::Control`] when it could not be asked (no socket there,
/// permission denied, no answer within `timeout`, an answer that is not the protocol).
///
/// [`Options::upgrade_timeout`]: crate::Options::upgrade_timeout
/// [`Options::probation`]: crate::Options::probation
pub fn request_upgrade(addr: impl Into<UnixAddr>, timeout: Duration) -> Result<u32> {
    let addr = addr.into();
    let answer = exchange(&addr, "upgrade", timeout)?;
    answer
        .field("pid")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| invalid(&addr, "the answer names no pid"))
}

/// Asks the generation serving the control socket at `addr` for its [`Status`].
/// Errors as for [`request_upgrade`].
pub fn status(addr: impl Into<UnixAddr>, timeout: Duration) -> Result<Status> {
    let addr = addr.into();
    let answer = exchange(&addr, "status", timeout)?;
    let yes = |key| answer.field(key) == Some("yes");
    let pid = answer
        .field("pid")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| invalid(&addr, "the status names no pid"))?;
    let ended = answer
        .field("last-upgrade-ended")
        .and_then(parse_time)
        .unwrap_or(UNIX_EPOCH);
    let last_upgrade = match answer.field("last-upgrade") {
        None | Some("none") => None,
        Some("ok") => Some(LastUpgrade {
            ended,
            result: Ok(answer
                .field("last-upgrade-pid")
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| invalid(&addr, "last-upgrade-pid is missing"))?),
        }),
        Some(other) => Some(LastUpgrade {
            ended,
            result: Err(UpgradeFailure {
                kind: other.strip_prefix("error ").unwrap_or(other).to_string(),
                message: answer
                    .field("last-upgrade-message")
                    .unwrap_or_default()
                    .to_string(),
            }),
        }),
    };
    Ok(Status {
        pid,
        ready: yes("ready"),
        upgrading: yes("upgrading"),
        last_upgrade,
    })
}

/// `SECS.MILLIS` since the Unix epoch.
fn parse_time(s: &str) -> Option<SystemTime> {
    let (secs, millis) = s.split_once('.').unwrap_or((s, "0"));
    let d = Duration::from_secs(secs.parse().ok()?) + Duration::from_millis(millis.parse().ok()?);
    UNIX_EPOCH.checked_add(d)
}

fn invalid(addr: &UnixAddr, what: &str) -> Error {
    Error::Control {
        addr: addr.to_string(),
        op: "receive",
        source: io::Error::new(io::ErrorKind::InvalidData, what.to_string()),
    }
}

/// Sends one request and reads the answer; an error answer is [`Error::Remote`].
fn exchange(addr: &UnixAddr, command: &str, timeout: Duration) -> Result<Answer> {
    let name = addr.to_string();
    let fail = |op: &'static str, source: io::Error| Error::Control {
        addr: name.clone(),
        op,
        source,
    };
    let deadline = os::deadline(Some(timeout));
    let sockaddr = socket::unix_sockaddr(addr).map_err(|e| fail("connect", e))?;
    let conn = socket::new_socket(AddressFamily::UNIX, SocketType::STREAM)
        .map_err(|e| fail("socket", e))?;
    #[cfg(target_vendor = "apple")]
    rustix::net::sockopt::set_socket_nosigpipe(&conn, true)
        .map_err(|e| fail("setsockopt(SO_NOSIGPIPE)", e.into()))?;
    // Bounds a connect that waits for room in a full queue (Linux), and the send.
    let send_timeout = timeout.max(Duration::from_millis(1));
    rustix::net::sockopt::set_socket_timeout(
        &conn,
        rustix::net::sockopt::Timeout::Send,
        Some(send_timeout),
    )
    .map_err(|e| fail("setsockopt(SO_SNDTIMEO)", e.into()))?;
    match rustix::net::connect(&conn, &sockaddr) {
        Ok(()) => {}
        Err(Errno::AGAIN) => {
            return Err(fail(
                "connect",
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the server's queue stayed full for {timeout:?}"),
                ),
            ))
        }
        Err(e) => return Err(fail("connect", e.into())),
    }
    // A server that refuses us may answer and close before it reads: then the answer
    // is what to report, not the broken pipe.
    let sent = os::send_all(&conn, format!("{VERSION} {command}\n").as_bytes());
    if let Err(e) = &sent {
        if !matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ) {
            return Err(fail("send", sent.unwrap_err()));
        }
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut read_err = None;
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            buf.truncate(end + 2);
            break;
        }
        if buf.len() > MAX_ANSWER {
            return Err(invalid(
                addr,
                &format!("answer longer than {MAX_ANSWER} bytes"),
            ));
        }
        let readable = os::readable(conn.as_fd(), deadline).map_err(|e| fail("receive", e))?;
        if !readable {
            return Err(fail(
                "receive",
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {timeout:?}"),
                ),
            ));
        }
        match os::read(&conn, &mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => {
                read_err = Some(e);
                break;
            }
        }
    }
    // A whole answer counts, whatever happened to the connection after it.
    let answer = match Answer::decode(&buf) {
        Ok(answer) => answer,
        Err(what) => {
            return Err(match (sent, read_err) {
                (Err(e), _) => fail("send", e),
                (Ok(()), Some(e)) => fail("receive", e),
                (Ok(()), None) => invalid(addr, &what),
            })
        }
    };
    match &answer.error {
        None => Ok(answer),
        Some(kind) => Err(Error::Remote {
            addr: name.clone(),
            kind: kind.clone(),
            message: answer.field("message").unwrap_or_default().to_string(),
        }),
    }
}

impl fmt::Display for Status {
    /// One line for a log: `pid 4242, ready, last upgrade: ok (pid 4250)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {}", self.pid)?;
        f.write_str(if self.ready { ", ready" } else { ", not ready" })?;
        if self.upgrading {
            f.write_str(", upgrading")?;
        }
        match self.last_upgrade.as_ref().map(|l| &l.result) {
            None => f.write_str(", no upgrade yet"),
            Some(Ok(pid)) => write!(f, ", last upgrade: ok (pid {pid})"),
            Some(Err(e)) => write!(f, ", last upgrade failed: {} ({})", e.message, e.kind),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(
            parse(b"tableflip-control/1 upgrade\n"),
            Parsed::Done(Command::Upgrade)
        );
        assert_eq!(
            parse(b"tableflip-control/1 status\r\n"),
            Parsed::Done(Command::Status)
        );
        assert_eq!(parse(b"tableflip-con"), Parsed::Partial);
        assert_eq!(parse(b""), Parsed::Partial);
        let bad = |input: &[u8]| match parse(input) {
            Parsed::Bad(kind, _) => kind,
            other => panic!("{input:?}: {other:?}"),
        };
        assert_eq!(bad(b"GET / HTTP/1.1"), BAD_REQUEST);
        assert_eq!(bad(b"\x00\xff"), BAD_REQUEST);
        assert_eq!(bad(b"tableflip-control/2 upgrade\n"), UNSUPPORTED_VERSION);
        assert_eq!(bad(b"tableflip-control/1 reboot\n"), UNKNOWN_COMMAND);
        assert_eq!(bad(b"tableflip-control/1\n"), BAD_REQUEST);
        assert_eq!(bad(b"tableflip-control/1 upgrade now\n"), BAD_REQUEST);
        assert_eq!(bad(b"tableflip-control/1 \xff\n"), BAD_REQUEST);
        let mut long = b"tableflip-control/1 ".to_vec();
        long.resize(MAX_REQUEST, b'x');
        assert_eq!(bad(&long), BAD_REQUEST);
        long.push(b'\n');
        assert_eq!(bad(&long), BAD_REQUEST);
    }

    #[test]
    fn answers_round_trip_on_one_line_each() {
        let a = Answer::error("ChildFailed", "gave up:\nline two\r\tend");
        let bytes = a.encode();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert_eq!(
            text,
            "tableflip-control/1 error ChildFailed\nmessage: gave up: line two  end\n\n"
        );
        let back = Answer::decode(&bytes).unwrap();
        assert_eq!(back.error.as_deref(), Some("ChildFailed"));
        assert_eq!(back.field("message"), Some("gave up: line two  end"));

        let long = "é".repeat(MAX_VALUE);
        let a = Answer::ok(vec![("pid", "7".into()), ("x", long)]);
        let back = Answer::decode(&a.encode()).unwrap();
        assert_eq!(back.field("pid"), Some("7"));
        assert!(back.field("x").unwrap().len() <= MAX_VALUE);

        assert!(Answer::decode(b"tableflip-control/1 ok\npid: 7\n").is_err());
        assert!(Answer::decode(b"HTTP/1.1 200 OK\n\n").is_err());
        assert!(Answer::decode(b"tableflip-control/1 error \n\n").is_err());
    }

    #[test]
    fn status_round_trips() {
        let status = Status {
            pid: 42,
            ready: true,
            upgrading: false,
            last_upgrade: Some(LastUpgrade {
                ended: UNIX_EPOCH + Duration::from_millis(1_767_225_600_250),
                result: Err(UpgradeFailure {
                    kind: "ChildExited".into(),
                    message: "exit status: 3".into(),
                }),
            }),
        };
        let answer = Answer::decode(&status_answer(&status).encode()).unwrap();
        assert_eq!(answer.field("last-upgrade"), Some("error ChildExited"));
        assert_eq!(answer.field("last-upgrade-ended"), Some("1767225600.250"));
        assert_eq!(
            parse_time("1767225600.250"),
            Some(UNIX_EPOCH + Duration::from_millis(1_767_225_600_250))
        );
    }
}
