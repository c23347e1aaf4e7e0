//! Handing established connections to the new generation.
//!
//! A listener passes to the next generation in the fd table; a connection that is in
//! use when the upgrade starts cannot: it is read and written by the old generation
//! until then, and whatever it has read and not yet answered is in the old
//! generation's memory. Without a handover such connections keep the old generation
//! alive until they close or its drain deadline resets them, and meanwhile (without
//! [`Options::upgrade_during_drain`](crate::Options::upgrade_during_drain)) no further
//! upgrade may start.
//!
//! The handover channel carries them across: the old generation stops reading a
//! connection, and [sends](Sender::send) its fd with the bytes it had read and not
//! used (`unread`) and the application's state for it (`state`, with a `tag` that
//! names its format); the new generation [receives](Receiver::recv) it, checks it, and
//! [accepts](Incoming::accept) it (or [refuses](Incoming::refuse) it, and the old
//! generation keeps it). A WebSocket session, a long poll, a database protocol between
//! two queries: whatever the application can pause between two reads.
//!
//! ```no_run
//! # use std::time::Duration;
//! # fn conns() -> Vec<(std::net::TcpStream, Vec<u8>, Vec<u8>)> { vec![] }
//! # fn serve(_: tableflip::handover::Stream, _: Vec<u8>, _: Vec<u8>) {}
//! # fn main() -> Result<(), tableflip::Error> {
//! # let upg = tableflip::Upgrader::new(tableflip::Options::new())?;
//! const SESSION_V1: u32 = 1;
//! // The old generation, once upgrade() has returned Ok:
//! let sender = upg.handover()?;
//! for (stream, unread, session) in conns() {
//!     let _ = sender.send(stream, &unread, SESSION_V1, &session); // errors come back below
//! }
//! let done = sender.finish(Duration::from_secs(5))?;
//! eprintln!("{done}"); // pid 4242 accepted 200 connection(s); 0 stay here
//! for back in done.returned {
//!     serve(back.stream, back.unread, back.state); // still ours: serve it, or close it
//! }
//!
//! // The new generation, after ready() (poll `rx` with the exit fd and the listeners):
//! # let adoption = upg.ready()?;
//! if let Some(mut rx) = adoption.handover {
//!     loop {
//!         match rx.recv() {
//!             Ok(Some(incoming)) if incoming.tag() == SESSION_V1 => {
//!                 let (stream, unread, session) = incoming.accept()?;
//!                 serve(stream, unread, session);
//!             }
//!             Ok(Some(other)) => { let _ = other.refuse(); } // a format this binary does not know
//!             Ok(None) => break, // nothing more for now: poll again
//!             Err(e) => { eprintln!("{e}"); break } // ended (or refused: see Error::HandoverRefused)
//!         }
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # Who owns a connection
//!
//! A connection belongs to exactly one generation at every instant; the one that owns
//! it is the only one that reads from it or writes to it.
//!
//! - Until the new generation has **acknowledged** it, it belongs to the old one, which
//!   keeps its copy of the fd (and its `unread` and `state`). [`Incoming::accept`] sends
//!   the acknowledgement first and hands out the stream only once it is sent;
//!   [`Incoming::refuse`] (or dropping the `Incoming`, or the [`Receiver`]) says no.
//! - Once acknowledged, it belongs to the new generation; the old one closes its copy
//!   when it reads the answer.
//!
//! What a failure at each moment leaves:
//!
//! | what happens | who owns the connection |
//! |---|---|
//! | the new generation dies (or drops the `Receiver`) before acknowledging | the old one: [`Sender::finish`] gives it back ([`Returned`]) |
//! | the new generation refuses it, or finds it is not a connected stream socket | the old one, given back with the reason |
//! | the new generation acknowledges it, then dies | nobody: it is closed with the new generation. The old one names it ([`Finished::lost`]) if it sees the death (the channel closed without a bye) before `finish` returns |
//! | the old generation dies after sending it, before the answer | the new one: [`Incoming::accept`] finds the old generation gone and hands it out |
//! | the old generation dies before sending it | nobody: it is closed with the old generation, like every connection of a killed process |
//! | [`Sender::finish`]'s deadline passes before the answer (Linux) | the old one: it is taken back and returned; an acknowledgement sent after that fails, and [`Incoming::accept`] returns [`Error::HandoverRefused`] |
//! | [`Sender::finish`]'s deadline passes before the answer (macOS, FreeBSD) | the new one: the old one lets go of what it has sent ([`Finished::given`]) |
//! | the `Sender` is dropped without `finish` | the new one, for what was sent; what was not sent is closed |
//!
//! The take-back at the deadline is atomic on Linux: the old generation says so
//! (`END`), then shuts the socket down for reading, after which the kernel refuses every
//! acknowledgement (`EPIPE`); it then reads the acknowledgements queued before that.
//! An acknowledgement either is queued before the shutdown, and the old generation
//! finds it, or fails, and the new generation closes its copy. Where the kernel
//! discards what is queued at such a shutdown (the BSDs), the old generation gives
//! what it sent instead of taking it back. When an acknowledgement cannot be sent
//! because the old generation is gone, the new generation waits (at most 100 ms) for
//! its lifeline to say it has exited: a connection whose old owner has exited is the
//! new generation's, whatever it had said.
//!
//! A connection is given back (and an acknowledgement refused) only while the other
//! side could still serve it, so no connection is ever served by two generations; and
//! every copy is closed by whichever side does not own it, so none is left open with
//! nobody reading it. The new generation must keep polling its `Receiver` (or drop
//! it): connections still queued in it hold a copy until it reads or closes them.
//!
//! # What the new generation checks
//!
//! The channel is a trust boundary. The new generation finds its end in the fd table
//! (entry kind `handover`) and, before using it, checks that it is a Unix socket of the
//! expected type whose peer (`SO_PEERCRED`, `LOCAL_PEERCRED`, `LOCAL_PEERPID`) is the
//! process that started it; otherwise [`Receiver::recv`] reports
//! [`Error::HandoverUnavailable`] and the fd is left
//! alone (neither used nor closed). Every message is decoded strictly; every fd is
//! checked to be a connected stream socket of the kind its record declares (`SO_TYPE`,
//! `getpeername`) before it is handed out, and refused otherwise. A malformed message
//! is refused as a whole. A message whose fds did not all arrive (`MSG_CTRUNC`: this
//! process is at its fd limit) is refused as a whole, so the old generation keeps
//! every connection in it. Nothing that arrives is trusted to be more than it was
//! checked to be, and no error closes anything the other side owns.
//!
//! The old generation parses the answers as strictly: an answer for a connection it
//! did not send, or already settled, is reported ([`Finished::errors`]) and changes
//! nothing.
//!
//! # A new generation upgraded while it receives
//!
//! It **refuses**: once its exit notification has fired (it has been upgraded itself,
//! or stopped), [`Receiver::recv`] refuses what it has queued, tells the old generation
//! it is done (`BYE`, which refuses everything else), and returns
//! [`Error::HandoverEnded`]. The old generation keeps those
//! connections and serves them until it exits. What the new generation had accepted is
//! its own, to serve while it drains or to hand to its own successor with its own
//! [`Sender`]. It does not forward what it has not accepted.
//!
//! # Limits
//!
//! - [`MAX_FDS`] (253, Linux's `SCM_MAX_FD`) connections per message; the sender
//!   batches and never sends more.
//! - [`MAX_UNREAD`] and [`MAX_STATE`] bytes per connection; [`Sender::send`] refuses
//!   more, and gives the connection back.
//! - [`MAX_MESSAGE`] bytes per message; a larger one arrives cut (`MSG_TRUNC`) and is
//!   refused.
//! - fds in flight count against the sender's fd limit (`RLIMIT_NOFILE`; Linux refuses
//!   more with `ETOOMANYREFS`, root excepted): the sender waits for the receiver to take
//!   what is in flight and tries again until its deadline, then gives back what could
//!   not be sent, with the error.
//! - The receiver waits at most 1 s for room to send an answer (the old generation reads
//!   answers while it sends, and in [`Sender::finish`] or [`Sender::answers`]); an
//!   answer that cannot be sent is not an acknowledgement.
//!
//! # The message format
//!
//! One message per `SOCK_SEQPACKET` packet (macOS: preceded by its length, a `u32`). All
//! integers are little-endian. Every message starts with a 12-byte header whose layout
//! is the same in every version:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `TFHO` |
//! | 4 | version: 1 (a message of another version is refused and rejected by number) |
//! | 5 | type: `C`, `E` (old to new); `A`, `R`, `B` (new to old) |
//! | 6..8 | count: connections in a `C`, answers in an `A`; 0 otherwise |
//! | 8..12 | sequence number: 1, 2, ... per direction |
//!
//! - `C`, connections: `count` records (1 to 253), and exactly `count` fds
//!   (`SCM_RIGHTS`) in record order. A record: id (`u64`, not 0, increasing across the
//!   channel), tag (`u32`, the application's: its format and version of `state`), kind
//!   (`u8`: 1 TCP, 2 Unix stream), three zero bytes, the length of `unread` (`u32`, at
//!   most [`MAX_UNREAD`]), the length of `state` (`u32`, at most [`MAX_STATE`]), then
//!   `unread`, then `state`.
//! - `E`, end: rule (`u8`: 1, what was sent and not acknowledged is kept by the old
//!   generation; 2, it is given to the new one), three zero bytes, how many that covers
//!   (`u32`). Nothing follows.
//! - `A`, answers: `count` answers (1 to 253). An answer: the connection's id (`u64`),
//!   verdict (`u8`: 1 accepted, 2 refused), a zero byte, the reason's length (`u16`, at
//!   most 200; 0 when accepted), the reason (UTF-8).
//! - `R`, reject: the sequence number of a `C` that could not be read (`u32`), a reason
//!   as in an answer. Every connection of that message is refused.
//! - `B`, bye: the receiver is done; every connection it has not answered is refused.
//!
//! A message has exactly the size its fields add up to; reserved bytes are zero. The
//! application's `tag` is how a new binary recognizes a `state` it cannot read: it
//! refuses the connection, and the old generation keeps it.
//!
//! Before all this, the new generation tells whether it took the channel: it confirms
//! the commit with `H` and the lowest and highest versions it reads, instead of `D`,
//! on the readiness pipe (see the handshake). An older release, which does not know the
//! `handover` entry, closes it and confirms with `D`; [`Upgrader::handover`] then says
//! so.
//!
//! # Platforms
//!
//! Linux and FreeBSD: `SOCK_SEQPACKET`. macOS: a stream with a length before each
//! message. The deadline's take-back is Linux's; elsewhere the old generation gives
//! what it has sent (see above). TLS state cannot move between processes: hand over a
//! TLS connection only with a library that exports its session (kTLS, or rustls's
//! `dangerous_extract_secrets` into a kernel TLS socket), or not at all.
//!
//! [`Upgrader::handover`]: crate::Upgrader::handover

use std::fmt;
use std::net::TcpStream;
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::error::{Error, Result};

mod channel;
mod receiver;
mod sender;
pub(crate) mod wire;

pub use receiver::{Incoming, Receiver};
pub use sender::{Finished, Returned, Sender};

pub(crate) use channel::pair;

/// The most connections in one message: Linux's `SCM_MAX_FD`, the most fds one
/// `sendmsg` may carry.
pub const MAX_FDS: usize = 253;
/// The most bytes of `unread` per connection: 64 KiB.
pub const MAX_UNREAD: usize = 64 << 10;
/// The most bytes of `state` per connection: 64 KiB.
pub const MAX_STATE: usize = 64 << 10;
/// The largest message: 192 KiB (one connection with both blobs at their limit fits, and
/// so does Linux's default socket buffer, 208 KiB).
pub const MAX_MESSAGE: usize = 192 << 10;
/// The version of the message format this release speaks.
pub const VERSION: u8 = wire::VERSION;

/// A connection that travels on the channel: what [`Sender::send`] takes and
/// [`Incoming::accept`] gives.
#[derive(Debug)]
#[non_exhaustive]
pub enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix stream connection.
    Unix(UnixStream),
}

impl Stream {
    fn kind(&self) -> wire::Kind {
        match self {
            Stream::Tcp(_) => wire::Kind::Tcp,
            Stream::Unix(_) => wire::Kind::Unix,
        }
    }

    fn of_kind(kind: wire::Kind, fd: OwnedFd) -> Stream {
        match kind {
            wire::Kind::Tcp => Stream::Tcp(fd.into()),
            wire::Kind::Unix => Stream::Unix(fd.into()),
        }
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Stream {
        Stream::Tcp(s)
    }
}

impl From<UnixStream> for Stream {
    fn from(s: UnixStream) -> Stream {
        Stream::Unix(s)
    }
}

/// A connected stream socket, checked (`SO_TYPE`, `getpeername`): TCP or Unix. On
/// failure the fd comes back, untouched, with the reason.
impl TryFrom<OwnedFd> for Stream {
    type Error = (OwnedFd, Error);

    fn try_from(fd: OwnedFd) -> std::result::Result<Stream, (OwnedFd, Error)> {
        match crate::sys::socket::connected_stream(fd.as_fd()) {
            Ok(crate::sys::socket::Connected::Inet) => Ok(Stream::Tcp(fd.into())),
            Ok(crate::sys::socket::Connected::Unix) => Ok(Stream::Unix(fd.into())),
            Err(m) => {
                let raw = fd.as_raw_fd();
                let err = Error::io(
                    "check a connection to hand over",
                    Some(raw),
                    m.source.unwrap_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            format!("fd {raw} is {}", m.reason),
                        )
                    }),
                );
                Err((fd, err))
            }
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl From<Stream> for OwnedFd {
    fn from(s: Stream) -> OwnedFd {
        match s {
            Stream::Tcp(s) => s.into(),
            Stream::Unix(s) => s.into(),
        }
    }
}

/// The old generation's end of the channel, from a successful upgrade, until
/// [`Upgrader::handover`](crate::Upgrader::handover) takes it.
#[derive(Debug)]
pub(crate) struct Offer {
    pub(crate) fd: OwnedFd,
    /// Our copy of the new generation's end, closed when the channel is taken: kept
    /// until then so that the upgrade's path has one system call more (the pair), not
    /// two.
    pub(crate) child_end: OwnedFd,
    /// If the new generation took the channel (it confirmed the commit with `H`): the
    /// readiness pipe, where the two versions it reads follow.
    pub(crate) confirmation: Option<OwnedFd>,
    /// The new generation's pid.
    pub(crate) pid: u32,
}

impl Offer {
    /// The sending end, if the new generation took the channel and reads this version;
    /// what it settles is noted in `records`.
    pub(crate) fn sender(
        self,
        records: std::sync::Arc<crate::sys::records::Records>,
    ) -> Result<Sender> {
        let Offer {
            fd,
            child_end,
            confirmation,
            pid,
        } = self;
        drop(child_end);
        let unavailable = |reason: String| Error::HandoverUnavailable {
            pid: Some(pid),
            reason,
        };
        let Some(ready) = confirmation else {
            return Err(unavailable(
                "the new generation took no handover channel (an older release?)".into(),
            ));
        };
        let now = Some(std::time::Instant::now());
        // Written with the `H`, in one write: here already, or not at all.
        let mut versions = [0u8; 2];
        let got = crate::sys::os::readable(ready.as_fd(), now)
            .and_then(|_| crate::sys::os::read(&ready, &mut versions));
        let (low, high) = match got {
            Ok(2) => (versions[0], versions[1]),
            _ => {
                return Err(unavailable(
                    "the new generation's confirmation lacks the handover versions".into(),
                ))
            }
        };
        if !(low..=high).contains(&VERSION) {
            return Err(unavailable(format!(
                "the new generation reads handover versions {low} to {high}, this one writes {VERSION}"
            )));
        }
        // Nothing has been sent: anything to read is a hang-up, a bye, or garbage.
        if crate::sys::os::readable(fd.as_fd(), now).unwrap_or(true) {
            return Err(unavailable(
                "the new generation has closed the handover channel".into(),
            ));
        }
        Ok(
            Sender::new(channel::Channel::new(fd, channel::Framing::NATIVE), pid)
                .recording(records),
        )
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let peer = match self {
            Stream::Tcp(s) => s.peer_addr().map(|a| a.to_string()).ok(),
            Stream::Unix(_) => None,
        };
        match peer {
            Some(peer) => write!(
                f,
                "{} from {peer} (fd {})",
                self.kind().name(),
                self.as_raw_fd()
            ),
            None => write!(f, "{} (fd {})", self.kind().name(), self.as_raw_fd()),
        }
    }
}

#[cfg(test)]
mod tests;
