//! The fd table's wire format, end to end: how the fds passed to a new generation are
//! described in its environment (`TABLEFLIP_FDS=tableflip1;pid=0000012345;3,ready;...`),
//! encoded here and decoded strictly, since it comes from outside the process.
//!
//! The format (the header, the pid slot the child fills in between fork and exec, the
//! kinds of entry, the fourth field of a Unix entry, the percent-encoding, the limits
//! and what an older release does with a kind it does not know) is documented once, in
//! the guide [how an upgrade works](crate::guide::upgrade#the-fd-table)
//! (`docs/upgrade.md`).

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::io::RawFd;
use std::path::PathBuf;

use crate::error::clip;
use crate::unix_addr::UnixAddr;

/// The environment variable that carries the fd table.
pub(crate) const VAR: &str = "TABLEFLIP_FDS";
const MAGIC: &str = "tableflip1";
const PID_PREFIX: &str = ";pid=";
/// How many digits the pid slot has.
pub(crate) const PID_WIDTH: usize = 10;
/// Where the pid slot starts in the variable's value.
pub(crate) const PID_OFFSET: usize = MAGIC.len() + PID_PREFIX.len();
/// The longest table accepted: Linux refuses a single environment string longer than
/// 128 KiB (`MAX_ARG_STRLEN`).
pub(crate) const MAX_LEN: usize = 128 * 1024 - VAR.len() - 2;

/// What an fd in the table is, and the key it is found by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    /// The write end of the readiness pipe.
    Ready,
    /// The read end of the pipe that tells when the parent has exited.
    Parent,
    /// The read end of the pipe on which the parent commits the handoff.
    Commit,
    /// A sealed memfd (or unlinked file) holding the state handed over by the parent.
    State,
    /// The new generation's end of the handover channel (a Unix socket pair).
    Handover,
    TcpListener(SocketAddr),
    Udp(SocketAddr),
    UnixListener(UnixAddr),
    UnixDatagram(UnixAddr),
    /// A `SOCK_SEQPACKET` Unix listener.
    UnixSeqpacket(UnixAddr),
    TcpStream(String),
    UnixStream(String),
    Fd(String),
    /// An entry of a kind this version does not know (from a newer generation): adopted,
    /// never handed out, closed by `ready()`.
    Unknown {
        /// Its kind, as written.
        tag: String,
        /// The rest of the entry after the kind, as written.
        rest: String,
    },
}

impl Key {
    pub(crate) fn tag(&self) -> &str {
        match self {
            Key::Ready => "ready",
            Key::Parent => "parent",
            Key::Commit => "commit",
            Key::State => "state",
            Key::Handover => "handover",
            Key::TcpListener(_) => "tcp",
            Key::Udp(_) => "udp",
            Key::UnixListener(_) => "unix",
            Key::UnixDatagram(_) => "unixgram",
            Key::UnixSeqpacket(_) => "unixpacket",
            Key::TcpStream(_) => "tcpconn",
            Key::UnixStream(_) => "unixconn",
            Key::Fd(_) => "fd",
            Key::Unknown { tag, .. } => tag,
        }
    }

    /// A human name for the kind, for error messages.
    pub(crate) fn kind_name(&self) -> &'static str {
        match self {
            Key::Ready => "readiness pipe",
            Key::Parent => "parent pipe",
            Key::Commit => "commit pipe",
            Key::State => "state handoff",
            Key::Handover => "handover channel",
            Key::TcpListener(_) => "TCP listener",
            Key::Udp(_) => "UDP socket",
            Key::UnixListener(_) => "Unix listener",
            Key::UnixDatagram(_) => "Unix datagram socket",
            Key::UnixSeqpacket(_) => "Unix seqpacket listener",
            Key::TcpStream(_) => "TCP connection",
            Key::UnixStream(_) => "Unix connection",
            Key::Fd(_) => "file descriptor",
            Key::Unknown { .. } => "entry of an unknown kind",
        }
    }

    /// The Unix address of a Unix listener or datagram socket.
    pub(crate) fn unix_addr(&self) -> Option<&UnixAddr> {
        match self {
            Key::UnixListener(a) | Key::UnixDatagram(a) | Key::UnixSeqpacket(a) => Some(a),
            _ => None,
        }
    }

    /// The path of a Unix listener or datagram socket bound to one.
    pub(crate) fn unix_path(&self) -> Option<&std::path::Path> {
        match self.unix_addr()? {
            UnixAddr::Path(p) => Some(p),
            UnixAddr::Abstract(_) => None,
        }
    }
}

impl Key {
    /// The address, path or name alone (empty for the handshake entries).
    pub(crate) fn key_text(&self) -> String {
        match self {
            Key::Ready | Key::Parent | Key::Commit | Key::State | Key::Handover => String::new(),
            Key::TcpListener(a) | Key::Udp(a) => a.to_string(),
            Key::UnixListener(a) | Key::UnixDatagram(a) | Key::UnixSeqpacket(a) => a.to_string(),
            Key::TcpStream(n) | Key::UnixStream(n) | Key::Fd(n) => n.clone(),
            Key::Unknown { tag, rest } => format!("{tag},{rest}"),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = self.kind_name();
        match self {
            Key::Ready | Key::Parent | Key::Commit | Key::State | Key::Handover => {
                f.write_str(kind)
            }
            Key::TcpListener(a) | Key::Udp(a) => write!(f, "{kind} {a}"),
            Key::UnixListener(a) | Key::UnixDatagram(a) | Key::UnixSeqpacket(a) => {
                write!(f, "{kind} {a}")
            }
            Key::TcpStream(n) | Key::UnixStream(n) | Key::Fd(n) => write!(f, "{kind} {n:?}"),
            Key::Unknown { tag, .. } => write!(f, "{kind} {tag:?}"),
        }
    }
}

fn unreserved(b: u8) -> bool {
    UNRESERVED[usize::from(b)]
}

/// The bytes a key may hold as they are: `A-Z a-z 0-9 - . _ ~ / : [ ]`.
const UNRESERVED: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(c, b'-' | b'.' | b'_' | b'~' | b'/' | b':' | b'[' | b']');
        b += 1;
    }
    table
};

fn escape_into(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if unreserved(b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
    }
}

fn unescape(s: &str) -> Result<Vec<u8>, String> {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'A'..=b'F' => Some(b - b'A' + 10),
            b'a'..=b'f' => Some(b - b'a' + 10),
            _ => None,
        }
    }
    let bytes = s.as_bytes();
    // Most keys need no escape: one pass to check, one copy.
    if bytes.iter().all(|&b| unreserved(b)) {
        return Ok(bytes.to_vec());
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hi = bytes.get(i + 1).copied().and_then(hex);
            let lo = bytes.get(i + 2).copied().and_then(hex);
            match (hi, lo) {
                (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                _ => return Err(format!("bad percent escape at byte {i}")),
            }
            i += 3;
        } else if unreserved(b) {
            out.push(b);
            i += 1;
        } else {
            return Err(format!("byte {b:#04x} at {i} must be percent-encoded"));
        }
    }
    Ok(out)
}

/// Identity of a socket file: device and inode, as `lstat` reports them.
pub(crate) type FileId = (u64, u64);

/// What an entry may say about a Unix socket beyond its address (its fourth field).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Extra {
    #[default]
    None,
    /// `DEV:INO`: the identity of the socket file bound at its path.
    File(FileId),
    /// `auto`: the kernel chose its abstract name (autobind).
    Autobound,
}

/// Encodes a table. The pid slot holds zeros; the spawner fills it in.
#[cfg(test)]
pub(crate) fn encode<'a>(entries: impl IntoIterator<Item = (RawFd, &'a Key)>) -> String {
    encode_with(entries.into_iter().map(|(fd, key)| (fd, key, Extra::None)))
}

/// Encodes a table, with what is known of Unix sockets beyond their address (see
/// [`Extra`]). The pid slot holds zeros; the spawner fills it in.
pub(crate) fn encode_with<'a>(
    entries: impl IntoIterator<Item = (RawFd, &'a Key, Extra)>,
) -> String {
    let mut out = String::with_capacity(64);
    out.push_str(MAGIC);
    out.push_str(PID_PREFIX);
    out.extend(std::iter::repeat('0').take(PID_WIDTH));
    for (fd, key, extra) in entries {
        out.push(';');
        let _ = write!(out, "{fd}");
        out.push(',');
        out.push_str(key.tag());
        match key {
            Key::Ready | Key::Parent | Key::Commit | Key::State | Key::Handover => {}
            Key::TcpListener(a) | Key::Udp(a) => {
                out.push(',');
                escape_into(&mut out, a.to_string().as_bytes());
            }
            Key::UnixListener(a) | Key::UnixDatagram(a) | Key::UnixSeqpacket(a) => {
                out.push(',');
                match (a, extra) {
                    (UnixAddr::Path(p), _) => escape_into(&mut out, p.as_os_str().as_bytes()),
                    (UnixAddr::Abstract(name), _) => {
                        out.push('@');
                        escape_into(&mut out, name);
                    }
                }
                match (a, extra) {
                    (UnixAddr::Path(_), Extra::File((dev, ino))) => {
                        let _ = write!(out, ",{dev}:{ino}");
                    }
                    (UnixAddr::Abstract(_), Extra::Autobound) => out.push_str(",auto"),
                    _ => {}
                }
            }
            Key::TcpStream(n) | Key::UnixStream(n) | Key::Fd(n) => {
                out.push(',');
                escape_into(&mut out, n.as_bytes());
            }
            // Never passed on: closed by the generation that could not read it.
            Key::Unknown { rest, .. } => {
                out.push(',');
                out.push_str(rest);
            }
        }
    }
    out
}

/// Pieces of `s` between the separator `sep` (an ASCII byte), found with a plain
/// byte loop (the table's pieces are short: a `memchr` per piece costs more), and at
/// most `limit` of them (the last takes the rest).
struct Pieces<'a> {
    rest: Option<&'a str>,
    sep: u8,
    limit: usize,
}

impl<'a> Pieces<'a> {
    fn new(s: &'a str, sep: u8) -> Pieces<'a> {
        Pieces {
            rest: Some(s),
            sep,
            limit: usize::MAX,
        }
    }

    fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let s = self.rest?;
        self.limit = self.limit.saturating_sub(1);
        match s
            .bytes()
            .position(|b| b == self.sep)
            .filter(|_| self.limit > 0)
        {
            // `sep` is ASCII: cutting around it keeps both sides UTF-8.
            Some(i) => {
                self.rest = Some(&s[i + 1..]);
                Some(&s[..i])
            }
            None => {
                self.rest = None;
                Some(s)
            }
        }
    }
}

/// One entry without its fd (`KIND,KEY[,EXTRA]`), as [`encode_with`] writes it: how a
/// socket is named in systemd's fd store.
pub(crate) fn entry_text(key: &Key, extra: Extra) -> String {
    let mut text = encode_with([(0, key, extra)]);
    let start = MAGIC.len() + PID_PREFIX.len() + PID_WIDTH + ";0,".len();
    text.split_off(start)
}

/// The key (and extra) of an entry written by [`entry_text`].
pub(crate) fn decode_entry_text(text: &str) -> Result<(Key, Extra), DecodeError> {
    let (_, key, extra) = decode_entry(&format!("3,{text}"))?;
    Ok((key, extra))
}

/// A decoded table.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Table {
    pub(crate) pid: u32,
    pub(crate) entries: Vec<Entry>,
}

/// One entry of a decoded table. It has the shape of the adopted fd
/// (`inherit::Inherited`), so that adopting a table converts its entries in place: with
/// thousands of fds every fresh page of a copy costs a page fault (≈2.4 µs on a VM).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) fd: RawFd,
    pub(crate) key: Key,
    /// What the entry says beyond its key (see [`Extra`]).
    pub(crate) extra: Extra,
}

#[cfg(test)]
impl Table {
    /// The entries' fds and keys.
    fn pairs(&self) -> Vec<(RawFd, Key)> {
        self.entries.iter().map(|e| (e.fd, e.key.clone())).collect()
    }

    /// The entries' extras.
    fn extras(&self) -> Vec<Extra> {
        self.entries.iter().map(|e| e.extra).collect()
    }
}

/// Why a table was rejected: the entry at fault and the reason.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct DecodeError {
    pub(crate) entry: String,
    pub(crate) reason: String,
}

fn bad(entry: &str, reason: impl Into<String>) -> DecodeError {
    // Keep error messages bounded even for a hostile, huge value.
    let entry = if entry.len() > 200 {
        format!("{}...", clip(entry, 200))
    } else {
        entry.to_string()
    };
    DecodeError {
        entry,
        reason: reason.into(),
    }
}

/// Decodes a table. Returns `Ok(None)` when the table is addressed to another process.
pub(crate) fn decode(value: &[u8], my_pid: u32) -> Result<Option<Table>, DecodeError> {
    // Only built for an error message.
    let lossy = || String::from_utf8_lossy(value);
    if value.is_empty() {
        return Err(bad("", "the variable is empty"));
    }
    if value.len() > MAX_LEN {
        return Err(bad(
            &lossy(),
            format!(
                "{} bytes is longer than the limit of {MAX_LEN}",
                value.len()
            ),
        ));
    }
    let value = std::str::from_utf8(value).map_err(|_| bad(&lossy(), "not ASCII"))?;
    let mut parts = Pieces::new(value, b';');
    let magic = parts.next().unwrap_or_default();
    let pid_field = parts.next().unwrap_or_default();
    // The pid first: a table for another process is none of our business, whatever its
    // version (a newer generation's table inherited by a helper process, say).
    let pid = decode_pid(pid_field);
    if matches!(pid, Ok(pid) if pid != my_pid) {
        return Ok(None);
    }
    if magic != MAGIC {
        return Err(bad(magic, format!("unknown format (expected {MAGIC:?})")));
    }
    let pid = pid?;
    // About one entry per 16 bytes: enough room for most tables at once.
    let n = value.len() / 16;
    let mut entries: Vec<Entry> = Vec::with_capacity(n);
    // The first entry that repeats a handshake entry, if any.
    let mut repeated_handshake = None;
    // The text of entry `i`, for an error message.
    let text = |i: usize| Pieces::new(value, b';').nth(i + 2).unwrap_or_default();
    for entry in parts {
        // A repeat among the entries before this one is the earlier fault.
        let (fd, key, extra) = decode_entry(entry)
            .map_err(|e| repeat_fault(&entries, text, repeated_handshake).unwrap_or(e))?;
        if repeated_handshake.is_none()
            && matches!(
                key,
                Key::Ready | Key::Parent | Key::Commit | Key::State | Key::Handover
            )
            && entries.iter().any(|e| e.key == key)
        {
            repeated_handshake = Some(entries.len());
        }
        entries.push(Entry { fd, key, extra });
    }
    if let Some(fault) = repeat_fault(&entries, text, repeated_handshake) {
        return Err(fault);
    }
    Ok(Some(Table { pid, entries }))
}

/// The earliest entry that repeats an fd or a handshake entry of an earlier one (on the
/// same entry, the fd), given `repeated_handshake`, the first entry that repeats a
/// handshake entry, if any.
fn repeat_fault<'a>(
    entries: &[Entry],
    text: impl Fn(usize) -> &'a str,
    repeated_handshake: Option<usize>,
) -> Option<DecodeError> {
    match (repeated_fd(entries), repeated_handshake) {
        (Some(i), h) if h.map_or(true, |h| i <= h) => {
            let fd = entries[i].fd;
            Some(bad(text(i), format!("fd {fd} appears more than once")))
        }
        (_, Some(h)) => {
            let tag = entries[h].key.tag();
            Some(bad(text(h), format!("more than one {tag} entry")))
        }
        _ => None,
    }
}

/// The index of the first entry whose fd an earlier entry has already named.
fn repeated_fd(entries: &[Entry]) -> Option<usize> {
    // Packed tables name increasing fds: no need to look further.
    if entries.windows(2).all(|w| w[0].fd < w[1].fd) {
        return None;
    }
    let mut order: Vec<(RawFd, usize)> = entries.iter().map(|e| e.fd).zip(0..).collect();
    order.sort_unstable();
    order
        .windows(2)
        .filter(|w| w[0].0 == w[1].0)
        .map(|w| w[0].1.max(w[1].1))
        .min()
}

/// `pid=` and ten digits.
fn decode_pid(field: &str) -> Result<u32, DecodeError> {
    field
        .strip_prefix("pid=")
        .filter(|d| d.len() == PID_WIDTH && d.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| bad(field, "expected pid= and ten digits"))?
        .parse()
        .map_err(|_| bad(field, "pid out of range"))
}

fn decode_entry(entry: &str) -> Result<(RawFd, Key, Extra), DecodeError> {
    // Keys are percent-encoded, so a raw `,` only ever separates fields.
    let mut fields = Pieces::new(entry, b',').limit(4);
    let fd_s = fields.next().unwrap_or_default();
    let tag = fields
        .next()
        .ok_or_else(|| bad(entry, "expected FD,KIND[,KEY]"))?;
    let fd = decode_fd(entry, fd_s)?;
    let f = Fields {
        entry,
        tag,
        arg: fields.next(),
    };
    let key = match tag {
        "ready" => f.no_arg(Key::Ready)?,
        "parent" => f.no_arg(Key::Parent)?,
        "commit" => f.no_arg(Key::Commit)?,
        "state" => f.no_arg(Key::State)?,
        "handover" => f.no_arg(Key::Handover)?,
        "tcp" => Key::TcpListener(f.sockaddr()?),
        "udp" => Key::Udp(f.sockaddr()?),
        "unix" => Key::UnixListener(f.unix()?),
        "unixgram" => Key::UnixDatagram(f.unix()?),
        "unixpacket" => Key::UnixSeqpacket(f.unix()?),
        "tcpconn" => Key::TcpStream(f.name()?),
        "unixconn" => Key::UnixStream(f.name()?),
        "fd" => Key::Fd(f.name()?),
        _ => return Ok((fd, unknown(entry, tag)?, Extra::None)),
    };
    let extra = match (fields.next(), key.unix_addr()) {
        (None, _) => Extra::None,
        (Some(extra), Some(UnixAddr::Path(_))) => Extra::File(
            file_id(extra).ok_or_else(|| bad(entry, "expected the socket file as DEV:INO"))?,
        ),
        (Some("auto"), Some(UnixAddr::Abstract(_))) => Extra::Autobound,
        (Some(_), _) => return Err(bad(entry, format!("{tag} takes no fourth field"))),
    };
    Ok((fd, key, extra))
}

/// An entry of a kind this version does not know: kept (its fd is adopted and closed by
/// `ready()`), so that an older binary can take over from a newer one. The kind must
/// still look like one (lowercase letters, digits, `-`, `_`, at most 32), and is quoted in
/// reasons only to its start.
fn unknown(entry: &str, tag: &str) -> Result<Key, DecodeError> {
    let kind_byte = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_';
    if tag.is_empty() || tag.len() > 32 || !tag.bytes().all(kind_byte) {
        return Err(bad(
            entry,
            format!("unknown kind {:?} is not a kind", clip(tag, 16)),
        ));
    }
    let rest = Pieces::new(entry, b',').limit(3).nth(2).unwrap_or_default();
    Ok(Key::Unknown {
        tag: tag.to_string(),
        rest: rest.to_string(),
    })
}

/// The fd field: decimal, 3 or more.
fn decode_fd(entry: &str, fd_s: &str) -> Result<RawFd, DecodeError> {
    if fd_s.is_empty() || fd_s.len() > 10 || !fd_s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(entry, "the fd is not a non-negative decimal number"));
    }
    let fd: RawFd = fd_s
        .parse()
        .map_err(|_| bad(entry, "the fd is out of range"))?;
    if fd <= 2 {
        return Err(bad(
            entry,
            format!("fd {fd} is standard input, output or error"),
        ));
    }
    Ok(fd)
}

/// The kind and key fields of one entry, decoded as the kind requires.
struct Fields<'a> {
    entry: &'a str,
    tag: &'a str,
    arg: Option<&'a str>,
}

impl Fields<'_> {
    fn bad(&self, reason: impl Into<String>) -> DecodeError {
        bad(self.entry, reason)
    }

    /// A key that must not be empty.
    fn need(&self, what: &str) -> Result<Vec<u8>, DecodeError> {
        let arg = self
            .arg
            .ok_or_else(|| self.bad(format!("{} needs {what}", self.tag)))?;
        let bytes = unescape(arg).map_err(|e| self.bad(e))?;
        if bytes.is_empty() {
            return Err(self.bad(format!("{} needs {what}", self.tag)));
        }
        Ok(bytes)
    }

    fn sockaddr(&self) -> Result<SocketAddr, DecodeError> {
        let bytes = self.need("a socket address")?;
        std::str::from_utf8(&bytes)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| self.bad("not a socket address"))
    }

    fn unix(&self) -> Result<UnixAddr, DecodeError> {
        if let Some(name) = self.arg.unwrap_or_default().strip_prefix('@') {
            let name = unescape(name).map_err(|e| self.bad(e))?;
            return Ok(UnixAddr::Abstract(name));
        }
        let bytes = self.need("a path")?;
        if bytes.contains(&0) {
            return Err(self.bad("the path holds a NUL byte"));
        }
        Ok(UnixAddr::Path(PathBuf::from(std::ffi::OsString::from_vec(
            bytes,
        ))))
    }

    /// A name may be empty (`add_fd("", ..)` is allowed), but the `,` before it is needed.
    fn name(&self) -> Result<String, DecodeError> {
        let arg = self
            .arg
            .ok_or_else(|| self.bad(format!("{} needs a name", self.tag)))?;
        let bytes = unescape(arg).map_err(|e| self.bad(e))?;
        String::from_utf8(bytes).map_err(|_| self.bad("the name is not UTF-8"))
    }

    fn no_arg(&self, key: Key) -> Result<Key, DecodeError> {
        match self.arg {
            None => Ok(key),
            Some(_) => Err(self.bad(format!("{} takes no key", self.tag))),
        }
    }
}

fn file_id(s: &str) -> Option<FileId> {
    let (dev, ino) = s.split_once(':')?;
    let num = |v: &str| -> Option<u64> {
        if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        v.parse().ok()
    };
    Some((num(dev)?, num(ino)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_file_identity_travels() {
        let path = Key::UnixListener(UnixAddr::Path("/run/a,b.sock".into()));
        let tcp = Key::TcpListener("127.0.0.1:1".parse().unwrap());
        let s = encode_with([
            (3, &path, Extra::File((64769, 1234))),
            (4, &tcp, Extra::File((1, 2))),
        ]);
        assert!(
            s.ends_with(";3,unix,/run/a%2Cb.sock,64769:1234;4,tcp,127.0.0.1:1"),
            "{s}"
        );
        let s = s.replace("pid=0000000000", "pid=0000000009");
        let t = decode(s.as_bytes(), 9).unwrap().unwrap();
        assert_eq!(t.extras(), [Extra::File((64769, 1234)), Extra::None]);
        for bad in [
            ",1:",
            ",:1",
            ",1",
            ",a:b",
            ",1:2:3",
            ",123456789012345678901:1",
        ] {
            let v = format!("tableflip1;pid=0000000009;3,unix,/x{bad}");
            assert!(decode(v.as_bytes(), 9).is_err(), "{v}");
        }
        let v = "tableflip1;pid=0000000009;3,tcp,127.0.0.1:1,1:2";
        assert!(decode(v.as_bytes(), 9).is_err());
        let v = "tableflip1;pid=0000000009;3,unix,@abstract,1:2";
        assert!(decode(v.as_bytes(), 9).is_err());
    }

    #[test]
    fn autobound_names_travel_marked() {
        let k = Key::UnixDatagram(UnixAddr::Abstract(b"0a1b2".to_vec()));
        let s = encode_with([(3, &k, Extra::Autobound)]);
        assert!(s.ends_with(";3,unixgram,@0a1b2,auto"), "{s}");
        let s = s.replace("pid=0000000000", "pid=0000000009");
        let t = decode(s.as_bytes(), 9).unwrap().unwrap();
        assert_eq!(t.pairs(), [(3, k)]);
        assert_eq!(t.extras(), [Extra::Autobound]);
        // Only an abstract name can have been chosen by the kernel.
        let v = "tableflip1;pid=0000000009;3,unix,/x,auto";
        assert!(decode(v.as_bytes(), 9).is_err());
    }

    #[test]
    fn entries_alone_round_trip() {
        let k = Key::UnixListener(UnixAddr::Path("/run/a b.sock".into()));
        let text = entry_text(&k, Extra::File((1, 2)));
        assert_eq!(text, "unix,/run/a%20b.sock,1:2");
        assert_eq!(decode_entry_text(&text), Ok((k, Extra::File((1, 2)))));
        let k = Key::TcpListener("[::1]:80".parse().unwrap());
        assert_eq!(entry_text(&k, Extra::None), "tcp,[::1]:80");
    }

    #[test]
    fn seqpacket_listeners_round_trip() {
        let k = Key::UnixSeqpacket(UnixAddr::Path("/run/p.sock".into()));
        let s = with_pid(encode([(5, &k)]), 7);
        assert!(s.ends_with(";5,unixpacket,/run/p.sock"), "{s}");
        assert_eq!(decode(s.as_bytes(), 7).unwrap().unwrap().pairs(), [(5, k)]);
    }

    /// A newer generation may pass kinds this one does not know: they are kept (closed
    /// by `ready()`), not fatal, so an older binary can take over from a newer one.
    #[test]
    fn unknown_kinds_are_kept_aside() {
        let v = "tableflip1;pid=0000000007;3,ready;4,quic,[::1]:443,x,y;5,tcp,127.0.0.1:1";
        let t = decode(v.as_bytes(), 7).unwrap().unwrap();
        assert_eq!(
            t.pairs()[1],
            (
                4,
                Key::Unknown {
                    tag: "quic".into(),
                    rest: "[::1]:443,x,y".into()
                }
            )
        );
        assert_eq!(t.entries.len(), 3);
        // Still a kind, though: garbage is refused.
        for bad in [";4,QUIC", ";4,", ";4,a b", ";4,%41"] {
            let v = format!("tableflip1;pid=0000000007{bad}");
            let err = decode(v.as_bytes(), 7).unwrap_err();
            assert!(err.reason.contains("not a kind"), "{v}: {err:?}");
        }
    }

    /// The pid is read before the version: a table for another process is ignored
    /// whatever its version, and only a table for us must be one we understand.
    #[test]
    fn pid_before_version() {
        assert_eq!(decode(b"tableflip9;pid=0000000042;3,warp,x", 7), Ok(None));
        let err = decode(b"tableflip9;pid=0000000007;3,ready", 7).unwrap_err();
        assert!(err.reason.contains("unknown format"), "{err:?}");
        let err = decode(b"garbage", 7).unwrap_err();
        assert!(err.reason.contains("unknown format"), "{err:?}");
    }

    fn with_pid(mut s: String, pid: u32) -> String {
        let p = format!("{pid:010}");
        s.replace_range(PID_OFFSET..PID_OFFSET + PID_WIDTH, &p);
        s
    }

    #[test]
    fn round_trip() {
        let keys = vec![
            (3, Key::Ready),
            (4, Key::Parent),
            (5, Key::TcpListener("127.0.0.1:8080".parse().unwrap())),
            (6, Key::TcpListener("[fe80::1%7]:80".parse().unwrap())),
            (7, Key::Udp("[::1]:53".parse().unwrap())),
            (
                8,
                Key::UnixListener(UnixAddr::Path(PathBuf::from(std::ffi::OsString::from_vec(
                    b"/tmp/a;b,c%d@e\xff".to_vec(),
                )))),
            ),
            (9, Key::UnixDatagram(UnixAddr::Abstract(b"x;y\0z".to_vec()))),
            (
                10,
                Key::UnixListener(UnixAddr::Path("@not-abstract".into())),
            ),
            (11, Key::Fd("state file; with, separators".into())),
            (12, Key::TcpStream("conn".into())),
            (13, Key::UnixStream("ü".into())),
        ];
        let s = with_pid(encode(keys.iter().map(|(fd, k)| (*fd, k))), 42);
        let t = decode(s.as_bytes(), 42).unwrap().unwrap();
        assert_eq!(t.pairs(), keys);
        assert_eq!(decode(s.as_bytes(), 43).unwrap(), None);
    }

    /// xorshift64*: a small deterministic generator, so a failure replays exactly.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn chance(&mut self, one_in: u64) -> bool {
            self.below(one_in) == 0
        }

        /// Bytes drawn mostly from the separators and escapes of the format, plus any.
        fn bytes(&mut self, max_len: u64) -> Vec<u8> {
            const TRICKY: &[u8] = b";,%@:[]/.\\0 \xff\x80\n";
            (0..self.below(max_len + 1))
                .map(|_| match self.below(3) {
                    0 => TRICKY[self.below(TRICKY.len() as u64) as usize],
                    1 => b'a' + self.below(26) as u8,
                    _ => self.next() as u8,
                })
                .collect()
        }

        fn string(&mut self, max_len: u64) -> String {
            (0..self.below(max_len + 1))
                .map(|_| match self.below(4) {
                    0 => char::from(b";,%@ \0"[self.below(6) as usize]),
                    1 => char::from(b'a' + self.below(26) as u8),
                    _ => char::from_u32(self.below(0x11_0000) as u32).unwrap_or('\u{fffd}'),
                })
                .collect()
        }

        fn inet(&mut self) -> SocketAddr {
            let port = self.next() as u16;
            if self.chance(2) {
                SocketAddr::from((std::net::Ipv4Addr::from(self.next() as u32), port))
            } else {
                let ip = std::net::Ipv6Addr::from(
                    u128::from(self.next()) << 64 | u128::from(self.next()),
                );
                // The text form carries the scope id but not the flow label: flow labels are
                // not part of a bound address (getsockname reports 0).
                let scope = if self.chance(2) {
                    0
                } else {
                    self.next() as u32
                };
                SocketAddr::V6(std::net::SocketAddrV6::new(ip, port, 0, scope))
            }
        }

        fn unix(&mut self) -> UnixAddr {
            if self.chance(2) {
                // Any bytes, NUL and empty included.
                UnixAddr::Abstract(self.bytes(40))
            } else {
                // A path is never empty and never holds NUL: no socket can be bound at such
                // a path, and the decoder rejects both.
                let mut p: Vec<u8> = self.bytes(60).into_iter().filter(|&b| b != 0).collect();
                if p.is_empty() {
                    p.push(b'@');
                }
                UnixAddr::Path(PathBuf::from(std::ffi::OsString::from_vec(p)))
            }
        }

        fn fd(&mut self) -> RawFd {
            match self.below(3) {
                0 => 3 + self.below(10) as RawFd,
                1 => 3 + self.below(100_000) as RawFd,
                _ => 3 + self.below(RawFd::MAX as u64 - 2) as RawFd,
            }
        }

        fn key(&mut self) -> Key {
            match self.below(13) {
                0 => Key::Ready,
                1 => Key::Parent,
                9 => Key::State,
                10 => Key::Commit,
                11 => Key::UnixSeqpacket(self.unix()),
                12 => Key::Handover,
                2 => Key::TcpListener(self.inet()),
                3 => Key::Udp(self.inet()),
                4 => Key::UnixListener(self.unix()),
                5 => Key::UnixDatagram(self.unix()),
                6 => Key::TcpStream(self.string(20)),
                7 => Key::UnixStream(self.string(20)),
                _ => Key::Fd(self.string(20)),
            }
        }

        /// A valid table: distinct fds, at most one `ready`, `parent`, `commit` and `state`.
        fn table(&mut self) -> Vec<(RawFd, Key)> {
            let mut entries: Vec<(RawFd, Key)> = Vec::new();
            for _ in 0..self.below(12) {
                let fd = self.fd();
                let key = self.key();
                let dup_fd = entries.iter().any(|(f, _)| *f == fd);
                let dup_pipe = matches!(
                    key,
                    Key::Ready | Key::Parent | Key::Commit | Key::State | Key::Handover
                ) && entries.iter().any(|(_, k)| *k == key);
                if !dup_fd && !dup_pipe {
                    entries.push((fd, key));
                }
            }
            entries
        }
    }

    /// Path equality in std ignores repeated and trailing slashes: compare the bytes.
    fn exact(key: &Key) -> Vec<u8> {
        match key {
            Key::UnixListener(UnixAddr::Path(p)) | Key::UnixDatagram(UnixAddr::Path(p)) => {
                p.as_os_str().as_bytes().to_vec()
            }
            other => format!("{other:?}").into_bytes(),
        }
    }

    #[test]
    fn any_table_round_trips() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for case in 0..5000 {
            let entries = rng.table();
            let pid = rng.next() as u32;
            let encoded = encode(entries.iter().map(|(fd, k)| (*fd, k)));
            assert!(encoded.is_ascii(), "case {case}: {encoded:?}");
            let value = with_pid(encoded, pid);
            let table = match decode(value.as_bytes(), pid) {
                Ok(Some(t)) => t,
                other => panic!("case {case}: {value:?} decoded to {other:?}"),
            };
            assert_eq!(table.pid, pid, "case {case}");
            assert_eq!(table.pairs(), entries, "case {case}: {value:?}");
            let bytes =
                |e: &[(RawFd, Key)]| e.iter().map(|(f, k)| (*f, exact(k))).collect::<Vec<_>>();
            assert_eq!(
                bytes(&table.pairs()),
                bytes(&entries),
                "case {case}: {value:?}"
            );
            // And a process with another pid ignores it.
            assert_eq!(
                decode(value.as_bytes(), pid ^ 1).unwrap(),
                None,
                "case {case}"
            );
        }
    }

    #[test]
    fn empty_keys() {
        // An empty abstract name is a name: `@` alone.
        let k = Key::UnixListener(UnixAddr::Abstract(Vec::new()));
        let s = with_pid(encode([(3, &k)]), 7);
        assert!(s.ends_with(";3,unix,@"), "{s}");
        assert_eq!(decode(s.as_bytes(), 7).unwrap().unwrap().pairs(), [(3, k)]);
        // An empty name is a name too (`add_fd("", ..)` is accepted), but a missing one is not.
        let k = Key::Fd(String::new());
        let s = with_pid(encode([(3, &k)]), 7);
        assert_eq!(decode(s.as_bytes(), 7).unwrap().unwrap().pairs(), [(3, k)]);
        let err = decode(b"tableflip1;pid=0000000007;3,fd", 7).unwrap_err();
        assert!(err.reason.contains("needs a name"), "{err:?}");
        // An empty path is no path.
        let err = decode(b"tableflip1;pid=0000000007;3,unix,", 7).unwrap_err();
        assert!(err.reason.contains("needs a path"), "{err:?}");
    }

    #[test]
    fn rejects() {
        let head = "tableflip1;pid=0000000042";
        for (tail, why) in [
            (";2,ready", "standard"),
            (";-1,ready", "non-negative"),
            (";99999999999,ready", "non-negative"),
            (";4294967296,ready", "out of range"),
            (";3,ready;3,parent", "more than once"),
            (";3,Bogus,x", "not a kind"),
            (";3,tcp,nonsense", "socket address"),
            (";3,tcp", "needs"),
            (";3,ready,x", "takes no key"),
            (";", "expected FD"),
            (";3,fd,a%zz", "percent"),
            (";3,fd,a b", "percent-encoded"),
            (";3,ready;4,ready", "more than one"),
        ] {
            let v = format!("{head}{tail}");
            let err = decode(v.as_bytes(), 42).unwrap_err();
            assert!(err.reason.contains(why), "{v}: {err:?}");
        }
        assert!(decode(b"", 1).is_err());
        assert!(decode(b"tableflip2;pid=0000000001", 1).is_err());
        assert!(decode(b"tableflip1;pid=1", 1).is_err());
        assert!(decode(&vec![b'a'; MAX_LEN + 1], 1).is_err());
    }

    #[test]
    fn the_earliest_fault_is_reported() {
        let head = "tableflip1;pid=0000000009;3,ready;4,commit;5,parent";
        let err = |tail: &str| {
            let v = format!("{head}{tail}");
            let e = decode(v.as_bytes(), 9).unwrap_err();
            (e.entry, e.reason)
        };
        // A repeated fd before a malformed entry: the repeat.
        let (entry, reason) = err(";6,fd,a;6,fd,b;7,nonsense");
        assert_eq!(
            (entry.as_str(), reason.as_str()),
            ("6,fd,b", "fd 6 appears more than once")
        );
        // A malformed entry before the repeat: the malformed one.
        let (entry, _) = err(";6,fd,a;x,fd,c;6,fd,b");
        assert_eq!(entry, "x,fd,c");
        // A second handshake entry before a repeated fd, and after.
        let (entry, reason) = err(";6,ready;6,fd,b");
        assert_eq!(
            (entry.as_str(), reason.as_str()),
            ("6,ready", "more than one ready entry")
        );
        let (entry, reason) = err(";4,fd,a;6,ready");
        assert_eq!(
            (entry.as_str(), reason.as_str()),
            ("4,fd,a", "fd 4 appears more than once")
        );
        // On the same entry, the fd.
        let (_, reason) = err(";3,ready");
        assert_eq!(reason, "fd 3 appears more than once");
    }
}
