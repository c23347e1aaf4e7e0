//! The handover channel's messages, end to end: encoding and strict decoding. The
//! format is documented once, in the [module docs](super).
//!
//! Nothing here touches an fd: a message says how many fds travel with it, the
//! channel carries them, and the caller checks that the two agree.

use std::fmt;

use super::{MAX_FDS, MAX_MESSAGE, MAX_STATE, MAX_UNREAD};

/// The first four bytes of every message.
pub(crate) const MAGIC: [u8; 4] = *b"TFHO";
/// The version of the format this release writes and reads.
pub(crate) const VERSION: u8 = 1;
/// Every message starts with this many bytes: magic, version, type, count, sequence.
pub(crate) const HEADER: usize = 12;
/// A connection record before its two blobs.
pub(crate) const RECORD_HEADER: usize = 24;
/// An answer before its reason.
pub(crate) const ANSWER_HEADER: usize = 12;
/// The longest reason in an answer or a rejection, in bytes.
pub(crate) const MAX_REASON: usize = 200;
/// The most answers in one message: one per connection of the largest message.
pub(crate) const MAX_ANSWERS: usize = MAX_FDS;

/// What a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Type {
    /// Old to new: connections, one fd each.
    Conns,
    /// Old to new: nothing more will be sent.
    End,
    /// New to old: accepted or refused, per connection.
    Answers,
    /// New to old: a whole message could not be read; its connections are refused.
    Reject,
    /// New to old: the receiver is done; what it has not answered is refused.
    Bye,
}

impl Type {
    fn byte(self) -> u8 {
        match self {
            Type::Conns => b'C',
            Type::End => b'E',
            Type::Answers => b'A',
            Type::Reject => b'R',
            Type::Bye => b'B',
        }
    }

    fn from_byte(b: u8) -> Option<Type> {
        [
            Type::Conns,
            Type::End,
            Type::Answers,
            Type::Reject,
            Type::Bye,
        ]
        .into_iter()
        .find(|t| t.byte() == b)
    }
}

/// What kind of connection a record carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A TCP connection (IPv4 or IPv6).
    Tcp,
    /// A Unix stream connection.
    Unix,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Tcp => 1,
            Kind::Unix => 2,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Tcp => "TCP connection",
            Kind::Unix => "Unix stream connection",
        }
    }
}

/// One connection in a [`Type::Conns`] message; its fd travels at the same index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Record<'a> {
    pub(crate) id: u64,
    pub(crate) tag: u32,
    pub(crate) kind: Kind,
    pub(crate) unread: &'a [u8],
    pub(crate) state: &'a [u8],
}

impl Record<'_> {
    /// Its encoded size.
    pub(crate) fn len(&self) -> usize {
        RECORD_HEADER + self.unread.len() + self.state.len()
    }
}

/// The receiver's answer about one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Answer<'a> {
    pub(crate) id: u64,
    pub(crate) accepted: bool,
    /// Why it was refused (empty when accepted).
    pub(crate) reason: &'a str,
}

/// What an `E` message says of the connections sent and not acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EndRule {
    /// The sender keeps them: an acknowledgement sent from now on fails.
    Kept,
    /// They are the receiver's: the sender has let go of its copies.
    Given,
}

/// A decoded message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Message<'a> {
    Conns {
        seq: u32,
        records: Vec<Record<'a>>,
    },
    End {
        seq: u32,
        /// What becomes of the connections sent and not acknowledged.
        rule: EndRule,
        /// How many connections that covers.
        count: u32,
    },
    Answers {
        seq: u32,
        answers: Vec<Answer<'a>>,
    },
    Reject {
        seq: u32,
        /// The sequence number of the message rejected.
        of: u32,
        reason: &'a str,
    },
    Bye {
        seq: u32,
    },
}

impl Message<'_> {
    pub(crate) fn ty(&self) -> Type {
        match self {
            Message::Conns { .. } => Type::Conns,
            Message::End { .. } => Type::End,
            Message::Answers { .. } => Type::Answers,
            Message::Reject { .. } => Type::Reject,
            Message::Bye { .. } => Type::Bye,
        }
    }

    /// How many fds travel with it.
    pub(crate) fn fds(&self) -> usize {
        match self {
            Message::Conns { records, .. } => records.len(),
            _ => 0,
        }
    }
}

/// Why a message was not accepted: what was wrong, and its sequence number when the
/// header could be read (so that a rejection can name it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Malformed {
    pub(crate) seq: Option<u32>,
    /// The message's type, when the header could be read.
    pub(crate) ty: Option<Type>,
    pub(crate) reason: String,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.seq {
            Some(seq) => write!(f, "message {seq}: {}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

// ---- Encoding ------------------------------------------------------------------------

/// Starts a message of type `ty` in `out` (cleared first).
pub(crate) fn begin(out: &mut Vec<u8>, ty: Type, count: u16, seq: u32) {
    out.clear();
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(ty.byte());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
}

/// Sets the count of a message begun with [`begin`].
pub(crate) fn set_count(out: &mut [u8], count: u16) {
    out[6..8].copy_from_slice(&count.to_le_bytes());
}

/// Appends a connection record.
pub(crate) fn push_record(out: &mut Vec<u8>, r: &Record<'_>) {
    out.extend_from_slice(&r.id.to_le_bytes());
    out.extend_from_slice(&r.tag.to_le_bytes());
    out.push(r.kind.byte());
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&(r.unread.len() as u32).to_le_bytes());
    out.extend_from_slice(&(r.state.len() as u32).to_le_bytes());
    out.extend_from_slice(r.unread);
    out.extend_from_slice(r.state);
}

/// Appends an answer (its reason cut to [`MAX_REASON`] bytes).
pub(crate) fn push_answer(out: &mut Vec<u8>, a: &Answer<'_>) {
    let reason = crate::error::clip(a.reason, MAX_REASON);
    out.extend_from_slice(&a.id.to_le_bytes());
    out.push(if a.accepted { 1 } else { 2 });
    out.push(0);
    out.extend_from_slice(&(reason.len() as u16).to_le_bytes());
    out.extend_from_slice(reason.as_bytes());
}

/// A whole [`Type::Answers`] message (at most [`MAX_ANSWERS`] answers).
pub(crate) fn answers(seq: u32, answers: &[Answer<'_>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + answers.len() * (ANSWER_HEADER + 16));
    begin(&mut out, Type::Answers, answers.len() as u16, seq);
    for a in answers {
        push_answer(&mut out, a);
    }
    out
}

/// A whole [`Type::End`] message.
pub(crate) fn end(seq: u32, rule: EndRule, count: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + 8);
    begin(&mut out, Type::End, 0, seq);
    out.push(match rule {
        EndRule::Kept => 1,
        EndRule::Given => 2,
    });
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&count.to_le_bytes());
    out
}

/// A whole [`Type::Reject`] message.
pub(crate) fn reject(seq: u32, of: u32, reason: &str) -> Vec<u8> {
    let reason = crate::error::clip(reason, MAX_REASON);
    let mut out = Vec::with_capacity(HEADER + 6 + reason.len());
    begin(&mut out, Type::Reject, 0, seq);
    out.extend_from_slice(&of.to_le_bytes());
    out.extend_from_slice(&(reason.len() as u16).to_le_bytes());
    out.extend_from_slice(reason.as_bytes());
    out
}

/// A whole [`Type::Bye`] message.
pub(crate) fn bye(seq: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER);
    begin(&mut out, Type::Bye, 0, seq);
    out
}

// ---- Decoding ------------------------------------------------------------------------

/// A cursor over a message's bytes that never reads past the end.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(s)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    }

    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }
}

/// Decodes one message, strictly: every length must add up to the message's size,
/// reserved bytes are zero, counts and blobs are within their limits.
pub(crate) fn decode(bytes: &[u8]) -> Result<Message<'_>, Malformed> {
    let bad = |seq, ty, reason: String| Malformed { seq, ty, reason };
    if bytes.len() > MAX_MESSAGE {
        return Err(bad(
            None,
            None,
            format!("{} bytes is over the limit of {MAX_MESSAGE}", bytes.len()),
        ));
    }
    let mut c = Cursor { bytes, at: 0 };
    let (Some(magic), Some(version), Some(ty), Some(count), Some(seq)) =
        (c.take(4), c.u8(), c.u8(), c.u16(), c.u32())
    else {
        return Err(bad(
            None,
            None,
            format!("{} bytes is shorter than a header ({HEADER})", bytes.len()),
        ));
    };
    if magic != MAGIC {
        return Err(bad(None, None, "not a handover message (bad magic)".into()));
    }
    let Some(ty) = Type::from_byte(ty) else {
        return Err(bad(
            Some(seq),
            None,
            format!("unknown message type {ty:#04x}"),
        ));
    };
    if version != VERSION {
        return Err(bad(
            Some(seq),
            Some(ty),
            format!("version {version} is not understood (this release reads {VERSION})"),
        ));
    }
    let body = Body {
        c,
        seq,
        ty,
        count: usize::from(count),
    };
    body.decode()
}

struct Body<'a> {
    c: Cursor<'a>,
    seq: u32,
    ty: Type,
    count: usize,
}

impl<'a> Body<'a> {
    fn bad(&self, reason: impl Into<String>) -> Malformed {
        Malformed {
            seq: Some(self.seq),
            ty: Some(self.ty),
            reason: reason.into(),
        }
    }

    fn truncated(&self, what: &str) -> Malformed {
        self.bad(format!("truncated in {what}"))
    }

    fn decode(mut self) -> Result<Message<'a>, Malformed> {
        let seq = self.seq;
        let msg = match self.ty {
            Type::Conns => Message::Conns {
                seq,
                records: self.records()?,
            },
            Type::Answers => Message::Answers {
                seq,
                answers: self.answers()?,
            },
            Type::End => {
                self.no_count()?;
                let (Some(rule), Some(pad), Some(count)) =
                    (self.c.u8(), self.c.take(3), self.c.u32())
                else {
                    return Err(self.truncated("its rule"));
                };
                let rule = match rule {
                    1 => EndRule::Kept,
                    2 => EndRule::Given,
                    r => return Err(self.bad(format!("unknown rule {r}"))),
                };
                if pad != [0; 3] {
                    return Err(self.bad("reserved bytes are not zero"));
                }
                Message::End { seq, rule, count }
            }
            Type::Reject => {
                self.no_count()?;
                let of = self
                    .c
                    .u32()
                    .ok_or_else(|| self.truncated("the message rejected"))?;
                let reason = self.reason()?;
                Message::Reject { seq, of, reason }
            }
            Type::Bye => {
                self.no_count()?;
                Message::Bye { seq }
            }
        };
        match self.c.left() {
            0 => Ok(msg),
            n => Err(self.bad(format!("{n} bytes after the end of the message"))),
        }
    }

    fn no_count(&self) -> Result<(), Malformed> {
        match self.count {
            0 => Ok(()),
            n => Err(self.bad(format!("a count of {n} where none belongs"))),
        }
    }

    fn records(&mut self) -> Result<Vec<Record<'a>>, Malformed> {
        if self.count == 0 || self.count > MAX_FDS {
            return Err(self.bad(format!(
                "{} connections in one message (1 to {MAX_FDS})",
                self.count
            )));
        }
        let mut records = Vec::with_capacity(self.count);
        for i in 0..self.count {
            let r = self.record().map_err(|m| Malformed {
                reason: format!("connection {i}: {}", m.reason),
                ..m
            })?;
            if let Some(prev) = records.last().map(|p: &Record<'_>| p.id) {
                if r.id <= prev {
                    return Err(self.bad(format!(
                        "connection {i}: id {} does not follow {prev}",
                        r.id
                    )));
                }
            }
            records.push(r);
        }
        Ok(records)
    }

    fn record(&mut self) -> Result<Record<'a>, Malformed> {
        let c = &mut self.c;
        let (Some(id), Some(tag), Some(kind), Some(pad), Some(unread_len), Some(state_len)) =
            (c.u64(), c.u32(), c.u8(), c.take(3), c.u32(), c.u32())
        else {
            return Err(self.truncated("its header"));
        };
        if id == 0 {
            return Err(self.bad("id 0"));
        }
        let kind = match kind {
            1 => Kind::Tcp,
            2 => Kind::Unix,
            k => return Err(self.bad(format!("unknown kind {k}"))),
        };
        if pad != [0; 3] {
            return Err(self.bad("reserved bytes are not zero"));
        }
        let (unread_len, state_len) = (unread_len as usize, state_len as usize);
        if unread_len > MAX_UNREAD {
            return Err(self.bad(format!(
                "{unread_len} unread bytes is over the limit of {MAX_UNREAD}"
            )));
        }
        if state_len > MAX_STATE {
            return Err(self.bad(format!(
                "{state_len} bytes of state is over the limit of {MAX_STATE}"
            )));
        }
        let unread = self
            .c
            .take(unread_len)
            .ok_or_else(|| self.truncated("its unread bytes"))?;
        let state = self
            .c
            .take(state_len)
            .ok_or_else(|| self.truncated("its state"))?;
        Ok(Record {
            id,
            tag,
            kind,
            unread,
            state,
        })
    }

    fn answers(&mut self) -> Result<Vec<Answer<'a>>, Malformed> {
        if self.count == 0 || self.count > MAX_ANSWERS {
            return Err(self.bad(format!(
                "{} answers in one message (1 to {MAX_ANSWERS})",
                self.count
            )));
        }
        let mut answers = Vec::with_capacity(self.count);
        for i in 0..self.count {
            let (Some(id), Some(verdict), Some(pad)) = (self.c.u64(), self.c.u8(), self.c.u8())
            else {
                return Err(self.truncated(&format!("answer {i}")));
            };
            let accepted = match verdict {
                1 => true,
                2 => false,
                v => return Err(self.bad(format!("answer {i}: unknown verdict {v}"))),
            };
            if pad != 0 || id == 0 {
                return Err(self.bad(format!("answer {i}: id 0 or reserved byte not zero")));
            }
            let reason = self.reason()?;
            if accepted && !reason.is_empty() {
                return Err(self.bad(format!("answer {i}: an acceptance with a reason")));
            }
            answers.push(Answer {
                id,
                accepted,
                reason,
            });
        }
        Ok(answers)
    }

    /// A length-prefixed reason: at most [`MAX_REASON`] bytes of UTF-8.
    fn reason(&mut self) -> Result<&'a str, Malformed> {
        let len = self.c.u16().ok_or_else(|| self.truncated("a reason"))?;
        let len = usize::from(len);
        if len > MAX_REASON {
            return Err(self.bad(format!(
                "a reason of {len} bytes is over the limit of {MAX_REASON}"
            )));
        }
        let bytes = self.c.take(len).ok_or_else(|| self.truncated("a reason"))?;
        std::str::from_utf8(bytes).map_err(|_| self.bad("a reason that is not UTF-8"))
    }
}

/// Re-encodes a decoded message: the format is canonical, so this gives back the bytes
/// it was decoded from (the fuzz target checks it).
pub(crate) fn encode(msg: &Message<'_>) -> Vec<u8> {
    match msg {
        Message::Conns { seq, records } => {
            let mut out = Vec::new();
            begin(&mut out, Type::Conns, records.len() as u16, *seq);
            for r in records {
                push_record(&mut out, r);
            }
            out
        }
        Message::Answers { seq, answers: a } => answers(*seq, a),
        Message::End { seq, rule, count } => end(*seq, *rule, *count),
        Message::Reject { seq, of, reason } => reject(*seq, *of, reason),
        Message::Bye { seq } => bye(*seq),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conns(records: &[Record<'_>]) -> Vec<u8> {
        encode(&Message::Conns {
            seq: 7,
            records: records.to_vec(),
        })
    }

    fn rec(id: u64) -> Record<'static> {
        Record {
            id,
            tag: 0x5753_0001,
            kind: Kind::Tcp,
            unread: b"GET / HT",
            state: b"session=42",
        }
    }

    #[test]
    fn every_message_round_trips() {
        let msgs = [
            Message::Conns {
                seq: 1,
                records: vec![
                    rec(1),
                    Record {
                        kind: Kind::Unix,
                        unread: b"",
                        state: b"",
                        ..rec(9)
                    },
                ],
            },
            Message::End {
                seq: 2,
                rule: EndRule::Kept,
                count: 3,
            },
            Message::End {
                seq: 2,
                rule: EndRule::Given,
                count: 0,
            },
            Message::Answers {
                seq: 1,
                answers: vec![
                    Answer {
                        id: 1,
                        accepted: true,
                        reason: "",
                    },
                    Answer {
                        id: 9,
                        accepted: false,
                        reason: "unknown tag é",
                    },
                ],
            },
            Message::Reject {
                seq: 2,
                of: 1,
                reason: "fd limit",
            },
            Message::Bye { seq: 3 },
        ];
        for m in &msgs {
            let bytes = encode(m);
            assert_eq!(&decode(&bytes).unwrap(), m);
        }
    }

    #[test]
    fn the_header_is_laid_out_as_documented() {
        let bytes = conns(&[rec(0x0102)]);
        assert_eq!(&bytes[..4], b"TFHO");
        assert_eq!(bytes[4], 1, "version");
        assert_eq!(bytes[5], b'C', "type");
        assert_eq!(&bytes[6..8], &[1, 0], "count");
        assert_eq!(&bytes[8..12], &[7, 0, 0, 0], "sequence");
        assert_eq!(&bytes[12..20], &[2, 1, 0, 0, 0, 0, 0, 0], "id");
        assert_eq!(&bytes[20..24], &[1, 0, 0x53, 0x57], "tag");
        assert_eq!(&bytes[24..28], &[1, 0, 0, 0], "kind and reserved");
        assert_eq!(&bytes[28..32], &[8, 0, 0, 0], "unread length");
        assert_eq!(&bytes[32..36], &[10, 0, 0, 0], "state length");
        assert_eq!(&bytes[36..], b"GET / HTsession=42");
    }

    /// Why `bytes` is refused.
    fn reason(bytes: &[u8]) -> String {
        decode(bytes).unwrap_err().reason
    }

    #[test]
    fn a_header_that_is_not_ours_is_refused() {
        let good = conns(&[rec(1), rec(2)]);
        assert!(reason(&good[..11]).contains("shorter than a header"));
        let mut b = good.clone();
        b[0] = b'X';
        assert!(reason(&b).contains("bad magic"));
        let mut b = good.clone();
        b[4] = 2;
        let m = decode(&b).unwrap_err();
        assert!(m.reason.contains("version 2"), "{m:?}");
        assert_eq!(
            (m.seq, m.ty),
            (Some(7), Some(Type::Conns)),
            "a rejection can name it"
        );
        let mut b = good.clone();
        b[5] = b'Z';
        assert!(reason(&b).contains("unknown message type"));
        // Too large to be a message at all.
        assert!(reason(&vec![0; MAX_MESSAGE + 1]).contains("over the limit"));
    }

    #[test]
    fn counts_that_do_not_match_are_refused() {
        let good = conns(&[rec(1), rec(2)]);
        let with_count = |n| {
            let mut b = good.clone();
            set_count(&mut b, n);
            reason(&b)
        };
        assert!(with_count(3).contains("truncated"));
        assert!(with_count(1).contains("after the end"));
        assert!(with_count(0).contains("0 connections"));
        assert!(with_count(254).contains("254 connections"));
        // A count where none belongs; bytes after the end.
        let mut b = bye(1);
        set_count(&mut b, 1);
        assert!(reason(&b).contains("where none belongs"));
        let mut b = end(1, EndRule::Kept, 0);
        b.push(0);
        assert!(reason(&b).contains("after the end"));
        let mut b = end(1, EndRule::Kept, 0);
        b[HEADER] = 3;
        assert!(reason(&b).contains("unknown rule"));
    }

    #[test]
    fn records_that_break_a_rule_are_refused() {
        let good = conns(&[rec(1), rec(2)]);
        let with = |at: usize, bytes: &[u8]| {
            let mut b = good.clone();
            b[at..at + bytes.len()].copy_from_slice(bytes);
            reason(&b)
        };
        // A blob length over its limit, or past the end.
        assert!(with(28, &(MAX_UNREAD as u32 + 1).to_le_bytes()).contains("over the limit"));
        assert!(with(32, &u32::MAX.to_le_bytes()).contains("over the limit"));
        assert!(with(32, &1000u32.to_le_bytes()).contains("truncated"));
        // Kind, reserved bytes, ids.
        assert!(with(24, &[3]).contains("unknown kind"));
        assert!(with(25, &[1]).contains("reserved"));
        assert!(reason(&conns(&[rec(0)])).contains("id 0"));
        assert!(reason(&conns(&[rec(2), rec(2)])).contains("does not follow"));
        assert!(reason(&conns(&[rec(3), rec(2)])).contains("does not follow"));
    }

    #[test]
    fn answers_that_break_a_rule_are_refused() {
        let a = |accepted, reason| {
            answers(
                1,
                &[Answer {
                    id: 5,
                    accepted,
                    reason,
                }],
            )
        };
        let mut b = a(true, "");
        b[HEADER + 8] = 3;
        assert!(reason(&b).contains("unknown verdict"));
        let mut b = a(false, "ab");
        b[HEADER + 12] = 0xff;
        assert!(reason(&b).contains("not UTF-8"));
        let mut b = a(false, "");
        b[HEADER + 10..HEADER + 12].copy_from_slice(&(MAX_REASON as u16 + 1).to_le_bytes());
        assert!(reason(&b).contains("over the limit"));
        assert!(reason(&a(true, "why")).contains("acceptance with a reason"));
    }

    #[test]
    fn reasons_are_cut_to_their_limit_at_a_char_boundary() {
        let long = "é".repeat(MAX_REASON);
        let b = answers(
            1,
            &[Answer {
                id: 1,
                accepted: false,
                reason: &long,
            }],
        );
        let Message::Answers { answers, .. } = decode(&b).unwrap() else {
            panic!("not answers")
        };
        assert_eq!(answers[0].reason.len(), MAX_REASON);
    }

    #[test]
    fn the_largest_record_fits_one_message() {
        let unread = vec![1u8; MAX_UNREAD];
        let state = vec![2u8; MAX_STATE];
        let r = Record {
            unread: &unread,
            state: &state,
            ..rec(1)
        };
        let b = conns(&[r]);
        assert!(b.len() <= MAX_MESSAGE, "{} > {MAX_MESSAGE}", b.len());
        assert!(decode(&b).is_ok());
    }
}
