//! The few system calls the crate waits in or retries: one place for `EINTR`, for
//! deadlines, and for close-on-exec pipes.

use std::io;
use std::os::unix::io::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;

/// Calls `f` again as long as it fails with `EINTR`: the one retry loop of the crate.
///
/// A signal handler installed without `SA_RESTART` (by the application or a library)
/// makes a blocking call in any thread fail with `EINTR`. `f` makes the call afresh
/// each time: a call with a timeout computes the time left inside `f`.
///
/// Not for the code between fork and exec (`child.rs`), which retries nothing: every
/// signal is blocked there until its last step.
pub(crate) fn retry<T, E: Interrupted>(mut f: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    loop {
        match f() {
            Err(e) if e.interrupted() => continue,
            done => return done,
        }
    }
}

/// An error that says whether it is `EINTR`: rustix's, or std's.
pub(crate) trait Interrupted {
    fn interrupted(&self) -> bool;
}

impl Interrupted for Errno {
    fn interrupted(&self) -> bool {
        *self == Errno::INTR
    }
}

impl Interrupted for io::Error {
    fn interrupted(&self) -> bool {
        self.kind() == io::ErrorKind::Interrupted
    }
}

/// A pipe whose two ends are close-on-exec.
///
/// Where `pipe2` is missing (Apple), the flag is set right after `pipe`, as std's own
/// fallback does. In that window both ends are inheritable: if another thread of the
/// application starts a process just then (`std::process::Command`, any fork + exec),
/// that process keeps copies of them for as long as it runs. Every pipe of the crate
/// signals by closing (EOF), so a leaked write end postpones that signal until the
/// other process exits too: the exit notification ([`Upgrader::exit`]), the
/// lifeline a new generation watches for its parent's exit, the exec report that
/// `upgrade()` waits for, and the handshake's ready and commit pipes (a child that
/// dies before it reports is then found by the upgrade timeout rather than at once).
/// The window is two system calls wide; avoid starting processes from other threads
/// while an `Upgrader` is created or an upgrade runs. FreeBSD and Linux have `pipe2`,
/// and sockets are atomically close-on-exec there as well.
///
/// [`Upgrader::exit`]: crate::Upgrader::exit
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    #[cfg(not(target_vendor = "apple"))]
    {
        Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
    }
    #[cfg(target_vendor = "apple")]
    {
        let (rd, wr) = rustix::pipe::pipe()?;
        for fd in [&rd, &wr] {
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC)?;
        }
        Ok((rd, wr))
    }
}

/// A deadline `timeout` from now; `None` waits forever (and so does a timeout too large
/// to represent).
pub(crate) fn deadline(timeout: Option<Duration>) -> Option<Instant> {
    timeout.and_then(|t| Instant::now().checked_add(t))
}

/// The time left until `deadline` (`None`: forever).
pub(crate) fn left(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|d| d.saturating_duration_since(Instant::now()))
}

/// `poll(2)` on `fds` for reading until `deadline`, retried on `EINTR` with the time
/// left. Returns, for each fd, whether it is readable (or hung up); all `false` on
/// timeout.
pub(crate) fn poll_in(fds: &[BorrowedFd<'_>], deadline: Option<Instant>) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::from_borrowed_fd(*fd, PollFlags::IN))
        .collect();
    poll_until(&mut pfds, deadline)?;
    Ok(pfds.iter().map(|p| !p.revents().is_empty()).collect())
}

/// `poll(2)` on one fd for `events` until `deadline`, retried on `EINTR` with the time
/// left. Returns the events that came (with `HUP` and `ERR`); empty on timeout.
pub(crate) fn poll_one(
    fd: BorrowedFd<'_>,
    events: PollFlags,
    deadline: Option<Instant>,
) -> io::Result<PollFlags> {
    let mut pfds = [PollFd::from_borrowed_fd(fd, events)];
    poll_until(&mut pfds, deadline)?;
    Ok(pfds[0].revents())
}

fn poll_until(pfds: &mut [PollFd<'_>], deadline: Option<Instant>) -> io::Result<()> {
    retry(|| {
        let timeout = left(deadline).map(|d| Timespec {
            tv_sec: d.as_secs().min(i64::MAX as u64) as _,
            tv_nsec: d.subsec_nanos() as _,
        });
        rustix::event::poll(&mut *pfds, timeout.as_ref())
    })?;
    Ok(())
}

/// Whether `fd` becomes readable (or hung up) before `deadline` (`None`: wait forever).
pub(crate) fn readable(fd: BorrowedFd<'_>, deadline: Option<Instant>) -> io::Result<bool> {
    Ok(poll_in(&[fd], deadline)?[0])
}

/// `read(2)`, retried on `EINTR`.
pub(crate) fn read(fd: impl AsFd, buf: &mut [u8]) -> io::Result<usize> {
    Ok(retry(|| rustix::io::read(&fd, &mut *buf))?)
}

/// `write(2)` until all of `buf` is written, retried on `EINTR`.
pub(crate) fn write_all(fd: impl AsFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = retry(|| rustix::io::write(&fd, buf))?;
        buf = &buf[n..];
    }
    Ok(())
}

/// `send(2)` on a socket until all of `buf` is sent, retried on `EINTR`, never raising
/// `SIGPIPE`: `MSG_NOSIGNAL` where it exists; elsewhere (Apple) the caller sets
/// `SO_NOSIGPIPE` on the socket.
#[cfg_attr(not(feature = "control"), allow(dead_code))]
pub(crate) fn send_all(fd: impl AsFd, mut buf: &[u8]) -> io::Result<()> {
    #[cfg(not(target_vendor = "apple"))]
    let flags = rustix::net::SendFlags::NOSIGNAL;
    #[cfg(target_vendor = "apple")]
    let flags = rustix::net::SendFlags::empty();
    while !buf.is_empty() {
        let n = retry(|| rustix::net::send(&fd, buf, flags))?;
        buf = &buf[n..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_repeats_only_eintr() {
        let mut calls = 0;
        let got = retry(|| {
            calls += 1;
            if calls < 3 {
                Err(Errno::INTR)
            } else {
                Ok(calls)
            }
        });
        assert_eq!(got, Ok(3));
        let mut calls = 0;
        let got: rustix::io::Result<()> = retry(|| {
            calls += 1;
            Err(Errno::AGAIN)
        });
        assert_eq!((got, calls), (Err(Errno::AGAIN), 1));
        let mut calls = 0;
        let got: io::Result<()> = retry(|| {
            calls += 1;
            match calls {
                1 => Err(io::Error::from(io::ErrorKind::Interrupted)),
                _ => Err(io::Error::from(io::ErrorKind::WouldBlock)),
            }
        });
        assert_eq!(
            (got.unwrap_err().kind(), calls),
            (io::ErrorKind::WouldBlock, 2)
        );
    }

    #[test]
    fn poll_times_out_and_sees_eof() {
        let (rd, wr) = pipe().unwrap();
        let soon = deadline(Some(Duration::from_millis(5)));
        assert!(!readable(rd.as_fd(), soon).unwrap());
        drop(wr);
        assert!(readable(rd.as_fd(), None).unwrap());
        assert_eq!(read(&rd, &mut [0u8; 4]).unwrap(), 0);
    }
}
