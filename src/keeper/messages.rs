//! What the keeper hears on its notify socket, and whom it believes (see "Trust" in
//! [`Keeper`](crate::Keeper)'s docs): every datagram with its sender's credentials, only
//! the main generation heard, the announced successor taking over by the commit or by
//! its claim, the fd store fed by the main generation only, and one log line for each
//! rejected message.

use std::io;
use std::mem::MaybeUninit;
use std::os::unix::io::OwnedFd;
use std::time::{Duration, Instant};

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};

use super::procs::{self, Verified};
use super::state::{Complaints, Keeping};
use super::store::{self, Store};
use crate::error::clip;
use crate::sys::os;
use crate::sys::systemd::SUCCESSOR_FIELD;

/// At most this many rejection lines per [`COMPLAINT_WINDOW`].
const COMPLAINTS: u32 = 20;
const COMPLAINT_WINDOW: Duration = Duration::from_secs(10);
/// How long a successor's claim waits for the main generation to finish exiting.
const CLAIM_WAIT: Duration = Duration::from_millis(100);
/// The most of a rejected message that is logged.
const LOGGED_BYTES: usize = 200;

/// A number of microseconds, as systemd reads one: decimal digits only.
fn parse_usec(value: &str) -> std::result::Result<u64, &'static str> {
    if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err("not a number of microseconds");
    }
    value.parse().map_err(|_| "not a number of microseconds")
}

impl Keeping {
    /// Reads every queued notification.
    pub(super) fn read_messages(&mut self) {
        let mut buf = [0u8; 4096];
        let mut space =
            [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(253), ScmCredentials(1))];
        loop {
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            let flags = RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC;
            let recv =
                os::retry(|| rustix::net::recvmsg(&self.socket, &mut iov, &mut control, flags));
            let Ok(msg) = recv else { return };
            let mut sender = 0;
            let mut fds: Vec<OwnedFd> = Vec::new();
            for m in control.drain() {
                match m {
                    RecvAncillaryMessage::ScmCredentials(c) => {
                        sender = c.pid.as_raw_nonzero().get() as u32
                    }
                    RecvAncillaryMessage::ScmRights(rights) => fds.extend(rights),
                    _ => {}
                }
            }
            let len = msg.bytes.min(buf.len());
            let text = String::from_utf8_lossy(&buf[..len]).into_owned();
            if msg
                .flags
                .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
            {
                self.reject(sender, &text, "cut short (over 4096 bytes or 253 fds)");
                continue;
            }
            self.message(sender, &text, fds);
        }
    }

    /// One notification (`KEY=value` lines) from `sender` (0: no credentials, or
    /// outside the keeper's PID namespace).
    fn message(&mut self, sender: u32, text: &str, fds: Vec<OwnedFd>) {
        if !self.heard(sender, text) {
            return;
        }
        let field = |key: &str| field(text, key);
        let mut relay: Vec<String> = Vec::new();
        for key in ["RELOADING", "READY", "STOPPING"] {
            if field(key) == Some("1") {
                relay.push(format!("{key}=1"));
            }
        }
        if let Some(status) = field("STATUS") {
            relay.push(format!("STATUS={status}"));
        }
        if let Some(value) = field("EXTEND_TIMEOUT_USEC") {
            match parse_usec(value) {
                Ok(usec) => {
                    self.extend_stop(Duration::from_micros(usec));
                    relay.push(format!("EXTEND_TIMEOUT_USEC={usec}"));
                }
                Err(why) => self.reject_field(sender, &format!("EXTEND_TIMEOUT_USEC={value}"), why),
            }
        }
        let (store, remove) = (field("FDSTORE"), field("FDSTOREREMOVE"));
        self.fd_store(
            sender,
            store == Some("1"),
            remove == Some("1"),
            field("FDNAME"),
            fds,
        );
        if let (Some(up), false) = (&self.upstream, relay.is_empty()) {
            up.relay(&relay.join("\n"));
        }
    }

    /// Whether the rest of `sender`'s message counts: it comes from the main generation,
    /// or from the announced successor whose `MAINPID=` claim was accepted. Takes the
    /// announcement and the change of main pid the message asks for first; logs what it
    /// rejects.
    fn heard(&mut self, sender: u32, text: &str) -> bool {
        let was_main = self.main.as_ref().is_some_and(|m| m.pid() == sender);
        let is_successor = self.successor.as_ref().is_some_and(|s| s.pid() == sender);
        if !was_main && !is_successor {
            let why = match &self.main {
                _ if sender == 0 => "no sender in the keeper's PID namespace".to_string(),
                Some(m) => format!("not the main generation, pid {}", m.pid()),
                None => "no generation is the main one".to_string(),
            };
            self.reject(sender, text, &why);
            return false;
        }
        if was_main {
            if let Some(value) = field(text, SUCCESSOR_FIELD) {
                if let Err(why) = self.announce(value) {
                    self.reject_field(sender, &format!("{SUCCESSOR_FIELD}={value}"), &why);
                }
            }
        }
        let Some(value) = field(text, "MAINPID") else {
            if !was_main {
                self.reject(
                    sender,
                    text,
                    "the announced successor, not the main generation",
                );
            }
            return was_main;
        };
        let result = if was_main {
            self.commit(sender, value)
        } else {
            self.claim(sender, value)
        };
        match result {
            Ok(()) => true,
            // The successor's claim refused: nothing else it says counts.
            Err(why) if !was_main => {
                let why = format!("the announced successor's claim: {why}");
                self.reject(sender, text, &why);
                false
            }
            Err(why) => {
                self.reject_field(sender, &format!("MAINPID={value}"), &why);
                true
            }
        }
    }

    /// `X_TABLEFLIP_SUCCESSOR=` from the main generation: its child that may follow it.
    fn announce(&mut self, value: &str) -> std::result::Result<(), String> {
        let pid = procs::parse_pid(value)?;
        let main = self.main.as_ref().map(|m| m.pid());
        let child = Verified::check(pid, self.pid)?;
        if procs::parent_of(pid) != main {
            return Err("not a child of the main generation".into());
        }
        self.successor = Some(child);
        self.claimed = false;
        Ok(())
    }

    /// `MAINPID=` from the main generation: itself, or the commit to its successor.
    fn commit(&mut self, sender: u32, value: &str) -> std::result::Result<(), String> {
        let pid = procs::parse_pid(value)?;
        if pid == sender {
            return Ok(());
        }
        match &self.successor {
            Some(s) if s.pid() == pid => {
                if s.exited() {
                    return Err("the announced successor has exited".into());
                }
                self.main = self.successor.take();
                self.tell_new_main();
                Ok(())
            }
            _ => Err(format!(
                "not the successor the main generation announced ({})",
                self.successor
                    .as_ref()
                    .map_or("none".to_string(), |s| format!("pid {}", s.pid()))
            )),
        }
    }

    /// `MAINPID=` from the announced successor: it takes over if the main generation
    /// died during the handoff.
    fn claim(&mut self, sender: u32, value: &str) -> std::result::Result<(), String> {
        if procs::parse_pid(value)? != sender {
            return Err("the successor may only name itself".into());
        }
        if let Some(main) = &self.main {
            // The successor claims when its lifeline to the main generation closes,
            // which happens a moment before the main generation is a zombie.
            match main.wait_exit(CLAIM_WAIT) {
                Some(status) => self.main_died(status),
                None => {
                    self.claimed = true;
                    return Err(format!(
                        "the main generation (pid {}) is alive: only it commits (the claim \
                         holds if it dies before)",
                        main.pid()
                    ));
                }
            }
        }
        if self.successor.as_ref().is_some_and(|s| s.pid() == sender) {
            self.take_over();
        }
        Ok(())
    }

    /// The successor becomes the main generation, the main one being dead.
    pub(super) fn take_over(&mut self) {
        let Some(s) = self.successor.take() else {
            return;
        };
        say!(
            "tableflip keeper: pid {}, the announced successor, takes over from the main \
             generation that died during the upgrade",
            s.pid()
        );
        self.main = Some(s);
        self.tell_new_main();
        self.claimed = false;
        self.takeover_until = None;
        if self.restart_at.take().is_some() {
            self.restarts.pop_back();
        }
    }

    /// During a stop, a generation that has just become the main one (the commit
    /// crossed the stop signal) gets the signal too.
    fn tell_new_main(&self) {
        if let (Some(stop), Some(main)) = (&self.stop, &self.main) {
            main.signal(stop.signal);
        }
    }

    /// `FDSTORE=1` / `FDSTOREREMOVE=1` from the main generation.
    fn fd_store(
        &mut self,
        sender: u32,
        store: bool,
        remove: bool,
        name: Option<&str>,
        fds: Vec<OwnedFd>,
    ) {
        let asked = |what: &str| match name {
            Some(n) => format!("{what}\nFDNAME={n}"),
            None => what.to_string(),
        };
        if remove {
            match name.map(|n| (n, store::check_name(n))) {
                Some((n, Ok(()))) => {
                    self.store.remove(n);
                }
                Some((_, Err(why))) => self.reject_field(sender, &asked("FDSTOREREMOVE=1"), why),
                None => self.reject_field(sender, "FDSTOREREMOVE=1", "no FDNAME="),
            }
        }
        if fds.is_empty() {
            return;
        }
        if !store {
            self.reject_field(sender, &format!("{} fds", fds.len()), "without FDSTORE=1");
            return;
        }
        let n = name.unwrap_or(store::DEFAULT_NAME);
        if let Err(why) = store::check_name(n) {
            let what = asked(&format!("FDSTORE=1 with {} fds", fds.len()));
            self.reject_field(sender, &what, why);
            return;
        }
        let got = self.store.add(n, fds);
        if got.refused > 0 {
            let what = asked(&format!("FDSTORE=1 with {} fds", got.refused + got.kept));
            let why = format!(
                "the fd store is full: {} fds closed ({} held, at most {})",
                got.refused,
                self.store.len(),
                Store::max()
            );
            self.reject_field(sender, &what, &why);
        }
    }

    /// Logs a rejected message from someone who may not speak.
    fn reject(&mut self, sender: u32, text: &str, why: &str) {
        let asked = format!("{:?}", clip(text.trim_end(), LOGGED_BYTES));
        self.complain(format!(
            "tableflip keeper: rejected a message from pid {sender} ({why}): {asked}"
        ));
    }

    /// Logs a rejected field of a message from the main generation or its successor.
    fn reject_field(&mut self, sender: u32, what: &str, why: &str) {
        let asked = format!("{:?}", clip(what, LOGGED_BYTES));
        self.complain(format!(
            "tableflip keeper: rejected {asked} from pid {sender}: {why}"
        ));
    }

    fn complain(&mut self, line: String) {
        let c = &mut self.complaints;
        if c.since.elapsed() >= COMPLAINT_WINDOW {
            if c.dropped > 0 {
                say!(
                    "tableflip keeper: {} more rejected messages were not logged",
                    c.dropped
                );
            }
            *c = Complaints {
                since: Instant::now(),
                lines: 0,
                dropped: 0,
            };
        }
        if c.lines < COMPLAINTS {
            c.lines += 1;
            say!("{line}");
        } else {
            c.dropped += 1;
        }
    }
}

/// The value of `KEY=` in a notify message, from its first line that has it.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}
