//! The keeper's signals, whatever threads the process has: a handler for each signal
//! writes its number to a pipe that the keeper's loop polls (the self-pipe trick).
//!
//! A signal mask would not do: it belongs to the thread that sets it, and a thread the
//! application started before [`Keeper::run`](super::Keeper::run) (a logger, a runtime's
//! workers) keeps the signal unblocked, so the kernel delivers it there, where its
//! default action (`SIGTERM`: terminate) kills the keeper. A handler is process-wide: in
//! whichever thread it runs, it only writes one byte. The keeper takes over these
//! signals' dispositions; the generations start with every disposition at its default.

use std::io;
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

/// The write end of the pipe, for the handler (`-1` until installed).
static PIPE: AtomicI32 = AtomicI32::new(-1);

/// The pipe the handler writes signal numbers to.
#[derive(Debug)]
pub(super) struct SignalPipe {
    read: OwnedFd,
    /// Kept open for the handler for the process's whole life.
    _write: OwnedFd,
}

extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe calls: errno saved and restored around one write(2).
    // SAFETY: errno_ptr returns this thread's errno, always valid.
    let errno = unsafe { *errno_ptr() };
    let fd = PIPE.load(Ordering::Relaxed);
    let byte = sig as u8;
    // SAFETY: one byte from a local; a full pipe (EAGAIN: the loop has plenty to read
    // already) or a closed fd only makes the write fail.
    unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    // SAFETY: as above.
    unsafe { *errno_ptr() = errno };
}

/// This thread's `errno`.
#[cfg(target_os = "linux")]
fn errno_ptr() -> *mut libc::c_int {
    // SAFETY: no preconditions; async-signal-safe.
    unsafe { libc::__errno_location() }
}

/// This thread's `errno`.
#[cfg(target_os = "android")]
fn errno_ptr() -> *mut libc::c_int {
    // SAFETY: no preconditions; async-signal-safe.
    unsafe { libc::__errno() }
}

/// Installs the handler for `signals` and unblocks them in the calling thread (so that
/// at least one thread takes them whatever the others block).
pub(super) fn install(signals: &[libc::c_int]) -> io::Result<SignalPipe> {
    let (read, write) = crate::sys::os::pipe()?;
    for fd in [&read, &write] {
        rustix::io::ioctl_fionbio(fd, true)?;
    }
    PIPE.store(write.as_raw_fd(), Ordering::SeqCst);
    // SAFETY: sigset_t and sigaction are plain C values; sigemptyset initialises them.
    let (mut set, mut action): (libc::sigset_t, libc::sigaction) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    // SAFETY: valid pointers to the values above.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigemptyset(&mut action.sa_mask);
    }
    action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    action.sa_flags = libc::SA_RESTART | libc::SA_NOCLDSTOP;
    for &sig in signals {
        // SAFETY: valid set pointer, valid signal number.
        unsafe { libc::sigaddset(&mut set, sig) };
        // SAFETY: a valid action whose handler only calls async-signal-safe functions.
        if unsafe { libc::sigaction(sig, &action, std::ptr::null_mut()) } == -1 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: valid set pointer.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(SignalPipe {
        read,
        _write: write,
    })
}

impl SignalPipe {
    /// The fd to poll.
    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// The signals that arrived since the last call, in order.
    pub(super) fn take(&self) -> Vec<libc::c_int> {
        let mut out = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok(n @ 1..) = crate::sys::os::read(&self.read, &mut buf) {
            out.extend(buf[..n].iter().map(|&b| libc::c_int::from(b)));
        }
        out
    }
}
