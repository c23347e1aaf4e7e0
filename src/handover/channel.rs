//! The handover channel's transport: the Unix socket pair that crosses in the fd table,
//! and how one message, with its fds, travels on it.
//!
//! Linux and FreeBSD use `SOCK_SEQPACKET`: one message is one packet, sent whole or not
//! at all, and its fds travel with it. macOS has no Unix seqpacket sockets: there the
//! pair is a stream, each message is preceded by its length (`u32`, little-endian), and
//! its fds travel with its first byte. The receiving side of a stream reads no further
//! than the end of the message it is in, so the fds of the next message can never be
//! taken for this one's. Both framings run on Linux in the tests.
//!
//! Every call here is non-blocking (`MSG_DONTWAIT`); waits are bounded and done by the
//! caller, or by [`Channel::send_whole`] for small messages. Sends never raise
//! `SIGPIPE` (`MSG_NOSIGNAL`; `SO_NOSIGPIPE` on macOS). Received fds are close-on-exec
//! (`MSG_CMSG_CLOEXEC`; on macOS `FD_CLOEXEC` is set right after, see `os::pipe` for
//! what that window means).

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::unix::io::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::event::PollFlags;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketType,
};

use super::{MAX_FDS, MAX_MESSAGE};
use crate::sys::os;

/// How messages are delimited on the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// `SOCK_SEQPACKET`: one message per packet, all or nothing.
    Packets,
    /// `SOCK_STREAM`: a length before each message.
    Stream,
}

impl Framing {
    /// What this platform uses.
    pub(crate) const NATIVE: Framing = if cfg!(target_vendor = "apple") {
        Framing::Stream
    } else {
        Framing::Packets
    };

    pub(crate) fn socket_type(self) -> SocketType {
        match self {
            Framing::Packets => SocketType::SEQPACKET,
            Framing::Stream => SocketType::STREAM,
        }
    }
}

/// The length before each message on a stream.
const PREFIX: usize = 4;

/// Socket buffers at least this large: one message of the largest size, and room.
const BUFFER: usize = 2 * MAX_MESSAGE;

/// A new close-on-exec socket pair of this platform's framing: (the old generation's
/// end, the new generation's end). One system call on Linux and FreeBSD.
pub(crate) fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    pair_of(Framing::NATIVE)
}

/// A new close-on-exec socket pair of `framing`.
pub(crate) fn pair_of(framing: Framing) -> io::Result<(OwnedFd, OwnedFd)> {
    #[cfg(not(target_vendor = "apple"))]
    {
        Ok(rustix::net::socketpair(
            AddressFamily::UNIX,
            framing.socket_type(),
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )?)
    }
    #[cfg(target_vendor = "apple")]
    {
        use std::os::unix::io::AsRawFd;
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            framing.socket_type(),
            rustix::net::SocketFlags::empty(),
            None,
        )?;
        for fd in [&a, &b] {
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC)?;
            let one: libc::c_int = 1;
            // SAFETY: setsockopt reads one int from `one`, a local that outlives the
            // call; `fd` is open.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_NOSIGPIPE,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == -1 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok((a, b))
    }
}

/// Raises an end's buffers to hold a message of the largest size, where they are
/// smaller (FreeBSD's seqpacket sockets take 8 KiB by default; Linux takes
/// `net.core.wmem_default`, usually 208 KiB). Best effort: a kernel that caps them
/// lower makes a large message fail with `EMSGSIZE`, reported per connection. Done when
/// a side starts using the channel, not on the upgrade path.
pub(crate) fn make_room(fd: BorrowedFd<'_>) {
    use rustix::net::sockopt;
    if sockopt::socket_send_buffer_size(fd).is_ok_and(|n| n < BUFFER) {
        let _ = sockopt::set_socket_send_buffer_size(fd, BUFFER);
    }
    if sockopt::socket_recv_buffer_size(fd).is_ok_and(|n| n < BUFFER) {
        let _ = sockopt::set_socket_recv_buffer_size(fd, BUFFER);
    }
}

/// One end of the handover channel.
#[derive(Debug)]
pub(crate) struct Channel {
    fd: OwnedFd,
    framing: Framing,
}

/// `MSG_DONTWAIT`, and no `SIGPIPE` where a flag can say so.
#[cfg(not(target_vendor = "apple"))]
const SEND_FLAGS: SendFlags = SendFlags::DONTWAIT.union(SendFlags::NOSIGNAL);
#[cfg(target_vendor = "apple")]
const SEND_FLAGS: SendFlags = SendFlags::DONTWAIT;

/// `MSG_DONTWAIT`, and received fds close-on-exec where a flag can say so.
#[cfg(not(target_vendor = "apple"))]
const RECV_FLAGS: RecvFlags = RecvFlags::DONTWAIT.union(RecvFlags::CMSG_CLOEXEC);
#[cfg(target_vendor = "apple")]
const RECV_FLAGS: RecvFlags = RecvFlags::DONTWAIT;

impl Channel {
    pub(crate) fn new(fd: OwnedFd, framing: Framing) -> Channel {
        Channel { fd, framing }
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub(crate) fn framing(&self) -> Framing {
        self.framing
    }

    /// How many bytes a message of `len` bytes takes on the socket.
    pub(crate) fn frame_len(&self, len: usize) -> usize {
        match self.framing {
            Framing::Packets => len,
            Framing::Stream => PREFIX + len,
        }
    }

    /// Sends `msg` from byte `at` of its frame on, without waiting, with `fds` if `at` is
    /// 0 (they travel with the first byte). Returns the offset reached: the whole frame
    /// on a seqpacket socket, possibly less on a stream.
    pub(crate) fn send_from(
        &self,
        msg: &[u8],
        at: usize,
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<usize> {
        let prefix = (msg.len() as u32).to_le_bytes();
        let slices: [IoSlice<'_>; 2] = match self.framing {
            Framing::Packets => [IoSlice::new(msg), IoSlice::new(&[])],
            Framing::Stream if at < PREFIX => [IoSlice::new(&prefix[at..]), IoSlice::new(msg)],
            Framing::Stream => [IoSlice::new(&msg[at - PREFIX..]), IoSlice::new(&[])],
        };
        let fds = if at == 0 { fds } else { &[] };
        let mut space =
            vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the fds do not fit the control buffer",
            ));
        }
        let n = os::retry(|| rustix::net::sendmsg(&self.fd, &slices, &mut control, SEND_FLAGS))?;
        Ok(at + n)
    }

    /// Sends a whole message with `fds`, waiting up to `wait` for room. For the small
    /// messages (answers, end, bye); the caller serializes them. A stream left with half
    /// a message (the wait ran out in the middle) is shut down: nothing after it could be
    /// read right.
    pub(crate) fn send_whole(
        &self,
        msg: &[u8],
        fds: &[BorrowedFd<'_>],
        wait: Duration,
    ) -> io::Result<()> {
        let deadline = os::deadline(Some(wait));
        let total = self.frame_len(msg.len());
        let mut at = 0;
        loop {
            let err = match self.send_from(msg, at, fds) {
                Ok(n) if n == total => return Ok(()),
                Ok(n) => {
                    at = n;
                    None
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                Err(e) => Some(e),
            };
            let err = err.or_else(|| match self.writable(deadline) {
                Ok(true) => None,
                Ok(false) => Some(io::ErrorKind::WouldBlock.into()),
                Err(e) => Some(e),
            });
            if let Some(e) = err {
                if at > 0 {
                    self.shutdown();
                }
                return Err(e);
            }
        }
    }

    /// Whether there is room to send before `deadline`.
    fn writable(&self, deadline: Option<Instant>) -> io::Result<bool> {
        let revents = os::poll_one(self.fd.as_fd(), PollFlags::OUT, deadline)?;
        Ok(!revents.is_empty())
    }

    /// Waits until the channel is readable, or writable if `out`, or `deadline`.
    pub(crate) fn wait(&self, out: bool, deadline: Option<Instant>) -> io::Result<()> {
        let events = if out {
            PollFlags::IN | PollFlags::OUT
        } else {
            PollFlags::IN
        };
        os::poll_one(self.fd.as_fd(), events, deadline).map(drop)
    }

    /// No more messages either way: the peer's sends fail from now on (`EPIPE`), what
    /// is queued here can still be read.
    pub(crate) fn shutdown(&self) {
        let _ = rustix::net::shutdown(&self.fd, rustix::net::Shutdown::Both);
    }

    /// Whether the peer has hung up (for a read of zero bytes: the end, or an empty
    /// message).
    fn hung_up(&self) -> bool {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let hup = PollFlags::HUP | PollFlags::RDHUP;
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let hup = PollFlags::HUP;
        os::poll_one(self.fd.as_fd(), PollFlags::IN, Some(Instant::now()))
            .map_or(true, |r| r.intersects(hup))
    }

    /// One `recvmsg` into `buf`, fds into `fds`. Returns the bytes read and the flags.
    fn recv_into(&self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<(usize, bool, bool)> {
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(buf)];
        let got = os::retry(|| rustix::net::recvmsg(&self.fd, &mut iov, &mut control, RECV_FLAGS))?;
        let before = fds.len();
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = msg {
                fds.extend(rights);
            }
        }
        #[cfg(target_vendor = "apple")]
        for fd in &fds[before..] {
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC)?;
        }
        let _ = before;
        Ok((
            got.bytes,
            got.flags.contains(ReturnFlags::TRUNC),
            got.flags.contains(ReturnFlags::CTRUNC),
        ))
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// What [`Inbox::recv`] found.
#[derive(Debug)]
pub(crate) enum Received {
    /// A whole message of `len` bytes (in [`Inbox::bytes`]) and the fds that came with
    /// it.
    Message {
        len: usize,
        fds: Vec<OwnedFd>,
        /// `MSG_TRUNC`: the message was longer than [`MAX_MESSAGE`] and was cut.
        cut: bool,
        /// `MSG_CTRUNC`: some of its fds did not arrive (this process is at its fd
        /// limit, or more came than a message may carry); the kernel closed them.
        fds_cut: bool,
    },
    /// The peer has closed its end (or shut it down). `orphans`: fds of a message that
    /// stopped half-way (a stream only).
    End { orphans: Vec<OwnedFd> },
}

/// The receiving side of one end: a buffer for one message, and on a stream the
/// message being read.
#[derive(Debug)]
pub(crate) struct Inbox {
    buf: Vec<u8>,
    /// A stream's length prefix, as far as read.
    head: [u8; PREFIX],
    head_got: usize,
    /// A stream's message length, once its prefix is read, and how much of it is here.
    body: Option<usize>,
    body_got: usize,
    /// The fds that came with the message being read (a stream).
    fds: Vec<OwnedFd>,
    fds_cut: bool,
}

impl Inbox {
    pub(crate) fn new() -> Inbox {
        Inbox {
            buf: Vec::new(),
            head: [0; PREFIX],
            head_got: 0,
            body: None,
            body_got: 0,
            fds: Vec::new(),
            fds_cut: false,
        }
    }

    /// The bytes of the message last received.
    pub(crate) fn bytes(&self, len: usize) -> &[u8] {
        &self.buf[..len]
    }

    /// Reads the next whole message without waiting: `Ok(None)` if none is here yet.
    /// An `InvalidData` error means a stream announced a message over the limit: the
    /// stream cannot be read further.
    pub(crate) fn recv(&mut self, ch: &Channel) -> io::Result<Option<Received>> {
        if self.buf.len() < MAX_MESSAGE {
            self.buf.resize(MAX_MESSAGE, 0);
        }
        // The peer closed with messages of ours unread: the kernel says so once
        // (ECONNRESET), before what the peer had sent, which is still to be read.
        let mut resets = 0;
        loop {
            let result = match ch.framing {
                Framing::Packets => self.recv_packet(ch),
                Framing::Stream => self.recv_frame(ch),
            };
            return match result {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) && resets == 0 => {
                    resets += 1;
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => Ok(Some(Received::End {
                    orphans: self.reset(),
                })),
                other => other,
            };
        }
    }

    fn recv_packet(&mut self, ch: &Channel) -> io::Result<Option<Received>> {
        let mut fds = Vec::new();
        let (n, cut, fds_cut) = ch.recv_into(&mut self.buf, &mut fds)?;
        if n == 0 && fds.is_empty() && !cut && ch.hung_up() {
            return Ok(Some(Received::End { orphans: fds }));
        }
        Ok(Some(Received::Message {
            len: n.min(self.buf.len()),
            fds,
            cut,
            fds_cut,
        }))
    }

    fn recv_frame(&mut self, ch: &Channel) -> io::Result<Option<Received>> {
        loop {
            let n = match self.body {
                None => {
                    let (n, _, cut) =
                        ch.recv_into(&mut self.head[self.head_got..], &mut self.fds)?;
                    self.fds_cut |= cut;
                    self.head_got += n;
                    n
                }
                Some(len) => {
                    let (n, _, cut) =
                        ch.recv_into(&mut self.buf[self.body_got..len], &mut self.fds)?;
                    self.fds_cut |= cut;
                    self.body_got += n;
                    n
                }
            };
            if n == 0 && self.body.map_or(true, |len| self.body_got < len) {
                return Ok(Some(Received::End {
                    orphans: self.reset(),
                }));
            }
            if self.body.is_none() && self.head_got == PREFIX {
                let len = u32::from_le_bytes(self.head) as usize;
                if len > MAX_MESSAGE {
                    drop(self.reset());
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a message of {len} bytes is over the limit of {MAX_MESSAGE}"),
                    ));
                }
                self.body = Some(len);
            }
            if let Some(len) = self.body.filter(|&len| self.body_got == len) {
                let fds = std::mem::take(&mut self.fds);
                let fds_cut = self.fds_cut;
                drop(self.reset());
                return Ok(Some(Received::Message {
                    len,
                    fds,
                    cut: false,
                    fds_cut,
                }));
            }
        }
    }

    /// Forgets the message being read; returns its fds.
    fn reset(&mut self) -> Vec<OwnedFd> {
        self.head_got = 0;
        self.body = None;
        self.body_got = 0;
        self.fds_cut = false;
        std::mem::take(&mut self.fds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(framing: Framing) {
        let (a, b) = pair_of(framing).unwrap();
        let (a, b) = (Channel::new(a, framing), Channel::new(b, framing));
        let (p, q) = os::pipe().unwrap();
        let msg = vec![7u8; 1000];
        let total = a.frame_len(msg.len());
        assert_eq!(
            a.send_from(&msg, 0, &[p.as_fd(), q.as_fd()]).unwrap(),
            total
        );
        a.send_whole(b"second", &[], Duration::from_secs(1))
            .unwrap();
        let mut inbox = Inbox::new();
        match inbox.recv(&b).unwrap() {
            Some(Received::Message {
                len,
                fds,
                cut,
                fds_cut,
            }) => {
                assert_eq!(inbox.bytes(len), &msg[..]);
                assert_eq!(fds.len(), 2);
                assert!(!cut && !fds_cut);
                let flags = rustix::io::fcntl_getfd(&fds[0]).unwrap();
                assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
            }
            other => panic!("{other:?}"),
        }
        match inbox.recv(&b).unwrap() {
            Some(Received::Message { len, fds, .. }) => {
                assert_eq!(inbox.bytes(len), b"second");
                assert!(fds.is_empty(), "the next message's fds are its own");
            }
            other => panic!("{other:?}"),
        }
        assert!(inbox.recv(&b).unwrap().is_none());
        drop(a);
        assert!(matches!(
            inbox.recv(&b).unwrap(),
            Some(Received::End { .. })
        ));
    }

    #[test]
    fn messages_and_fds_travel_on_packets() {
        roundtrip(Framing::Packets);
    }

    #[test]
    fn messages_and_fds_travel_on_a_stream() {
        roundtrip(Framing::Stream);
    }

    /// A stream message sent in pieces is read as one, however it is cut.
    #[test]
    fn a_stream_message_in_pieces_is_one_message() {
        let (a, b) = pair_of(Framing::Stream).unwrap();
        let b = Channel::new(b, Framing::Stream);
        let (p, _q) = os::pipe().unwrap();
        let msg: Vec<u8> = (0..200u8).collect();
        let mut frame = (msg.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&msg);
        let mut inbox = Inbox::new();
        let a = Channel::new(a, Framing::Packets); // raw writes: no framing of its own
        for (i, piece) in frame.chunks(3).enumerate() {
            let fds: &[BorrowedFd<'_>] = if i == 0 { &[p.as_fd()] } else { &[] };
            assert_eq!(a.send_from(piece, 0, fds).unwrap(), piece.len());
            let got = inbox.recv(&b).unwrap();
            if (i + 1) * 3 < frame.len() {
                assert!(got.is_none(), "piece {i}: {got:?}");
            } else {
                let Some(Received::Message { len, fds, .. }) = got else {
                    panic!("{got:?}")
                };
                assert_eq!(inbox.bytes(len), &msg[..]);
                assert_eq!(fds.len(), 1);
            }
        }
        // A length over the limit: the stream cannot be read further.
        let huge = ((MAX_MESSAGE + 1) as u32).to_le_bytes();
        a.send_from(&huge, 0, &[]).unwrap();
        let err = inbox.recv(&b).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // The peer gone half-way through a message: its fds come back as orphans.
        a.send_from(&[10, 0, 0, 0, 1, 2], 0, &[p.as_fd()]).unwrap();
        assert!(inbox.recv(&b).unwrap().is_none());
        drop(a);
        match inbox.recv(&b).unwrap() {
            Some(Received::End { orphans }) => assert_eq!(orphans.len(), 1),
            other => panic!("{other:?}"),
        }
    }

    /// An empty packet from a live peer is a (malformed) message, not the end.
    #[test]
    fn an_empty_packet_is_not_the_end() {
        let (a, b) = pair_of(Framing::Packets).unwrap();
        let (a, b) = (
            Channel::new(a, Framing::Packets),
            Channel::new(b, Framing::Packets),
        );
        a.send_from(&[], 0, &[]).unwrap();
        let mut inbox = Inbox::new();
        assert!(matches!(
            inbox.recv(&b).unwrap(),
            Some(Received::Message { len: 0, .. })
        ));
        a.shutdown();
        assert!(matches!(
            inbox.recv(&b).unwrap(),
            Some(Received::End { .. })
        ));
    }

    /// A message longer than the limit arrives cut, and says so.
    #[test]
    fn an_oversized_packet_is_cut_and_flagged() {
        let (a, b) = pair_of(Framing::Packets).unwrap();
        make_room(a.as_fd());
        let (a, b) = (
            Channel::new(a, Framing::Packets),
            Channel::new(b, Framing::Packets),
        );
        let big = vec![1u8; MAX_MESSAGE + 10];
        a.send_from(&big, 0, &[]).unwrap();
        let mut inbox = Inbox::new();
        match inbox.recv(&b).unwrap() {
            Some(Received::Message { len, cut, .. }) => {
                assert!(cut);
                assert_eq!(len, MAX_MESSAGE);
            }
            other => panic!("{other:?}"),
        }
    }
}
