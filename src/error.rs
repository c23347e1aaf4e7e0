//! The crate's one error type.

use std::fmt;
use std::io;
#[cfg(unix)]
pub(crate) use std::os::unix::io::RawFd;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// What an fd number is on Unix, where `Error::Io` names one; nothing names one elsewhere.
#[cfg(not(unix))]
pub(crate) type RawFd = std::os::raw::c_int;

/// Everything that can go wrong in `tableflip`.
///
/// Variants carry what a caller needs to act (the pid, the path, the fd) and keep the
/// underlying [`io::Error`] in their `source` field. Its text is part of the message:
/// `format!("{e}")` reads `cannot listen on /run/x.sock: Address already in use (os
/// error 98)`. So that error-chain printers (anyhow's `{:#}`, a loop over
/// [`source`](std::error::Error::source)) do not print it twice, `source()` returns
/// `None`; [`Error::io_error`] returns the OS error. New variants may be added, so match
/// with a wildcard arm.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// Another [`Upgrader`](crate::Upgrader) is alive in this process.
    AlreadyCreated,
    /// The fd table in the environment is malformed, or one of its entries does not
    /// describe the fd it names. Nothing from the offending entry was adopted.
    FdTable {
        /// The environment variable that held the table.
        var: &'static str,
        /// The entry at fault, as it appears in the table (or the whole value when the
        /// table could not be split into entries).
        entry: String,
        /// What is wrong with it.
        reason: String,
        /// The OS error behind it, when there is one (a closed fd, say).
        source: Option<io::Error>,
    },
    /// An inherited fd was asked for as a different kind than it was passed as.
    /// It stays in place and can still be asked for as the right kind.
    WrongKind {
        /// The key that was asked for.
        key: String,
        /// The kind it was passed as.
        passed_as: &'static str,
    },
    /// Creating, binding or configuring a socket failed.
    Listen {
        /// The address or path involved.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// [`upgrade`](crate::Upgrader::upgrade) was called before [`ready`](crate::Upgrader::ready).
    NotReady,
    /// Another upgrade is running.
    UpgradeInProgress,
    /// An upgrade already succeeded: this generation is on its way out.
    AlreadyUpgraded,
    /// [`stop`](crate::Upgrader::stop) was called.
    Stopped,
    /// The previous generation (this process's parent) has not exited yet.
    ParentAlive {
        /// The parent's pid.
        pid: u32,
    },
    /// The new generation could not be started: `execve` (or the preparation for it) failed.
    Exec {
        /// The executable that was tried.
        path: PathBuf,
        /// The OS error (`ENOENT`, `EACCES`, ...).
        source: io::Error,
    },
    /// The new generation could not enter the initial working directory (it was removed
    /// or renamed since this process started), so it did not start.
    WorkingDirectory {
        /// The directory.
        path: PathBuf,
        /// The OS error from `chdir`.
        source: io::Error,
    },
    /// The new generation exited before it became ready.
    ChildExited {
        /// Its pid.
        pid: u32,
        /// How it ended (exit code or signal).
        status: ExitStatus,
    },
    /// The new generation gave up with [`Upgrader::fail`](crate::Upgrader::fail): the
    /// reason is its own.
    ChildFailed {
        /// Its pid.
        pid: u32,
        /// What it said.
        reason: String,
        /// How it ended, once reaped.
        status: ExitStatus,
    },
    /// The new generation died after it had reported ready, before the upgrade was
    /// committed: during the probation ([`Options::probation`](crate::Options::probation)),
    /// or before it confirmed the commit. The upgrade was rolled back: this generation
    /// serves on, and systemd's main pid and the pid file name it again.
    ChildDiedAfterReady {
        /// Its pid.
        pid: u32,
        /// How it ended (exit code or signal).
        status: ExitStatus,
        /// How long after reporting ready it died.
        after: Duration,
    },
    /// systemd's notify socket did not take the message that commits an upgrade
    /// (`MAINPID=<new>`) in time: its queue is full. The upgrade was abandoned, since
    /// systemd would otherwise lose track of the service.
    Notify {
        /// `$NOTIFY_SOCKET`.
        target: String,
        /// The OS error.
        source: io::Error,
    },
    /// The state given to [`Fds::set_state`](crate::Fds::set_state), or found by
    /// [`Fds::take_state`](crate::Fds::take_state), is larger than the bound.
    StateTooLarge {
        /// Its size in bytes.
        size: u64,
        /// The bound, [`MAX_STATE_SIZE`](crate::MAX_STATE_SIZE).
        max: u64,
    },
    /// The new generation ran out of the upgrade timeout
    /// ([`Options::upgrade_timeout`](crate::Options::upgrade_timeout)): it was not ready
    /// in time, or, after the commit, did not confirm in time that it had taken over.
    /// It was killed and reaped; after the commit the upgrade was also rolled back (this
    /// generation serves on, and systemd's main pid and the pid file name it again).
    Timeout {
        /// Its pid.
        pid: u32,
        /// The upgrade timeout.
        timeout: Duration,
        /// What it was waiting for when the time ran out.
        waiting_for: WaitingFor,
    },
    /// The pid file could not be written.
    PidFile {
        /// The pid file's path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Talking to a [control socket](crate::control) failed: it could not be reached
    /// (no server, no permission), it did not answer in time (the source's kind is
    /// [`io::ErrorKind::TimedOut`]), or what it said is not the protocol
    /// ([`io::ErrorKind::InvalidData`]).
    Control {
        /// The control socket's address (a path, or `@name`).
        addr: String,
        /// What the client was doing: `connect`, `send`, `receive`.
        op: &'static str,
        /// The OS error, or what was wrong with the answer.
        source: io::Error,
    },
    /// The process that answered on a [control socket](crate::control) is not one the
    /// client believes (see [whom a client believes](crate::control#whom-a-client-believes)):
    /// another user may have taken the name first. Nothing was sent to it.
    ControlPeer {
        /// The control socket's address (a path, or `@name`).
        addr: String,
        /// The uid that process runs as.
        uid: u32,
        /// Why it is not believed.
        reason: String,
    },
    /// The generation behind a [control socket](crate::control) answered a request
    /// with an error.
    Remote {
        /// The control socket's address (a path, or `@name`).
        addr: String,
        /// The kind of error: the name of the server's [`Error`] variant (`ChildFailed`,
        /// `ChildExited`, `Timeout`, `UpgradeInProgress`, ...) or of a protocol error
        /// (`BadRequest`, `PermissionDenied`, ...); the control module lists them.
        kind: String,
        /// The server's message: its error's message (with the OS error, if any), on
        /// one line. For `ChildFailed` it carries the new generation's own reason.
        message: String,
    },
    /// What was called does not exist on this platform. Where it is not Unix (Windows)
    /// the crate builds, so that a cross-platform program does too, and
    /// [`Upgrader::new`](crate::Upgrader::new), like every other call that can fail,
    /// fails with this. On Unix only what needs Linux does
    /// ([`Keeper::run`](crate::Keeper::run) on macOS and FreeBSD).
    Unsupported {
        /// What was called: `"Upgrader::new"`, `"Fds::listen"`, `"Keeper::run"`, ...
        op: &'static str,
        /// What it needs: `"Unix"`, `"Linux"`.
        needs: &'static str,
    },
    /// The [handover channel](crate::handover) cannot be had or used:
    /// [`Upgrader::handover`](crate::Upgrader::handover) before a successful upgrade, a
    /// second time, or when the new generation took no channel (an older release) or
    /// has closed it; or, in the new generation, the fd the table named as the channel
    /// failed its checks (it is left alone). Nothing was sent or received.
    HandoverUnavailable {
        /// The other generation's pid, when there is one.
        pid: Option<u32>,
        /// Why.
        reason: String,
    },
    /// The [handover channel](crate::handover) has ended: the other generation
    /// finished, said it was done, or went away, or this one is exiting. Nothing more
    /// travels on it; drop it. A connection given back with this reason was not
    /// settled when it ended.
    HandoverEnded {
        /// The other generation's pid.
        pid: u32,
        /// What ended it.
        reason: String,
    },
    /// A connection, or a whole message, on the [handover channel](crate::handover)
    /// was refused: by the new generation (its reason), or here (a limit, a malformed
    /// message, an fd that is not the connection its record says). The old generation
    /// keeps what was refused; the channel carries on.
    HandoverRefused {
        /// The other generation's pid.
        pid: u32,
        /// The connection, when one is concerned.
        id: Option<u64>,
        /// Why.
        reason: String,
    },
    /// An OS call failed.
    Io {
        /// What the crate was doing.
        op: &'static str,
        /// The fd involved, if any.
        fd: Option<RawFd>,
        /// The OS error.
        source: io::Error,
    },
}

/// What an upgrade was waiting for when its timeout ran out: see [`Error::Timeout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WaitingFor {
    /// The new generation's ready report: it had not called
    /// [`Upgrader::ready`](crate::Upgrader::ready) in time. Nothing had been committed.
    Ready,
    /// The new generation's confirmation, after the commit, that it had taken over
    /// (written its pid file). The commit was undone.
    Confirmation,
}

impl Error {
    #[cfg_attr(not(unix), allow(dead_code))]
    pub(crate) fn io(op: &'static str, fd: Option<RawFd>, source: impl Into<io::Error>) -> Self {
        Error::Io {
            op,
            fd,
            source: source.into(),
        }
    }

    /// The variant's name, as the control protocol sends it (`ChildFailed`, ...).
    #[cfg_attr(not(unix), allow(dead_code))]
    pub(crate) fn kind_name(&self) -> &'static str {
        match self {
            Error::AlreadyCreated => "AlreadyCreated",
            Error::FdTable { .. } => "FdTable",
            Error::WrongKind { .. } => "WrongKind",
            Error::Listen { .. } => "Listen",
            Error::NotReady => "NotReady",
            Error::UpgradeInProgress => "UpgradeInProgress",
            Error::AlreadyUpgraded => "AlreadyUpgraded",
            Error::Stopped => "Stopped",
            Error::ParentAlive { .. } => "ParentAlive",
            Error::Exec { .. } => "Exec",
            Error::WorkingDirectory { .. } => "WorkingDirectory",
            Error::ChildExited { .. } => "ChildExited",
            Error::ChildFailed { .. } => "ChildFailed",
            Error::ChildDiedAfterReady { .. } => "ChildDiedAfterReady",
            Error::Notify { .. } => "Notify",
            Error::StateTooLarge { .. } => "StateTooLarge",
            Error::Timeout { .. } => "Timeout",
            Error::PidFile { .. } => "PidFile",
            Error::Control { .. } => "Control",
            Error::ControlPeer { .. } => "ControlPeer",
            Error::Remote { .. } => "Remote",
            Error::Unsupported { .. } => "Unsupported",
            Error::HandoverUnavailable { .. } => "HandoverUnavailable",
            Error::HandoverEnded { .. } => "HandoverEnded",
            Error::HandoverRefused { .. } => "HandoverRefused",
            Error::Io { .. } => "Io",
        }
    }
}

impl Error {
    /// The OS error behind this one, if there is one. It is part of the message
    /// (`Display`), not a separate [`source`](std::error::Error::source): see
    /// [`Error`].
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Error::FdTable {
                source: Some(source),
                ..
            }
            | Error::Listen { source, .. }
            | Error::Exec { source, .. }
            | Error::WorkingDirectory { source, .. }
            | Error::PidFile { source, .. }
            | Error::Notify { source, .. }
            | Error::Control { source, .. }
            | Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }

    /// The message without the OS error.
    fn describe(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::AlreadyCreated => f.write_str("an Upgrader already exists in this process"),
            Error::FdTable {
                var, entry, reason, ..
            } => write!(f, "invalid fd table in ${var}: entry {entry:?}: {reason}"),
            Error::WrongKind { key, passed_as } => {
                write!(f, "inherited {key} was passed as a {passed_as}")
            }
            Error::Listen { addr, .. } => write!(f, "cannot listen on {addr}"),
            Error::NotReady => f.write_str("cannot upgrade before ready() was called"),
            Error::UpgradeInProgress => f.write_str("another upgrade is in progress"),
            Error::AlreadyUpgraded => f.write_str("this generation has already been upgraded"),
            Error::Stopped => f.write_str("the upgrader was stopped"),
            Error::ParentAlive { pid } => write!(
                f,
                "the previous generation (pid {pid}) has not exited yet \
                 (it is still draining; Options::upgrade_during_drain allows upgrading meanwhile)"
            ),
            Error::Exec { path, .. } => {
                write!(f, "cannot execute new generation {}", path.display())
            }
            Error::WorkingDirectory { path, .. } => write!(
                f,
                "the new generation cannot enter the initial working directory {}",
                path.display()
            ),
            Error::ChildExited { pid, status } => write!(
                f,
                "new generation (pid {pid}) exited before it was ready: {status}"
            ),
            Error::ChildFailed {
                pid,
                reason,
                status,
            } => write!(f, "new generation (pid {pid}) gave up: {reason} ({status})"),
            Error::ChildDiedAfterReady { pid, status, after } => write!(
                f,
                "new generation (pid {pid}) died {after:.1?} after it became ready: {status}; \
                 the upgrade was rolled back"
            ),
            Error::Notify { target, .. } => write!(
                f,
                "systemd's notify socket {target} did not take the commit message; \
                 the upgrade was abandoned"
            ),
            Error::StateTooLarge { size, max } => write!(
                f,
                "state of {size} bytes is larger than the limit of {max} bytes"
            ),
            Error::Timeout {
                pid,
                timeout,
                waiting_for: WaitingFor::Ready,
            } => write!(
                f,
                "new generation (pid {pid}) was not ready after {timeout:?}; it was killed"
            ),
            Error::Timeout {
                pid,
                timeout,
                waiting_for: WaitingFor::Confirmation,
            } => write!(
                f,
                "new generation (pid {pid}) did not confirm that it took over within the \
                 upgrade timeout of {timeout:?}; it was killed and the upgrade rolled back"
            ),
            Error::PidFile { path, .. } => {
                write!(f, "cannot write pid file {}", path.display())
            }
            Error::Control { addr, op, .. } => {
                write!(f, "control socket {addr}: {op} failed")
            }
            Error::ControlPeer { addr, uid, reason } => write!(
                f,
                "control socket {addr}: the process answering runs as uid {uid}, \
                 which this client does not believe: {reason}"
            ),
            Error::Remote { addr, message, .. } => {
                write!(f, "{message} (answered by the control socket {addr})")
            }
            Error::Unsupported { op, needs } => {
                write!(f, "{op} needs {needs}; this is {}", std::env::consts::OS)
            }
            Error::HandoverUnavailable { pid, reason } => match pid {
                Some(pid) => write!(f, "no handover channel with pid {pid}: {reason}"),
                None => write!(f, "no handover channel: {reason}"),
            },
            Error::HandoverEnded { pid, reason } => {
                write!(f, "the handover channel with pid {pid} has ended: {reason}")
            }
            Error::HandoverRefused { pid, id, reason } => match id {
                Some(id) => write!(
                    f,
                    "connection {id} on the handover channel with pid {pid} was refused: {reason}"
                ),
                None => write!(
                    f,
                    "the handover channel with pid {pid} refused a message: {reason}"
                ),
            },
            Error::Io { op, fd, .. } => match fd {
                Some(fd) => write!(f, "{op} (fd {fd}) failed"),
                None => write!(f, "{op} failed"),
            },
        }
    }
}

/// The message, then the OS error's: `cannot listen on /run/x.sock: Address already in
/// use (os error 98)`.
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.describe(f)?;
        match self.io_error() {
            Some(e) => write!(f, ": {e}"),
            None => Ok(()),
        }
    }
}

/// No source: the OS error is already in the message, and a chain printer (`{:#}` with
/// anyhow, or a loop over `source()`) would print it twice. Get it with
/// [`Error::io_error`].
impl std::error::Error for Error {}

impl From<Error> for io::Error {
    fn from(err: Error) -> io::Error {
        let kind = match &err {
            Error::Listen { source, .. }
            | Error::Exec { source, .. }
            | Error::WorkingDirectory { source, .. }
            | Error::PidFile { source, .. }
            | Error::Notify { source, .. }
            | Error::Control { source, .. }
            | Error::Io { source, .. } => source.kind(),
            Error::Timeout { .. } => io::ErrorKind::TimedOut,
            Error::ControlPeer { .. } => io::ErrorKind::PermissionDenied,
            Error::Remote { kind, .. } if kind == "PermissionDenied" => {
                io::ErrorKind::PermissionDenied
            }
            Error::Remote { kind, .. } if kind == "Timeout" || kind == "RequestTimeout" => {
                io::ErrorKind::TimedOut
            }
            Error::Unsupported { .. } => io::ErrorKind::Unsupported,
            Error::FdTable { .. } | Error::WrongKind { .. } | Error::HandoverRefused { .. } => {
                io::ErrorKind::InvalidData
            }
            Error::HandoverEnded { .. } => io::ErrorKind::BrokenPipe,
            Error::HandoverUnavailable { .. } => io::ErrorKind::NotConnected,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, err)
    }
}

/// At most `max` bytes of `s`, cut at a character boundary: every bounded message in
/// the crate (table entries in errors, failure reasons) is cut here.
#[cfg_attr(not(unix), allow(dead_code))]
pub(crate) fn clip(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Shorthand for `Result<T, tableflip::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_cuts_at_a_char_boundary() {
        assert_eq!(clip("héllo", 2), "h");
        assert_eq!(clip("héllo", 3), "hé");
        assert_eq!(clip("abc", 10), "abc");
        assert_eq!(clip("", 0), "");
    }

    #[test]
    fn unsupported_names_the_call_and_the_platform() {
        let e = Error::Unsupported {
            op: "Upgrader::new",
            needs: "Unix",
        };
        let msg = e.to_string();
        let this = std::env::consts::OS;
        assert_eq!(msg, format!("Upgrader::new needs Unix; this is {this}"));
        assert_eq!(e.kind_name(), "Unsupported");
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::Unsupported);
    }
}
