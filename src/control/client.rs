//! Asking a running generation over its control socket.

use super::protocol::*;
use super::*;
use std::io;
use std::os::unix::io::{AsFd, OwnedFd};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::fs::FileType;
use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketType};

use crate::error::{Error, Result};
use crate::sys::os;
use crate::sys::socket;
use crate::unix_addr::UnixAddr;

// ---- The client ------------------------------------------------------------------------

/// How a client asks: how long it waits for the answer, and whom it believes.
///
/// A [`Duration`] converts into one that names no uid, so `request_upgrade(addr,
/// Duration::from_secs(90))` is the usual call. Name the uid the service runs as when
/// it listens on an abstract name as another user than the client's, or when its socket
/// file is in a directory other users can write to: see [whom a client
/// believes](crate::control#whom-a-client-believes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientConfig {
    timeout: Duration,
    server_uid: Option<u32>,
}

impl ClientConfig {
    /// Waits at most `timeout` for the whole exchange, and names no uid.
    pub fn new(timeout: Duration) -> ClientConfig {
        ClientConfig {
            timeout,
            server_uid: None,
        }
    }

    /// The uid the service runs as: a process answering as that uid is believed
    /// wherever its socket is, and no other but root and the client's own user (the
    /// socket file's owner no longer is).
    pub fn server_uid(mut self, uid: u32) -> ClientConfig {
        self.server_uid = Some(uid);
        self
    }
}

impl From<Duration> for ClientConfig {
    fn from(timeout: Duration) -> ClientConfig {
        ClientConfig::new(timeout)
    }
}

/// Asks the generation serving the control socket at `addr` to upgrade, and returns the
/// new generation's pid once it has taken over.
///
/// `config` is the timeout (a [`Duration`]), or a [`ClientConfig`]. The timeout bounds
/// the whole exchange. The server answers when its upgrade has ended, which may take
/// the upgrade timeout ([`Options::upgrade_timeout`], 60 s by default) plus the
/// probation ([`Options::probation`]) plus the time to spawn: pass at least their sum
/// and a margin. A client that gives up does not cancel the upgrade.
///
/// Before it sends anything, the client checks who answered (see [whom a client
/// believes](crate::control#whom-a-client-believes)).
///
/// Errors: [`Error::Remote`] when the server answered with an error (its `kind` is the
/// server's `Error` variant, `message` says why, with the new generation's own reason
/// for `ChildFailed`); [`Error::ControlPeer`] when the process that answered is not
/// believed; [`Error::Control`] when it could not be asked (no socket there,
/// permission denied, no answer within the timeout, an answer that is not the
/// protocol).
///
/// [`Options::upgrade_timeout`]: crate::Options::upgrade_timeout
/// [`Options::probation`]: crate::Options::probation
pub fn request_upgrade(addr: impl Into<UnixAddr>, config: impl Into<ClientConfig>) -> Result<u32> {
    let addr = addr.into();
    let answer = exchange(&addr, "upgrade", config.into())?;
    answer
        .field("pid")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| invalid(&addr, "the answer names no pid"))
}

/// Asks the generation serving the control socket at `addr` for its [`Status`].
/// `config` and errors as for [`request_upgrade`].
pub fn status(addr: impl Into<UnixAddr>, config: impl Into<ClientConfig>) -> Result<Status> {
    let addr = addr.into();
    let answer = exchange(&addr, "status", config.into())?;
    parse_status(&answer).map_err(|why| invalid(&addr, &why))
}

/// A `status` answer's [`Status`]; its records are parsed as strictly as a generation
/// parses those it inherits.
pub(super) fn parse_status(answer: &Answer) -> std::result::Result<Status, String> {
    let yes = |key| answer.field(key) == Some("yes");
    let pid = answer
        .field("pid")
        .and_then(|p| p.parse().ok())
        .ok_or("the status names no pid")?;
    let mut upgrades = Vec::new();
    for line in answer.fields_named(RECORD) {
        match crate::record_line::decode_record(line) {
            Ok((record, None)) => upgrades.push(record),
            Ok((_, Some(_))) => return Err(format!("a {RECORD} line with an age")),
            Err(why) => return Err(format!("a bad {RECORD} line: {why}")),
        }
    }
    if upgrades.len() > crate::status::MAX_RECORDS {
        return Err(format!("more than {} records", crate::status::MAX_RECORDS));
    }
    if upgrades.is_empty() {
        // An older server: its last upgrade, with only its end known.
        upgrades.extend(legacy_last_upgrade(answer, pid)?);
    }
    Ok(Status {
        pid,
        ready: yes("ready"),
        upgrading: yes("upgrading"),
        started_by: answer.field("started-by").and_then(|p| p.parse().ok()),
        upgrades,
    })
}

/// The last upgrade as a server without records (before `record-v1`) says it.
fn legacy_last_upgrade(
    answer: &Answer,
    pid: u32,
) -> std::result::Result<Option<UpgradeRecord>, String> {
    let ended = answer
        .field("last-upgrade-ended")
        .and_then(parse_time)
        .unwrap_or(UNIX_EPOCH);
    let result = match answer.field("last-upgrade") {
        None | Some("none") => return Ok(None),
        Some("ok") => Ok(answer
            .field("last-upgrade-pid")
            .and_then(|p| p.parse().ok())
            .ok_or("last-upgrade-pid is missing")?),
        Some(other) => Err(UpgradeFailure {
            kind: other.strip_prefix("error ").unwrap_or(other).to_string(),
            message: answer
                .field("last-upgrade-message")
                .unwrap_or_default()
                .to_string(),
        }),
    };
    // An older server: only the end is known.
    Ok(Some(UpgradeRecord::new(pid, ended, Duration::ZERO, result)))
}

/// `SECS.MILLIS` since the Unix epoch.
pub(super) fn parse_time(s: &str) -> Option<SystemTime> {
    let (secs, millis) = s.split_once('.').unwrap_or((s, "0"));
    let d = Duration::from_secs(secs.parse().ok()?) + Duration::from_millis(millis.parse().ok()?);
    UNIX_EPOCH.checked_add(d)
}

pub(super) fn invalid(addr: &UnixAddr, what: &str) -> Error {
    Error::Control {
        addr: addr.to_string(),
        op: "receive",
        source: io::Error::new(io::ErrorKind::InvalidData, what.to_string()),
    }
}

/// Connects, checks who answered, sends one request and reads the answer; an error
/// answer is [`Error::Remote`].
pub(super) fn exchange(addr: &UnixAddr, command: &str, config: ClientConfig) -> Result<Answer> {
    let deadline = os::deadline(Some(config.timeout));
    let conn = connect(addr, config.timeout)?;
    check_peer(addr, &conn, config.server_uid)?;
    // A server that refuses us may answer and close before it reads: then the answer
    // is what to report, not the broken pipe.
    let sent = match os::send_all(&conn, format!("{VERSION} {command}\n").as_bytes()) {
        Err(e) if !closed_by_peer(&e) => return Err(failed(addr, "send", e)),
        sent => sent,
    };
    let (buf, read_err) = read_answer(addr, &conn, deadline, config.timeout)?;
    // A whole answer counts, whatever happened to the connection after it.
    let answer = Answer::decode(&buf).map_err(|what| match (sent, read_err) {
        (Err(e), _) => failed(addr, "send", e),
        (Ok(()), Some(e)) => failed(addr, "receive", e),
        (Ok(()), None) => invalid(addr, &what),
    })?;
    match &answer.error {
        None => Ok(answer),
        Some(kind) => Err(Error::Remote {
            addr: addr.to_string(),
            kind: kind.clone(),
            message: answer.field("message").unwrap_or_default().to_string(),
        }),
    }
}

/// Whether a send failed because the peer had closed the connection.
fn closed_by_peer(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

/// [`Error::Control`]: `op` failed on the way to `addr`.
fn failed(addr: &UnixAddr, op: &'static str, source: io::Error) -> Error {
    Error::Control {
        addr: addr.to_string(),
        op,
        source,
    }
}

/// A stream socket connected to `addr`; `timeout` bounds the connect and the send.
fn connect(addr: &UnixAddr, timeout: Duration) -> Result<OwnedFd> {
    let sockaddr = socket::unix_sockaddr(addr).map_err(|e| failed(addr, "connect", e))?;
    let conn = socket::new_socket(AddressFamily::UNIX, SocketType::STREAM)
        .map_err(|e| failed(addr, "socket", e))?;
    #[cfg(target_vendor = "apple")]
    rustix::net::sockopt::set_socket_nosigpipe(&conn, true)
        .map_err(|e| failed(addr, "setsockopt(SO_NOSIGPIPE)", e.into()))?;
    // Bounds a connect that waits for room in a full queue (Linux), and the send.
    let send_timeout = timeout.max(Duration::from_millis(1));
    rustix::net::sockopt::set_socket_timeout(
        &conn,
        rustix::net::sockopt::Timeout::Send,
        Some(send_timeout),
    )
    .map_err(|e| failed(addr, "setsockopt(SO_SNDTIMEO)", e.into()))?;
    // Retried on `EINTR`: a signal that interrupts a connect waiting for room in the
    // queue (Linux; the socket timeout makes it `EINTR` whatever `SA_RESTART` says)
    // leaves the socket unconnected there, and elsewhere a Unix connect does not wait.
    match os::retry(|| rustix::net::connect(&conn, &sockaddr)) {
        Ok(()) => Ok(conn),
        Err(Errno::AGAIN) => Err(failed(
            addr,
            "connect",
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the server's queue stayed full for {timeout:?}"),
            ),
        )),
        Err(e) => Err(failed(addr, "connect", e.into())),
    }
}

/// [`Error::ControlPeer`] unless the process that answered on `conn` is believed
/// ([`believe`]).
fn check_peer(addr: &UnixAddr, conn: &OwnedFd, server_uid: Option<u32>) -> Result<()> {
    let peer_op = if cfg!(any(target_os = "linux", target_os = "android")) {
        "getsockopt(SO_PEERCRED)"
    } else {
        "getpeereid"
    };
    let (uid, gid) = socket::peer_ids(conn.as_fd()).map_err(|e| failed(addr, peer_op, e))?;
    believe(addr, uid, gid, server_uid).map_err(|reason| Error::ControlPeer {
        addr: addr.to_string(),
        uid,
        reason,
    })
}

/// Reads until the empty line that ends an answer (the answer is cut after it), EOF or
/// a read error, which is returned beside what was read: the caller decides whether
/// what came is a whole answer. Fails when nothing more comes within `deadline`, or
/// when more than [`MAX_ANSWER`] bytes come without the empty line.
fn read_answer(
    addr: &UnixAddr,
    conn: &OwnedFd,
    deadline: Option<Instant>,
    timeout: Duration,
) -> Result<(Vec<u8>, Option<io::Error>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            buf.truncate(end + 2);
            return Ok((buf, None));
        }
        if buf.len() > MAX_ANSWER {
            return Err(invalid(
                addr,
                &format!("answer longer than {MAX_ANSWER} bytes"),
            ));
        }
        let readable =
            os::readable(conn.as_fd(), deadline).map_err(|e| failed(addr, "receive", e))?;
        if !readable {
            return Err(failed(
                addr,
                "receive",
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {timeout:?}"),
                ),
            ));
        }
        match os::read(conn, &mut chunk) {
            Ok(0) => return Ok((buf, None)),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Ok((buf, Some(e))),
        }
    }
}

/// Whether the process that answered at `addr`, running as `uid` (primary group `gid`),
/// is believed; why not if it is not. See the module docs, "Whom a client believes".
///
/// The peer's identity is the connected socket's (`SO_PEERCRED`: whoever listens there
/// now), not the file's owner alone: a file can be replaced after it was looked at.
/// For a path, the file's owner and its directory then say whether that identity is
/// the one the name belongs to. Both are looked at after `connect`: a swap between the
/// two is seen as a peer that is not the file's owner, and refused.
fn believe(addr: &UnixAddr, uid: u32, gid: u32, server_uid: Option<u32>) -> Result<(), String> {
    let me = rustix::process::geteuid().as_raw();
    if uid == 0 || uid == me || Some(uid) == server_uid {
        return Ok(());
    }
    let path = match (addr, server_uid) {
        (_, Some(expected)) => {
            return Err(format!("the service was expected to run as uid {expected}"))
        }
        (UnixAddr::Abstract(_), None) => {
            return Err(format!(
                "an abstract name has no owner: anyone could have bound it first, so only \
                 root and this client's own uid ({me}) are believed unless the service's \
                 uid is named (ClientConfig::server_uid)"
            ))
        }
        (UnixAddr::Path(path), None) => path,
    };
    let file = rustix::fs::lstat(path)
        .map_err(|e| format!("cannot look at the socket file: {}", io::Error::from(e)))?;
    match FileType::from_raw_mode(file.st_mode) {
        FileType::Socket => {}
        FileType::Symlink => {
            return Err("the path is a symbolic link: name the socket file itself".into())
        }
        _ => return Err("the path is no longer a socket file".into()),
    }
    #[allow(clippy::unnecessary_cast)]
    let owner = file.st_uid as u32;
    if owner != uid {
        return Err(format!("the socket file belongs to uid {owner}"));
    }
    let dir = crate::sys::safe_dir::dir_of(path);
    let st = rustix::fs::stat(dir).map_err(|e| {
        format!(
            "cannot look at the socket's directory {}: {}",
            dir.display(),
            io::Error::from(e)
        )
    })?;
    match crate::sys::safe_dir::others_can_write(&st, &[uid, me], gid) {
        None => Ok(()),
        Some(why) => Err(format!(
            "its directory {} is not the service's own: {why}, so another user could have \
             bound the name first; put the socket in a directory only the service's user \
             and root can write to, or name the service's uid (ClientConfig::server_uid)",
            dir.display()
        )),
    }
}

#[cfg(all(test, any(target_os = "linux", target_os = "android")))]
mod tests {
    use super::*;
    use std::os::unix::thread::JoinHandleExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A listener on a fresh abstract name whose queue is full: a connect to it waits.
    fn full_listener(tag: &str) -> (UnixAddr, OwnedFd, Vec<OwnedFd>) {
        let name = format!("tableflip-test-{tag}-{}", std::process::id());
        let addr = UnixAddr::abstract_name(&name);
        let sockaddr = socket::unix_sockaddr(&addr).unwrap();
        let listener = socket::new_socket(AddressFamily::UNIX, SocketType::STREAM).unwrap();
        rustix::net::bind(&listener, &sockaddr).unwrap();
        rustix::net::listen(&listener, 0).unwrap();
        let mut queued = Vec::new();
        loop {
            let conn = socket::new_socket(AddressFamily::UNIX, SocketType::STREAM).unwrap();
            rustix::fs::fcntl_setfl(&conn, rustix::fs::OFlags::NONBLOCK).unwrap();
            match rustix::net::connect(&conn, &sockaddr) {
                Ok(()) => queued.push(conn),
                Err(Errno::AGAIN) => break,
                Err(e) => panic!("filling the queue: {e}"),
            }
        }
        (addr, listener, queued)
    }

    #[test]
    fn a_connect_to_a_full_queue_times_out_with_the_reason() {
        let (addr, _listener, _queued) = full_listener("full");
        let err = connect(&addr, Duration::from_millis(50)).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("queue stayed full"), "{text}");
        assert!(
            text.contains("tableflip-test-full"),
            "names the address: {text}"
        );
    }

    extern "C" fn nothing(_: libc::c_int) {}

    #[test]
    fn a_signal_during_a_connect_does_not_fail_it() {
        // SIGURG: ignored by default, and no other test of the crate uses it.
        // SAFETY: `nothing` is an async-signal-safe handler (it does nothing), and the
        // struct is zeroed then filled as sigaction(2) wants.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = nothing as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            assert_eq!(
                libc::sigaction(libc::SIGURG, &action, std::ptr::null_mut()),
                0
            );
        }
        let (addr, listener, _queued) = full_listener("intr");
        let done = Arc::new(AtomicBool::new(false));
        let client = {
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                let result = connect(&addr, Duration::from_secs(10)).map(drop);
                done.store(true, Ordering::SeqCst);
                result
            })
        };
        let thread = client.as_pthread_t();
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(10));
            // SAFETY: the thread is joined only below, so its pthread_t is still valid
            // (it may have ended, which pthread_kill allows); SIGURG has a handler.
            unsafe { libc::pthread_kill(thread as libc::pthread_t, libc::SIGURG) };
        }
        if done.load(Ordering::SeqCst) {
            let result = client.join().unwrap();
            panic!("the connect returned while the queue was full: {result:?}");
        }
        // Room in the queue: the connect that waited goes through.
        let _accepted = rustix::net::accept(&listener).unwrap();
        client.join().unwrap().unwrap();
    }
}
