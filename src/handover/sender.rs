//! The old generation's end: sending connections in batches, and settling the answers.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::io;
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::channel::{self, Channel, Framing, Inbox, Received};
use super::wire::{self, EndRule, Message, Record};
use super::{Stream, MAX_FDS, MAX_MESSAGE, MAX_STATE, MAX_UNREAD};
use crate::error::{Error, Result};
use crate::sys::os;

/// After `ETOOMANYREFS`, how long before sending again.
const RETRY_REFS: Duration = Duration::from_millis(10);

/// The old generation's end of the handover channel, from
/// [`Upgrader::handover`](crate::Upgrader::handover) once an upgrade has succeeded.
///
/// [`send`](Sender::send) the connections to hand over, then [`finish`](Sender::finish)
/// with a deadline: it waits for the answers and gives back every connection that stays
/// with this generation (refused, not acknowledged in time, not sent), to serve or to
/// close. Every method takes `&self`: share it (`Arc`) between the threads that own
/// connections. No call waits longer than the deadline given to `finish`; `send` and
/// [`flush`](Sender::flush) never wait.
///
/// For an event loop: poll it ([`AsFd`]: readable when answers arrive) and call
/// [`answers`](Sender::answers). Dropping it without `finish` gives the new generation
/// what was sent and closes what was not: see the [module docs](super).
pub struct Sender {
    channel: Channel,
    /// The new generation's pid.
    pid: u32,
    out: Mutex<Out>,
    /// The upgrade's records, where `finish` notes how many connections went.
    records: Option<std::sync::Arc<crate::sys::records::Records>>,
}

struct Out {
    next_id: u64,
    /// Messages sent so far.
    seq: u32,
    /// Messages built and not (wholly) sent, oldest first.
    queue: VecDeque<Batch>,
    /// Every connection not settled: queued or sent, not answered.
    waiting: BTreeMap<u64, Held>,
    /// Settled and staying here, not yet given to the caller.
    returned: Vec<Returned>,
    /// Accepted by the new generation.
    accepted: Vec<u64>,
    /// Accepted by a new generation that went away without saying bye.
    lost: Vec<u64>,
    /// What the new generation sent that was not the protocol.
    errors: Vec<Error>,
    inbox: Inbox,
    /// Why the channel is over, once it is.
    over: Option<String>,
    /// `finish` was called.
    finished: bool,
    /// After `ETOOMANYREFS`: not before this.
    retry_at: Option<Instant>,
    /// Whether the last send met `ETOOMANYREFS`: said of what is not sent at the end.
    too_many_refs: bool,
    /// Reading what was queued before our own shutdown: its end is ours.
    draining: bool,
}

/// A connection not settled.
struct Held {
    stream: Stream,
    unread: Vec<u8>,
    tag: u32,
    state: Vec<u8>,
    /// The message that carries it.
    seq: u32,
    sent: bool,
}

impl Held {
    fn back(self, id: u64, reason: Error) -> Returned {
        Returned {
            id,
            stream: self.stream,
            unread: self.unread,
            tag: self.tag,
            state: self.state,
            reason,
        }
    }
}

/// One message being filled or sent.
struct Batch {
    seq: u32,
    ids: Vec<u64>,
    bytes: Vec<u8>,
    /// How much of its frame is sent (a stream may take part of it).
    at: usize,
    /// No more records: `flush` or `finish` asked for it to go.
    sealed: bool,
}

impl Batch {
    /// Whether it takes no more records.
    fn closed(&self) -> bool {
        self.sealed
            || self.at > 0
            || self.ids.len() == MAX_FDS
            || self.bytes.len() + wire::RECORD_HEADER > MAX_MESSAGE
    }
}

/// A connection that stays with the old generation (refused, not acknowledged in time,
/// not sent): [`Sender::finish`] and [`Sender::answers`] give it back with what was
/// sent with it, to serve (its `unread` bytes first) or to close.
#[derive(Debug)]
#[non_exhaustive]
pub struct Returned {
    /// The id [`Sender::send`] returned.
    pub id: u64,
    /// The connection.
    pub stream: Stream,
    /// The bytes read from it and not used, as given to `send`.
    pub unread: Vec<u8>,
    /// The application's tag, as given to `send`.
    pub tag: u32,
    /// The application's state, as given to `send`.
    pub state: Vec<u8>,
    /// Why it stays: refused ([`Error::HandoverRefused`], with the new generation's
    /// reason), not settled when the channel ended ([`Error::HandoverEnded`]), or not
    /// sendable (an OS error, a limit).
    pub reason: Error,
}

/// What [`Sender::finish`] settled. Log it ([`Display`](fmt::Display)).
#[derive(Debug)]
#[non_exhaustive]
pub struct Finished {
    /// The new generation's pid.
    pub pid: u32,
    /// The connections that stay with this generation: serve them or close them.
    pub returned: Vec<Returned>,
    /// How many the new generation accepted.
    pub accepted: usize,
    /// How many were sent, not answered by the deadline, and left to the new
    /// generation: where the deadline cannot take them back (not Linux).
    pub given: usize,
    /// The ids of connections accepted by a new generation that then went away without
    /// closing the channel (it died, or exited without dropping its receiver): they
    /// went with it.
    pub lost: Vec<u64>,
    /// What the new generation sent that was not the protocol (answers for connections
    /// not waiting for one, malformed messages). Nothing was closed because of them.
    pub errors: Vec<Error>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sender {
    pub(crate) fn new(channel: Channel, pid: u32) -> Sender {
        channel::make_room(channel.fd());
        Sender {
            channel,
            pid,
            records: None,
            out: Mutex::new(Out {
                next_id: 1,
                seq: 0,
                queue: VecDeque::new(),
                waiting: BTreeMap::new(),
                returned: Vec::new(),
                accepted: Vec::new(),
                lost: Vec::new(),
                errors: Vec::new(),
                inbox: Inbox::new(),
                over: None,
                finished: false,
                retry_at: None,
                too_many_refs: false,
                draining: false,
            }),
        }
    }

    /// Notes in `records` how many connections went, when `finish` settles them.
    pub(crate) fn recording(
        mut self,
        records: std::sync::Arc<crate::sys::records::Records>,
    ) -> Sender {
        self.records = Some(records);
        self
    }

    /// The new generation's pid: the one that receives.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Hands `conn` to the new generation, with the bytes read from it and not used
    /// (`unread`, at most [`MAX_UNREAD`]) and the application's state (`state`, at most
    /// [`MAX_STATE`], in the format `tag` names). Stop reading from it first: from now on
    /// it is neither yours to use nor the new generation's, until it is settled. Returns
    /// its id.
    ///
    /// It joins a batch (up to [`MAX_FDS`] connections and [`MAX_MESSAGE`] bytes), sent
    /// when full, or by [`flush`](Sender::flush) or [`finish`](Sender::finish); never
    /// waits.
    ///
    /// On an error (a blob over its limit, or the channel over) the connection was not
    /// sent: it comes back from `finish` (and `answers`), like every connection that
    /// stays, with the same reason.
    pub fn send(
        &self,
        conn: impl Into<Stream>,
        unread: &[u8],
        tag: u32,
        state: &[u8],
    ) -> Result<u64> {
        let stream = conn.into();
        let mut out = lock(&self.out);
        let id = out.next_id;
        out.next_id += 1;
        let held = Held {
            stream,
            unread: unread.to_vec(),
            tag,
            state: state.to_vec(),
            seq: 0,
            sent: false,
        };
        if let Some(reason) = self.refusal(&out, id, unread.len(), state.len()) {
            let again = same(&reason);
            out.returned.push(held.back(id, reason));
            return Err(again);
        }
        out.enqueue(id, held);
        if out.queue.len() > 1 || out.queue.front().is_some_and(Batch::closed) {
            out.pump(&self.channel, self.pid, false);
        }
        Ok(id)
    }

    /// Sends what is batched, as far as the socket takes it now, and reads the answers
    /// that have arrived; never waits. What the socket does not take now goes with the
    /// next call (or `finish`).
    pub fn flush(&self) -> Result<()> {
        let mut out = lock(&self.out);
        if let Some(b) = out.queue.back_mut() {
            b.sealed = true;
        }
        out.pump(&self.channel, self.pid, true);
        match &out.over {
            Some(why) if !out.finished => Err(Error::HandoverEnded {
                pid: self.pid,
                reason: why.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Reads the answers that have arrived, without waiting, and gives back the
    /// connections that stay with this generation so far (refused, or not sendable).
    /// For an event loop: call it when the sender is readable. Once the channel is over
    /// and everything has been given back, it returns [`Error::HandoverEnded`]: stop
    /// polling, and call [`finish`](Sender::finish) for the rest of the report.
    pub fn answers(&self) -> Result<Vec<Returned>> {
        let mut out = lock(&self.out);
        out.pump(&self.channel, self.pid, false);
        if out.returned.is_empty() {
            if let Some(why) = &out.over {
                return Err(Error::HandoverEnded {
                    pid: self.pid,
                    reason: why.clone(),
                });
            }
        }
        Ok(std::mem::take(&mut out.returned))
    }

    /// How many connections are sent or batched and not settled yet.
    pub fn outstanding(&self) -> usize {
        lock(&self.out).waiting.len()
    }

    /// Sends what is batched, waits up to `timeout` for every answer, and settles the
    /// rest; then the channel is over. Returns what became of every connection not
    /// already given back by [`answers`](Sender::answers): the ones that stay with this
    /// generation are in [`Finished::returned`].
    ///
    /// At the deadline, on Linux, the connections sent and not acknowledged are taken
    /// back (atomically: an acknowledgement either arrives first or fails) and
    /// returned; elsewhere they are left to the new generation
    /// ([`Finished::given`]). Connections not sent by then are returned. Fails only if
    /// called twice.
    pub fn finish(&self, timeout: Duration) -> Result<Finished> {
        let deadline = os::deadline(Some(timeout));
        {
            let mut out = lock(&self.out);
            if out.finished {
                return Err(self.ended("finish() was called already"));
            }
            out.finished = true;
            if let Some(b) = out.queue.back_mut() {
                b.sealed = true;
            }
        }
        loop {
            let mut out = lock(&self.out);
            out.pump(&self.channel, self.pid, true);
            if out.waiting.is_empty()
                || out.over.is_some()
                || os::left(deadline) == Some(Duration::ZERO)
            {
                break;
            }
            let send = !out.queue.is_empty() && out.retry_at.is_none();
            let until = match (out.retry_at, deadline) {
                (Some(t), Some(d)) => Some(t.min(d)),
                (t, d) => t.or(d),
            };
            drop(out);
            // An error here (no memory for poll) is a short wait: the loop goes on.
            if self.channel.wait(send, until).is_err() {
                std::thread::sleep(RETRY_REFS);
            }
        }
        let mut out = lock(&self.out);
        let given = out.close(&self.channel, self.pid, timeout);
        if let Some(records) = &self.records {
            records.handed_over((out.accepted.len() + given) as u64);
        }
        Ok(Finished {
            pid: self.pid,
            returned: std::mem::take(&mut out.returned),
            accepted: out.accepted.len(),
            given,
            lost: std::mem::take(&mut out.lost),
            errors: std::mem::take(&mut out.errors),
        })
    }

    /// Why connection `id` cannot be sent, if it cannot.
    fn refusal(&self, out: &Out, id: u64, unread: usize, state: usize) -> Option<Error> {
        if let Some(why) = &out.over {
            Some(self.ended(why))
        } else if out.finished {
            Some(self.ended("finish() was called: nothing more is sent"))
        } else if unread > MAX_UNREAD || state > MAX_STATE {
            Some(self.refused(
                Some(id),
                format!(
                    "{unread} unread byte(s) and {state} byte(s) of state: the limits are \
                     {MAX_UNREAD} and {MAX_STATE}"
                ),
            ))
        } else {
            None
        }
    }

    fn ended(&self, reason: &str) -> Error {
        Error::HandoverEnded {
            pid: self.pid,
            reason: reason.into(),
        }
    }

    fn refused(&self, id: Option<u64>, reason: String) -> Error {
        Error::HandoverRefused {
            pid: self.pid,
            id,
            reason,
        }
    }
}

/// A second copy of a handover error (the caller gets one, the returned connection the
/// other).
fn same(e: &Error) -> Error {
    match e {
        Error::HandoverRefused { pid, id, reason } => Error::HandoverRefused {
            pid: *pid,
            id: *id,
            reason: reason.clone(),
        },
        Error::HandoverEnded { pid, reason } => Error::HandoverEnded {
            pid: *pid,
            reason: reason.clone(),
        },
        other => Error::HandoverRefused {
            pid: 0,
            id: None,
            reason: other.to_string(),
        },
    }
}

impl Out {
    /// Adds a connection to the last batch, or to a new one.
    fn enqueue(&mut self, id: u64, mut held: Held) {
        let rec = Record {
            id,
            tag: held.tag,
            kind: held.stream.kind(),
            unread: &held.unread,
            state: &held.state,
        };
        let fits = |b: &Batch| !b.closed() && b.bytes.len() + rec.len() <= MAX_MESSAGE;
        if !self.queue.back().is_some_and(fits) {
            self.seq = self.seq.wrapping_add(1);
            let mut bytes = Vec::with_capacity(wire::HEADER + rec.len());
            wire::begin(&mut bytes, wire::Type::Conns, 0, self.seq);
            self.queue.push_back(Batch {
                seq: self.seq,
                ids: Vec::new(),
                bytes,
                at: 0,
                sealed: false,
            });
        }
        let b = self.queue.back_mut().expect("a batch was just made");
        wire::push_record(&mut b.bytes, &rec);
        b.ids.push(id);
        wire::set_count(&mut b.bytes, b.ids.len() as u16);
        held.seq = b.seq;
        self.waiting.insert(id, held);
    }

    /// Reads the answers, then sends what may go: every closed batch, and with `all`
    /// the last one too.
    fn pump(&mut self, ch: &Channel, pid: u32, all: bool) {
        self.read(ch, pid);
        self.send(ch, pid, all);
    }

    fn send(&mut self, ch: &Channel, pid: u32, all: bool) {
        while self.over.is_none() {
            let Some(b) = self.queue.front() else { return };
            if !all && self.queue.len() == 1 && !b.closed() {
                return;
            }
            if self.retry_at.is_some_and(|t| Instant::now() < t) {
                return;
            }
            self.retry_at = None;
            let fds: Vec<BorrowedFd<'_>> = b
                .ids
                .iter()
                .filter_map(|id| self.waiting.get(id).map(|h| h.stream.as_fd()))
                .collect();
            let total = ch.frame_len(b.bytes.len());
            let result = ch.send_from(&b.bytes, b.at, &fds);
            drop(fds);
            match result {
                Ok(n) if n == total => {
                    self.too_many_refs = false;
                    let b = self.queue.pop_front().expect("the front batch");
                    for id in &b.ids {
                        if let Some(h) = self.waiting.get_mut(id) {
                            h.sent = true;
                        }
                    }
                }
                Ok(n) => {
                    // Part of a stream message: the rest when there is room.
                    if let Some(b) = self.queue.front_mut() {
                        b.at = n;
                    }
                    return;
                }
                Err(e) => {
                    if !self.unsent(ch, pid, &e) {
                        return;
                    }
                }
            }
        }
    }

    /// The front batch was not sent, for `e`: waits (returns `false`) or gives up on
    /// it (returns `true`: go on with the next).
    fn unsent(&mut self, ch: &Channel, pid: u32, e: &io::Error) -> bool {
        match e.raw_os_error() {
            _ if e.kind() == io::ErrorKind::WouldBlock => false,
            Some(libc::ETOOMANYREFS) if self.waiting.values().any(|h| h.sent) => {
                // Fds in flight count against our fd limit: once the new generation
                // takes what is in flight, there is room again.
                self.retry_at = Some(Instant::now() + RETRY_REFS);
                self.too_many_refs = true;
                false
            }
            Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN) => {
                // It closed its end: what it said last (a bye?) is still to read.
                self.read(ch, pid);
                self.end(pid, "the new generation closed the channel", true);
                false
            }
            _ => {
                self.fail_front(ch, e);
                true
            }
        }
    }

    /// The front batch cannot be sent: its connections stay, with the error.
    fn fail_front(&mut self, ch: &Channel, e: &io::Error) {
        let Some(b) = self.queue.pop_front() else {
            return;
        };
        let op = match e.raw_os_error() {
            Some(libc::ETOOMANYREFS) => {
                "sendmsg on the handover channel: too many fds in flight for this process's \
                 fd limit (RLIMIT_NOFILE)"
            }
            Some(libc::EMSGSIZE) => {
                "sendmsg on the handover channel: the message is larger than the socket \
                 takes (SO_SNDBUF)"
            }
            _ => "sendmsg on the handover channel",
        };
        for id in b.ids {
            if let Some(h) = self.waiting.remove(&id) {
                let source = match e.raw_os_error() {
                    Some(code) => io::Error::from_raw_os_error(code),
                    None => io::Error::new(e.kind(), e.to_string()),
                };
                let reason = Error::io(op, Some(ch.fd().as_raw_fd()), source);
                self.returned.push(h.back(id, reason));
            }
        }
    }

    /// Reads and settles every answer that has arrived.
    fn read(&mut self, ch: &Channel, pid: u32) {
        while self.over.is_none() {
            match self.inbox.recv(ch) {
                Ok(None) => return,
                Ok(Some(Received::Message { len, fds, cut, .. })) => {
                    if !fds.is_empty() {
                        self.protocol(
                            pid,
                            format!("{} fd(s) came with a message; closed", fds.len()),
                        );
                    }
                    drop(fds);
                    if cut {
                        self.protocol(pid, format!("a message over {MAX_MESSAGE} bytes; ignored"));
                    } else {
                        self.settle(len, pid);
                    }
                }
                Ok(Some(Received::End { .. })) if self.draining => return,
                Ok(Some(Received::End { .. })) => {
                    self.end(pid, "the new generation went away without answering", false);
                    return;
                }
                Err(e) => {
                    self.protocol(pid, format!("reading the channel failed: {e}"));
                    self.end(pid, "the channel cannot be read", true);
                    return;
                }
            }
        }
    }

    /// One message from the new generation, `len` bytes in the inbox.
    fn settle(&mut self, len: usize, pid: u32) {
        let bytes = self.inbox.bytes(len).to_vec();
        let msg = match wire::decode(&bytes) {
            Ok(msg) => msg,
            Err(m) => return self.protocol(pid, format!("a malformed message ({m}); ignored")),
        };
        match msg {
            Message::Answers { answers, .. } => {
                for a in answers {
                    self.answer(pid, a.id, a.accepted, a.reason);
                }
            }
            Message::Reject { of, reason, .. } => {
                let ids: Vec<u64> = self
                    .waiting
                    .iter()
                    .filter(|(_, h)| h.sent && h.seq == of)
                    .map(|(id, _)| *id)
                    .collect();
                if ids.is_empty() {
                    return self.protocol(
                        pid,
                        format!(
                            "a rejection of message {of}, which carries nothing unsettled; ignored"
                        ),
                    );
                }
                for id in ids {
                    let why = format!("its message ({of}) was rejected: {reason}");
                    self.answer(pid, id, false, &why);
                }
            }
            Message::Bye { .. } => self.end(
                pid,
                "the new generation is done receiving (it dropped its receiver, or is exiting)",
                true,
            ),
            other => self.protocol(
                pid,
                format!(
                    "a {:?} message, which only the old generation sends; ignored",
                    other.ty()
                ),
            ),
        }
    }

    fn answer(&mut self, pid: u32, id: u64, accepted: bool, reason: &str) {
        match self.waiting.get(&id) {
            Some(h) if h.sent => {}
            Some(_) => {
                return self.protocol(
                    pid,
                    format!("an answer for connection {id}, which was not sent yet; ignored"),
                )
            }
            None => {
                return self.protocol(
                    pid,
                    format!(
                        "an answer for connection {id}, which is not waiting for one (unknown, \
                         or settled already); ignored"
                    ),
                )
            }
        }
        let Some(h) = self.waiting.remove(&id) else {
            return;
        };
        if accepted {
            // Ours no more: close our copy.
            self.accepted.push(id);
            drop(h);
        } else {
            let reason = Error::HandoverRefused {
                pid,
                id: Some(id),
                reason: format!("refused by the new generation: {reason}"),
            };
            self.returned.push(h.back(id, reason));
        }
    }

    fn protocol(&mut self, pid: u32, reason: String) {
        // Bounded: a peer that sends garbage forever cannot grow it forever.
        if self.errors.len() < 100 {
            self.errors.push(Error::HandoverRefused {
                pid,
                id: None,
                reason,
            });
        }
    }

    /// The channel is over: everything unsettled stays here. `said_bye`: the new
    /// generation said it was done; otherwise it went away, and what it accepted went
    /// with it.
    fn end(&mut self, pid: u32, why: &str, said_bye: bool) {
        if self.over.is_some() {
            return;
        }
        self.over = Some(why.to_string());
        self.queue.clear();
        for (id, h) in std::mem::take(&mut self.waiting) {
            let reason = Error::HandoverEnded {
                pid,
                reason: why.to_string(),
            };
            self.returned.push(h.back(id, reason));
        }
        if !said_bye {
            self.lost = self.accepted.clone();
        }
    }

    /// The end of `finish`: tells the new generation, and settles what is unsettled.
    /// Returns how many sent connections were given to it.
    fn close(&mut self, ch: &Channel, pid: u32, timeout: Duration) -> usize {
        if self.over.is_some() {
            return 0;
        }
        let unsettled = self.waiting.values().filter(|h| h.sent).count() as u32;
        self.seq = self.seq.wrapping_add(1);
        let take_back = cfg!(any(target_os = "linux", target_os = "android"))
            && ch.framing() == Framing::Packets;
        let mut given = 0;
        if take_back {
            let end = wire::end(self.seq, EndRule::Kept, unsettled);
            let _ = ch.send_whole(&end, &[], Duration::ZERO);
            // From here on the kernel refuses every acknowledgement (EPIPE); the ones
            // queued before are still read.
            ch.shutdown();
            self.draining = true;
            self.read(ch, pid);
        } else {
            // A message half-sent on a stream can never be read: what it carries stays.
            let partial: Vec<u64> = match self.queue.front() {
                Some(b) if b.at > 0 => b.ids.clone(),
                _ => Vec::new(),
            };
            if partial.is_empty() {
                let end = wire::end(self.seq, EndRule::Given, unsettled);
                let _ = ch.send_whole(&end, &[], Duration::ZERO);
            }
            let sent: Vec<u64> = self
                .waiting
                .iter()
                .filter(|(id, h)| h.sent && !partial.contains(id))
                .map(|(id, _)| *id)
                .collect();
            for id in sent {
                // The new generation's now: our copy goes.
                self.waiting.remove(&id);
                given += 1;
            }
            ch.shutdown();
        }
        self.over = Some("finish() was called".into());
        for (id, h) in std::mem::take(&mut self.waiting) {
            let reason = if h.sent {
                format!("not acknowledged within {timeout:?}: taken back")
            } else if self.too_many_refs {
                format!(
                    "not sent within {timeout:?}: too many fds in flight for this process's fd                      limit (RLIMIT_NOFILE; ETOOMANYREFS) until then"
                )
            } else {
                format!("not sent within {timeout:?}")
            };
            let reason = Error::HandoverEnded { pid, reason };
            self.returned.push(h.back(id, reason));
        }
        self.queue.clear();
        given
    }
}

impl AsFd for Sender {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.channel.fd()
    }
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let out = lock(&self.out);
        f.debug_struct("Sender")
            .field("fd", &self.channel.fd().as_raw_fd())
            .field("pid", &self.pid)
            .field("unsettled", &out.waiting.len())
            .field("accepted", &out.accepted.len())
            .field("over", &out.over)
            .finish()
    }
}

impl Drop for Sender {
    /// Without `finish`: what was sent is the new generation's (an `E` says so), what
    /// was not is closed.
    fn drop(&mut self) {
        let out = self.out.get_mut().unwrap_or_else(|e| e.into_inner());
        if out.over.is_some() {
            return;
        }
        let partial = out.queue.front().is_some_and(|b| b.at > 0);
        if !partial {
            let sent = out.waiting.values().filter(|h| h.sent).count() as u32;
            out.seq = out.seq.wrapping_add(1);
            let end = wire::end(out.seq, EndRule::Given, sent);
            let _ = self.channel.send_whole(&end, &[], Duration::ZERO);
        }
    }
}

impl fmt::Display for Finished {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {} accepted {} connection(s); {} stay here",
            self.pid,
            self.accepted,
            self.returned.len()
        )?;
        if self.given > 0 {
            write!(f, "; {} left to it unanswered", self.given)?;
        }
        if !self.lost.is_empty() {
            let ids: Vec<String> = self.lost.iter().take(20).map(u64::to_string).collect();
            let more = if self.lost.len() > 20 { ", ..." } else { "" };
            write!(
                f,
                "; {} lost with it (it went away after accepting them): id {}{more}",
                self.lost.len(),
                ids.join(", ")
            )?;
        }
        if let Some(e) = self.errors.first() {
            write!(f, "; {} protocol error(s), first: {e}", self.errors.len())?;
        }
        Ok(())
    }
}

impl fmt::Display for Returned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "connection {} ({}): {}",
            self.id, self.stream, self.reason
        )
    }
}
