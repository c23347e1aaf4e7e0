//! One [`UpgradeRecord`] as one line of text: `key=value` fields separated by single
//! spaces. It is the control protocol's machine-readable form (`record-v1:`, see
//! [`control`](crate::control)) and what a generation passes to the next (see
//! `sys::unix::records`). Parsed strictly: it comes from another process.
//!
//! | key | value |
//! |---|---|
//! | `pid` | [`UpgradeRecord::pid`] |
//! | `started` | [`UpgradeRecord::started`], milliseconds since the Unix epoch |
//! | `result` | `ok` (then `new`: the new generation's pid) or `error` (then `kind`, and `message`, %-escaped) |
//! | `ended`, `ready`, `probation`, `drain_ended`, `gone` | those spans, in microseconds |
//! | `handed`, `drained`, `forced` | [`handed_over`](UpgradeRecord::handed_over), [`drained`](UpgradeRecord::drained), [`force_closed`](UpgradeRecord::force_closed) |
//! | `age` | between generations only: how long ago the upgrade started, in microseconds |
//!
//! A field that is not known is left out. A reader skips keys it does not know (a later
//! release may add some) and refuses the whole line for any other fault.

use std::time::{Duration, UNIX_EPOCH};

use crate::error::clip;
use crate::status::{one_line, UpgradeFailure, UpgradeRecord, MAX_FAILURE_MESSAGE};

/// The longest line of one record, in bytes.
pub(crate) const MAX_LINE: usize = 1024;
/// The longest time a record's phase may take: ten years, in microseconds.
const MAX_SPAN_US: u64 = 10 * 366 * 24 * 3600 * 1_000_000;
/// The latest start a record may have: the year 3000, in milliseconds since the epoch.
const MAX_STARTED_MS: u64 = 32_503_680_000_000;
/// The longest error kind.
const MAX_KIND: usize = 64;

/// `record` as one line, without its `\n`. `age`: a field that says how long ago the
/// upgrade started, for the generation that receives it (in microseconds).
pub(crate) fn encode_record(record: &UpgradeRecord, age: Option<Duration>) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(160);
    let started = record
        .started
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let _ = write!(out, "pid={} started={started}", record.pid);
    match &record.result {
        Ok(pid) => {
            let _ = write!(out, " result=ok new={pid}");
        }
        Err(e) => {
            out.push_str(" result=error kind=");
            escape(&mut out, clip(&e.kind, MAX_KIND));
            out.push_str(" message=");
            escape(&mut out, &one_line(&e.message, MAX_FAILURE_MESSAGE));
        }
    }
    let _ = write!(out, " ended={}", micros(record.ended));
    let spans = [
        ("ready", record.ready),
        ("probation", record.probation),
        ("drain_ended", record.drain_ended),
        ("gone", record.gone),
        ("age", age),
    ];
    for (key, span) in spans {
        if let Some(d) = span {
            let _ = write!(out, " {key}={}", micros(d));
        }
    }
    let counts = [
        ("handed", record.handed_over),
        ("drained", record.drained),
        ("forced", record.force_closed),
    ];
    for (key, n) in counts {
        if let Some(n) = n {
            let _ = write!(out, " {key}={n}");
        }
    }
    out
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(MAX_SPAN_US as u128) as u64
}

/// Percent-encodes what is not a letter, a digit or one of `-._~:/(),`.
fn escape(out: &mut String, s: &str) {
    use std::fmt::Write;
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:/(),".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// Undoes [`escape`]: `%XX` with two hex digits, nothing else escaped, valid UTF-8.
fn unescape(s: &str) -> std::result::Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .ok_or("a bad %-escape")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| "a bad %-escape")?);
            i += 3;
        } else if b.is_ascii_alphanumeric() || b"-._~:/(),".contains(&b) {
            out.push(b);
            i += 1;
        } else {
            return Err(format!("byte {b:#04x} must be escaped"));
        }
    }
    String::from_utf8(out).map_err(|_| "not UTF-8 once unescaped".to_string())
}

/// The `key=value` fields of one line, checked for form: keys of lowercase letters and
/// `_`, each at most once, separated by single spaces.
struct Fields<'a>(Vec<(&'a str, &'a str)>);

impl<'a> Fields<'a> {
    fn split(line: &'a str) -> std::result::Result<Fields<'a>, String> {
        if line.len() > MAX_LINE {
            return Err(format!("a record longer than {MAX_LINE} bytes"));
        }
        let mut fields: Vec<(&str, &str)> = Vec::new();
        for token in line.split(' ') {
            let (key, value) = token
                .split_once('=')
                .ok_or_else(|| format!("{:?} is not key=value", clip(token, 32)))?;
            let key_ok = !key.is_empty()
                && key.len() <= 16
                && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
            if !key_ok {
                return Err(format!("bad key {:?}", clip(key, 32)));
            }
            if fields.iter().any(|(k, _)| *k == key) {
                return Err(format!("{key} twice"));
            }
            fields.push((key, value));
        }
        Ok(Fields(fields))
    }

    fn get(&self, key: &str) -> Option<&'a str> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    /// A decimal number up to `max`, if the field is there.
    fn number(&self, key: &str, max: u64) -> std::result::Result<Option<u64>, String> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let digits = !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit());
        digits
            .then(|| v.parse::<u64>().ok())
            .flatten()
            .filter(|&n| n <= max)
            .map(Some)
            .ok_or_else(|| format!("{key}={:?} is not a number up to {max}", clip(v, 32)))
    }

    fn span(&self, key: &str) -> std::result::Result<Option<Duration>, String> {
        Ok(self.number(key, MAX_SPAN_US)?.map(Duration::from_micros))
    }

    fn pid(&self, key: &str) -> std::result::Result<Option<u32>, String> {
        match self.number(key, u32::MAX as u64)? {
            Some(0) => Err(format!("{key}=0 is no pid")),
            n => Ok(n.map(|n| n as u32)),
        }
    }

    /// `result=ok new=PID`, or `result=error kind=KIND [message=TEXT]`.
    fn result(&self) -> std::result::Result<std::result::Result<u32, UpgradeFailure>, String> {
        match self.get("result") {
            Some("ok") if self.get("kind").is_some() || self.get("message").is_some() => {
                Err("a success with an error's fields".into())
            }
            Some("ok") => Ok(Ok(self.pid("new")?.ok_or("no new")?)),
            Some("error") if self.get("new").is_some() => Err("a failure with a new pid".into()),
            Some("error") => {
                let kind = unescape(self.get("kind").ok_or("no kind")?)?;
                let kind_ok = !kind.is_empty()
                    && kind.len() <= MAX_KIND
                    && kind.bytes().all(|b| b.is_ascii_alphanumeric());
                if !kind_ok {
                    return Err(format!("bad kind {:?}", clip(&kind, 32)));
                }
                let message = unescape(self.get("message").unwrap_or(""))?;
                if message.len() > MAX_FAILURE_MESSAGE || message.chars().any(char::is_control) {
                    return Err("a message over its length, or with control characters".into());
                }
                Ok(Err(UpgradeFailure { kind, message }))
            }
            Some(other) => Err(format!("result={:?}", clip(other, 32))),
            None => Err("no result".into()),
        }
    }
}

/// Parses one record's line (without its `\n`); also returns its `age` field, if any.
/// Unknown keys are skipped (a later release may add some); every known one is
/// checked, and any fault rejects the whole line.
pub(crate) fn decode_record(
    line: &str,
) -> std::result::Result<(UpgradeRecord, Option<Duration>), String> {
    let f = Fields::split(line)?;
    let started = f.number("started", MAX_STARTED_MS)?.ok_or("no started")?;
    let record = UpgradeRecord {
        pid: f.pid("pid")?.ok_or("no pid")?,
        started: UNIX_EPOCH + Duration::from_millis(started),
        result: f.result()?,
        ended: f.span("ended")?.ok_or("no ended")?,
        ready: f.span("ready")?,
        probation: f.span("probation")?,
        handed_over: f.number("handed", u64::MAX)?,
        drained: f.number("drained", u64::MAX)?,
        force_closed: f.number("forced", u64::MAX)?,
        drain_ended: f.span("drain_ended")?,
        gone: f.span("gone")?,
    };
    if record.ready.is_some_and(|r| r > record.ended)
        || record.probation.is_some_and(|p| p > record.ended)
    {
        return Err("a phase after the upgrade's end".into());
    }
    Ok((record, f.span("age")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pid: u32, result: Result<u32, UpgradeFailure>) -> UpgradeRecord {
        decode_record(&format!(
            "pid={pid} started=1767225600250 result=ok new=1 ended=13400 ready=12100 \
             probation=0 handed=3 drained=10 forced=0 drain_ended=2100000 gone=2200000"
        ))
        .map(|(mut r, _)| {
            r.result = result;
            r
        })
        .unwrap()
    }

    #[test]
    fn records_round_trip_as_lines() {
        let failure = UpgradeFailure {
            kind: "ChildFailed".into(),
            message: "gave up: config line 12 = \"x\" 100% é".into(),
        };
        for r in [record(4242, Ok(4250)), record(4242, Err(failure))] {
            let line = encode_record(&r, None);
            assert!(!line.contains('\n') && line.len() <= MAX_LINE, "{line}");
            assert_eq!(decode_record(&line), Ok((r, None)));
        }
        let line = encode_record(&record(1, Ok(2)), Some(Duration::from_micros(7)));
        assert_eq!(
            decode_record(&line).unwrap().1,
            Some(Duration::from_micros(7))
        );
    }

    #[test]
    fn bad_lines_are_refused() {
        let good = encode_record(&record(4242, Ok(4250)), None);
        let bad = [
            String::new(),
            "pid=1".into(),
            good.replace("result=ok", "result=error"),
            good.replace("new=4250", "new=4250 kind=X"),
            good.replace("pid=4242", "pid=4242 pid=4242"),
            good.replace("pid=4242", "pid=4294967296"),
            good.replace("ended=13400", "ended=1"),
            good.replace("ended=13400", "ended=+13400"),
            good.replace("ended=13400", "ended=999999999999999999999"),
            good.replace("started=1767225600250", "started=99999999999999999"),
            good.replace("handed=3", "handed=18446744073709551616"),
            good.replace(' ', "  "),
            good.replace("pid=", "PID="),
            format!("{good} {}", "x".repeat(MAX_LINE)),
            "pid=1 started=1 result=error kind=Bad%20Kind ended=1".into(),
            format!(
                "pid=1 started=1 result=error kind=X message={} ended=1",
                "a".repeat(MAX_FAILURE_MESSAGE + 1)
            ),
        ];
        for line in &bad {
            assert!(decode_record(line).is_err(), "{line:?}");
        }
    }
}
