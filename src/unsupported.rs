//! The crate where there are no graceful upgrades: every target that is not Unix
//! (Windows first).
//!
//! Go tableflip builds on Windows with a stub, so that a program that uses it builds on
//! every platform and upgrades where it can; this is that stub. It has the public types
//! of the Unix crate with the same method names and signatures, and every call that can
//! fail fails with [`Error::Unsupported`]. [`Upgrader::new`] always fails, so an
//! `Upgrader` (and an `ExitHandle`) never exists here: their methods are there for the
//! compiler, and their bodies are an empty `match`. A program falls
//! back to serving without upgrades:
//!
//! ```ignore
//! match tableflip::Upgrader::new(options) {
//!     Ok(upg) => serve_with_upgrades(upg),
//!     Err(tableflip::Error::Unsupported { .. }) => serve(TcpListener::bind(addr)?),
//!     Err(e) => return Err(e.into()),
//! }
//! ```
//!
//! Left out, because the types they take or return do not exist here: everything with
//! Unix sockets (`Fds::listen_unix*`, `unix_*`, `add_unix_*`, `listen_unix_seqpacket*`,
//! and the control socket: the `control` module and `Upgrader::status`, which returns
//! its `Status`) and with `OwnedFd` or `BorrowedFd` (`Fds::add_fd`, `Fds::fd`,
//! `Upgrader::exit_fd`, `ExitHandle`'s `AsFd`, `AsRawFd` and
//! `From<ExitHandle> for OwnedFd`). Adapted on
//! Windows: what is handed a socket (`Options::before_bind`, `Fds::listen_tcp_with`,
//! `Fds::listen_udp_with`) gets a `BorrowedSocket`, and `Upgrader::wait_readable` takes
//! `impl AsSocket`, so code written against std's sockets compiles on both. Targets that
//! are neither Unix nor Windows lack those four as well. `UnixAddr` exists (it is plain
//! data); nothing takes it.
//!
//! `portable.rs` names the shared API and is compiled on every target, so this file
//! cannot drift from the Unix one unnoticed. `Options` and `Error` are the Unix crate's
//! own (`options.rs`, `error.rs`).

use std::convert::Infallible;
use std::fmt;
use std::net::{TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
#[cfg(windows)]
use std::os::windows::io::{AsSocket, BorrowedSocket};
use std::time::Duration;

use crate::adoption::{Adoption, InheritedFd};
use crate::error::{Error, Result};
use crate::options::Options;

/// What [`Options::before_bind`] keeps: a function of the socket being set up.
#[cfg(windows)]
pub(crate) type BeforeBind =
    std::sync::Arc<dyn Fn(BorrowedSocket<'_>) -> std::io::Result<()> + Send + Sync>;
/// Neither Unix nor Windows: there is no socket type to hand over, and no
/// `Options::before_bind` to set one.
#[cfg(not(windows))]
pub(crate) type BeforeBind =
    std::sync::Arc<dyn Fn(Infallible) -> std::io::Result<()> + Send + Sync>;

fn unsupported<T>(op: &'static str) -> Result<T> {
    Err(Error::Unsupported { op, needs: "Unix" })
}

/// The largest state [`Upgrader::set_state`] accepts: 64 MiB (as on Unix).
pub const MAX_STATE_SIZE: u64 = 64 << 20;

/// Graceful upgrades, which this platform does not have: [`Upgrader::new`] fails with
/// [`Error::Unsupported`], so no `Upgrader` ever exists here. See the Unix documentation
/// for what each method does there.
#[derive(Debug)]
pub struct Upgrader {
    never: Infallible,
}

impl Upgrader {
    /// Fails with [`Error::Unsupported`]: this platform has no graceful upgrades.
    pub fn new(_options: Options) -> Result<Upgrader> {
        unsupported("Upgrader::new")
    }

    /// The fd registry (never reached here).
    pub fn fds(&self) -> &Fds {
        match self.never {}
    }

    /// Whether this process was started by an upgrade (never reached here).
    pub fn has_parent(&self) -> bool {
        match self.never {}
    }

    /// Waits for the previous generation to exit (never reached here).
    pub fn wait_for_parent(&self, _timeout: Duration) -> Result<bool> {
        match self.never {}
    }

    /// Reports ready to the previous generation (never reached here).
    pub fn ready(&self) -> Result<Adoption> {
        match self.never {}
    }

    /// Gives up instead of becoming ready (never reached here).
    pub fn fail(&self, _reason: impl fmt::Display) -> ! {
        match self.never {}
    }

    /// Sets the state for the next generation (never reached here).
    pub fn set_state(&self, _state: &[u8]) -> Result<()> {
        match self.never {}
    }

    /// Takes the state of the previous generation (never reached here).
    pub fn take_state(&self) -> Result<Option<Vec<u8>>> {
        match self.never {}
    }

    /// Starts the next generation (never reached here).
    pub fn upgrade(&self) -> Result<u32> {
        match self.never {}
    }

    /// Stops upgrading (never reached here).
    pub fn stop(&self) {
        match self.never {}
    }

    /// The sending end of the handover channel (never reached here).
    pub fn handover(&self) -> Result<handover::Sender> {
        match self.never {}
    }

    /// Blocks until this process should exit (never reached here).
    pub fn wait_for_exit(&self) {
        match self.never {}
    }

    /// An owned handle on the exit notification (never reached here).
    pub fn exit_handle(&self) -> Result<ExitHandle> {
        match self.never {}
    }

    /// Waits until `socket` is readable or this process should exit (never reached
    /// here). Takes `impl AsSocket` where Unix takes `impl AsFd`, so that a call with a
    /// std socket compiles on both.
    #[cfg(windows)]
    pub fn wait_readable(&self, _socket: impl AsSocket, _timeout: Option<Duration>) -> Wake {
        match self.never {}
    }

    /// Whether an upgrade succeeded (never reached here).
    pub fn upgraded(&self) -> bool {
        match self.never {}
    }

    /// Whether this process should exit now (never reached here).
    pub fn should_exit(&self) -> bool {
        match self.never {}
    }
}

/// What [`Upgrader::wait_readable`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The fd is readable: accept (without blocking) until `WouldBlock`.
    Readable,
    /// This process should exit: stop accepting, finish what is in flight.
    Exit,
    /// The timeout passed.
    TimedOut,
}

/// An owned handle on the exit notification, from [`Upgrader::exit_handle`] (never
/// exists here).
#[derive(Debug)]
pub struct ExitHandle {
    never: Infallible,
}

impl ExitHandle {
    /// Blocks until the process should exit (never reached here).
    pub fn wait(&self) {
        match self.never {}
    }

    /// Whether the process should exit now (never reached here).
    pub fn fired(&self) -> bool {
        match self.never {}
    }
}

/// One stable pid in front of the generations, which this platform does not have:
/// [`Keeper::run`] fails with [`Error::Unsupported`].
#[derive(Debug, Clone, Default)]
pub struct Keeper {
    _private: (),
}

impl Keeper {
    /// The defaults.
    pub fn new() -> Keeper {
        Keeper::default()
    }

    /// Gives up after `restarts` restarts within `within` (where there is a keeper).
    pub fn restart_limit(self, _restarts: usize, _within: Duration) -> Self {
        self
    }

    /// The wait before a restart (where there is a keeper).
    pub fn backoff(self, _first: Duration, _max: Duration) -> Self {
        self
    }

    /// How long a stop may take before what is left is killed (where there is a keeper).
    pub fn stop_timeout(self, _timeout: Duration) -> Self {
        self
    }

    /// How long a successor may take to take over (where there is a keeper).
    pub fn takeover_timeout(self, _timeout: Duration) -> Self {
        self
    }

    /// Fails with [`Error::Unsupported`].
    pub fn run(self) -> Result<()> {
        unsupported("Keeper::run")
    }
}

/// What the IP methods take: anything [`ToSocketAddrs`] that can also be named in an
/// error message.
pub trait Address: ToSocketAddrs + fmt::Debug {}

impl<T: ToSocketAddrs + fmt::Debug> Address for T {}

/// The fd registry. Only [`Fds::standalone`] makes one here, and every method that can
/// fail fails with [`Error::Unsupported`]; nothing is bound.
#[derive(Debug)]
pub struct Fds {
    _private: (),
}

impl Fds {
    /// A registry of its own, for tests. Here, one whose methods fail.
    pub fn standalone() -> Fds {
        Fds { _private: () }
    }

    /// The inherited fds not yet taken: none here.
    pub fn inherited(&self) -> Vec<InheritedFd> {
        Vec::new()
    }

    /// Fails with [`Error::Unsupported`].
    pub fn listen_tcp(&self, _addr: impl Address) -> Result<TcpListener> {
        unsupported("Fds::listen_tcp")
    }

    /// Fails with [`Error::Unsupported`]. `setup` takes a `BorrowedSocket` here.
    #[cfg(windows)]
    pub fn listen_tcp_with(
        &self,
        _addr: impl Address,
        _setup: impl FnMut(BorrowedSocket<'_>) -> std::io::Result<()>,
    ) -> Result<TcpListener> {
        unsupported("Fds::listen_tcp_with")
    }

    /// Fails with [`Error::Unsupported`].
    pub fn listen_tcp_group(&self, _addr: impl Address, _n: usize) -> Result<Vec<TcpListener>> {
        unsupported("Fds::listen_tcp_group")
    }

    /// Fails with [`Error::Unsupported`].
    pub fn tcp_listener_group(&self, _addr: impl Address) -> Result<Vec<TcpListener>> {
        unsupported("Fds::tcp_listener_group")
    }

    /// Fails with [`Error::Unsupported`].
    pub fn listen_udp_group(&self, _addr: impl Address, _n: usize) -> Result<Vec<UdpSocket>> {
        unsupported("Fds::listen_udp_group")
    }

    /// Fails with [`Error::Unsupported`].
    pub fn tcp_listener(&self, _addr: impl Address) -> Result<Option<TcpListener>> {
        unsupported("Fds::tcp_listener")
    }

    /// Fails with [`Error::Unsupported`].
    pub fn add_tcp_listener(&self, _listener: &TcpListener) -> Result<()> {
        unsupported("Fds::add_tcp_listener")
    }

    /// Fails with [`Error::Unsupported`].
    pub fn add_tcp_stream(&self, _name: &str, _stream: &TcpStream) -> Result<()> {
        unsupported("Fds::add_tcp_stream")
    }

    /// Fails with [`Error::Unsupported`].
    pub fn tcp_stream(&self, _name: &str) -> Result<Option<TcpStream>> {
        unsupported("Fds::tcp_stream")
    }

    /// Fails with [`Error::Unsupported`].
    pub fn listen_udp(&self, _addr: impl Address) -> Result<UdpSocket> {
        unsupported("Fds::listen_udp")
    }

    /// Fails with [`Error::Unsupported`]. `setup` takes a `BorrowedSocket` here.
    #[cfg(windows)]
    pub fn listen_udp_with(
        &self,
        _addr: impl Address,
        _setup: impl FnMut(BorrowedSocket<'_>) -> std::io::Result<()>,
    ) -> Result<UdpSocket> {
        unsupported("Fds::listen_udp_with")
    }

    /// Fails with [`Error::Unsupported`].
    pub fn udp_socket(&self, _addr: impl Address) -> Result<Option<UdpSocket>> {
        unsupported("Fds::udp_socket")
    }

    /// Fails with [`Error::Unsupported`].
    pub fn add_udp_socket(&self, _socket: &UdpSocket) -> Result<()> {
        unsupported("Fds::add_udp_socket")
    }
}

/// The handover channel, which this platform does not have: its ends never exist (see
/// the Unix documentation). Only what needs no Unix type is here: the two ends and the
/// limits.
pub mod handover {
    use std::convert::Infallible;

    /// The most connections in one message (as on Unix).
    pub const MAX_FDS: usize = 253;
    /// The most bytes of `unread` per connection (as on Unix).
    pub const MAX_UNREAD: usize = 64 << 10;
    /// The most bytes of `state` per connection (as on Unix).
    pub const MAX_STATE: usize = 64 << 10;
    /// The largest message (as on Unix).
    pub const MAX_MESSAGE: usize = 192 << 10;
    /// The version of the message format (as on Unix).
    pub const VERSION: u8 = 1;

    /// The old generation's end (never exists here).
    #[derive(Debug)]
    pub struct Sender {
        never: Infallible,
    }

    impl Sender {
        /// The new generation's pid (never reached here).
        pub fn pid(&self) -> u32 {
            match self.never {}
        }
    }

    /// The new generation's end (never exists here).
    #[derive(Debug)]
    pub struct Receiver {
        never: Infallible,
    }

    impl Receiver {
        /// The previous generation's pid (never reached here).
        pub fn pid(&self) -> u32 {
            match self.never {}
        }
    }
}
