//! The keeper's notify socket: where the generations tell it what they do.

use std::io;
use std::os::unix::io::OwnedFd;

use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};
use rustix::rand::GetRandomFlags;

use crate::sys::os;

/// The keeper's notify socket: a datagram socket on a random abstract name,
/// non-blocking, with the senders' credentials. Returns it and its
/// `$NOTIFY_SOCKET`.
pub(super) fn notify_socket(pid: u32) -> io::Result<(OwnedFd, String)> {
    let fd = crate::sys::socket::new_socket(AddressFamily::UNIX, SocketType::DGRAM)?;
    rustix::io::ioctl_fionbio(&fd, true)?;
    rustix::net::sockopt::set_socket_passcred(&fd, true)?;
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&fd, 1 << 20);
    let mut last = io::Error::from(io::ErrorKind::AddrInUse);
    // A name taken already is another one's: draw again.
    for _ in 0..8 {
        let name = format!("tableflip-keeper/{pid}/{:032x}", random()?);
        match rustix::net::bind(&fd, &SocketAddrUnix::new_abstract_name(name.as_bytes())?) {
            Ok(()) => return Ok((fd, format!("@{name}"))),
            Err(rustix::io::Errno::ADDRINUSE) => last = rustix::io::Errno::ADDRINUSE.into(),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last)
}

/// 128 bits from the kernel's random source.
fn random() -> io::Result<u128> {
    let mut bytes = [0u8; 16];
    let mut got = 0;
    while got < bytes.len() {
        got += os::retry(|| rustix::rand::getrandom(&mut bytes[got..], GetRandomFlags::empty()))?;
    }
    Ok(u128::from_ne_bytes(bytes))
}
