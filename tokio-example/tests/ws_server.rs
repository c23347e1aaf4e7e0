//! Runs the `ws_server` example as a real process, with WebSocket clients on loopback, and
//! upgrades it: sessions move to the new generation with their state, a session the new
//! generation refuses stays with the old one until its drain ends and is then closed
//! cleanly, and a new generation killed during the handover leaves every session either
//! served by the old one or named in its log as lost. The main package's harness and
//! `upgrade_check` (its `--hold --ws` mode) are used as in tests/axum_server.rs.
#![cfg(target_os = "linux")]

#[allow(dead_code)]
#[path = "../../tests/util/examples.rs"]
mod util;

#[allow(dead_code)]
#[path = "../../tests/util/example_checks.rs"]
mod checks;

#[path = "../../tests/util/upgrade_check.rs"]
mod upgrade_check;

/// The WebSocket client of upgrade_check.
#[allow(dead_code)]
#[path = "../../examples/upgrade_check/ws.rs"]
mod ws;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use util::{example, http_probe, lock, Server, DEADLINE};

/// 100 sessions held across 20 upgrades: none reset, closed or reconnected, each
/// answered by one generation after the other with its count and room carried over, the
/// last generation answering every one at the end, no deploy refused.
#[test]
fn ws_server_hands_its_sessions_to_each_new_generation() {
    // The next deploy 1 s after each (upgrade_check's default, 0.25 s, is for measuring
    // on a quiet machine): the old generation must be gone by then, not draining.
    let args = ["--hold", "100", "--ws", "--upgrades", "10", "--pace", "1"];
    let summary = upgrade_check::upgrade_check(&example("ws_server"), &args);
    assert!(summary.contains("100 WebSocket sessions"), "{summary}");
}

#[test]
fn ws_server_answers_help_with_its_flags() {
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/ws_server/main.rs");
    let source = std::fs::read_to_string(source).expect("read examples/ws_server/main.rs");
    checks::answers_help_with_its_flags(&example("ws_server"), &source);
}

#[test]
fn ws_server_logs_say_inherited_or_new_and_the_new_pid() {
    checks::logs_say_inherited_or_new_and_the_new_pid(&example("ws_server"), http_probe);
}

#[test]
fn ws_server_upgrades_once_per_sighup_from_a_terminal() {
    checks::one_upgrade_per_sighup_from_a_terminal(&example("ws_server"), http_probe);
}

/// A WebSocket session, from the client's side.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
    port: u16,
    /// The count of the last answer.
    n: u64,
    room: String,
}

/// An answer: `pid=P n=N room=R ...`.
#[derive(Debug)]
struct Answer {
    pid: u32,
    n: u64,
    text: String,
}

impl Client {
    /// Connects, and joins `room`.
    fn connect(addr: SocketAddr, room: &str) -> Client {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(util::IO_TIMEOUT)).unwrap();
        let port = s.local_addr().unwrap().port();
        let rest = ws::handshake(&mut s, port as u64).expect("handshake");
        assert!(rest.is_empty());
        let mut c = Client {
            s,
            buf: Vec::new(),
            port,
            n: 0,
            room: room.into(),
        };
        let a = c.ask(&format!("join {room}")).expect("join");
        assert!(a.text.ends_with(&format!("room={room} joined")), "{a:?}");
        c
    }

    /// Sends `text`; the answer, checked to follow the last one (count and room), or
    /// how the session ended.
    fn ask(&mut self, text: &str) -> Result<Answer, String> {
        self.write(&frame(text))?;
        self.answer()
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.s.write_all(bytes).map_err(|e| format!("write: {e}"))
    }

    /// The answer to what was sent, checked to follow the last one.
    fn answer(&mut self) -> Result<Answer, String> {
        let text = match self.frame()? {
            ws::Frame::Text(t) => t,
            other => return Err(format!("{other:?}")),
        };
        let field = |k: &str| {
            text.split(' ')
                .find_map(|f| f.strip_prefix(k)?.strip_prefix('='))
                .map(str::to_owned)
        };
        let a = Answer {
            pid: field("pid").and_then(|p| p.parse().ok()).expect("a pid"),
            n: field("n").and_then(|n| n.parse().ok()).expect("a count"),
            text: text.clone(),
        };
        assert_eq!(
            a.n,
            self.n + 1,
            "port {}: the count skipped: {a:?}",
            self.port
        );
        assert_eq!(field("room").as_deref(), Some(self.room.as_str()), "{a:?}");
        self.n = a.n;
        Ok(a)
    }

    /// The next frame, or how the connection ended.
    fn frame(&mut self) -> Result<ws::Frame, String> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((f, used)) = ws::parse(&self.buf)? {
                self.buf.drain(..used);
                return Ok(f);
            }
            match self.s.read(&mut chunk) {
                Ok(0) => return Err("EOF".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// The session is closed with a close frame `1001 going away`.
    #[track_caller]
    fn expect_going_away(&mut self) {
        match self.frame() {
            Ok(ws::Frame::Close(code)) => assert_eq!(code, Some(1001), "port {}", self.port),
            other => panic!("port {}: expected a close frame, got {other:?}", self.port),
        }
    }
}

/// Sends SIGHUP to the current generation; returns the new one once it answers (the
/// old one is not waited for).
fn upgrade_started(server: &mut Server) -> u32 {
    let old = server.current;
    server.signal(old, libc::SIGHUP);
    let new = server.wait_for("a new generation to answer", |s| {
        http_probe(s.addr).ok().filter(|&pid| pid != old)
    });
    server.generations.push(new);
    server.current = new;
    new
}

/// A new binary that does not know the state's format (another tag) refuses the
/// sessions: they stay with the old generation, which answers them (count and room go
/// on), while new connections go to the new one; at the end of its drain the old one
/// closes them cleanly (`1001`) and exits with status 0. A stop closes the new
/// generation's sessions the same way.
#[test]
fn a_session_the_new_generation_refuses_stays_with_the_old_one() {
    let _lock = lock();
    let binary = example("ws_server");
    let env = [("WS_SERVER_STATE_TAG", "WSS9")];
    let mut server = Server::start_with_env(&binary, &["--drain", "2"], &env, http_probe);
    let old = server.current;
    let mut clients: Vec<Client> = (0..3)
        .map(|i| Client::connect(server.addr, &format!("room{i}")))
        .collect();
    for c in &mut clients {
        assert_eq!(c.ask("before").unwrap().pid, old);
    }
    let new = upgrade_started(&mut server);
    let log = server.wait_for("the old generation to keep them", |s| {
        let log = s.log();
        (log.matches("stays here").count() >= 3).then_some(log)
    });
    assert!(
        log.contains(&format!("pid={new}] handover: refusing session")),
        "{log}"
    );
    for c in &mut clients {
        let a = c.ask("after").expect("still served");
        assert_eq!(a.pid, old, "answered by the old generation: {a:?}");
        assert!(a.text.ends_with("echo=after"), "{a:?}");
    }
    let mut fresh = Client::connect(server.addr, "new");
    assert_eq!(fresh.ask("hello").unwrap().pid, new);
    // The drain (2 s) ends: a close frame each, then the old generation exits.
    let t = Instant::now();
    for c in &mut clients {
        c.expect_going_away();
    }
    assert!(t.elapsed() < DEADLINE);
    let status = server.wait_exit(old);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{status:#x}"
    );
    // A stop: the new generation's session is closed the same way.
    server.signal(new, libc::SIGTERM);
    fresh.expect_going_away();
    let status = server.wait_exit(new);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{status:#x}"
    );
}

/// A text frame from the client.
fn frame(text: &str) -> Vec<u8> {
    ws::frame(1, text.as_bytes(), [7, 1, 3, 9])
}

/// A server (started with `args`) with 200 sessions, each answered once, the first one
/// half-way through a message (`busy`: half of its frame sent), and upgraded: returned as
/// soon as the pid file names the new generation (looked for without pause: the handover
/// takes milliseconds), `generations` holding the old one and the new one.
fn handover_under_way(args: &[&str]) -> (Server, Vec<Client>, Vec<u8>) {
    let mut server = Server::start(&example("ws_server"), args, http_probe);
    let old = server.current;
    let mut clients: Vec<Client> = (0..200)
        .map(|i| Client::connect(server.addr, &format!("r{i}")))
        .collect();
    for c in &mut clients {
        c.ask("before").unwrap();
    }
    let busy = frame("busy");
    clients[0].write(&busy[..3]).unwrap();
    server.signal(old, libc::SIGHUP);
    let t = Instant::now();
    let new = loop {
        if let Some(pid) = server.pid_from_file().filter(|&p| p != old) {
            break pid;
        }
        assert!(t.elapsed() < DEADLINE, "no new generation");
        std::thread::sleep(Duration::from_micros(100));
    };
    server.generations.push(new);
    (server, clients, busy)
}

/// The new generation is killed in the middle of the handover: the old one waits for a
/// session that is in the middle of a message (half a frame sent) before it finishes,
/// so it is there to see the death. Whatever the new generation had accepted is lost,
/// and the old one names exactly those (by the client's port); every other session is
/// still served by the old one, its count going on, until its drain ends. None is left
/// open with nobody serving it, none is answered by two generations. Stopped at once
/// (`SIGSTOP`, before it takes anything) and killed, and killed 50 ms and 300 ms after the
/// pid file named it (when it has taken everything it was sent).
#[test]
fn a_new_generation_killed_during_the_handover_leaves_no_session_unaccounted() {
    let _lock = lock();
    for delay_ms in [0, 50, 300] {
        let (server, mut clients, busy) = handover_under_way(&["--drain", "3"]);
        let (old, new) = (server.generations[0], server.generations[1]);
        if delay_ms == 0 {
            server.signal(new, libc::SIGSTOP);
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        server.signal(new, libc::SIGKILL);
        // The rest of the frame: answered by the old generation, which then finishes.
        clients[0].write(&busy[3..]).unwrap();
        assert_eq!(clients[0].answer().expect("the busy one").pid, old);
        // Stopped before it confirmed the commit, it leaves no upgrade: the old
        // generation serves on, and hands nothing over.
        let failed = format!("pid={old}] upgrade failed");
        let log = server.wait_for("the old generation's handover report", |s| {
            Some(s.log()).filter(|l| {
                l.contains(&format!("pid={old}] handover: pid {new}")) || l.contains(&failed)
            })
        });
        // The report says how many were lost; the line naming each comes after it.
        let reported: usize = log
            .lines()
            .find(|l| l.contains(&format!("pid={old}] handover: pid {new}")))
            .and_then(|l| {
                l.split("; ").find_map(|part| {
                    let (n, _) = part.split_once(" lost with it")?;
                    n.parse().ok()
                })
            })
            .unwrap_or(0);
        let lost_line =
            |l: &&str| l.contains(&format!("pid={old}] session")) && l.contains(" lost ");
        let log = server.wait_for("a line naming each session lost", |s| {
            Some(s.log()).filter(|l| l.lines().filter(lost_line).count() >= reported)
        });
        let mut named: Vec<u16> = log
            .lines()
            .filter(lost_line)
            .map(|l| {
                let port = l.split("127.0.0.1:").nth(1).expect("a peer");
                port[..port.find(')').unwrap()].parse().unwrap()
            })
            .collect();
        named.sort();
        let mut lost = Vec::new();
        for c in &mut clients {
            match c.ask("after") {
                Ok(a) => assert_eq!(a.pid, old, "port {}: {a:?}", c.port),
                Err(e) => {
                    assert!(!e.contains("timed out") && !e.contains("WouldBlock"), "{e}");
                    lost.push(c.port);
                }
            }
        }
        lost.sort();
        eprintln!(
            "killed {delay_ms} ms after the pid file named it: {} lost and named, {} served \
             on{}",
            lost.len(),
            clients.len() - lost.len(),
            if log.contains(&failed) {
                " (before it confirmed: the upgrade was rolled back)"
            } else {
                ""
            }
        );
        assert_eq!(
            lost, named,
            "the sessions lost are the ones the old generation named"
        );
        if log.contains(&failed) {
            server.signal(old, libc::SIGTERM);
        }
        let status = server.wait_exit(old);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status:#x}"
        );
    }
}

/// The old generation is killed in the middle of the handover (it waits for a session
/// that is half-way through a message, so it has sent the others and not that one): the
/// new generation owns every session it received, acknowledged or not (its answers find
/// the old generation gone), and serves each on with its count; the one that was never
/// sent dies with the old generation, like every connection of a killed process. None
/// is left open with nobody serving it, none is answered by two generations. Killed at
/// once (`SIGSTOP` first, so that it has sent nothing: every session goes with it), and
/// 50 ms and 300 ms after the pid file named the new generation.
#[test]
fn an_old_generation_killed_during_the_handover_leaves_no_session_unaccounted() {
    let _lock = lock();
    for delay_ms in [0, 50, 300] {
        let (mut server, mut clients, busy) = handover_under_way(&[]);
        let (old, new) = (server.generations[0], server.generations[1]);
        server.current = new;
        if delay_ms == 0 {
            server.signal(old, libc::SIGSTOP);
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        server.signal(old, libc::SIGKILL);
        server.wait_exit(old);
        let _ = clients[0].write(&busy[3..]);
        let (mut served, mut gone) = (0, 0);
        for (i, c) in clients.iter_mut().enumerate() {
            // The busy one's message first: it was half-sent.
            let answer = if i == 0 { c.answer() } else { c.ask("after") };
            match answer {
                Ok(a) => {
                    assert_eq!(a.pid, new, "port {}: {a:?}", c.port);
                    served += 1;
                }
                Err(e) => {
                    assert!(!e.contains("timed out") && !e.contains("WouldBlock"), "{e}");
                    gone += 1;
                }
            }
        }
        // Logged when the new generation sees the channel end.
        let took = server.wait_for("the new generation's handover line", |s| {
            s.log()
                .lines()
                .find(|l| l.contains(&format!("pid={new}] handover: took")))
                .map(str::to_owned)
        });
        eprintln!(
            "old generation killed {delay_ms} ms after the pid file named the new one: \
             {served} served on by it, {gone} gone; {took}"
        );
        assert!(
            gone == 1 || served == 0,
            "only the unsent one dies: {gone} gone"
        );
        assert!(
            took.contains(&format!("took {served} session(s)")),
            "{took}"
        );
        drop(clients);
        server.stop(libc::SIGTERM);
    }
}

/// The room travels with the session: after an upgrade, what one session says in its
/// room reaches the other sessions of that room, served by the new generation, and not
/// the sessions of another room.
#[test]
fn rooms_carry_over_an_upgrade() {
    let _lock = lock();
    let mut server = Server::start(&example("ws_server"), &[], http_probe);
    let mut a = Client::connect(server.addr, "kitchen");
    let mut b = Client::connect(server.addr, "kitchen");
    let mut other = Client::connect(server.addr, "garden");
    let heard = |c: &mut Client| match c.frame() {
        Ok(ws::Frame::Text(t)) => t,
        f => panic!("port {}: {f:?}", c.port),
    };
    assert!(a.ask("say hello").unwrap().text.ends_with("said"));
    assert_eq!(heard(&mut b), "room=kitchen said=hello");
    let new = server.upgrade();
    let answer = b.ask("say again").unwrap();
    assert_eq!(answer.pid, new, "{answer:?}");
    assert_eq!(heard(&mut a), "room=kitchen said=again");
    // Nothing reached the garden: its next frame is the answer to its own message.
    assert_eq!(other.ask("echo").unwrap().pid, new);
    drop((a, b, other));
    server.stop(libc::SIGTERM);
}
