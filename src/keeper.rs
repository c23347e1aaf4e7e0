//! The keeper: one process with one pid for the service's whole life, in front of the
//! generations (for containers, journald and supervisors that watch one pid).
//!
//! It runs no application code. It is the generations' service manager and speaks the
//! protocol the crate already speaks to systemd: each generation gets `$NOTIFY_SOCKET`
//! naming the keeper's socket, and the keeper follows `MAINPID=`, `READY=1`,
//! `RELOADING=1`, `STOPPING=1` and `STATUS=`, and holds the sockets sent with `FDSTORE=1`
//! (the fd store: the same generation code runs under systemd or under the keeper). It
//! forwards `SIGHUP`, `SIGTERM`, `SIGINT`, `SIGQUIT`, `SIGUSR1` and `SIGUSR2` to the
//! main generation, reaps every descendant (it is PID 1 or a child subreaper), and when
//! the main generation dies without a successor, it starts a new one on the sockets it
//! holds (`$LISTEN_FDS`), with a bounded number of restarts and a back-off. With a
//! `$NOTIFY_SOCKET` of its own (under systemd), it relays the main generation's
//! readiness and status with its own pid as the main one. What it believes, and whom, is
//! in [`Keeper`]'s docs ("Trust").
//!
//! The loop starts no thread; it waits in one `poll` on its notify socket, the pipe its
//! signal handler writes to ([`signals`]) and the generations' pidfds ([`procs`]), and
//! allocates per event only what reading a message or `/proc` needs.
//!
//! Linux only (a child subreaper, pidfds, `SCM_CREDENTIALS`): elsewhere
//! [`Keeper::run`] fails with [`Error::Unsupported`](crate::Error::Unsupported).

#[cfg(any(target_os = "linux", target_os = "android"))]
mod procs;
#[cfg(any(target_os = "linux", target_os = "android"))]
mod signals;
#[cfg(any(target_os = "linux", target_os = "android"))]
mod store;

use std::time::Duration;

#[cfg(not(any(target_os = "linux", target_os = "android")))]
use crate::error::Error;
use crate::error::Result;

/// Set in the environment of every generation a keeper starts (and so inherited by
/// their upgrades): its value is the keeper's pid.
pub(crate) const VAR: &str = "TABLEFLIP_KEEPER";

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
///   `RELOADING=1`, `STOPPING=1` and `STATUS=` are relayed upstream (what systemd's
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
/// (128 + the signal if it was killed). What the subreaper cannot reach: a process that
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
            let mut keeper = linux::State::new(self)?;
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

#[cfg(any(target_os = "linux", target_os = "android"))]
mod linux {
    /// One line on stderr, in one `write(2)`: the generations share the keeper's stderr,
    /// and `eprintln!` writes a line in pieces that their lines can cut.
    macro_rules! say {
        ($($arg:tt)*) => {{
            use std::io::Write as _;
            let line = format!("{}\n", format_args!($($arg)*));
            let _ = std::io::stderr().write_all(line.as_bytes());
        }};
    }

    use std::collections::VecDeque;
    use std::io;
    use std::mem::MaybeUninit;
    use std::os::unix::io::{AsFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;
    use std::time::{Duration, Instant};

    use rustix::net::{
        AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
        SocketAddrUnix, SocketType,
    };
    use rustix::process::WaitOptions;

    use super::procs::{self, Verified};
    use super::signals::{self, SignalPipe};
    use super::store::{self, Store};
    use super::{Keeper, VAR};
    use crate::error::{clip, Error, Result};
    use crate::os;
    use crate::spawn::{PidVar, Program};
    use crate::systemd::{Notifier, SUCCESSOR_FIELD};

    /// The signals the keeper forwards to the main generation.
    const FORWARDED: [libc::c_int; 6] = [
        libc::SIGHUP,
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ];
    /// Once the stop timeout has passed, how often what is left is killed again (a
    /// process may fork while it is killed).
    const KILL_AGAIN: Duration = Duration::from_millis(100);
    /// At most this many rejection lines per [`COMPLAINT_WINDOW`].
    const COMPLAINTS: u32 = 20;
    const COMPLAINT_WINDOW: Duration = Duration::from_secs(10);
    /// How long a successor's claim waits for the main generation to finish exiting.
    const CLAIM_WAIT: Duration = Duration::from_millis(100);
    /// The most of a rejected message that is logged.
    const LOGGED_BYTES: usize = 200;

    /// A stop under way.
    #[derive(Debug)]
    struct Stop {
        /// What the main generation was told (`SIGTERM`, `SIGINT` or `SIGQUIT`): a
        /// generation that becomes the main one during the stop is told too.
        signal: libc::c_int,
        deadline: Instant,
        /// Whether the rest got `SIGTERM` (once the main generation is gone).
        rest_told: bool,
        /// When what is left was last killed, after the deadline.
        killed: Option<Instant>,
    }

    /// Rejection lines, rate-limited.
    #[derive(Debug)]
    struct Complaints {
        since: Instant,
        lines: u32,
        dropped: u64,
    }

    /// The keeper at work.
    pub(super) struct State {
        config: Keeper,
        program: Program,
        pid: u32,
        socket: OwnedFd,
        target: String,
        signals: SignalPipe,
        /// The keeper's own systemd, if any.
        upstream: Option<Notifier>,
        store: Store,
        /// The generation that serves (or is starting).
        main: Option<Verified>,
        /// The child the main generation announced as its upgrade.
        successor: Option<Verified>,
        /// The successor claimed the service while the main generation still looked
        /// alive: it takes over as soon as the main generation is found dead.
        claimed: bool,
        /// The main generation died during its upgrade: until when its successor may
        /// claim the service.
        takeover_until: Option<Instant>,
        stop: Option<Stop>,
        /// How the last main generation ended.
        last_status: Option<ExitStatus>,
        restarts: VecDeque<Instant>,
        /// When to start a generation again after a crash.
        restart_at: Option<Instant>,
        complaints: Complaints,
    }

    impl State {
        pub(super) fn new(config: Keeper) -> Result<State> {
            let pid = std::process::id();
            if pid != 1 {
                // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) takes integers only.
                if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } == -1 {
                    return Err(Error::io(
                        "prctl(PR_SET_CHILD_SUBREAPER)",
                        None,
                        io::Error::last_os_error(),
                    ));
                }
            }
            procs::check_proc().map_err(|e| Error::io("the keeper reads /proc", None, e))?;
            let (socket, target) = notify_socket(pid)
                .map_err(|e| Error::io("bind the keeper's notify socket", None, e))?;
            let signals = signals::install(&[FORWARDED.as_slice(), &[libc::SIGCHLD]].concat())
                .map_err(|e| Error::io("sigaction for the keeper's signals", None, e))?;
            let mut keeper = State {
                config,
                program: Program::current(None)?,
                pid,
                socket,
                target,
                signals,
                upstream: Notifier::from_env(),
                store: Store::default(),
                main: None,
                successor: None,
                claimed: false,
                takeover_until: None,
                stop: None,
                last_status: None,
                restarts: VecDeque::new(),
                restart_at: None,
                complaints: Complaints {
                    since: Instant::now(),
                    lines: 0,
                    dropped: 0,
                },
            };
            // Sockets systemd passed to the keeper (socket activation) go to the
            // generations.
            for i in crate::systemd::activated()? {
                let name =
                    crate::systemd::store_name(&i.key, i.extra).unwrap_or_else(|| i.key.key_text());
                let name = match store::check_name(&name) {
                    Ok(()) => name,
                    Err(_) => store::DEFAULT_NAME.to_string(),
                };
                keeper.store.add(&name, vec![i.fd]);
            }
            Ok(keeper)
        }

        /// The loop; returns the exit code.
        pub(super) fn run(&mut self) -> i32 {
            if let Err(e) = self.start_generation() {
                say!("tableflip keeper: cannot start the service: {e}");
                return 1;
            }
            loop {
                let ready = {
                    let mut fds = vec![self.socket.as_fd(), self.signals.fd()];
                    fds.extend(self.main.as_ref().and_then(|m| m.exit_fd()));
                    fds.extend(self.successor.as_ref().and_then(|s| s.exit_fd()));
                    os::poll_in(&fds, self.next_deadline())
                };
                let ready = match ready {
                    Ok(ready) => ready,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                // Messages first: a `MAINPID=` is always sent before its sender exits.
                if ready[0] {
                    self.read_messages();
                }
                if ready[1] {
                    for sig in self.signals.take() {
                        self.on_signal(sig);
                    }
                }
                self.check_generations();
                self.timers();
                if let Some(code) = self.stop_progress() {
                    return code;
                }
            }
        }

        /// The next time the loop must wake without an event.
        fn next_deadline(&self) -> Option<Instant> {
            let stop = self.stop.as_ref().map(|s| match s.killed {
                None => s.deadline,
                Some(t) => t + KILL_AGAIN,
            });
            [self.restart_at, self.takeover_until, stop]
                .into_iter()
                .flatten()
                .min()
        }

        /// Starts a generation on the held sockets; it is the main one.
        fn start_generation(&mut self) -> Result<()> {
            let exe = self.program.resolve()?;
            let count = self.store.len().to_string();
            let names = self.store.names();
            let keeper = self.pid.to_string();
            let store_max = Store::max().to_string();
            // `$FDSTORE` (as systemd 254+ sets it) turns the generations' fd store on.
            let mut env: Vec<(&str, &str)> = vec![
                ("NOTIFY_SOCKET", &self.target),
                (VAR, &keeper),
                ("FDSTORE", &store_max),
            ];
            let moves = self.store.moves();
            let pid_var = (!moves.is_empty()).then_some(PidVar {
                name: "LISTEN_PID",
                value: "0000000000",
                slot: 0,
            });
            if !moves.is_empty() {
                env.push(("LISTEN_FDS", &count));
                env.push(("LISTEN_FDNAMES", &names));
            }
            let child = self.program.spawn(&exe, &env, pid_var, &[], &moves)?;
            self.main = Some(Verified::child(child.pid()));
            self.successor = None;
            self.claimed = false;
            Ok(())
        }

        /// Reads every queued notification.
        fn read_messages(&mut self) {
            let mut buf = [0u8; 4096];
            let mut space = [MaybeUninit::<u8>::uninit();
                rustix::cmsg_space!(ScmRights(253), ScmCredentials(1))];
            loop {
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let mut iov = [io::IoSliceMut::new(&mut buf)];
                let flags = RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC;
                let msg = match rustix::net::recvmsg(&self.socket, &mut iov, &mut control, flags) {
                    Ok(msg) => msg,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(_) => return,
                };
                let mut sender = 0;
                let mut fds: Vec<OwnedFd> = Vec::new();
                for m in control.drain() {
                    match m {
                        RecvAncillaryMessage::ScmCredentials(c) => {
                            sender = c.pid.as_raw_nonzero().get() as u32
                        }
                        RecvAncillaryMessage::ScmRights(rights) => fds.extend(rights),
                        _ => {}
                    }
                }
                let len = msg.bytes.min(buf.len());
                let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                if msg
                    .flags
                    .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
                {
                    self.reject(sender, &text, "cut short (over 4096 bytes or 253 fds)");
                    continue;
                }
                self.message(sender, &text, fds);
            }
        }

        /// One notification (`KEY=value` lines) from `sender` (0: no credentials, or
        /// outside the keeper's PID namespace).
        fn message(&mut self, sender: u32, text: &str, fds: Vec<OwnedFd>) {
            let field = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            };
            let was_main = self.main.as_ref().is_some_and(|m| m.pid() == sender);
            let is_successor = self.successor.as_ref().is_some_and(|s| s.pid() == sender);
            if !was_main && !is_successor {
                let why = match &self.main {
                    _ if sender == 0 => "no sender in the keeper's PID namespace".to_string(),
                    Some(m) => format!("not the main generation, pid {}", m.pid()),
                    None => "no generation is the main one".to_string(),
                };
                self.reject(sender, text, &why);
                return;
            }
            if was_main {
                if let Some(value) = field(SUCCESSOR_FIELD) {
                    if let Err(why) = self.announce(value) {
                        self.reject_field(sender, &format!("{SUCCESSOR_FIELD}={value}"), &why);
                    }
                }
            }
            let mut speaks = was_main;
            if let Some(value) = field("MAINPID") {
                let result = if was_main {
                    self.commit(sender, value)
                } else {
                    self.claim(sender, value)
                };
                match result {
                    Ok(()) => speaks = true,
                    // The successor's claim refused: nothing else it says counts.
                    Err(why) if !was_main => {
                        let why = format!("the announced successor's claim: {why}");
                        return self.reject(sender, text, &why);
                    }
                    Err(why) => self.reject_field(sender, &format!("MAINPID={value}"), &why),
                }
            }
            if !speaks {
                self.reject(
                    sender,
                    text,
                    "the announced successor, not the main generation",
                );
                return;
            }
            let mut relay: Vec<String> = Vec::new();
            for key in ["RELOADING", "READY", "STOPPING"] {
                if field(key) == Some("1") {
                    relay.push(format!("{key}=1"));
                }
            }
            if let Some(status) = field("STATUS") {
                relay.push(format!("STATUS={status}"));
            }
            let (store, remove) = (field("FDSTORE"), field("FDSTOREREMOVE"));
            self.fd_store(
                sender,
                store == Some("1"),
                remove == Some("1"),
                field("FDNAME"),
                fds,
            );
            if let (Some(up), false) = (&self.upstream, relay.is_empty()) {
                up.relay(&relay.join("\n"));
            }
        }

        /// `X_TABLEFLIP_SUCCESSOR=` from the main generation: its child that may follow it.
        fn announce(&mut self, value: &str) -> std::result::Result<(), String> {
            let pid = procs::parse_pid(value)?;
            let main = self.main.as_ref().map(|m| m.pid());
            let child = Verified::check(pid, self.pid)?;
            if procs::parent_of(pid) != main {
                return Err("not a child of the main generation".into());
            }
            self.successor = Some(child);
            self.claimed = false;
            Ok(())
        }

        /// `MAINPID=` from the main generation: itself, or the commit to its successor.
        fn commit(&mut self, sender: u32, value: &str) -> std::result::Result<(), String> {
            let pid = procs::parse_pid(value)?;
            if pid == sender {
                return Ok(());
            }
            match &self.successor {
                Some(s) if s.pid() == pid => {
                    if s.exited() {
                        return Err("the announced successor has exited".into());
                    }
                    self.main = self.successor.take();
                    self.tell_new_main();
                    Ok(())
                }
                _ => Err(format!(
                    "not the successor the main generation announced ({})",
                    self.successor
                        .as_ref()
                        .map_or("none".to_string(), |s| format!("pid {}", s.pid()))
                )),
            }
        }

        /// `MAINPID=` from the announced successor: it takes over if the main generation
        /// died during the handoff.
        fn claim(&mut self, sender: u32, value: &str) -> std::result::Result<(), String> {
            if procs::parse_pid(value)? != sender {
                return Err("the successor may only name itself".into());
            }
            if let Some(main) = &self.main {
                // The successor claims when its lifeline to the main generation closes,
                // which happens a moment before the main generation is a zombie.
                match main.wait_exit(CLAIM_WAIT) {
                    Some(status) => self.main_died(status),
                    None => {
                        self.claimed = true;
                        return Err(format!(
                            "the main generation (pid {}) is alive: only it commits (the claim \
                             holds if it dies before)",
                            main.pid()
                        ));
                    }
                }
            }
            if self.successor.as_ref().is_some_and(|s| s.pid() == sender) {
                self.take_over();
            }
            Ok(())
        }

        /// The successor becomes the main generation, the main one being dead.
        fn take_over(&mut self) {
            let Some(s) = self.successor.take() else {
                return;
            };
            say!(
                "tableflip keeper: pid {}, the announced successor, takes over from the main \
                 generation that died during the upgrade",
                s.pid()
            );
            self.main = Some(s);
            self.tell_new_main();
            self.claimed = false;
            self.takeover_until = None;
            if self.restart_at.take().is_some() {
                self.restarts.pop_back();
            }
        }

        /// During a stop, a generation that has just become the main one (the commit
        /// crossed the stop signal) gets the signal too.
        fn tell_new_main(&self) {
            if let (Some(stop), Some(main)) = (&self.stop, &self.main) {
                main.signal(stop.signal);
            }
        }

        /// `FDSTORE=1` / `FDSTOREREMOVE=1` from the main generation.
        fn fd_store(
            &mut self,
            sender: u32,
            store: bool,
            remove: bool,
            name: Option<&str>,
            fds: Vec<OwnedFd>,
        ) {
            let asked = |what: &str| match name {
                Some(n) => format!("{what}\nFDNAME={n}"),
                None => what.to_string(),
            };
            if remove {
                match name.map(|n| (n, store::check_name(n))) {
                    Some((n, Ok(()))) => {
                        self.store.remove(n);
                    }
                    Some((_, Err(why))) => {
                        self.reject_field(sender, &asked("FDSTOREREMOVE=1"), why)
                    }
                    None => self.reject_field(sender, "FDSTOREREMOVE=1", "no FDNAME="),
                }
            }
            if fds.is_empty() {
                return;
            }
            if !store {
                self.reject_field(sender, &format!("{} fds", fds.len()), "without FDSTORE=1");
                return;
            }
            let n = name.unwrap_or(store::DEFAULT_NAME);
            if let Err(why) = store::check_name(n) {
                let what = asked(&format!("FDSTORE=1 with {} fds", fds.len()));
                self.reject_field(sender, &what, why);
                return;
            }
            let got = self.store.add(n, fds);
            if got.refused > 0 {
                let what = asked(&format!("FDSTORE=1 with {} fds", got.refused + got.kept));
                let why = format!(
                    "the fd store is full: {} fds closed ({} held, at most {})",
                    got.refused,
                    self.store.len(),
                    Store::max()
                );
                self.reject_field(sender, &what, &why);
            }
        }

        /// Logs a rejected message from someone who may not speak.
        fn reject(&mut self, sender: u32, text: &str, why: &str) {
            let asked = format!("{:?}", clip(text.trim_end(), LOGGED_BYTES));
            self.complain(format!(
                "tableflip keeper: rejected a message from pid {sender} ({why}): {asked}"
            ));
        }

        /// Logs a rejected field of a message from the main generation or its successor.
        fn reject_field(&mut self, sender: u32, what: &str, why: &str) {
            let asked = format!("{:?}", clip(what, LOGGED_BYTES));
            self.complain(format!(
                "tableflip keeper: rejected {asked} from pid {sender}: {why}"
            ));
        }

        fn complain(&mut self, line: String) {
            let c = &mut self.complaints;
            if c.since.elapsed() >= COMPLAINT_WINDOW {
                if c.dropped > 0 {
                    say!(
                        "tableflip keeper: {} more rejected messages were not logged",
                        c.dropped
                    );
                }
                *c = Complaints {
                    since: Instant::now(),
                    lines: 0,
                    dropped: 0,
                };
            }
            if c.lines < COMPLAINTS {
                c.lines += 1;
                say!("{line}");
            } else {
                c.dropped += 1;
            }
        }

        fn on_signal(&mut self, sig: libc::c_int) {
            if sig == libc::SIGCHLD {
                self.reap();
                return;
            }
            if matches!(sig, libc::SIGTERM | libc::SIGINT | libc::SIGQUIT) {
                self.begin_stop(sig);
            }
            // To the main generation; during a takeover, to the successor if it is told
            // to stop.
            let to = match (&self.main, &self.successor) {
                (Some(main), _) => Some(main),
                (None, Some(s)) if self.stop.is_some() => Some(s),
                _ => None,
            };
            if let Some(p) = to {
                p.signal(sig);
            }
        }

        /// Reaps every exited child (descendants whose parent died included).
        fn reap(&mut self) {
            loop {
                match rustix::process::waitpid(None, WaitOptions::NOHANG) {
                    Ok(Some((pid, status))) => self.reaped(pid, status),
                    Ok(None) => return,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(_) => return,
                }
            }
        }

        fn reaped(&mut self, pid: rustix::process::Pid, status: rustix::process::WaitStatus) {
            let pid = pid.as_raw_nonzero().get() as u32;
            let status = ExitStatus::from_raw(status.as_raw());
            if self.main.as_ref().is_some_and(|m| m.pid() == pid) {
                self.main_died(status);
            } else if self.successor.as_ref().is_some_and(|s| s.pid() == pid) {
                self.successor_died();
            }
        }

        /// Notices generations that exited without the keeper reaping them (their
        /// parent, an older generation, still runs).
        fn check_generations(&mut self) {
            if let Some(status) = self.main.as_ref().and_then(|m| m.reap_or_peek()) {
                self.main_died(status);
            }
            if self.successor.as_ref().is_some_and(|s| s.exited()) {
                self.successor_died();
            }
        }

        fn main_died(&mut self, status: ExitStatus) {
            let Some(main) = self.main.take() else {
                return;
            };
            self.last_status = Some(status);
            if self.stop.is_some() {
                return;
            }
            let successor = self.successor.as_ref().filter(|s| !s.exited());
            if successor.is_some() && self.claimed {
                self.take_over();
                return;
            }
            if let Some(s) = successor {
                say!(
                    "tableflip keeper: the main generation (pid {}) ended during its upgrade \
                     ({status}); pid {} may take over within {:?}",
                    main.pid(),
                    s.pid(),
                    self.config.takeover_timeout
                );
                self.takeover_until = Instant::now().checked_add(self.config.takeover_timeout);
                return;
            }
            self.successor = None;
            if status.success() {
                // It stopped on purpose: so does the service.
                say!(
                    "tableflip keeper: the main generation (pid {}) exited: stopping",
                    main.pid()
                );
                self.begin_stop(libc::SIGTERM);
                return;
            }
            say!("tableflip keeper: the service died ({status}); starting it again");
            self.restart_later();
        }

        fn successor_died(&mut self) {
            let Some(s) = self.successor.take() else {
                return;
            };
            if self.main.is_none() && self.stop.is_none() {
                say!(
                    "tableflip keeper: pid {}, the announced successor, ended before taking \
                     over; starting the service again",
                    s.pid()
                );
                self.takeover_until = None;
                self.restart_later();
            }
        }

        fn timers(&mut self) {
            let now = Instant::now();
            if self.restart_at.is_some_and(|t| now >= t) {
                self.restart_at = None;
                if let Err(e) = self.start_generation() {
                    say!("tableflip keeper: cannot start the service again: {e}");
                    self.restart_later();
                }
            }
            if self.takeover_until.is_some_and(|t| now >= t) {
                self.takeover_until = None;
                if let Some(s) = &self.successor {
                    say!(
                        "tableflip keeper: pid {}, the announced successor, did not take over \
                         within {:?}: killing it",
                        s.pid(),
                        self.config.takeover_timeout
                    );
                    // Restarted once it is gone (successor_died).
                    s.signal(libc::SIGKILL);
                }
            }
        }

        /// Schedules a restart after the back-off, or gives up past the limit.
        fn restart_later(&mut self) {
            let now = Instant::now();
            while self
                .restarts
                .front()
                .is_some_and(|t| now.duration_since(*t) > self.config.window)
            {
                self.restarts.pop_front();
            }
            if self.restarts.len() >= self.config.restarts {
                say!(
                    "tableflip keeper: {} restarts within {:?}: giving up",
                    self.restarts.len(),
                    self.config.window
                );
                self.last_status = Some(ExitStatus::from_raw(1 << 8));
                self.begin_stop(libc::SIGTERM);
                return;
            }
            let shift = self.restarts.len().min(16) as u32;
            let delay = self
                .config
                .backoff
                .saturating_mul(1 << shift)
                .min(self.config.max_backoff);
            self.restarts.push_back(now);
            self.restart_at = now.checked_add(delay);
        }

        fn begin_stop(&mut self, signal: libc::c_int) {
            if self.stop.is_some() {
                return;
            }
            let now = Instant::now();
            self.stop = Some(Stop {
                signal,
                deadline: now.checked_add(self.config.stop_timeout).unwrap_or(now),
                rest_told: false,
                killed: None,
            });
            self.restart_at = None;
            self.takeover_until = None;
        }

        /// While stopping: `SIGTERM` to the rest once the main generation is gone,
        /// `SIGKILL` to what is left after the stop timeout, and the exit code once no
        /// process is left.
        fn stop_progress(&mut self) -> Option<i32> {
            let me = self.pid;
            let timeout = self.config.stop_timeout;
            let alone = self.main.is_none() && self.successor.is_none();
            let stop = self.stop.as_mut()?;
            if alone && !stop.rest_told {
                stop.rest_told = true;
                procs::signal_descendants(me, libc::SIGTERM);
            }
            let now = Instant::now();
            if now >= stop.deadline && stop.killed.map_or(true, |t| now >= t + KILL_AGAIN) {
                let left = procs::descendants(me);
                if !left.is_empty() {
                    if stop.killed.is_none() {
                        say!(
                            "tableflip keeper: the stop timeout ({timeout:?}) has passed: \
                             SIGKILL to what is left (pids {:?})",
                            left
                        );
                    }
                    kill_the_rest(me);
                }
                stop.killed = Some(now);
            }
            // Anyone left? (`ECHILD`: no child at all, reparented orphans included.)
            loop {
                match rustix::process::waitpid(None, WaitOptions::NOHANG) {
                    Ok(Some((pid, status))) => self.reaped(pid, status),
                    Err(rustix::io::Errno::CHILD) => return Some(exit_code(self.last_status)),
                    Err(rustix::io::Errno::INTR) => continue,
                    Ok(None) | Err(_) => return None,
                }
            }
        }
    }

    /// `SIGKILL` to every process left. As PID 1, `kill(-1)`: the kernel sends it to
    /// every process of the namespace but the keeper (the one signal not sent to one
    /// checked pid: it cannot reach outside the namespace). Otherwise to each
    /// descendant, checked.
    fn kill_the_rest(me: u32) {
        if me == 1 {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(-1, libc::SIGKILL) };
        } else {
            procs::signal_descendants(me, libc::SIGKILL);
        }
    }

    /// The keeper's exit code for the last generation's status (128 + signal when killed).
    fn exit_code(status: Option<ExitStatus>) -> i32 {
        match status {
            Some(s) => s.code().or(s.signal().map(|sig| 128 + sig)).unwrap_or(1),
            None => 0,
        }
    }

    /// The keeper's notify socket: a datagram socket on a random abstract name,
    /// non-blocking, with the senders' credentials. Returns it and its
    /// `$NOTIFY_SOCKET`.
    fn notify_socket(pid: u32) -> io::Result<(OwnedFd, String)> {
        let fd = crate::socket::new_socket(AddressFamily::UNIX, SocketType::DGRAM)?;
        rustix::io::ioctl_fionbio(&fd, true)?;
        rustix::net::sockopt::set_socket_passcred(&fd, true)?;
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&fd, 1 << 20);
        let mut last = io::Error::from(io::ErrorKind::AddrInUse);
        // A name taken already is another one's: draw again.
        for _ in 0..8 {
            let name = format!("tableflip-keeper/{pid}/{:032x}", random()?);
            match rustix::net::bind(&fd, &SocketAddrUnix::new_abstract_name(name.as_bytes())?) {
                Ok(()) => return Ok((fd, format!("@{name}"))),
                Err(rustix::io::Errno::ADDRINUSE) => last = rustix::io::Errno::ADDRINUSE.into(),
                Err(e) => return Err(e.into()),
            }
        }
        Err(last)
    }

    /// 128 bits from the kernel's random source.
    fn random() -> io::Result<u128> {
        let mut bytes = [0u8; 16];
        let mut got = 0;
        while got < bytes.len() {
            // SAFETY: writes at most `len - got` bytes into `bytes[got..]`.
            let n =
                unsafe { libc::getrandom(bytes[got..].as_mut_ptr().cast(), bytes.len() - got, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            got += n as usize;
        }
        Ok(u128::from_ne_bytes(bytes))
    }
}
