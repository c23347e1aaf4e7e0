//! Child processes the crate started: waiting for them, reaping them, killing them.
//!
//! A [`Child`] is a pid we have not reaped yet, so the pid cannot be reused under us:
//! signalling it and waiting for it always reach our own child. On Linux it also holds a
//! pidfd, which becomes readable when the child exits, so a wait can sit in `poll` next
//! to other fds instead of sleeping.

use std::os::unix::io::{AsFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, WaitOptions};

use crate::error::{Error, Result};

/// A child process we started and have not reaped.
#[derive(Debug)]
pub(crate) struct Child {
    pid: Pid,
    /// Readable when the child exits (Linux 5.3+); `None` elsewhere or on older kernels.
    pidfd: Option<OwnedFd>,
}

impl Child {
    /// Takes charge of `pid`, a child of this process that nobody has reaped.
    pub(crate) fn new(pid: Pid) -> Child {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok();
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let pidfd = None;
        Child { pid, pidfd }
    }

    /// The child's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.pid.as_raw_nonzero().get() as u32
    }

    /// An fd that becomes readable when the child exits, where the platform has one.
    pub(crate) fn exit_fd(&self) -> Option<std::os::unix::io::BorrowedFd<'_>> {
        self.pidfd.as_ref().map(|fd| fd.as_fd())
    }

    /// Kills the child (`SIGKILL`) and reaps it.
    pub(crate) fn kill_and_reap(self) -> Result<ExitStatus> {
        // Through the pidfd where there is one; the pid is safe too, since the child is
        // not reaped yet, so its pid cannot have been reused.
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Some(fd) = &self.pidfd {
            if rustix::process::pidfd_send_signal(fd, Signal::KILL).is_ok() {
                return self.reap();
            }
        }
        let _ = rustix::process::kill_process(self.pid, Signal::KILL);
        self.reap()
    }

    /// Waits for the child to exit, then reaps it.
    pub(crate) fn reap(self) -> Result<ExitStatus> {
        Ok(self
            .waitpid(WaitOptions::empty())?
            .unwrap_or_else(|| ExitStatus::from_raw(0)))
    }

    /// Reaps the child if it has exited, without blocking.
    pub(crate) fn try_reap(&self) -> Result<Option<ExitStatus>> {
        self.waitpid(WaitOptions::NOHANG)
    }

    /// `waitpid(2)` on the child, retried on `EINTR`. An error (`ECHILD`) means somebody
    /// else reaped it: `SIGCHLD` ignored, or a `waitpid(-1)` elsewhere in the process.
    fn waitpid(&self, options: WaitOptions) -> Result<Option<ExitStatus>> {
        match crate::sys::os::retry(|| rustix::process::waitpid(Some(self.pid), options)) {
            Ok(status) => Ok(status.map(|(_, s)| ExitStatus::from_raw(s.as_raw()))),
            Err(e) => Err(Error::io(
                "waitpid for the new generation (reaped elsewhere? SIGCHLD ignored?)",
                None,
                e,
            )),
        }
    }

    /// Waits until the child exits or `deadline` passes, and reaps it: `Ok(Err(self))`
    /// on timeout, so the caller still holds the child.
    pub(crate) fn wait_until(
        self,
        deadline: Option<Instant>,
    ) -> Result<std::result::Result<ExitStatus, Child>> {
        loop {
            if let Some(status) = self.try_reap()? {
                return Ok(Ok(status));
            }
            if crate::sys::os::left(deadline) == Some(Duration::ZERO) {
                return Ok(Err(self));
            }
            match self.exit_fd() {
                Some(fd) => {
                    let _ = crate::sys::os::readable(fd, deadline);
                }
                // No pidfd: look again after a short sleep. Only reached on systems
                // without pidfd, once the child has closed its end of the handshake.
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// Waits until the child exits or `deadline` passes, killing it then, and reaps it.
    pub(crate) fn reap_by(self, deadline: Option<Instant>) -> Result<ExitStatus> {
        match self.wait_until(deadline)? {
            Ok(status) => Ok(status),
            Err(child) => child.kill_and_reap(),
        }
    }
}
