//! The fd registry: the sockets and files that travel to the next generation.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::sync::{Mutex, MutexGuard};

use rustix::net::{SocketAddrAny, SocketType};

use crate::adoption::{Adoption, InheritedFd};
use crate::error::{Error, Result};
use crate::inherit::{Inherited, InheritedSet};
use crate::socket::{self, inet, local_inet, unix, BeforeBind, PerCall, Setup, SocketFile};
use crate::unix_addr::UnixAddr;
use crate::wire::{Extra, Key, VAR};

/// The fds this generation passes on: Go tableflip's `Fds`.
///
/// Reach it through [`Upgrader::fds`](crate::Upgrader::fds). Every socket is found by its
/// kind and address (or, for connections and other fds, a name). The `listen_*` methods
/// return the socket inherited from the previous generation if there is one and create
/// it otherwise; the inherit-only lookups (`tcp_listener`, ...) return `Ok(None)` when
/// nothing was inherited under that key, or it was taken already. The `add_*` methods
/// register a socket you made yourself.
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
/// The crate never changes an fd's `O_NONBLOCK` flag: it belongs to the open file
/// description, which both generations share.
///
/// The `*_with` methods take a setup function for that one socket, called (only if a new
/// socket is made) after `socket()` and [`before_bind`](crate::Options::before_bind),
/// before `bind()`: Go's `ListenWithCallback`. Both run without the registry's lock held,
/// so they may use the registry themselves.
///
/// For tests of code that takes its sockets from a registry, [`Fds::standalone`] makes
/// one without an `Upgrader`.
pub struct Fds {
    inner: Mutex<Registry>,
    before_bind: Option<BeforeBind>,
    backlog: i32,
}

impl fmt::Debug for Fds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reg = self.lock();
        f.debug_struct("Fds")
            .field("inherited", &reg.inherited.len())
            .field("used", &reg.used.len())
            .finish()
    }
}

#[derive(Debug)]
struct Used {
    key: Key,
    fd: OwnedFd,
    /// For Unix sockets with a path: where the socket file is, and which file it was,
    /// so that it is removed only while it is still ours.
    socket_file: Option<SocketFile>,
    /// For Unix sockets: the kernel chose the abstract name (asked for with `""`).
    autobound: bool,
    /// Inherited from the previous generation (rather than made or added here).
    inherited: bool,
}

impl Used {
    fn new(key: Key, fd: OwnedFd, socket_file: Option<SocketFile>) -> Used {
        Used {
            key,
            fd,
            socket_file,
            autobound: false,
            inherited: false,
        }
    }

    /// What the table says about it beyond its key.
    fn extra(&self) -> Extra {
        match (&self.socket_file, self.autobound) {
            (Some(file), _) => Extra::File(file.id()),
            (None, true) => Extra::Autobound,
            (None, false) => Extra::None,
        }
    }
}

/// No per-call setup.
fn no_setup(_: BorrowedFd<'_>) -> io::Result<()> {
    Ok(())
}

#[derive(Debug, Default)]
struct Registry {
    /// Inherited, not yet taken. Dropped (closed) by `ready()`.
    inherited: InheritedSet,
    /// How many entries of `used` have each key (most have none: no scan needed).
    used_keys: HashMap<Key, usize>,
    /// Taken, created or added: passed to the next generation.
    used: Vec<Used>,
    /// The inherited fds taken so far, for the adoption report.
    taken: Vec<InheritedFd>,
    /// Let go of after a successful upgrade; closed by `close_copies` (`stop()`) or on
    /// drop.
    retired: Vec<OwnedFd>,
}

impl Fds {
    pub(crate) fn new(
        inherited: Vec<Inherited>,
        before_bind: Option<BeforeBind>,
        backlog: i32,
    ) -> Fds {
        Fds {
            inner: Mutex::new(Registry {
                inherited: InheritedSet::new(inherited),
                used_keys: HashMap::new(),
                used: Vec::new(),
                taken: Vec::new(),
                retired: Vec::new(),
            }),
            before_bind,
            backlog,
        }
    }

    /// A registry of its own, for tests: it inherits nothing and passes nothing on, and
    /// any number of them may exist at once (unlike [`Upgrader`](crate::Upgrader)), so
    /// code that takes its sockets from an `&Fds` can be tested in parallel test threads.
    ///
    /// ```
    /// fn bind_web(fds: &tableflip::Fds) -> tableflip::Result<std::net::TcpListener> {
    ///     fds.listen_tcp("127.0.0.1:0")
    /// }
    ///
    /// # fn main() -> tableflip::Result<()> {
    /// // In a #[test]:
    /// let fds = tableflip::Fds::standalone();
    /// let listener = bind_web(&fds)?;
    /// assert!(listener.local_addr().unwrap().port() != 0);
    /// // The same address again is the same socket, as in a real generation.
    /// let again = fds.listen_tcp(listener.local_addr().unwrap())?;
    /// assert_eq!(again.local_addr().unwrap(), listener.local_addr().unwrap());
    /// # Ok(())
    /// # }
    /// ```
    pub fn standalone() -> Fds {
        Fds::new(Vec::new(), None, libc::SOMAXCONN)
    }

    /// The inherited fds not yet taken, in the order the previous generation passed them
    /// (Go's `Fds.Files()`): what this generation may still take, and what
    /// [`ready`](crate::Upgrader::ready) will close.
    pub fn inherited(&self) -> Vec<InheritedFd> {
        self.lock()
            .inherited
            .iter()
            .map(|(_, e)| InheritedFd::new(e.fd.as_raw_fd(), &e.key))
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock cannot leave the registry half-updated in a way
        // that matters more than refusing to work, so recover the guard.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- TCP -------------------------------------------------------------------------

    /// A TCP listener on `addr`: the inherited one, or a new one.
    ///
    /// A new listener is made with `socket(SOCK_CLOEXEC)`, `SO_REUSEADDR`, the
    /// [`before_bind`](crate::Options::before_bind) hook, `bind` and `listen` with the
    /// configured backlog. When `addr` resolves to several addresses, each is tried in
    /// order, inherited first. Port 0 matches an inherited listener on the same IP
    /// whatever its port, and a new listener on port 0 is registered under the port the
    /// kernel chose, so the next generation finds it again.
    ///
    /// Calling it again for an address already listened on returns another handle to the
    /// same socket.
    pub fn listen_tcp(&self, addr: impl Address) -> Result<TcpListener> {
        self.listen_tcp_with(addr, no_setup)
    }

    /// [`listen_tcp`](Fds::listen_tcp), with `setup` called on a new socket before
    /// `bind()` (see [`Fds`]).
    pub fn listen_tcp_with(
        &self,
        addr: impl Address,
        mut setup: impl FnMut(BorrowedFd<'_>) -> io::Result<()>,
    ) -> Result<TcpListener> {
        let addrs = resolve(addr)?;
        self.listen_inet(&addrs, Key::TcpListener, SocketType::STREAM, &mut setup)
            .map(TcpListener::from)
    }

    /// A group of `n` TCP listeners on one address, for `SO_REUSEPORT` (one listener per
    /// thread, the kernel spreading connections across them). Every socket of the group
    /// travels to the next generation, in order, so no accept queue is thrown away.
    ///
    /// The next generation asking for the same `n` gets the same sockets back. Asking for
    /// more takes every inherited socket and binds the missing ones (with `SO_REUSEPORT`,
    /// which this method sets on new sockets before the
    /// [`before_bind`](crate::Options::before_bind) hook runs). Asking for fewer takes the
    /// first `n`; the others are closed by [`ready`](crate::Upgrader::ready), and
    /// connections queued on them when the old generation stops accepting are lost
    /// (closing one socket of a `SO_REUSEPORT` group drops its queue): keep `n` stable,
    /// or shrink a group only when traffic allows.
    ///
    /// `addr` must resolve to one address; port 0 works as for
    /// [`listen_tcp`](Fds::listen_tcp), all sockets sharing the port the first one got.
    pub fn listen_tcp_group(&self, addr: impl Address, n: usize) -> Result<Vec<TcpListener>> {
        let addr = resolve_one(addr)?;
        Ok(self
            .listen_group(addr, n, Key::TcpListener, SocketType::STREAM)?
            .into_iter()
            .map(TcpListener::from)
            .collect())
    }

    /// Every inherited TCP listener on `addr` not yet taken, in the order the previous
    /// generation passed them (empty if there are none).
    pub fn tcp_listener_group(&self, addr: impl Address) -> Result<Vec<TcpListener>> {
        let addr = resolve_one(addr)?;
        let mut reg = self.lock();
        let mut out = Vec::new();
        while let Some(fd) = reg.take(&Key::TcpListener(addr))? {
            out.push(TcpListener::from(fd));
        }
        Ok(out)
    }

    /// A group of `n` UDP sockets bound to one address with `SO_REUSEPORT`; see
    /// [`listen_tcp_group`](Fds::listen_tcp_group).
    pub fn listen_udp_group(&self, addr: impl Address, n: usize) -> Result<Vec<UdpSocket>> {
        let addr = resolve_one(addr)?;
        Ok(self
            .listen_group(addr, n, Key::Udp, SocketType::DGRAM)?
            .into_iter()
            .map(UdpSocket::from)
            .collect())
    }

    /// The inherited TCP listener on `addr`, if there is one not yet taken.
    pub fn tcp_listener(&self, addr: impl Address) -> Result<Option<TcpListener>> {
        let addrs = resolve(addr)?;
        let mut reg = self.lock();
        for a in &addrs {
            if let Some(fd) = reg.take(&Key::TcpListener(*a))? {
                return Ok(Some(TcpListener::from(fd)));
            }
        }
        Ok(None)
    }

    /// Registers a TCP listener you made, under its local address, so it is passed on.
    pub fn add_tcp_listener(&self, listener: &TcpListener) -> Result<()> {
        self.add_socket(listener.as_fd(), |a| Ok(Key::TcpListener(inet(a)?)))
    }

    /// Registers an established TCP connection under `name`.
    pub fn add_tcp_stream(&self, name: &str, stream: &TcpStream) -> Result<()> {
        self.add_socket(stream.as_fd(), |_| Ok(Key::TcpStream(name.to_string())))
    }

    /// The inherited TCP connection registered under `name`, if not yet taken.
    pub fn tcp_stream(&self, name: &str) -> Result<Option<TcpStream>> {
        Ok(self
            .lock()
            .take(&Key::TcpStream(name.to_string()))?
            .map(TcpStream::from))
    }

    // ---- UDP -------------------------------------------------------------------------

    /// A UDP socket bound to `addr`: the inherited one, or a new one. Port 0 behaves as
    /// for [`listen_tcp`](Fds::listen_tcp).
    pub fn listen_udp(&self, addr: impl Address) -> Result<UdpSocket> {
        self.listen_udp_with(addr, no_setup)
    }

    /// [`listen_udp`](Fds::listen_udp), with `setup` called on a new socket before
    /// `bind()` (see [`Fds`]).
    pub fn listen_udp_with(
        &self,
        addr: impl Address,
        mut setup: impl FnMut(BorrowedFd<'_>) -> io::Result<()>,
    ) -> Result<UdpSocket> {
        let addrs = resolve(addr)?;
        self.listen_inet(&addrs, Key::Udp, SocketType::DGRAM, &mut setup)
            .map(UdpSocket::from)
    }

    /// The inherited UDP socket bound to `addr`, if there is one not yet taken.
    pub fn udp_socket(&self, addr: impl Address) -> Result<Option<UdpSocket>> {
        let addrs = resolve(addr)?;
        let mut reg = self.lock();
        for a in &addrs {
            if let Some(fd) = reg.take(&Key::Udp(*a))? {
                return Ok(Some(UdpSocket::from(fd)));
            }
        }
        Ok(None)
    }

    /// Registers a UDP socket you made, under its local address.
    pub fn add_udp_socket(&self, socket: &UdpSocket) -> Result<()> {
        self.add_socket(socket.as_fd(), |a| Ok(Key::Udp(inet(a)?)))
    }

    // ---- Unix ------------------------------------------------------------------------

    /// A Unix stream listener on a path or abstract name: the inherited one, or a new one.
    ///
    /// A path this process binds is removed again by [`Upgrader::stop`](crate::Upgrader::stop)
    /// when no upgrade succeeded; abstract names are never unlinked (there is nothing to
    /// unlink). A socket file left at the path by a process that died (`kill -9`) is
    /// removed first, if nobody accepts on it; see [`Fds`] for what is never removed.
    ///
    /// An empty path (`""`) lets the kernel choose an abstract name (Linux autobind; Go's
    /// `Listen("unix", "")`): the socket travels under the name it got, and the next
    /// generation asking for `""` again gets the first such socket it has not taken yet,
    /// in order (or asks for it by its name).
    pub fn listen_unix(&self, addr: impl Into<UnixAddr>) -> Result<UnixListener> {
        self.listen_unix_with(addr, no_setup)
    }

    /// [`listen_unix`](Fds::listen_unix), with `setup` called on a new socket before
    /// `bind()` (see [`Fds`]).
    pub fn listen_unix_with(
        &self,
        addr: impl Into<UnixAddr>,
        mut setup: impl FnMut(BorrowedFd<'_>) -> io::Result<()>,
    ) -> Result<UnixListener> {
        self.listen_unix_kind(
            addr.into(),
            Key::UnixListener,
            SocketType::STREAM,
            &mut setup,
        )
        .map(UnixListener::from)
    }

    /// The inherited Unix stream listener on `addr`, if there is one not yet taken.
    pub fn unix_listener(&self, addr: impl Into<UnixAddr>) -> Result<Option<UnixListener>> {
        Ok(self
            .lock()
            .take(&Key::UnixListener(addr.into()))?
            .map(UnixListener::from))
    }

    /// Registers a Unix listener you made, stream or `SOCK_SEQPACKET`, under its local
    /// address.
    pub fn add_unix_listener(&self, listener: &UnixListener) -> Result<()> {
        let fd = listener.as_fd();
        let seqpacket = rustix::net::sockopt::socket_type(fd) == Ok(SocketType::SEQPACKET);
        self.add_socket(fd, |a| {
            let addr = unix(a)?;
            Ok(if seqpacket {
                Key::UnixSeqpacket(addr)
            } else {
                Key::UnixListener(addr)
            })
        })
    }

    /// A `SOCK_SEQPACKET` Unix listener (Go's `"unixpacket"`): the inherited one, or a
    /// new one, with the same rules as [`listen_unix`](Fds::listen_unix). std has no
    /// type of its own for it: the `UnixListener` accepts `UnixStream`s whose reads and
    /// writes keep message boundaries.
    pub fn listen_unix_seqpacket(&self, addr: impl Into<UnixAddr>) -> Result<UnixListener> {
        self.listen_unix_seqpacket_with(addr, no_setup)
    }

    /// [`listen_unix_seqpacket`](Fds::listen_unix_seqpacket), with `setup` called on a
    /// new socket before `bind()` (see [`Fds`]).
    pub fn listen_unix_seqpacket_with(
        &self,
        addr: impl Into<UnixAddr>,
        mut setup: impl FnMut(BorrowedFd<'_>) -> io::Result<()>,
    ) -> Result<UnixListener> {
        self.listen_unix_kind(
            addr.into(),
            Key::UnixSeqpacket,
            SocketType::SEQPACKET,
            &mut setup,
        )
        .map(UnixListener::from)
    }

    /// The inherited `SOCK_SEQPACKET` Unix listener on `addr`, if there is one not yet
    /// taken.
    pub fn unix_seqpacket_listener(
        &self,
        addr: impl Into<UnixAddr>,
    ) -> Result<Option<UnixListener>> {
        Ok(self
            .lock()
            .take(&Key::UnixSeqpacket(addr.into()))?
            .map(UnixListener::from))
    }

    /// A Unix datagram socket bound to a path or abstract name: the inherited one, or a
    /// new one, with the same rules as [`listen_unix`](Fds::listen_unix).
    pub fn listen_unix_datagram(&self, addr: impl Into<UnixAddr>) -> Result<UnixDatagram> {
        self.listen_unix_datagram_with(addr, no_setup)
    }

    /// [`listen_unix_datagram`](Fds::listen_unix_datagram), with `setup` called on a new
    /// socket before `bind()` (see [`Fds`]).
    pub fn listen_unix_datagram_with(
        &self,
        addr: impl Into<UnixAddr>,
        mut setup: impl FnMut(BorrowedFd<'_>) -> io::Result<()>,
    ) -> Result<UnixDatagram> {
        self.listen_unix_kind(
            addr.into(),
            Key::UnixDatagram,
            SocketType::DGRAM,
            &mut setup,
        )
        .map(UnixDatagram::from)
    }

    /// The inherited Unix datagram socket bound to `addr`, if there is one not yet taken.
    pub fn unix_datagram(&self, addr: impl Into<UnixAddr>) -> Result<Option<UnixDatagram>> {
        Ok(self
            .lock()
            .take(&Key::UnixDatagram(addr.into()))?
            .map(UnixDatagram::from))
    }

    /// Registers a bound Unix datagram socket you made, under its local address.
    pub fn add_unix_datagram(&self, socket: &UnixDatagram) -> Result<()> {
        self.add_socket(socket.as_fd(), |a| Ok(Key::UnixDatagram(unix(a)?)))
    }

    /// Registers an established Unix stream connection under `name`.
    pub fn add_unix_stream(&self, name: &str, stream: &UnixStream) -> Result<()> {
        self.add_socket(stream.as_fd(), |_| Ok(Key::UnixStream(name.to_string())))
    }

    /// The inherited Unix stream connection registered under `name`, if not yet taken.
    pub fn unix_stream(&self, name: &str) -> Result<Option<UnixStream>> {
        Ok(self
            .lock()
            .take(&Key::UnixStream(name.to_string()))?
            .map(UnixStream::from))
    }

    // ---- Anything else ---------------------------------------------------------------

    /// Registers any fd (a file, a pipe, an eventfd, a socket of another kind) under
    /// `name`. The registry keeps a duplicate; registering a name again replaces it.
    pub fn add_fd(&self, name: &str, fd: impl AsFd) -> Result<()> {
        let fd = fd.as_fd();
        let copy = dup_kept(fd)?;
        self.lock()
            .insert(Used::new(Key::Fd(name.to_string()), copy, None));
        Ok(())
    }

    /// The inherited fd registered under `name`, if not yet taken.
    pub fn fd(&self, name: &str) -> Result<Option<OwnedFd>> {
        self.lock().take(&Key::Fd(name.to_string()))
    }

    // ---- Internals -------------------------------------------------------------------

    /// How new sockets are made: the `before_bind` hook, `per_call`, the backlog.
    fn setup<'a>(&'a self, per_call: PerCall<'a>) -> Setup<'a> {
        Setup {
            before_bind: self.before_bind.as_deref(),
            per_call,
            backlog: self.backlog,
        }
    }

    /// The socket on one of `addrs`: in use already, inherited, or bound now. The hooks
    /// run without the lock; a socket another thread registered meanwhile wins.
    fn listen_inet(
        &self,
        addrs: &[SocketAddr],
        make_key: fn(SocketAddr) -> Key,
        ty: SocketType,
        per_call: PerCall<'_>,
    ) -> Result<OwnedFd> {
        let existing = |fds: &Self| -> Result<Option<OwnedFd>> {
            let mut reg = fds.lock();
            for a in addrs {
                if let Some(fd) = reg.existing(&make_key(*a))? {
                    return Ok(Some(fd));
                }
            }
            Ok(None)
        };
        if let Some(fd) = existing(self)? {
            return Ok(fd);
        }
        let mut setup = self.setup(per_call);
        let mut last = None;
        for a in addrs {
            match socket::bind_inet(*a, ty, false, &mut setup) {
                Ok(fd) => {
                    let key = make_key(local_inet(fd.as_fd()).unwrap_or(*a));
                    return self.register_new(key, fd, None, false);
                }
                // Another thread may have bound it meanwhile.
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                    if let Some(fd) = existing(self)? {
                        return Ok(fd);
                    }
                    last = Some(listen_err(a, e));
                }
                Err(e) => last = Some(listen_err(a, e)),
            }
        }
        Err(last.unwrap_or_else(|| listen_err("(no address)", io::ErrorKind::InvalidInput.into())))
    }

    /// Registers a socket this process just made, unless another thread registered one
    /// under the same key meanwhile: then that one is returned, and this one closed.
    fn register_new(
        &self,
        key: Key,
        fd: OwnedFd,
        socket_file: Option<SocketFile>,
        autobound: bool,
    ) -> Result<OwnedFd> {
        let mut reg = self.lock();
        if !autobound && reg.used_keys.contains_key(&key) {
            if let Some(theirs) = reg.existing(&key)? {
                return Ok(theirs);
            }
        }
        let copy = dup_kept(fd.as_fd())?;
        reg.insert(Used {
            autobound,
            ..Used::new(key, copy, socket_file)
        });
        Ok(fd)
    }

    fn listen_group(
        &self,
        addr: SocketAddr,
        n: usize,
        make_key: fn(SocketAddr) -> Key,
        ty: SocketType,
    ) -> Result<Vec<OwnedFd>> {
        let mut reg = self.lock();
        let mut key = make_key(addr);
        // Sockets this process already registered under the key come first...
        let mut out: Vec<OwnedFd> = Vec::with_capacity(n);
        for u in reg.used.iter().filter(|u| u.key == key).take(n) {
            out.push(dup(u.fd.as_fd())?);
        }
        // ...then inherited ones, in order (port 0 matches the inherited port)...
        while out.len() < n {
            let Some(found) = reg
                .find_inherited(&key)?
                .and_then(|i| reg.inherited.get(i))
                .map(|e| e.key.clone())
            else {
                break;
            };
            key = found;
            let Some(fd) = reg.take(&key)? else { break };
            out.push(fd);
        }
        // ...then new ones, all on the port the first one got.
        let mut no_call = no_setup;
        let mut setup = self.setup(&mut no_call);
        while out.len() < n {
            let target = match &key {
                Key::TcpListener(a) | Key::Udp(a) => *a,
                _ => addr,
            };
            let fd = socket::bind_inet(target, ty, true, &mut setup)
                .map_err(|e| listen_err(target, e))?;
            key = make_key(local_inet(fd.as_fd()).unwrap_or(target));
            reg.push_used(Used::new(key.clone(), dup_kept(fd.as_fd())?, None));
            out.push(fd);
        }
        Ok(out)
    }

    /// The Unix socket on `addr`: in use already, inherited, or bound now (an empty path:
    /// the next inherited autobound one of this kind, or a new one).
    fn listen_unix_kind(
        &self,
        addr: UnixAddr,
        make_key: fn(UnixAddr) -> Key,
        ty: SocketType,
        per_call: PerCall<'_>,
    ) -> Result<OwnedFd> {
        let autobind = matches!(&addr, UnixAddr::Path(p) if p.as_os_str().is_empty());
        {
            let mut reg = self.lock();
            let found = if autobind {
                reg.take_autobound(make_key)?
            } else {
                reg.existing(&make_key(addr.clone()))?
            };
            if let Some(fd) = found {
                return Ok(fd);
            }
        }
        let (fd, socket_file, bound) = socket::bind_unix(&addr, ty, &mut self.setup(per_call))
            .map_err(|source| {
                let shown = if autobind {
                    "(a name chosen by the kernel)".to_string()
                } else {
                    addr.to_string()
                };
                listen_err(shown, source)
            })?;
        self.register_new(make_key(bound), fd, socket_file, autobind)
    }

    fn add_socket(
        &self,
        fd: BorrowedFd<'_>,
        make_key: impl FnOnce(SocketAddrAny) -> io::Result<Key>,
    ) -> Result<()> {
        let raw = fd.as_raw_fd();
        let local =
            rustix::net::getsockname(fd).map_err(|e| Error::io("getsockname", Some(raw), e))?;
        let key = make_key(local).map_err(|e| Error::io("getsockname", Some(raw), e))?;
        socket::check(fd, &key).map_err(|m| Error::Listen {
            addr: format!("{key} (fd {raw}): {}", m.reason),
            source: m
                .source
                .unwrap_or_else(|| io::ErrorKind::InvalidInput.into()),
        })?;
        let socket_file = key.unix_path().and_then(SocketFile::of);
        let copy = dup_kept(fd)?;
        self.lock().insert(Used::new(key, copy, socket_file));
        Ok(())
    }

    /// Calls `f` with the fds to pass on (and what the table says of each beyond its
    /// key), holding the registry lock.
    pub(crate) fn with_passed<R>(
        &self,
        f: impl FnOnce(&[(BorrowedFd<'_>, &Key, Extra)]) -> R,
    ) -> R {
        let reg = self.lock();
        let list: Vec<(BorrowedFd<'_>, &Key, Extra)> = reg
            .used
            .iter()
            .map(|u| (u.fd.as_fd(), &u.key, u.extra()))
            .collect();
        f(&list)
    }

    /// Closes inherited fds nobody took, removing their socket files, and reports what
    /// was taken and what was closed (and, for the fd store, the keys closed). Called by
    /// `ready()`.
    pub(crate) fn close_unused(&self) -> (Adoption, Vec<(Key, Extra)>) {
        let (unused, taken) = {
            let mut reg = self.lock();
            (reg.inherited.take_all(), std::mem::take(&mut reg.taken))
        };
        let mut closed = Vec::with_capacity(unused.len());
        let mut keys = Vec::with_capacity(unused.len());
        let mut to_close = Vec::with_capacity(unused.len());
        for Inherited { fd, key, extra } in unused {
            closed.push(InheritedFd::new(fd.as_raw_fd(), &key));
            // Only remove the file if the fd is bound there and the file is the one the
            // previous generation recorded (none is recorded for sockets from systemd,
            // whose files belong to systemd).
            if let (Some(path), Extra::File(id)) = (key.unix_path(), extra) {
                if let Some(file) = SocketFile::recorded(path, Some(id))
                    .filter(|_| socket::bound_to(fd.as_fd(), path))
                {
                    file.unlink();
                }
            }
            to_close.push(fd);
            keys.push((key, extra));
        }
        crate::batch::close_all(to_close);
        let adoption = Adoption {
            taken,
            closed,
            handover: None,
        };
        (adoption, keys)
    }

    /// Lets go of every fd: after a successful upgrade the new generation owns them.
    /// They are closed by [`close_copies`](Fds::close_copies) (`stop()`, or the
    /// `Upgrader`'s drop), not now: closing thousands of fds would delay `upgrade()` for
    /// nothing.
    pub(crate) fn retire_all(&self) {
        let mut reg = self.lock();
        reg.used_keys.clear();
        let used = std::mem::take(&mut reg.used);
        let inherited = reg.inherited.take_all();
        reg.retired.extend(
            used.into_iter()
                .map(|u| u.fd)
                .chain(inherited.into_iter().map(|i| i.fd)),
        );
    }

    /// Closes the registry's copies of every fd: those it would pass on, the inherited
    /// ones nobody took, and those let go of after an upgrade. Called by `stop()`, after
    /// which nothing is passed on; the handles the application took stay open.
    pub(crate) fn close_copies(&self) {
        self.retire_all();
        let retired = std::mem::take(&mut self.lock().retired);
        crate::batch::close_all(retired);
    }

    /// Removes the socket files of the Unix sockets in use. Called by `stop()` when no
    /// upgrade succeeded. Inherited sockets are included only if this generation became
    /// ready: before that, the previous generation is the one serving on them.
    pub(crate) fn unlink_socket_files(&self, include_inherited: bool) {
        let reg = self.lock();
        for u in reg
            .used
            .iter()
            .filter(|u| include_inherited || !u.inherited)
        {
            if let Some(file) = &u.socket_file {
                file.unlink();
            }
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        crate::batch::close_all(std::mem::take(&mut self.retired));
    }
}

impl Registry {
    /// The socket already in use under `key`, or the inherited one, as a new handle.
    fn existing(&mut self, key: &Key) -> Result<Option<OwnedFd>> {
        if self.used_keys.contains_key(key) {
            if let Some(u) = self.used.iter().find(|u| u.key == *key) {
                return dup(u.fd.as_fd()).map(Some);
            }
        }
        self.take(key)
    }

    fn push_used(&mut self, used: Used) {
        *self.used_keys.entry(used.key.clone()).or_insert(0) += 1;
        self.used.push(used);
    }

    /// Takes the inherited fd under `key`: checks it, moves it to `used` and returns a
    /// duplicate.
    fn take(&mut self, key: &Key) -> Result<Option<OwnedFd>> {
        match self.find_inherited(key)? {
            Some(i) => self.take_slot(i),
            None => Ok(None),
        }
    }

    /// Takes the first inherited socket of `make_key`'s kind whose name the kernel chose.
    fn take_autobound(&mut self, make_key: fn(UnixAddr) -> Key) -> Result<Option<OwnedFd>> {
        let kind = std::mem::discriminant(&make_key(UnixAddr::Abstract(Vec::new())));
        let slot = self
            .inherited
            .iter()
            .find(|(_, e)| e.extra == Extra::Autobound && std::mem::discriminant(&e.key) == kind);
        match slot.map(|(i, _)| i) {
            Some(i) => self.take_slot(i),
            None => Ok(None),
        }
    }

    /// Takes inherited slot `i`: checks it, moves it to `used` and returns a duplicate.
    fn take_slot(&mut self, i: usize) -> Result<Option<OwnedFd>> {
        let Some(entry) = self.inherited.remove(i) else {
            return Ok(None);
        };
        let raw = entry.fd.as_raw_fd();
        if let Err(m) = socket::check(entry.fd.as_fd(), &entry.key) {
            // Not what the table said: forget it without closing it (it may be somebody
            // else's fd), and adopt nothing.
            let Inherited { fd, key: found, .. } = entry;
            std::mem::forget(fd);
            return Err(Error::FdTable {
                var: VAR,
                entry: format!("{raw},{}", found.tag()),
                reason: format!(
                    "fd {raw} is not the {found} it was declared as: {}",
                    m.reason
                ),
                source: m.source,
            });
        }
        let copy = dup(entry.fd.as_fd())?;
        self.taken.push(InheritedFd::new(raw, &entry.key));
        // The identity recorded by the previous generation, not the file there now: a file
        // swapped in meanwhile is somebody else's.
        let socket_file = match (entry.key.unix_path(), entry.extra) {
            (Some(path), Extra::File(id)) => SocketFile::recorded(path, Some(id)),
            _ => None,
        };
        self.push_used(Used {
            autobound: entry.extra == Extra::Autobound,
            inherited: true,
            ..Used::new(entry.key, entry.fd, socket_file)
        });
        Ok(Some(copy))
    }

    fn find_inherited(&mut self, key: &Key) -> Result<Option<usize>> {
        if let Some(i) = self.inherited.find(key) {
            return Ok(Some(i));
        }
        // Port 0: any port on the same IP.
        let port0 =
            |want: &SocketAddr, have: &SocketAddr| want.port() == 0 && want.ip() == have.ip();
        if let Some((i, _)) = self.inherited.iter().find(|(_, e)| match (&e.key, key) {
            (Key::TcpListener(have), Key::TcpListener(want)) | (Key::Udp(have), Key::Udp(want)) => {
                port0(want, have)
            }
            _ => false,
        }) {
            return Ok(Some(i));
        }
        // Same name or path under another kind: an error, and the fd stays.
        let clash = self.inherited.iter().find(|(_, e)| match (&e.key, key) {
            (
                Key::TcpStream(a) | Key::UnixStream(a) | Key::Fd(a),
                Key::TcpStream(b) | Key::UnixStream(b) | Key::Fd(b),
            ) => a == b,
            (have, want) => have.unix_addr().is_some() && have.unix_addr() == want.unix_addr(),
        });
        match clash {
            Some((_, e)) => Err(Error::WrongKind {
                key: key.to_string(),
                passed_as: e.key.kind_name(),
            }),
            None => Ok(None),
        }
    }

    /// Adds `used`, replacing what was registered under its key (unless autobound: each
    /// of those is a socket of its own).
    fn insert(&mut self, used: Used) {
        if !used.autobound && self.used_keys.remove(&used.key).is_some() {
            self.used.retain(|u| u.key != used.key);
        }
        self.push_used(used);
    }
}

fn listen_err(addr: impl fmt::Display, source: io::Error) -> Error {
    Error::Listen {
        addr: addr.to_string(),
        source,
    }
}

/// What the IP methods take: anything [`ToSocketAddrs`] (`"host:port"`, a
/// `SocketAddr`, `(ip, port)`, ...) that can also be named in an error message.
pub trait Address: ToSocketAddrs + fmt::Debug {}

impl<T: ToSocketAddrs + fmt::Debug> Address for T {}

fn resolve(addr: impl Address) -> Result<Vec<SocketAddr>> {
    let named = || format!("{addr:?}").trim_matches('"').to_string();
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|source| Error::Listen {
            addr: named(),
            source,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(Error::Listen {
            addr: named(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "no address to listen on"),
        });
    }
    Ok(addrs)
}

fn resolve_one(addr: impl Address) -> Result<SocketAddr> {
    let addrs = resolve(addr)?;
    match addrs.as_slice() {
        [one] => Ok(*one),
        _ => Err(Error::Listen {
            addr: format!("{addrs:?}"),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "a socket group needs an address that resolves to exactly one address",
            ),
        }),
    }
}

/// A handle for the caller (the lowest free number, as any new fd).
fn dup(fd: BorrowedFd<'_>) -> Result<OwnedFd> {
    // F_DUPFD_CLOEXEC: the copy is close-on-exec from birth.
    fd.try_clone_to_owned()
        .map_err(|e| Error::io("fcntl(F_DUPFD_CLOEXEC)", Some(fd.as_raw_fd()), e))
}

/// The registry's own copy: at a number from [`kept_floor`] up, away from the
/// application's fds, so that the copies sit side by side. They are passed at those
/// numbers, and the next generation makes them close-on-exec again, and closes the
/// ones it does not use, a range at a time (`close_range`) instead of one by one.
fn dup_kept(fd: BorrowedFd<'_>) -> Result<OwnedFd> {
    match rustix::io::fcntl_dupfd_cloexec(fd, kept_floor()) {
        Ok(copy) => Ok(copy),
        // No room up there (a low fd limit, or all taken): anywhere, then.
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::MFILE) => dup(fd),
        Err(e) => Err(Error::io("fcntl(F_DUPFD_CLOEXEC)", Some(fd.as_raw_fd()), e)),
    }
}

/// Where the registry's copies start: half the soft fd limit, at most 4096 (a higher
/// floor would grow the fd table that every spawn copies).
fn kept_floor() -> RawFd {
    static FLOOR: std::sync::OnceLock<RawFd> = std::sync::OnceLock::new();
    *FLOOR.get_or_init(|| {
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        (soft / 2).min(4096) as RawFd
    })
}
