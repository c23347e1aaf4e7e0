//! Flags and closes for many fds at once.
//!
//! An upgrade passes every fd three times through a per-fd system call (set close-on-exec
//! in the new generation, close the unused ones there, close the old generation's
//! copies). With thousands of fds those calls dominate, so on Linux each run of
//! consecutive fd numbers takes one `close_range(2)` instead. Every number in a run
//! belongs to the caller (the run is made of the caller's fds only), so nothing else is
//! touched. Where `close_range` is missing (Linux before 5.9, or 5.11 for
//! `CLOSE_RANGE_CLOEXEC`, other Unixes), it falls back to one call per fd.
//!
//! # References
//! - [close_range(2)](https://man7.org/linux/man-pages/man2/close_range.2.html)

use std::io;
use std::os::unix::io::{IntoRawFd, OwnedFd, RawFd};

/// Sets `FD_CLOEXEC` on every fd of `fds`.
pub(crate) fn set_cloexec(fds: impl IntoIterator<Item = RawFd>) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.into_iter().collect();
    for (lo, hi) in runs(raw) {
        if !close_range(lo, hi, CLOEXEC) {
            for fd in lo..=hi {
                // SAFETY: `fd` is one of the caller's open fds (the run is made of them);
                // F_SETFD changes only its descriptor flag.
                if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
    }
    Ok(())
}

/// Closes every fd of `fds`.
pub(crate) fn close_all(fds: impl IntoIterator<Item = OwnedFd>) {
    let raw: Vec<RawFd> = fds.into_iter().map(IntoRawFd::into_raw_fd).collect();
    for (lo, hi) in runs(raw) {
        if !close_range(lo, hi, 0) {
            for fd in lo..=hi {
                // SAFETY: we own `fd` (it came from an OwnedFd given up above) and close
                // it exactly once.
                unsafe { libc::close(fd) };
            }
        }
    }
}

/// The runs of consecutive numbers in `fds`, as inclusive ranges.
fn runs(mut fds: Vec<RawFd>) -> Vec<(RawFd, RawFd)> {
    fds.sort_unstable();
    let mut out: Vec<(RawFd, RawFd)> = Vec::new();
    for fd in fds {
        match out.last_mut() {
            Some((_, hi)) if hi.checked_add(1) == Some(fd) => *hi = fd,
            _ => out.push((fd, fd)),
        }
    }
    out
}

#[cfg(any(target_os = "linux", target_os = "android"))]
const CLOEXEC: libc::c_uint = libc::CLOSE_RANGE_CLOEXEC;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const CLOEXEC: libc::c_uint = 4;

/// `close_range(lo, hi, flags)`; `false` if the kernel cannot do it (nothing happened then).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn close_range(lo: RawFd, hi: RawFd, flags: libc::c_uint) -> bool {
    // A run of one costs the same either way; skip the syscall that may not exist.
    if lo == hi {
        return false;
    }
    // SAFETY: every fd in lo..=hi belongs to the caller (see the module docs). On the
    // errors that matter here (ENOSYS, EINVAL for an unknown flag) nothing was done.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            lo as libc::c_uint,
            hi as libc::c_uint,
            flags,
        )
    };
    rc == 0
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn close_range(_lo: RawFd, _hi: RawFd, _flags: libc::c_uint) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsRawFd;

    #[test]
    fn runs_of_consecutive_fds() {
        assert_eq!(runs(vec![]), vec![]);
        assert_eq!(runs(vec![5]), vec![(5, 5)]);
        assert_eq!(
            runs(vec![9, 3, 4, 5, 7, 8, RawFd::MAX]),
            vec![(3, 5), (7, 9), (RawFd::MAX, RawFd::MAX)]
        );
    }

    #[test]
    fn set_cloexec_and_close_all() {
        use std::os::unix::io::AsFd;
        let fds: Vec<OwnedFd> = (0..64)
            .map(|_| {
                let (r, w) = rustix::pipe::pipe().unwrap();
                drop(w);
                r
            })
            .collect();
        set_cloexec(fds.iter().map(|fd| fd.as_raw_fd())).unwrap();
        for fd in &fds {
            let flags = rustix::io::fcntl_getfd(fd.as_fd()).unwrap();
            assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
        }
        let before: Vec<(RawFd, u64)> = fds
            .iter()
            .map(|fd| (fd.as_raw_fd(), rustix::fs::fstat(fd).unwrap().st_ino as u64))
            .collect();
        close_all(fds);
        for (fd, ino) in before {
            // SAFETY: an all-zero stat is a valid value of this plain C struct.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: fstat on a bare number with a valid buffer: it may be closed (EBADF)
            // or reused by another test thread, but must not be one of our pipes.
            let rc = unsafe { libc::fstat(fd, &mut st) };
            assert!(rc == -1 || st.st_ino as u64 != ino, "fd {fd} still open");
        }
    }
}
