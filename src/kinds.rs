//! The kinds of socket and fd the registry passes on, as types: [`Listen`] for sockets
//! found again by the address they are bound to, [`Group`] for those that can form an
//! `SO_REUSEPORT` group, [`Named`] for connections and other fds found by a name, and
//! [`Address`] for what each kind is bound to. All sealed: the registry knows how to make,
//! check and describe each kind, so the set is closed.

use std::fmt;
#[cfg(unix)]
use std::net::TcpStream;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs, UdpSocket};
#[cfg(unix)]
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
#[cfg(unix)]
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};

use crate::error::{Error, Result};
#[cfg(unix)]
use crate::unix_addr::UnixAddr;

pub(crate) mod sealed {
    /// What the registry needs to know of a kind. Not nameable outside the crate, so no
    /// other type can implement the public traits.
    pub trait Sealed: Sized {
        const KIND: Kind;
        #[cfg(unix)]
        fn from_owned(fd: std::os::unix::io::OwnedFd) -> Self;
        #[cfg(unix)]
        fn borrow(&self) -> std::os::unix::io::BorrowedFd<'_>;
    }

    /// What an address resolves to, for the registry.
    pub trait Target<S> {
        fn resolve(self) -> crate::Result<Resolved>;
    }

    /// An address, resolved.
    #[derive(Debug)]
    pub enum Resolved {
        Inet(Vec<std::net::SocketAddr>),
        #[cfg(unix)]
        Unix(crate::unix_addr::UnixAddr),
    }

    /// What [`Upgrader::incoming`](crate::Upgrader::incoming) needs of a listener.
    #[cfg(unix)]
    pub trait Acceptor {
        /// `accept(2)`, the connection as an fd (blocking, like every connection std
        /// accepts, whatever the listener's mode).
        fn accept_fd(&self) -> std::io::Result<std::os::unix::io::OwnedFd>;
        /// `O_NONBLOCK` on the listener, as every generation's accept loop needs.
        fn make_nonblocking(&self) -> std::io::Result<()>;
        fn listener_fd(&self) -> std::os::unix::io::BorrowedFd<'_>;
    }

    /// Every kind, as the fd table names it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        TcpListener,
        Udp,
        UnixListener,
        UnixDatagram,
        UnixSeqpacket,
        TcpStream,
        UnixStream,
        Fd,
    }
}

use sealed::{Kind, Resolved, Sealed, Target};

/// A socket bound to an address, found again by the next generation under that address:
/// what [`Fds::listen`](crate::Fds::listen), [`take`](crate::Fds::take) and
/// [`add`](crate::Fds::add) handle.
///
/// | type | bound to ([`Address`]) | socket |
/// |---|---|---|
/// | [`TcpListener`] | `"host:port"`, a [`SocketAddr`], `(ip, port)`: anything [`ToSocketAddrs`] | `SOCK_STREAM`, listening |
/// | [`UdpSocket`] | the same | `SOCK_DGRAM` |
/// | [`UnixListener`] (Unix) | a path, or [`UnixAddr::abstract_name`]: anything `Into<UnixAddr>` | `SOCK_STREAM`, listening |
/// | [`UnixDatagram`] (Unix) | the same | `SOCK_DGRAM` |
/// | [`SeqpacketListener`] (Unix) | the same | `SOCK_SEQPACKET`, listening |
///
/// Sealed: implemented for these types only.
pub trait Listen: Sealed {}

/// A kind of socket that can form an `SO_REUSEPORT` group
/// ([`Fds::listen_group`](crate::Fds::listen_group)): [`TcpListener`] and [`UdpSocket`].
/// Sealed.
pub trait Group: Listen {}

/// A kind of fd found by a name ([`Fds::add_named`](crate::Fds::add_named),
/// [`take_named`](crate::Fds::take_named)): an established [`TcpStream`] or
/// `UnixStream`, or any `OwnedFd` or `File` (a pipe, a file, an eventfd, a socket of
/// another kind). Sealed.
#[cfg(unix)]
#[cfg_attr(docsrs, doc(cfg(unix)))]
pub trait Named: Sealed {}

/// A listening socket that [`Upgrader::incoming`](crate::Upgrader::incoming) accepts
/// from: [`TcpListener`] (accepting [`TcpStream`]s), `UnixListener` and
/// [`SeqpacketListener`] (accepting `UnixStream`s). Sealed.
#[cfg(unix)]
#[cfg_attr(docsrs, doc(cfg(unix)))]
pub trait Accept: sealed::Acceptor {
    /// What it accepts.
    type Stream: From<OwnedFd>;
}

#[cfg(unix)]
macro_rules! accept_kind {
    ($ty:ty, $stream:ty, |$l:ident| $accept:expr) => {
        impl sealed::Acceptor for $ty {
            fn accept_fd(&self) -> std::io::Result<OwnedFd> {
                let $l = self;
                let stream: $stream = $accept?.0;
                // BSD and macOS hand out a connection with the listener's O_NONBLOCK;
                // Linux never does. The connection's description is its own.
                #[cfg(not(any(target_os = "linux", target_os = "android")))]
                stream.set_nonblocking(false)?;
                Ok(OwnedFd::from(stream))
            }
            fn make_nonblocking(&self) -> std::io::Result<()> {
                let $l = self;
                $l.set_nonblocking_(true)
            }
            fn listener_fd(&self) -> BorrowedFd<'_> {
                self.as_fd()
            }
        }
        impl Accept for $ty {
            type Stream = $stream;
        }
    };
}

/// `set_nonblocking` under one name for the listener types.
#[cfg(unix)]
trait SetNonblocking {
    fn set_nonblocking_(&self, on: bool) -> std::io::Result<()>;
}

#[cfg(unix)]
impl SetNonblocking for TcpListener {
    fn set_nonblocking_(&self, on: bool) -> std::io::Result<()> {
        self.set_nonblocking(on)
    }
}

#[cfg(unix)]
impl SetNonblocking for UnixListener {
    fn set_nonblocking_(&self, on: bool) -> std::io::Result<()> {
        self.set_nonblocking(on)
    }
}

#[cfg(unix)]
impl SetNonblocking for SeqpacketListener {
    fn set_nonblocking_(&self, on: bool) -> std::io::Result<()> {
        self.0.set_nonblocking(on)
    }
}

#[cfg(unix)]
accept_kind!(TcpListener, TcpStream, |l| l.accept());
#[cfg(unix)]
accept_kind!(UnixListener, UnixStream, |l| l.accept());
#[cfg(unix)]
accept_kind!(SeqpacketListener, UnixStream, |l| l.0.accept());

/// What a socket of kind `S` is bound to: anything [`ToSocketAddrs`] (and `Debug`, to
/// be named in errors) for TCP and UDP, anything `Into<UnixAddr>` for Unix sockets
/// (a path as `&str`, `&Path` or `PathBuf`, or [`UnixAddr::abstract_name`]). IP
/// addresses are resolved when the socket is asked for; each resolved address is tried
/// in order, inherited ones first.
///
/// Sealed: implemented through the blanket implementations only.
pub trait Address<S>: Target<S> {}

impl<S, T: Target<S>> Address<S> for T {}

/// Resolves an IP address; an address that resolves to nothing is an error naming it.
fn resolve_inet(addr: impl ToSocketAddrs + fmt::Debug) -> Result<Resolved> {
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
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no address to listen on",
            ),
        });
    }
    Ok(Resolved::Inet(addrs))
}

macro_rules! inet_kind {
    ($ty:ty, $kind:ident) => {
        impl Sealed for $ty {
            const KIND: Kind = Kind::$kind;
            #[cfg(unix)]
            fn from_owned(fd: OwnedFd) -> Self {
                <$ty>::from(fd)
            }
            #[cfg(unix)]
            fn borrow(&self) -> BorrowedFd<'_> {
                self.as_fd()
            }
        }
        impl Listen for $ty {}
        impl Group for $ty {}
        impl<T: ToSocketAddrs + fmt::Debug> Target<$ty> for T {
            fn resolve(self) -> Result<Resolved> {
                resolve_inet(self)
            }
        }
    };
}

inet_kind!(TcpListener, TcpListener);
inet_kind!(UdpSocket, Udp);

#[cfg(unix)]
macro_rules! unix_kind {
    ($ty:ty, $kind:ident) => {
        impl Sealed for $ty {
            const KIND: Kind = Kind::$kind;
            fn from_owned(fd: OwnedFd) -> Self {
                <$ty>::from(fd)
            }
            fn borrow(&self) -> BorrowedFd<'_> {
                self.as_fd()
            }
        }
        impl Listen for $ty {}
        impl<T: Into<UnixAddr>> Target<$ty> for T {
            fn resolve(self) -> Result<Resolved> {
                Ok(Resolved::Unix(self.into()))
            }
        }
    };
}

#[cfg(unix)]
unix_kind!(UnixListener, UnixListener);
#[cfg(unix)]
unix_kind!(UnixDatagram, UnixDatagram);
#[cfg(unix)]
unix_kind!(SeqpacketListener, UnixSeqpacket);

#[cfg(unix)]
macro_rules! named_kind {
    ($ty:ty, $kind:ident) => {
        impl Sealed for $ty {
            const KIND: Kind = Kind::$kind;
            fn from_owned(fd: OwnedFd) -> Self {
                <$ty>::from(fd)
            }
            fn borrow(&self) -> BorrowedFd<'_> {
                self.as_fd()
            }
        }
        impl Named for $ty {}
    };
}

#[cfg(unix)]
named_kind!(TcpStream, TcpStream);
#[cfg(unix)]
named_kind!(UnixStream, UnixStream);
#[cfg(unix)]
named_kind!(OwnedFd, Fd);
#[cfg(unix)]
named_kind!(std::fs::File, Fd);

/// A listening Unix `SOCK_SEQPACKET` socket (Go's `"unixpacket"`), which std has no type
/// for: it accepts [`UnixStream`]s whose reads and writes keep message boundaries.
///
/// Made by [`Fds::listen`](crate::Fds::listen) like any other [`Listen`] kind.
#[cfg(unix)]
#[derive(Debug)]
pub struct SeqpacketListener(UnixListener);

#[cfg(unix)]
impl SeqpacketListener {
    /// Accepts a connection (`accept(2)`): a [`UnixStream`] that keeps message
    /// boundaries, and its peer's address.
    pub fn accept(&self) -> std::io::Result<(UnixStream, std::os::unix::net::SocketAddr)> {
        self.0.accept()
    }

    /// The listener as std's [`UnixListener`], whose methods (`local_addr`,
    /// `set_nonblocking`, `incoming`, ...) work on a seqpacket socket too.
    pub fn as_unix_listener(&self) -> &UnixListener {
        &self.0
    }
}

#[cfg(unix)]
impl From<OwnedFd> for SeqpacketListener {
    fn from(fd: OwnedFd) -> Self {
        SeqpacketListener(UnixListener::from(fd))
    }
}

#[cfg(unix)]
impl From<SeqpacketListener> for OwnedFd {
    fn from(listener: SeqpacketListener) -> OwnedFd {
        listener.0.into()
    }
}

#[cfg(unix)]
impl AsFd for SeqpacketListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(unix)]
impl AsRawFd for SeqpacketListener {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
