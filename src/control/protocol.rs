//! The protocol's requests and answers, as bytes.

use super::*;
use std::os::unix::io::OwnedFd;
use std::time::UNIX_EPOCH;

use crate::error::{clip, Result};
use crate::sys::os;

// ---- Requests and answers --------------------------------------------------------------

/// The key of an upgrade record's line (one per record, oldest first). The version is
/// the key's: a format an older client would misread gets a key of its own.
pub(super) const RECORD: &str = "record-v1";

/// The protocol's own error kinds (the others are [`Error`] variant names).
pub(super) const BAD_REQUEST: &str = "BadRequest";
pub(super) const UNSUPPORTED_VERSION: &str = "UnsupportedVersion";
pub(super) const UNKNOWN_COMMAND: &str = "UnknownCommand";
pub(super) const REQUEST_TIMEOUT: &str = "RequestTimeout";
pub(super) const PERMISSION_DENIED: &str = "PermissionDenied";
pub(super) const EXITING: &str = "Exiting";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Command {
    Upgrade,
    Status,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Parsed {
    /// No complete line yet.
    Partial,
    Done(Command),
    Bad(&'static str, String),
}

/// Parses what a client has sent so far.
pub(super) fn parse(buf: &[u8]) -> Parsed {
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        return unfinished(buf);
    };
    if end >= MAX_REQUEST {
        return too_long();
    }
    let line = &buf[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(line) = std::str::from_utf8(line) else {
        return Parsed::Bad(BAD_REQUEST, "the request is not UTF-8".into());
    };
    request(line)
}

/// A request whose line has not ended yet: [`Parsed::Partial`] while it can still
/// become one.
fn unfinished(buf: &[u8]) -> Parsed {
    if buf.len() >= MAX_REQUEST {
        return too_long();
    }
    // Garbage is refused as soon as it cannot be the start of a request.
    let n = buf.len().min(PROTOCOL.len());
    if buf[..n] != PROTOCOL[..n] {
        return Parsed::Bad(BAD_REQUEST, not_the_protocol());
    }
    Parsed::Partial
}

fn too_long() -> Parsed {
    Parsed::Bad(
        BAD_REQUEST,
        format!("request longer than {MAX_REQUEST} bytes"),
    )
}

/// The words of a request line: the version, then one command, then nothing.
fn request(line: &str) -> Parsed {
    let mut words = line.split(' ');
    let version = words.next().unwrap_or("");
    if version != VERSION {
        return if version.as_bytes().starts_with(PROTOCOL) {
            Parsed::Bad(
                UNSUPPORTED_VERSION,
                format!(
                    "{:?} is not supported; this server speaks {VERSION}",
                    clip(version, 32)
                ),
            )
        } else {
            Parsed::Bad(BAD_REQUEST, not_the_protocol())
        };
    }
    let command = match words.next() {
        Some("upgrade") => Command::Upgrade,
        Some("status") => Command::Status,
        Some("") | None => return Parsed::Bad(BAD_REQUEST, "no command".into()),
        Some(other) => {
            return Parsed::Bad(
                UNKNOWN_COMMAND,
                format!(
                    "unknown command {:?}; the commands are upgrade and status",
                    clip(other, 32)
                ),
            )
        }
    };
    if words.next().is_some() {
        return Parsed::Bad(BAD_REQUEST, "the commands take no arguments".into());
    }
    Parsed::Done(command)
}

pub(super) fn not_the_protocol() -> String {
    format!("not a control request; send one line: {VERSION} upgrade|status")
}

/// An answer: `ok` or `error KIND`, then its fields.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Answer {
    /// `None` for `ok`, else the error kind.
    pub(super) error: Option<String>,
    pub(super) fields: Vec<(String, String)>,
}

impl Answer {
    pub(super) fn ok(fields: Vec<(&str, String)>) -> Answer {
        Answer {
            error: None,
            fields: fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        }
    }

    pub(super) fn error(kind: &str, message: &str) -> Answer {
        Answer {
            error: Some(kind.to_string()),
            fields: vec![("message".to_string(), message.to_string())],
        }
    }

    pub(super) fn field(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `key`, in order: a key may come more than once (`record-v1`).
    pub(super) fn fields_named<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.fields
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = String::with_capacity(128);
        out.push_str(VERSION);
        match &self.error {
            None => out.push_str(" ok\n"),
            Some(kind) => {
                out.push_str(" error ");
                out.push_str(&one_line(kind));
                out.push('\n');
            }
        }
        for (key, value) in &self.fields {
            out.push_str(key);
            out.push_str(": ");
            out.push_str(&one_line(value));
            out.push('\n');
        }
        out.push('\n');
        out.into_bytes()
    }

    /// Parses a whole answer (up to and including its empty line).
    pub(super) fn decode(bytes: &[u8]) -> std::result::Result<Answer, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "the answer is not UTF-8".to_string())?;
        // The empty line that ends the answer.
        let Some(end) = text.find("\n\n") else {
            return Err("the answer was cut off".into());
        };
        let mut lines = text[..end].split('\n');
        let first = lines.next().unwrap_or("");
        let Some(status) = first
            .strip_prefix(VERSION)
            .and_then(|rest| rest.strip_prefix(' '))
        else {
            return Err(format!("not a {VERSION} answer: {:?}", clip(first, 64)));
        };
        let error = match status {
            "ok" => None,
            _ => match status.strip_prefix("error ") {
                Some(kind) if !kind.is_empty() => Some(kind.to_string()),
                _ => return Err(format!("bad status line {:?}", clip(first, 64))),
            },
        };
        let mut fields = Vec::new();
        for line in lines {
            let Some((key, value)) = line.split_once(": ") else {
                return Err(format!("bad line {:?}", clip(line, 64)));
            };
            fields.push((key.to_string(), value.to_string()));
        }
        Ok(Answer { error, fields })
    }
}

/// `value` on one line: control characters become spaces; at most [`MAX_VALUE`] bytes.
pub(super) fn one_line(value: &str) -> String {
    crate::status::one_line(value, MAX_VALUE)
}

pub(super) fn upgrade_answer(result: &Result<u32>) -> Answer {
    match result {
        Ok(pid) => Answer::ok(vec![("pid", pid.to_string())]),
        Err(e) => Answer::error(e.kind_name(), &e.to_string()),
    }
}

pub(super) fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

pub(super) fn status_answer(status: &Status) -> Answer {
    let mut fields = vec![
        ("pid", status.pid.to_string()),
        ("ready", yes_no(status.ready)),
        ("upgrading", yes_no(status.upgrading)),
    ];
    if let Some(pid) = status.started_by {
        fields.push(("started-by", pid.to_string()));
    }
    match status.last_upgrade() {
        None => fields.push(("last-upgrade", "none".into())),
        Some(last) => {
            match &last.result {
                Ok(pid) => {
                    fields.push(("last-upgrade", "ok".into()));
                    fields.push(("last-upgrade-pid", pid.to_string()));
                }
                Err(f) => {
                    fields.push(("last-upgrade", format!("error {}", f.kind)));
                    fields.push(("last-upgrade-message", f.message.clone()));
                }
            }
            let ended = last.started + last.ended;
            let since = ended.duration_since(UNIX_EPOCH).unwrap_or_default();
            fields.push((
                "last-upgrade-ended",
                format!("{}.{:03}", since.as_secs(), since.subsec_millis()),
            ));
        }
    }
    for record in &status.upgrades {
        fields.push((RECORD, crate::record_line::encode_record(record, None)));
    }
    Answer::ok(fields)
}

/// Sends an answer and closes the connection. Best effort: the client may be gone, and
/// a client that does not read is not waited for (the socket is non-blocking, and an
/// answer fits in its buffer many times over).
pub(super) fn reply(conn: &OwnedFd, answer: &Answer) {
    let _ = os::send_all(conn, &answer.encode());
}

#[cfg(test)]
mod tests {
    use super::super::client::{parse_status, parse_time};
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(
            parse(b"tableflip-control/1 upgrade\n"),
            Parsed::Done(Command::Upgrade)
        );
        assert_eq!(
            parse(b"tableflip-control/1 status\r\n"),
            Parsed::Done(Command::Status)
        );
        assert_eq!(parse(b"tableflip-con"), Parsed::Partial);
        assert_eq!(parse(b""), Parsed::Partial);
        let bad = |input: &[u8]| match parse(input) {
            Parsed::Bad(kind, _) => kind,
            other => panic!("{input:?}: {other:?}"),
        };
        assert_eq!(bad(b"GET / HTTP/1.1"), BAD_REQUEST);
        assert_eq!(bad(b"\x00\xff"), BAD_REQUEST);
        assert_eq!(bad(b"tableflip-control/2 upgrade\n"), UNSUPPORTED_VERSION);
        assert_eq!(bad(b"tableflip-control/1 reboot\n"), UNKNOWN_COMMAND);
        assert_eq!(bad(b"tableflip-control/1\n"), BAD_REQUEST);
        assert_eq!(bad(b"tableflip-control/1 upgrade now\n"), BAD_REQUEST);
        assert_eq!(bad(b"tableflip-control/1 \xff\n"), BAD_REQUEST);
        let mut long = b"tableflip-control/1 ".to_vec();
        long.resize(MAX_REQUEST, b'x');
        assert_eq!(bad(&long), BAD_REQUEST);
        long.push(b'\n');
        assert_eq!(bad(&long), BAD_REQUEST);
    }

    #[test]
    fn answers_round_trip_on_one_line_each() {
        let a = Answer::error("ChildFailed", "gave up:\nline two\r\tend");
        let bytes = a.encode();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert_eq!(
            text,
            "tableflip-control/1 error ChildFailed\nmessage: gave up: line two  end\n\n"
        );
        let back = Answer::decode(&bytes).unwrap();
        assert_eq!(back.error.as_deref(), Some("ChildFailed"));
        assert_eq!(back.field("message"), Some("gave up: line two  end"));

        let long = "é".repeat(MAX_VALUE);
        let a = Answer::ok(vec![("pid", "7".into()), ("x", long)]);
        let back = Answer::decode(&a.encode()).unwrap();
        assert_eq!(back.field("pid"), Some("7"));
        assert!(back.field("x").unwrap().len() <= MAX_VALUE);

        assert!(Answer::decode(b"tableflip-control/1 ok\npid: 7\n").is_err());
        assert!(Answer::decode(b"HTTP/1.1 200 OK\n\n").is_err());
        assert!(Answer::decode(b"tableflip-control/1 error \n\n").is_err());
    }

    fn record(pid: u32, result: std::result::Result<u32, UpgradeFailure>) -> UpgradeRecord {
        let mut r = crate::record_line::decode_record(&format!(
            "pid={pid} started=1767225600250 result=ok new=1 ended=13400 ready=12100 \
             probation=0 handed=3 drained=10 forced=0 drain_ended=2100000 gone=2200000"
        ))
        .unwrap()
        .0;
        r.result = result;
        r
    }

    #[test]
    fn status_round_trips() {
        let failed = record(
            42,
            Err(UpgradeFailure {
                kind: "ChildExited".into(),
                message: "exit status: 3".into(),
            }),
        );
        let status = Status {
            pid: 42,
            ready: true,
            upgrading: false,
            started_by: Some(41),
            upgrades: vec![record(41, Ok(42)), failed],
        };
        let answer = Answer::decode(&status_answer(&status).encode()).unwrap();
        assert_eq!(answer.field("started-by"), Some("41"));
        // What an older client reads.
        assert_eq!(answer.field("last-upgrade"), Some("error ChildExited"));
        assert_eq!(answer.field("last-upgrade-ended"), Some("1767225600.263"));
        assert_eq!(answer.fields_named(RECORD).count(), 2);
        assert_eq!(parse_status(&answer), Ok(status));
        assert_eq!(
            parse_time("1767225600.250"),
            Some(UNIX_EPOCH + Duration::from_millis(1_767_225_600_250))
        );
    }

    #[test]
    fn an_older_servers_status_gives_its_last_upgrade() {
        let text = "tableflip-control/1 ok\npid: 42\nready: yes\nupgrading: no\n\
                    last-upgrade: ok\nlast-upgrade-pid: 43\nlast-upgrade-ended: 1767225600.250\n\n";
        let status = parse_status(&Answer::decode(text.as_bytes()).unwrap()).unwrap();
        let last = status.last_upgrade().unwrap();
        assert_eq!(last.result, Ok(43));
        assert_eq!(
            last.started,
            UNIX_EPOCH + Duration::from_millis(1_767_225_600_250)
        );
    }

    #[test]
    fn a_bad_record_fails_the_status() {
        let good = crate::record_line::encode_record(&record(41, Ok(42)), None);
        for bad in [
            good.replace("pid=41", "pid=x"),
            format!("{good} age=5"),
            good.replace(' ', "\t"),
        ] {
            let text = format!("tableflip-control/1 ok\npid: 42\n{RECORD}: {bad}\n\n");
            let answer = Answer::decode(text.as_bytes()).unwrap();
            assert!(parse_status(&answer).is_err(), "{bad}");
        }
        let many = format!("{RECORD}: {good}\n").repeat(crate::status::MAX_RECORDS + 1);
        let text = format!("tableflip-control/1 ok\npid: 42\n{many}\n");
        assert!(parse_status(&Answer::decode(text.as_bytes()).unwrap()).is_err());
    }
}
