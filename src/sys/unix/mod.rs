//! Graceful upgrades on Unix: everything behind the portable types ([`Upgrader`],
//! [`Fds`], [`Exit`]), chosen for Unix targets by one `cfg` in `lib.rs`.
//!
//! [`Upgrader`]: crate::Upgrader
//! [`Fds`]: crate::Fds
//! [`Exit`]: crate::Exit
//!
//! | module | what it holds |
//! |---|---|
//! | [`generation`] | a generation's life: new, ready, upgrade, stop |
//! | [`announce`] | what a generation tells the world: pid file, notify socket, fd store |
//! | [`handshake`] | how two generations shake hands: the pipes and the commit |
//! | [`spawn`] | the parent's side of starting the next generation |
//! | [`child`] | the only code between fork and exec |
//! | [`wire`] | the fd table's format |
//! | [`inherit`] | adopting the fd table in the new generation |
//! | [`registry`] | the sockets and files that travel on |
//! | [`socket`] | what a socket is, and whether an inherited fd is one |
//! | [`exit`] | the exit notification |
//! | [`systemd`] | the notify protocol, socket activation, the fd store |
//! | [`pidfile`], [`safe_dir`] | the pid file, in a directory nobody else can write |
//! | [`state`] | the state blob handed over |
//! | [`records`] | the upgrade records: kept, passed on at the commit, completed after it |
//! | [`process`], [`os`], [`batch`] | a child process, system-call helpers, closing fds in ranges |

pub(crate) mod announce;
pub(crate) mod batch;
pub(crate) mod child;
pub(crate) mod exit;
pub(crate) mod generation;
pub(crate) mod handshake;
pub(crate) mod inherit;
pub(crate) mod os;
pub(crate) mod pidfile;
pub(crate) mod process;
pub(crate) mod records;
pub(crate) mod registry;
pub(crate) mod safe_dir;
pub(crate) mod socket;
pub(crate) mod spawn;
pub(crate) mod state;
pub(crate) mod systemd;
pub(crate) mod wire;

pub(crate) use exit::{Drain, Exit};
pub(crate) use generation::Generation;
pub(crate) use registry::Registry;
