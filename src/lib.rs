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
//! use std::net::TcpListener;
//! use std::sync::Arc;
//! use signal_hook::iterator::{exfiltrator::WithOrigin, SignalsInfo};
//! use signal_hook::low_level::siginfo::Cause;
//! use tableflip::{Options, Upgrader};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // First: a new generation starts with SIGHUP at its default, which is to die.
//!     let mut signals = SignalsInfo::<WithOrigin>::new([signal_hook::consts::SIGHUP])?;
//!     let upg = Arc::new(Upgrader::new(Options::new().pid_file("/run/myapp/myapp.pid"))?);
//!
//!     // Upgrade on an operator's SIGHUP, from a thread of our own.
//!     let u = Arc::clone(&upg);
//!     std::thread::spawn(move || {
//!         for signal in signals.forever() {
//!             // Not on one the kernel sent: the terminal went away, or the process that
//!             // led its session (the first generation, started from a shell) exited.
//!             if signal.cause == Cause::Kernel {
//!                 continue;
//!             }
//!             if let Err(e) = u.upgrade() {
//!                 let _ = writeln!(std::io::stderr(), "upgrade failed: {e}"); // never panics
//!             }
//!         }
//!     });
//!
//!     // Inherited from the previous generation, or bound now.
//!     let listener: TcpListener = upg.fds().listen("127.0.0.1:8080")?;
//!     let u = Arc::clone(&upg);
//!     let server = std::thread::spawn(move || {
//!         // Until the next generation has taken over (or stop() was called).
//!         for conn in u.incoming(&listener) {
//!             if let Ok(mut conn) = conn {
//!                 let _ = writeln!(conn, "hello from pid {}", std::process::id());
//!             }
//!         }
//!     });
//!     upg.ready()?; // serving already: the previous generation commits now
//!     server.join().ok(); // then finish in-flight work, and return
//!     if let Some(Ok(pid)) = upg.status().last_upgrade().map(|u| u.result.clone()) {
//!         let _ = writeln!(std::io::stderr(), "pid {pid} took over");
//!     }
//!     Ok(())
//! }
//! ```
//!
//! `examples/tcp_server.rs` is the complete version, with connection threads and a
//! drain before exit. It logs with `writeln!` to `stderr`, ignoring errors: `eprintln!`
//! panics once the terminal it writes to is gone.
//!
//! # Connections in use
//!
//! Listeners pass to the next generation; a connection in use when the upgrade starts
//! (a WebSocket, a long poll) need not hold the old generation back until it closes.
//! The [`handover`] channel carries it to the new generation, with the bytes the old one
//! had read and its state, once the upgrade is committed: [`Upgrader::handover`] in the
//! old generation, [`Adoption::handover`] in the new one. Each connection belongs to
//! exactly one generation at every instant, whichever of the two dies when.
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
//!    pid, its [exit notification](Upgrader::exit) fires (just before: the new pid
//!    is in [`Upgrader::status`] by then, for code that ends the process when the exit
//!    fd fires), and it drains, [stops](Upgrader::stop) and exits. If the new process
//!    exits, crashes or hangs instead (before the commit, or during the probation),
//!    `upgrade()` returns the reason, the old process keeps serving with everything as
//!    it was, and the next upgrade can be tried. The [upgrade
//!    timeout](Options::upgrade_timeout) is one budget for the new process: from its
//!    start until it reports ready, and from the commit until it confirms.
//!
//! Each upgrade is recorded ([`UpgradeRecord`]: how long each phase took, how many
//! connections were handed over, drained or cut, when the old process was gone, how it
//! ended), and the last few travel from generation to generation:
//! [`Status::upgrades`], or the control socket's `status`. The old process reports its
//! drain through a [`Drain`], which also asks systemd for the time a drain at a stop
//! needs.
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
//!   listener you hand to [`Upgrader::incoming`] and on a control socket's listener,
//!   which it makes non-blocking in every generation.
//! - **Stopping a blocked `accept`.** Closing a listener does not wake a thread blocked
//!   in `accept()` on it, and `shutdown()` would shut the socket for the new generation
//!   too. Wait on the listener and the exit notification together
//!   and accept only when the listener is readable: [`Upgrader::incoming`] does, as the
//!   example above shows ([`Exit`] is `AsFd`, for your own event loop).
//! - **systemd.** The pid changes at every upgrade. When `$NOTIFY_SOCKET` is set the crate
//!   speaks the notify protocol (`MAINPID=`, `READY=1`, `RELOADING=1`, `STOPPING=1`, and
//!   `EXTEND_TIMEOUT_USEC=` while a [`Drain`] at a stop runs), and
//!   the old process, still the main one, announces the new pid at the commit, so
//!   `Type=notify` (with the default `NotifyAccess=main`) or `Type=notify-reload`
//!   follows it; otherwise use a pid file ([`Options::pid_file`]) with `PIDFile=`. An
//!   `ExecReload=` that asks over the [control socket](control) makes `systemctl reload`
//!   fail when the upgrade fails (`ExecReload=/bin/kill -HUP $MAINPID` always
//!   succeeds, and `Type=notify-reload` cannot report a failure). Sockets from socket
//!   activation (`$LISTEN_FDS`) are adopted on a first start. The commit waits up to
//!   1 s for room in systemd's queue, and `upgrade()` returns only once systemd has
//!   read it (at most 500 ms), so that the old process never exits before systemd knows
//!   its successor; a notify socket that nobody reads slows each upgrade by that much
//!   (on top of the upgrade timeout, which does not count these waits). See the README
//!   for unit files.
//! - **`SIGPIPE`** must stay ignored (as Rust programs start): the handshake writes to
//!   pipes whose reader may have died.
//! - **TLS state cannot move between processes.** A [handed-over](handover) connection
//!   is its socket and the bytes the application gives with it; a TLS session lives in
//!   the process's memory. Hand over TLS connections only if the TLS library can export
//!   the session (kernel TLS), or let them drain.
//! - **One table variable.** Linux caps one environment string at 128 KiB, which bounds
//!   the fd table to roughly 4000 sockets with short addresses.
//! - **Platforms.** Linux is tested. macOS and FreeBSD are built in CI, not run: they
//!   use `fork` instead of a vfork-style clone, have no abstract socket names and no
//!   [`Keeper`], and on macOS a pipe or socket becomes close-on-exec one call after it
//!   is made. On every other platform (Windows) the crate compiles, so that a
//!   cross-platform program does, but [`Upgrader::new`] (and every other call that can
//!   fail) fails with [`Error::Unsupported`]; what takes Unix sockets or raw fds (the
//!   control socket among them) is absent. See "Platforms" in the README.

#![cfg_attr(docsrs, feature(doc_cfg))]

mod adoption;
#[cfg(all(unix, feature = "control"))]
#[cfg_attr(docsrs, doc(cfg(all(unix, feature = "control"))))]
pub mod control;
mod drain;
mod error;
mod exit;
mod fds;
#[cfg(unix)]
#[cfg_attr(docsrs, doc(cfg(unix)))]
pub mod handover;
#[cfg(feature = "keeper")]
mod keeper;
mod kinds;
mod options;
#[cfg(unix)]
mod record_line;
mod status;
mod unix_addr;
mod upgrader;

// The platform, chosen once: everything behind the portable types above.
#[cfg_attr(unix, path = "sys/unix/mod.rs")]
#[cfg_attr(not(unix), path = "sys/unsupported.rs")]
mod sys;

pub use adoption::{Adoption, InheritedFd};
pub use drain::Drain;
pub use error::{Error, Result, WaitingFor};
#[cfg(unix)]
#[cfg_attr(docsrs, doc(cfg(unix)))]
pub use exit::Incoming;
pub use exit::{Exit, Wake};
pub use fds::{Fds, MAX_STATE_SIZE};
#[cfg(feature = "keeper")]
#[cfg_attr(docsrs, doc(cfg(feature = "keeper")))]
pub use keeper::Keeper;
#[cfg(unix)]
#[cfg_attr(docsrs, doc(cfg(unix)))]
pub use kinds::{Accept, Named, SeqpacketListener};
pub use kinds::{Address, Group, Listen};
pub use options::Options;
pub use status::{Status, UpgradeFailure, UpgradeRecord, MAX_FAILURE_MESSAGE, MAX_RECORDS};
pub use unix_addr::UnixAddr;
pub use upgrader::Upgrader;

/// Set in the environment of every generation a keeper starts (and so inherited by their
/// upgrades): its value is the keeper's pid.
#[cfg_attr(not(any(unix, feature = "keeper")), allow(dead_code))]
pub(crate) const KEEPER_VAR: &str = "TABLEFLIP_KEEPER";

/// The README's Rust examples, compiled and run as doctests (`no_run` ones compiled).
#[cfg(all(doctest, feature = "keeper", feature = "control"))]
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
        crate::sys::wire::decode(value, pid)
            .map(|t| t.map(|t| t.entries.len()))
            .map_err(|e| (e.entry, e.reason))
    }

    /// The name of the environment variable that carries the fd table.
    pub const FD_TABLE_VAR: &str = crate::sys::wire::VAR;

    /// Decodes one message of the handover channel as either end would, touching no
    /// fd. `Ok((fds, bytes))`: the number of fds it must come with, and the message
    /// encoded again (the format is canonical: the same bytes); `Err`: the reason.
    pub fn decode_handover_message(message: &[u8]) -> Result<(usize, Vec<u8>), String> {
        crate::handover::wire::decode(message)
            .map(|m| (m.fds(), crate::handover::wire::encode(&m)))
            .map_err(|e| e.to_string())
    }
}
