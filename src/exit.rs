//! The exit notification and what waits on it: [`Exit`], [`Wake`], and the accept loop
//! that ends with it, [`Incoming`].

use std::fmt;
#[cfg(unix)]
use std::io;
#[cfg(unix)]
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::drain::Drain;
use crate::error::Result;
#[cfg(unix)]
use crate::kinds::Accept;

/// A generation's exit notification: it fires, and stays fired, once this process should
/// stop accepting, finish what is in flight and exit. That is when a new generation has
/// taken over ([`upgraded`](Exit::upgraded) is then true) or
/// [`Upgrader::stop`](crate::Upgrader::stop) was called.
///
/// Get it from [`Upgrader::exit`](crate::Upgrader::exit). It is the read end of a pipe
/// that becomes readable when it fires, so it can be waited on in `poll`, epoll, mio or
/// tokio next to your listeners ([`AsFd`]; do not read from it or change its flags),
/// as well as with [`wait`](Exit::wait) or [`wait_readable`](Exit::wait_readable).
/// [`try_clone`](Exit::try_clone) gives an owned one, for code that must not borrow the
/// `Upgrader` (an async task, say); the tokio guide shows one in a `select!`.
///
/// **Order.** After a successful upgrade the notification fires *before*
/// [`upgrade`](crate::Upgrader::upgrade) returns in the thread that called it, so that
/// this generation stops accepting as soon as it can. Code that ends the process when it
/// fires may therefore exit before that thread has seen the result: the result is
/// recorded first, so read it on the waiting side, from
/// [`Upgrader::status`](crate::Upgrader::status):
///
/// ```no_run
/// # fn drain(upg: &tableflip::Upgrader) {
/// upg.exit().wait();
/// if upg.exit().upgraded() {
///     // Recorded before the notification fired: always there.
///     let new_pid = upg.status().last_upgrade().and_then(|l| l.result.clone().ok());
///     eprintln!("upgraded to pid {new_pid:?}; draining");
/// }
/// # }
/// ```
pub struct Exit(pub(crate) crate::sys::Exit);

impl fmt::Debug for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exit")
            .field("fired", &self.fired())
            .finish_non_exhaustive()
    }
}

impl Exit {
    /// Blocks until the notification fires.
    pub fn wait(&self) {
        self.0.wait()
    }

    /// Whether it has fired.
    pub fn fired(&self) -> bool {
        self.0.fired()
    }

    /// Whether it fired because an upgrade succeeded (rather than because of
    /// [`stop`](crate::Upgrader::stop)).
    pub fn upgraded(&self) -> bool {
        self.0.upgraded()
    }

    /// Waits until `fd` is readable (a connection waits on a listener, say), the
    /// notification fires, or `timeout` passes (`None`: no timeout). The notification
    /// wins a tie, so a generation stops accepting as soon as it is told.
    /// [`Upgrader::incoming`](crate::Upgrader::incoming) is the accept loop built on it.
    #[cfg(unix)]
    #[cfg_attr(docsrs, doc(cfg(unix)))]
    pub fn wait_readable(&self, fd: impl AsFd, timeout: Option<Duration>) -> Wake {
        self.0.wait_readable(fd.as_fd(), timeout)
    }

    /// Starts this generation's drain, to end `timeout` from now: call it once the
    /// notification has fired, tick it from the drain loop, and finish it with what
    /// became of the connections. At a stop under systemd it asks for the time the drain
    /// needs; after an upgrade it completes the upgrade's record. See [`Drain`].
    pub fn drain(&self, timeout: Duration) -> Drain {
        Drain(self.0.drain(timeout))
    }

    /// An owned handle of its own on the same notification (a duplicate of the fd),
    /// `'static`: for a task or a thread that must not borrow the `Upgrader`. It stays
    /// usable after the `Upgrader` is dropped (it has fired then).
    pub fn try_clone(&self) -> Result<Exit> {
        self.0.try_clone().map(Exit)
    }
}

#[cfg(unix)]
impl AsFd for Exit {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(unix)]
impl AsRawFd for Exit {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// The fd itself: the read end of a pipe, readable once the notification fired (tokio:
/// `tokio::net::unix::pipe::Receiver::from_owned_fd`).
#[cfg(unix)]
impl From<Exit> for OwnedFd {
    fn from(exit: Exit) -> OwnedFd {
        exit.0.into_fd()
    }
}

/// What [`Exit::wait_readable`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The fd is readable: accept (without blocking) until `WouldBlock`.
    Readable,
    /// The exit notification fired: stop accepting, finish what is in flight.
    Exit,
    /// The timeout passed.
    TimedOut,
}

/// How many connections [`Incoming`] accepts in a row before it looks at the exit
/// notification again.
#[cfg(unix)]
const BATCH: usize = 64;

/// The connections accepted from a listener until the exit notification fires:
/// [`Upgrader::incoming`](crate::Upgrader::incoming).
#[cfg(unix)]
#[cfg_attr(docsrs, doc(cfg(unix)))]
pub struct Incoming<'a, L: Accept> {
    exit: &'a Exit,
    listener: &'a L,
    /// Accepts left before the notification is looked at again.
    batch: usize,
    /// The listener could not be made non-blocking: said once, then the end.
    failed: Option<io::Error>,
    /// The last accept ran out of fds or memory: wait a little before the next.
    back_off: bool,
}

#[cfg(unix)]
impl<L: Accept> fmt::Debug for Incoming<'_, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming")
            .field("listener", &self.listener.listener_fd().as_raw_fd())
            .field("exit", self.exit)
            .finish_non_exhaustive()
    }
}

#[cfg(unix)]
impl<'a, L: Accept> Incoming<'a, L> {
    pub(crate) fn new(exit: &'a Exit, listener: &'a L) -> Incoming<'a, L> {
        Incoming {
            exit,
            listener,
            batch: 0,
            failed: listener.make_nonblocking().err(),
            back_off: false,
        }
    }
}

#[cfg(unix)]
impl<L: Accept> Iterator for Incoming<'_, L> {
    type Item = io::Result<L::Stream>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.failed.take() {
            self.batch = usize::MAX; // the end: see below
            return Some(Err(e));
        }
        if self.batch == usize::MAX {
            return None;
        }
        loop {
            if self.batch > 0 {
                match crate::sys::os::retry(|| self.listener.accept_fd()) {
                    Ok(fd) => {
                        self.batch -= 1;
                        return Some(Ok(L::Stream::from(fd)));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.batch = 0,
                    Err(e) => {
                        self.batch = 0;
                        self.back_off = out_of_resources(&e);
                        return Some(Err(e));
                    }
                }
            }
            // Out of fds or memory: the listener stays readable, so wait a little (for
            // the notification only) rather than spin.
            let pause = std::mem::take(&mut self.back_off).then_some(Duration::from_millis(10));
            let wake = match pause {
                Some(pause) => match self.exit.wait_readable(self.exit, Some(pause)) {
                    Wake::TimedOut => Wake::Readable,
                    _ => Wake::Exit,
                },
                None => self.exit.wait_readable(self.listener.listener_fd(), None),
            };
            match wake {
                Wake::Exit => return None,
                Wake::Readable => self.batch = BATCH,
                Wake::TimedOut => {}
            }
        }
    }
}

/// An accept error that goes away only when fds or memory are freed.
#[cfg(unix)]
fn out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
