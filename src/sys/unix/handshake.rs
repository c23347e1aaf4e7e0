//! The handshake between two generations, and the commit that makes an upgrade all or
//! nothing: the three pipes that join a new generation to the one that started it
//! (`ready`, `commit`, `parent`; every end close-on-exec except the child's three) and
//! what travels on them.
//!
//! The protocol is documented once, for users and for this code alike, in the guide
//! [how an upgrade works](crate::guide::upgrade) (`docs/upgrade.md`): the pipes, the
//! messages (`R`, `F`, `C`, `D`, `H`), the steps, the timeout budget, and what a failure
//! at each step leaves. This module is its two ends. When it returns an error after the
//! commit began, the caller undoes what the commit told the world (`MAINPID=` itself
//! again, its own pid file).

use std::io;
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{clip, Error, Result, WaitingFor};
use crate::sys::os;
use crate::sys::process::Child;
use crate::sys::spawn::{PidVar, Program};
use crate::sys::wire::{self, Extra, Key};

/// The child is ready (its first report).
const READY: u8 = b'R';
/// The child gives up; its reason follows, up to EOF.
const FAIL: u8 = b'F';
/// The child has taken over (its last report, after the commit).
const DONE: u8 = b'D';
/// The child has taken over and holds its end of the handover channel; two bytes
/// follow: the lowest and highest handover versions it reads.
const DONE_WITH_HANDOVER: u8 = b'H';
/// The parent commits; the upgrade records follow in the same write.
pub(crate) const COMMIT: u8 = b'C';
/// The longest failure reason passed to the parent, in bytes.
const MAX_REASON: usize = 4096;

// ---- The parent's side ---------------------------------------------------------------

/// One upgrade in progress, as the parent holds it: the child and our ends of its pipes.
#[derive(Debug)]
pub(crate) struct Handoff {
    child: Child,
    /// Read end of `ready`.
    ready: OwnedFd,
    /// Write end of `commit`.
    commit: OwnedFd,
    /// Write end of `parent`; never written, kept open until we exit.
    lifeline: OwnedFd,
    /// Our end of the handover channel, and our copy of the child's: closed when the
    /// channel is taken ([`Offer`](crate::handover::Offer)), off the upgrade's path.
    handover: OwnedFd,
    handover_child: OwnedFd,
    /// When the child reported ready.
    ready_at: Option<Instant>,
    /// The upgrade timeout, from the spawn.
    budget: Budget,
}

/// The upgrade timeout, one budget for the child's part of the handshake: its clock runs
/// from the spawn to `R`, stops, and runs again from `C` to `D`.
#[derive(Debug)]
struct Budget {
    timeout: Duration,
    /// When it runs out if the child takes all of it to report ready (`None`: never).
    deadline: Option<Instant>,
    /// What was left of it at `R` (`None`: no limit).
    left: Option<Duration>,
}

impl Budget {
    fn start(timeout: Duration) -> Budget {
        Budget {
            timeout,
            deadline: os::deadline(Some(timeout)),
            left: Some(timeout),
        }
    }

    /// At `R`: the clock stops.
    fn stop(&mut self) {
        self.left = os::left(self.deadline);
    }

    /// At `C`: the clock runs again. When the budget runs out now.
    fn resume(&self) -> Option<Instant> {
        self.left.and_then(|left| Instant::now().checked_add(left))
    }
}

/// What the child did while we waited.
enum Event {
    /// It sent something on `ready` (or closed it).
    Said(Message),
    /// It exited (its pidfd fired) without closing `ready`.
    Exited,
    /// `stop()` was called.
    Cancelled,
    /// The deadline passed.
    Deadline,
}

enum Message {
    Ready,
    /// `H`: the child holds its end of the handover channel (the versions it reads
    /// follow, read when the channel is taken).
    Done {
        handover: bool,
    },
    Failed(String),
    /// EOF, or a byte that is not part of the protocol.
    Closed,
}

impl Handoff {
    /// Starts the next generation: makes the pipes, writes the fd table (the handshake
    /// entries, the state if any, then `passed`) and spawns `exe`. The upgrade timeout,
    /// `timeout`, starts to run at the spawn.
    pub(crate) fn start(
        program: &Program,
        exe: &Path,
        state: Option<BorrowedFd<'_>>,
        passed: &[(BorrowedFd<'_>, &Key, Extra)],
        timeout: Duration,
    ) -> Result<Handoff> {
        let pipe = || os::pipe().map_err(|e| Error::io("pipe2", None, e));
        let (ready_rd, ready_wr) = pipe()?;
        let (commit_rd, commit_wr) = pipe()?;
        let (life_rd, life_wr) = pipe()?;
        let (handover, handover_child) =
            crate::handover::pair().map_err(|e| Error::io("socketpair", None, e))?;
        let mut entries: Vec<(RawFd, &Key, Extra)> = Vec::with_capacity(passed.len() + 5);
        entries.push((ready_wr.as_raw_fd(), &Key::Ready, Extra::None));
        entries.push((commit_rd.as_raw_fd(), &Key::Commit, Extra::None));
        entries.push((life_rd.as_raw_fd(), &Key::Parent, Extra::None));
        entries.push((handover_child.as_raw_fd(), &Key::Handover, Extra::None));
        if let Some(state) = state {
            entries.push((state.as_raw_fd(), &Key::State, Extra::None));
        }
        entries.extend(
            passed
                .iter()
                .map(|(fd, key, extra)| (fd.as_raw_fd(), *key, *extra)),
        );
        let table = wire::encode_with(entries.iter().copied());
        if table.len() > wire::MAX_LEN {
            return Err(too_long(exe, entries.len(), table.len()));
        }
        // Passed at their own numbers, no moves: the registry keeps its copies side by
        // side already (`fds::dup_kept`), so the next generation handles them in ranges.
        let fds: Vec<RawFd> = entries.iter().map(|(fd, _, _)| *fd).collect();
        let table_var = PidVar {
            name: wire::VAR,
            value: &table,
            slot: wire::PID_OFFSET,
        };
        let budget = Budget::start(timeout);
        let child = program.spawn(exe, &[], Some(table_var), &fds, &[])?;
        // The child's pipe ends close here: only the child holds them now. (Our copy of
        // its end of the handover channel is closed once the channel is taken.)
        Ok(Handoff {
            child,
            ready: ready_rd,
            commit: commit_wr,
            lifeline: life_wr,
            handover,
            handover_child,
            ready_at: None,
            budget,
        })
    }

    /// The child's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Waits, until the upgrade timeout runs out, for the child to report ready.
    pub(crate) fn wait_ready(mut self, cancel: BorrowedFd<'_>) -> Result<Self> {
        let deadline = self.budget.deadline;
        match self.next_event(deadline, cancel)? {
            // Found at the deadline: nothing is left to confirm with after the commit,
            // so it ends here, with nothing to undo.
            Event::Said(Message::Ready) if os::left(deadline) == Some(Duration::ZERO) => {
                Err(self.timed_out(WaitingFor::Ready))
            }
            Event::Said(Message::Ready) => {
                self.ready_at = Some(Instant::now());
                self.budget.stop();
                Ok(self)
            }
            Event::Said(Message::Failed(reason)) => Err(self.gave_up(reason, deadline)),
            Event::Said(Message::Done { .. } | Message::Closed) | Event::Exited => {
                let pid = self.pid();
                let timeout = self.budget.timeout;
                Err(match self.child.wait_until(deadline)? {
                    Ok(status) => Error::ChildExited { pid, status },
                    Err(child) => {
                        let _ = child.kill_and_reap();
                        Error::Timeout {
                            pid,
                            timeout,
                            waiting_for: WaitingFor::Ready,
                        }
                    }
                })
            }
            Event::Cancelled => Err(self.kill(Error::Stopped)),
            Event::Deadline => Err(self.timed_out(WaitingFor::Ready)),
        }
    }

    /// Keeps the ready child on probation for `window`: if it dies meanwhile, the
    /// upgrade fails. Nothing outside has changed yet, so there is nothing to undo.
    pub(crate) fn probation(self, window: Duration, cancel: BorrowedFd<'_>) -> Result<Self> {
        if window.is_zero() {
            return Ok(self);
        }
        let deadline = self.ready_at.and_then(|t| t.checked_add(window));
        match self.next_event(deadline, cancel)? {
            Event::Deadline => Ok(self),
            Event::Cancelled => Err(self.kill(Error::Stopped)),
            Event::Said(Message::Failed(reason)) => Err(self.gave_up(reason, deadline)),
            Event::Said(_) | Event::Exited => Err(self.died(deadline)),
        }
    }

    /// When the child reported ready.
    pub(crate) fn ready_at(&self) -> Option<Instant> {
        self.ready_at
    }

    /// Commits: sends `C` (`payload`, which starts with [`COMMIT`] and carries the upgrade
    /// records, in one write) and waits, with what was left of the upgrade timeout when
    /// the child reported ready, for it to confirm that it has taken over. Returns our end
    /// of the handover channel, with the child's pid, and our end of `commit`, kept open
    /// for the report that follows (see [`records`](crate::sys::records)). On an error
    /// the child has been killed and reaped, and the caller must undo what it told the
    /// world for the commit.
    pub(crate) fn commit(
        self,
        cancel: BorrowedFd<'_>,
        payload: &[u8],
    ) -> Result<(crate::handover::Offer, OwnedFd)> {
        debug_assert_eq!(payload.first(), Some(&COMMIT));
        // The probation and systemd's queue were not counted.
        let deadline = self.budget.resume();
        if os::write_all(&self.commit, payload).is_err() {
            // EPIPE: the child is gone (or closed its end, which only dying does).
            return Err(self.died(deadline));
        }
        match self.next_event(deadline, cancel)? {
            Event::Said(Message::Done { handover }) => {
                let pid = self.pid();
                // The child learns that we have exited when this end closes: keep it
                // open until then. (The child itself is not ours to reap any more: it
                // outlives us.)
                std::mem::forget(self.lifeline);
                let offer = crate::handover::Offer {
                    fd: self.handover,
                    child_end: self.handover_child,
                    confirmation: handover.then_some(self.ready),
                    pid,
                };
                Ok((offer, self.commit))
            }
            Event::Said(Message::Failed(reason)) => Err(self.gave_up(reason, deadline)),
            Event::Said(_) | Event::Exited => Err(self.died(deadline)),
            Event::Cancelled => Err(self.kill(Error::Stopped)),
            Event::Deadline => Err(self.timed_out(WaitingFor::Confirmation)),
        }
    }

    /// The upgrade timeout ran out waiting for `what`: kills and reaps the child.
    fn timed_out(self, waiting_for: WaitingFor) -> Error {
        let err = Error::Timeout {
            pid: self.pid(),
            timeout: self.budget.timeout,
            waiting_for,
        };
        self.kill(err)
    }

    /// Gives up on the child: kills and reaps it, and returns `err`.
    pub(crate) fn kill(self, err: Error) -> Error {
        match self.child.kill_and_reap() {
            Ok(_) => err,
            Err(reap_err) => reap_err,
        }
    }

    /// The child sent `F`: its reason, once it has exited (or been killed at `deadline`).
    fn gave_up(self, reason: String, deadline: Option<Instant>) -> Error {
        let pid = self.pid();
        match self.child.reap_by(deadline) {
            Ok(status) => Error::ChildFailed {
                pid,
                reason,
                status,
            },
            Err(e) => e,
        }
    }

    /// The ready child died (or closed its end of `ready`): reaped, killed first if it
    /// still runs at `deadline`.
    fn died(self, deadline: Option<Instant>) -> Error {
        let pid = self.pid();
        let after = self.ready_at.map(|t| t.elapsed()).unwrap_or_default();
        match self.child.reap_by(deadline) {
            Ok(status) => Error::ChildDiedAfterReady { pid, status, after },
            Err(e) => e,
        }
    }

    /// Waits for the child to say something, exit, or for `cancel` or `deadline`.
    fn next_event(&self, deadline: Option<Instant>, cancel: BorrowedFd<'_>) -> Result<Event> {
        let poll_err = |e| Error::io("poll", Some(self.ready.as_raw_fd()), e);
        loop {
            let mut fds = vec![self.ready.as_fd(), cancel];
            fds.extend(self.child.exit_fd());
            let ready = os::poll_in(&fds, deadline).map_err(poll_err)?;
            // What the child said comes first: a report sent just before it died counts.
            if ready[0] {
                return Ok(Event::Said(self.message(deadline)));
            }
            if ready[1] {
                return Ok(Event::Cancelled);
            }
            if ready.get(2) == Some(&true) {
                return Ok(Event::Exited);
            }
            if os::left(deadline) == Some(Duration::ZERO) {
                // Look once more, so that a report landing at the deadline is never lost.
                if os::readable(self.ready.as_fd(), Some(Instant::now())).map_err(poll_err)? {
                    return Ok(Event::Said(self.message(deadline)));
                }
                return Ok(Event::Deadline);
            }
        }
    }

    /// Reads one message from `ready` (it is readable).
    fn message(&self, deadline: Option<Instant>) -> Message {
        let mut byte = [0u8; 1];
        match os::read(&self.ready, &mut byte) {
            Ok(1) if byte[0] == READY => Message::Ready,
            Ok(1) if byte[0] == DONE => Message::Done { handover: false },
            Ok(1) if byte[0] == DONE_WITH_HANDOVER => Message::Done { handover: true },
            Ok(1) if byte[0] == FAIL => Message::Failed(self.reason(deadline)),
            _ => Message::Closed,
        }
    }

    /// Reads a failure reason (after its first byte) until EOF, `MAX_REASON` bytes or the
    /// deadline.
    fn reason(&self, deadline: Option<Instant>) -> String {
        let mut buf = vec![0u8; MAX_REASON];
        let mut len = 0;
        while len < buf.len() && matches!(os::readable(self.ready.as_fd(), deadline), Ok(true)) {
            match os::read(&self.ready, &mut buf[len..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => len += n,
            }
        }
        String::from_utf8_lossy(&buf[..len]).into_owned()
    }
}

/// The fd table for `n` fds is `len` bytes: longer than an environment string may be.
fn too_long(exe: &Path, n: usize, len: usize) -> Error {
    Error::Exec {
        path: exe.to_path_buf(),
        source: io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the fd table for {n} fds is {len} bytes, over the limit of {}",
                wire::MAX_LEN
            ),
        ),
    }
}

// ---- The child's side ----------------------------------------------------------------

/// A new generation's link to the generation that started it.
#[derive(Debug)]
pub(crate) struct Parent {
    pid: u32,
    /// Write end of `ready`: used by `ready()` and `fail()`, dropped once used up.
    ready: Mutex<Option<OwnedFd>>,
    /// Read end of `commit`: the decision, then the old generation's report.
    commit: Arc<OwnedFd>,
    /// Read end of `parent`: EOF once the parent has exited.
    lifeline: Arc<OwnedFd>,
}

/// What the previous generation decided once this one reported ready.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// It committed: this generation takes over. What followed the `C`: the upgrade
    /// records, not parsed yet.
    Committed(Vec<u8>),
    /// It died before deciding (or was already gone): this generation is alone.
    Alone,
    /// `stop()` was called here while we waited.
    Stopped,
}

impl Parent {
    pub(crate) fn new(ready: OwnedFd, commit: OwnedFd, lifeline: OwnedFd) -> Parent {
        Parent {
            pid: std::os::unix::process::parent_id(),
            ready: Mutex::new(Some(ready)),
            commit: Arc::new(commit),
            lifeline: Arc::new(lifeline),
        }
    }

    /// The parent's pid (as it was at start-up).
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the parent has exited (every thread of it) by `deadline`.
    pub(crate) fn gone_by(&self, deadline: Option<Instant>) -> Result<bool> {
        os::readable(self.lifeline.as_fd(), deadline)
            .map_err(|e| Error::io("poll", Some(self.lifeline.as_raw_fd()), e))
    }

    /// Reports ready, then waits for the parent's decision (or for `cancel`). Nothing
    /// outside this process has changed when it returns.
    pub(crate) fn report_ready(&self, cancel: BorrowedFd<'_>) -> Result<Decision> {
        match self.send(&[READY], false) {
            Ok(true) => {}
            // EPIPE: the parent is gone; `fail()` used the pipe up.
            Ok(false) => return Ok(Decision::Alone),
            Err(e) => return Err(e),
        }
        let poll_err = |e| Error::io("poll", Some(self.commit.as_raw_fd()), e);
        let ready = os::poll_in(&[self.commit.as_fd(), cancel], None).map_err(poll_err)?;
        if !ready[0] && ready[1] {
            return Ok(Decision::Stopped);
        }
        // The `C` and the records, in one read (see `records`).
        Ok(
            match crate::sys::records::read_payload(self.commit.as_fd(), 1) {
                Ok(mut bytes) if bytes.first() == Some(&COMMIT) => {
                    bytes.remove(0);
                    Decision::Committed(bytes)
                }
                // EOF: the parent died before it decided.
                _ => Decision::Alone,
            },
        )
    }

    /// The read end of `commit`, where the old generation's report follows the commit.
    pub(crate) fn report_pipe(&self) -> Arc<OwnedFd> {
        Arc::clone(&self.commit)
    }

    /// Tells the parent that this generation has taken over (the last message), and
    /// whether it holds its end of the handover channel.
    pub(crate) fn confirm(&self, handover: bool) {
        let v = crate::handover::VERSION;
        let with = [DONE_WITH_HANDOVER, v, v];
        let msg: &[u8] = if handover { &with } else { &[DONE] };
        let _ = self.send(msg, true);
    }

    /// The lifeline's read end (EOF once the parent has exited), shared with the
    /// handover channel's receiver.
    pub(crate) fn lifeline(&self) -> Arc<OwnedFd> {
        Arc::clone(&self.lifeline)
    }

    /// Tells the parent why this generation gives up (the last message).
    pub(crate) fn fail(&self, reason: &str) {
        let reason = clip(reason, MAX_REASON);
        let mut msg = Vec::with_capacity(1 + reason.len());
        msg.push(FAIL);
        msg.extend_from_slice(reason.as_bytes());
        let _ = self.send(&msg, true);
    }

    /// Writes `msg` to `ready`; `last` drops the pipe afterwards. `Ok(false)` if the
    /// parent is gone (`EPIPE`) or the pipe is used up.
    fn send(&self, msg: &[u8], last: bool) -> Result<bool> {
        let mut ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        let Some(fd) = ready.as_ref() else {
            return Ok(false);
        };
        let sent = match os::write_all(fd, msg) {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => false,
            Err(e) => {
                return Err(Error::io(
                    "write to the readiness pipe",
                    Some(fd.as_raw_fd()),
                    e,
                ))
            }
        };
        if last || !sent {
            *ready = None;
        }
        Ok(sent)
    }
}
