//! [`Fds`]: the sockets and files that travel to the next generation, on every platform
//! (where upgrades are unsupported, no `Fds` exists: [`Upgrader::new`](crate::Upgrader::new)
//! fails).

use std::fmt;
#[cfg(unix)]
use std::os::unix::io::BorrowedFd;
#[cfg(windows)]
use std::os::windows::io::BorrowedSocket;

use crate::adoption::InheritedFd;
use crate::error::Result;
#[cfg(unix)]
use crate::kinds::Named;
use crate::kinds::{Address, Group, Listen};

/// The largest state [`Fds::set_state`] accepts: 64 MiB.
pub const MAX_STATE_SIZE: u64 = 64 << 20;

/// The fds this generation passes on: Go tableflip's `Fds`.
///
/// Reach it through [`Upgrader::fds`](crate::Upgrader::fds). One method per action,
/// generic over the kind of socket ([`Listen`](crate::Listen) kinds are found by the address they are
/// bound to, [`Named`](crate::Named) ones by a name, [`Named`](crate::Named)):
///
/// | | listen or inherit | inherit only | register your own |
/// |---|---|---|---|
/// | a socket bound to an address | [`listen`](Fds::listen), [`listen_with`](Fds::listen_with), [`listen_group`](Fds::listen_group) | [`take`](Fds::take) | [`add`](Fds::add) |
/// | a connection or any other fd | | [`take_named`](Fds::take_named) | [`add_named`](Fds::add_named) |
///
/// ```no_run
/// # fn f(upg: &tableflip::Upgrader) -> tableflip::Result<()> {
/// use std::net::TcpListener;
/// // Inherited from the previous generation if it had it, bound now otherwise.
/// let listener: TcpListener = upg.fds().listen("127.0.0.1:8080")?;
/// # Ok(()) }
/// ```
///
/// The registry keeps its own copy (a `dup`) of every fd it hands out or is given, so
/// dropping the std socket you got back does not stop it from being passed on.
/// [`Upgrader::stop`](crate::Upgrader::stop) (or dropping the `Upgrader`) closes those
/// copies, as Go's `Stop` does: once it has returned, this process holds only the
/// handles you took (a pipe's write end passed on reaches EOF when the new generation
/// and your own handles have closed it). After a successful upgrade nothing is passed
/// on any more either way.
///
/// An inherited fd is checked before it is trusted (it is open, a socket of the declared
/// type, family and address, listening or not as declared) and is close-on-exec again.
/// The registry never changes an fd's `O_NONBLOCK` flag: it belongs to the open file
/// description, which both generations share.
///
/// Unix socket files: a path this generation binds is removed by
/// [`Upgrader::stop`](crate::Upgrader::stop) if no upgrade succeeded, and one that a
/// previous generation bound and this one did not take is removed by
/// [`ready`](crate::Upgrader::ready); in both cases only while the file is still the
/// socket that was bound there (same device and inode). A stale file (nobody accepts on
/// it) is replaced when a socket is bound at its path. Files of sockets from systemd's
/// socket activation are never removed: they are systemd's.
///
/// For tests of code that takes its sockets from a registry,
/// [`Upgrader::standalone`](crate::Upgrader::standalone) makes an `Upgrader` (and so a
/// registry) of its own, any number of times.
pub struct Fds {
    pub(crate) reg: crate::sys::Registry,
}

impl fmt::Debug for Fds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.reg.fmt(f)
    }
}

impl Fds {
    /// A socket of kind `S` bound to `addr`: the one inherited from the previous
    /// generation, or a new one (Go's `Listen`, `ListenPacket`).
    ///
    /// ```no_run
    /// # fn f(upg: &tableflip::Upgrader) -> tableflip::Result<()> {
    /// use std::net::{TcpListener, UdpSocket};
    /// use std::os::unix::net::UnixListener;
    ///
    /// let web: TcpListener = upg.fds().listen("127.0.0.1:8080")?;
    /// let dns: UdpSocket = upg.fds().listen("0.0.0.0:5353")?;
    /// let admin = upg.fds().listen::<UnixListener>("/run/myapp/admin.sock")?;
    /// # Ok(()) }
    /// ```
    ///
    /// A new socket is made with `socket(SOCK_CLOEXEC)`, `SO_REUSEADDR` (IP), the
    /// [`before_bind`](crate::Options::before_bind) hook, `bind` and, for listeners,
    /// `listen` with the configured backlog. When `addr` resolves to several addresses,
    /// each is tried in order, inherited first. Calling it again for an address already
    /// listened on returns another handle to the same socket.
    ///
    /// - **Port 0** matches an inherited socket of the same kind on the same IP whatever
    ///   its port, and a new socket on port 0 is registered under the port the kernel
    ///   chose, so the next generation finds it again.
    /// - **Unix paths**: a path this process binds is removed again by
    ///   [`Upgrader::stop`](crate::Upgrader::stop) when no upgrade succeeded. A socket
    ///   file left at the path by a process that died (`kill -9`) is removed first, if
    ///   nobody accepts on it; see [`Fds`] for what is never removed. Abstract names are
    ///   never unlinked (there is nothing to unlink).
    /// - **An empty path** (`""`) lets the kernel choose an abstract name (Linux autobind;
    ///   Go's `Listen("unix", "")`): the socket travels under the name it got, and the
    ///   next generation asking for `""` again gets the first such socket of the kind it
    ///   has not taken yet, in order (or asks for it by its name).
    pub fn listen<S: Listen>(&self, addr: impl Address<S>) -> Result<S> {
        self.reg.listen(addr)
    }

    /// [`listen`](Fds::listen), with `setup` called on a new socket after `socket()` and
    /// [`before_bind`](crate::Options::before_bind), before `bind()` (Go's
    /// `ListenWithCallback`): socket options for this one socket. It runs only if a new
    /// socket is made, without the registry's lock held, so it may use the registry.
    #[cfg(unix)]
    #[cfg_attr(docsrs, doc(cfg(unix)))]
    pub fn listen_with<S: Listen>(
        &self,
        addr: impl Address<S>,
        setup: impl FnMut(BorrowedFd<'_>) -> std::io::Result<()>,
    ) -> Result<S> {
        self.reg.listen_with(addr, setup)
    }

    /// [`listen`](Fds::listen), with `setup` called on a new socket before `bind()` (Go's
    /// `ListenWithCallback`). Here a `BorrowedSocket`, where Unix has a `BorrowedFd`, so
    /// that code written against std's sockets compiles on both.
    #[cfg(windows)]
    #[cfg_attr(docsrs, doc(cfg(windows)))]
    pub fn listen_with<S: Listen>(
        &self,
        addr: impl Address<S>,
        setup: impl FnMut(BorrowedSocket<'_>) -> std::io::Result<()>,
    ) -> Result<S> {
        self.reg.listen_with(addr, setup)
    }

    /// A group of `n` sockets bound to one address with `SO_REUSEPORT`: one listener per
    /// thread, the kernel spreading connections (or datagrams) across them. Every socket
    /// of the group travels to the next generation, in order, so no accept queue is
    /// thrown away.
    ///
    /// The next generation asking for the same `n` gets the same sockets back. Asking for
    /// more takes every inherited socket and binds the missing ones (with `SO_REUSEPORT`,
    /// which this method sets on new sockets before the
    /// [`before_bind`](crate::Options::before_bind) hook runs). Asking for fewer takes the
    /// first `n`; the others are closed by [`ready`](crate::Upgrader::ready), and
    /// connections queued on them when the old generation stops accepting are lost
    /// (closing one socket of a `SO_REUSEPORT` group drops its queue, unless
    /// `net.ipv4.tcp_migrate_req` is set): keep `n` stable, or shrink a group only when
    /// traffic allows.
    ///
    /// `addr` must resolve to one address; port 0 works as for [`listen`](Fds::listen),
    /// all sockets sharing the port the first one got.
    pub fn listen_group<S: Group>(&self, addr: impl Address<S>, n: usize) -> Result<Vec<S>> {
        self.reg.listen_group(addr, n)
    }

    /// The inherited socket of kind `S` bound to `addr`, if there is one not yet taken:
    /// inherit, never bind. Call it again for the next one of a group. `Ok(None)` when
    /// nothing was inherited under that address (a first start, or a socket the previous
    /// generation did not have), or it was taken already.
    ///
    /// Fails with [`Error::WrongKind`](crate::Error::WrongKind) when something was inherited at that address as
    /// another kind (the fd stays where it is), and with [`Error::FdTable`](crate::Error::FdTable) when the fd
    /// is not the socket the table declared.
    pub fn take<S: Listen>(&self, addr: impl Address<S>) -> Result<Option<S>> {
        self.reg.take(addr)
    }

    /// Registers a socket you made yourself, under the address it is bound to
    /// (`getsockname`), so that it is passed on. It is checked first: a socket of
    /// another kind (a blocking accept on a stream socket passed as a seqpacket
    /// listener, say) is refused. The registry keeps a duplicate; registering an address
    /// again replaces it.
    pub fn add<S: Listen>(&self, socket: &S) -> Result<()> {
        self.reg.add(socket)
    }

    /// Registers an established connection ([`TcpStream`](std::net::TcpStream), [`UnixStream`](std::os::unix::net::UnixStream)) or any other
    /// fd ([`OwnedFd`](std::os::unix::io::OwnedFd), [`File`](std::fs::File)) under `name`, so that it is passed on.
    /// The registry keeps a duplicate; registering a name again replaces it.
    ///
    /// To move a connection that is in use when the upgrade starts, hand it over after
    /// the upgrade instead (the [handover](crate::handover) channel).
    #[cfg(unix)]
    #[cfg_attr(docsrs, doc(cfg(unix)))]
    pub fn add_named<N: Named>(&self, name: &str, fd: &N) -> Result<()> {
        self.reg.add_named(name, fd)
    }

    /// The inherited fd registered under `name` as kind `N`, if not yet taken. An
    /// [`OwnedFd`](std::os::unix::io::OwnedFd) or [`File`](std::fs::File) takes what was registered as either; a
    /// connection is checked to be a connected socket of its family.
    #[cfg(unix)]
    #[cfg_attr(docsrs, doc(cfg(unix)))]
    pub fn take_named<N: Named>(&self, name: &str) -> Result<Option<N>> {
        self.reg.take_named(name)
    }

    /// The inherited fds not yet taken, in the order the previous generation passed them
    /// (Go's `Fds.Files()`): what this generation may still take, and what
    /// [`ready`](crate::Upgrader::ready) will close.
    pub fn inherited(&self) -> Vec<InheritedFd> {
        self.reg.inherited()
    }

    /// Sets the state to hand to the next generation: an opaque blob (TLS session-ticket
    /// keys, counters, a configuration digest) of at most
    /// [`MAX_STATE_SIZE`](crate::MAX_STATE_SIZE) bytes. Call it before
    /// [`upgrade`](crate::Upgrader::upgrade); calling it again replaces it.
    ///
    /// The bytes are copied now into a sealed memory file (`memfd`, Linux) or an unlinked
    /// temporary file (elsewhere), which travels in the fd table: the next generation
    /// finds the whole blob as soon as it starts, so a parent that dies meanwhile cannot
    /// leave it half-written.
    pub fn set_state(&self, state: &[u8]) -> Result<()> {
        self.reg.set_state(state)
    }

    /// Takes the state the previous generation handed over with
    /// [`set_state`](Fds::set_state): `Ok(None)` if there is none, or it was taken
    /// already, or [`ready`](crate::Upgrader::ready) has discarded it (call it before).
    pub fn take_state(&self) -> Result<Option<Vec<u8>>> {
        self.reg.take_state()
    }
}
