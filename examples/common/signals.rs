//! What a signal asks of a server, shared by the examples (each one includes this file
//! with `#[path = "common/signals.rs"] mod signals;`; copy it along with an example).
//!
//! `SIGHUP` from a process (an operator's `kill -HUP`, systemd's `ExecReload=`, the
//! keeper) asks for an upgrade. A `SIGHUP` the kernel sent does not: the terminal went
//! away, or the process that led its session exited, which is the first generation when
//! it was started from a shell (`script`, tmux, a terminal emulator); the terminal is
//! gone either way, so serve on, as a daemon does. Taken as an upgrade request, it gives
//! two upgrades for one `kill -HUP`. `SIGTERM` and `SIGINT` ask to stop.
//!
//! Where the signal came from is known on Linux (signal-hook's `extended-siginfo`, which
//! compiles a little C and is built where it is tested). Elsewhere every `SIGHUP` counts
//! as a request: run such a server under a supervisor, not as a terminal's session
//! leader.

use std::io;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// What a signal asks of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    Upgrade,
    Stop,
    /// A `SIGHUP` from the kernel (told apart on Linux only).
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    Nothing,
}

/// One signal: what it asks, and a line for the log that says who sent it.
#[derive(Debug)]
pub struct Request {
    pub asked: Asked,
    pub line: String,
}

/// `SIGHUP`, `SIGTERM` and `SIGINT`, caught from now on (a new generation starts with
/// every signal at its default disposition, and the default for `SIGHUP` is to die:
/// create this first).
pub struct Signals(Inner);

#[cfg(target_os = "linux")]
type Inner = signal_hook::iterator::SignalsInfo<signal_hook::iterator::exfiltrator::WithOrigin>;
#[cfg(not(target_os = "linux"))]
type Inner = signal_hook::iterator::Signals;

impl Signals {
    pub fn new() -> io::Result<Signals> {
        Inner::new([SIGHUP, SIGTERM, SIGINT]).map(Signals)
    }

    /// Every signal from now on, as what it asks (blocks between them).
    pub fn forever(&mut self) -> impl Iterator<Item = Request> + '_ {
        self.0.forever().map(request)
    }
}

#[cfg(target_os = "linux")]
fn request(signal: signal_hook::low_level::siginfo::Origin) -> Request {
    use signal_hook::low_level::siginfo::Cause;
    let name = signal_hook::low_level::signal_name(signal.signal).unwrap_or("signal");
    let from = signal
        .process
        .map_or(String::new(), |p| format!(" from pid {}", p.pid));
    let (asked, line) = match signal.signal {
        SIGHUP if signal.cause == Cause::Kernel => (
            Asked::Nothing,
            "SIGHUP from the kernel (the terminal is gone): no upgrade; serving on".to_string(),
        ),
        SIGHUP => (Asked::Upgrade, format!("SIGHUP{from}: upgrading")),
        _ => (Asked::Stop, format!("{name}{from}: stopping")),
    };
    Request { asked, line }
}

#[cfg(not(target_os = "linux"))]
fn request(signal: i32) -> Request {
    let name = signal_hook::low_level::signal_name(signal).unwrap_or("signal");
    let (asked, line) = match signal {
        SIGHUP => (Asked::Upgrade, "SIGHUP: upgrading".to_string()),
        _ => (Asked::Stop, format!("{name}: stopping")),
    };
    Request { asked, line }
}
