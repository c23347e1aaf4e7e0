//! systemd, spoken directly: the notify protocol (a datagram to `$NOTIFY_SOCKET`) and
//! socket activation (`$LISTEN_FDS`), without libsystemd.
//!
//! # References
//! - [sd_notify(3)](https://www.freedesktop.org/software/systemd/man/latest/sd_notify.html)
//! - [sd_listen_fds(3)](https://www.freedesktop.org/software/systemd/man/latest/sd_listen_fds.html)

use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::{AddressFamily, SendFlags, SocketAddrUnix, SocketType};

use crate::error::{Error, Result};
use crate::inherit;
use crate::socket;
use crate::wire::Key;

/// The longest the commit message may wait for room in systemd's queue.
const COMMIT_WAIT: Duration = Duration::from_secs(1);

/// Where and how to send notifications: read once from `$NOTIFY_SOCKET`.
///
/// Sending never blocks, but for the one message that commits an upgrade (`MAINPID=` of
/// the new generation), which waits at most [`COMMIT_WAIT`] for room in systemd's
/// queue: losing it would make systemd take the exiting generation for the service.
pub(crate) struct Notifier {
    socket: OwnedFd,
    addr: SocketAddrUnix,
    target: String,
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
        loop {
            match rustix::net::sendto(self.socket.as_fd(), msg.as_bytes(), flags, &self.addr) {
                Ok(_) => return Ok(()),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
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

    /// An upgrade failed: this generation is (again) the main one, and serves.
    pub(crate) fn upgrade_failed(&self, why: &Error) {
        self.status_set.store(true, Ordering::SeqCst);
        self.tell(&format!(
            "MAINPID={}\nREADY=1\nSTATUS={}",
            std::process::id(),
            status_text("upgrade failed", why)
        ));
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

    /// A real stop (never sent after a handoff).
    pub(crate) fn stopping(&self) {
        self.tell("STOPPING=1");
    }
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
/// `$LISTEN_PID` names this process), keyed like the registry's own sockets: by kind and
/// address for listeners and datagram sockets, by name (`$LISTEN_FDNAMES`) for the rest.
pub(crate) fn activated() -> Result<Vec<(OwnedFd, Key)>> {
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
    let entries: Vec<(RawFd, Key)> = (0..n)
        .map(|i| {
            let name = match &names {
                Some(names) => names[i as usize].clone(),
                None => format!("LISTEN_FD_{}", LISTEN_FDS_START + i),
            };
            (LISTEN_FDS_START + i, Key::Fd(name))
        })
        .collect();
    // libsystemd's sd_listen_fds() marks them close-on-exec: accept that.
    let adopted = inherit::adopt("LISTEN_FDS", entries, false)?;
    Ok(adopted
        .into_iter()
        .map(|(fd, key)| {
            let name = match key {
                Key::Fd(name) => name,
                other => other.to_string(),
            };
            let key = socket::probe(fd.as_fd())
                .ok()
                .and_then(|p| p.key())
                .unwrap_or(Key::Fd(name));
            (fd, key)
        })
        .collect())
}
