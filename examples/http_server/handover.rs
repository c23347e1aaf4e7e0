//! The handover channel, both ends: the old generation opens it to its connection
//! threads and waits for them to go ([`hand_over`]), and serves here what comes back
//! ([`stay`]); the new generation takes the connections that come and serves them
//! ([`adopt`]). A connection thread offers its connection between two requests
//! ([`Handover::offer`]), with the bytes read from it and not used, and one byte of
//! state under [`HANDOVER_TAG`].

use std::net::TcpStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tableflip::handover::{Receiver, Sender, Stream};

use crate::{error_chain, spawn_handler, Conn, Shared};

/// The handover's tag for an HTTP/1.1 connection between two requests (`"H1.1"`). Its
/// state is one byte: 1 if no request has been served on it yet, else 0.
const HANDOVER_TAG: u32 = u32::from_be_bytes(*b"H1.1");
/// How long an exiting generation waits for the connections busy with a request to
/// reach their next idle moment and be handed over; then the rest drain as lame ducks.
pub const HANDOVER_WINDOW: Duration = Duration::from_secs(5);
/// How long the new generation has to acknowledge the connections handed to it.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// The old generation, upgraded: opens the handover to the connection threads, which
/// hand their connections over at their next idle moment; waits for them (at most
/// [`HANDOVER_WINDOW`]), closes it, and serves as lame ducks the connections that stay
/// (refused, not acknowledged in time). Returns how many went.
pub fn hand_over(shared: &Arc<Shared>) -> usize {
    let sender = match shared.upg.handover() {
        Ok(sender) => sender,
        Err(e) => {
            log!(
                "no handover ({}): every connection drains here",
                error_chain(&e)
            );
            shared.handover.close();
            return 0;
        }
    };
    shared.handover.open(sender);
    let deadline = Instant::now() + HANDOVER_WINDOW;
    loop {
        // Wakes up now and then to read the answers, so that the new generation always
        // has room to send them.
        let left = shared
            .conns
            .wait_idle(deadline.min(Instant::now() + Duration::from_millis(20)));
        for back in shared.handover.answers() {
            stay(back, shared);
        }
        if left == 0 || Instant::now() >= deadline {
            break;
        }
    }
    let Some(sender) = shared.handover.close() else {
        return 0;
    };
    match sender.finish(HANDOVER_TIMEOUT) {
        Ok(done) => {
            log!("{done}");
            let went = done.accepted + done.given;
            for back in done.returned {
                stay(back, shared);
            }
            went
        }
        Err(e) => {
            log!("handover: {}", error_chain(&e));
            0
        }
    }
}

/// A connection that stays in this generation (the new one refused it, or did not
/// acknowledge it in time): served here, as a lame duck, and never offered again.
fn stay(back: tableflip::handover::Returned, shared: &Arc<Shared>) {
    log!(
        "connection {} stays: {}",
        back.id,
        error_chain(&back.reason)
    );
    if let Stream::Tcp(stream) = back.stream {
        let first = back.state.first() == Some(&1);
        spawn_handler(Conn::stays(stream, back.unread, first), shared);
    }
}

/// The new generation: takes the connections the previous one hands over, and serves
/// them like the ones it accepts. Each comes with the bytes the previous generation
/// had read and not used, which are the start of its next request (if any), and one
/// byte of state.
pub fn adopt(mut rx: Receiver, shared: &Arc<Shared>) {
    loop {
        match rx.recv() {
            Ok(Some(incoming)) => {
                // What it says of itself comes from the previous generation: checked.
                let known = incoming.tag() == HANDOVER_TAG
                    && incoming.is_tcp()
                    && matches!(incoming.state(), [0] | [1]);
                if !known {
                    log!("handover: refusing {incoming:?}: not an HTTP/1.1 connection of ours");
                    let _ = incoming.refuse();
                    continue;
                }
                match incoming.accept() {
                    Ok((Stream::Tcp(stream), unread, state)) => {
                        spawn_handler(Conn::adopted(stream, unread, state == [1]), shared)
                    }
                    Ok(_) => {} // is_tcp() said TCP
                    Err(e) => log!("handover: {}", error_chain(&e)),
                }
            }
            // Nothing more for now: wait for more, or for this generation's own exit
            // (then the next recv() refuses what is left and ends).
            Ok(None) => {
                let _ = shared.upg.exit().wait_readable(&rx, None);
            }
            Err(tableflip::Error::HandoverRefused { reason, .. }) => {
                log!("handover: refused something that arrived: {reason}")
            }
            Err(tableflip::Error::HandoverEnded { .. }) => return,
            Err(e) => {
                log!("handover: {}", error_chain(&e));
                return;
            }
        }
    }
}

/// Where the connection threads of an exiting generation hand their connections over:
/// the sending end of the handover channel, while it takes connections.
#[derive(Default)]
pub struct Handover {
    channel: Mutex<Channel>,
    decided: Condvar,
}

#[derive(Default)]
enum Channel {
    /// Serving, or told to exit a moment ago: the main thread decides.
    #[default]
    Undecided,
    /// Hand connections over here (boxed: the enum stays small).
    Open(Box<Sender>),
    /// Nothing (more) is handed over: what is left drains as lame ducks.
    Closed,
}

impl Handover {
    fn lock(&self) -> std::sync::MutexGuard<'_, Channel> {
        self.channel.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The channel, once the main thread has decided.
    fn decided(&self) -> std::sync::MutexGuard<'_, Channel> {
        let mut channel = self.lock();
        while matches!(*channel, Channel::Undecided) {
            channel = self
                .decided
                .wait(channel)
                .unwrap_or_else(|e| e.into_inner());
        }
        channel
    }

    fn open(&self, sender: Sender) {
        *self.lock() = Channel::Open(Box::new(sender));
        self.decided.notify_all();
    }

    /// Nothing more is handed over; returns the sender, if it was open.
    pub fn close(&self) -> Option<Sender> {
        let was = std::mem::replace(&mut *self.lock(), Channel::Closed);
        self.decided.notify_all();
        match was {
            Channel::Open(sender) => Some(*sender),
            _ => None,
        }
    }

    /// Whether a connection would be handed over now (`stays`: it came back once).
    pub fn takes(&self, stays: bool) -> bool {
        !stays && matches!(*self.decided(), Channel::Open(_))
    }

    /// Once this generation should exit: hands `stream` to the new generation with the
    /// bytes read from it and not used, or gives it back if nothing is handed over (any
    /// more). Never waits for the new generation.
    pub fn offer(
        &self,
        stream: TcpStream,
        unread: &[u8],
        first: bool,
        stays: bool,
    ) -> Result<(), TcpStream> {
        let channel = self.decided();
        match &*channel {
            Channel::Open(sender) if !stays => {
                // Sent, or (over a limit, or the channel over) kept by the sender, which
                // gives it back in `answers` or `finish`: either way not ours now.
                let _ = sender.send(stream, unread, HANDOVER_TAG, &[u8::from(first)]);
                let _ = sender.flush();
                Ok(())
            }
            _ => Err(stream),
        }
    }

    /// The connections the new generation has refused so far.
    fn answers(&self) -> Vec<tableflip::handover::Returned> {
        match &*self.lock() {
            Channel::Open(sender) => sender.answers().unwrap_or_default(),
            _ => Vec::new(),
        }
    }
}
