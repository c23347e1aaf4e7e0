//! The control socket: whoever asks for an upgrade gets its result.
//!
//! A signal cannot carry an answer back: `systemctl reload` with
//! `ExecReload=/bin/kill -HUP $MAINPID` reports success whatever the upgrade did. A
//! [`Server`] listens on a Unix stream socket (a path or an abstract name); a client,
//! [`request_upgrade`], asks the running generation to upgrade and waits for the new
//! generation's pid or the error, with the new generation's own reason when it gave up
//! ([`Upgrader::fail`](crate::Upgrader::fail)). [`status`] asks what a generation is doing. The examples use it
//! as their own `ExecReload=`: `tcp_server --control /run/tcp_server/control.sock --upgrade`.
//!
//! Put the socket file in a directory of the service's own, that only its user and root
//! can write to (systemd's `RuntimeDirectory=`: `/run/NAME`), not in `/tmp`. An abstract
//! name (Linux) has no file and no owner: whoever binds it first has it, and another
//! user can bind it before the service starts. A client believes only some answers:
//! see [whom a client believes](#whom-a-client-believes).
//!
//! # Serving
//!
//! The crate starts no thread of its own accord: run [`Server::serve`] on a thread of
//! yours. It returns when the [exit notification](crate::Upgrader::exit) fires. For a poll
//! loop there is [`Server::serve_one`] and [`AsFd`](std::os::unix::io::AsFd).
//!
//! The socket travels to the next generation like any other listener: [`Server::listen`]
//! takes the inherited one from the [registry](crate::Fds) when there is one, so the
//! next generation serves on the same path and the same queue, and a client that
//! connects during the handover is answered by one generation or the other. Create the
//! `Server` before [`Upgrader::ready`](crate::Upgrader::ready) (which closes inherited fds nobody took), and
//! start serving once `ready()` has returned, so that requests that arrive meanwhile
//! are answered by the previous generation, still in charge.
//!
//! # Concurrency
//!
//! [`Upgrader::upgrade`](crate::Upgrader::upgrade) blocks until the new generation is ready (or has failed): up to
//! the upgrade timeout plus the probation. While it runs, `serve` must still answer: a
//! second `upgrade` request gets `UpgradeInProgress` at once, `status` says
//! `upgrading: yes`. So `serve` runs each upgrade on a [scoped
//! thread](std::thread::scope) of its own, named `tableflip-control`, at most one at a
//! time; it exists only while that upgrade runs and never outlives the `serve` call
//! that started it. Every other request (reading it, checking the peer, answering) is
//! handled by the serving thread itself with `poll(2)`, without blocking: a client that
//! sends half a request and stalls holds nothing but its own slot (at most
//! [`MAX_PENDING`] connections wait for their request; more stay in the kernel's
//! queue). A client that hangs up does not cancel the upgrade it asked for: the answer
//! is written when the upgrade ends, and lost if nobody reads it.
//!
//! [`Server::serve_one`] runs an upgrade on the calling thread: while it does, that
//! thread answers nobody else (later clients wait in the queue).
//!
//! # Access
//!
//! A socket file this crate creates has mode `0600` (or [`Config::mode`]). On Linux the
//! mode is set with `fchmod(2)` on the socket before `bind(2)`, which creates the file
//! with that mode (less the umask) from the start: there is no moment when the file is
//! more open than asked. If the umask removed bits the caller asked for, they are added
//! back with `chmod(2)` right after `bind`. Elsewhere `fchmod` does not reach the file,
//! so the mode is set with `chmod(2)` after `bind`, and for that moment the file has the
//! default mode less the umask: put the socket in a directory only the service's user
//! can enter (systemd's `RuntimeDirectory=` with `RuntimeDirectoryMode=0700`). An
//! abstract name has no file and no mode at all.
//!
//! Whatever the mode, every connection's peer is checked (`SO_PEERCRED` on Linux,
//! `getpeereid(3)` on BSD and macOS): by default only root and the user the server
//! runs as (its effective uid) are served; [`Config::allow_uid`] and
//! [`Config::allow_any_uid`] change that. Others get `PermissionDenied`.
//!
//! A socket file nobody listens on any more (a crashed process's: `connect` is
//! refused) is replaced when binding; a live one is never touched.
//!
//! The listening socket is non-blocking (`O_NONBLOCK`), in every generation alike: both
//! generations poll it during a handover, and a blocking `accept` could wait for a
//! connection the other one took. Besides a listener handed to
//! [`Upgrader::incoming`](crate::Upgrader::incoming), it is the one socket whose flags
//! the crate changes.
//! Never `SIGPIPE`: answers are sent with `MSG_NOSIGNAL` (`SO_NOSIGPIPE` on Apple).
//!
//! # Whom a client believes
//!
//! Before it sends its request, [`request_upgrade`] (and [`status`]) checks who listens
//! on the socket it reached: `SO_PEERCRED` (`getpeereid(3)` on BSD and macOS) of the
//! connected socket, the uid of the process listening there (as it was at `listen(2)`).
//! Otherwise a user who bound the name first could make root's `--upgrade` print a
//! made-up pid and succeed. The answer of a process running as root or as the client's
//! own user is always believed. When the caller names the uid the service runs as
//! ([`ClientConfig::server_uid`]), that uid's too, and no other. When it names none, a
//! process running as another uid is believed:
//!
//! - at a path, when that uid owns the socket file and the file's directory can be
//!   written only by root and that user (or the client's user), and by no group but
//!   the service user's own: then nobody else could have made the name. So root asking
//!   a service that runs as `www` on `/run/www/control.sock`, where `/run/www` belongs
//!   to `www`, just works. A socket in a directory every user can write to (`/tmp`,
//!   sticky or not) is refused: another user could have bound its name first. Only the
//!   socket's own directory is looked at, not those above it.
//! - at an abstract name, never: it has no owner. Name the service's uid.
//!
//! A process that is not believed is sent nothing; the client fails with
//! [`Error::ControlPeer`](crate::Error::ControlPeer), which names the socket, the uid
//! found and why.
//!
//! # The protocol, version 1
//!
//! One request per connection. The client sends one line (at most [`MAX_REQUEST`]
//! bytes with its `\n`; a `\r` before it is ignored):
//!
//! ```text
//! tableflip-control/1 upgrade
//! ```
//!
//! The commands are `upgrade` and `status`. The server answers with a status line, then
//! `key: value` lines, then an empty line, and closes the connection:
//!
//! ```text
//! tableflip-control/1 ok
//! pid: 4250
//!
//! ```
//!
//! ```text
//! tableflip-control/1 error ChildFailed
//! message: new generation (pid 4250) gave up: config line 12: unknown key (exit status: 1)
//!
//! ```
//!
//! An `upgrade` answer comes once the upgrade has ended: `pid:` is the new generation's.
//! An error's kind is the name of the server's [`Error`](crate::Error) variant (`ChildFailed`,
//! `ChildExited`, `ChildDiedAfterReady`, `Timeout`, `Exec`, `Notify`, `Stopped`,
//! `UpgradeInProgress`, `NotReady`, `AlreadyUpgraded`, `ParentAlive`, ...) or one of the
//! protocol's: `BadRequest` (not the protocol, too long, not UTF-8, cut off),
//! `UnsupportedVersion`, `UnknownCommand`, `RequestTimeout` (no complete request within
//! [`Config::request_timeout`], 5 s by default), `PermissionDenied`, `Exiting` (this
//! generation is exiting: ask again, the next one answers). `message:` is the error's
//! message (with the OS error behind it, if any) on one line.
//!
//! A `status` answer:
//!
//! ```text
//! tableflip-control/1 ok
//! pid: 4242
//! ready: yes
//! upgrading: no
//! started-by: 4237
//! last-upgrade: error ChildExited
//! last-upgrade-message: new generation (pid 4249) exited before it was ready: exit status: 3
//! last-upgrade-ended: 1767225600.250
//! record-v1: pid=4237 started=1767225500100 result=ok new=4242 ended=13412 ready=12107 probation=0 drain_ended=2104350 gone=2210044 handed=3 drained=10 forced=0
//! record-v1: pid=4242 started=1767225600240 result=error kind=ChildExited message=new%20generation%20(pid%204249)%20exited%20before%20it%20was%20ready:%20exit%20status:%203 ended=9870
//!
//! ```
//!
//! `started-by` is the pid of the generation whose upgrade started this one (absent
//! for a first start). `last-upgrade` is `none`, `ok` (with `last-upgrade-pid:`) or
//! `error KIND` (with `last-upgrade-message:`): the last upgrade this generation ran;
//! `last-upgrade-ended` is in seconds since the Unix epoch.
//!
//! `record-v1` comes once per [upgrade record](crate::UpgradeRecord), oldest first (at
//! most [`MAX_RECORDS`](crate::MAX_RECORDS)): the machine-readable form, `key=value`
//! fields separated by single spaces. `pid` ran the upgrade; `started` is in
//! milliseconds since the Unix epoch; `result` is `ok` (with `new`, the new generation's
//! pid) or `error` (with `kind` and `message`, %-escaped: every byte but letters, digits
//! and `-._~:/(),` as `%XX`); `ended`, `ready`, `probation`, `drain_ended` and `gone` are
//! microseconds after `started` (the fields of [`UpgradeRecord`]
//! of the same names); `handed`, `drained` and `forced` count connections (its
//! `handed_over`, `drained` and `force_closed`). A field not known is left out. The
//! version is the key's: a format an old client would misread comes under another key
//! (`record-v2`), which old clients ignore; fields may be added to `record-v1`, and
//! readers skip keys they do not know. [`status`] parses them as strictly as a
//! generation parses the records it inherits, and fails on a bad one.
//! Values are one line each, control characters replaced by spaces, at most
//! [`MAX_VALUE`] bytes; an answer is at most [`MAX_ANSWER`] bytes. Clients ignore keys
//! they do not know; a later version adds keys or commands and changes the version
//! token only for changes an old client would misread. By hand:
//! `printf 'tableflip-control/1 status\n' | socat - UNIX-CONNECT:/run/tcp_server.sock`.
//!
//! # References
//! - [unix(7)](https://man7.org/linux/man-pages/man7/unix.7.html): `SO_PEERCRED`,
//!   socket file permissions, abstract names
//! - [getpeereid(3)](https://man.freebsd.org/cgi/man.cgi?query=getpeereid)
//! - [send(2)](https://man7.org/linux/man-pages/man2/send.2.html): `MSG_NOSIGNAL`

use std::time::Duration;

mod client;
mod protocol;
mod server;

pub use crate::status::{Status, UpgradeFailure, UpgradeRecord};
pub use client::{request_upgrade, status, ClientConfig};
pub use server::{Config, Server};

/// The protocol and its version: the first word of every request and answer.
pub const VERSION: &str = "tableflip-control/1";
/// The longest request, in bytes, its `\n` included.
pub const MAX_REQUEST: usize = 256;
/// The longest answer a client reads, in bytes.
pub const MAX_ANSWER: usize = 16 * 1024;
/// The longest value in an answer, in bytes.
pub const MAX_VALUE: usize = 4096;
/// How many accepted connections may wait for their request at once.
pub const MAX_PENDING: usize = 32;

/// What every version token starts with.
const PROTOCOL: &[u8] = b"tableflip-control/";
/// Connections accepted per wake-up, at most, before the exit notification and the
/// waiting clients are looked at again.
const ACCEPT_BATCH: usize = 64;
/// How long `serve` backs off after `accept` failed for lack of fds or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
