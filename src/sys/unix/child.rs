//! The only code that runs between fork and exec.
//!
//! Read this module line by line. Between the clone and `execve` the child:
//! - allocates nothing, takes no lock, cannot panic (no indexing, no arithmetic that
//!   can overflow, no `Option::unwrap`), and touches only the buffers prepared for it;
//! - makes only async-signal-safe calls: `sigaction`, `fcntl`, `dup2`, `close`, `getpid`
//!   (raw syscall), `chdir`, `pthread_sigmask`, `execve`, `write`, `_exit` (and, on
//!   Linux, libc's `SIGRTMAX`, which reads a variable);
//! - on failure, writes the step that failed and its errno (two native-endian `i32`s) to
//!   the error pipe and exits with 127: each step hands its failure back, and one
//!   function (`report`) writes it and exits;
//! - retries nothing on `EINTR`: every signal is blocked until the last step, and by then
//!   every disposition is the default, so no handler can interrupt a call.
//!
//! On Linux the child is started with `clone(CLONE_VM | CLONE_VFORK)`: it borrows the
//! parent's memory (no page tables are copied, so spawning costs the same with 10 MiB or
//! 40 GiB resident) and the calling thread is suspended until the child has called
//! `execve` or `_exit`. Because the memory is shared, the only memory the child writes is
//! its own stack and the pid slot of its environment block, which the parent does not
//! read while it is suspended. All signals are blocked across the clone so that no
//! handler of the parent runs on the child's stack, and the child resets every
//! disposition to `SIG_DFL` before it unblocks them. Other Unixes (macOS, FreeBSD) use
//! plain `fork()`: the child runs the same code on a copy of the memory, with signals
//! blocked the same way, and the same rules hold because the parent may have threads.

use std::convert::Infallible;
use std::io;
use std::os::raw::{c_char, c_int, c_void};
use std::os::unix::io::RawFd;

/// Everything the child needs, prepared by the parent before the clone.
///
/// All pointers stay valid until [`spawn`] returns: the parent owns the buffers.
pub(crate) struct ChildArgs {
    /// NUL-terminated path of the executable.
    pub(crate) path: *const c_char,
    /// NULL-terminated argv.
    pub(crate) argv: *const *const c_char,
    /// NULL-terminated envp.
    pub(crate) envp: *const *const c_char,
    /// NUL-terminated working directory.
    pub(crate) cwd: *const c_char,
    /// The fds whose `FD_CLOEXEC` flag is cleared (passed at the same number).
    pub(crate) fds: *const RawFd,
    /// How many fds `fds` points to.
    pub(crate) nfds: usize,
    /// `(from, to)` pairs: the fd `from` is passed at the number `to` (`$LISTEN_FDS`
    /// wants its fds at 3, 4, ...). No `to` is one of `fds`, nor the error pipe.
    pub(crate) moves: *const [RawFd; 2],
    /// How many pairs `moves` points to.
    pub(crate) nmoves: usize,
    /// A number above every fd involved (`fds`, both sides of `moves`, `err_fd`): the
    /// moves go through `scratch`, `scratch + 1`, ... so that no `from` is overwritten
    /// before it is copied. `-1` when every `to` is above every `from` (and `err_fd`):
    /// then each fd is placed with one `dup2`.
    pub(crate) scratch: RawFd,
    /// Ten bytes inside one of the envp strings that receive the child's pid in decimal;
    /// null if no variable names the child's pid.
    pub(crate) pid_slot: *mut u8,
    /// Write end of a close-on-exec pipe: the child writes the step that failed and its
    /// errno there if it fails.
    pub(crate) err_fd: RawFd,
}

/// The step that failed, as reported on the error pipe (before the errno).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub(crate) enum Step {
    /// Clearing `FD_CLOEXEC` on a passed fd, or moving one.
    PassFd = 1,
    /// Entering the initial working directory.
    Chdir = 2,
    /// `execve` itself.
    Exec = 3,
}

impl Step {
    /// The step named by a number from the error pipe.
    pub(crate) fn from_raw(n: i32) -> Option<Step> {
        [Step::PassFd, Step::Chdir, Step::Exec]
            .into_iter()
            .find(|s| *s as i32 == n)
    }
}

/// Width of [`ChildArgs::pid_slot`].
const PID_WIDTH: usize = crate::sys::wire::PID_WIDTH;

/// Stack for the vfork-style child. It only calls a handful of libc wrappers.
#[cfg(any(target_os = "linux", target_os = "android"))]
const STACK_SIZE: usize = 64 * 1024;

/// Starts the child and returns its pid once it has exec'd or failed.
///
/// # Safety
/// Every pointer in `args` must be valid as documented on [`ChildArgs`], and the buffers
/// must not be touched by another thread until this returns.
pub(crate) unsafe fn spawn(args: &ChildArgs) -> io::Result<libc::pid_t> {
    // Block every signal so that no handler runs in the child while it shares our
    // memory (and none runs in this thread between clone and the mask's restoration).
    // SAFETY: `all` and `old` are plain sigset_t values on our stack.
    let (all, mut old) = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        (all, std::mem::zeroed::<libc::sigset_t>())
    };
    // SAFETY: valid sigset pointers.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: the caller guarantees `args`; `raw_spawn` is only ever called here.
    let result = unsafe { raw_spawn(args) };
    // SAFETY: restoring the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    result
}

#[cfg(any(target_os = "linux", target_os = "android"))]
unsafe fn raw_spawn(args: &ChildArgs) -> io::Result<libc::pid_t> {
    // SAFETY: an anonymous private mapping; checked for MAP_FAILED below.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            STACK_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // Stacks grow down on every architecture Linux runs Rust on but parisc/metag,
    // neither of which Rust supports.
    // SAFETY: one past the end of the mapping, 16-byte aligned since mmap is page aligned.
    let top = unsafe { stack.cast::<u8>().add(STACK_SIZE) }.cast::<c_void>();
    let arg = args as *const ChildArgs as *mut c_void;
    // SAFETY: CLONE_VFORK suspends this thread until the child execs or exits, so `args`
    // and `stack` outlive the child's use of them; the child only runs `child_main`.
    let pid = unsafe {
        libc::clone(
            child_main,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            arg,
        )
    };
    let err = io::Error::last_os_error();
    // SAFETY: the mapping made above; the child no longer uses it (it exec'd or exited).
    unsafe { libc::munmap(stack, STACK_SIZE) };
    if pid == -1 {
        return Err(err);
    }
    Ok(pid)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
unsafe fn raw_spawn(args: &ChildArgs) -> io::Result<libc::pid_t> {
    // SAFETY: the child only runs `child_main`, which is async-signal-safe.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            // `arg` points to the caller's ChildArgs, copied into our address space by fork.
            child_main(args as *const ChildArgs as *mut c_void);
            // SAFETY: child_main never returns, but be explicit.
            unsafe { libc::_exit(127) }
        }
        pid => Ok(pid),
    }
}

/// The child. Never returns: it execs, or reports the step that failed and `_exit`s.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `&ChildArgs` passed to clone/fork; the parent keeps it alive.
    let args = unsafe { &*(arg as *const ChildArgs) };
    let failed = match prepare_and_exec(args) {
        Ok(never) => match never {},
        Err(failed) => failed,
    };
    report(args, failed)
}

/// A step that failed, and the errno it failed with.
struct Failure {
    step: Step,
    errno: c_int,
}

/// The steps in order, up to `execve`. Returns the first that fails, with its errno
/// read at once: nothing runs between a failing call and the reading of its errno.
fn prepare_and_exec(args: &ChildArgs) -> Result<Infallible, Failure> {
    // 1. Every signal disposition back to the default, so no parent handler can run here
    //    once signals are unblocked, and ignored signals are not ignored by the new program.
    reset_signals();

    // 2. Clear FD_CLOEXEC on the fds being passed (F_SETFD: a descriptor flag, private to
    //    this process; status flags such as O_NONBLOCK are not touched).
    let mut i: usize = 0;
    while i < args.nfds {
        // SAFETY: `fds` has `nfds` elements.
        let fd = unsafe { *args.fds.add(i) };
        // SAFETY: fcntl on an integer fd is async-signal-safe.
        check(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, Step::PassFd)?;
        i = i.wrapping_add(1);
    }

    // 2b. Move the fds that are passed at another number (dup2 clears FD_CLOEXEC on the
    //     copy).
    if args.scratch < 0 {
        move_fds(args)?;
    } else {
        move_fds_through_scratch(args)?;
    }

    // 3. Our pid into the environment (the fd table's pid slot, or `LISTEN_PID`), so that
    //    only this process takes those fds for its own.
    write_pid(args);

    // 4. The initial working directory.
    // SAFETY: NUL-terminated string prepared by the parent.
    check(unsafe { libc::chdir(args.cwd) }, Step::Chdir)?;

    // 5. An empty signal mask, then the new program.
    // SAFETY: a zeroed sigset_t on our stack, emptied.
    let mut empty: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid sigset pointer.
    unsafe { libc::sigemptyset(&mut empty) };
    // SAFETY: valid sigset pointer.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) };
    // SAFETY: NUL-terminated path and NULL-terminated arrays prepared by the parent.
    unsafe { libc::execve(args.path, args.argv, args.envp) };
    Err(failure(Step::Exec))
}

/// Step 1: every disposition but `SIGKILL`'s and `SIGSTOP`'s to `SIG_DFL`.
fn reset_signals() {
    // SAFETY: a zeroed sigaction is SIG_DFL with an empty mask and no flags.
    let mut dfl: libc::sigaction = unsafe { std::mem::zeroed() };
    dfl.sa_sigaction = libc::SIG_DFL;
    let last = last_signal();
    let mut sig: c_int = 1;
    while sig <= last {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: async-signal-safe; errors (reserved signals) are ignored on purpose.
            unsafe { libc::sigaction(sig, &dfl, std::ptr::null_mut()) };
        }
        sig = sig.wrapping_add(1);
    }
}

/// Step 2b when every place is above every fd involved (`scratch` is `-1`): each fd
/// straight to its place with one `dup2`.
fn move_fds(args: &ChildArgs) -> Result<(), Failure> {
    let mut k: usize = 0;
    while k < args.nmoves {
        // SAFETY: `moves` has `nmoves` elements.
        let [from, to] = unsafe { *args.moves.add(k) };
        // SAFETY: dup2 on integer fds is async-signal-safe; `to` is above every fd the
        // child passes or reports on, and this is the child's own fd table.
        check(unsafe { libc::dup2(from, to) }, Step::PassFd)?;
        k = k.wrapping_add(1);
    }
    Ok(())
}

/// Step 2b otherwise: first each fd to its scratch number (above every fd involved, so
/// nothing is overwritten before it is copied), then from there to its place, closing
/// the scratch copy.
fn move_fds_through_scratch(args: &ChildArgs) -> Result<(), Failure> {
    let mut k: usize = 0;
    while k < args.nmoves {
        // SAFETY: `moves` has `nmoves` elements.
        let [from, _] = unsafe { *args.moves.add(k) };
        let tmp = args.scratch.wrapping_add(k as RawFd);
        // SAFETY: dup2 on integer fds is async-signal-safe; `tmp` is above every fd the
        // child passes or reports on, and this is the child's own fd table.
        check(unsafe { libc::dup2(from, tmp) }, Step::PassFd)?;
        k = k.wrapping_add(1);
    }
    k = 0;
    while k < args.nmoves {
        // SAFETY: `moves` has `nmoves` elements.
        let [_, to] = unsafe { *args.moves.add(k) };
        let tmp = args.scratch.wrapping_add(k as RawFd);
        // SAFETY: as above; `to` is no fd of `fds`, nor the error pipe.
        check(unsafe { libc::dup2(tmp, to) }, Step::PassFd)?;
        // SAFETY: closing the child's own scratch copy, made above.
        unsafe { libc::close(tmp) };
        k = k.wrapping_add(1);
    }
    Ok(())
}

/// Step 3: our pid in decimal into the `PID_WIDTH` bytes of `pid_slot`, if there is one.
fn write_pid(args: &ChildArgs) {
    // SAFETY: a raw syscall, immune to libc's pid caching in a vfork-style child.
    let mut pid = unsafe { getpid() } as u32;
    let mut j = if args.pid_slot.is_null() {
        0
    } else {
        PID_WIDTH
    };
    while j > 0 {
        j = j.wrapping_sub(1);
        // SAFETY: `pid_slot` has PID_WIDTH bytes, and j < PID_WIDTH.
        unsafe { *args.pid_slot.add(j) = b'0'.wrapping_add((pid % 10) as u8) };
        pid /= 10;
    }
}

/// `Err` with `step` and this thread's errno if a libc call returned `-1`.
fn check(rc: c_int, step: Step) -> Result<(), Failure> {
    if rc == -1 {
        Err(failure(step))
    } else {
        Ok(())
    }
}

/// `step` with this thread's errno; no allocation (an OS error is stored inline).
fn failure(step: Step) -> Failure {
    let errno = io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EINVAL);
    Failure { step, errno }
}

/// The one way out on failure: the step and its errno over the error pipe, then exit
/// with 127.
fn report(args: &ChildArgs, failed: Failure) -> ! {
    let [a, b, c, d] = (failed.step as i32).to_ne_bytes();
    let [e, f, g, h] = failed.errno.to_ne_bytes();
    let bytes = [a, b, c, d, e, f, g, h];
    // SAFETY: writing 8 bytes from our stack to the error pipe; the result does not matter
    // (the parent treats a missing report as a generic failure). A pipe write of 8 bytes
    // is atomic.
    unsafe { libc::write(args.err_fd, bytes.as_ptr().cast(), bytes.len()) };
    // SAFETY: _exit is async-signal-safe and runs no atexit handlers.
    unsafe { libc::_exit(127) }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
unsafe fn getpid() -> libc::pid_t {
    // SAFETY: SYS_getpid takes no arguments.
    unsafe { libc::syscall(libc::SYS_getpid) as libc::pid_t }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
unsafe fn getpid() -> libc::pid_t {
    // SAFETY: getpid is async-signal-safe and has no caching issue after fork.
    unsafe { libc::getpid() }
}

/// The highest signal number: the child resets `1..=last_signal()`.
///
/// Linux: `SIGRTMAX`, which libc reads from a variable (64 on most architectures, 127
/// on MIPS); no lock, no allocation.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn last_signal() -> c_int {
    libc::SIGRTMAX()
}

/// The highest signal number: the child resets `1..=last_signal()`.
///
/// Elsewhere libc names no `SIGRTMAX`, so every number a `sigset_t` can hold: no
/// signal can exist outside it, and `sigaction` refuses the numbers above the real
/// range (`EINVAL`, ignored). FreeBSD: 128 (`_SIG_MAXSIG`, real-time signals 65-126
/// included); macOS: 32 (`NSIG`, signals 1-31).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn last_signal() -> c_int {
    const BITS: usize = std::mem::size_of::<libc::sigset_t>() * 8;
    BITS as c_int
}
