//! The keeper's life: starting the main generation, forwarding signals to it, noticing
//! when a generation ends (reaped, or its pidfd readable when an older generation is
//! its parent), restarting after a crash, and stopping: `SIGTERM` to the rest once the
//! main generation is gone, `SIGKILL` after the stop timeout.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use rustix::process::WaitOptions;

use super::notify::notify_socket;
use super::procs::{self, Verified};
use super::signals::{self, SignalPipe};
use super::store::{self, Store};
use super::{Keeper, VAR};
use crate::error::{Error, Result};
use crate::sys::os;
use crate::sys::spawn::{PidVar, Program};
use crate::sys::systemd::Notifier;

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

/// A stop under way.
#[derive(Debug)]
pub(super) struct Stop {
    /// What the main generation was told (`SIGTERM`, `SIGINT` or `SIGQUIT`): a
    /// generation that becomes the main one during the stop is told too.
    pub(super) signal: libc::c_int,
    deadline: Instant,
    /// Whether the rest got `SIGTERM` (once the main generation is gone).
    rest_told: bool,
    /// When what is left was last killed, after the deadline.
    killed: Option<Instant>,
}

/// The keeper at work: what it holds (its config, notify socket, signal pipe, fd store)
/// and what it knows of the generations (the main one, its successor, restarts, a stop).
/// Rejection lines, rate-limited.
#[derive(Debug)]
pub(super) struct Complaints {
    pub(super) since: Instant,
    pub(super) lines: u32,
    pub(super) dropped: u64,
}

pub(super) struct Keeping {
    pub(super) config: Keeper,
    pub(super) program: Program,
    pub(super) pid: u32,
    pub(super) socket: OwnedFd,
    pub(super) target: String,
    pub(super) signals: SignalPipe,
    /// The keeper's own systemd, if any.
    pub(super) upstream: Option<Notifier>,
    pub(super) store: Store,
    /// The generation that serves (or is starting).
    pub(super) main: Option<Verified>,
    /// The child the main generation announced as its upgrade.
    pub(super) successor: Option<Verified>,
    /// The successor claimed the service while the main generation still looked
    /// alive: it takes over as soon as the main generation is found dead.
    pub(super) claimed: bool,
    /// The main generation died during its upgrade: until when its successor may
    /// claim the service.
    pub(super) takeover_until: Option<Instant>,
    pub(super) stop: Option<Stop>,
    /// How the last main generation ended.
    pub(super) last_status: Option<ExitStatus>,
    pub(super) restarts: VecDeque<Instant>,
    /// When to start a generation again after a crash.
    pub(super) restart_at: Option<Instant>,
    pub(super) complaints: Complaints,
}

impl Keeping {
    pub(super) fn new(config: Keeper) -> Result<Keeping> {
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
        let mut keeper = Keeping {
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
        for i in crate::sys::systemd::activated()? {
            let name = crate::sys::systemd::store_name(&i.key, i.extra)
                .unwrap_or_else(|| i.key.key_text());
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
        while let Ok(Some((pid, status))) =
            os::retry(|| rustix::process::waitpid(None, WaitOptions::NOHANG))
        {
            self.reaped(pid, status);
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

    pub(super) fn main_died(&mut self, status: ExitStatus) {
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

    /// The main generation asks for `time` more (`EXTEND_TIMEOUT_USEC=`): while
    /// stopping, and when the keeper relays to a service manager of its own (which then
    /// decides, as systemd does: the later of the two deadlines counts), the stop
    /// timeout runs until `time` from now if that is later. Without one, the stop
    /// timeout is the keeper's bound, set below its runtime's own.
    pub(super) fn extend_stop(&mut self, time: Duration) {
        if self.upstream.is_none() {
            return;
        }
        if let Some(stop) = self.stop.as_mut() {
            if let Some(until) = Instant::now().checked_add(time) {
                stop.deadline = stop.deadline.max(until);
            }
        }
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
            match os::retry(|| rustix::process::waitpid(None, WaitOptions::NOHANG)) {
                Ok(Some((pid, status))) => self.reaped(pid, status),
                Err(rustix::io::Errno::CHILD) => return Some(exit_code(self.last_status)),
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
