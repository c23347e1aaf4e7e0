//! The handover channel, both ends: the old generation opens it to its connection tasks
//! and waits for them to go ([`hand_over`]); the new one takes the connections that come
//! and serves them ([`adopt`]). A connection travels with the bytes read from it and not
//! used, and two bytes of state under [`HANDOVER_TAG`].

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tableflip::handover::{Receiver, Stream};
use tableflip::Upgrader;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::sniff::Proto;
use crate::{error_chain, Conn, Ctx, Phase};

/// How long an exiting generation waits for the connections busy with a request to
/// reach their next idle moment and be handed over; then the rest drain as lame ducks.
const HANDOVER_WINDOW: Duration = Duration::from_secs(5);
/// How long the new generation has to acknowledge the connections handed to it.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);
/// The handover's tag for a connection of this example (`"HTv1"`). Its state is two
/// bytes: the protocol (0: not known yet, 1: HTTP/1), and 1 if no request has been
/// served on it yet, else 0.
pub const HANDOVER_TAG: u32 = u32::from_be_bytes(*b"HTv1");

/// The old generation, upgraded: opens the handover to the connection tasks, which hand
/// their HTTP/1 connections over at their next idle moment; waits for them (at most
/// [`HANDOVER_WINDOW`]), closes it, and serves as lame ducks the connections that stay
/// (refused, not acknowledged in time). Returns how many went.
pub async fn hand_over(upg: &Upgrader, ctx: &Arc<Ctx>) -> usize {
    match upg.handover() {
        Ok(sender) => *ctx.sender() = Some(sender),
        Err(e) => {
            log!(
                "no handover ({}): every connection drains here",
                error_chain(&e)
            );
            return 0;
        }
    }
    ctx.phase.send_replace(Phase::HandOver);
    let deadline = Instant::now() + HANDOVER_WINDOW;
    loop {
        // Wakes up now and then to read the answers, so that the new generation always
        // has room to send them.
        let wait = deadline.min(Instant::now() + Duration::from_millis(20));
        let done = tokio::time::timeout_at(wait, ctx.alive.closed())
            .await
            .is_ok();
        let refused = match ctx.sender().as_ref() {
            Some(sender) => sender.answers().unwrap_or_default(),
            None => Vec::new(),
        };
        for back in refused {
            ctx.stay(back);
        }
        if done || Instant::now() >= deadline {
            break;
        }
    }
    // Nothing more is handed over: what is still busy drains here.
    let Some(sender) = ctx.sender().take() else {
        return 0;
    };
    ctx.phase
        .send_replace(Phase::Drain(Instant::now() + ctx.lame_duck));
    // finish() waits for the answers: on a blocking thread.
    match tokio::task::spawn_blocking(move || sender.finish(HANDOVER_TIMEOUT)).await {
        Ok(Ok(done)) => {
            log!("{done}");
            let went = done.accepted + done.given;
            for back in done.returned {
                ctx.stay(back);
            }
            went
        }
        Ok(Err(e)) => {
            log!("handover: {}", error_chain(&e));
            0
        }
        Err(e) => {
            log!("handover: {e}");
            0
        }
    }
}

/// The new generation: takes the connections the previous one hands over, on the
/// blocking thread that reported ready, and serves each in a task like the ones it
/// accepts, with the bytes the previous generation had read from it.
pub fn adopt(mut rx: Receiver, upg: &Upgrader, ctx: &Arc<Ctx>, runtime: &tokio::runtime::Handle) {
    loop {
        match rx.recv() {
            Ok(Some(incoming)) => {
                // What it says of itself comes from the previous generation: checked.
                let known = match (incoming.tag(), incoming.is_tcp(), incoming.state()) {
                    (HANDOVER_TAG, true, &[0, first @ (0 | 1)]) => Some((None, first == 1)),
                    (HANDOVER_TAG, true, &[1, first @ (0 | 1)]) => {
                        Some((Some(Proto::Http1), first == 1))
                    }
                    _ => None,
                };
                let Some((proto, first)) = known else {
                    log!("handover: refusing {incoming:?}: not a connection of ours");
                    let _ = incoming.refuse();
                    continue;
                };
                match incoming.accept() {
                    Ok((Stream::Tcp(stream), unread, _)) => {
                        let ctx = Arc::clone(ctx);
                        let conn = move || -> io::Result<Conn> {
                            stream.set_nonblocking(true)?;
                            let stream = TcpStream::from_std(stream)?;
                            Ok(Conn::adopted(stream, unread, proto, first))
                        };
                        // from_std needs the runtime: in a task.
                        runtime.spawn(async move {
                            match conn() {
                                Ok(conn) => ctx.spawn(conn),
                                Err(e) => log!("handover: {e}"),
                            }
                        });
                    }
                    Ok(_) => {} // is_tcp() said TCP
                    Err(e) => log!("handover: {}", error_chain(&e)),
                }
            }
            // Nothing more for now: wait for more, or for this generation's own exit
            // (then the next recv() refuses what is left and ends).
            Ok(None) => {
                let _ = upg.exit().wait_readable(&rx, None);
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
