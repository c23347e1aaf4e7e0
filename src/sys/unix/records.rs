//! The upgrade records a generation keeps ([`UpgradeRecord`]), and how they travel.
//!
//! Each upgrade is recorded by the generation that runs it: its phases (measured from
//! its start with `Instant`), and, once it succeeded, what its handover channel and its
//! application's drain report. The records travel on the `commit` pipe of the handshake
//! (see [`handshake`](crate::sys::handshake)), which the old generation keeps open after
//! the commit:
//!
//! | when | what the old generation writes | the new generation |
//! |---|---|---|
//! | the commit | `C`, then the records it keeps and the current upgrade's (with its `age`), in the same write | reads them with the `C`, in the same read |
//! | its drain ends ([`Drain::finish`](crate::Drain::finish), or `stop()`) | the current upgrade's record again, with the counts, then closes the pipe | reads it when it next looks |
//! | it exits | | sees its lifeline close: the record's `gone` |
//!
//! Both writes are at most [`MAX_PAYLOAD`] bytes, a header line that gives the length
//! first: on Linux, a write of up to `PIPE_BUF` (4096) bytes to a pipe is atomic, so
//! the reader has all of it at once. What arrives is parsed strictly (see
//! [`decode_record`]): a payload with any fault is ignored as a whole, with one line on
//! stderr, and the upgrade goes on without records. The old generation's times are
//! carried as spans from the upgrade's start; the new generation places that start on
//! its own clock from the `age` it was given (the pipe takes microseconds), so no clock
//! is shared between the two.
//!
//! On the upgrade's path this costs no system call: the `C` write and read carry the
//! records, and the new generation looks at its predecessor (one `poll` of two fds, and
//! a read once something is there) only when asked for its status, when it waits for
//! its parent, or inside the `poll` its accept loop does anyway.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::record_line::{decode_record, encode_record};
use crate::status::{UpgradeRecord, MAX_RECORDS};
use crate::sys::os;

/// The first word of a payload of records, and its version.
const HEADER: &str = "tableflip-records/1";
/// The most bytes one payload takes, the commit's `C` included: Linux's `PIPE_BUF`.
pub(crate) const MAX_PAYLOAD: usize = 4096;
/// How long the new generation waits for the rest of a payload whose first part came
/// (never on Linux: the write is atomic).
const REST_WAIT: Duration = Duration::from_millis(50);

/// The clock of one upgrade: when it began, on both clocks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    pub(crate) start: Instant,
    pub(crate) started: SystemTime,
}

impl Clock {
    pub(crate) fn now() -> Clock {
        Clock {
            start: Instant::now(),
            started: SystemTime::now(),
        }
    }
}

/// What a generation keeps of the upgrades: the last [`MAX_RECORDS`], and what it still
/// has to learn or to tell about the two that concern it.
#[derive(Debug)]
pub(crate) struct Records {
    inner: Mutex<Inner>,
    /// The previous generation's lifeline (EOF once it has exited), while its `gone` is
    /// to be noted: polled next to the listeners by the accept loop.
    lifeline: Option<Arc<OwnedFd>>,
    /// Set while the previous generation's end is to be noted.
    watching: AtomicBool,
    /// Set once there is nothing more to learn about the previous generation: no system
    /// call to look.
    settled: AtomicBool,
}

#[derive(Debug, Default)]
struct Inner {
    list: VecDeque<UpgradeRecord>,
    previous: Option<Previous>,
    next: Option<Next>,
}

/// The upgrade that started this generation, while its report or its end is awaited.
#[derive(Debug)]
struct Previous {
    /// Its start on this process's clock.
    start: Instant,
    /// Its record, as received (to find it in the list).
    key: UpgradeRecord,
    /// The read end of the `commit` pipe, until the report (or EOF) has been read.
    report: Option<Arc<OwnedFd>>,
    /// Whether the previous generation has been seen gone.
    gone: bool,
}

/// This generation's own successful upgrade, until its report is sent.
#[derive(Debug)]
struct Next {
    clock: Clock,
    key: UpgradeRecord,
    /// The write end of the `commit` pipe.
    pipe: Option<OwnedFd>,
}

/// What a new generation learnt with the commit: the records, the last one its own
/// upgrade's, and how long ago that began.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Received {
    pub(crate) records: Vec<UpgradeRecord>,
    pub(crate) age: Duration,
}

impl Records {
    /// No record yet; `lifeline`: the previous generation's, if any.
    pub(crate) fn new(lifeline: Option<Arc<OwnedFd>>) -> Records {
        Records {
            inner: Mutex::new(Inner::default()),
            lifeline,
            watching: AtomicBool::new(false),
            settled: AtomicBool::new(true),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The new generation takes over with what came with the commit: the records, and
    /// the `commit` pipe, on which the old generation's report follows.
    pub(crate) fn adopt(&self, received: Received, report: Arc<OwnedFd>) {
        let mut inner = self.lock();
        let Some(own) = received.records.last().cloned() else {
            return;
        };
        let start = Instant::now()
            .checked_sub(received.age)
            .unwrap_or_else(Instant::now);
        inner.list = received.records.into();
        inner.previous = Some(Previous {
            start,
            key: own,
            report: Some(report),
            gone: false,
        });
        self.settled.store(false, Ordering::SeqCst);
        self.watching
            .store(self.lifeline.is_some(), Ordering::SeqCst);
    }

    /// This generation has taken over: its own upgrade's record says when.
    pub(crate) fn took_over(&self) {
        let mut inner = self.lock();
        let Inner { list, previous, .. } = &mut *inner;
        if let Some(p) = previous {
            if let Some(r) = find(list, &p.key) {
                r.ended = r.ended.max(p.start.elapsed());
            }
        }
    }

    /// The lifeline to poll, while the previous generation's end is to be noted.
    pub(crate) fn lifeline(&self) -> Option<BorrowedFd<'_>> {
        if !self.watching.load(Ordering::SeqCst) {
            return None;
        }
        self.lifeline.as_ref().map(|l| l.as_fd())
    }

    /// The previous generation was seen gone (its lifeline closed) by someone waiting on
    /// it: noted now, with its report if it sent one.
    pub(crate) fn parent_gone(&self) {
        if !self.settled.load(Ordering::SeqCst) {
            self.look_with(true);
        }
    }

    /// Looks, without waiting, for what the previous generation reported and whether it
    /// is gone, while something is still to learn.
    pub(crate) fn look(&self) {
        if !self.settled.load(Ordering::SeqCst) {
            self.look_with(false);
        }
    }

    fn look_with(&self, gone: bool) {
        let mut inner = self.lock();
        let Inner { list, previous, .. } = &mut *inner;
        let Some(p) = previous else { return };
        let now = Some(Instant::now());
        let gone = gone
            || self
                .lifeline
                .as_ref()
                .is_some_and(|l| matches!(os::readable(l.as_fd(), now), Ok(true)));
        // A report is written before the old generation exits: read it first.
        if let Some(pipe) = &p.report {
            if matches!(os::readable(pipe.as_fd(), now), Ok(true)) {
                let from = p.key.pid;
                match read_payload(pipe.as_fd(), 0).and_then(|b| decode_report(&b, &p.key)) {
                    Ok(Some(report)) => {
                        if let Some(r) = find(list, &p.key) {
                            merge_report(r, &report);
                        }
                    }
                    Ok(None) => {}
                    Err(why) => ignored(from, "report", &why),
                }
                p.report = None;
            }
        }
        if gone && !p.gone {
            p.gone = true;
            let after = p.start.elapsed();
            if let Some(r) = find(list, &p.key) {
                r.gone = Some(after);
            }
            self.watching.store(false, Ordering::SeqCst);
        }
        if p.gone && p.report.is_none() {
            *previous = None;
            self.settled.store(true, Ordering::SeqCst);
        }
    }

    /// The records, oldest first, once looked for news.
    pub(crate) fn list(&self) -> Vec<UpgradeRecord> {
        self.look();
        self.lock().list.iter().cloned().collect()
    }

    /// Records an upgrade this generation ran.
    pub(crate) fn push(&self, record: UpgradeRecord) {
        let mut inner = self.lock();
        inner.list.push_back(record);
        while inner.list.len() > MAX_RECORDS {
            inner.list.pop_front();
        }
    }

    /// The commit's payload: `C`, the records kept, and `current` (the upgrade being
    /// committed, as the new generation will take it), which began at `clock`. Older
    /// records are left out when they do not fit in [`MAX_PAYLOAD`].
    pub(crate) fn commit_payload(
        &self,
        commit: u8,
        current: &UpgradeRecord,
        clock: &Clock,
    ) -> Vec<u8> {
        let inner = self.lock();
        let last = encode_record(current, Some(clock.start.elapsed()));
        let mut lines: Vec<String> = vec![last];
        let mut len = lines[0].len() + 1;
        let room = MAX_PAYLOAD - 1 - (HEADER.len() + 6);
        for r in inner.list.iter().rev().take(MAX_RECORDS - 1) {
            let line = encode_record(r, None);
            if len + line.len() + 1 > room {
                break;
            }
            len += line.len() + 1;
            lines.push(line);
        }
        lines.reverse();
        let mut out = Vec::with_capacity(1 + HEADER.len() + 6 + len);
        out.push(commit);
        push_payload(&mut out, &lines);
        out
    }

    /// The upgrade began at `clock` and succeeded: `pipe` is where its report goes.
    pub(crate) fn succeeded(&self, clock: Clock, record: &UpgradeRecord, pipe: OwnedFd) {
        self.lock().next = Some(Next {
            clock,
            key: record.clone(),
            pipe: Some(pipe),
        });
    }

    /// The handover channel of this generation's upgrade settled: `n` connections went.
    pub(crate) fn handed_over(&self, n: u64) {
        self.update_next(|r, _| r.handed_over = Some(r.handed_over.unwrap_or(0) + n));
    }

    /// This generation's drain ended: `drained` connections finished, `forced` cut. The
    /// new generation is told (once).
    pub(crate) fn drained(&self, drained: u64, forced: u64) {
        self.update_next(|r, clock| {
            r.drained = Some(drained);
            r.force_closed = Some(forced);
            r.drain_ended = Some(clock.start.elapsed());
        });
        self.send_report();
    }

    fn update_next(&self, f: impl FnOnce(&mut UpgradeRecord, &Clock)) {
        let mut inner = self.lock();
        let Inner { list, next, .. } = &mut *inner;
        if let Some(n) = next {
            if let Some(r) = find(list, &n.key) {
                f(r, &n.clock);
            }
        }
    }

    /// Tells the new generation what this one knows of its upgrade, and closes the pipe:
    /// at the drain's end, or at `stop()` with what is known then. Best effort: the new
    /// generation may be gone.
    pub(crate) fn send_report(&self) {
        let mut inner = self.lock();
        let Inner { list, next, .. } = &mut *inner;
        let Some(n) = next else { return };
        let Some(pipe) = n.pipe.take() else { return };
        let Some(r) = find(list, &n.key) else { return };
        let mut out = Vec::with_capacity(256);
        push_payload(&mut out, &[encode_record(r, None)]);
        let _ = os::write_all(&pipe, &out);
    }
}

/// The record in `list` of the same upgrade as `key`.
fn find<'a>(
    list: &'a mut VecDeque<UpgradeRecord>,
    key: &UpgradeRecord,
) -> Option<&'a mut UpgradeRecord> {
    list.iter_mut().rev().find(|r| r.same_upgrade(key))
}

/// `HEADER LEN\n`, then each line with its `\n` (`LEN` counts those bytes).
fn push_payload(out: &mut Vec<u8>, lines: &[String]) {
    let len: usize = lines.iter().map(|l| l.len() + 1).sum();
    out.extend_from_slice(format!("{HEADER} {len}\n").as_bytes());
    for line in lines {
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
}

/// Reads one payload from `fd` (readable), after `prefix` bytes that the caller's
/// protocol puts first (the commit's `C`): what one read gives, and the rest of a payload
/// whose header says more follows, for at most [`REST_WAIT`]. Empty at EOF.
pub(crate) fn read_payload(fd: BorrowedFd<'_>, prefix: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; MAX_PAYLOAD];
    let mut len = os::read(fd, &mut buf).map_err(|e| format!("read: {e}"))?;
    let deadline = Some(Instant::now() + REST_WAIT);
    while len > prefix
        && len < buf.len()
        && expected(&buf[prefix..len]).is_some_and(|want| prefix + want > len)
    {
        if !matches!(os::readable(fd, deadline), Ok(true)) {
            break;
        }
        match os::read(fd, &mut buf[len..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => len += n,
        }
    }
    buf.truncate(len);
    Ok(buf)
}

/// The whole payload's length, from its header line, once that line is there.
fn expected(bytes: &[u8]) -> Option<usize> {
    let end = bytes.iter().position(|&b| b == b'\n')?;
    let header = std::str::from_utf8(&bytes[..end]).ok()?;
    let len: usize = header
        .strip_prefix(HEADER)?
        .strip_prefix(' ')?
        .parse()
        .ok()?;
    Some(end + 1 + len)
}

/// One record of a payload, with its `age` if it has one.
type Line = (UpgradeRecord, Option<Duration>);

/// Parses a payload: its header, and one record per line. `Ok(None)`: nothing (an older
/// release sends nothing after its `C`); any fault rejects the whole payload.
fn decode_payload(bytes: &[u8]) -> Result<Option<Vec<Line>>, String> {
    if bytes.is_empty() {
        return Ok(None);
    }
    if bytes.len() > MAX_PAYLOAD {
        return Err(format!("more than {MAX_PAYLOAD} bytes"));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let (header, rest) = text.split_once('\n').ok_or("no header line")?;
    let len = header
        .strip_prefix(HEADER)
        .and_then(|h| h.strip_prefix(' '))
        .ok_or_else(|| format!("not {HEADER}: {:?}", crate::error::clip(header, 40)))?;
    let len: usize = (!len.is_empty() && len.len() <= 5 && len.bytes().all(|b| b.is_ascii_digit()))
        .then(|| len.parse().ok())
        .flatten()
        .ok_or("a bad length")?;
    if rest.len() != len {
        return Err(format!("{} bytes where the header says {len}", rest.len()));
    }
    let body = rest.strip_suffix('\n').ok_or("no final newline")?;
    if body.is_empty() {
        return Err("no record".into());
    }
    let records: Vec<_> = body
        .split('\n')
        .map(decode_record)
        .collect::<Result<_, _>>()?;
    if records.len() > MAX_RECORDS {
        return Err(format!("more than {MAX_RECORDS} records"));
    }
    Ok(Some(records))
}

/// The records that came with the commit, from the generation `parent` to this one,
/// `me`. The last is this upgrade's: by `parent`, a success naming `me`, with its age;
/// no other record has an age. `Ok(None)`: none came.
pub(crate) fn decode_commit(
    bytes: &[u8],
    parent: u32,
    me: u32,
) -> Result<Option<Received>, String> {
    let Some(records) = decode_payload(bytes)? else {
        return Ok(None);
    };
    let n = records.len();
    let mut age = None;
    let mut out = Vec::with_capacity(n);
    for (i, (record, a)) in records.into_iter().enumerate() {
        if i + 1 < n && a.is_some() {
            return Err("an age on an older record".into());
        }
        if i + 1 == n {
            if record.pid != parent || record.result != Ok(me) {
                return Err(format!(
                    "the last record is not the upgrade from pid {parent} to pid {me}"
                ));
            }
            age = Some(a.ok_or("no age on this upgrade's record")?);
        }
        out.push(record);
    }
    let age = age.ok_or("no record")?;
    if age > out[n - 1].ended + Duration::from_secs(3600) {
        return Err("an age past the upgrade's end".into());
    }
    Ok(Some(Received { records: out, age }))
}

/// The old generation's report: one record, of the upgrade `key`.
fn decode_report(bytes: &[u8], key: &UpgradeRecord) -> Result<Option<UpgradeRecord>, String> {
    let Some(mut records) = decode_payload(bytes)? else {
        return Ok(None);
    };
    if records.len() != 1 || records[0].1.is_some() {
        return Err("not one record without an age".into());
    }
    let (record, _) = records.remove(0);
    if !record.same_upgrade(key) || record.result != key.result {
        return Err("a record of another upgrade".into());
    }
    Ok(Some(record))
}

/// What only the old generation knows, from its report, into this generation's record.
fn merge_report(into: &mut UpgradeRecord, report: &UpgradeRecord) {
    into.ended = report.ended;
    into.ready = report.ready;
    into.probation = report.probation;
    into.handed_over = report.handed_over;
    into.drained = report.drained;
    into.force_closed = report.force_closed;
    into.drain_ended = report.drain_ended;
}

/// Says on stderr that what `pid` sent is not believed, in one write.
pub(crate) fn ignored(pid: u32, what: &str, why: &str) {
    let line = format!(
        "tableflip: ignored the upgrade records' {what} from pid {pid}: {}\n",
        crate::error::clip(why, 200)
    );
    let _ = io::Write::write_all(&mut io::stderr().lock(), line.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::UpgradeFailure;
    use std::time::UNIX_EPOCH;

    fn record(pid: u32, result: Result<u32, UpgradeFailure>) -> UpgradeRecord {
        UpgradeRecord {
            pid,
            started: UNIX_EPOCH + Duration::from_millis(1_767_225_600_250),
            result,
            ended: Duration::from_millis(13),
            ready: Some(Duration::from_millis(12)),
            probation: Some(Duration::ZERO),
            handed_over: None,
            drained: None,
            force_closed: None,
            drain_ended: None,
            gone: None,
        }
    }

    fn failure() -> UpgradeFailure {
        UpgradeFailure {
            kind: "ChildExited".into(),
            message: "new generation (pid 7) exited: exit status: 3 100% = done".into(),
        }
    }

    #[test]
    fn a_commit_payload_round_trips() {
        let records = Records::new(None);
        records.push(record(40, Err(failure())));
        records.push(record(40, Ok(41)));
        let clock = Clock::now();
        let current = record(41, Ok(42));
        let payload = records.commit_payload(b'C', &current, &clock);
        assert_eq!(payload[0], b'C');
        assert!(payload.len() <= MAX_PAYLOAD);
        let got = decode_commit(&payload[1..], 41, 42).unwrap().unwrap();
        assert_eq!(got.records.len(), 3);
        assert_eq!(got.records[0].result, Err(failure()));
        assert_eq!(got.records[2], current);
        assert!(got.age < Duration::from_secs(5));
        // Addressed to another pair of generations: refused.
        assert!(decode_commit(&payload[1..], 41, 43).is_err());
        assert!(decode_commit(&payload[1..], 40, 42).is_err());
        // Nothing after the `C`: an older release.
        assert_eq!(decode_commit(b"", 41, 42), Ok(None));
    }

    #[test]
    fn a_full_history_is_cut_to_fit() {
        let records = Records::new(None);
        let long = UpgradeFailure {
            kind: "ChildFailed".into(),
            message: "\u{7f}%".repeat(100),
        };
        for _ in 0..20 {
            records.push(record(40, Err(long.clone())));
        }
        assert_eq!(records.list().len(), MAX_RECORDS);
        let payload = records.commit_payload(b'C', &record(40, Ok(41)), &Clock::now());
        assert!(payload.len() <= MAX_PAYLOAD, "{}", payload.len());
        let got = decode_commit(&payload[1..], 40, 41).unwrap().unwrap();
        assert!(got.records.len() < MAX_RECORDS, "{}", got.records.len());
        assert_eq!(got.records.last().unwrap().result, Ok(41));
    }

    #[test]
    fn bad_payloads_are_refused_whole() {
        let line = encode_record(&record(41, Ok(42)), Some(Duration::from_millis(20)));
        let good = format!("{HEADER} {}\n{line}\n", line.len() + 1);
        assert!(decode_commit(good.as_bytes(), 41, 42).unwrap().is_some());
        let bad = [
            format!("{HEADER} 9999\n{line}\n"),
            format!("tableflip-records/2 {}\n{line}\n", line.len() + 1),
            format!("{HEADER} {}\n{line}", line.len()),
            format!("{HEADER} 1\n\n"),
            format!("{HEADER} {}\n{line}\n{line}\n", 2 * line.len() + 2),
            format!(
                "{HEADER} {}\n{}\n",
                line.len() + 1 + 6,
                line.replace("new=42", "new=42 new=42")
            ),
            format!(
                "{HEADER} {}\n{}\n",
                line.len() + 1 + 3,
                line.replace("ready=", "ready=999")
            ),
            format!(
                "{HEADER} {}\n{}\n",
                line.len() + 1,
                line.replace("pid=41", "pid=-1")
            ),
            format!(
                "{HEADER} {}\n{}\n",
                line.len(),
                line.replace("pid=41", "pid=0")
            ),
            format!(
                "{HEADER} {}\n{}\n",
                line.len() + 1,
                line.replace("result=ok", "result=ko")
            ),
            format!(
                "{HEADER} {}\n{}\n",
                line.len() + 1 + 12,
                line.replace("age=", "age=99999999999999")
            ),
            "\u{0}garbage".to_string(),
            format!("{HEADER} {}\n{}\n", line.len() + 1, line.replace(' ', "\t")),
        ];
        for b in &bad {
            assert!(decode_commit(b.as_bytes(), 41, 42).is_err(), "{b:?}");
        }
        assert!(decode_commit(&vec![b'x'; MAX_PAYLOAD + 1], 41, 42).is_err());
        let unescaped = "pid=41 started=1 result=error kind=ChildExited message=a b ended=1";
        assert!(decode_record(unescaped).is_err());
        let bad_escape = "pid=41 started=1 result=error kind=X message=%zz ended=1";
        assert!(decode_record(bad_escape).is_err());
        let not_utf8 = "pid=41 started=1 result=error kind=X message=%FF ended=1";
        assert!(decode_record(not_utf8).is_err());
        let control = "pid=41 started=1 result=error kind=X message=%0A ended=1";
        assert!(decode_record(control).is_err());
        // A later release's field: skipped.
        let later = "pid=41 started=1 result=ok new=42 ended=1 shiny=yes";
        assert!(decode_record(later).is_ok());
    }

    #[test]
    fn a_report_fills_in_what_the_old_generation_knew() {
        let (rd, wr) = os::pipe().unwrap();
        let old = Records::new(None);
        let clock = Clock::now();
        let mut current = record(41, Ok(42));
        old.push(current.clone());
        old.succeeded(clock, &current, wr);
        old.handed_over(3);
        old.drained(10, 1);
        old.drained(99, 99); // once only
        let new = Records::new(None);
        new.adopt(
            Received {
                records: vec![current.clone()],
                age: Duration::from_millis(5),
            },
            Arc::new(rd),
        );
        new.look();
        let got = new.list();
        current.handed_over = Some(3);
        current.drained = Some(10);
        current.force_closed = Some(1);
        assert!(got[0].drain_ended.is_some());
        current.drain_ended = got[0].drain_ended;
        assert_eq!(got[0], current);
    }
}
