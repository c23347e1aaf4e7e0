//! systemd, spoken directly: the notify protocol (a datagram to `$NOTIFY_SOCKET`) and
//! socket activation (`$LISTEN_FDS`), without libsystemd.
//!
//! # References
//! - [sd_notify(3)](https://www.freedesktop.org/software/systemd/man/latest/sd_notify.html)
//! - [sd_listen_fds(3)](https://www.freedesktop.org/software/systemd/man/latest/sd_listen_fds.html)

use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsFd, BorrowedFd, OwnedFd, RawFd};

use rustix::net::{AddressFamily, SendFlags, SocketAddrUnix, SocketType};

use crate::error::{Error, Result};
use crate::fds;
use crate::wire::Key;

/// Where and how to send notifications: read once from `$NOTIFY_SOCKET`.
pub(crate) struct Notifier {
    socket: OwnedFd,
    addr: SocketAddrUnix,
    target: String,
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
        let socket = fds::new_socket(AddressFamily::UNIX, SocketType::DGRAM).ok()?;
        Some(Notifier {
            socket,
            addr,
            target: target.to_string_lossy().into_owned(),
        })
    }

    /// Sends one notification. Best effort: a supervisor that went away must not take the
    /// service down with it.
    pub(crate) fn send(&self, msg: &str) {
        let _ = rustix::net::sendto(&self.socket, msg.as_bytes(), SendFlags::empty(), &self.addr);
    }

    /// `READY=1` from a process: with `MAINPID=`, so that systemd follows the new pid.
    pub(crate) fn ready(&self) {
        self.send(&format!("MAINPID={}\nREADY=1", std::process::id()));
    }

    /// An upgrade starts (what `Type=notify-reload` waits for after its SIGHUP).
    pub(crate) fn reloading(&self) {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let usec = (now.tv_sec as u64)
            .saturating_mul(1_000_000)
            .saturating_add(now.tv_nsec as u64 / 1000);
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
    }

    /// An upgrade failed: this generation is still the one serving.
    pub(crate) fn upgrade_failed(&self, why: &Error) {
        let status = format!("upgrade failed: {why}").replace('\n', " ");
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// A real stop (never sent after a handoff).
    pub(crate) fn stopping(&self) {
        self.send("STOPPING=1");
    }
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
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|v| v.split(':').map(String::from).collect())
        .unwrap_or_default();
    let names_fit = names.len() == n as usize;
    let entries: Vec<(RawFd, Key)> = (0..n)
        .map(|i| {
            let name = if names_fit {
                names[i as usize].clone()
            } else {
                format!("LISTEN_FD_{}", LISTEN_FDS_START + i)
            };
            (LISTEN_FDS_START + i, Key::Fd(name))
        })
        .collect();
    let adopted = fds::adopt("LISTEN_FDS", entries)?;
    Ok(adopted
        .into_iter()
        .map(|(fd, key)| {
            let name = match key {
                Key::Fd(name) => name,
                other => other.to_string(),
            };
            let key = classify(fd.as_fd()).unwrap_or(Key::Fd(name));
            (fd, key)
        })
        .collect())
}

/// The registry key of a socket from what the kernel says about it: a listening stream
/// socket or a bound datagram socket, IP or Unix. `None` for anything else.
fn classify(fd: BorrowedFd<'_>) -> Option<Key> {
    let st = rustix::fs::fstat(fd).ok()?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Socket {
        return None;
    }
    let ty = rustix::net::sockopt::socket_type(fd).ok()?;
    let local = rustix::net::getsockname(fd).ok()?;
    let listening = rustix::net::sockopt::socket_acceptconn(fd).unwrap_or(false);
    match local.address_family() {
        AddressFamily::INET | AddressFamily::INET6 => {
            let addr = std::net::SocketAddr::try_from(local).ok()?;
            if ty == SocketType::STREAM && listening {
                Some(Key::TcpListener(addr))
            } else if ty == SocketType::DGRAM {
                Some(Key::Udp(addr))
            } else {
                None
            }
        }
        AddressFamily::UNIX => {
            let addr = fds::unix(local).ok()?;
            if ty == SocketType::STREAM && listening {
                Some(Key::UnixListener(addr))
            } else if ty == SocketType::DGRAM {
                Some(Key::UnixDatagram(addr))
            } else {
                None
            }
        }
        _ => None,
    }
}
