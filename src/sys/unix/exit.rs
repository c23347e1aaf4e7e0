//! The exit notification on Unix: a pipe whose only write end is closed when this
//! process should exit, so that the read end is readable (EOF) for every waiter from
//! then on, in `poll`, epoll, mio or tokio alike.

use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::exit::Wake;
use crate::sys::announce::Announcer;
use crate::sys::os;
use crate::sys::records::Records;

/// What [`crate::Exit`] is on Unix: the pipe's read end, whether an upgrade fired it,
/// and what a [`Drain`] needs of the generation.
#[derive(Debug)]
pub(crate) struct Exit {
    rd: OwnedFd,
    upgraded: Arc<AtomicBool>,
    world: Arc<Announcer>,
    records: Arc<Records>,
}

impl Exit {
    pub(crate) fn fired(&self) -> bool {
        matches!(
            os::readable(self.rd.as_fd(), Some(Instant::now())),
            Ok(true)
        )
    }

    pub(crate) fn wait(&self) {
        while !matches!(os::readable(self.rd.as_fd(), None), Ok(true)) {
            // poll on a valid fd fails only for lack of memory: back off, retry.
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the notification, `fd` readable, or the timeout; the notification wins
    /// a tie. Until the previous generation is seen gone, its lifeline is polled too,
    /// and its end noted in the upgrade's record when it closes.
    pub(crate) fn wait_readable(&self, fd: BorrowedFd<'_>, timeout: Option<Duration>) -> Wake {
        let deadline = os::deadline(timeout);
        loop {
            let lifeline = self.records.lifeline();
            let mut fds = vec![self.rd.as_fd(), fd];
            fds.extend(lifeline);
            match os::poll_in(&fds, deadline) {
                Ok(ready) if ready[0] => return Wake::Exit,
                Ok(ready) if ready[1] => return Wake::Readable,
                Ok(ready) if ready.get(2) == Some(&true) => self.records.parent_gone(),
                Ok(_) if os::left(deadline) == Some(Duration::ZERO) => return Wake::TimedOut,
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    pub(crate) fn upgraded(&self) -> bool {
        self.upgraded.load(Ordering::SeqCst)
    }

    pub(crate) fn try_clone(&self) -> Result<Exit> {
        let rd = self
            .rd
            .try_clone()
            .map_err(|e| Error::io("fcntl(F_DUPFD_CLOEXEC)", Some(self.rd.as_raw_fd()), e))?;
        Ok(Exit {
            rd,
            upgraded: Arc::clone(&self.upgraded),
            world: Arc::clone(&self.world),
            records: Arc::clone(&self.records),
        })
    }

    /// A drain of `timeout` from now.
    pub(crate) fn drain(&self, timeout: Duration) -> Drain {
        let now = Instant::now();
        Drain {
            upgraded: Arc::clone(&self.upgraded),
            world: Arc::clone(&self.world),
            records: Arc::clone(&self.records),
            // A timeout beyond what an Instant holds: a year is as good as forever.
            deadline: now
                .checked_add(timeout)
                .unwrap_or_else(|| now + Duration::from_secs(366 * 24 * 3600)),
            last_extension: Mutex::new(None),
        }
    }

    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        self.rd.as_fd()
    }

    pub(crate) fn into_fd(self) -> OwnedFd {
        self.rd
    }
}

/// How long each extension asks systemd for, at most: a drain that stops ticking is
/// killed this long after its last tick (or at `TimeoutStopSec=`, if that is later).
pub(crate) const EXTENSION: Duration = Duration::from_secs(10);
/// How often a tick asks again.
pub(crate) const TICK: Duration = Duration::from_millis(2500);
/// What an extension asks for beyond the drain's deadline: time to cut what is left and
/// exit.
pub(crate) const EXIT_MARGIN: Duration = Duration::from_secs(5);

/// What [`crate::Drain`] is on Unix.
#[derive(Debug)]
pub(crate) struct Drain {
    upgraded: Arc<AtomicBool>,
    world: Arc<Announcer>,
    records: Arc<Records>,
    deadline: Instant,
    /// When the last extension was asked for.
    last_extension: Mutex<Option<Instant>>,
}

impl Drain {
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Asks for more time if this is the main generation stopping and the last request
    /// is [`TICK`] old; returns how long to wait before the next tick, or `None` once
    /// the deadline has passed.
    pub(crate) fn tick(&self) -> Option<Duration> {
        let now = Instant::now();
        let left = self
            .deadline
            .checked_duration_since(now)
            .filter(|l| !l.is_zero())?;
        let mut last = self
            .last_extension
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let due = last.map_or(true, |t| now.duration_since(t) >= TICK);
        if due && !self.upgraded.load(Ordering::SeqCst) {
            let ask = (left + EXIT_MARGIN).min(EXTENSION);
            if self.world.extend_stop(ask) {
                *last = Some(now);
            }
        }
        let next = last.map_or(TICK, |t| TICK.saturating_sub(now.duration_since(t)));
        Some(next.min(left))
    }

    /// The drain is over: after an upgrade, the record notes the counts and the new
    /// generation hears them.
    pub(crate) fn finish(&self, drained: u64, force_closed: u64) {
        if self.upgraded.load(Ordering::SeqCst) {
            self.records.drained(drained, force_closed);
        }
    }
}

/// The generation's side of the notification: the write end, closed to fire it.
#[derive(Debug)]
pub(crate) struct ExitSignal {
    exit: crate::Exit,
    wr: Mutex<Option<OwnedFd>>,
    /// Set when it fires, for the handover receiver (no system call to look).
    fired: Arc<AtomicBool>,
}

impl ExitSignal {
    /// The notification of a generation that tells `world`, and keeps `records`.
    pub(crate) fn new(world: Arc<Announcer>, records: Arc<Records>) -> Result<ExitSignal> {
        let (rd, wr) = os::pipe().map_err(|e| Error::io("pipe2", None, e))?;
        let exit = Exit {
            rd,
            upgraded: Arc::new(AtomicBool::new(false)),
            world,
            records,
        };
        Ok(ExitSignal {
            exit: crate::Exit(exit),
            wr: Mutex::new(Some(wr)),
            fired: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A flag set when it fires.
    pub(crate) fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.fired)
    }

    pub(crate) fn exit(&self) -> &crate::Exit {
        &self.exit
    }

    /// Fires the notification (again: nothing happens). `upgraded`: because a new
    /// generation took over; said before it fires, so that every waiter sees it.
    pub(crate) fn fire(&self, upgraded: bool) {
        if upgraded {
            self.exit.0.upgraded.store(true, Ordering::SeqCst);
        }
        self.fired.store(true, Ordering::SeqCst);
        drop(self.wr.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}
