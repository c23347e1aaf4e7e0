//! The shortest complete server, the program of the crate docs: it answers every TCP
//! connection with its pid, upgrades itself on an operator's `SIGHUP`, and exits once
//! the next generation has taken over (or on `SIGTERM`). `tcp_server` is the complete
//! version: a thread per connection, a drain before exit, a control socket.
//!
//! ```text
//! minimal [HOST:PORT]
//! ```
//!
//! It listens on `HOST:PORT` (default `127.0.0.1:8080`) and writes its pid to
//! `minimal.pid` in the current directory. Try (the README's quick start also deploys a
//! changed binary):
//!
//! ```text
//! cargo run --example minimal &
//! nc 127.0.0.1 8080                # hello from pid 4242
//! kill -HUP "$(cat minimal.pid)"   # upgrade: a new process takes over
//! nc 127.0.0.1 8080                # hello from pid 4250
//! kill -TERM "$(cat minimal.pid)"  # stop
//! ```

use std::io::Write;
use std::net::TcpListener;
use std::sync::Arc;

use signals::{Asked, Signals};
use tableflip::{Options, Upgrader};

// What a signal asks for (a SIGHUP from the kernel: nothing), shared by the examples.
#[path = "common/signals.rs"]
mod signals;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args().nth(1).unwrap_or("127.0.0.1:8080".into());
    if addr == "--help" {
        println!("usage: minimal [HOST:PORT]");
        return Ok(());
    }
    // First: a new generation starts with SIGHUP at its default, which is to die.
    let mut signals = Signals::new()?;
    let upg = Arc::new(Upgrader::new(Options::new().pid_file("minimal.pid"))?);

    // Upgrade on SIGHUP, stop on SIGTERM or SIGINT, from a thread of our own.
    let u = Arc::clone(&upg);
    std::thread::spawn(move || {
        for request in signals.forever() {
            log(&request.line);
            match request.asked {
                // On success, this generation's server thread ends (below).
                Asked::Upgrade => match u.upgrade() {
                    Ok(_) => {}
                    Err(e) => log(&format!("upgrade failed: {e}")),
                },
                Asked::Stop => u.stop(),
                Asked::Nothing => {}
            }
        }
    });

    // Inherited from the previous generation, or bound now.
    let listener: TcpListener = upg.fds().listen(addr.as_str())?;

    // Serve first, then report ready (the previous generation commits the upgrade).
    let u = Arc::clone(&upg);
    let server = std::thread::spawn(move || {
        // Until the next generation has taken over (or stop() was called).
        for conn in u.incoming(&listener) {
            match conn {
                Ok(mut conn) => {
                    let _ = writeln!(conn, "hello from pid {}", std::process::id());
                }
                Err(e) => log(&format!("accept: {e}")), // EMFILE and friends
            }
        }
    });
    upg.ready()?;
    log(&format!("ready, listening on {addr}"));
    server.join().ok(); // then finish in-flight work, and return
    Ok(())
}

/// One line to stderr with this process's pid, ignoring errors (`eprintln!` panics once
/// the terminal it writes to is gone).
fn log(line: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "[minimal pid={}] {line}",
        std::process::id()
    );
}
