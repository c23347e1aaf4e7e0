//! Graceful, zero-downtime process upgrades.
//!
//! A running service replaces its own code and configuration without dropping a
//! connection: it starts a new copy of its binary, hands it the listening sockets (and
//! any other fds), waits until the new process says it is ready, and only then steps
//! aside. This is a Rust port of Cloudflare's Go [`tableflip`]: synchronous, no runtime,
//! no background threads, `libc` and `rustix` only.
//!
//! [`tableflip`]: https://github.com/cloudflare/tableflip
//!
//! # Example
//!
//! ```no_run
//! use std::io::Write;
//! use std::sync::Arc;
//! use signal_hook::iterator::{exfiltrator::WithOrigin, SignalsInfo};
//! use signal_hook::low_level::siginfo::Cause;
//! use tableflip::{Options, Upgrader, Wake};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // First: a new generation starts with SIGHUP at its default, which is to die.
//!     let mut signals = SignalsInfo::<WithOrigin>::new([signal_hook::consts::SIGHUP])?;
//!     let upg = Arc::new(Upgrader::new(Options::new().pid_file("/run/myapp/myapp.pid"))?);
//!
//!     // Upgrade on SIGHUP, from a thread of our own (signal-hook, or any other way).
//!     let u = Arc::clone(&upg);
//!     std::thread::spawn(move || {
//!         for signal in signals.forever() {
//!             // Not on one the kernel sent: the terminal went away, or the process that
//!             // led its session (the first generation, started from a shell) exited.
//!             let line = match signal.cause {
//!                 Cause::Kernel => "SIGHUP from the kernel: not an upgrade request".into(),
//!                 _ => match u.upgrade() {
//!                     Ok(pid) => format!("upgraded: pid {pid} serves now"),
//!                     Err(e) => format!("upgrade failed: {e}"),
//!                 },
//!             };
//!             let _ = writeln!(std::io::stderr(), "{line}"); // unlike eprintln!, never panics
//!         }
//!     });
//!
//!     // Inherited from the previous generation, or bound now.
//!     let listener = upg.fds().listen_tcp("127.0.0.1:8080")?;
//!     listener.set_nonblocking(true)?; // in every generation alike: see "Limitations"
//!
//!     // Serve first, then report ready (the previous generation commits the upgrade).
//!     let u = Arc::clone(&upg);
//!     let server = std::thread::spawn(move || {
//!         // Until the next generation has taken over (or stop() was called).
//!         while u.wait_readable(&listener, None) == Wake::Readable {
//!             // Accept a bounded batch, so a flood cannot starve the exit check.
//!             for _ in 0..64 {
//!                 match listener.accept() {
//!                     Ok((mut conn, _)) => {
//!                         let _ = conn.set_nonblocking(false); // its own description
//!                         let _ = writeln!(conn, "hello from pid {}", std::process::id());
//!                     }
//!                     Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
//!                     Err(e) => {
//!                         // EMFILE and friends: back off.
//!                         let _ = writeln!(std::io::stderr(), "accept: {e}");
//!                         std::thread::sleep(std::time::Duration::from_millis(10));
//!                         break;
//!                     }
//!                 }
//!             }
//!         }
//!     });
//!     upg.ready()?;
//!     server.join().ok(); // then finish in-flight work, and return
//!     Ok(())
//! }
//! ```
//!
//! `examples/tcp_server.rs` is the complete version, with connection threads and a
//! drain before exit. It logs with `writeln!` to `stderr`, ignoring errors: `eprintln!`
//! panics once the terminal it writes to is gone.
//!
//! # Anatomy of an upgrade
//!
//! 1. [`Upgrader::upgrade`] resolves the executable (`argv[0]` against the initial
//!    working directory and `$PATH`, at upgrade time), builds argv, envp and the fd
//!    table, and starts the new process with a vfork-style `clone` (Linux) and
//!    `execve`. Only the fds in the registry, plus three handshake pipes, cross over;
//!    everything else the crate holds is close-on-exec.
//! 2. The new process calls [`Upgrader::new`], which finds the fd table in
//!    `$TABLEFLIP_FDS` (only if it is addressed to its own pid), takes its sockets from
//!    [`Upgrader::fds`], starts serving and calls [`Upgrader::ready`], which reports
//!    ready and waits for the old process to decide.
//! 3. The old process keeps the new one on [probation](Options::probation) if asked,
//!    then commits: it tells systemd the new main pid, and tells the new process, which
//!    writes its pid file and confirms. The old process's `upgrade()` returns the new
//!    pid, its [exit fd](Upgrader::exit_fd) becomes readable (just before), and it
//!    drains and exits. If the new process exits, crashes or hangs instead (before the
//!    commit, or during the probation), `upgrade()` returns the reason, the old process
//!    keeps serving with everything as it was, and the next upgrade can be tried.
//!
//! # Limitations
//!
//! - **Threads.** An upgrade forks from the calling thread only. Other threads keep
//!   running; nothing they do can leak an fd to the new process (the crate's fds are
//!   close-on-exec), but fds *your* code opens without `O_CLOEXEC` do leak. Rust's std
//!   opens everything close-on-exec.
//! - **Signals.** The crate installs no signal handler: decide yourself what triggers
//!   an upgrade (SIGHUP through `signal-hook`, the [control socket](control), ...). A
//!   SIGHUP that the kernel sent (`si_code` `SI_KERNEL`: the terminal went away, or
//!   the process leading its session exited) is no upgrade request: a first generation
//!   started from a shell leads the session, and when it exits after an upgrade the
//!   kernel sends SIGHUP to the new one. A signal cannot carry the upgrade's result back
//!   to whoever sent it; the control socket can ([`control::request_upgrade`]). The new process
//!   starts with an empty signal mask and every disposition at its default. Do not
//!   reap children with `waitpid(-1)` elsewhere in the process (or set `SIGCHLD` to
//!   `SIG_IGN`) while an upgrade runs: the crate reaps its own child by pid.
//! - **`O_NONBLOCK` is shared.** It is a flag of the open file description, which
//!   both generations share: setting a passed listener non-blocking in one generation
//!   sets it in the other. Pick one mode for every generation (the examples use
//!   non-blocking accept behind `poll`). The crate never changes it, except on a
//!   [control socket](control)'s listener, which it makes non-blocking in every
//!   generation.
//! - **Stopping a blocked `accept`.** Closing a listener does not wake a thread blocked
//!   in `accept()` on it, and `shutdown()` would shut the socket for the new generation
//!   too. Wait on the listener and the exit notification together
//!   ([`Upgrader::wait_readable`], or [`Upgrader::exit_fd`] in your own event loop) and
//!   accept only when the listener is readable, as the example above does.
//! - **systemd.** The pid changes at every upgrade. When `$NOTIFY_SOCKET` is set the crate
//!   speaks the notify protocol (`MAINPID=`, `READY=1`, `RELOADING=1`, `STOPPING=1`), and
//!   the old process, still the main one, announces the new pid at the commit, so
//!   `Type=notify` (with the default `NotifyAccess=main`) or `Type=notify-reload`
//!   follows it; otherwise use a pid file ([`Options::pid_file`]) with `PIDFile=`. An
//!   `ExecReload=` that asks over the [control socket](control) makes `systemctl reload`
//!   fail when the upgrade fails (`ExecReload=/bin/kill -HUP $MAINPID` always
//!   succeeds, and `Type=notify-reload` cannot report a failure). Sockets from socket
//!   activation (`$LISTEN_FDS`) are adopted on a first start. The commit waits up to
//!   1 s for room in systemd's queue, and `upgrade()` returns only once systemd has
//!   read it (at most 500 ms), so that the old process never exits before systemd knows
//!   its successor; a notify socket that nobody reads slows each upgrade by that much. See the README for unit
//!   files.
//! - **`SIGPIPE`** must stay ignored (as Rust programs start): the handshake writes to
//!   pipes whose reader may have died.
//! - **One table variable.** Linux caps one environment string at 128 KiB, which bounds
//!   the fd table to roughly 4000 sockets with short addresses.
//! - **Platforms.** Linux is tested. macOS and FreeBSD are built in CI, not run: they
//!   use `fork` instead of a vfork-style clone, have no abstract socket names and no
//!   [`Keeper`], and on macOS a pipe or socket becomes close-on-exec one call after it
//!   is made. On every other platform (Windows) the crate compiles, so that a
//!   cross-platform program does, but [`Upgrader::new`] (and every other call that can
//!   fail) fails with [`Error::Unsupported`]; what takes Unix sockets or raw fds (the
//!   control socket among them) is absent. See "Platforms" in the README.

mod adoption;
#[cfg(unix)]
mod batch;
#[cfg(unix)]
mod child;
#[cfg(unix)]
pub mod control;
mod error;
#[cfg(unix)]
mod fds;
#[cfg(unix)]
mod handshake;
#[cfg(unix)]
mod inherit;
#[cfg(unix)]
mod keeper;
mod options;
#[cfg(unix)]
mod os;
#[cfg(unix)]
mod pidfile;
mod portable;
#[cfg(unix)]
mod process;
#[cfg(unix)]
mod safe_dir;
#[cfg(unix)]
mod socket;
#[cfg(unix)]
mod spawn;
#[cfg(unix)]
mod state;
#[cfg(unix)]
mod status;
#[cfg(unix)]
mod systemd;
mod unix_addr;
#[cfg(not(unix))]
mod unsupported;
#[cfg(unix)]
mod upgrader;
#[cfg(unix)]
mod wire;

pub use adoption::{Adoption, InheritedFd};
pub use error::{Error, Result};
pub use options::Options;

#[cfg(unix)]
pub use fds::{Address, Fds};
#[cfg(unix)]
pub use keeper::Keeper;
#[cfg(unix)]
pub use state::MAX_STATE_SIZE;
pub use unix_addr::UnixAddr;
#[cfg(unix)]
pub use upgrader::{ExitHandle, Upgrader, Wake};

#[cfg(not(unix))]
pub use unsupported::{Address, ExitHandle, Fds, Keeper, Upgrader, Wake, MAX_STATE_SIZE};

/// The README's Rust examples, compiled and run as doctests (`no_run` ones compiled).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// Guides, in the documentation only. Their examples need crates this one does not
/// depend on (tokio), so they are compiled as doctests of the repository's
/// `tokio-example` package instead of this crate's.
#[cfg(all(doc, not(doctest)))]
pub mod guide {
    #[doc = include_str!("../docs/tokio.md")]
    pub mod tokio {}
}

/// Not public API: entry points for the fuzzer and benchmarks. No stability promise.
#[cfg(unix)]
#[doc(hidden)]
pub mod __private {
    /// Decodes an fd table value as [`Upgrader::new`](crate::Upgrader::new) would in a
    /// process with pid `pid`, touching no fd. `Ok(None)`: addressed to another process;
    /// `Ok(Some(n))`: `n` entries; `Err`: the entry at fault and the reason.
    pub fn decode_fd_table(value: &[u8], pid: u32) -> Result<Option<usize>, (String, String)> {
        crate::wire::decode(value, pid)
            .map(|t| t.map(|t| t.entries.len()))
            .map_err(|e| (e.entry, e.reason))
    }

    /// The name of the environment variable that carries the fd table.
    pub const FD_TABLE_VAR: &str = crate::wire::VAR;
}
