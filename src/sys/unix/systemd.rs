//! systemd, spoken directly: the notify protocol (a datagram to `$NOTIFY_SOCKET`), the
//! fd store (`FDSTORE=1`), and socket activation (`$LISTEN_FDS`), without libsystemd.
//!
//! # References
//! - [sd_notify(3)](https://www.freedesktop.org/software/systemd/man/latest/sd_notify.html)
//! - [sd_listen_fds(3)](https://www.freedesktop.org/software/systemd/man/latest/sd_listen_fds.html)

use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustix::net::{AddressFamily, SendFlags, SocketAddrUnix, SocketType};

use crate::error::{Error, Result};
use crate::sys::inherit::{self, Inherited};
use crate::sys::os;
use crate::sys::socket;
use crate::sys::wire::{self, Extra, Key};

/// The longest the commit message may wait for room in systemd's queue.
const COMMIT_WAIT: Duration = Duration::from_secs(1);

/// The longest the commit waits, once its message is queued, for systemd to read it.
const COMMIT_READ_WAIT: Duration = Duration::from_millis(500);

/// The keeper-only field with which the main generation names the child that may follow
/// it (see [`Keeper`](crate::Keeper), "Trust"). Sent only under a keeper; systemd would
/// ignore it.
pub(crate) const SUCCESSOR_FIELD: &str = "X_TABLEFLIP_SUCCESSOR";

/// Where and how to send notifications: read once from `$NOTIFY_SOCKET`.
///
/// Sending never blocks, but for the one message that commits an upgrade (`MAINPID=` of
/// the new generation), which waits at most [`COMMIT_WAIT`] for room in systemd's
/// queue: losing it would make systemd take the exiting generation for the service.
pub(crate) struct Notifier {
    socket: OwnedFd,
    addr: SocketAddrUnix,
    target: String,
    /// Whether `$NOTIFY_SOCKET` is a [`Keeper`](crate::Keeper)'s (its variable is set).
    keeper: bool,
    /// Whether this generation has set a `STATUS=` that the next success must clear.
    status_set: AtomicBool,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notifier")
            .field("target", &self.target)
            .finish()
    }
}

impl Notifier {
    /// The notifier for `$NOTIFY_SOCKET`, or `None` when it is unset or unusable (then the
    /// crate stays silent, as libsystemd does).
    pub(crate) fn from_env() -> Option<Notifier> {
        let target = std::env::var_os("NOTIFY_SOCKET")?;
        let bytes = target.as_bytes();
        let addr = match bytes.first()? {
            b'/' => SocketAddrUnix::new(target.as_os_str()).ok()?,
            #[cfg(any(target_os = "linux", target_os = "android"))]
            b'@' => SocketAddrUnix::new_abstract_name(&bytes[1..]).ok()?,
            _ => return None,
        };
        let socket = socket::new_socket(AddressFamily::UNIX, SocketType::DGRAM).ok()?;
        rustix::net::sockopt::set_socket_timeout(
            &socket,
            rustix::net::sockopt::Timeout::Send,
            Some(COMMIT_WAIT),
        )
        .ok()?;
        Some(Notifier {
            socket,
            addr,
            target: target.to_string_lossy().into_owned(),
            keeper: std::env::var_os(crate::KEEPER_VAR).is_some(),
            status_set: AtomicBool::new(false),
        })
    }

    /// Sends one notification; `wait` lets it wait (up to [`COMMIT_WAIT`]) for room in
    /// systemd's queue, otherwise it is dropped when the queue is full.
    fn send(&self, msg: &str, wait: bool) -> io::Result<()> {
        let flags = if wait {
            SendFlags::empty()
        } else {
            SendFlags::DONTWAIT
        };
        os::retry(|| rustix::net::sendto(self.socket.as_fd(), msg.as_bytes(), flags, &self.addr))?;
        Ok(())
    }

    /// After a successful commit, before this generation may exit: waits, at most
    /// [`COMMIT_READ_WAIT`], until systemd has read the commit's `MAINPID=`. systemd 252,
    /// when `ExecReload=`'s `kill` exits, takes the service for dead if its main pid has
    /// exited and the `MAINPID=` naming the new one is still unread (the unit is
    /// stopped, the new generation killed). The new generation's confirmation is waited
    /// for meanwhile, so this usually costs nothing.
    pub(crate) fn wait_commit_read(&self) {
        self.wait_read(COMMIT_READ_WAIT);
    }

    /// Waits, at most `limit`, until the receiver has read every message this socket
    /// sent: a Unix datagram stays charged to its sender's send queue (`SIOCOUTQ`) until
    /// it is read. There is no event for "read", so this looks again after a pause that
    /// doubles from 20 µs to 2 ms. Nothing is waited for elsewhere than on Linux.
    fn wait_read(&self, limit: Duration) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            use std::os::unix::io::AsRawFd;
            let deadline = std::time::Instant::now() + limit;
            let mut pause = Duration::from_micros(20);
            loop {
                let mut queued: libc::c_int = 0;
                // SAFETY: SIOCOUTQ (TIOCOUTQ) on a socket writes one int through the
                // pointer, which points to `queued`, alive for the call.
                let rc =
                    unsafe { libc::ioctl(self.socket.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
                if rc != 0 || queued <= 0 || std::time::Instant::now() >= deadline {
                    return;
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(2));
            }
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let _ = limit;
    }

    /// Best effort: a supervisor that went away must not take the service down with it.
    fn tell(&self, msg: &str) {
        let _ = self.send(msg, false);
    }

    /// `READY=1` from a generation that serves alone (a first start, or a new one whose
    /// parent died before it committed): with `MAINPID=`, so systemd follows this pid.
    pub(crate) fn ready_alone(&self) {
        self.tell(&format!("MAINPID={}\nREADY=1", std::process::id()));
    }

    /// Under a keeper: names the new generation `pid`, this process's child, as the one
    /// that may follow it, so that the keeper takes its claim if this process dies
    /// before the commit. One datagram, only under a keeper.
    pub(crate) fn announce(&self, pid: u32) {
        if self.keeper {
            self.tell(&format!("{SUCCESSOR_FIELD}={pid}"));
        }
    }

    /// An upgrade starts (what `Type=notify-reload` waits for after its SIGHUP).
    pub(crate) fn reloading(&self) {
        self.tell(&reloading_message());
    }

    /// Commits an upgrade to the new generation `pid`: from this process, still the main
    /// one, so that `NotifyAccess=main` takes it. Fails only when systemd is there but
    /// does not take the message in time.
    pub(crate) fn commit(&self, pid: u32) -> Result<()> {
        let mut msg = format!("MAINPID={pid}\nREADY=1");
        if self.status_set.load(Ordering::SeqCst) {
            msg.push_str("\nSTATUS=");
        }
        match self.send(&msg, true) {
            Ok(()) => {
                self.status_set.store(false, Ordering::SeqCst);
                Ok(())
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.raw_os_error() == Some(libc::ENOBUFS) =>
            {
                Err(Error::Notify {
                    target: self.target.clone(),
                    source: e,
                })
            }
            // Nobody listens there (ECONNREFUSED, ENOENT): nobody to tell.
            Err(_) => Ok(()),
        }
    }

    /// An upgrade failed: this generation is (again) the main one, and serves. Waits, as
    /// the commit does and at most [`COMMIT_READ_WAIT`], until systemd has read it: after
    /// a failure past the commit systemd's main pid is the killed new generation until
    /// then, and an `ExecReload=` that exits on the failure could make systemd 252 look
    /// at that pid first (see [`wait_commit_read`](Notifier::wait_commit_read)).
    pub(crate) fn upgrade_failed(&self, why: &Error) {
        self.status_set.store(true, Ordering::SeqCst);
        self.tell(&format!(
            "MAINPID={}\nREADY=1\nSTATUS={}",
            std::process::id(),
            status_text("upgrade failed", why)
        ));
        self.wait_read(COMMIT_READ_WAIT);
    }

    /// An upgrade was refused before it started: answer a reload that systemd may be
    /// waiting for (`Type=notify-reload`), so it does not wait for its timeout.
    pub(crate) fn refused(&self, why: &Error) {
        self.status_set.store(true, Ordering::SeqCst);
        self.tell(&reloading_message());
        self.tell(&format!(
            "READY=1\nSTATUS={}",
            status_text("upgrade refused", why)
        ));
    }

    /// Passes on what a keeper heard from its generations (best effort).
    #[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
    #[cfg_attr(not(feature = "keeper"), allow(dead_code))]
    pub(crate) fn relay(&self, msg: &str) {
        self.tell(msg);
    }

    /// A real stop (never sent after a handoff).
    pub(crate) fn stopping(&self) {
        self.tell("STOPPING=1");
    }

    /// Asks for `time` more before the timeout that runs now (the stop's, after
    /// `STOPPING=1`) kills this process: `EXTEND_TIMEOUT_USEC=` (systemd 236+), from the
    /// main process only (`NotifyAccess=main` takes nothing else, nor does a keeper).
    pub(crate) fn extend_timeout(&self, time: Duration) {
        self.tell(&format!("EXTEND_TIMEOUT_USEC={}", time.as_micros()));
    }

    /// Puts `fds` into systemd's fd store, each under its name (`FDSTORE=1`,
    /// `FDNAME=`, the fds as `SCM_RIGHTS`): one message per name, at most 253 fds each.
    /// systemd keeps one copy of a socket however often it is sent.
    pub(crate) fn store(&self, fds: &[(String, BorrowedFd<'_>)]) {
        let mut names: Vec<&str> = fds.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        for name in names {
            let group: Vec<BorrowedFd<'_>> = fds
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, fd)| *fd)
                .collect();
            for chunk in group.chunks(MAX_FDS_PER_MESSAGE) {
                let _ = self.send_fds(&format!("FDSTORE=1\nFDNAME={name}"), chunk);
            }
        }
    }

    /// Takes every fd stored under `name` out of systemd's fd store.
    pub(crate) fn unstore(&self, name: &str) {
        let _ = self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), true);
    }

    fn send_fds(&self, msg: &str, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage};
        let mut space =
            vec![std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let iov = [io::IoSlice::new(msg.as_bytes())];
        os::retry(|| {
            rustix::net::sendmsg_addr(
                &self.socket,
                &self.addr,
                &iov,
                &mut control,
                SendFlags::empty(),
            )
        })?;
        Ok(())
    }
}

/// The prefix of the names under which this crate keeps sockets in systemd's fd store.
const STORE_PREFIX: &str = "tableflip.";
/// The longest name systemd takes (`FDNAME_MAX`).
const FDNAME_MAX: usize = 255;
/// The most fds one message can carry (the kernel's `SCM_MAX_FD`).
const MAX_FDS_PER_MESSAGE: usize = 253;

/// The fd-store name of a socket: `tableflip.` and its fd-table entry (`tcp,[::1]:80`,
/// `unix,/run/app.sock,DEV:INO`) with `:`, the separator of `$LISTEN_FDNAMES`, written
/// `%3A`. `None` for what is not kept there (only listeners and datagram sockets are),
/// and for a name over systemd's 255 bytes (a very long Unix path): such a socket is not
/// stored.
pub(crate) fn store_name(key: &Key, extra: Extra) -> Option<String> {
    match key {
        Key::TcpListener(_)
        | Key::Udp(_)
        | Key::UnixListener(_)
        | Key::UnixDatagram(_)
        | Key::UnixSeqpacket(_) => {}
        _ => return None,
    }
    let name = format!(
        "{STORE_PREFIX}{}",
        wire::entry_text(key, extra).replace(':', "%3A")
    );
    (name.len() <= FDNAME_MAX).then_some(name)
}

/// The key of a socket from its fd-store name; `None` for a name this crate did not give.
/// (The table's own escapes never produce `%3A`: it writes `:` as it is.)
pub(crate) fn from_store_name(name: &str) -> Option<(Key, Extra)> {
    let text = name.strip_prefix(STORE_PREFIX)?.replace("%3A", ":");
    wire::decode_entry_text(&text).ok()
}

/// Whether the fd store is asked for by systemd itself: `$FDSTORE` (systemd 254+) is
/// set to the unit's `FileDescriptorStoreMax=` when that is above zero.
pub(crate) fn store_offered() -> bool {
    std::env::var("FDSTORE")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .is_some_and(|n| n > 0)
}

/// The fd store is on and nobody can hold the sockets (no usable `$NOTIFY_SOCKET`):
/// says so on stderr, once per process, naming what turned it on (`explicit`:
/// `Options::fd_store(true)`; otherwise `$FDSTORE`).
pub(crate) fn warn_store_unheld(explicit: bool) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if WARNED.swap(true, Ordering::SeqCst) {
        return;
    }
    let why = if explicit {
        "Options::fd_store(true) asks for systemd's fd store".to_string()
    } else {
        let n = std::env::var("FDSTORE").unwrap_or_default();
        format!("$FDSTORE={n} asks for systemd's fd store")
    };
    let missing = match std::env::var_os("NOTIFY_SOCKET") {
        None => "$NOTIFY_SOCKET is not set".to_string(),
        Some(v) => format!("$NOTIFY_SOCKET={} cannot be used", v.to_string_lossy()),
    };
    let line = format!(
        "tableflip: {why}, but {missing}: no systemd (or keeper) to hold the sockets, \
         which are not kept\n"
    );
    let _ = io::Write::write_all(&mut io::stderr().lock(), line.as_bytes());
}

/// `RELOADING=1` with the `MONOTONIC_USEC=` that systemd 253+ expects next to it.
fn reloading_message() -> String {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let usec = (now.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(now.tv_nsec as u64 / 1000);
    format!("RELOADING=1\nMONOTONIC_USEC={usec}")
}

/// A one-line `STATUS=` text.
fn status_text(what: &str, why: &Error) -> String {
    format!("{what}: {why}").replace('\n', " ")
}

/// The first fd systemd passes.
const LISTEN_FDS_START: RawFd = 3;

/// Adopts the sockets systemd passed to this process (`$LISTEN_FDS`, only when
/// `$LISTEN_PID` names this process), keyed like the registry's own sockets: by the name
/// they were stored under for those from the fd store (see [`store_name`]), by kind and
/// address for other listeners and datagram sockets, by name (`$LISTEN_FDNAMES`) for the
/// rest.
pub(crate) fn activated() -> Result<Vec<Inherited>> {
    let (Some(pid), Some(count)) = (
        std::env::var_os("LISTEN_PID"),
        std::env::var_os("LISTEN_FDS"),
    ) else {
        return Ok(Vec::new());
    };
    if pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
        // Addressed to another process: not ours.
        return Ok(Vec::new());
    }
    let bad = |entry: String, reason: String| Error::FdTable {
        var: "LISTEN_FDS",
        entry,
        reason,
        source: None,
    };
    let count_s = count.to_string_lossy().into_owned();
    let n: RawFd = count_s
        .parse()
        .ok()
        .filter(|n| (0..=65536).contains(n))
        .ok_or_else(|| bad(count_s.clone(), "not a number of fds".into()))?;
    let names: Option<Vec<String>> = std::env::var_os("LISTEN_FDNAMES")
        .map(|v| v.to_string_lossy().split(':').map(String::from).collect());
    if let Some(names) = names.as_ref().filter(|names| names.len() != n as usize) {
        return Err(Error::FdTable {
            var: "LISTEN_FDNAMES",
            entry: names.join(":"),
            reason: format!("it names {} fds, but $LISTEN_FDS says {n}", names.len()),
            source: None,
        });
    }
    let entries: Vec<wire::Entry> = (0..n)
        .map(|i| {
            let name = match &names {
                Some(names) => names[i as usize].clone(),
                None => format!("LISTEN_FD_{}", LISTEN_FDS_START + i),
            };
            wire::Entry {
                fd: LISTEN_FDS_START + i,
                key: Key::Fd(name),
                extra: Extra::None,
            }
        })
        .collect();
    // libsystemd's sd_listen_fds() marks them close-on-exec: accept that.
    let adopted = inherit::adopt("LISTEN_FDS", entries, false)?;
    Ok(adopted
        .into_iter()
        .map(|Inherited { fd, key, .. }| {
            let name = match key {
                Key::Fd(name) => name,
                other => other.to_string(),
            };
            // One of ours from the fd store: the key (and socket file) it was stored
            // under. Otherwise (a socket unit's) what the kernel says it is.
            if let Some((key, extra)) = from_store_name(&name) {
                return Inherited { fd, key, extra };
            }
            let key = socket::probe(fd.as_fd())
                .ok()
                .and_then(|p| p.key())
                .unwrap_or(Key::Fd(name));
            Inherited {
                fd,
                key,
                extra: Extra::None,
            }
        })
        .collect())
}
