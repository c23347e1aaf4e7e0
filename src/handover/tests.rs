//! The two ends together, and each end against a peer that does not follow the
//! protocol, in one process over a real socket pair and real TCP connections on
//! loopback. (Real generations, kills and fd limits: `tests/handover.rs`.)

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::channel::{pair_of, Channel, Framing, Inbox, Received};
use super::wire::{self, Answer, Kind, Message, Record};
use super::*;

const TAG: u32 = 0x7465_7374;
const SHORT: Duration = Duration::from_millis(100);
const LONG: Duration = Duration::from_secs(5);

/// A TCP connection on loopback: (the server's side, to hand over; the client's).
fn tcp() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (server, _) = l.accept().unwrap();
    client.set_read_timeout(Some(LONG)).unwrap();
    (server, client)
}

/// Whether `stream` still carries bytes both ways with `client`.
fn works(stream: &mut impl ReadWrite, client: &mut TcpStream) -> bool {
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    if stream.read_exact(&mut buf).is_err() || &buf != b"ping" {
        return false;
    }
    stream.write_all(b"pong").unwrap();
    client.read_exact(&mut buf).is_ok() && &buf == b"pong"
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn as_tcp(s: Stream) -> TcpStream {
    match s {
        Stream::Tcp(s) => s,
        other => panic!("not TCP: {other:?}"),
    }
}

fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD on a number touches no memory; EBADF if it is not open.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// The new generation's side: a receiver whose peer is this process, with a lifeline
/// (the write end: drop it to play the old generation's exit) and the exit flag.
struct Rx {
    rx: Receiver,
    lifeline: Option<OwnedFd>,
    exiting: Arc<AtomicBool>,
}

fn receiver_on(fd: OwnedFd, framing: Framing) -> Rx {
    let (life_rd, life_wr) = crate::sys::os::pipe().unwrap();
    let exiting = Arc::new(AtomicBool::new(false));
    let rx = Receiver::with_framing(
        fd,
        framing,
        std::process::id(),
        Arc::new(life_rd),
        Arc::clone(&exiting),
    );
    Rx {
        rx,
        lifeline: Some(life_wr),
        exiting,
    }
}

/// Both ends.
fn linked(framing: Framing) -> (Sender, Rx) {
    let (a, b) = pair_of(framing).unwrap();
    let tx = Sender::new(Channel::new(a, framing), 4242);
    (tx, receiver_on(b, framing))
}

/// A receiver and a raw peer that plays the old generation.
fn raw_sender(framing: Framing) -> (Channel, Rx) {
    let (a, b) = pair_of(framing).unwrap();
    (Channel::new(a, framing), receiver_on(b, framing))
}

/// A sender and a raw peer that plays the new generation.
fn raw_receiver(framing: Framing) -> (Sender, Channel) {
    let (a, b) = pair_of(framing).unwrap();
    (
        Sender::new(Channel::new(a, framing), 4242),
        Channel::new(b, framing),
    )
}

fn recv_one(rx: &mut Receiver) -> Incoming {
    for _ in 0..1000 {
        match rx.recv() {
            Ok(Some(i)) => return i,
            Ok(None) => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => panic!("recv: {e}"),
        }
    }
    panic!("nothing arrived");
}

/// The next message a raw peer receives, decoded, with its fds.
fn next_message(ch: &Channel, inbox: &mut Inbox) -> (Vec<u8>, Vec<OwnedFd>) {
    for _ in 0..1000 {
        match inbox.recv(ch).unwrap() {
            Some(Received::Message { len, fds, .. }) => return (inbox.bytes(len).to_vec(), fds),
            Some(Received::End { .. }) => panic!("the channel ended"),
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    panic!("no message");
}

/// An `A` message accepting `id`.
fn ack(seq: u32, id: u64) -> Vec<u8> {
    let yes = Answer {
        id,
        accepted: true,
        reason: "",
    };
    wire::answers(seq, &[yes])
}

fn conns_message(seq: u32, records: &[Record<'_>]) -> Vec<u8> {
    wire::encode(&Message::Conns {
        seq,
        records: records.to_vec(),
    })
}

fn record(id: u64, kind: Kind) -> Record<'static> {
    Record {
        id,
        tag: TAG,
        kind,
        unread: b"partial li",
        state: b"count=3",
    }
}

// ---- Both ends ------------------------------------------------------------------------

fn hand_over(framing: Framing) {
    let (tx, mut rx) = linked(framing);
    let (server, mut client) = tcp();
    let (unix_a, mut unix_b) = UnixStream::pair().unwrap();
    let id = tx.send(server, b"GET / HT", TAG, b"state-1").unwrap();
    let id2 = tx.send(unix_a, b"", 7, b"").unwrap();
    assert_eq!((id, id2), (1, 2));
    tx.flush().unwrap();
    let first = recv_one(&mut rx.rx);
    assert_eq!((first.id(), first.tag(), first.is_tcp()), (1, TAG, true));
    assert_eq!(
        (first.unread(), first.state()),
        (&b"GET / HT"[..], &b"state-1"[..])
    );
    let (stream, unread, state) = first.accept().unwrap();
    assert_eq!((unread, state), (b"GET / HT".to_vec(), b"state-1".to_vec()));
    assert!(works(&mut as_tcp(stream), &mut client));
    let second = recv_one(&mut rx.rx);
    assert!(!second.is_tcp());
    let (stream, _, _) = second.accept().unwrap();
    let Stream::Unix(mut unix) = stream else {
        panic!("not Unix")
    };
    unix.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    unix_b.read_exact(&mut b).unwrap();
    let done = tx.finish(LONG).unwrap();
    assert_eq!((done.accepted, done.returned.len(), done.given), (2, 0, 0));
    assert!(done.lost.is_empty() && done.errors.is_empty(), "{done:?}");
    assert!(done.to_string().contains("accepted 2"), "{done}");
    match rx.rx.recv() {
        Err(Error::HandoverEnded { pid, reason }) => {
            assert_eq!(pid, std::process::id());
            assert!(reason.contains("the 0 connection(s)"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn connections_travel_with_their_bytes_and_state() {
    hand_over(Framing::Packets);
}

#[test]
fn connections_travel_on_a_stream_too() {
    hand_over(Framing::Stream);
}

#[test]
fn a_refused_connection_comes_back_whole() {
    let (tx, mut rx) = linked(Framing::Packets);
    let (server, mut client) = tcp();
    tx.send(server, b"abc", TAG, b"s").unwrap();
    tx.flush().unwrap();
    recv_one(&mut rx.rx).refuse().unwrap();
    let mut done = tx.finish(LONG).unwrap();
    assert_eq!(done.accepted, 0);
    let back = done.returned.pop().unwrap();
    assert_eq!((back.id, back.tag), (1, TAG));
    assert_eq!(
        (&back.unread[..], &back.state[..]),
        (&b"abc"[..], &b"s"[..])
    );
    assert!(matches!(
        back.reason,
        Error::HandoverRefused { id: Some(1), .. }
    ));
    assert!(
        back.to_string().contains("refused by the new generation"),
        "{back}"
    );
    assert!(works(&mut as_tcp(back.stream), &mut client));
}

#[test]
fn blobs_over_their_limit_are_refused_and_the_connection_comes_back() {
    let (tx, _rx) = linked(Framing::Packets);
    let (server, mut client) = tcp();
    let err = tx
        .send(server, &vec![0; MAX_UNREAD + 1], TAG, b"")
        .unwrap_err();
    assert!(
        matches!(err, Error::HandoverRefused { id: Some(1), .. }),
        "{err}"
    );
    assert!(err.to_string().contains("65537 unread"), "{err}");
    let (server2, _c2) = tcp();
    assert!(tx.send(server2, b"", TAG, &vec![0; MAX_STATE + 1]).is_err());
    let mut back = tx.answers().unwrap();
    assert_eq!(back.len(), 2);
    assert!(works(&mut as_tcp(back.remove(0).stream), &mut client));
}

#[test]
fn batches_carry_at_most_scm_max_fd_connections() {
    let (tx, peer) = raw_receiver(Framing::Packets);
    // One fd per connection (the peers are closed): 600 and a batch received stay under
    // an unprivileged user's 1024.
    for _ in 0..600 {
        let (a, _) = UnixStream::pair().unwrap();
        tx.send(a, b"", TAG, b"").unwrap();
    }
    // Two full batches went as they filled; the rest waits for a flush.
    let mut inbox = Inbox::new();
    let mut counts = Vec::new();
    for _ in 0..2 {
        let (bytes, fds) = next_message(&peer, &mut inbox);
        let Ok(Message::Conns { records, .. }) = wire::decode(&bytes) else {
            panic!()
        };
        assert_eq!(records.len(), fds.len());
        counts.push(fds.len());
    }
    assert!(inbox.recv(&peer).unwrap().is_none(), "the last batch waits");
    tx.flush().unwrap();
    let (_, fds) = next_message(&peer, &mut inbox);
    counts.push(fds.len());
    assert_eq!(counts, [MAX_FDS, MAX_FDS, 600 - 2 * MAX_FDS]);
}

#[test]
fn a_message_of_the_largest_records_is_split_by_size() {
    let (tx, peer) = raw_receiver(Framing::Packets);
    let big = vec![1u8; MAX_UNREAD];
    let mut keep = Vec::new();
    for _ in 0..3 {
        let (a, b) = UnixStream::pair().unwrap();
        tx.send(a, &big, TAG, &big).unwrap();
        keep.push(b);
    }
    tx.flush().unwrap();
    let mut inbox = Inbox::new();
    for _ in 0..3 {
        let (bytes, fds) = next_message(&peer, &mut inbox);
        assert!(bytes.len() <= MAX_MESSAGE);
        assert_eq!(fds.len(), 1);
    }
}

// ---- Who owns a connection ------------------------------------------------------------

/// Linux: at the deadline the sender takes back what was not acknowledged; an
/// acknowledgement after that fails, and the receiver closes its copy.
#[cfg(any(target_os = "linux", target_os = "android"))]
#[test]
fn the_deadline_takes_back_what_was_not_acknowledged() {
    let (tx, mut rx) = linked(Framing::Packets);
    let (server, mut client) = tcp();
    let (server2, mut client2) = tcp();
    tx.send(server, b"u", TAG, b"s").unwrap();
    tx.send(server2, b"", TAG, b"").unwrap();
    tx.flush().unwrap();
    let held = recv_one(&mut rx.rx);
    let mut done = tx.finish(SHORT).unwrap();
    assert_eq!(done.returned.len(), 2, "{done}");
    assert!(done.returned[0].reason.to_string().contains("taken back"));
    match held.accept() {
        Err(Error::HandoverRefused {
            id: Some(1),
            reason,
            ..
        }) => {
            assert!(reason.contains("took it back"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // The one still queued is dropped when the end is read.
    assert!(matches!(rx.rx.recv(), Err(Error::HandoverEnded { .. })));
    assert!(works(
        &mut as_tcp(done.returned.remove(0).stream),
        &mut client
    ));
    // No copy is left on the receiving side: closing the sender's closes the
    // connection (the client reads the end), for both.
    drop(done);
    for c in [&mut client, &mut client2] {
        assert_eq!(c.read(&mut [0u8; 8]).unwrap(), 0, "a copy was left open");
    }
}

/// The kernel property the take-back rests on: after `shutdown(SHUT_RD)`, a peer's
/// send either was queued before it (and is read) or fails.
#[cfg(any(target_os = "linux", target_os = "android"))]
#[test]
fn an_acknowledgement_is_either_read_or_refused() {
    for round in 0..50 {
        let (a, b) = pair_of(Framing::Packets).unwrap();
        let (a, b) = (
            Channel::new(a, Framing::Packets),
            Channel::new(b, Framing::Packets),
        );
        let acks = std::thread::spawn(move || {
            let mut ok = 0u32;
            loop {
                match b.send_whole(&ok.to_le_bytes(), &[], Duration::from_secs(1)) {
                    Ok(()) => ok += 1,
                    Err(_) => return ok,
                }
            }
        });
        std::thread::sleep(Duration::from_micros(50 * round));
        a.shutdown();
        let mut inbox = Inbox::new();
        let mut read = 0u32;
        while let Some(Received::Message { .. }) = inbox.recv(&a).unwrap() {
            read += 1;
        }
        assert_eq!(read, acks.join().unwrap(), "round {round}");
    }
}

/// The old generation gone after sending (no `E`, its lifeline closed): what it sent is
/// the new generation's.
#[test]
fn a_sender_gone_after_sending_leaves_the_connections_to_the_receiver() {
    let (peer, mut rx) = raw_sender(Framing::Packets);
    let (server, mut client) = tcp();
    let msg = conns_message(1, &[record(1, Kind::Tcp)]);
    peer.send_from(&msg, 0, &[server.as_fd()]).unwrap();
    let incoming = recv_one(&mut rx.rx);
    drop((peer, server));
    drop(rx.lifeline.take());
    let (stream, unread, _) = incoming.accept().unwrap();
    assert_eq!(unread, b"partial li");
    assert!(works(&mut as_tcp(stream), &mut client));
    assert!(matches!(rx.rx.recv(), Err(Error::HandoverEnded { .. })));
}

/// Closed without an `E` while it still runs (its lifeline open): the receiver cannot
/// tell that it let go, so it does not take the connection.
#[test]
fn a_sender_that_closes_without_a_word_keeps_its_connections() {
    let (peer, mut rx) = raw_sender(Framing::Packets);
    let (server, mut client) = tcp();
    let msg = conns_message(1, &[record(1, Kind::Tcp)]);
    peer.send_from(&msg, 0, &[server.as_fd()]).unwrap();
    let incoming = recv_one(&mut rx.rx);
    drop(peer);
    assert!(matches!(
        incoming.accept(),
        Err(Error::HandoverRefused { .. })
    ));
    // The "old generation" still serves it.
    let mut server = server;
    assert!(works(&mut server, &mut client));
}

/// A `Sender` dropped without `finish` says `E` (given): what it sent is the receiver's.
#[test]
fn a_dropped_sender_gives_what_it_sent() {
    let (tx, mut rx) = linked(Framing::Packets);
    let (server, mut client) = tcp();
    tx.send(server, b"", TAG, b"").unwrap();
    tx.flush().unwrap();
    let incoming = recv_one(&mut rx.rx);
    drop(tx);
    let (stream, _, _) = incoming.accept().unwrap();
    assert!(works(&mut as_tcp(stream), &mut client));
}

/// The receiver gone (dropped: it says bye) before answering: everything comes back.
#[test]
fn a_receiver_dropped_before_answering_returns_everything() {
    let (tx, rx) = linked(Framing::Packets);
    let (server, mut client) = tcp();
    tx.send(server, b"", TAG, b"").unwrap();
    tx.flush().unwrap();
    drop(rx);
    let mut done = tx.finish(LONG).unwrap();
    assert_eq!(done.returned.len(), 1, "{done}");
    assert!(done.lost.is_empty());
    let why = done.returned[0].reason.to_string();
    assert!(why.contains("done receiving"), "{why}");
    assert!(works(
        &mut as_tcp(done.returned.remove(0).stream),
        &mut client
    ));
}

/// The receiver gone without a bye (it died) after accepting one of two: the other
/// comes back, and the accepted one is named as lost.
#[test]
fn a_receiver_that_dies_after_accepting_names_what_was_lost() {
    let (tx, peer) = raw_receiver(Framing::Packets);
    let (s1, _c1) = tcp();
    let (s2, mut c2) = tcp();
    tx.send(s1, b"", TAG, b"").unwrap();
    tx.send(s2, b"", TAG, b"").unwrap();
    tx.flush().unwrap();
    let mut inbox = Inbox::new();
    let (_, fds) = next_message(&peer, &mut inbox);
    peer.send_whole(&ack(1, 1), &[], LONG).unwrap();
    drop((fds, peer));
    let mut done = tx.finish(LONG).unwrap();
    assert_eq!(done.lost, [1]);
    assert_eq!(done.returned.len(), 1);
    assert_eq!(done.returned[0].id, 2);
    assert!(done.to_string().contains("1 lost"), "{done}");
    assert!(works(&mut as_tcp(done.returned.remove(0).stream), &mut c2));
}

/// It died with a message of ours unread: the kernel reports that (ECONNRESET) before
/// the answers it had sent, which still count.
#[test]
fn answers_sent_before_a_reset_still_count() {
    let (tx, peer) = raw_receiver(Framing::Packets);
    let (s1, _c1) = tcp();
    let (s2, mut c2) = tcp();
    tx.send(s1, b"", TAG, b"").unwrap();
    tx.flush().unwrap();
    let mut inbox = Inbox::new();
    let (_, fds) = next_message(&peer, &mut inbox);
    tx.send(s2, b"", TAG, b"").unwrap();
    tx.flush().unwrap(); // never read: the close below resets
    peer.send_whole(&ack(1, 1), &[], LONG).unwrap();
    drop((fds, peer));
    let mut done = tx.finish(LONG).unwrap();
    assert_eq!((done.accepted, done.lost.clone()), (1, vec![1]), "{done}");
    assert_eq!(done.returned.len(), 1);
    assert!(works(&mut as_tcp(done.returned.remove(0).stream), &mut c2));
}

/// A new generation whose own exit has fired refuses, and says bye: the old generation
/// keeps everything.
#[test]
fn an_exiting_receiver_refuses_and_ends() {
    let (tx, mut rx) = linked(Framing::Packets);
    let (server, mut client) = tcp();
    tx.send(server, b"", TAG, b"").unwrap();
    tx.flush().unwrap();
    std::thread::sleep(SHORT);
    rx.exiting.store(true, Ordering::SeqCst);
    match rx.rx.recv() {
        Err(Error::HandoverEnded { reason, .. }) => assert!(reason.contains("exiting"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let mut done = tx.finish(LONG).unwrap();
    assert_eq!((done.accepted, done.returned.len()), (0, 1), "{done}");
    assert!(works(
        &mut as_tcp(done.returned.remove(0).stream),
        &mut client
    ));
}

// ---- A hostile old generation ---------------------------------------------------------

/// What the raw old generation reads back: the answers and rejections, as text.
fn replies(peer: &Channel, inbox: &mut Inbox) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(Received::Message { len, .. }) = inbox.recv(peer).unwrap() {
        match wire::decode(inbox.bytes(len)).unwrap() {
            Message::Answers { answers, .. } => out.extend(
                answers
                    .iter()
                    .map(|a| format!("{} {} {}", a.id, a.accepted, a.reason)),
            ),
            Message::Reject { of, reason, .. } => out.push(format!("reject {of} {reason}")),
            other => out.push(format!("{other:?}")),
        }
    }
    out
}

/// Sends `msg` with `fds` from a raw old generation; returns the receiver's error and
/// what it answered. The fds are the "old generation's" own: each must still be open
/// after.
fn refused(msg: &[u8], fds: &[BorrowedFd<'_>]) -> (String, Vec<String>) {
    let (peer, mut rx) = raw_sender(Framing::Packets);
    peer.send_from(msg, 0, fds).unwrap();
    let err = match rx.rx.recv() {
        Err(e @ Error::HandoverRefused { .. }) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    };
    // Nothing else came out of it, and the channel carries on.
    assert!(matches!(rx.rx.recv(), Ok(None)));
    for fd in fds {
        assert!(is_open(fd.as_raw_fd()), "fd {} was closed", fd.as_raw_fd());
    }
    let mut inbox = Inbox::new();
    (err, replies(&peer, &mut inbox))
}

#[test]
fn garbage_is_refused_and_closes_nothing() {
    let (server, _c) = tcp();
    let (err, replies) = refused(b"GET / HTTP/1.1\r\n\r\n", &[server.as_fd()]);
    assert!(
        err.contains("malformed") && err.contains("bad magic"),
        "{err}"
    );
    assert!(
        replies.is_empty(),
        "no header, nothing to name: {replies:?}"
    );
}

#[test]
fn an_unknown_version_is_rejected_by_number() {
    let (server, _c) = tcp();
    let mut msg = conns_message(5, &[record(1, Kind::Tcp)]);
    msg[4] = 9;
    let (err, replies) = refused(&msg, &[server.as_fd()]);
    assert!(err.contains("version 9"), "{err}");
    assert_eq!(replies.len(), 1);
    assert!(replies[0].starts_with("reject 5 version 9"), "{replies:?}");
}

#[test]
fn an_oversized_blob_is_refused() {
    let (server, _c) = tcp();
    let mut msg = conns_message(2, &[record(1, Kind::Tcp)]);
    let at = wire::HEADER + 16;
    msg[at..at + 4].copy_from_slice(&(MAX_UNREAD as u32 + 1).to_le_bytes());
    let (err, replies) = refused(&msg, &[server.as_fd()]);
    assert!(err.contains("over the limit"), "{err}");
    assert!(replies[0].starts_with("reject 2"), "{replies:?}");
}

#[test]
fn an_oversized_message_is_refused() {
    let (peer, mut rx) = raw_sender(Framing::Packets);
    super::channel::make_room(peer.fd());
    let mut msg = conns_message(3, &[record(1, Kind::Tcp)]);
    msg.resize(MAX_MESSAGE + 100, 0);
    peer.send_from(&msg, 0, &[]).unwrap();
    let err = rx.rx.recv().unwrap_err().to_string();
    assert!(err.contains("over the limit"), "{err}");
    let mut inbox = Inbox::new();
    assert!(replies(&peer, &mut inbox)[0].starts_with("reject 3"));
}

#[test]
fn fds_of_the_wrong_kind_are_refused_one_by_one() {
    let (peer, mut rx) = raw_sender(Framing::Packets);
    let (pipe_rd, _pipe_wr) = crate::sys::os::pipe().unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (unix, _unix_b) = UnixStream::pair().unwrap();
    let (good, mut client) = tcp();
    let msg = conns_message(
        1,
        &[
            record(1, Kind::Tcp),
            record(2, Kind::Tcp),
            record(3, Kind::Tcp),
            record(4, Kind::Tcp),
            record(5, Kind::Tcp),
        ],
    );
    let fds = [
        pipe_rd.as_fd(),
        udp.as_fd(),
        listener.as_fd(),
        unix.as_fd(),
        good.as_fd(),
    ];
    peer.send_from(&msg, 0, &fds).unwrap();
    let mut errors = Vec::new();
    let mut accepted = Vec::new();
    loop {
        match rx.rx.recv() {
            Ok(Some(i)) => accepted.push(i.accept().unwrap()),
            Ok(None) => break,
            Err(e) => errors.push(e.to_string()),
        }
    }
    assert_eq!(errors.len(), 4, "{errors:#?}");
    for (e, what) in errors.iter().zip([
        "not a socket",
        "datagram",
        "not connected",
        "a Unix connection",
    ]) {
        assert!(e.contains(what), "{e} lacks {what:?}");
    }
    assert_eq!(accepted.len(), 1);
    assert!(works(&mut as_tcp(accepted.pop().unwrap().0), &mut client));
    let mut inbox = Inbox::new();
    let r = replies(&peer, &mut inbox);
    assert_eq!(r.len(), 5, "{r:?}");
    assert!(r[..4].iter().all(|a| a.contains(" false fd ")), "{r:?}");
    assert_eq!(r[4], "5 true ");
    for fd in fds {
        assert!(is_open(fd.as_raw_fd()));
    }
}

#[test]
fn a_count_of_fds_that_does_not_match_refuses_the_message() {
    let (a, _ca) = tcp();
    let (b, _cb) = tcp();
    let two = conns_message(4, &[record(1, Kind::Tcp), record(2, Kind::Tcp)]);
    let (err, replies) = refused(&two, &[a.as_fd()]);
    assert!(err.contains("1 fds came with 2 connections"), "{err}");
    assert!(replies[0].starts_with("reject 4"), "{replies:?}");
    let one = conns_message(4, &[record(1, Kind::Tcp)]);
    let (err, _) = refused(&one, &[a.as_fd(), b.as_fd()]);
    assert!(err.contains("2 fds came with 1"), "{err}");
    let (err, _) = refused(&one, &[]);
    assert!(err.contains("0 fds came with 1"), "{err}");
}

#[test]
fn ids_that_do_not_grow_are_ignored() {
    let (peer, mut rx) = raw_sender(Framing::Packets);
    let (a, _ca) = tcp();
    let msg = conns_message(1, &[record(5, Kind::Tcp)]);
    peer.send_from(&msg, 0, &[a.as_fd()]).unwrap();
    let first = recv_one(&mut rx.rx);
    let again = conns_message(2, &[record(5, Kind::Tcp)]);
    peer.send_from(&again, 0, &[a.as_fd()]).unwrap();
    let err = rx.rx.recv().unwrap_err().to_string();
    assert!(err.contains("does not follow"), "{err}");
    drop(first);
    assert!(is_open(a.as_raw_fd()));
}

#[test]
fn a_message_only_the_new_generation_sends_is_refused() {
    let (a, _ca) = tcp();
    let bye = wire::bye(1);
    let (err, _) = refused(&bye, &[a.as_fd()]);
    assert!(
        err.contains("Bye message, which only the new generation sends"),
        "{err}"
    );
}

/// A channel that is not what the table says is never used, nor closed.
#[test]
fn a_channel_that_fails_its_checks_is_left_alone() {
    let (life_rd, _life_wr) = crate::sys::os::pipe().unwrap();
    let flag = Arc::new(AtomicBool::new(false));
    // A stream pair where a seqpacket one belongs: the wrong type.
    let (s, _t) = pair_of(Framing::Stream).unwrap();
    let raw = s.as_raw_fd();
    let mut rx = Receiver::with_framing(
        s,
        Framing::Packets,
        std::process::id(),
        Arc::new(life_rd.try_clone().unwrap()),
        Arc::clone(&flag),
    );
    let err = rx.recv().unwrap_err().to_string();
    assert!(
        err.contains("a stream socket, not a seqpacket socket"),
        "{err}"
    );
    assert!(err.contains(&format!("fd {raw}")), "{err}");
    drop(rx);
    assert!(is_open(raw), "left open");
    // SAFETY: `raw` was leaked by the receiver above and nothing else owns it.
    drop(unsafe { <OwnedFd as std::os::unix::io::FromRawFd>::from_raw_fd(raw) });
    // The right type, connected to somebody else.
    let (p, _q) = pair_of(Framing::Packets).unwrap();
    let raw = p.as_raw_fd();
    let mut rx = Receiver::with_framing(p, Framing::Packets, 1, Arc::new(life_rd), flag);
    let err = rx.recv().unwrap_err().to_string();
    assert!(
        err.contains("not to the previous generation (pid 1)"),
        "{err}"
    );
    drop(rx);
    // SAFETY: as above.
    drop(unsafe { <OwnedFd as std::os::unix::io::FromRawFd>::from_raw_fd(raw) });
}

// ---- A hostile new generation ---------------------------------------------------------

/// Answers for connections that are not waiting for one, duplicates, garbage, a
/// rejection of nothing, fds it should not send: reported, and nothing closed.
#[test]
fn answers_that_do_not_fit_change_nothing() {
    let (tx, peer) = raw_receiver(Framing::Packets);
    let (s1, mut c1) = tcp();
    let (s2, mut c2) = tcp();
    let (s3, _c3) = tcp();
    tx.send(s1, b"", TAG, b"").unwrap();
    tx.send(s2, b"", TAG, b"").unwrap();
    tx.flush().unwrap();
    tx.send(s3, b"", TAG, b"").unwrap(); // batched, not sent
    let mut inbox = Inbox::new();
    let (_, fds) = next_message(&peer, &mut inbox);
    drop(fds);
    let no = |id| Answer {
        id,
        accepted: true,
        reason: "",
    };
    let (junk, _j) = UnixStream::pair().unwrap();
    for msg in [
        wire::answers(1, &[no(99)]),       // never sent
        wire::answers(2, &[no(3)]),        // batched, not sent
        wire::answers(3, &[no(1), no(1)]), // a duplicate
        wire::reject(4, 77, "no such message"),
        b"\x00\x01garbage".to_vec(),
        conns_message(5, &[record(1, Kind::Tcp)]),
    ] {
        peer.send_from(&msg, 0, &[junk.as_fd()]).unwrap();
    }
    std::thread::sleep(SHORT);
    let done = tx.finish(SHORT).unwrap();
    let errors: Vec<String> = done.errors.iter().map(|e| e.to_string()).collect();
    for want in [
        "connection 99, which is not waiting",
        "connection 3, which was not sent yet",
        "connection 1, which is not waiting",
        "rejection of message 77",
        "malformed",
        "Conns message, which only the old generation sends",
        "fd(s) came with a message",
    ] {
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "no {want:?} in {errors:#?}"
        );
    }
    // The one acknowledgement that fits counted; the others stay, and work.
    assert_eq!(done.accepted, 1);
    let mut returned = done.returned;
    assert_eq!(returned.iter().map(|r| r.id).collect::<Vec<_>>(), [2, 3]);
    assert!(works(&mut as_tcp(returned.remove(0).stream), &mut c2));
    // The accepted one's copy is closed here: the client reads the end.
    assert_eq!(c1.read(&mut [0u8; 1]).unwrap(), 0);
}
