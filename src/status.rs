//! What a generation reports about itself: [`Upgrader::status`](crate::Upgrader::status),
//! or a control socket's `status` command.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[cfg(unix)]
use crate::error::Result;

/// What a generation says about itself: [`Upgrader::status`](crate::Upgrader::status), or a control socket's
/// `status` command ([`status`](crate::control::status)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// The generation's pid.
    pub pid: u32,
    /// Whether it is ready and in charge: [`ready`](crate::Upgrader::ready) has returned, and
    /// it has neither handed over nor stopped.
    pub ready: bool,
    /// Whether an upgrade is running now.
    pub upgrading: bool,
    /// The pid of the generation whose upgrade started this one, if one did. `None` for
    /// a first start, and for a generation that a keeper or systemd started again.
    pub started_by: Option<u32>,
    /// The last [`MAX_RECORDS`] upgrades, oldest first: those this generation ran, after
    /// those its predecessors ran (the one that started this generation among them),
    /// each passed on at every upgrade. Refused attempts (`UpgradeInProgress`,
    /// `NotReady`, `ParentAlive`, ...) are not recorded.
    pub upgrades: Vec<UpgradeRecord>,
}

/// How many [upgrade records](UpgradeRecord) a generation keeps and passes on.
pub const MAX_RECORDS: usize = 8;

impl Status {
    /// The last upgrade this generation ran, if it ran one: the last of
    /// [`upgrades`](Status::upgrades) whose [`pid`](UpgradeRecord::pid) is this
    /// generation's.
    pub fn last_upgrade(&self) -> Option<&UpgradeRecord> {
        self.upgrades.iter().rev().find(|r| r.pid == self.pid)
    }
}

/// One upgrade: how long each phase took, what became of the connections, and how it
/// ended. A generation records each upgrade it runs, and passes its records on at
/// every upgrade, so that the one serving now can say what the last few cost
/// ([`Status::upgrades`], the control socket's `status`).
///
/// The phases are measured from [`started`](UpgradeRecord::started) with a monotonic
/// clock; a phase not reached, or not known to the generation reporting, is `None`. The
/// old generation knows the handshake (ready, probation, the commit) and what its
/// [handover](crate::handover) and its [drain](crate::Drain) reported; it tells the new
/// generation when its drain ends ([`Drain::finish`](crate::Drain::finish), or
/// [`Upgrader::stop`](crate::Upgrader::stop) with what it knows then). Only the new
/// generation learns when the old one is [gone](UpgradeRecord::gone).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UpgradeRecord {
    /// The generation that ran the upgrade (the old one).
    pub pid: u32,
    /// When it started the new generation (to the millisecond).
    pub started: SystemTime,
    /// The new generation's pid, or why the upgrade failed.
    pub result: std::result::Result<u32, UpgradeFailure>,
    /// From the start until [`upgrade`](crate::Upgrader::upgrade) returned: for a success,
    /// until the new generation confirmed the commit (and systemd, if any, read it).
    pub ended: Duration,
    /// From the start until the new generation reported ready.
    pub ready: Option<Duration>,
    /// How long the new generation was kept on [probation](crate::Options::probation)
    /// once ready (zero without one): until the commit began.
    pub probation: Option<Duration>,
    /// How many connections the new generation took over through the
    /// [handover channel](crate::handover) (accepted, or left to it at the deadline):
    /// what [`Sender::finish`](crate::handover::Sender::finish) reported.
    pub handed_over: Option<u64>,
    /// How many connections the old generation finished serving while it drained, as
    /// its application reported ([`Drain::finish`](crate::Drain::finish)).
    pub drained: Option<u64>,
    /// How many connections the old generation cut at its drain deadline, as its
    /// application reported ([`Drain::finish`](crate::Drain::finish)).
    pub force_closed: Option<u64>,
    /// From the start until the old generation's drain ended.
    pub drain_ended: Option<Duration>,
    /// From the start until the new generation saw the old one gone (every thread of it
    /// exited). It looks while it waits in [`Upgrader::incoming`](crate::Upgrader::incoming)
    /// or [`Exit::wait_readable`](crate::Exit::wait_readable), in
    /// [`Upgrader::wait_for_parent`](crate::Upgrader::wait_for_parent), and when asked
    /// for its [status](crate::Upgrader::status): a generation that does none of these
    /// for a while notes it late.
    pub gone: Option<Duration>,
}

/// Why an upgrade failed, as text that survives a trip over the control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UpgradeFailure {
    /// The name of the [`Error`](crate::Error) variant (`ChildFailed`, `Timeout`, ...).
    pub kind: String,
    /// The error's message (with the OS error behind it, if any), on one line, cut to
    /// [`MAX_FAILURE_MESSAGE`] bytes in a record.
    pub message: String,
}

/// The longest failure message an [`UpgradeRecord`] keeps, in bytes (the error itself,
/// as [`upgrade`](crate::Upgrader::upgrade) returns it, is whole).
pub const MAX_FAILURE_MESSAGE: usize = 256;

impl UpgradeRecord {
    /// The record of an upgrade by this process that started at `started` and ends now
    /// (`ended` after it) with `result`.
    #[cfg(unix)]
    pub(crate) fn of(started: SystemTime, ended: Duration, result: &Result<u32>) -> UpgradeRecord {
        UpgradeRecord {
            pid: std::process::id(),
            started: to_millis(started),
            result: match result {
                Ok(pid) => Ok(*pid),
                Err(e) => Err(UpgradeFailure {
                    kind: e.kind_name().to_string(),
                    message: one_line(&e.to_string(), MAX_FAILURE_MESSAGE),
                }),
            },
            ended,
            ready: None,
            probation: None,
            handed_over: None,
            drained: None,
            force_closed: None,
            drain_ended: None,
            gone: None,
        }
    }

    /// The record of an upgrade by `pid` of which only the end and the result are known
    /// (from a control server older than the records).
    #[cfg(all(unix, feature = "control"))]
    pub(crate) fn ended_at(
        pid: u32,
        ended: SystemTime,
        result: std::result::Result<u32, UpgradeFailure>,
    ) -> UpgradeRecord {
        UpgradeRecord {
            pid,
            started: ended,
            result,
            ended: Duration::ZERO,
            ready: None,
            probation: None,
            handed_over: None,
            drained: None,
            force_closed: None,
            drain_ended: None,
            gone: None,
        }
    }

    /// Whether `other` is a record of the same upgrade.
    #[cfg(unix)]
    pub(crate) fn same_upgrade(&self, other: &UpgradeRecord) -> bool {
        self.pid == other.pid && self.started == other.started
    }
}

/// `t` to the millisecond, as records keep it.
#[cfg(unix)]
pub(crate) fn to_millis(t: SystemTime) -> SystemTime {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    UNIX_EPOCH + Duration::from_millis(since.as_millis().min(u64::MAX as u128) as u64)
}

/// `s` on one line (control characters as spaces), at most `max` bytes.
pub(crate) fn one_line(s: &str, max: usize) -> String {
    crate::error::clip(s, max)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl fmt::Display for Status {
    /// One line for a log: `pid 4250, ready, started by an upgrade from pid 4242, last
    /// upgrade: ok (pid 4260)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {}", self.pid)?;
        f.write_str(if self.ready { ", ready" } else { ", not ready" })?;
        if self.upgrading {
            f.write_str(", upgrading")?;
        }
        if let Some(pid) = self.started_by {
            write!(f, ", started by an upgrade from pid {pid}")?;
        }
        match self.last_upgrade().map(|l| &l.result) {
            None if self.started_by.is_some() => f.write_str(", no upgrade since"),
            None => f.write_str(", no upgrade yet"),
            Some(Ok(pid)) => write!(f, ", last upgrade: ok (pid {pid})"),
            Some(Err(e)) => write!(f, ", last upgrade failed: {} ({})", e.message, e.kind),
        }
    }
}

impl fmt::Display for UpgradeRecord {
    /// One line for a log: `upgrade 4242 -> 4250: ready after 12.1ms, probation 0ns,
    /// committed after 13.4ms; 3 handed over, 10 drained, 0 force-closed; drain ended
    /// after 2.1s; pid 4242 gone after 2.2s`. What is not known is left out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.result {
            Ok(pid) => write!(f, "upgrade {} -> {pid}: ", self.pid)?,
            Err(_) => write!(f, "upgrade by {} failed: ", self.pid)?,
        }
        if let Some(d) = self.ready {
            write!(f, "ready after {d:.1?}, ")?;
        }
        if let Some(d) = self.probation {
            write!(f, "probation {d:.1?}, ")?;
        }
        match &self.result {
            Ok(_) => write!(f, "committed after {:.1?}", self.ended)?,
            Err(e) => write!(f, "{} after {:.1?}: {}", e.kind, self.ended, e.message)?,
        }
        let counts = [
            (self.handed_over, "handed over"),
            (self.drained, "drained"),
            (self.force_closed, "force-closed"),
        ];
        let mut first = true;
        for (n, what) in counts {
            if let Some(n) = n {
                f.write_str(if first { "; " } else { ", " })?;
                write!(f, "{n} {what}")?;
                first = false;
            }
        }
        if let Some(d) = self.drain_ended {
            write!(f, "; drain ended after {d:.1?}")?;
        }
        if let Some(d) = self.gone {
            write!(f, "; pid {} gone after {d:.1?}", self.pid)?;
        }
        Ok(())
    }
}

// ---- The records' text form ----------------------------------------------------------
//
// One line per record, `key=value` fields separated by single spaces: the machine-readable
// form of the control protocol (`record-v1:`) and what a generation passes to the next.
// Parsed strictly: it comes from another process.

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
            escape(&mut out, crate::error::clip(&e.kind, MAX_KIND));
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

/// Parses one record's line (without its `\n`); also returns its `age` field, if any.
/// Unknown keys are skipped (a later release may add some); every known one is
/// checked, and any fault rejects the whole line.
pub(crate) fn decode_record(
    line: &str,
) -> std::result::Result<(UpgradeRecord, Option<Duration>), String> {
    if line.len() > MAX_LINE {
        return Err(format!("a record longer than {MAX_LINE} bytes"));
    }
    let mut seen: Vec<&str> = Vec::new();
    let mut fields: Vec<(&str, &str)> = Vec::new();
    for token in line.split(' ') {
        let (key, value) = token
            .split_once('=')
            .ok_or_else(|| format!("{:?} is not key=value", crate::error::clip(token, 32)))?;
        let key_ok = !key.is_empty()
            && key.len() <= 16
            && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
        if !key_ok {
            return Err(format!("bad key {:?}", crate::error::clip(key, 32)));
        }
        if seen.contains(&key) {
            return Err(format!("{key} twice"));
        }
        seen.push(key);
        fields.push((key, value));
    }
    let get = |key: &str| fields.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let number = |key: &str, max: u64| -> std::result::Result<Option<u64>, String> {
        let Some(v) = get(key) else { return Ok(None) };
        let n = (!v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit()))
            .then(|| v.parse::<u64>().ok())
            .flatten()
            .filter(|&n| n <= max)
            .ok_or_else(|| {
                format!(
                    "{key}={:?} is not a number up to {max}",
                    crate::error::clip(v, 32)
                )
            })?;
        Ok(Some(n))
    };
    let span = |key: &str| -> std::result::Result<Option<Duration>, String> {
        Ok(number(key, MAX_SPAN_US)?.map(Duration::from_micros))
    };
    let pid_of = |key: &str| -> std::result::Result<Option<u32>, String> {
        match number(key, u32::MAX as u64)? {
            Some(0) => Err(format!("{key}=0 is no pid")),
            n => Ok(n.map(|n| n as u32)),
        }
    };
    let required = |key: &str| format!("no {key}");
    let pid = pid_of("pid")?.ok_or_else(|| required("pid"))?;
    let started = number("started", MAX_STARTED_MS)?.ok_or_else(|| required("started"))?;
    let result = match get("result") {
        Some("ok") => {
            if get("kind").is_some() || get("message").is_some() {
                return Err("a success with an error's fields".into());
            }
            Ok(pid_of("new")?.ok_or_else(|| required("new"))?)
        }
        Some("error") => {
            if get("new").is_some() {
                return Err("a failure with a new pid".into());
            }
            let kind = unescape(get("kind").ok_or_else(|| required("kind"))?)?;
            if kind.is_empty()
                || kind.len() > MAX_KIND
                || !kind.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                return Err(format!("bad kind {:?}", crate::error::clip(&kind, 32)));
            }
            let message = unescape(get("message").unwrap_or(""))?;
            if message.len() > MAX_FAILURE_MESSAGE || message.chars().any(char::is_control) {
                return Err("a message over its length, or with control characters".into());
            }
            Err(UpgradeFailure { kind, message })
        }
        Some(other) => return Err(format!("result={:?}", crate::error::clip(other, 32))),
        None => return Err(required("result")),
    };
    let record = UpgradeRecord {
        pid,
        started: UNIX_EPOCH + Duration::from_millis(started),
        result,
        ended: span("ended")?.ok_or_else(|| required("ended"))?,
        ready: span("ready")?,
        probation: span("probation")?,
        handed_over: number("handed", u64::MAX)?,
        drained: number("drained", u64::MAX)?,
        force_closed: number("forced", u64::MAX)?,
        drain_ended: span("drain_ended")?,
        gone: span("gone")?,
    };
    if record.ready.is_some_and(|r| r > record.ended)
        || record.probation.is_some_and(|p| p > record.ended)
    {
        return Err("a phase after the upgrade's end".into());
    }
    Ok((record, span("age")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pid: u32, result: std::result::Result<u32, UpgradeFailure>) -> UpgradeRecord {
        UpgradeRecord {
            pid,
            started: UNIX_EPOCH + Duration::from_millis(1_767_225_600_250),
            result,
            ended: Duration::from_micros(13_400),
            ready: Some(Duration::from_micros(12_100)),
            probation: Some(Duration::ZERO),
            handed_over: Some(3),
            drained: Some(10),
            force_closed: Some(0),
            drain_ended: Some(Duration::from_millis(2100)),
            gone: Some(Duration::from_millis(2200)),
        }
    }

    fn status(
        started_by: Option<u32>,
        last: Option<std::result::Result<u32, UpgradeFailure>>,
    ) -> Status {
        Status {
            pid: 4250,
            ready: true,
            upgrading: false,
            started_by,
            upgrades: last
                .map(|result| record(4250, result))
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn says_which_upgrade_started_the_generation() {
        assert_eq!(
            status(None, None).to_string(),
            "pid 4250, ready, no upgrade yet"
        );
        assert_eq!(
            status(Some(4242), None).to_string(),
            "pid 4250, ready, started by an upgrade from pid 4242, no upgrade since"
        );
        assert_eq!(
            status(Some(4242), Some(Ok(4260))).to_string(),
            "pid 4250, ready, started by an upgrade from pid 4242, last upgrade: ok (pid 4260)"
        );
        // The record of the upgrade that started it is not its own.
        let mut s = status(Some(4242), None);
        s.upgrades.push(record(4242, Ok(4250)));
        assert_eq!(s.last_upgrade(), None);
    }

    #[test]
    fn a_record_reads_as_one_line() {
        assert_eq!(
            record(4242, Ok(4250)).to_string(),
            "upgrade 4242 -> 4250: ready after 12.1ms, probation 0.0ns, committed after \
             13.4ms; 3 handed over, 10 drained, 0 force-closed; drain ended after 2.1s; pid \
             4242 gone after 2.2s"
        );
        let failed = UpgradeRecord {
            ready: None,
            probation: None,
            handed_over: None,
            drained: None,
            force_closed: None,
            drain_ended: None,
            gone: None,
            ..record(
                4242,
                Err(UpgradeFailure {
                    kind: "ChildExited".into(),
                    message: "exit status: 3".into(),
                }),
            )
        };
        assert_eq!(
            failed.to_string(),
            "upgrade by 4242 failed: ChildExited after 13.4ms: exit status: 3"
        );
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
