//! The fd registry: the sockets and files that travel to the next generation.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::sync::{Mutex, MutexGuard};

use rustix::net::{SocketAddrAny, SocketType};

use crate::error::{Error, Result};
use crate::inherit::{Adoption, Inherited, InheritedFd, InheritedSet};
use crate::socket::{self, inet, local_inet, unix, BeforeBind, Setup, SocketFile};
use crate::wire::{FileId, Key, UnixAddr, VAR};

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
/// dropping the std socket you got back does not stop it from being passed on. After
/// a successful upgrade the registry drops its copies.
///
/// An inherited fd is checked before it is trusted (it is open, a socket of the declared
/// type, family and address, listening or not as declared) and is close-on-exec again.
/// The crate never changes an fd's `O_NONBLOCK` flag: it belongs to the open file
/// description, which both generations share.
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
    /// Inherited from the previous generation (rather than made or added here).
    inherited: bool,
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
            }),
            before_bind,
            backlog,
        }
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
    pub fn listen_tcp(&self, addr: impl ToSocketAddrs) -> Result<TcpListener> {
        let addrs = resolve(addr)?;
        self.listen_inet(&addrs, Key::TcpListener, SocketType::STREAM)
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
    pub fn listen_tcp_group(&self, addr: impl ToSocketAddrs, n: usize) -> Result<Vec<TcpListener>> {
        let addr = resolve_one(addr)?;
        Ok(self
            .listen_group(addr, n, Key::TcpListener, SocketType::STREAM)?
            .into_iter()
            .map(TcpListener::from)
            .collect())
    }

    /// Every inherited TCP listener on `addr` not yet taken, in the order the previous
    /// generation passed them (empty if there are none).
    pub fn tcp_listener_group(&self, addr: impl ToSocketAddrs) -> Result<Vec<TcpListener>> {
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
    pub fn listen_udp_group(&self, addr: impl ToSocketAddrs, n: usize) -> Result<Vec<UdpSocket>> {
        let addr = resolve_one(addr)?;
        Ok(self
            .listen_group(addr, n, Key::Udp, SocketType::DGRAM)?
            .into_iter()
            .map(UdpSocket::from)
            .collect())
    }

    /// The inherited TCP listener on `addr`, if there is one not yet taken.
    pub fn tcp_listener(&self, addr: impl ToSocketAddrs) -> Result<Option<TcpListener>> {
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
    pub fn listen_udp(&self, addr: impl ToSocketAddrs) -> Result<UdpSocket> {
        let addrs = resolve(addr)?;
        self.listen_inet(&addrs, Key::Udp, SocketType::DGRAM)
            .map(UdpSocket::from)
    }

    /// The inherited UDP socket bound to `addr`, if there is one not yet taken.
    pub fn udp_socket(&self, addr: impl ToSocketAddrs) -> Result<Option<UdpSocket>> {
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
    /// unlink).
    pub fn listen_unix(&self, addr: impl Into<UnixAddr>) -> Result<UnixListener> {
        self.listen_unix_kind(addr.into(), Key::UnixListener, SocketType::STREAM)
            .map(UnixListener::from)
    }

    /// The inherited Unix stream listener on `addr`, if there is one not yet taken.
    pub fn unix_listener(&self, addr: impl Into<UnixAddr>) -> Result<Option<UnixListener>> {
        Ok(self
            .lock()
            .take(&Key::UnixListener(addr.into()))?
            .map(UnixListener::from))
    }

    /// Registers a Unix stream listener you made, under its local address.
    pub fn add_unix_listener(&self, listener: &UnixListener) -> Result<()> {
        self.add_socket(listener.as_fd(), |a| Ok(Key::UnixListener(unix(a)?)))
    }

    /// A Unix datagram socket bound to a path or abstract name: the inherited one, or a
    /// new one.
    pub fn listen_unix_datagram(&self, addr: impl Into<UnixAddr>) -> Result<UnixDatagram> {
        self.listen_unix_kind(addr.into(), Key::UnixDatagram, SocketType::DGRAM)
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
        let copy = dup(fd)?;
        self.lock().insert(Key::Fd(name.to_string()), copy, None);
        Ok(())
    }

    /// The inherited fd registered under `name`, if not yet taken.
    pub fn fd(&self, name: &str) -> Result<Option<OwnedFd>> {
        self.lock().take(&Key::Fd(name.to_string()))
    }

    // ---- Internals -------------------------------------------------------------------

    fn listen_inet(
        &self,
        addrs: &[SocketAddr],
        make_key: fn(SocketAddr) -> Key,
        ty: SocketType,
    ) -> Result<OwnedFd> {
        let mut reg = self.lock();
        for a in addrs {
            if let Some(fd) = reg.existing(&make_key(*a))? {
                return Ok(fd);
            }
        }
        let mut last = None;
        for a in addrs {
            match self.bind_inet(*a, ty, false) {
                Ok(fd) => {
                    let local = local_inet(fd.as_fd()).unwrap_or(*a);
                    let copy = dup(fd.as_fd())?;
                    reg.insert(make_key(local), copy, None);
                    return Ok(fd);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Listen {
            addr: "(no address)".into(),
            source: io::ErrorKind::InvalidInput.into(),
        }))
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
        while out.len() < n {
            let target = match &key {
                Key::TcpListener(a) | Key::Udp(a) => *a,
                _ => addr,
            };
            let fd = self.bind_inet(target, ty, true)?;
            let local = local_inet(fd.as_fd()).unwrap_or(target);
            key = make_key(local);
            let copy = dup(fd.as_fd())?;
            reg.push_used(Used {
                key: key.clone(),
                fd: copy,
                socket_file: None,
                inherited: false,
            });
            out.push(fd);
        }
        Ok(out)
    }

    /// How new sockets are made: the `before_bind` hook and the backlog.
    fn setup(&self) -> Setup<'_> {
        Setup {
            before_bind: self.before_bind.as_deref(),
            backlog: self.backlog,
        }
    }

    fn bind_inet(&self, addr: SocketAddr, ty: SocketType, reuseport: bool) -> Result<OwnedFd> {
        socket::bind_inet(addr, ty, reuseport, &self.setup()).map_err(|source| Error::Listen {
            addr: addr.to_string(),
            source,
        })
    }

    fn listen_unix_kind(
        &self,
        addr: UnixAddr,
        make_key: fn(UnixAddr) -> Key,
        ty: SocketType,
    ) -> Result<OwnedFd> {
        let key = make_key(addr.clone());
        let mut reg = self.lock();
        if let Some(fd) = reg.existing(&key)? {
            return Ok(fd);
        }
        let (fd, socket_file) =
            socket::bind_unix(&addr, ty, &self.setup()).map_err(|source| Error::Listen {
                addr: addr.to_string(),
                source,
            })?;
        let copy = dup(fd.as_fd())?;
        reg.insert(key, copy, socket_file);
        Ok(fd)
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
        let socket_file = match &key {
            Key::UnixListener(UnixAddr::Path(p)) | Key::UnixDatagram(UnixAddr::Path(p)) => {
                SocketFile::of(p)
            }
            _ => None,
        };
        let copy = dup(fd)?;
        self.lock().insert(key, copy, socket_file);
        Ok(())
    }

    /// Calls `f` with the fds to pass on (and the identity of their socket files),
    /// holding the registry lock.
    pub(crate) fn with_passed<R>(
        &self,
        f: impl FnOnce(&[(RawFd, &Key, Option<FileId>)]) -> R,
    ) -> R {
        let reg = self.lock();
        let list: Vec<(RawFd, &Key, Option<FileId>)> = reg
            .used
            .iter()
            .map(|u| {
                let id = u.socket_file.as_ref().map(SocketFile::id);
                (u.fd.as_raw_fd(), &u.key, id)
            })
            .collect();
        f(&list)
    }

    /// Closes inherited fds nobody took, removing their socket files, and reports what
    /// was taken and what was closed. Called by `ready()`.
    pub(crate) fn close_unused(&self) -> Adoption {
        let (unused, taken) = {
            let mut reg = self.lock();
            (reg.inherited.take_all(), std::mem::take(&mut reg.taken))
        };
        let mut closed = Vec::with_capacity(unused.len());
        let mut to_close = Vec::with_capacity(unused.len());
        for Inherited { fd, key, file } in unused {
            closed.push(InheritedFd::new(fd.as_raw_fd(), &key));
            if let Key::UnixListener(UnixAddr::Path(p)) | Key::UnixDatagram(UnixAddr::Path(p)) =
                &key
            {
                // Only remove the file if the fd is bound there and the file is the one the
                // previous generation recorded (none is recorded for sockets from systemd,
                // whose files belong to systemd).
                if let (Some(file), true) = (
                    SocketFile::recorded(p, file),
                    socket::bound_to(fd.as_fd(), p),
                ) {
                    file.unlink();
                }
            }
            to_close.push(fd);
        }
        crate::batch::close_all(to_close);
        Adoption { taken, closed }
    }

    /// Drops every fd: after a successful upgrade the new generation owns them.
    pub(crate) fn drop_all(&self) {
        let (used, inherited) = {
            let mut reg = self.lock();
            reg.used_keys.clear();
            (std::mem::take(&mut reg.used), reg.inherited.take_all())
        };
        crate::batch::close_all(
            used.into_iter()
                .map(|u| u.fd)
                .chain(inherited.into_iter().map(|i| i.fd)),
        );
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
        let Some(i) = self.find_inherited(key)? else {
            return Ok(None);
        };
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
        let socket_file = match &entry.key {
            Key::UnixListener(UnixAddr::Path(p)) | Key::UnixDatagram(UnixAddr::Path(p)) => {
                SocketFile::recorded(p, entry.file)
            }
            _ => None,
        };
        self.push_used(Used {
            key: entry.key,
            fd: entry.fd,
            socket_file,
            inherited: true,
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
                Key::UnixListener(a) | Key::UnixDatagram(a),
                Key::UnixListener(b) | Key::UnixDatagram(b),
            ) => a == b,
            (
                Key::TcpStream(a) | Key::UnixStream(a) | Key::Fd(a),
                Key::TcpStream(b) | Key::UnixStream(b) | Key::Fd(b),
            ) => a == b,
            _ => false,
        });
        match clash {
            Some((_, e)) => Err(Error::WrongKind {
                key: key.to_string(),
                passed_as: e.key.kind_name(),
            }),
            None => Ok(None),
        }
    }

    fn insert(&mut self, key: Key, fd: OwnedFd, socket_file: Option<SocketFile>) {
        if self.used_keys.remove(&key).is_some() {
            self.used.retain(|u| u.key != key);
        }
        self.push_used(Used {
            key,
            fd,
            socket_file,
            inherited: false,
        });
    }
}

fn resolve(addr: impl ToSocketAddrs) -> Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| Error::Listen {
            addr: "(unresolvable address)".into(),
            source: e,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(Error::Listen {
            addr: "(empty address list)".into(),
            source: io::ErrorKind::InvalidInput.into(),
        });
    }
    Ok(addrs)
}

fn resolve_one(addr: impl ToSocketAddrs) -> Result<SocketAddr> {
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

fn dup(fd: BorrowedFd<'_>) -> Result<OwnedFd> {
    // F_DUPFD_CLOEXEC: the copy is close-on-exec from birth.
    fd.try_clone_to_owned()
        .map_err(|e| Error::io("fcntl(F_DUPFD_CLOEXEC)", Some(fd.as_raw_fd()), e))
}
