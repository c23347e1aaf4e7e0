//! The fd registry on Unix: the sockets and files that travel to the next generation,
//! behind [`Fds`](crate::Fds).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard};

use rustix::net::{SocketAddrAny, SocketType};

use crate::adoption::{Adoption, InheritedFd};
use crate::error::{Error, Result};
use crate::kinds::sealed::{Kind, Resolved};
use crate::kinds::{Address, Group, Listen, Named};
use crate::sys::inherit::{Inherited, InheritedSet};
use crate::sys::socket::{self, inet, local_inet, unix, BeforeBind, PerCall, Setup, SocketFile};
use crate::sys::wire::{Extra, Key, VAR};
use crate::unix_addr::UnixAddr;

/// The registry of one generation: what [`Fds`](crate::Fds) is on Unix.
pub(crate) struct Registry {
    inner: Mutex<Table>,
    before_bind: Option<BeforeBind>,
    backlog: i32,
    /// The state to hand to the next generation (`set_state`).
    state_out: Mutex<Option<OwnedFd>>,
    /// The state handed over by the previous generation, until `take_state` or `ready`.
    state_in: Mutex<Option<OwnedFd>>,
}

impl fmt::Debug for Registry {
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
struct Table {
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

impl Registry {
    /// A registry holding what this generation inherited (`state`: the handed-over
    /// state blob, if any).
    pub(crate) fn new(
        inherited: Vec<Inherited>,
        state: Option<OwnedFd>,
        before_bind: Option<BeforeBind>,
        backlog: i32,
    ) -> Registry {
        Registry {
            inner: Mutex::new(Table {
                inherited: InheritedSet::new(inherited),
                used_keys: HashMap::new(),
                used: Vec::new(),
                taken: Vec::new(),
                retired: Vec::new(),
            }),
            before_bind,
            backlog,
            state_out: Mutex::new(None),
            state_in: Mutex::new(state),
        }
    }

    /// [`Fds::set_state`](crate::Fds::set_state).
    pub(crate) fn set_state(&self, state: &[u8]) -> Result<()> {
        let fd = crate::sys::state::store(state)?;
        *lock(&self.state_out) = Some(fd);
        Ok(())
    }

    /// [`Fds::take_state`](crate::Fds::take_state).
    pub(crate) fn take_state(&self) -> Result<Option<Vec<u8>>> {
        match lock(&self.state_in).take() {
            None => Ok(None),
            Some(fd) => crate::sys::state::load(fd.as_fd()).map(Some),
        }
    }

    /// A handle of its own on the state to pass on (so that a `set_state` during the
    /// spawn cannot close it), if there is one.
    pub(crate) fn state_to_pass(&self) -> Result<Option<OwnedFd>> {
        match &*lock(&self.state_out) {
            Some(fd) => fd
                .try_clone()
                .map(Some)
                .map_err(|e| Error::io("fcntl(F_DUPFD_CLOEXEC)", Some(fd.as_raw_fd()), e)),
            None => Ok(None),
        }
    }

    /// Drops the handed-over state nobody took (`ready()`).
    pub(crate) fn discard_state_in(&self) {
        drop(lock(&self.state_in).take());
    }

    /// [`Fds::inherited`](crate::Fds::inherited).
    pub(crate) fn inherited(&self) -> Vec<InheritedFd> {
        self.lock()
            .inherited
            .iter()
            .map(|(_, e)| InheritedFd::new(e.fd.as_raw_fd(), &e.key))
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        lock(&self.inner)
    }

    // ---- The public surface: one method per action, generic over the kind ----------

    /// [`Fds::listen`](crate::Fds::listen).
    pub(crate) fn listen<S: Listen>(&self, addr: impl Address<S>) -> Result<S> {
        self.listen_with(addr, no_setup)
    }

    /// [`Fds::listen_with`](crate::Fds::listen_with).
    pub(crate) fn listen_with<S: Listen>(
        &self,
        addr: impl Address<S>,
        mut setup: impl FnMut(BorrowedFd<'_>) -> io::Result<()>,
    ) -> Result<S> {
        let (ty, make) = shape(S::KIND);
        let fd = match (addr.resolve()?, make) {
            (Resolved::Inet(addrs), Make::Inet(key)) => {
                self.listen_inet(&addrs, key, ty, &mut setup)?
            }
            (Resolved::Unix(addr), Make::Unix(key)) => {
                self.listen_unix_kind(addr, key, ty, &mut setup)?
            }
            (resolved, _) => return Err(mismatch(resolved)),
        };
        Ok(S::from_owned(fd))
    }

    /// [`Fds::listen_group`](crate::Fds::listen_group).
    pub(crate) fn listen_group<S: Group>(&self, addr: impl Address<S>, n: usize) -> Result<Vec<S>> {
        let (ty, make) = shape(S::KIND);
        let (addrs, key) = match (addr.resolve()?, make) {
            (Resolved::Inet(addrs), Make::Inet(key)) => (addrs, key),
            (resolved, _) => return Err(mismatch(resolved)),
        };
        let addr = match addrs.as_slice() {
            [one] => *one,
            _ => {
                return Err(Error::Listen {
                    addr: format!("{addrs:?}"),
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "a socket group needs an address that resolves to exactly one address",
                    ),
                })
            }
        };
        Ok(self
            .listen_group_fds(addr, n, key, ty)?
            .into_iter()
            .map(S::from_owned)
            .collect())
    }

    /// [`Fds::take`](crate::Fds::take).
    pub(crate) fn take<S: Listen>(&self, addr: impl Address<S>) -> Result<Option<S>> {
        let keys = match (addr.resolve()?, shape(S::KIND).1) {
            (Resolved::Inet(addrs), Make::Inet(key)) => addrs.into_iter().map(key).collect(),
            (Resolved::Unix(addr), Make::Unix(key)) => vec![key(addr)],
            (resolved, _) => return Err(mismatch(resolved)),
        };
        let mut reg = self.lock();
        for key in &keys {
            if let Some(fd) = reg.take(key)? {
                return Ok(Some(S::from_owned(fd)));
            }
        }
        Ok(None)
    }

    /// [`Fds::add`](crate::Fds::add).
    pub(crate) fn add<S: Listen>(&self, socket: &S) -> Result<()> {
        self.add_socket(socket.borrow(), |a| match shape(S::KIND).1 {
            Make::Inet(key) => Ok(key(inet(a)?)),
            Make::Unix(key) => Ok(key(unix(a)?)),
        })
    }

    /// [`Fds::add_named`](crate::Fds::add_named).
    pub(crate) fn add_named<N: Named>(&self, name: &str, fd: &N) -> Result<()> {
        let key = named_key(N::KIND, name);
        match N::KIND {
            Kind::Fd => {
                let copy = dup_kept(fd.borrow())?;
                self.lock().insert(Used::new(key, copy, None));
                Ok(())
            }
            _ => self.add_socket(fd.borrow(), |_| Ok(key)),
        }
    }

    /// [`Fds::take_named`](crate::Fds::take_named).
    pub(crate) fn take_named<N: Named>(&self, name: &str) -> Result<Option<N>> {
        Ok(self
            .lock()
            .take(&named_key(N::KIND, name))?
            .map(N::from_owned))
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

    fn listen_group_fds(
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
        crate::sys::batch::close_all(to_close);
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
        crate::sys::batch::close_all(retired);
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

impl Drop for Table {
    fn drop(&mut self) {
        crate::sys::batch::close_all(std::mem::take(&mut self.retired));
    }
}

impl Table {
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

/// How the registry makes and finds a socket of a [`Listen`] kind: its type, and its key
/// from the address it is bound to.
fn shape(kind: Kind) -> (SocketType, Make) {
    match kind {
        Kind::TcpListener => (SocketType::STREAM, Make::Inet(Key::TcpListener)),
        Kind::Udp => (SocketType::DGRAM, Make::Inet(Key::Udp)),
        Kind::UnixListener => (SocketType::STREAM, Make::Unix(Key::UnixListener)),
        Kind::UnixDatagram => (SocketType::DGRAM, Make::Unix(Key::UnixDatagram)),
        // The named kinds are not `Listen` kinds; a seqpacket listener is what is left.
        Kind::UnixSeqpacket | Kind::TcpStream | Kind::UnixStream | Kind::Fd => {
            (SocketType::SEQPACKET, Make::Unix(Key::UnixSeqpacket))
        }
    }
}

/// A key from an address.
#[derive(Clone, Copy)]
enum Make {
    Inet(fn(SocketAddr) -> Key),
    Unix(fn(UnixAddr) -> Key),
}

/// The key of a [`Named`] kind.
fn named_key(kind: Kind, name: &str) -> Key {
    match kind {
        Kind::TcpStream => Key::TcpStream(name.to_string()),
        Kind::UnixStream => Key::UnixStream(name.to_string()),
        _ => Key::Fd(name.to_string()),
    }
}

/// An address of the wrong family for the kind: the sealed traits rule it out.
fn mismatch(resolved: Resolved) -> Error {
    Error::Listen {
        addr: format!("{resolved:?}"),
        source: io::Error::new(io::ErrorKind::InvalidInput, "an address of another family"),
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

/// A lock that survives a panic of another holder: a panic while holding it cannot leave
/// the registry half-updated in a way that matters more than refusing to work.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
