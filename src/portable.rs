//! The API that every platform has, named once.
//!
//! This module is compiled on every target and never run. On Unix it type-checks the
//! real crate, elsewhere the stub (`unsupported.rs`): a signature that differs between
//! the two breaks the build of one of them, so they cannot drift apart unnoticed. A
//! public method that exists on both belongs here; one that takes or returns a Unix-only
//! type (`OwnedFd`, `UnixListener`, ...) does not. `Options` and `Error` are one and the
//! same code everywhere and need no entry.
#![allow(dead_code)]

use std::fmt;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use crate::{
    handover, Address, Adoption, Error, ExitHandle, Fds, InheritedFd, Keeper, Options, Result,
    UnixAddr, Upgrader, Wake, MAX_STATE_SIZE,
};

fn shared<T: fmt::Debug + Send + Sync>() {}
fn data<T: fmt::Debug + fmt::Display + Clone + PartialEq + Eq + Send + Sync>() {}
fn report<T: fmt::Debug + fmt::Display + Default + Send + Sync>() {}

fn types() {
    shared::<Upgrader>();
    shared::<Fds>();
    shared::<ExitHandle>();
    shared::<Error>();
    report::<Adoption>();
    shared::<handover::Sender>();
    shared::<handover::Receiver>();
    let _: [usize; 4] = [
        handover::MAX_FDS,
        handover::MAX_UNREAD,
        handover::MAX_STATE,
        handover::MAX_MESSAGE,
    ];
    let _: u8 = handover::VERSION;
    data::<InheritedFd>();
    data::<UnixAddr>();
    let _: Adoption = Adoption::default();
    let _: Wake = Wake::Readable;
    let _ = (Wake::Exit, Wake::TimedOut);
    let _: u64 = MAX_STATE_SIZE;
    let _: Error = Error::Unsupported { op: "", needs: "" };
}

fn keeper() -> Result<()> {
    let keeper: Keeper = Keeper::new()
        .restart_limit(5, Duration::ZERO)
        .backoff(Duration::ZERO, Duration::ZERO)
        .stop_timeout(Duration::ZERO)
        .takeover_timeout(Duration::ZERO);
    shared::<Keeper>();
    let _: Keeper = keeper.clone();
    let _: Keeper = Keeper::default();
    keeper.run()
}

fn upgrader(upg: &Upgrader, listener: &TcpListener) -> Result<()> {
    let _: Result<Upgrader> = Upgrader::new(Options::new());
    let _: &Fds = upg.fds();
    let _: bool = upg.has_parent();
    let _: bool = upg.wait_for_parent(Duration::ZERO)?;
    let adoption: Adoption = upg.ready()?;
    let _: &Vec<InheritedFd> = &adoption.taken;
    let _: &Vec<InheritedFd> = &adoption.closed;
    if let Some(rx) = &adoption.handover {
        let _: u32 = rx.pid();
    }
    let _: Result<handover::Sender> = upg.handover().map(|tx| {
        let _: u32 = tx.pid();
        tx
    });
    upg.set_state(b"")?;
    let _: Option<Vec<u8>> = upg.take_state()?;
    let _: u32 = upg.upgrade()?;
    upg.stop();
    upg.wait_for_exit();
    let exit: ExitHandle = upg.exit_handle()?;
    exit.wait();
    let _: bool = exit.fired();
    #[cfg(any(unix, windows))]
    let _: Wake = upg.wait_readable(listener, Some(Duration::ZERO));
    let _ = listener;
    let _: bool = upg.upgraded();
    let _: bool = upg.should_exit();
    upg.fail("reason")
}

fn fds(fds: &Fds, addr: impl Address + Copy, listener: &TcpListener) -> Result<()> {
    let _: Fds = Fds::standalone();
    let inherited: Vec<InheritedFd> = fds.inherited();
    for InheritedFd { fd, kind, key } in inherited {
        let _: (i32, &'static str, String) = (fd, kind, key);
    }
    let _: TcpListener = fds.listen_tcp(addr)?;
    #[cfg(any(unix, windows))]
    let _: TcpListener = fds.listen_tcp_with(addr, |_socket| Ok(()))?;
    let _: Vec<TcpListener> = fds.listen_tcp_group(addr, 2)?;
    let _: Vec<TcpListener> = fds.tcp_listener_group(addr)?;
    let _: Option<TcpListener> = fds.tcp_listener(addr)?;
    fds.add_tcp_listener(listener)?;
    let stream: Option<TcpStream> = fds.tcp_stream("name")?;
    if let Some(stream) = &stream {
        fds.add_tcp_stream("name", stream)?;
    }
    let udp: UdpSocket = fds.listen_udp(addr)?;
    #[cfg(any(unix, windows))]
    let _: UdpSocket = fds.listen_udp_with(addr, |_socket| Ok(()))?;
    let _: Vec<UdpSocket> = fds.listen_udp_group(addr, 2)?;
    let _: Option<UdpSocket> = fds.udp_socket(addr)?;
    fds.add_udp_socket(&udp)
}

fn unix_addr(path: &std::path::Path) -> String {
    let addrs: [UnixAddr; 6] = [
        UnixAddr::abstract_name("name"),
        UnixAddr::from(path),
        UnixAddr::from(path.to_path_buf()),
        UnixAddr::from(&path.to_path_buf()),
        UnixAddr::from("/run/app.sock"),
        UnixAddr::from(String::new()),
    ];
    match &addrs[0] {
        UnixAddr::Path(p) => p.display().to_string(),
        UnixAddr::Abstract(name) => String::from_utf8_lossy(name).into_owned(),
    }
}
