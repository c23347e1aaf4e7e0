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
//! `examples/tcp_server.rs` is the complete version, with connection threads that hand
//! their connections to the new generation (below) and a drain before exit. Both log with `writeln!` to `stderr`, ignoring errors, for the
//! reason given in [running from a terminal](guide::terminal).
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
//! [`Upgrader::upgrade`] starts the next generation (the same binary, with a vfork-style
//! `clone` and `execve`) and passes it the fds of the registry, [`Upgrader::fds`]. The
//! new process's [`Upgrader::new`] adopts them; it starts serving, and its
//! [`Upgrader::ready`] reports ready and waits. The old process commits (it tells systemd
//! the new main pid, then the new process writes its pid file and confirms), its
//! `upgrade()` returns the new pid, its [exit notification](Upgrader::exit) fires, and it
//! drains and exits. If the new process exits, crashes, gives up or hangs instead,
//! `upgrade()` returns the reason, the old process keeps serving with everything as it
//! was, and the next upgrade can be tried. Each upgrade is recorded ([`UpgradeRecord`],
//! [`Status::upgrades`]), with what its [`Drain`] reports.
//!
//! The handshake step by step, the timeout, the [probation](Options::probation) and the
//! fd table's format: [how an upgrade works](guide::upgrade).
//!
//! # Guides
//!
//! - [How an upgrade works](guide::upgrade): the handshake, the commit, the probation,
//!   the fd table.
//! - [systemd](guide::systemd): units that follow the new pid, a reload that fails when
//!   the upgrade fails, stopping with a drain, the fd store.
//! - [Containers and the keeper](guide::keeper): one pid for the service's whole life.
//! - [The control socket](guide::control): whoever asks for an upgrade gets its result.
//! - [tokio, axum, hyper](guide::tokio).
//! - Connections in use: the [handover guide](guide::handover) and the [`handover`] module.
//! - [Coming from Go tableflip](guide::from_go): every Go call and its Rust name.
//! - [Running from a terminal](guide::terminal).
//! - [Zero downtime, measured](guide::zero_downtime), and
//!   [the benchmarks](guide::benchmarks).
//!
//! # Features
//!
//! - `keeper` (on by default): [`Keeper`].
//! - `control` (on by default): the [`control`] socket.
//!
//! `default-features = false` leaves both out; the rest of the crate is always there.
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
//!   the process leading its session exited) is no upgrade request: see [running from
//!   a terminal](guide::terminal). A signal cannot carry the upgrade's result back to
//!   whoever sent it; the control socket can ([`control::request_upgrade`]). The new
//!   process starts with an empty signal mask and every disposition at its default, so
//!   install your SIGHUP handler before anything slow. Do not reap children with
//!   `waitpid(-1)` elsewhere in the process (or set `SIGCHLD` to `SIG_IGN`) while an
//!   upgrade runs: the crate reaps its own child by pid.
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
//! - **systemd.** The pid changes at every upgrade. The crate speaks the notify
//!   protocol, and the old process, still the main one, announces the new pid at the
//!   commit, so `Type=notify` follows it (or a pid file with `PIDFile=`). An
//!   `ExecReload=` that asks over the [control socket](control) makes `systemctl
//!   reload` fail when the upgrade fails; `ExecReload=/bin/kill -HUP $MAINPID` always
//!   succeeds. See [the systemd guide](guide::systemd).
//! - **`SIGPIPE`** must stay ignored (as Rust programs start): the handshake writes to
//!   pipes whose reader may have died, and reports `EPIPE` rather than dying of it.
//! - **TLS state cannot move between processes.** A [handed-over](handover) connection
//!   is its socket and the bytes the application gives with it; a TLS session lives in
//!   the process's memory. Hand over TLS connections only if the TLS library can export
//!   the session (kernel TLS), or let them drain.
//! - **One table variable.** Linux caps one environment string at 128 KiB, which bounds
//!   the fd table to roughly 4000 sockets with short addresses.
//!
//! # Platforms
//!
//! Linux is tested: `cargo test` upgrades real processes, under load and under a real
//! systemd. macOS and FreeBSD are built in CI (the library and the examples,
//! warning-free), not run. There:
//!
//! - the new generation is started with `fork` instead of a vfork-style `clone` (the
//!   parent's page tables are copied);
//! - abstract and kernel-chosen Unix socket names do not exist (binding one fails with
//!   a clear error);
//! - there is no pidfd: a child's death is seen as EOF on its handshake pipe;
//! - handed-over state is an unlinked temporary file instead of a sealed `memfd`;
//! - the [`Keeper`] fails with [`Error::Unsupported`];
//! - macOS has no `pipe2` or `SOCK_CLOEXEC`: a pipe or socket is made close-on-exec one
//!   system call after it is created, so a process that another thread of yours starts
//!   in that instant inherits it (as with std's own pipes there).
//!
//! Everywhere else (Windows, wasm32) the crate compiles, so that a cross-platform
//! program does too, as Go tableflip does on Windows: [`Upgrader::new`] (and every
//! other call that can fail) fails with [`Error::Unsupported`], so no `Upgrader` ever
//! exists there, and the program serves without upgrades:
//!
//! ```no_run
//! # fn serve(_: std::net::TcpListener) {}
//! # fn serve_with_upgrades(_: tableflip::Upgrader) {}
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! match tableflip::Upgrader::new(tableflip::Options::new()) {
//!     Ok(upg) => serve_with_upgrades(upg),
//!     Err(tableflip::Error::Unsupported { .. }) => serve(std::net::TcpListener::bind("127.0.0.1:8080")?),
//!     Err(e) => return Err(e.into()),
//! }
//! # Ok(()) }
//! ```
//!
//! What takes Unix sockets or raw fds is absent there: the Unix socket kinds,
//! [`Named`] kinds ([`Fds::add_named`], [`Fds::take_named`]), [`Upgrader::incoming`],
//! [`Upgrader::handover`], [`Exit::wait_readable`] and `Exit`'s `AsFd`, the
//! [`control`] socket and the [`handover`] channel. On Windows, what is handed a socket
//! ([`Options::before_bind`], [`Fds::listen_with`]) gets a `BorrowedSocket` where Unix
//! has a `BorrowedFd`, so that code written against std's sockets compiles on both; on
//! targets that are neither, those two are absent too.

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

/// Guides: how to run a service that upgrades, under systemd, in a container, from Go
/// tableflip, and what it was measured to do. Documentation only (they are the Markdown
/// files of the repository's `docs/`, and the bench's `benches/README.md`), with their
/// Rust examples compiled as doctests of this crate (those of the keeper's and the
/// control socket's guides with their feature); the tokio guide's need tokio, so they
/// are compiled as doctests of the repository's `tokio-example` package instead.
#[cfg(doc)]
pub mod guide {
    #[doc = include_str!("../docs/upgrade.md")]
    pub mod upgrade {}
    #[doc = include_str!("../docs/systemd.md")]
    pub mod systemd {}
    #[cfg(any(not(doctest), feature = "keeper"))]
    #[doc = include_str!("../docs/keeper.md")]
    pub mod keeper {}
    #[cfg(any(not(doctest), feature = "control"))]
    #[doc = include_str!("../docs/control.md")]
    pub mod control {}
    #[cfg(not(doctest))]
    #[doc = include_str!("../docs/tokio.md")]
    pub mod tokio {}
    // Compiled as doctests of tokio-example (it uses tungstenite).
    #[cfg(all(unix, not(doctest)))]
    #[doc = include_str!("../docs/handover.md")]
    pub mod handover {}
    #[doc = include_str!("../docs/from-go.md")]
    pub mod from_go {}
    #[doc = include_str!("../docs/terminal.md")]
    pub mod terminal {}
    #[doc = include_str!("../docs/zero-downtime.md")]
    pub mod zero_downtime {}
    #[doc = include_str!("../benches/README.md")]
    pub mod benchmarks {}
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
