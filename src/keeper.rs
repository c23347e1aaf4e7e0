//! The keeper: one process with one pid for the service's whole life, in front of the
//! generations (for containers, journald and supervisors that watch one pid).
//!
//! It runs no application code. It is the generations' service manager and speaks the
//! protocol the crate already speaks to systemd: each generation gets `$NOTIFY_SOCKET`
//! naming the keeper's socket, and the keeper follows `MAINPID=`, `READY=1`,
//! `RELOADING=1`, `STOPPING=1`, `STATUS=` and `EXTEND_TIMEOUT_USEC=`, and holds the sockets sent with `FDSTORE=1`
//! (the fd store: the same generation code runs under systemd or under the keeper). It
//! forwards `SIGHUP`, `SIGTERM`, `SIGINT`, `SIGQUIT`, `SIGUSR1` and `SIGUSR2` to the
//! main generation, reaps every descendant (it is PID 1 or a child subreaper), and when
//! the main generation dies without a successor, it starts a new one on the sockets it
//! holds (`$LISTEN_FDS`), with a bounded number of restarts and a back-off. With a
//! `$NOTIFY_SOCKET` of its own (under systemd), it relays the main generation's
//! readiness and status with its own pid as the main one. What it believes, and whom, is
//! in [`Keeper`]'s docs ("Trust").
//!
//! The loop ([`state`]) starts no thread; it waits in one `poll` on its notify socket
//! ([`notify`]; [`messages`]: whom it believes), the pipe its signal handler writes to ([`signals`])
//! and the generations' pidfds ([`procs`]), and allocates per event only what reading a
//! message or `/proc` needs. The fd store is [`store`].
//!
//! Linux only (a child subreaper, pidfds, `SCM_CREDENTIALS`): elsewhere
//! [`Keeper::run`] fails with [`Error::Unsupported`](crate::Error::Unsupported).

/// One line on stderr, in one `write(2)`: the generations share the keeper's stderr, and
/// `eprintln!` writes a line in pieces that their lines can cut.
#[cfg(any(target_os = "linux", target_os = "android"))]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let line = format!("{}\n", format_args!($($arg)*));
        let _ = std::io::stderr().write_all(line.as_bytes());
    }};
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod messages;
#[cfg(any(target_os = "linux", target_os = "android"))]
mod notify;
#[cfg(any(target_os = "linux", target_os = "android"))]
mod procs;
#[cfg(any(target_os = "linux", target_os = "android"))]
mod signals;
#[cfg(any(target_os = "linux", target_os = "android"))]
mod state;
#[cfg(any(target_os = "linux", target_os = "android"))]
mod store;

use std::time::Duration;

#[cfg(not(any(target_os = "linux", target_os = "android")))]
use crate::error::Error;
use crate::error::Result;

pub(crate) use crate::KEEPER_VAR as VAR;

/// A keeper for this service: call [`Keeper::run`] first thing in `main` when asked for
/// one (the examples take `--keeper`).
///
/// ```no_run
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     if std::env::args().any(|a| a == "--keeper") {
///         // In the keeper this never returns; in the generations it starts (same
///         // binary, same arguments) it returns at once.
///         tableflip::Keeper::new().run()?;
///     }
///     let upg = tableflip::Upgrader::new(tableflip::Options::new())?;
///     // ... serve as usual.
///     # drop(upg);
///     Ok(())
/// }
/// ```
///
/// # Trust
///
/// Every process the service starts inherits `$NOTIFY_SOCKET` (a CGI script, a helper),
/// so the keeper believes nothing for being said on its socket. Each datagram comes with
/// its sender's credentials (`SCM_CREDENTIALS`, checked by the kernel), and:
///
/// - The **main generation** is the one the keeper started, and after it only the
///   generation it handed over to. Only the main generation is heard: its `READY=1`,
///   `RELOADING=1`, `STOPPING=1`, `STATUS=` and `EXTEND_TIMEOUT_USEC=` (a number, or
///   it is rejected) are relayed upstream (what systemd's
///   default `NotifyAccess=main` would take), its `FDSTORE=1` is kept, and the keeper's
///   signals go to it.
/// - It may name **one successor**: its own child, with the keeper-only field
///   `X_TABLEFLIP_SUCCESSOR=<pid>` (sent by [`Upgrader::upgrade`](crate::Upgrader::upgrade)
///   under a keeper, as soon as the new generation runs; systemd never sees it). The
///   successor becomes the main generation by the commit (`MAINPID=<successor>` from the
///   main generation) or, when the main generation died during the handoff, by claiming
///   itself (`MAINPID=<own pid>`, as a generation whose parent died does). A pending
///   restart is then cancelled: one generation is main at a time.
/// - A `MAINPID=` outside `1..=2147483647`, naming a pid that is not a live descendant
///   of the keeper, or from anyone else, is rejected; so is everything from any other
///   process. A rejected message is logged on stderr with the sender's pid and what it
///   asked (at most 20 lines in 10 s), and changes nothing. Every pid the keeper
///   signals was checked in `/proc` first and is held by a pidfd from then on.
/// - The fd store takes fds from the main generation only, under names that systemd
///   would take (printable ASCII without `:`, at most 255 bytes), up to half the soft fd
///   limit counting the keeper's own fds; `FDSTOREREMOVE=1` drops a name. A rejected
///   store is logged and its fds closed.
/// - The notify socket has a random abstract name (`@tableflip-keeper/<pid>/<128 random
///   bits>`), bound before it is published: two keepers in one network namespace (PID 1
///   of two containers of one pod) do not collide, and nobody can take the name first.
///
/// Limits: a descendant with `CAP_SYS_ADMIN` can send credentials naming another pid (as
/// it can to systemd): run the generations without it. A new generation whose parent
/// is killed after starting it but before naming it (the moment between the new
/// generation's `execve` and the announcement, which follows it at once) is refused when
/// it claims the service: the keeper starts the service again, and that orphan serves
/// beside it until the next stop.
///
/// # Stopping
///
/// `SIGTERM`, `SIGINT` or `SIGQUIT` to the keeper (or a restart limit reached, or the main
/// generation exiting with status 0) stops the service: the signal goes to the main
/// generation, and once that has exited every other descendant gets `SIGTERM` (older
/// generations still draining, background jobs). When the
/// [stop timeout](Keeper::stop_timeout) has passed, whatever is left gets `SIGKILL`: as
/// PID 1, every process of the PID namespace; as a child subreaper (not PID 1), every
/// descendant found in `/proc`. Then the keeper exits with the main generation's status
/// (128 + the signal if it was killed). A main generation that drains at the stop may
/// ask for more time (`EXTEND_TIMEOUT_USEC=`, which a [`Drain`](crate::Drain) sends): the
/// keeper relays it to its own service manager (systemd), and, when it has one, lets
/// its stop timeout run until that time if it is later, as systemd does; without one
/// (a container's PID 1) the stop timeout stays the bound. What the subreaper cannot reach: a process that
/// a descendant had another service start (`systemd-run`, `at`, a daemon over IPC), and
/// processes it may not signal (another user's, as a non-root keeper). Under systemd the
/// unit's cgroup covers those.
///
/// # Signals and threads
///
/// `Keeper::run` installs a handler for the forwarded signals and `SIGCHLD` that writes
/// to a pipe (see the `signals` module), so it works when other threads were started
/// before it (a logger, a runtime): no signal mask has to be shared. It takes over those
/// signals' dispositions in this process.
///
/// Linux only (it needs a child subreaper and pidfds); elsewhere `run` fails. `/proc`
/// must be the one of the keeper's PID namespace (as in any container).
#[derive(Debug, Clone)]
pub struct Keeper {
    restarts: usize,
    window: Duration,
    backoff: Duration,
    max_backoff: Duration,
    stop_timeout: Duration,
    takeover_timeout: Duration,
}

impl Default for Keeper {
    fn default() -> Self {
        Keeper {
            restarts: 5,
            window: Duration::from_secs(60),
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            stop_timeout: Duration::from_secs(25),
            takeover_timeout: Duration::from_secs(60),
        }
    }
}

impl Keeper {
    /// The defaults: at most 5 restarts within 60 s, waiting 100 ms before the first and
    /// doubling up to 5 s; a stop timeout of 25 s; 60 s for a successor to take over.
    pub fn new() -> Keeper {
        Keeper::default()
    }

    /// Gives up (exits with a non-zero status) when the main generation had to be
    /// started again more than `restarts` times within `within`.
    pub fn restart_limit(mut self, restarts: usize, within: Duration) -> Self {
        self.restarts = restarts;
        self.window = within;
        self
    }

    /// How long to wait before starting a generation again after a crash: `first`,
    /// doubling with each restart within the window, up to `max`.
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.backoff = first;
        self.max_backoff = max;
        self
    }

    /// How long a stop may take before the keeper sends `SIGKILL` to every process left
    /// (see "Stopping"). Set it a little below the time whoever stops the keeper allows:
    /// Kubernetes' `terminationGracePeriodSeconds` (30 s by default), `docker stop -t`
    /// (10 s by default: use 8 s), systemd's `TimeoutStopSec=` (90 s by default). Then the
    /// keeper, not the runtime, ends what is left, and exits with the main generation's
    /// status. Default: 25 s.
    pub fn stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }

    /// When the main generation dies during an upgrade, how long its announced successor
    /// may take to claim the service (it does once it is ready) before the keeper kills
    /// it and starts the service again. Default: 60 s, the default
    /// [upgrade timeout](crate::Options::upgrade_timeout).
    pub fn takeover_timeout(mut self, timeout: Duration) -> Self {
        self.takeover_timeout = timeout;
        self
    }

    /// Turns this process into the keeper and starts the first generation: this binary
    /// (`argv[0]`, resolved as for an upgrade) with the same arguments. Never returns in
    /// the keeper. In a generation a keeper started (or an upgrade of one), returns
    /// `Ok(())` at once, so the same `main` runs in both.
    pub fn run(self) -> Result<()> {
        if std::env::var_os(VAR).is_some() {
            return Ok(());
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            let mut keeper = state::Keeping::new(self)?;
            let code = keeper.run();
            std::process::exit(code)
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        Err(Error::Unsupported {
            op: "Keeper::run",
            needs: "Linux",
        })
    }
}
