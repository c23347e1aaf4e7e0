//! The fd table's wire format: how the fds passed to a new generation are described in
//! its environment.
//!
//! ```text
//! TABLEFLIP_FDS=tableflip1;pid=0000012345;3,ready;4,commit;5,parent;6,tcp,127.0.0.1:8080;7,unix,/run/app.sock
//! ```
//!
//! * `tableflip1` names the format and its version; any other value is rejected.
//! * `pid=` is followed by exactly ten decimal digits: the pid of the process the table is
//!   for. The spawning code writes it into the child's copy of the variable between fork
//!   and exec. A process whose pid differs (a grandchild that merely inherited the
//!   variable) ignores the table and starts fresh, like systemd's `LISTEN_PID`.
//! * Then one `;`-separated entry per fd: `FD,KIND[,KEY]`. `FD` is a decimal fd number
//!   (3 or more, each at most once). `KIND` is one of `ready`, `parent`, `commit` (the
//!   handshake pipes, no key), `state` (the handed-over state, no key), `tcp`, `udp` (key: a socket address), `unix`, `unixgram` (key: a path,
//!   or `@` and an abstract name), `tcpconn`, `unixconn`, `fd` (key: a name).
//! * A `unix` or `unixgram` entry with a path may carry a fourth field, `DEV:INO`: the
//!   device and inode of the socket file the previous generation bound or checked. Only
//!   a file with that identity is ever unlinked.
//! * Keys are percent-encoded: every byte outside `A-Z a-z 0-9 - . _ ~ / : [ ]` is
//!   written as `%XX`, so paths may hold `;`, `,`, `%`, `@` or non-UTF-8 bytes.
//! * The same key may appear more than once (a group of sockets on one address); their
//!   order is kept.

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::io::RawFd;
use std::path::PathBuf;

use crate::error::clip;

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

/// The address of a Unix domain socket: a filesystem path or (Linux) an abstract name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum UnixAddr {
    /// A path in the filesystem. Relative paths are relative to the working directory
    /// at the time the socket is bound.
    Path(PathBuf),
    /// A Linux abstract socket name (without the leading NUL byte).
    Abstract(Vec<u8>),
}

impl UnixAddr {
    /// An abstract socket name (Linux only; binding fails elsewhere).
    pub fn abstract_name(name: impl AsRef<[u8]>) -> Self {
        UnixAddr::Abstract(name.as_ref().to_vec())
    }
}

impl From<&std::path::Path> for UnixAddr {
    fn from(path: &std::path::Path) -> Self {
        UnixAddr::Path(path.to_path_buf())
    }
}

impl From<PathBuf> for UnixAddr {
    fn from(path: PathBuf) -> Self {
        UnixAddr::Path(path)
    }
}

impl From<&PathBuf> for UnixAddr {
    fn from(path: &PathBuf) -> Self {
        UnixAddr::Path(path.clone())
    }
}

impl From<&str> for UnixAddr {
    fn from(path: &str) -> Self {
        UnixAddr::Path(PathBuf::from(path))
    }
}

impl From<String> for UnixAddr {
    fn from(path: String) -> Self {
        UnixAddr::Path(PathBuf::from(path))
    }
}

impl fmt::Display for UnixAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnixAddr::Path(p) => write!(f, "{}", p.display()),
            UnixAddr::Abstract(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
        }
    }
}

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
    TcpListener(SocketAddr),
    Udp(SocketAddr),
    UnixListener(UnixAddr),
    UnixDatagram(UnixAddr),
    TcpStream(String),
    UnixStream(String),
    Fd(String),
}

impl Key {
    pub(crate) fn tag(&self) -> &'static str {
        match self {
            Key::Ready => "ready",
            Key::Parent => "parent",
            Key::Commit => "commit",
            Key::State => "state",
            Key::TcpListener(_) => "tcp",
            Key::Udp(_) => "udp",
            Key::UnixListener(_) => "unix",
            Key::UnixDatagram(_) => "unixgram",
            Key::TcpStream(_) => "tcpconn",
            Key::UnixStream(_) => "unixconn",
            Key::Fd(_) => "fd",
        }
    }

    /// A human name for the kind, for error messages.
    pub(crate) fn kind_name(&self) -> &'static str {
        match self {
            Key::Ready => "readiness pipe",
            Key::Parent => "parent pipe",
            Key::Commit => "commit pipe",
            Key::State => "state handoff",
            Key::TcpListener(_) => "TCP listener",
            Key::Udp(_) => "UDP socket",
            Key::UnixListener(_) => "Unix listener",
            Key::UnixDatagram(_) => "Unix datagram socket",
            Key::TcpStream(_) => "TCP connection",
            Key::UnixStream(_) => "Unix connection",
            Key::Fd(_) => "file descriptor",
        }
    }
}

impl Key {
    /// The address, path or name alone (empty for the handshake entries).
    pub(crate) fn key_text(&self) -> String {
        match self {
            Key::Ready | Key::Parent | Key::Commit | Key::State => String::new(),
            Key::TcpListener(a) | Key::Udp(a) => a.to_string(),
            Key::UnixListener(a) | Key::UnixDatagram(a) => a.to_string(),
            Key::TcpStream(n) | Key::UnixStream(n) | Key::Fd(n) => n.clone(),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = self.kind_name();
        match self {
            Key::Ready | Key::Parent | Key::Commit | Key::State => f.write_str(kind),
            Key::TcpListener(a) | Key::Udp(a) => write!(f, "{kind} {a}"),
            Key::UnixListener(a) | Key::UnixDatagram(a) => write!(f, "{kind} {a}"),
            Key::TcpStream(n) | Key::UnixStream(n) | Key::Fd(n) => write!(f, "{kind} {n:?}"),
        }
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/' | b':' | b'[' | b']')
}

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

/// Encodes a table. The pid slot holds zeros; the spawner fills it in.
#[cfg(test)]
pub(crate) fn encode<'a>(entries: impl IntoIterator<Item = (RawFd, &'a Key)>) -> String {
    encode_with_ids(entries.into_iter().map(|(fd, key)| (fd, key, None)))
}

/// Encodes a table, with the identity of the socket file of Unix sockets bound to a path
/// where it is known. The pid slot holds zeros; the spawner fills it in.
pub(crate) fn encode_with_ids<'a>(
    entries: impl IntoIterator<Item = (RawFd, &'a Key, Option<FileId>)>,
) -> String {
    let mut out = String::with_capacity(64);
    out.push_str(MAGIC);
    out.push_str(PID_PREFIX);
    out.extend(std::iter::repeat('0').take(PID_WIDTH));
    for (fd, key, id) in entries {
        out.push(';');
        let _ = write!(out, "{fd}");
        out.push(',');
        out.push_str(key.tag());
        match key {
            Key::Ready | Key::Parent | Key::Commit | Key::State => {}
            Key::TcpListener(a) | Key::Udp(a) => {
                out.push(',');
                escape_into(&mut out, a.to_string().as_bytes());
            }
            Key::UnixListener(a) | Key::UnixDatagram(a) => {
                out.push(',');
                match a {
                    UnixAddr::Path(p) => {
                        escape_into(&mut out, p.as_os_str().as_bytes());
                        if let Some((dev, ino)) = id {
                            let _ = write!(out, ",{dev}:{ino}");
                        }
                    }
                    UnixAddr::Abstract(name) => {
                        out.push('@');
                        escape_into(&mut out, name);
                    }
                }
            }
            Key::TcpStream(n) | Key::UnixStream(n) | Key::Fd(n) => {
                out.push(',');
                escape_into(&mut out, n.as_bytes());
            }
        }
    }
    out
}

/// A decoded table.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Table {
    pub(crate) pid: u32,
    pub(crate) entries: Vec<(RawFd, Key)>,
    /// The socket-file identity given for Unix sockets bound to a path, by fd.
    pub(crate) file_ids: std::collections::HashMap<RawFd, FileId>,
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
    let mut parts = value.split(';');
    let magic = parts.next().unwrap_or_default();
    if magic != MAGIC {
        return Err(bad(magic, format!("unknown format (expected {MAGIC:?})")));
    }
    let pid_field = parts.next().unwrap_or_default();
    let digits = pid_field
        .strip_prefix("pid=")
        .filter(|d| d.len() == PID_WIDTH && d.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| bad(pid_field, "expected pid= and ten digits"))?;
    let pid: u32 = digits
        .parse()
        .map_err(|_| bad(pid_field, "pid out of range"))?;
    if pid != my_pid {
        return Ok(None);
    }
    let n = value.bytes().filter(|&b| b == b';').count();
    let mut entries: Vec<(RawFd, Key)> = Vec::with_capacity(n);
    let mut file_ids = std::collections::HashMap::new();
    let mut seen = std::collections::HashSet::with_capacity(n);
    for entry in parts {
        let (fd, key, id) = decode_entry(entry)?;
        if let Some(id) = id {
            file_ids.insert(fd, id);
        }
        if !seen.insert(fd) {
            return Err(bad(entry, format!("fd {fd} appears more than once")));
        }
        if matches!(key, Key::Ready | Key::Parent | Key::Commit | Key::State)
            && entries.iter().any(|(_, k)| *k == key)
        {
            return Err(bad(entry, format!("more than one {} entry", key.tag())));
        }
        entries.push((fd, key));
    }
    Ok(Some(Table {
        pid,
        entries,
        file_ids,
    }))
}

fn decode_entry(entry: &str) -> Result<(RawFd, Key, Option<FileId>), DecodeError> {
    // Keys are percent-encoded, so a raw `,` only ever separates fields.
    let mut fields = entry.splitn(4, ',');
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
        "tcp" => Key::TcpListener(f.sockaddr()?),
        "udp" => Key::Udp(f.sockaddr()?),
        "unix" => Key::UnixListener(f.unix()?),
        "unixgram" => Key::UnixDatagram(f.unix()?),
        "tcpconn" => Key::TcpStream(f.name()?),
        "unixconn" => Key::UnixStream(f.name()?),
        "fd" => Key::Fd(f.name()?),
        // The kind is quoted in the reason: only its start, so the reason stays short.
        _ => return Err(bad(entry, format!("unknown kind {:?}", clip(tag, 16)))),
    };
    let id = match (fields.next(), &key) {
        (None, _) => None,
        (
            Some(extra),
            Key::UnixListener(UnixAddr::Path(_)) | Key::UnixDatagram(UnixAddr::Path(_)),
        ) => Some(file_id(extra).ok_or_else(|| bad(entry, "expected the socket file as DEV:INO"))?),
        (Some(_), _) => return Err(bad(entry, format!("{tag} takes no fourth field"))),
    };
    Ok((fd, key, id))
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
        let s = encode_with_ids([(3, &path, Some((64769, 1234))), (4, &tcp, Some((1, 2)))]);
        assert!(
            s.ends_with(";3,unix,/run/a%2Cb.sock,64769:1234;4,tcp,127.0.0.1:1"),
            "{s}"
        );
        let s = s.replace("pid=0000000000", "pid=0000000009");
        let t = decode(s.as_bytes(), 9).unwrap().unwrap();
        assert_eq!(t.file_ids.get(&3), Some(&(64769, 1234)));
        assert_eq!(t.file_ids.len(), 1);
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
        assert_eq!(t.entries, keys);
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
            match self.below(11) {
                0 => Key::Ready,
                1 => Key::Parent,
                9 => Key::State,
                10 => Key::Commit,
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
                let dup_pipe = matches!(key, Key::Ready | Key::Parent | Key::Commit | Key::State)
                    && entries.iter().any(|(_, k)| *k == key);
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
            assert_eq!(table.entries, entries, "case {case}: {value:?}");
            let bytes =
                |e: &[(RawFd, Key)]| e.iter().map(|(f, k)| (*f, exact(k))).collect::<Vec<_>>();
            assert_eq!(
                bytes(&table.entries),
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
        assert_eq!(decode(s.as_bytes(), 7).unwrap().unwrap().entries, [(3, k)]);
        // An empty name is a name too (`add_fd("", ..)` is accepted), but a missing one is not.
        let k = Key::Fd(String::new());
        let s = with_pid(encode([(3, &k)]), 7);
        assert_eq!(decode(s.as_bytes(), 7).unwrap().unwrap().entries, [(3, k)]);
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
            (";3,bogus,x", "unknown kind"),
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
}
