//! The per-fd floor: the two system calls an upgrade cannot avoid for each passed fd,
//! timed in this process on real fds, the way the crate makes them.
//!
//! For each passed fd the crate makes:
//!
//! - `fcntl(fd, F_SETFD, 0)` in the spawned child, between clone and exec, through libc
//!   (`src/sys/unix/child.rs`: the fd must survive `execve`);
//! - `fcntl(fd, F_GETFD)` when the new generation adopts it, through libc
//!   (`src/sys/unix/inherit.rs`: the fd must be open and must have come through `execve`;
//!   the number may not be open, so it cannot be made a `BorrowedFd` for rustix).
//!
//! Everything else per fd is batched (one `close_range` per run of consecutive numbers)
//! or is the crate's own work (encoding and decoding the table, the registry). The same
//! `F_GETFD` through rustix (an inline syscall, no libc wrapper) is timed as well, so that
//! the figures say what calling libc there costs.
//!
//! Each run opens `n` close-on-exec eventfds (like the fds of an upgrade), then times one
//! loop per call over all of them, and marks them close-on-exec again (untimed). The
//! result is per fd.

use std::os::unix::io::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::event::{eventfd, EventfdFlags};

use crate::{Res, Samples};

/// The per-fd calls, each timed per fd over many runs.
pub struct FdFloor {
    /// `libc::fcntl(fd, F_SETFD, 0)`, as the spawned child clears `FD_CLOEXEC`.
    pub setfd: Samples,
    /// `libc::fcntl(fd, F_GETFD)`, as the new generation checks what it adopts.
    pub getfd_libc: Samples,
    /// `rustix::io::fcntl_getfd`: the same syscall without libc's wrapper.
    pub getfd_rustix: Samples,
    /// `libc::syscall(SYS_fcntl, fd, F_GETFD)`: libc's generic syscall entry, on the raw
    /// number as the adoption needs.
    pub getfd_syscall: Samples,
    /// The floor of the crate's path, per fd: `F_SETFD` + libc's `F_GETFD`, run by run.
    pub floor: Samples,
    /// The same with rustix's `F_GETFD`.
    pub floor_rustix: Samples,
    runs: usize,
}

impl FdFloor {
    pub fn new() -> FdFloor {
        FdFloor {
            setfd: Samples::new("  fcntl(F_SETFD, 0) via libc (the child)"),
            getfd_libc: Samples::new("  fcntl(F_GETFD) via libc (adoption)"),
            getfd_rustix: Samples::new("  fcntl(F_GETFD) via rustix (inline syscall)"),
            getfd_syscall: Samples::new("  fcntl(F_GETFD) via libc::syscall(SYS_fcntl)"),
            floor: Samples::new("per-fd floor: F_SETFD + F_GETFD, libc"),
            floor_rustix: Samples::new("per-fd floor: F_SETFD + F_GETFD, rustix"),
            runs: 0,
        }
    }

    /// One run over `n` fresh fds.
    pub fn run(&mut self, n: usize) -> Res<()> {
        let fds = (0..n)
            .map(|_| eventfd(0, EventfdFlags::CLOEXEC))
            .collect::<Result<Vec<OwnedFd>, _>>()?;
        let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let per_fd = |d: Duration| d / n.max(1) as u32;

        let t = Instant::now();
        for &fd in &raw {
            // SAFETY: `fd` is one of `fds`, open until they are dropped below; F_SETFD
            // changes only its descriptor flag.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } == -1 {
                return Err(
                    format!("fcntl({fd}, F_SETFD): {}", std::io::Error::last_os_error()).into(),
                );
            }
        }
        let setfd = per_fd(t.elapsed());

        // The three ways of F_GETFD, in an order that rotates from run to run.
        let mut getfd = [Duration::ZERO; 3];
        for i in (0..3).map(|i| (i + self.runs) % 3) {
            let t = Instant::now();
            let mut sum: i64 = 0;
            for (&fd, owned) in raw.iter().zip(&fds) {
                sum += match i {
                    // SAFETY: as above; F_GETFD reads the descriptor flags only.
                    0 => i64::from(unsafe { libc::fcntl(fd, libc::F_GETFD) }),
                    1 => i64::from(rustix::io::fcntl_getfd(owned.as_fd())?.bits()),
                    // SAFETY: as above.
                    _ => unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_GETFD) },
                };
            }
            getfd[i] = per_fd(t.elapsed());
            std::hint::black_box(sum);
        }
        self.runs += 1;
        let [getfd_libc, getfd_rustix, getfd_syscall] = getfd;

        // Close-on-exec again before anything else is spawned (untimed).
        for fd in &fds {
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC)?;
        }
        self.setfd.push(setfd);
        self.getfd_libc.push(getfd_libc);
        self.getfd_rustix.push(getfd_rustix);
        self.getfd_syscall.push(getfd_syscall);
        self.floor.push(setfd + getfd_libc);
        self.floor_rustix.push(setfd + getfd_rustix);
        Ok(())
    }

    /// The rows of the table, the floors first.
    pub fn rows(&self) -> [&Samples; 6] {
        [
            &self.floor,
            &self.setfd,
            &self.getfd_libc,
            &self.floor_rustix,
            &self.getfd_rustix,
            &self.getfd_syscall,
        ]
    }
}
