//! The exit notification on Unix: a pipe whose only write end is closed when this
//! process should exit, so that the read end is readable (EOF) for every waiter from
//! then on, in `poll`, epoll, mio or tokio alike.

use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::exit::Wake;
use crate::sys::os;

/// What [`crate::Exit`] is on Unix: the pipe's read end, and whether an upgrade fired it.
#[derive(Debug)]
pub(crate) struct Exit {
    rd: OwnedFd,
    upgraded: Arc<AtomicBool>,
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
    /// a tie.
    pub(crate) fn wait_readable(&self, fd: BorrowedFd<'_>, timeout: Option<Duration>) -> Wake {
        let deadline = os::deadline(timeout);
        loop {
            match os::poll_in(&[self.rd.as_fd(), fd], deadline) {
                Ok(ready) if ready[0] => return Wake::Exit,
                Ok(ready) if ready[1] => return Wake::Readable,
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
        })
    }

    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        self.rd.as_fd()
    }

    pub(crate) fn into_fd(self) -> OwnedFd {
        self.rd
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
    pub(crate) fn new() -> Result<ExitSignal> {
        let (rd, wr) = os::pipe().map_err(|e| Error::io("pipe2", None, e))?;
        let exit = Exit {
            rd,
            upgraded: Arc::new(AtomicBool::new(false)),
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
