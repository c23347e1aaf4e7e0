//! The new generation's end: receiving connections, checking them, answering.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::mem::ManuallyDrop;
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::channel::{self, Channel, Framing, Inbox, Received};
use super::wire::{self, Answer, EndRule, Kind, Message};
use super::{Stream, MAX_MESSAGE};
use crate::error::{Error, Result};
use crate::sys::socket::{self, Connected};

/// How long an answer may wait for room on the channel.
const ANSWER_WAIT: Duration = Duration::from_secs(1);
/// How long to wait for the old generation's lifeline to say it has exited, when an
/// answer cannot be sent because its end is gone.
const EXIT_WAIT: Duration = Duration::from_millis(100);

/// The new generation's end of the handover channel: connections from the previous
/// generation, received the way a listener's are accepted.
///
/// It comes in the [adoption report](crate::Adoption::handover) of
/// [`Upgrader::ready`](crate::Upgrader::ready). Poll it ([`AsFd`], readable when
/// something arrives) together with the exit notification and the listeners, and call
/// [`recv`](Receiver::recv) until it returns `Ok(None)`; it ends with
/// [`Error::HandoverEnded`]. Then drop it. Dropping it tells the previous generation
/// that everything not yet accepted (queued here, or held as an [`Incoming`]) is
/// refused.
pub struct Receiver {
    state: State,
}

/// The channel, checked when first used (not on the upgrade's path: a generation that
/// never receives never pays for the checks).
enum State {
    /// Nothing read or sent yet. (`None` only while it is being checked.)
    Unchecked(Option<Unchecked>),
    Ready(Arc<Link>),
    Broken(Broken),
}

/// What a receiver is made of, before its checks.
struct Unchecked {
    fd: OwnedFd,
    framing: Framing,
    parent: u32,
    lifeline: Arc<OwnedFd>,
    exiting: Arc<AtomicBool>,
}

/// A channel that failed its checks: its fd is left open and never used (it may be
/// somebody else's).
struct Broken {
    fd: ManuallyDrop<OwnedFd>,
    pid: u32,
    reason: String,
}

/// What the receiver and every [`Incoming`] share: the channel, and who is at its
/// other end.
pub(crate) struct Link {
    channel: Channel,
    /// The previous generation's pid.
    pid: u32,
    /// Readable (EOF) once the previous generation has exited, every thread of it.
    lifeline: Arc<OwnedFd>,
    /// Set when this generation should exit (upgraded or stopped).
    exiting: Arc<AtomicBool>,
    /// What we send, one message at a time (answers from several threads must not
    /// interleave, and nothing may follow a bye).
    talk: Mutex<Talk>,
    /// What we read.
    incoming: Mutex<In>,
}

struct Talk {
    seq: u32,
    said_bye: bool,
}

struct In {
    inbox: Inbox,
    /// Checked and not yet handed out.
    queue: VecDeque<Pending>,
    /// To report before anything else.
    errors: VecDeque<Error>,
    /// Why nothing more will come, once that is so.
    ended: Option<String>,
    /// What the previous generation's `E` said, if it came.
    end: Option<EndRule>,
    /// The highest connection id seen: ids only grow.
    last_id: u64,
    /// Whether an answer found the other end gone while it still ran (then later
    /// ones do not wait for it to exit).
    waited: bool,
}

/// A connection received and checked, not yet handed out.
struct Pending {
    id: u64,
    tag: u32,
    kind: Kind,
    fd: OwnedFd,
    unread: Vec<u8>,
    state: Vec<u8>,
}

/// The fds that came with a message, and whether some did not (`MSG_CTRUNC`).
struct Arrived {
    fds: Vec<OwnedFd>,
    cut: bool,
}

/// Why an answer was not sent.
enum Unsent {
    /// The other end is closed or shut down (`EPIPE`, `ECONNRESET`, `ENOTCONN`).
    Gone,
    /// No room within the wait.
    Busy,
    /// This side has said it is done.
    Closed,
    Io(io::Error),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Receiver {
    /// The receiving end of a new generation whose parent (`parent`) committed. The fd
    /// from the table is checked when first used (a Unix socket of this platform's
    /// type, connected to `parent`); a failed check leaves it open, unused.
    pub(crate) fn adopt(
        fd: OwnedFd,
        parent: u32,
        lifeline: Arc<OwnedFd>,
        exiting: Arc<AtomicBool>,
    ) -> Receiver {
        Receiver::with_framing(fd, Framing::NATIVE, parent, lifeline, exiting)
    }

    pub(crate) fn with_framing(
        fd: OwnedFd,
        framing: Framing,
        parent: u32,
        lifeline: Arc<OwnedFd>,
        exiting: Arc<AtomicBool>,
    ) -> Receiver {
        Receiver {
            state: State::Unchecked(Some(Unchecked {
                fd,
                framing,
                parent,
                lifeline,
                exiting,
            })),
        }
    }

    /// Checks the channel, once, and makes it ready or broken.
    fn check_once(&mut self) {
        let State::Unchecked(u) = &mut self.state else {
            return;
        };
        let Some(u) = u.take() else { return };
        self.state = match check(u.fd.as_fd(), u.framing, u.parent) {
            Err(reason) => State::Broken(Broken {
                fd: ManuallyDrop::new(u.fd),
                pid: u.parent,
                reason,
            }),
            Ok(()) => {
                channel::make_room(u.fd.as_fd());
                State::Ready(Arc::new(Link {
                    channel: Channel::new(u.fd, u.framing),
                    pid: u.parent,
                    lifeline: u.lifeline,
                    exiting: u.exiting,
                    talk: Mutex::new(Talk {
                        seq: 0,
                        said_bye: false,
                    }),
                    incoming: Mutex::new(In {
                        inbox: Inbox::new(),
                        queue: VecDeque::new(),
                        errors: VecDeque::new(),
                        ended: None,
                        end: None,
                        last_id: 0,
                        waited: false,
                    }),
                }))
            }
        };
    }

    /// The previous generation's pid: the one that sends.
    pub fn pid(&self) -> u32 {
        match &self.state {
            State::Unchecked(u) => u.as_ref().map_or(0, |u| u.parent),
            State::Ready(link) => link.pid,
            State::Broken(b) => b.pid,
        }
    }

    /// The next connection, without waiting.
    ///
    /// - `Ok(Some(incoming))`: a connection, checked (a connected stream socket of the
    ///   kind its record says). Look at its [`tag`](Incoming::tag), then
    ///   [`accept`](Incoming::accept) or [`refuse`](Incoming::refuse) it.
    /// - `Ok(None)`: nothing more now; poll the fd and call again.
    /// - `Err(Error::HandoverRefused { .. })`: something that arrived was refused (a
    ///   malformed message, an fd of the wrong kind, a message whose fds did not all
    ///   arrive because this process is at its fd limit). The previous generation keeps
    ///   what was refused. Call again: the channel carries on.
    /// - `Err(Error::HandoverEnded { .. })`: nothing more will come (the previous
    ///   generation has finished or gone, or this one is exiting). Every later call
    ///   says so again; drop the receiver.
    /// - `Err(Error::HandoverUnavailable { .. })`: the fd the table named as the channel
    ///   failed its checks; it is not used.
    ///
    /// Once this generation's exit notification has fired (it was upgraded or stopped),
    /// the receiver refuses what it holds and everything the previous generation sends
    /// from then on, and ends: see the [module docs](super).
    pub fn recv(&mut self) -> Result<Option<Incoming>> {
        self.check_once();
        let link = match &self.state {
            State::Ready(link) => link,
            State::Broken(b) => {
                return Err(Error::HandoverUnavailable {
                    pid: Some(b.pid),
                    reason: b.reason.clone(),
                })
            }
            State::Unchecked(_) => unreachable!("checked above"),
        };
        let mut st = lock(&link.incoming);
        if link.exiting.load(Ordering::SeqCst) && st.ended.is_none() {
            link.stop_for_exit(&mut st);
        }
        if st.errors.is_empty() && st.queue.is_empty() && st.ended.is_none() {
            link.read(&mut st)?;
        }
        if let Some(e) = st.errors.pop_front() {
            return Err(e);
        }
        if let Some(p) = st.queue.pop_front() {
            return Ok(Some(Incoming {
                link: Arc::clone(link),
                p: Some(p),
            }));
        }
        if let Some(why) = st.ended.clone() {
            // What still arrives holds copies of connections: read it and close them.
            link.discard(&mut st);
            return Err(Error::HandoverEnded {
                pid: link.pid,
                reason: why,
            });
        }
        Ok(None)
    }
}

/// The checks before the channel is used: a Unix socket of `framing`'s type, whose
/// peer is `parent`.
fn check(fd: BorrowedFd<'_>, framing: Framing, parent: u32) -> std::result::Result<(), String> {
    let raw = fd.as_raw_fd();
    let named = format!("fd {raw}, named as the handover channel in the fd table,");
    if let Err(m) = socket::unix_of_type(fd, framing.socket_type()) {
        return Err(match m.source {
            Some(e) => format!("{named} cannot be checked: {}: {e}", m.reason),
            None => format!("{named} is {}", m.reason),
        });
    }
    match socket::peer_pid(fd) {
        Ok(pid) if pid == parent => Ok(()),
        Ok(pid) => Err(format!(
            "{named} is connected to pid {pid}, not to the previous generation (pid {parent})"
        )),
        Err(e) => Err(format!("{named} has no peer pid to check: {e}")),
    }
}

impl Link {
    /// Reads messages until one gives something to report or hand out, or nothing is
    /// left. An error here ends the channel (the stream cannot be read further).
    fn read(&self, st: &mut In) -> Result<()> {
        loop {
            match st.inbox.recv(&self.channel) {
                Ok(None) => return Ok(()),
                Ok(Some(Received::Message {
                    len,
                    fds,
                    cut,
                    fds_cut,
                })) => self.take(st, len, fds, cut, fds_cut),
                Ok(Some(Received::End { orphans })) => {
                    self.closed(st, orphans);
                    return Ok(());
                }
                Err(e) => {
                    let raw = self.channel.fd().as_raw_fd();
                    st.ended = Some(format!("reading the channel failed: {e}"));
                    return Err(Error::io("recvmsg on the handover channel", Some(raw), e));
                }
            }
            if !st.errors.is_empty() || !st.queue.is_empty() || st.ended.is_some() {
                return Ok(());
            }
        }
    }

    /// Reads what arrives after the end and closes its fds: nothing in it is ours.
    fn discard(&self, st: &mut In) {
        for _ in 0..64 {
            match st.inbox.recv(&self.channel) {
                Ok(Some(Received::Message { .. })) => {}
                _ => return,
            }
        }
    }

    /// One message, `len` bytes in the inbox, with `fds`.
    fn take(&self, st: &mut In, len: usize, fds: Vec<OwnedFd>, cut: bool, fds_cut: bool) {
        let In {
            inbox,
            queue,
            errors,
            ended,
            end,
            last_id,
            ..
        } = st;
        let bytes = inbox.bytes(len);
        // A message refused whole: the `C` to reject by number (if it is one), the reason
        // to give with it, and what to say here.
        let msg = if cut {
            let reason = format!("over the limit of {MAX_MESSAGE} bytes (cut short)");
            Err((
                conns_seq(bytes),
                reason.clone(),
                format!("a message {reason}"),
            ))
        } else {
            wire::decode(bytes).map_err(|m| {
                let seq = m.seq.filter(|_| m.ty == Some(wire::Type::Conns));
                (seq, m.reason.clone(), format!("a malformed message ({m})"))
            })
        };
        match msg {
            Err((seq, reason, said)) => {
                if let Some(seq) = seq {
                    let _ = self.say(|s| wire::reject(s, seq, &reason), ANSWER_WAIT);
                }
                errors.push_back(self.refused(format!(
                    "{said}; what it carried stays with the previous generation"
                )));
            }
            Ok(Message::Conns { seq, records }) => {
                let fds = Arrived { fds, cut: fds_cut };
                self.take_conns(seq, records, fds, last_id, queue, errors);
            }
            Ok(Message::End { rule, count, .. }) => {
                *end = Some(rule);
                *ended = Some(self.ended_by(rule, count, queue));
            }
            Ok(other) => errors.push_back(self.refused(format!(
                "a {:?} message, which only the new generation sends",
                other.ty()
            ))),
        }
    }

    fn refused(&self, reason: String) -> Error {
        Error::HandoverRefused {
            pid: self.pid,
            id: None,
            reason,
        }
    }

    /// A `C` message: its ids must grow, its fds must all be here, one per record.
    fn take_conns(
        &self,
        seq: u32,
        records: Vec<wire::Record<'_>>,
        fds: Arrived,
        last_id: &mut u64,
        queue: &mut VecDeque<Pending>,
        errors: &mut VecDeque<Error>,
    ) {
        let want = records.len();
        if let (Some(first), Some(last)) = (records.first(), records.last()) {
            if first.id <= *last_id {
                let (first, last) = (first.id, *last_id);
                errors.push_back(self.refused(format!(
                    "message {seq}: connection id {first} does not follow {last}; ignored"
                )));
                return;
            }
            *last_id = last.id;
        }
        if fds.cut || fds.fds.len() != want {
            let got = fds.fds.len();
            let reason = if fds.cut {
                format!(
                    "only {got} of its {want} fds arrived: this process is at its fd limit \
                     (RLIMIT_NOFILE; MSG_CTRUNC)"
                )
            } else {
                format!("{got} fds came with {want} connections")
            };
            let _ = self.say(|s| wire::reject(s, seq, &reason), ANSWER_WAIT);
            errors.push_back(self.refused(format!(
                "message {seq} refused: {reason}; its {want} connection(s) stay with the \
                 previous generation"
            )));
            return;
        }
        self.check_all(records, fds.fds, queue, errors);
    }

    /// The previous generation's `E`: why nothing more comes. Under `Kept`, what is
    /// queued is its own again, and goes.
    fn ended_by(&self, rule: EndRule, count: u32, queue: &mut VecDeque<Pending>) -> String {
        match rule {
            EndRule::Kept => {
                queue.clear();
                format!(
                    "the previous generation has finished; it keeps the {count} \
                     connection(s) not acknowledged in time"
                )
            }
            EndRule::Given => format!(
                "the previous generation has finished; the {count} connection(s) it sent \
                 and were not answered are this generation's"
            ),
        }
    }

    /// Checks each connection's fd against its record: queued, or refused (one answer
    /// for all the refusals).
    fn check_all(
        &self,
        records: Vec<wire::Record<'_>>,
        fds: Vec<OwnedFd>,
        queue: &mut VecDeque<Pending>,
        errors: &mut VecDeque<Error>,
    ) {
        let mut refusals: Vec<(u64, String)> = Vec::new();
        for (r, fd) in records.into_iter().zip(fds) {
            let found = socket::connected_stream(fd.as_fd());
            let reason = match (found, r.kind) {
                (Ok(Connected::Inet), Kind::Tcp) | (Ok(Connected::Unix), Kind::Unix) => {
                    queue.push_back(Pending {
                        id: r.id,
                        tag: r.tag,
                        kind: r.kind,
                        fd,
                        unread: r.unread.to_vec(),
                        state: r.state.to_vec(),
                    });
                    continue;
                }
                (Ok(Connected::Inet), Kind::Unix) => "a TCP connection".to_string(),
                (Ok(Connected::Unix), Kind::Tcp) => "a Unix connection".to_string(),
                (Err(m), _) => match m.source {
                    Some(e) => format!("not checkable: {}: {e}", m.reason),
                    None => m.reason,
                },
            };
            let reason = format!(
                "fd {} for connection {} is {reason}, not the {} its record says",
                fd.as_raw_fd(),
                r.id,
                r.kind.name()
            );
            errors.push_back(Error::HandoverRefused {
                pid: self.pid,
                id: Some(r.id),
                reason: reason.clone(),
            });
            refusals.push((r.id, reason));
        }
        if !refusals.is_empty() {
            let answers: Vec<Answer<'_>> = refusals
                .iter()
                .map(|(id, reason)| Answer {
                    id: *id,
                    accepted: false,
                    reason,
                })
                .collect();
            let _ = self.say(|s| wire::answers(s, &answers), ANSWER_WAIT);
        }
    }

    /// The other end closed: what is queued stays (who owns it is decided when it is
    /// accepted); the fds of a message cut short are closed.
    fn closed(&self, st: &mut In, orphans: Vec<OwnedFd>) {
        if !orphans.is_empty() {
            st.errors.push_back(Error::HandoverRefused {
                pid: self.pid,
                id: None,
                reason: format!(
                    "the previous generation stopped in the middle of a message: its {} \
                     connection(s) were closed",
                    orphans.len()
                ),
            });
        }
        if st.ended.is_none() {
            st.ended = Some("the previous generation has closed the channel".into());
        }
    }

    /// This generation is exiting: refuse what is queued and whatever comes (a bye
    /// refuses everything not answered), and end.
    fn stop_for_exit(&self, st: &mut In) {
        self.bye();
        let n = st.queue.len();
        st.queue.clear();
        st.ended = Some(format!(
            "this generation is exiting (upgraded or stopped): it refused {n} queued \
             connection(s) and refuses the rest, which stay with the previous generation"
        ));
    }

    /// Sends one message built for the next sequence number, waiting up to `wait` for
    /// room.
    fn say(
        &self,
        build: impl FnOnce(u32) -> Vec<u8>,
        wait: Duration,
    ) -> std::result::Result<(), Unsent> {
        let mut talk = lock(&self.talk);
        if talk.said_bye {
            return Err(Unsent::Closed);
        }
        talk.seq = talk.seq.wrapping_add(1);
        let msg = build(talk.seq);
        self.channel
            .send_whole(&msg, &[], wait)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN) => Unsent::Gone,
                _ if e.kind() == io::ErrorKind::WouldBlock => Unsent::Busy,
                _ => Unsent::Io(e),
            })
    }

    fn answer(
        &self,
        id: u64,
        accepted: bool,
        reason: &str,
        wait: Duration,
    ) -> std::result::Result<(), Unsent> {
        let a = [Answer {
            id,
            accepted,
            reason,
        }];
        self.say(|s| wire::answers(s, &a), wait)
    }

    /// An answer could not be sent because the other end is gone: whether the
    /// connection is ours anyway. It is if the previous generation gave what it sent
    /// (its `E` said so), or has exited (its lifeline says so, within [`EXIT_WAIT`]);
    /// otherwise it took it back.
    fn ours_after_all(&self) -> bool {
        let mut st = lock(&self.incoming);
        // Its `E` may be queued behind messages not read yet: read up to it (what is
        // read is kept, to be handed out). Bounded: a peer cannot keep us here.
        for _ in 0..1024 {
            if st.end.is_some() || st.ended.is_some() {
                break;
            }
            let before = st.queue.len() + st.errors.len();
            if self.read(&mut st).is_err() || st.queue.len() + st.errors.len() == before {
                break;
            }
        }
        if st.end == Some(EndRule::Given) {
            return true;
        }
        let wait = if st.end.is_some() || st.waited {
            Duration::ZERO
        } else {
            EXIT_WAIT
        };
        let exited = crate::sys::os::readable(self.lifeline.as_fd(), Some(Instant::now() + wait))
            .unwrap_or(false);
        if !exited {
            st.waited = true;
        }
        exited
    }

    /// Says bye, once: everything not answered is refused, and nothing follows.
    fn bye(&self) {
        let mut talk = lock(&self.talk);
        if !talk.said_bye {
            talk.seq = talk.seq.wrapping_add(1);
            let _ = self
                .channel
                .send_whole(&wire::bye(talk.seq), &[], Duration::ZERO);
            talk.said_bye = true;
        }
    }
}

/// The sequence number of what looks like a `C` message (for a rejection), if its
/// header is there.
fn conns_seq(bytes: &[u8]) -> Option<u32> {
    match wire::decode(bytes.get(..wire::HEADER)?) {
        Err(m) if m.ty == Some(wire::Type::Conns) => m.seq,
        _ => None,
    }
}

impl AsFd for Receiver {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.state {
            State::Unchecked(u) => u.as_ref().expect("checked in place").fd.as_fd(),
            State::Ready(link) => link.channel.fd(),
            State::Broken(b) => b.fd.as_fd(),
        }
    }
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Receiver");
        d.field("fd", &self.as_fd().as_raw_fd())
            .field("pid", &self.pid());
        if let State::Broken(b) = &self.state {
            d.field("unusable", &b.reason);
        }
        d.finish()
    }
}

impl Drop for Receiver {
    /// Says bye (everything not accepted is refused) and closes what is queued.
    fn drop(&mut self) {
        // Checked first: a bye is sent only to the previous generation.
        self.check_once();
        if let State::Ready(link) = &self.state {
            link.bye();
            lock(&link.incoming).queue.clear();
        }
    }
}

/// A connection received from the previous generation, checked, not yet accepted: it
/// still belongs to the previous generation. [`accept`](Incoming::accept) it or
/// [`refuse`](Incoming::refuse) it; dropping it refuses it.
pub struct Incoming {
    link: Arc<Link>,
    /// `None` once accepted or refused.
    p: Option<Pending>,
}

impl Incoming {
    fn pending(&self) -> &Pending {
        self.p
            .as_ref()
            .expect("an Incoming holds its connection until consumed")
    }

    /// The connection's id, as the previous generation's [`Sender::send`](super::Sender::send) returned it.
    pub fn id(&self) -> u64 {
        self.pending().id
    }

    /// The application's tag for [`state`](Incoming::state): its format and version,
    /// as the previous generation gave it. Refuse a connection whose tag this binary
    /// does not know.
    pub fn tag(&self) -> u32 {
        self.pending().tag
    }

    /// The bytes the previous generation had read from the connection and not used:
    /// they come before anything read from it now.
    pub fn unread(&self) -> &[u8] {
        &self.pending().unread
    }

    /// The application's state for this connection.
    pub fn state(&self) -> &[u8] {
        &self.pending().state
    }

    /// Whether it is a TCP connection (else a Unix stream connection).
    pub fn is_tcp(&self) -> bool {
        self.pending().kind == Kind::Tcp
    }

    /// Takes the connection: sends the acknowledgement, then hands out the stream with
    /// its unread bytes and state. Only then is it this generation's, to read and write.
    ///
    /// Fails with [`Error::HandoverRefused`] (and closes this generation's copy) when
    /// the acknowledgement could not be sent and the connection is not this
    /// generation's: the previous generation took it back at its deadline, or did not
    /// read answers for a second, or this receiver has said bye. When the previous
    /// generation has exited instead, the connection is this generation's and is
    /// handed out. See the [module docs](super) for every case.
    pub fn accept(mut self) -> Result<(Stream, Vec<u8>, Vec<u8>)> {
        let p = self
            .p
            .take()
            .expect("an Incoming holds its connection until consumed");
        let refused = |reason: String| Error::HandoverRefused {
            pid: self.link.pid,
            id: Some(p.id),
            reason,
        };
        let err = match self.link.answer(p.id, true, "", ANSWER_WAIT) {
            Ok(()) => None,
            Err(Unsent::Gone) if self.link.ours_after_all() => None,
            Err(Unsent::Gone) => Some(refused(
                "the previous generation took it back: it was not acknowledged before its \
                 deadline"
                    .into(),
            )),
            Err(Unsent::Busy) => Some(refused(format!(
                "the acknowledgement could not be sent within {ANSWER_WAIT:?} (the previous \
                 generation is not reading answers); it keeps the connection"
            ))),
            Err(Unsent::Closed) => Some(refused(
                "this receiver has said bye (it was dropped, or its generation is exiting)".into(),
            )),
            Err(Unsent::Io(e)) => Some(Error::io(
                "send an acknowledgement on the handover channel",
                Some(self.link.channel.fd().as_raw_fd()),
                e,
            )),
        };
        match err {
            None => Ok((Stream::of_kind(p.kind, p.fd), p.unread, p.state)),
            Some(e) => Err(e),
        }
    }

    /// Refuses the connection: it stays with the previous generation, which serves or
    /// closes it. This generation's copy is closed.
    ///
    /// `Err(Error::HandoverEnded)` when the previous generation has exited meanwhile:
    /// the connection was this generation's, and refusing it closed it.
    pub fn refuse(mut self) -> Result<()> {
        let p = self
            .p
            .take()
            .expect("an Incoming holds its connection until consumed");
        let sent = self
            .link
            .answer(p.id, false, "refused by the new generation", ANSWER_WAIT);
        drop(p.fd);
        match sent {
            Ok(()) | Err(Unsent::Busy | Unsent::Closed) => Ok(()),
            Err(Unsent::Gone) if self.link.ours_after_all() => Err(Error::HandoverEnded {
                pid: self.link.pid,
                reason: format!(
                    "the previous generation is gone: connection {} was this generation's, \
                     and refusing it closed it",
                    p.id
                ),
            }),
            Err(Unsent::Gone) => Ok(()),
            Err(Unsent::Io(e)) => Err(Error::io(
                "send a refusal on the handover channel",
                Some(self.link.channel.fd().as_raw_fd()),
                e,
            )),
        }
    }
}

impl Drop for Incoming {
    /// Refuses it, without waiting.
    fn drop(&mut self) {
        if let Some(p) = self.p.take() {
            let _ = self
                .link
                .answer(p.id, false, "dropped by the new generation", Duration::ZERO);
        }
    }
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Incoming");
        if let Some(p) = &self.p {
            d.field("id", &p.id)
                .field("tag", &p.tag)
                .field("kind", &p.kind)
                .field("fd", &p.fd.as_raw_fd())
                .field("unread", &p.unread.len())
                .field("state", &p.state.len());
        }
        d.finish()
    }
}
