//! A generation's life on Unix, behind [`Upgrader`](crate::Upgrader): it is born
//! (`new`: it adopts what its parent passed), becomes ready (`ready`: it reports to its
//! parent, which commits), serves, and ends by handing over (`upgrade`: it starts the
//! next generation and commits to it) or by stopping (`stop`). How two generations talk
//! is in [`handshake`](crate::sys::handshake); what a generation tells the world, in
//! [`announce`](crate::sys::announce).

use std::fmt;
use std::io;
use std::os::unix::io::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::adoption::Adoption;
use crate::error::{Error, Result};
use crate::exit::Exit;
use crate::fds::Fds;
use crate::options::Options;
use crate::status::{Status, UpgradeRecord};
use crate::sys::announce::Announcer;
use crate::sys::exit::ExitSignal;
use crate::sys::handshake::{Decision, Handoff, Parent, COMMIT};
use crate::sys::inherit::{self, Inheritance};
use crate::sys::os;
use crate::sys::records::{self, Clock, Records};
use crate::sys::registry::Registry;
use crate::sys::spawn::Program;
use crate::sys::systemd::{self, Notifier};

/// One `Upgrader` at a time per process (standalone ones do not count).
static ALIVE: AtomicBool = AtomicBool::new(false);
/// The inherited fd table is read by the first `Upgrader` only.
static TABLE_READ: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not ready yet (possibly waiting for the parent to commit: see `Life::busy`).
    Starting,
    Ready,
    /// An upgrade succeeded; this generation should exit.
    Upgraded,
    Stopped,
}

/// Where the generation is in its life, and what it is doing now.
#[derive(Debug)]
struct Life {
    phase: Phase,
    /// While an upgrade runs, or `ready()` waits for the parent's commit.
    busy: bool,
    /// The write end of the busy operation's cancel pipe: dropping it wakes the waiting
    /// thread, which gives up (killing and reaping a child it started).
    cancel: Option<OwnedFd>,
}

/// How far an upgrade got: its phases so far, for its record.
#[derive(Debug, Default)]
struct Phases {
    ready: Option<Duration>,
    probation: Option<Duration>,
}

/// What [`Upgrader`](crate::Upgrader) is on Unix.
pub(crate) struct Generation {
    fds: Fds,
    program: Program,
    timeout: Duration,
    probation: Duration,
    upgrade_during_drain: bool,
    /// The previous generation, if this one was started by an upgrade.
    parent: Option<Parent>,
    world: Arc<Announcer>,
    /// The upgrade records: kept, passed on, completed.
    records: Arc<Records>,
    life: Mutex<Life>,
    changed: Condvar,
    exit: ExitSignal,
    /// This generation's end of the handover channel, until `ready` makes it a receiver.
    handover_in: Mutex<Option<OwnedFd>>,
    /// The old generation's end of the channel to the generation it upgraded to, until
    /// `handover` takes it.
    handover_out: Mutex<Option<crate::handover::Offer>>,
    /// A test double ([`Upgrader::standalone`](crate::Upgrader::standalone)): never
    /// spawns, tells the world nothing, is not the process's one `Upgrader`.
    standalone: bool,
}

impl fmt::Debug for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upgrader")
            .field("life", &*self.lock())
            .field("parent", &self.parent.as_ref().map(Parent::pid))
            .field("standalone", &self.standalone)
            .field("fds", &self.fds)
            .finish()
    }
}

/// Resets [`ALIVE`] if `Generation::new` fails half-way.
struct AliveGuard(bool);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        if !self.0 {
            ALIVE.store(false, Ordering::SeqCst);
        }
    }
}

impl Generation {
    pub(crate) fn new(options: Options) -> Result<Generation> {
        if ALIVE
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(Error::AlreadyCreated);
        }
        let mut guard = AliveGuard(false);
        let program = Program::current(options.executable.clone())?;
        let inheritance = if TABLE_READ.swap(true, Ordering::SeqCst) {
            Inheritance::default()
        } else {
            inherited()?
        };
        let pid_file = options.pid_file.as_ref().map(|p| program.cwd().join(p));
        let notify = Notifier::from_env();
        let fd_store = options.fd_store.unwrap_or_else(systemd::store_offered);
        let world = Announcer::new(pid_file, notify, fd_store);
        // Now, before the application binds anything, rather than at ready().
        world.check(inheritance.parent.as_ref())?;
        if fd_store && !world.has_notify() {
            systemd::warn_store_unheld(options.fd_store.is_some());
        }
        let generation = Generation::with(options, program, inheritance, world, false)?;
        guard.0 = true;
        Ok(generation)
    }

    pub(crate) fn standalone(options: Options) -> Result<Generation> {
        let program = Program::current(options.executable.clone())?;
        Generation::with(
            options,
            program,
            Inheritance::default(),
            Announcer::silent(),
            true,
        )
    }

    fn with(
        options: Options,
        program: Program,
        inheritance: Inheritance,
        world: Announcer,
        standalone: bool,
    ) -> Result<Generation> {
        let registry = Registry::new(
            inheritance.fds,
            inheritance.state,
            options.before_bind,
            options.backlog,
        );
        let world = Arc::new(world);
        let records = Arc::new(Records::new(
            inheritance.parent.as_ref().map(Parent::lifeline),
        ));
        let exit = ExitSignal::new(Arc::clone(&world), Arc::clone(&records))?;
        Ok(Generation {
            fds: Fds { reg: registry },
            program,
            timeout: options.upgrade_timeout,
            probation: options.probation,
            upgrade_during_drain: options.upgrade_during_drain,
            parent: inheritance.parent,
            world,
            records,
            life: Mutex::new(Life {
                phase: Phase::Starting,
                busy: false,
                cancel: None,
            }),
            changed: Condvar::new(),
            exit,
            handover_in: Mutex::new(inheritance.handover),
            handover_out: Mutex::new(None),
            standalone,
        })
    }

    pub(crate) fn fds(&self) -> &Fds {
        &self.fds
    }

    pub(crate) fn has_parent(&self) -> bool {
        self.parent.is_some()
    }

    pub(crate) fn wait_for_parent(&self, timeout: Duration) -> Result<bool> {
        match &self.parent {
            None => Ok(true),
            Some(p) => self.parent_gone_by(p, os::deadline(Some(timeout))),
        }
    }

    /// Whether the parent has exited by `deadline`; its record notes it.
    fn parent_gone_by(
        &self,
        parent: &Parent,
        deadline: Option<std::time::Instant>,
    ) -> Result<bool> {
        let gone = parent.gone_by(deadline)?;
        if gone {
            self.records.parent_gone();
        }
        Ok(gone)
    }

    pub(crate) fn exit(&self) -> &Exit {
        self.exit.exit()
    }

    pub(crate) fn ready(&self) -> Result<Adoption> {
        let (decision, mut life) = match &self.parent {
            None => (Decision::Alone, self.lock()),
            Some(parent) => {
                let Some(cancel) = self.begin_ready()? else {
                    return Ok(Adoption::default());
                };
                let decision = parent.report_ready(cancel.as_fd());
                let life = self.end_busy();
                let decision = decision?;
                if let Decision::Committed(payload) = &decision {
                    self.adopt_records(parent, payload);
                }
                (decision, life)
            }
        };
        match life.phase {
            Phase::Starting if decision != Decision::Stopped => {}
            Phase::Ready | Phase::Upgraded => return Ok(Adoption::default()),
            Phase::Starting | Phase::Stopped => return Err(Error::Stopped),
        }
        let adoption = self.take_over(decision == Decision::Alone)?;
        life.phase = Phase::Ready;
        Ok(adoption)
    }

    pub(crate) fn fail(&self, reason: &str) -> ! {
        let line = format!("tableflip: new generation gives up: {reason}\n");
        let _ = io::Write::write_all(&mut io::stderr().lock(), line.as_bytes());
        if let Some(parent) = &self.parent {
            parent.fail(reason);
        }
        std::process::exit(1)
    }

    /// What came with the commit: the upgrade records, believed only if they parse and
    /// end with this upgrade (see `records`).
    fn adopt_records(&self, parent: &Parent, payload: &[u8]) {
        match records::decode_commit(payload, parent.pid(), std::process::id()) {
            Ok(Some(received)) => self.records.adopt(received, parent.report_pipe()),
            Ok(None) => {}
            Err(why) => records::ignored(parent.pid(), "history", &why),
        }
    }

    pub(crate) fn upgrade(&self) -> Result<u32> {
        let cancel = match self.begin_upgrade() {
            Ok(cancel) => cancel,
            Err(e) => {
                self.world.refused(&e);
                return Err(e);
            }
        };
        let clock = Clock::now();
        self.world.reloading();
        let mut phases = Phases::default();
        let result = if self.standalone {
            // Nothing to start: a stand-in for the next generation.
            Ok((std::process::id(), None))
        } else {
            self.hand_over(cancel.as_fd(), &clock, &mut phases)
        };
        // Still busy: no other upgrade starts while the world hears of this one's end.
        let result = result.map_err(|(e, after_commit)| {
            self.world.rolled_back(&e, after_commit);
            e
        });
        let (result, report) = match result {
            Ok((pid, report)) => (Ok(pid), report),
            Err(e) => (Err(e), None),
        };
        let mut record = UpgradeRecord::of(clock.started, clock.start.elapsed(), &result);
        record.ready = phases.ready;
        record.probation = phases.probation;
        self.records.push(record.clone());
        if let Some(pipe) = report {
            self.records.succeeded(clock, &record, pipe);
        }
        let mut life = self.end_busy();
        if result.is_ok() {
            if life.phase != Phase::Stopped {
                life.phase = Phase::Upgraded;
            }
            // Exit first: this generation stops accepting as soon as it can.
            self.exit.fire(true);
            self.fds.reg.retire_all();
        }
        result
    }

    /// The upgrade itself: start, wait for ready, probation, commit. Returns the new
    /// generation's pid and the pipe for its report; an error says whether the commit
    /// had started. `phases` notes how far it got.
    fn hand_over(
        &self,
        cancel: BorrowedFd<'_>,
        clock: &Clock,
        phases: &mut Phases,
    ) -> std::result::Result<(u32, Option<OwnedFd>), (Error, bool)> {
        let before = |e: Error| (e, false);
        let exe = self.program.resolve().map_err(before)?;
        let state = self.fds.reg.state_to_pass().map_err(before)?;
        let handoff = self
            .fds
            .reg
            .with_passed(|passed| {
                Handoff::start(
                    &self.program,
                    &exe,
                    state.as_ref().map(|s| s.as_fd()),
                    passed,
                    self.timeout,
                )
            })
            .map_err(before)?;
        // Under a keeper: the child is named before it can claim the service.
        self.world.spawned(handoff.pid());
        let handoff = handoff.wait_ready(cancel).map_err(before)?;
        let ready_at = handoff.ready_at().unwrap_or_else(std::time::Instant::now);
        phases.ready = Some(ready_at.saturating_duration_since(clock.start));
        let handoff = handoff.probation(self.probation, cancel).map_err(before)?;
        // Served (none without a probation: the commit follows at once).
        phases.probation = Some(match self.probation.is_zero() {
            true => Duration::ZERO,
            false => ready_at.elapsed(),
        });
        // What the new generation will hold, if it confirms: passed with the commit.
        let mut current =
            UpgradeRecord::of(clock.started, clock.start.elapsed(), &Ok(handoff.pid()));
        current.ready = phases.ready;
        current.probation = phases.probation;
        let payload = self.records.commit_payload(COMMIT, &current, clock);
        if let Err(e) = self.world.committing(handoff.pid()) {
            return Err((handoff.kill(e), true));
        }
        let (offer, report) = handoff.commit(cancel, &payload).map_err(|e| (e, true))?;
        let pid = offer.pid;
        *lock(&self.handover_out) = Some(offer);
        self.world.committed();
        Ok((pid, Some(report)))
    }

    pub(crate) fn handover(&self) -> Result<crate::handover::Sender> {
        match lock(&self.handover_out).take() {
            Some(offer) => offer.sender(Arc::clone(&self.records)),
            None => Err(Error::HandoverUnavailable {
                pid: None,
                reason: if self.exit.exit().upgraded() {
                    "the handover channel was taken already".into()
                } else {
                    "no upgrade has succeeded: the channel exists once upgrade() has returned Ok"
                        .into()
                },
            }),
        }
    }

    pub(crate) fn stop(&self) {
        let mut life = self.lock();
        if life.phase == Phase::Stopped {
            return;
        }
        let upgraded = life.phase == Phase::Upgraded;
        // A generation that never became ready was not serving: the previous one (if
        // any) still is, on the same sockets, and systemd must not hear STOPPING.
        let was_ready = life.phase != Phase::Starting;
        life.phase = Phase::Stopped;
        drop(life.cancel.take());
        while life.busy {
            life = self.changed.wait(life).unwrap_or_else(|e| e.into_inner());
        }
        // An upgrade that completed while we waited counts.
        if !upgraded && !self.exit.exit().upgraded() {
            self.fds
                .reg
                .unlink_socket_files(was_ready || self.parent.is_none());
            self.world.stopping(was_ready);
        }
        // Go's Stop: nothing is passed on any more, and the registry's copies go now
        // (a pipe's write end that the new generation took reaches EOF once it closes
        // it too).
        self.fds.reg.close_copies();
        // After an upgrade: the new generation hears what this one knows of it, if the
        // drain did not say so already.
        self.records.send_report();
        drop(life);
        self.exit.fire(false);
    }

    pub(crate) fn status(&self) -> Status {
        // First: it may look at the previous generation (system calls).
        let upgrades = self.records.list();
        let life = self.lock();
        Status {
            pid: std::process::id(),
            ready: life.phase == Phase::Ready,
            // While not ready, `busy` is ready() waiting for the commit.
            upgrading: life.busy && life.phase != Phase::Starting,
            started_by: self.parent.as_ref().map(|p| p.pid()),
            upgrades,
        }
    }

    /// Marks `ready()` busy waiting for the commit, with a cancel pipe for `stop()`.
    /// `None` if there is nothing to do.
    fn begin_ready(&self) -> Result<Option<OwnedFd>> {
        let mut life = self.lock();
        while life.busy {
            life = self.changed.wait(life).unwrap_or_else(|e| e.into_inner());
        }
        match life.phase {
            Phase::Starting => {}
            Phase::Ready | Phase::Upgraded => return Ok(None),
            Phase::Stopped => return Err(Error::Stopped),
        }
        Ok(Some(self.set_busy(&mut life)?))
    }

    /// Checks that an upgrade may start, and marks it running.
    fn begin_upgrade(&self) -> Result<OwnedFd> {
        let mut life = self.lock();
        match life.phase {
            Phase::Starting => return Err(Error::NotReady),
            Phase::Upgraded => return Err(Error::AlreadyUpgraded),
            Phase::Stopped => return Err(Error::Stopped),
            Phase::Ready => {}
        }
        if life.busy {
            return Err(Error::UpgradeInProgress);
        }
        if let Some(p) = self.parent.as_ref().filter(|_| !self.upgrade_during_drain) {
            if !self.parent_gone_by(p, Some(std::time::Instant::now()))? {
                return Err(Error::ParentAlive { pid: p.pid() });
            }
        }
        self.set_busy(&mut life)
    }

    fn set_busy(&self, life: &mut Life) -> Result<OwnedFd> {
        let (cancel_rd, cancel_wr) = os::pipe().map_err(|e| Error::io("pipe2", None, e))?;
        life.cancel = Some(cancel_wr);
        life.busy = true;
        Ok(cancel_rd)
    }

    /// Ends a busy operation; returns the life, still locked.
    fn end_busy(&self) -> MutexGuard<'_, Life> {
        let mut life = self.lock();
        life.busy = false;
        life.cancel = None;
        self.changed.notify_all();
        life
    }

    /// This generation takes over: `alone` when no parent committed to it (a first
    /// start, or a parent that died undecided).
    fn take_over(&self, alone: bool) -> Result<Adoption> {
        self.world.took_over(alone, self.parent.as_ref())?;
        // The handover channel's end, if the parent made one and committed to us.
        let handover = lock(&self.handover_in).take().filter(|_| !alone);
        if let Some(parent) = &self.parent {
            self.records.took_over();
            parent.confirm(handover.is_some());
        }
        self.fds.reg.discard_state_in();
        let (mut adoption, closed) = self.fds.reg.close_unused();
        // Made a receiver only now, after the confirmation; it checks the channel when
        // first used, off the path of the upgrade.
        adoption.handover = match (handover, &self.parent) {
            (Some(fd), Some(parent)) => Some(crate::handover::Receiver::adopt(
                fd,
                parent.pid(),
                parent.lifeline(),
                self.exit.flag(),
            )),
            _ => None,
        };
        self.world.stored(&self.fds.reg, &closed);
        Ok(adoption)
    }

    fn lock(&self) -> MutexGuard<'_, Life> {
        lock(&self.life)
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        self.stop();
        if !self.standalone {
            ALIVE.store(false, Ordering::SeqCst);
        }
    }
}

/// What this process inherits: from the previous generation, or else from systemd's
/// socket activation.
fn inherited() -> Result<Inheritance> {
    let mut inheritance = inherit::from_env()?;
    if inheritance.parent.is_none() {
        inheritance.fds = systemd::activated()?;
    }
    Ok(inheritance)
}

// An Upgrader is shared between the serving threads and the one that upgrades.
const _: () = {
    const fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<Generation>();
    is_send_sync::<Options>();
};

/// A lock that survives a panic of another holder: every state guarded here stays
/// consistent between statements.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
