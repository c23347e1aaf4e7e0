//! What a socket is: creating the ones the registry binds, asking the kernel what an fd
//! is (one probe, for inherited fds and for systemd's alike), and the identity of a Unix
//! socket's file.

use std::io;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::FileType;
use rustix::net::{AddressFamily, SocketAddrAny, SocketAddrUnix, SocketType};

use crate::sys::wire::{FileId, Key};
use crate::unix_addr::UnixAddr;

pub(crate) use crate::options::{BeforeBind, Hook};

/// A new close-on-exec socket.
pub(crate) fn new_socket(family: AddressFamily, ty: SocketType) -> io::Result<OwnedFd> {
    #[cfg(not(target_vendor = "apple"))]
    {
        Ok(rustix::net::socket_with(
            family,
            ty,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )?)
    }
    #[cfg(target_vendor = "apple")]
    {
        // No SOCK_CLOEXEC: set it at once (see `os::pipe` for what the window means).
        let fd = rustix::net::socket(family, ty, None)?;
        rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)?;
        Ok(fd)
    }
}

/// A per-call setup function (`Fds::listen_with`).
pub(crate) type PerCall<'a> = &'a mut dyn FnMut(BorrowedFd<'_>) -> io::Result<()>;

/// How the registry makes a socket: what to call between `socket()` and `bind()` (the
/// `before_bind` hook, then the per-call setup), and the listen backlog.
pub(crate) struct Setup<'a> {
    pub(crate) before_bind: Option<&'a Hook>,
    pub(crate) per_call: PerCall<'a>,
    pub(crate) backlog: i32,
}

impl Setup<'_> {
    fn run_hooks(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        if let Some(hook) = self.before_bind {
            hook(fd)?;
        }
        (self.per_call)(fd)
    }
}

/// A new IP socket bound to `addr` (and listening, for a stream socket), with
/// `SO_REUSEADDR` for listeners and `SO_REUSEPORT` if asked.
pub(crate) fn bind_inet(
    addr: SocketAddr,
    ty: SocketType,
    reuseport: bool,
    setup: &mut Setup<'_>,
) -> io::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let listen = ty == SocketType::STREAM;
    let fd = new_socket(family, ty)?;
    if listen {
        rustix::net::sockopt::set_socket_reuseaddr(&fd, true)?;
    }
    if reuseport {
        rustix::net::sockopt::set_socket_reuseport(&fd, true)?;
    }
    setup.run_hooks(fd.as_fd())?;
    rustix::net::bind(&fd, &addr)?;
    if listen {
        rustix::net::listen(&fd, setup.backlog)?;
    }
    Ok(fd)
}

/// A new Unix socket of type `ty` bound to `addr` (and listening, unless a datagram
/// socket), with the identity of the file it made and the address it got. An empty
/// path asks the kernel to choose an abstract name (Linux autobind). A socket file left
/// at the path by a process that died without removing it is removed first (see
/// [`remove_stale`]).
pub(crate) fn bind_unix(
    addr: &UnixAddr,
    ty: SocketType,
    setup: &mut Setup<'_>,
) -> io::Result<(OwnedFd, Option<SocketFile>, UnixAddr)> {
    let sockaddr = unix_sockaddr(addr)?;
    let fd = new_socket(AddressFamily::UNIX, ty)?;
    setup.run_hooks(fd.as_fd())?;
    match rustix::net::bind(&fd, &sockaddr) {
        Err(rustix::io::Errno::ADDRINUSE) if stale(addr, ty) => {
            rustix::net::bind(&fd, &sockaddr)?;
        }
        other => other?,
    }
    let (file, bound) = match addr {
        UnixAddr::Path(p) if !p.as_os_str().is_empty() => (SocketFile::of(p), addr.clone()),
        // The name the kernel chose, or the one asked for.
        _ => (None, unix(rustix::net::getsockname(&fd)?)?),
    };
    if ty != SocketType::DGRAM {
        if let Err(e) = rustix::net::listen(&fd, setup.backlog) {
            if let Some(file) = &file {
                file.unlink();
            }
            return Err(e.into());
        }
    }
    Ok((fd, file, bound))
}

/// Whether `addr` is a path with a stale socket file, which is then removed: a socket
/// file nobody serves on (connecting to it is refused), left by a process that died
/// without removing it. Never a file that is not a socket, never one somebody serves on
/// (connected, or its queue full), never one that changed between the check and the
/// removal (its device and inode are checked again).
fn stale(addr: &UnixAddr, ty: SocketType) -> bool {
    let UnixAddr::Path(path) = addr else {
        return false;
    };
    let Some(id) = socket_file_id(path) else {
        return false;
    };
    let Ok(sockaddr) = SocketAddrUnix::new(path.as_path()) else {
        return false;
    };
    let refused = new_socket(AddressFamily::UNIX, ty)
        .and_then(|probe| {
            // Non-blocking, so that a live listener with a full queue answers EAGAIN
            // instead of holding us up.
            rustix::io::ioctl_fionbio(&probe, true)?;
            Ok(rustix::net::connect(&probe, &sockaddr))
        })
        .is_ok_and(|r| r == Err(rustix::io::Errno::CONNREFUSED));
    if refused && socket_file_id(path) == Some(id) {
        std::fs::remove_file(path).is_ok()
    } else {
        false
    }
}

pub(crate) fn unix_sockaddr(addr: &UnixAddr) -> io::Result<SocketAddrUnix> {
    Ok(match addr {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        UnixAddr::Path(p) if p.as_os_str().is_empty() => SocketAddrUnix::new_unnamed(),
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        UnixAddr::Path(p) if p.as_os_str().is_empty() => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a name chosen by the kernel (an empty path) exists on Linux only",
            ))
        }
        UnixAddr::Path(p) => SocketAddrUnix::new(p.as_path())?,
        #[cfg(any(target_os = "linux", target_os = "android"))]
        UnixAddr::Abstract(name) => SocketAddrUnix::new_abstract_name(name)?,
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        UnixAddr::Abstract(_) => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "abstract Unix socket names exist on Linux only",
            ))
        }
    })
}

/// The uid and gid of the process at the other end of a Unix stream connection: as they
/// were when it called `connect(2)`, or `listen(2)` for the client's end of an accepted
/// connection (`SO_PEERCRED`, `getpeereid(3)`). Both ends of the control socket check it.
#[cfg(any(target_os = "linux", target_os = "android"))]
#[cfg_attr(not(feature = "control"), allow(dead_code))]
pub(crate) fn peer_ids(conn: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    // Through libc, as `peer_pid`: rustix's `UCred` holds a non-zero `Pid`, and the
    // kernel reports pid 0 for a peer in another pid namespace.
    let init = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    // SAFETY: `ucred` is three integers: every pattern the kernel writes is valid.
    let cred = unsafe { getsockopt(conn, libc::SOL_SOCKET, libc::SO_PEERCRED, init) }?;
    Ok((cred.uid, cred.gid))
}

/// The uid and gid of the process at the other end of a Unix stream connection.
#[cfg(any(
    target_vendor = "apple",
    target_os = "freebsd",
    target_os = "openbsd",
    target_os = "netbsd",
    target_os = "dragonfly"
))]
#[cfg_attr(not(feature = "control"), allow(dead_code))]
pub(crate) fn peer_ids(conn: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    use std::os::unix::io::AsRawFd;
    let mut uid: libc::uid_t = 0;
    let mut gid: libc::gid_t = 0;
    // SAFETY: getpeereid writes one uid_t and one gid_t through the two pointers, which
    // point to locals that outlive the call; `conn` is an open fd for the whole call.
    let rc = unsafe { libc::getpeereid(conn.as_raw_fd(), &mut uid, &mut gid) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok((uid, gid))
}

/// No way to know the peer here: the server serves nobody unless `allow_any_uid`, the
/// client believes nobody.
#[cfg(not(any(
    target_os = "linux",
    target_os = "android",
    target_vendor = "apple",
    target_os = "freebsd",
    target_os = "openbsd",
    target_os = "netbsd",
    target_os = "dragonfly"
)))]
#[cfg_attr(not(feature = "control"), allow(dead_code))]
pub(crate) fn peer_ids(_conn: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    Err(io::ErrorKind::Unsupported.into())
}

/// The pid of the process at the other end of a connected Unix socket, as the kernel
/// recorded it when the pair was made or the connection established: `SO_PEERCRED`
/// (Linux), `LOCAL_PEERCRED` (FreeBSD 13+, `cr_pid`), `LOCAL_PEERPID` (macOS).
///
/// Through libc rather than rustix: rustix's `UCred` holds a non-zero `Pid`, and the
/// kernel reports pid 0 for a socket that is not connected, or whose peer lives in
/// another pid namespace.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn peer_pid(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let init = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    // SAFETY: `ucred` is three integers.
    let cred = unsafe { getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERCRED, init) }?;
    if cred.pid <= 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "SO_PEERCRED names no process (not connected, or another pid namespace)",
        ));
    }
    Ok(cred.pid as u32)
}

/// The pid of the process at the other end of a connected Unix socket (see the Linux
/// version).
#[cfg(target_os = "freebsd")]
pub(crate) fn peer_pid(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: an all-zero xucred is a valid value (integers, an array, a union of a
    // pointer and an integer).
    let init: libc::xucred = unsafe { std::mem::zeroed() };
    // SAFETY: as above: plain data, every pattern valid.
    let cred = unsafe { getsockopt(fd, libc::SOL_LOCAL, libc::LOCAL_PEERCRED, init) }?;
    // SAFETY: the kernel (13 and later) fills the union's `cr_pid`; before 13 it is
    // unused (zero here, refused below).
    let pid = unsafe { cred.cr_pid__c_anonymous_union.cr_pid };
    if cred.cr_version != libc::XUCRED_VERSION || pid <= 0 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "LOCAL_PEERCRED gave no pid (FreeBSD 13 or later has one)",
        ));
    }
    Ok(pid as u32)
}

/// The pid of the process at the other end of a connected Unix socket (see the Linux
/// version).
#[cfg(target_vendor = "apple")]
pub(crate) fn peer_pid(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: a pid_t is an integer.
    let pid: libc::pid_t = unsafe { getsockopt(fd, libc::SOL_LOCAL, libc::LOCAL_PEERPID, 0) }?;
    if pid <= 0 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "LOCAL_PEERPID gave no pid",
        ));
    }
    Ok(pid as u32)
}

/// No way to know the peer here.
#[cfg(not(any(
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd",
    target_vendor = "apple"
)))]
pub(crate) fn peer_pid(_fd: BorrowedFd<'_>) -> io::Result<u32> {
    Err(io::ErrorKind::Unsupported.into())
}

/// `getsockopt(2)` for an option whose value is a `T`, starting from `init` (which the
/// kernel overwrites with at most `size_of::<T>()` bytes).
///
/// # Safety
///
/// `T` must be plain data (integers, arrays and unions of them) for which every byte
/// pattern the kernel writes is a valid value.
#[cfg(any(
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd",
    target_vendor = "apple"
))]
unsafe fn getsockopt<T>(fd: BorrowedFd<'_>, level: i32, name: i32, init: T) -> io::Result<T> {
    use std::os::unix::io::AsRawFd;
    let mut value = init;
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, a local that outlives
    // the call; `fd` is open for the whole call; the caller vouches for `T`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut T).cast(),
            &mut len,
        )
    };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Why an fd is not the socket it was declared as: the reason, and the OS error behind
/// it if there is one.
#[derive(Debug)]
pub(crate) struct Mismatch {
    pub(crate) reason: String,
    pub(crate) source: Option<io::Error>,
}

impl Mismatch {
    fn new(reason: impl Into<String>) -> Mismatch {
        Mismatch {
            reason: reason.into(),
            source: None,
        }
    }

    fn os(call: &str, e: impl Into<io::Error>) -> Mismatch {
        Mismatch {
            reason: format!("{call} failed"),
            source: Some(e.into()),
        }
    }
}

/// What the kernel says about a socket: its type, whether it listens, its address.
#[derive(Debug)]
pub(crate) struct Probe {
    ty: SocketType,
    /// `None` where the kernel cannot tell (`SO_ACCEPTCONN` unsupported).
    listening: Option<bool>,
    local: SocketAddrAny,
}

/// Asks the kernel what `fd` is. Fails for anything that is not a socket.
pub(crate) fn probe(fd: BorrowedFd<'_>) -> Result<Probe, Mismatch> {
    let st = rustix::fs::fstat(fd).map_err(|e| Mismatch::os("fstat", e))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Socket {
        return Err(Mismatch::new("not a socket"));
    }
    let ty = rustix::net::sockopt::socket_type(fd)
        .map_err(|e| Mismatch::os("getsockopt(SO_TYPE)", e))?;
    let listening = accepting(fd).map_err(|e| Mismatch::os("getsockopt(SO_ACCEPTCONN)", e))?;
    let local = rustix::net::getsockname(fd).map_err(|e| Mismatch::os("getsockname", e))?;
    Ok(Probe {
        ty,
        listening,
        local,
    })
}

/// `SO_ACCEPTCONN`: whether a socket listens; `None` if the kernel does not say.
fn accepting(fd: BorrowedFd<'_>) -> io::Result<Option<bool>> {
    #[cfg(not(target_vendor = "apple"))]
    let result = rustix::net::sockopt::socket_acceptconn(fd);
    #[cfg(target_vendor = "apple")]
    let result = acceptconn_libc(fd);
    match result {
        Ok(is) => Ok(Some(is)),
        Err(e) if e == rustix::io::Errno::NOPROTOOPT => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// rustix has no `SO_ACCEPTCONN` for Apple targets; the option exists there.
#[cfg(target_vendor = "apple")]
fn acceptconn_libc(fd: BorrowedFd<'_>) -> rustix::io::Result<bool> {
    // SAFETY: a c_int is an integer.
    let value: libc::c_int = unsafe { getsockopt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN, 0) }
        .map_err(|e| rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::INVAL))?;
    Ok(value != 0)
}

fn type_name(t: SocketType) -> &'static str {
    if t == SocketType::STREAM {
        "stream"
    } else if t == SocketType::DGRAM {
        "datagram"
    } else if t == SocketType::SEQPACKET {
        "seqpacket"
    } else {
        "other"
    }
}

impl Probe {
    /// The registry key of a listening socket or a bound datagram socket, IP or Unix:
    /// how a socket from systemd is found. `None` for anything else.
    pub(crate) fn key(&self) -> Option<Key> {
        let listening = self.listening == Some(true);
        match self.local.address_family() {
            AddressFamily::INET | AddressFamily::INET6 => {
                let addr = inet(self.local.clone()).ok()?;
                match self.ty {
                    SocketType::STREAM if listening => Some(Key::TcpListener(addr)),
                    SocketType::DGRAM => Some(Key::Udp(addr)),
                    _ => None,
                }
            }
            AddressFamily::UNIX => {
                let addr = unix(self.local.clone()).ok()?;
                match self.ty {
                    SocketType::STREAM if listening => Some(Key::UnixListener(addr)),
                    SocketType::SEQPACKET if listening => Some(Key::UnixSeqpacket(addr)),
                    SocketType::DGRAM => Some(Key::UnixDatagram(addr)),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// Whether this is the socket `key` declares: type, listening state, family and
    /// address.
    pub(crate) fn expect(&self, key: &Key) -> Result<(), Mismatch> {
        let Some((ty, listening)) = shape(key) else {
            return Ok(());
        };
        if self.ty != ty {
            return Err(Mismatch::new(format!(
                "a {} socket, not a {} socket",
                type_name(self.ty),
                type_name(ty)
            )));
        }
        match (listening, self.listening) {
            (Some(true), Some(false)) => return Err(Mismatch::new("not listening")),
            (Some(false), Some(true)) => return Err(Mismatch::new("a listening socket")),
            _ => {}
        }
        let family = self.local.address_family();
        match key {
            Key::TcpListener(want) | Key::Udp(want) => {
                let have =
                    inet(self.local.clone()).map_err(|_| Mismatch::new("not an IP socket"))?;
                if !same_inet(&have, want) {
                    return Err(Mismatch::new(format!("bound to {have}, not {want}")));
                }
            }
            Key::UnixListener(want) | Key::UnixDatagram(want) => {
                let have =
                    unix(self.local.clone()).map_err(|_| Mismatch::new("not a Unix socket"))?;
                if have != *want {
                    return Err(Mismatch::new(format!("bound to {have}, not {want}")));
                }
            }
            Key::TcpStream(_)
                if family != AddressFamily::INET && family != AddressFamily::INET6 =>
            {
                return Err(Mismatch::new("not an IP socket"))
            }
            Key::UnixStream(_) if family != AddressFamily::UNIX => {
                return Err(Mismatch::new("not a Unix socket"))
            }
            _ => {}
        }
        Ok(())
    }
}

/// The socket type and listening state a key declares; `None` for what is no socket.
fn shape(key: &Key) -> Option<(SocketType, Option<bool>)> {
    match key {
        Key::Ready | Key::Parent | Key::Commit | Key::State | Key::Handover | Key::Fd(_) => None,
        Key::Unknown { .. } => None,
        Key::TcpListener(_) | Key::UnixListener(_) => Some((SocketType::STREAM, Some(true))),
        Key::UnixSeqpacket(_) => Some((SocketType::SEQPACKET, Some(true))),
        Key::TcpStream(_) | Key::UnixStream(_) => Some((SocketType::STREAM, Some(false))),
        Key::Udp(_) | Key::UnixDatagram(_) => Some((SocketType::DGRAM, None)),
    }
}

/// Checks that `fd` is what `key` says (nothing to check for keys that name no socket).
pub(crate) fn check(fd: BorrowedFd<'_>, key: &Key) -> Result<(), Mismatch> {
    match shape(key) {
        None => Ok(()),
        Some(_) => probe(fd)?.expect(key),
    }
}

/// What a connected stream socket is connected over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Connected {
    /// IPv4 or IPv6: a TCP connection.
    Inet,
    /// A Unix stream connection.
    Unix,
}

/// Checks that `fd` is a connected stream socket, and says over what: `SO_TYPE`, then
/// `getpeername` (which fails for a socket that is not connected, a listener among
/// them, and names the family). Two system calls.
pub(crate) fn connected_stream(fd: BorrowedFd<'_>) -> Result<Connected, Mismatch> {
    let ty = match rustix::net::sockopt::socket_type(fd) {
        Ok(ty) => ty,
        Err(rustix::io::Errno::NOTSOCK) => return Err(Mismatch::new("not a socket")),
        Err(e) => return Err(Mismatch::os("getsockopt(SO_TYPE)", e)),
    };
    if ty != SocketType::STREAM {
        return Err(Mismatch::new(format!(
            "a {} socket, not a stream socket",
            type_name(ty)
        )));
    }
    let family = match rustix::net::getpeername(fd) {
        Ok(Some(peer)) => peer.address_family(),
        // Connected, to a peer without an address the kernel reports (where unnamed
        // Unix sockets have none): the family is ours.
        Ok(None) => rustix::net::getsockname(fd)
            .map_err(|e| Mismatch::os("getsockname", e))?
            .address_family(),
        Err(rustix::io::Errno::NOTCONN | rustix::io::Errno::INVAL) => {
            return Err(Mismatch::new("a stream socket that is not connected"))
        }
        Err(e) => return Err(Mismatch::os("getpeername", e)),
    };
    match family {
        AddressFamily::INET | AddressFamily::INET6 => Ok(Connected::Inet),
        AddressFamily::UNIX => Ok(Connected::Unix),
        _ => Err(Mismatch::new(
            "a stream socket of a family other than IP or Unix",
        )),
    }
}

/// Checks that `fd` is a Unix socket of type `ty`: `SO_TYPE` and `getsockname`.
pub(crate) fn unix_of_type(fd: BorrowedFd<'_>, ty: SocketType) -> Result<(), Mismatch> {
    let have = match rustix::net::sockopt::socket_type(fd) {
        Ok(have) => have,
        Err(rustix::io::Errno::NOTSOCK) => return Err(Mismatch::new("not a socket")),
        Err(e) => return Err(Mismatch::os("getsockopt(SO_TYPE)", e)),
    };
    if have != ty {
        return Err(Mismatch::new(format!(
            "a {} socket, not a {} socket",
            type_name(have),
            type_name(ty)
        )));
    }
    let local = rustix::net::getsockname(fd).map_err(|e| Mismatch::os("getsockname", e))?;
    if local.address_family() != AddressFamily::UNIX {
        return Err(Mismatch::new("not a Unix socket"));
    }
    Ok(())
}

/// The path and identity (device, inode) of a Unix socket's file, so that it is removed
/// only while it is still the file we bound or checked.
#[derive(Debug, Clone)]
pub(crate) struct SocketFile {
    path: PathBuf,
    id: FileId,
}

impl SocketFile {
    /// The socket file now at `path`, if there is one.
    pub(crate) fn of(path: &Path) -> Option<SocketFile> {
        let path = absolute(path)?;
        let id = socket_file_id(&path)?;
        Some(SocketFile { path, id })
    }

    /// The socket file at `path` with an identity recorded elsewhere (by the previous
    /// generation).
    pub(crate) fn recorded(path: &Path, id: Option<FileId>) -> Option<SocketFile> {
        Some(SocketFile {
            path: absolute(path)?,
            id: id?,
        })
    }

    pub(crate) fn id(&self) -> FileId {
        self.id
    }

    /// Removes the socket file if it is still the one recorded.
    pub(crate) fn unlink(&self) {
        if socket_file_id(&self.path) == Some(self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Device and inode of the socket file at `path` (`None` if it is no socket file).
// `st_dev` and `st_ino` have platform-dependent types; u64 holds all of them.
#[allow(clippy::unnecessary_cast)]
fn socket_file_id(path: &Path) -> Option<FileId> {
    let st = rustix::fs::lstat(path).ok()?;
    (FileType::from_raw_mode(st.st_mode) == FileType::Socket)
        .then_some((st.st_dev as u64, st.st_ino as u64))
}

fn absolute(path: &Path) -> Option<PathBuf> {
    if path.is_absolute() {
        Some(path.to_path_buf())
    } else {
        std::env::current_dir().ok().map(|d| d.join(path))
    }
}

/// Whether `fd` is bound to the Unix socket path `path`.
pub(crate) fn bound_to(fd: BorrowedFd<'_>, path: &Path) -> bool {
    rustix::net::getsockname(fd)
        .ok()
        .and_then(|a| unix(a).ok())
        .is_some_and(|a| a == UnixAddr::Path(path.to_path_buf()))
}

fn same_inet(a: &SocketAddr, b: &SocketAddr) -> bool {
    match (a, b) {
        (SocketAddr::V6(a), SocketAddr::V6(b)) => {
            a.ip() == b.ip() && a.port() == b.port() && a.scope_id() == b.scope_id()
        }
        _ => a == b,
    }
}

/// The IP address of a socket address from `getsockname`.
pub(crate) fn inet(addr: SocketAddrAny) -> io::Result<SocketAddr> {
    SocketAddr::try_from(addr).map_err(io::Error::from)
}

/// The local IP address of `fd`, if it has one.
pub(crate) fn local_inet(fd: BorrowedFd<'_>) -> Option<SocketAddr> {
    rustix::net::getsockname(fd).ok().and_then(|a| inet(a).ok())
}

/// The Unix address of a socket address from `getsockname`.
pub(crate) fn unix(addr: SocketAddrAny) -> io::Result<UnixAddr> {
    let u = SocketAddrUnix::try_from(addr).map_err(io::Error::from)?;
    if let Some(p) = u.path_bytes() {
        return Ok(UnixAddr::Path(PathBuf::from(std::ffi::OsStr::from_bytes(
            p,
        ))));
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Some(name) = u.abstract_name() {
        return Ok(UnixAddr::Abstract(name.to_vec()));
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        "unnamed Unix socket",
    ))
}
