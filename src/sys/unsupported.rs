//! Where there are no graceful upgrades: every target that is not Unix (Windows first),
//! chosen by one `cfg` in `lib.rs`.
//!
//! Go tableflip builds on Windows with a stub, so that a program that uses it builds on
//! every platform and upgrades where it can; this is that stub. The public types
//! ([`Upgrader`], [`Fds`], [`Exit`]) are the same code as on Unix, wrapping these:
//! [`Upgrader::new`] always fails with [`Error::Unsupported`], so none of them ever
//! exists here, and their methods are there for the compiler (each body is an empty
//! `match`). A program falls back to serving without upgrades:
//!
//! ```ignore
//! match tableflip::Upgrader::new(options) {
//!     Ok(upg) => serve_with_upgrades(upg),
//!     Err(tableflip::Error::Unsupported { .. }) => serve(TcpListener::bind(addr)?),
//!     Err(e) => return Err(e.into()),
//! }
//! ```
//!
//! What the public API leaves out here is listed once, in the crate docs ("Platforms").
//!
//! [`Upgrader`]: crate::Upgrader
//! [`Upgrader::new`]: crate::Upgrader::new
//! [`Fds`]: crate::Fds
//! [`Exit`]: crate::Exit
//! [`Error::Unsupported`]: crate::Error::Unsupported

use std::convert::Infallible;
use std::fmt;
#[cfg(windows)]
use std::os::windows::io::BorrowedSocket;
use std::time::Duration;

use crate::adoption::{Adoption, InheritedFd};
use crate::error::{Error, Result};
use crate::exit::Exit as PublicExit;
use crate::fds::Fds;
use crate::kinds::{Address, Group, Listen};
use crate::options::Options;
use crate::status::Status;

fn unsupported<T>(op: &'static str) -> Result<T> {
    Err(Error::Unsupported { op, needs: "Unix" })
}

/// [`Upgrader`](crate::Upgrader) here: never exists.
pub(crate) struct Generation {
    never: Infallible,
}

impl fmt::Debug for Generation {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.never {}
    }
}

impl Generation {
    pub(crate) fn new(_options: Options) -> Result<Generation> {
        unsupported("Upgrader::new")
    }

    pub(crate) fn standalone(_options: Options) -> Result<Generation> {
        unsupported("Upgrader::standalone")
    }

    pub(crate) fn fds(&self) -> &Fds {
        match self.never {}
    }

    pub(crate) fn has_parent(&self) -> bool {
        match self.never {}
    }

    pub(crate) fn wait_for_parent(&self, _timeout: Duration) -> Result<bool> {
        match self.never {}
    }

    pub(crate) fn ready(&self) -> Result<Adoption> {
        match self.never {}
    }

    pub(crate) fn fail(&self, _reason: &str) -> ! {
        match self.never {}
    }

    pub(crate) fn upgrade(&self) -> Result<u32> {
        match self.never {}
    }

    pub(crate) fn stop(&self) {
        match self.never {}
    }

    pub(crate) fn exit(&self) -> &PublicExit {
        match self.never {}
    }

    pub(crate) fn status(&self) -> Status {
        match self.never {}
    }
}

/// [`Fds`] here: never exists.
pub(crate) struct Registry {
    never: Infallible,
}

impl fmt::Debug for Registry {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.never {}
    }
}

impl Registry {
    pub(crate) fn listen<S: Listen>(&self, _addr: impl Address<S>) -> Result<S> {
        match self.never {}
    }

    #[cfg(windows)]
    pub(crate) fn listen_with<S: Listen>(
        &self,
        _addr: impl Address<S>,
        _setup: impl FnMut(BorrowedSocket<'_>) -> std::io::Result<()>,
    ) -> Result<S> {
        match self.never {}
    }

    pub(crate) fn listen_group<S: Group>(
        &self,
        _addr: impl Address<S>,
        _n: usize,
    ) -> Result<Vec<S>> {
        match self.never {}
    }

    pub(crate) fn take<S: Listen>(&self, _addr: impl Address<S>) -> Result<Option<S>> {
        match self.never {}
    }

    pub(crate) fn add<S: Listen>(&self, _socket: &S) -> Result<()> {
        match self.never {}
    }

    pub(crate) fn inherited(&self) -> Vec<InheritedFd> {
        match self.never {}
    }

    pub(crate) fn set_state(&self, _state: &[u8]) -> Result<()> {
        match self.never {}
    }

    pub(crate) fn take_state(&self) -> Result<Option<Vec<u8>>> {
        match self.never {}
    }
}

/// [`Exit`](crate::Exit) here: never exists.
#[derive(Debug)]
pub(crate) struct Exit {
    never: Infallible,
}

impl Exit {
    pub(crate) fn wait(&self) {
        match self.never {}
    }

    pub(crate) fn fired(&self) -> bool {
        match self.never {}
    }

    pub(crate) fn upgraded(&self) -> bool {
        match self.never {}
    }

    pub(crate) fn try_clone(&self) -> Result<Exit> {
        match self.never {}
    }
}

impl Exit {
    pub(crate) fn drain(&self, _timeout: Duration) -> Drain {
        match self.never {}
    }
}

/// [`Drain`](crate::Drain) here: never exists.
#[derive(Debug)]
pub(crate) struct Drain {
    never: Infallible,
}

impl Drain {
    pub(crate) fn tick(&self) -> Option<Duration> {
        match self.never {}
    }

    pub(crate) fn deadline(&self) -> std::time::Instant {
        match self.never {}
    }

    pub(crate) fn finish(&self, _drained: u64, _force_closed: u64) {
        match self.never {}
    }
}
