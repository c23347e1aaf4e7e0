//! Handing established connections to the new generation, with real generations (this
//! test binary, started again), real TCP clients on loopback and real kills.
//!
//! Every generation runs [`generation`]: a line server. A connection's state is the
//! number of lines it has answered; each line `L` is answered `pid=P n=N line=L`. When
//! an upgrade succeeds, the old generation hands every connection over with the bytes
//! of an unfinished line (`unread`) and its count (`state`); the new one accepts them
//! and carries on. The clients check, line by line, that the count never skips or
//! repeats and that once the new generation has answered, the old one never does
//! again: a connection served by two generations, or one whose state was lost, shows.
//!
//! What a generation does is chosen by words in files of the run's directory: `next`
//! (read by a generation when it starts) and `sender` (read by the old generation when
//! it hands over). See [`generation`].

mod util;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tableflip::handover::{Receiver, Stream};
use tableflip::{Error, Options, Upgrader};
use util::{signal, wait_gone, Run};

/// The tag of the state this program hands over: a line count, 8 bytes.
const TAG: u32 = 0x4c49_4e31; // "LIN1"

/// Not a test: the body of every generation (see [`generation`]).
#[test]
#[ignore = "entry point of the processes the other tests start"]
fn scenario_entry() {
    if std::env::var_os("TF_SCENARIO").is_some() {
        generation();
    }
}

// ---------------------------------------------------------------------------------------
// A generation.
// ---------------------------------------------------------------------------------------

fn say(msg: impl AsRef<str>) {
    let line = format!("\n@@ {} {}\n", std::process::id(), msg.as_ref());
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

fn describe(e: &Error) -> String {
    format!(
        "kind={} msg={}",
        util::kind(e),
        e.to_string().replace(' ', "_")
    )
}

/// Ends this process as a kill would: no destructor, no flush, no goodbye.
fn die() -> ! {
    say("dying");
    // SAFETY: kill(2) of this process with SIGKILL; nothing runs after it.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    unreachable!("SIGKILL")
}

/// Sets the soft fd limit; returns the one before.
fn set_nofile(soft: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct on our stack.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        let before = lim.rlim_cur;
        lim.rlim_cur = soft as libc::rlim_t;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        before
    }
}

/// The words of a file in the run's directory.
struct Words(Vec<String>);

impl Words {
    fn read(path: &Path) -> Words {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        Words(text.split_whitespace().map(String::from).collect())
    }

    fn has(&self, w: &str) -> bool {
        self.0.iter().any(|x| x == w)
    }

    fn arg(&self, w: &str) -> Option<u64> {
        let i = self.0.iter().position(|x| x == w)?;
        self.0.get(i + 1)?.parse().ok()
    }
}

/// One connection being served.
struct Conn {
    stream: TcpStream,
    /// Read, not yet a whole line.
    buf: Vec<u8>,
    /// Lines answered so far on this connection, by every generation.
    n: u64,
}

impl Conn {
    fn new(stream: TcpStream, buf: Vec<u8>, n: u64) -> Conn {
        stream.set_nonblocking(true).unwrap();
        Conn { stream, buf, n }
    }

    /// Answers every whole line in the buffer.
    fn answer(&mut self) -> std::io::Result<()> {
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            self.n += 1;
            let text = String::from_utf8_lossy(&line[..end]);
            let reply = format!("pid={} n={} line={text}\n", std::process::id(), self.n);
            self.stream.write_all(reply.as_bytes())?;
        }
        Ok(())
    }

    /// Reads what is there and answers; `false` once the connection is over.
    fn serve(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return false,
            }
        }
        self.answer().is_ok()
    }
}

/// What a generation serves: its listener until it is told to exit, the connections,
/// and the connections handed to it.
struct Server {
    conns: HashMap<RawFd, Conn>,
    rx: Option<Receiver>,
    words: Words,
    accepted: u64,
    first_incoming: Option<Instant>,
    /// Not before this (`recv-delay`).
    recv_from: Instant,
}

impl Server {
    /// Until this generation should exit.
    fn run(&mut self, upg: &Upgrader, listener: &std::net::TcpListener) {
        loop {
            let rx_ready = Instant::now() >= self.recv_from;
            let mut fds: Vec<libc::pollfd> = vec![upg.exit().as_raw_fd(), listener.as_raw_fd()]
                .into_iter()
                .chain(
                    self.rx
                        .as_ref()
                        .filter(|_| rx_ready)
                        .map(|r| r.as_fd().as_raw_fd()),
                )
                .chain(self.conns.keys().copied())
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: a valid, exclusively borrowed array of pollfd.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, 50) };
            if fds[0].revents != 0 {
                return;
            }
            if fds[1].revents != 0 {
                while let Ok((s, _)) = listener.accept() {
                    self.conns
                        .insert(s.as_raw_fd(), Conn::new(s, Vec::new(), 0));
                }
            }
            if rx_ready && self.rx.is_some() {
                self.receive();
            }
            self.serve_ready(&fds);
        }
    }

    fn serve_ready(&mut self, fds: &[libc::pollfd]) {
        for p in fds.iter().filter(|p| p.revents != 0) {
            if let Some(c) = self.conns.get_mut(&p.fd) {
                if !c.serve() {
                    self.conns.remove(&p.fd);
                }
            }
        }
    }

    /// Takes what the previous generation hands over.
    fn receive(&mut self) {
        let Some(rx) = self.rx.as_mut() else { return };
        loop {
            match rx.recv() {
                Ok(Some(incoming)) => {
                    self.first_incoming.get_or_insert_with(Instant::now);
                    if self.words.has("recv-die-before-ack") {
                        die();
                    }
                    if self.words.has("refuse-all") {
                        let _ = incoming.refuse();
                        continue;
                    }
                    let id = incoming.id();
                    match incoming.accept() {
                        Ok((stream, unread, state)) => {
                            let Stream::Tcp(s) = stream else {
                                panic!("not TCP")
                            };
                            let n = u64::from_le_bytes(state[..8].try_into().unwrap());
                            let mut c = Conn::new(s, unread, n);
                            let _ = c.answer();
                            self.conns.insert(c.stream.as_raw_fd(), c);
                            self.accepted += 1;
                            if self.words.arg("recv-die-after") == Some(self.accepted) {
                                die();
                            }
                        }
                        Err(e) => say(format!("accept-error id={id} {}", describe(&e))),
                    }
                    if let Some(ms) = self.words.arg("recv-slow") {
                        std::thread::sleep(Duration::from_millis(ms));
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    say(format!("rx-error {}", describe(&e)));
                    if matches!(
                        e,
                        Error::HandoverEnded { .. } | Error::HandoverUnavailable { .. }
                    ) {
                        self.rx = None;
                        break;
                    }
                }
            }
        }
        let us = self.first_incoming.map_or(0, |t| t.elapsed().as_micros());
        say(format!("received accepted={} us={us}", self.accepted));
    }

    /// The old generation, upgraded: hands its connections over, and keeps what comes
    /// back.
    fn hand_over(&mut self, upg: &Upgrader, w: &Words) {
        let sender = match upg.handover() {
            Ok(s) => s,
            Err(e) => return say(format!("handover-error {}", describe(&e))),
        };
        // (Lowered only while it hands over: poll(2) takes no more fds than the limit.)
        let restore = w.arg("nofile").map(set_nofile);
        let start = Instant::now();
        let count = self.conns.len();
        for (_, c) in self.conns.drain() {
            let port = c.stream.peer_addr().map_or(0, |a| a.port());
            match sender.send(c.stream, &c.buf, TAG, &c.n.to_le_bytes()) {
                Ok(id) => say(format!("sent id={id} port={port}")),
                Err(e) => say(format!("send-error port={port} {}", describe(&e))),
            }
            if w.has("flush-each") {
                let _ = sender.flush();
            }
        }
        let _ = sender.flush();
        say(format!(
            "sent-all count={count} us={}",
            start.elapsed().as_micros()
        ));
        if w.has("die-after-send") {
            die();
        }
        if let Some(k) = w.arg("die-after-answers") {
            let deadline = Instant::now() + Duration::from_secs(20);
            while count - sender.outstanding() < k as usize && Instant::now() < deadline {
                let _ = sender.answers();
                std::thread::sleep(Duration::from_millis(1));
            }
            die();
        }
        let deadline = Duration::from_millis(w.arg("deadline").unwrap_or(10_000));
        let done = sender.finish(deadline).unwrap();
        if let Some(old) = restore {
            set_nofile(old);
        }
        let lost: Vec<String> = done.lost.iter().map(u64::to_string).collect();
        // What the upgrade's record says went: the accepted and the given.
        let recorded = upg.status().last_upgrade().and_then(|r| r.handed_over);
        say(format!(
            "finished accepted={} returned={} given={} lost={} errors={} recorded={} us={}",
            done.accepted,
            done.returned.len(),
            done.given,
            lost.join(","),
            done.errors.len(),
            recorded.map_or("none".into(), |n| n.to_string()),
            start.elapsed().as_micros()
        ));
        say(format!("report {}", done.to_string().replace(' ', "_")));
        for back in done.returned {
            say(format!(
                "returned id={} {}",
                back.id,
                describe(&back.reason)
            ));
            let Stream::Tcp(s) = back.stream else {
                panic!("not TCP")
            };
            let n = u64::from_le_bytes(back.state[..8].try_into().unwrap());
            let mut c = Conn::new(s, back.unread, n);
            let _ = c.answer();
            self.conns.insert(c.stream.as_raw_fd(), c);
        }
    }

    /// Serves what it still has until every connection is closed or `drain` passes.
    fn drain(&mut self, drain: Duration) {
        let deadline = Instant::now() + drain;
        while !self.conns.is_empty() && Instant::now() < deadline {
            let mut fds: Vec<libc::pollfd> = self
                .conns
                .keys()
                .map(|&fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: a valid, exclusively borrowed array of pollfd.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, 50) };
            self.serve_ready(&fds);
        }
    }
}

/// Every generation. `$TF_DIR/next` (read at start): `older` (take the `handover`
/// entry for one of an unknown kind, as a release without handovers would), `nofile N`
/// (soft fd limit), `nobody` (run as uid 65534 when root), `recv-delay MS` (receive
/// nothing for that long after ready), `recv-die-before-ack` (SIGKILL itself at the
/// first connection handed over, before answering), `recv-die-after K` (after accepting
/// K), `recv-slow MS` (between accepts), `refuse-all`. `$TF_DIR/sender` (read when it
/// hands over): `die-after-send` (SIGKILL itself once everything is sent),
/// `die-after-answers K` (once K are settled), `flush-each` (a message per
/// connection), `nofile N`, `deadline MS` (for `finish`), `drain MS` (serve what comes
/// back that long at most).
fn generation() -> ! {
    // Watchdog: a generation never outlives a minute.
    // SAFETY: alarm(2) only arms a timer.
    unsafe { libc::alarm(60) };
    let dir = PathBuf::from(std::env::var("TF_DIR").unwrap());
    let words = Words::read(&dir.join("next"));
    say(format!("start mode={}", words.0.join("+")));
    if words.has("older") {
        if let Some(table) = std::env::var_os("TABLEFLIP_FDS") {
            let t = table
                .to_string_lossy()
                .replace(",handover", ",handover-old");
            std::env::set_var("TABLEFLIP_FDS", t);
        }
    }
    // SAFETY: geteuid(2) has no preconditions.
    if words.has("nobody") && unsafe { libc::geteuid() } == 0 {
        // SAFETY: setgroups with an empty list reads no memory; setgid and setuid take
        // integers. Each result is checked.
        unsafe {
            assert_eq!(libc::setgroups(0, std::ptr::null()), 0, "setgroups");
            assert_eq!(libc::setgid(65534), 0, "setgid");
            assert_eq!(libc::setuid(65534), 0, "setuid");
        }
    }
    if let Some(n) = words.arg("nofile") {
        set_nofile(n);
    }
    let upg =
        Arc::new(Upgrader::new(Options::new().upgrade_timeout(Duration::from_secs(20))).unwrap());
    if let Err(e) = upg.handover() {
        say(format!("handover-early {}", describe(&e)));
    }
    let listener = upg
        .fds()
        .listen::<std::net::TcpListener>(std::env::var("TF_TCP").unwrap().as_str())
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    say(format!("tcp addr={}", listener.local_addr().unwrap()));
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGHUP, libc::SIGTERM]).unwrap();
    let u = Arc::clone(&upg);
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if sig == libc::SIGTERM {
                u.stop();
                continue;
            }
            match u.upgrade() {
                Ok(pid) => say(format!("upgrade-ok pid={pid}")),
                Err(e) => say(format!("upgrade-error {}", describe(&e))),
            }
        }
    });
    let mut adoption = upg.ready().unwrap();
    let rx = adoption.handover.take();
    say(format!(
        "ready handover={} adoption={}",
        rx.as_ref()
            .map_or("none".into(), |r| format!("pid:{}", r.pid())),
        adoption.to_string().replace(' ', "_")
    ));
    let mut server = Server {
        conns: HashMap::new(),
        rx,
        accepted: 0,
        first_incoming: None,
        recv_from: Instant::now() + Duration::from_millis(words.arg("recv-delay").unwrap_or(0)),
        words,
    };
    server.run(&upg, &listener);
    drop(listener);
    if upg.exit().upgraded() {
        let w = Words::read(&dir.join("sender"));
        server.hand_over(&upg, &w);
        server.drain(Duration::from_millis(w.arg("drain").unwrap_or(20_000)));
    }
    say(format!("exit conns={}", server.conns.len()));
    std::process::exit(0);
}

// ---------------------------------------------------------------------------------------
// The clients.
// ---------------------------------------------------------------------------------------

/// One client connection and what it has seen.
struct Client {
    s: TcpStream,
    port: u16,
    /// The count of the last answer.
    n: u64,
    /// The pid of each answer, in order.
    pids: Vec<u32>,
    /// Read, not yet a whole line.
    buf: Vec<u8>,
    /// Why it is over, if it is.
    over: Option<String>,
}

struct Clients {
    v: Vec<Client>,
}

/// How long a round may take.
const ROUND: Duration = Duration::from_secs(20);

impl Clients {
    fn connect(addr: SocketAddr, count: usize) -> Clients {
        let v = (0..count)
            .map(|_| {
                let s = TcpStream::connect(addr).unwrap();
                s.set_nonblocking(true).unwrap();
                let port = s.local_addr().unwrap().port();
                Client {
                    s,
                    port,
                    n: 0,
                    pids: Vec::new(),
                    buf: Vec::new(),
                    over: None,
                }
            })
            .collect();
        Clients { v }
    }

    /// Writes `text` on every open connection.
    fn write(&mut self, text: &str) {
        for c in self.v.iter_mut().filter(|c| c.over.is_none()) {
            if let Err(e) = c.s.write_all(text.as_bytes()) {
                c.over = Some(format!("write: {e}"));
            }
        }
    }

    /// Ends a line on every open connection with `text` and reads each answer: the
    /// count must follow the last one, the line must be `line`.
    #[track_caller]
    fn round(&mut self, text: &str, line: &str) {
        self.write(&format!("{text}\n"));
        let deadline = Instant::now() + ROUND;
        loop {
            let waiting: Vec<usize> = (0..self.v.len())
                .filter(|&i| self.v[i].over.is_none() && !self.v[i].buf.contains(&b'\n'))
                .collect();
            if waiting.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} connection(s) got no answer within {ROUND:?} (left open with nobody \
                 serving them?); ports {:?}",
                waiting.len(),
                waiting
                    .iter()
                    .take(10)
                    .map(|&i| self.v[i].port)
                    .collect::<Vec<_>>()
            );
            let mut fds: Vec<libc::pollfd> = waiting
                .iter()
                .map(|&i| libc::pollfd {
                    fd: self.v[i].s.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: a valid, exclusively borrowed array of pollfd.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, 100) };
            for (p, &i) in fds.iter().zip(&waiting) {
                if p.revents != 0 {
                    self.v[i].fill();
                }
            }
        }
        for c in self.v.iter_mut().filter(|c| c.over.is_none()) {
            c.check(line);
        }
    }

    fn open(&self) -> usize {
        self.v.iter().filter(|c| c.over.is_none()).count()
    }

    fn closed_ports(&self) -> Vec<u16> {
        let mut p: Vec<u16> = self
            .v
            .iter()
            .filter(|c| c.over.is_some())
            .map(|c| c.port)
            .collect();
        p.sort();
        p
    }

    /// Every open connection was last answered by `pid`.
    #[track_caller]
    fn all_served_by(&self, pid: u32) {
        for c in self.v.iter().filter(|c| c.over.is_none()) {
            assert_eq!(c.pids.last(), Some(&pid), "port {}: {:?}", c.port, c.pids);
        }
    }

    /// Once a connection's answers came from a pid, they never came again from one
    /// before it: no connection was served by two generations at once.
    #[track_caller]
    fn never_went_back(&self) {
        for c in &self.v {
            let mut seen: Vec<u32> = Vec::new();
            for p in &c.pids {
                if seen.last() != Some(p) {
                    assert!(
                        !seen.contains(p),
                        "port {}: answered by {:?}",
                        c.port,
                        c.pids
                    );
                    seen.push(*p);
                }
            }
        }
    }
}

impl Client {
    /// Reads what is there.
    fn fill(&mut self) {
        let mut chunk = [0u8; 1024];
        loop {
            match self.s.read(&mut chunk) {
                Ok(0) => {
                    self.over = Some("closed".into());
                    return;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    self.over = Some(format!("{e}"));
                    return;
                }
            }
        }
    }

    /// The answer in the buffer: `pid=P n=N line=L`, N one more than the last.
    #[track_caller]
    fn check(&mut self, line: &str) {
        let end = self
            .buf
            .iter()
            .position(|&b| b == b'\n')
            .expect("a whole line");
        let reply: Vec<u8> = self.buf.drain(..=end).collect();
        let reply = String::from_utf8_lossy(&reply[..end]).into_owned();
        let field = |k: &str| {
            reply
                .split(' ')
                .find_map(|f| f.strip_prefix(k)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("port {}: no {k} in {reply:?}", self.port))
                .to_string()
        };
        let n: u64 = field("n").parse().unwrap();
        assert_eq!(
            n,
            self.n + 1,
            "port {}: count skipped or repeated: {reply:?}",
            self.port
        );
        assert_eq!(field("line"), line, "port {}: {reply:?}", self.port);
        self.n = n;
        self.pids.push(field("pid").parse().unwrap());
        assert!(
            self.buf.is_empty(),
            "port {}: more than one answer",
            self.port
        );
    }
}

// ---------------------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------------------

fn tcp_env() -> Vec<(&'static str, String)> {
    vec![("TF_TCP", "127.0.0.1:0".to_string())]
}

/// A run with `count` clients that have each had two lines answered by the first
/// generation, and an unfinished line (`half`) read by it.
fn started(count: usize, first: &str, next: &str) -> (Run, Clients, u32) {
    let mut run = Run::start_mode("handover", &tcp_env(), first);
    let addr: SocketAddr = run.expect("tcp").field("addr").unwrap().parse().unwrap();
    let pid = run.expect("ready").pid;
    let mut clients = Clients::connect(addr, count);
    clients.round("a", "a");
    clients.round("b", "b");
    clients.all_served_by(pid);
    clients.write("half");
    std::thread::sleep(Duration::from_millis(300));
    run.next(next);
    (run, clients, pid)
}

/// Upgrades `old` and returns the new generation's `ready` (the old one may be killed
/// before it says `upgrade-ok`).
#[track_caller]
fn upgrade_event(run: &mut Run, old: u32) -> util::Event {
    signal(old, libc::SIGHUP);
    run.expect_not_from("ready", old)
}

/// Upgrades `old` and returns the new generation's pid.
#[track_caller]
fn upgrade(run: &mut Run, old: u32) -> u32 {
    upgrade_event(run, old).pid
}

/// Which ports the old generation sent under which ids.
fn ids_by_port(run: &mut Run, old: u32, count: usize) -> HashMap<u64, u16> {
    (0..count)
        .map(|_| {
            let e = run.expect_from("sent", old);
            (
                e.field("id").unwrap().parse().unwrap(),
                e.field("port").unwrap().parse().unwrap(),
            )
        })
        .collect()
}

/// The unfinished line ends and is answered on every open connection, by `pid`; none
/// went back to an earlier generation; `open` connections are still open.
#[track_caller]
fn carried_on(clients: &mut Clients, pid: u32, open: usize) {
    clients.round("-done", "half-done");
    clients.all_served_by(pid);
    clients.never_went_back();
    assert_eq!(clients.open(), open);
}

/// The old generation, told `sender`, dies; the new one, told `next`, ends with all 50.
fn sender_killed(next: &str, sender: &str) {
    let (mut run, mut clients, old) = started(50, "", next);
    std::fs::write(run.path("sender"), sender).unwrap();
    let new = upgrade(&mut run, old);
    run.expect_from("dying", old);
    run.expect_where("received", |e| {
        e.pid == new && e.field("accepted") == Some("50")
    });
    carried_on(&mut clients, new, 50);
    stop_all(run, &[new]);
}

fn stop_all(mut run: Run, pids: &[u32]) {
    for &pid in pids {
        signal(pid, libc::SIGTERM);
    }
    run.expect_all_exited();
}

/// The case: long-lived connections follow the upgrade, with what the old
/// generation had read and their state; the old generation, left with nothing, exits at
/// once, so the next upgrade is not refused while it drains; and the connections move
/// again.
#[test]
fn connections_move_to_the_new_generation_with_their_state() {
    let (mut run, mut clients, old) = started(200, "", "");
    assert!(run
        .expect_from("handover-early", old)
        .rest
        .contains("kind=HandoverUnavailable"));
    let ready = upgrade_event(&mut run, old);
    assert_eq!(ready.field("handover"), Some(format!("pid:{old}").as_str()));
    let new = ready.pid;
    let done = run.expect_from("finished", old);
    assert_eq!(done.field("accepted"), Some("200"), "{done:?}");
    assert_eq!(done.field("returned"), Some("0"));
    assert_eq!(done.field("lost"), Some(""));
    assert_eq!(done.field("recorded"), Some("200"), "the upgrade's record");
    // The unfinished line continues in the new generation.
    clients.round("-done", "half-done");
    clients.all_served_by(new);
    clients.round("c", "c");
    assert_eq!(run.expect_from("exit", old).field("conns"), Some("0"));
    wait_gone(old);
    // Not ParentAlive: the next upgrade goes, and the connections move again.
    let third = upgrade(&mut run, new);
    assert_eq!(
        run.expect_from("finished", new).field("accepted"),
        Some("200")
    );
    clients.round("d", "d");
    clients.all_served_by(third);
    clients.never_went_back();
    assert_eq!(clients.open(), 200);
    stop_all(run, &[third]);
}

/// The new generation dies at the first connection, before acknowledging it: the old
/// generation still owns every connection, gets them all back, and serves on.
#[test]
fn a_receiver_killed_before_its_acknowledgement_leaves_everything_with_the_sender() {
    let (mut run, mut clients, old) = started(50, "", "recv-die-before-ack");
    let new = upgrade(&mut run, old);
    run.expect_from("dying", new);
    let done = run.expect_from("finished", old);
    assert_eq!(done.field("accepted"), Some("0"), "{done:?}");
    assert_eq!(done.field("returned"), Some("50"));
    assert_eq!(done.field("lost"), Some(""));
    assert!(run.expect_from("returned", old).rest.contains("went_away"));
    carried_on(&mut clients, old, 50);
    drop(clients);
    run.expect_from("exit", old);
    run.expect_all_exited();
}

/// The new generation dies after accepting 20 of 50: those 20 are lost with it, and
/// the old generation names exactly them; it gets the other 30 back and serves them.
#[test]
fn a_receiver_killed_in_the_middle_of_a_batch_is_named_with_what_it_took() {
    let (mut run, mut clients, old) = started(50, "", "recv-die-after 20");
    let new = upgrade(&mut run, old);
    let ports = ids_by_port(&mut run, old, 50);
    run.expect_from("dying", new);
    let done = run.expect_from("finished", old);
    assert_eq!(done.field("accepted"), Some("20"), "{done:?}");
    assert_eq!(done.field("returned"), Some("30"));
    let mut lost: Vec<u16> = done
        .field("lost")
        .unwrap()
        .split(',')
        .map(|id| ports[&id.parse::<u64>().unwrap()])
        .collect();
    lost.sort();
    clients.round("-done", "half-done");
    assert_eq!(
        clients.closed_ports(),
        lost,
        "the lost ones are the ones named"
    );
    clients.all_served_by(old);
    clients.never_went_back();
    assert_eq!(clients.open(), 30);
    drop(clients);
    run.expect_from("exit", old);
    run.expect_all_exited();
}

/// The old generation dies once it has sent everything, before any answer: the new
/// generation owns what it received (its acknowledgements fail, the lifeline says the
/// old one has exited) and serves it all.
#[test]
fn a_sender_killed_after_sending_leaves_everything_with_the_receiver() {
    sender_killed("recv-delay 500", "die-after-send");
}

/// The old generation dies in the middle of a batch being accepted (20 of 50 settled):
/// the new generation owns the rest too, and nothing is lost.
#[test]
fn a_sender_killed_in_the_middle_of_a_batch_loses_nothing() {
    sender_killed("recv-slow 20", "die-after-answers 20");
}

/// 1000 connections through one handover (4 messages).
#[test]
fn a_thousand_connections_through_one_handover() {
    let (mut run, mut clients, old) = started(1000, "", "");
    let new = upgrade(&mut run, old);
    let done = run.expect_from("finished", old);
    assert_eq!(done.field("accepted"), Some("1000"), "{done:?}");
    let sent = run.expect_from("sent-all", old);
    let received = run.expect_where("received", |e| {
        e.pid == new && e.field("accepted") == Some("1000")
    });
    eprintln!(
        "1000 connections: sent in {} us, finish returned after {} us, all accepted {} us \
         after the first arrived",
        sent.field("us").unwrap(),
        done.field("us").unwrap(),
        received.field("us").unwrap()
    );
    clients.round("-done", "half-done");
    clients.all_served_by(new);
    clients.never_went_back();
    stop_all(run, &[new]);
}

/// A new generation near its fd limit: the batch's fds do not all arrive (MSG_CTRUNC);
/// it says so and refuses the whole message, and the old generation keeps every
/// connection of it.
#[test]
fn a_receiver_at_its_fd_limit_refuses_the_batch_and_the_sender_keeps_it() {
    let (mut run, mut clients, old) = started(100, "", "nofile 64");
    let new = upgrade(&mut run, old);
    let err = run.expect_from("rx-error", new);
    assert!(err.rest.contains("kind=HandoverRefused"), "{err:?}");
    assert!(err.rest.contains("MSG_CTRUNC"), "{err:?}");
    assert!(
        err.rest.contains("stay_with_the_previous_generation"),
        "{err:?}"
    );
    let done = run.expect_from("finished", old);
    assert_eq!(done.field("accepted"), Some("0"), "{done:?}");
    assert_eq!(done.field("returned"), Some("100"));
    assert!(run.expect_from("returned", old).rest.contains("rejected"));
    carried_on(&mut clients, old, 100);
    drop(clients);
    run.expect_from("exit", old);
    signal(new, libc::SIGTERM);
    run.expect_all_exited();
}

/// fds in flight count against the sender's fd limit (not root's): with a limit of 40
/// and a receiver that reads nothing for a while, sending one message per connection
/// meets ETOOMANYREFS. Here the receiver never reads in time: the deadline takes back
/// what was sent, and what could not be sent comes back with the reason.
#[test]
fn fds_in_flight_over_the_senders_limit_come_back_with_the_reason() {
    let (mut run, mut clients, old) = started(80, "nobody", "nobody recv-delay 30000");
    std::fs::write(run.path("sender"), "flush-each nofile 40 deadline 1500").unwrap();
    let new = upgrade(&mut run, old);
    let done = run.expect_from("finished", old);
    assert_eq!(done.field("accepted"), Some("0"), "{done:?}");
    assert_eq!(done.field("returned"), Some("80"));
    let mut reasons = Vec::new();
    for _ in 0..80 {
        reasons.push(run.expect_from("returned", old).rest);
    }
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("ETOOMANYREFS") || r.contains("too_many_fds_in_flight")),
        "{reasons:#?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("taken_back")),
        "{reasons:#?}"
    );
    clients.round("-done", "half-done");
    clients.all_served_by(old);
    assert_eq!(clients.open(), 80);
    drop(clients);
    run.expect_from("exit", old);
    signal(new, libc::SIGKILL);
    run.expect_all_exited();
}

/// A new generation of a release without handovers: the old one is told, and drains as
/// before.
#[test]
fn an_older_new_generation_is_told_apart() {
    let (mut run, mut clients, old) = started(5, "", "older");
    let ready = upgrade_event(&mut run, old);
    assert_eq!(ready.field("handover"), Some("none"));
    let new = ready.pid;
    let err = run.expect_from("handover-error", old);
    assert!(err.rest.contains("kind=HandoverUnavailable"), "{err:?}");
    assert!(err.rest.contains("older_release"), "{err:?}");
    clients.round("-done", "half-done");
    clients.all_served_by(old);
    drop(clients);
    run.expect_from("exit", old);
    stop_all(run, &[new]);
}

/// A new generation that refuses what it does not know: everything stays with the old
/// one.
#[test]
fn refused_connections_stay_with_the_old_generation() {
    let (mut run, mut clients, old) = started(20, "", "refuse-all");
    let _new = upgrade(&mut run, old);
    let done = run.expect_from("finished", old);
    assert_eq!(done.field("returned"), Some("20"), "{done:?}");
    assert!(run
        .expect_from("returned", old)
        .rest
        .contains("refused_by_the_new_generation"));
    clients.round("-done", "half-done");
    clients.all_served_by(old);
    drop(clients);
    run.expect_from("exit", old);
}

/// The fuzz target's seeds are what their names say (so the fuzzer starts from real
/// messages): each decodes, and encodes back to the same bytes, but the one from a
/// version to come.
#[test]
fn the_fuzz_seeds_are_messages() {
    use tableflip::__private::decode_handover_message;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/decode_handover_message");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        match decode_handover_message(&bytes) {
            Ok((_, again)) => assert_eq!(again, bytes, "{name}"),
            Err(reason) => assert!(
                name.starts_with("version-") && reason.contains("not understood"),
                "{name}: {reason}"
            ),
        }
        n += 1;
    }
    assert!(n >= 8, "{n} seeds in {}", dir.display());
}
