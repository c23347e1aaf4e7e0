//! The registry on its own (`Fds::standalone`), in this process: binding, errors, stale
//! socket files, `SOCK_SEQPACKET`, names the kernel chooses, per-call setup. No
//! `Upgrader`, so these run in parallel test threads, as users' own tests would.
#![cfg(target_os = "linux")]

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use tableflip::{Error, Options, SeqpacketListener, Upgrader};

fn scratch(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("tf-reg-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What a chain printer shows: the message, then every `source()`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[test]
fn errors_show_the_os_reason_once_and_name_the_address() {
    let dir = scratch("errors");
    let path = dir.join("busy.sock");
    let _live = UnixListener::bind(&path).unwrap();
    let fds_upg = standalone();
    let fds = fds_upg.fds();
    let err = fds.listen::<UnixListener>(path.as_path()).unwrap_err();
    assert!(matches!(err, Error::Listen { .. }), "{err:?}");
    let shown = err.to_string();
    assert!(shown.contains(&path.display().to_string()), "{shown}");
    assert!(shown.contains("Address already in use"), "{shown}");
    assert_eq!(chain(&err).matches("Address already in use").count(), 1);
    assert_eq!(
        err.io_error().map(std::io::Error::kind),
        Some(std::io::ErrorKind::AddrInUse)
    );

    // An address that does not resolve is named too.
    let err = fds.listen::<TcpListener>("localhost:99999").unwrap_err();
    assert!(err.to_string().contains("localhost:99999"), "{err}");
    assert!(err.io_error().is_some(), "{err:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_stale_socket_file_is_replaced_and_nothing_else_is_touched() {
    let dir = scratch("stale");
    let fds_upg = standalone();
    let fds = fds_upg.fds();

    // Left by a process that died: std does not unlink on drop.
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let ln = fds.listen::<UnixListener>(stale.as_path()).unwrap();
    let mut client = UnixStream::connect(&stale).unwrap();
    let (mut served, _) = ln.accept().unwrap();
    served.write_all(b"ok").unwrap();
    let mut buf = [0u8; 2];
    client.read_exact(&mut buf).unwrap();

    // Datagram sockets alike.
    let stale_dgram = dir.join("stale.dgram");
    drop(UnixDatagram::bind(&stale_dgram).unwrap());
    fds.listen::<UnixDatagram>(stale_dgram.as_path()).unwrap();

    // A live listener is never removed.
    let live = dir.join("live.sock");
    let live_ln = UnixListener::bind(&live).unwrap();
    assert!(fds.listen::<UnixListener>(live.as_path()).is_err());
    UnixStream::connect(&live).unwrap();
    live_ln.accept().unwrap();

    // Nor a live one whose queue is full (its connect would block).
    let full = dir.join("full.sock");
    let full_ln = rustix::net::socket(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::STREAM,
        None,
    )
    .unwrap();
    rustix::net::bind(&full_ln, &rustix::net::SocketAddrUnix::new(&full).unwrap()).unwrap();
    rustix::net::listen(&full_ln, 0).unwrap();
    // Fill its queue with non-blocking connects until the kernel says EAGAIN.
    let full_addr = rustix::net::SocketAddrUnix::new(&full).unwrap();
    let mut clients = Vec::new();
    loop {
        let c = rustix::net::socket_with(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::NONBLOCK,
            None,
        )
        .unwrap();
        match rustix::net::connect(&c, &full_addr) {
            Ok(()) => clients.push(c),
            Err(rustix::io::Errno::AGAIN) => break,
            Err(e) => panic!("connect: {e}"),
        }
        assert!(clients.len() < 1000);
    }
    assert!(fds.listen::<UnixListener>(full.as_path()).is_err());
    assert!(full.exists());

    // Nor a file that is no socket.
    let plain = dir.join("plain");
    std::fs::write(&plain, "data").unwrap();
    assert!(fds.listen::<UnixListener>(plain.as_path()).is_err());
    assert_eq!(std::fs::read_to_string(&plain).unwrap(), "data");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn seqpacket_listeners_keep_message_boundaries_and_can_be_added() {
    let dir = scratch("seqpacket");
    let path = dir.join("p.sock");
    let fds_upg = standalone();
    let fds = fds_upg.fds();
    let ln = fds.listen::<SeqpacketListener>(path.as_path()).unwrap();
    let client = rustix::net::socket(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        None,
    )
    .unwrap();
    rustix::net::connect(&client, &rustix::net::SocketAddrUnix::new(&path).unwrap()).unwrap();
    rustix::io::write(&client, b"one").unwrap();
    rustix::io::write(&client, b"two").unwrap();
    let (mut served, _) = ln.accept().unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(served.read(&mut buf).unwrap(), 3, "one message per read");
    assert_eq!(&buf[..3], b"one");
    // The same address again: the same socket.
    let again = fds.listen::<SeqpacketListener>(path.as_path()).unwrap();
    assert_eq!(inode(again.as_fd()), inode(ln.as_fd()));
    // Asked for as a stream listener: not the same kind.
    assert!(fds.listen::<UnixListener>(path.as_path()).is_err());

    // One made elsewhere is registered as what it is.
    let other_upg = standalone();
    let other = other_upg.fds();
    other.add(&ln).unwrap();
    let found = other.listen::<SeqpacketListener>(path.as_path()).unwrap();
    assert_eq!(inode(found.as_fd()), inode(ln.as_fd()));
    let _ = std::fs::remove_dir_all(dir);
}

fn inode(fd: BorrowedFd<'_>) -> u64 {
    rustix::fs::fstat(fd).unwrap().st_ino as u64
}

#[test]
fn an_empty_path_lets_the_kernel_choose_each_name() {
    use std::os::linux::net::SocketAddrExt;
    let fds_upg = standalone();
    let fds = fds_upg.fds();
    let a = fds.listen::<UnixListener>("").unwrap();
    let b = fds.listen::<UnixListener>("").unwrap();
    let d = fds.listen::<UnixDatagram>("").unwrap();
    let name = |addr: std::os::unix::net::SocketAddr| addr.as_abstract_name().map(<[u8]>::to_vec);
    let (na, nb) = (
        name(a.local_addr().unwrap()).unwrap(),
        name(b.local_addr().unwrap()).unwrap(),
    );
    assert_ne!(na, nb, "each empty name is a socket of its own");
    assert_eq!(na.len(), 5);
    assert!(name(d.local_addr().unwrap()).is_some());
    // Reachable under the name it got.
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(&na).unwrap();
    UnixStream::connect_addr(&addr).unwrap();
    a.accept().unwrap();
}

#[test]
fn per_call_setup_runs_for_a_new_socket_only() {
    let fds_upg = standalone();
    let fds = fds_upg.fds();
    let calls = AtomicUsize::new(0);
    let ln = fds
        .listen_with::<TcpListener>("127.0.0.1:0", |fd| {
            calls.fetch_add(1, Ordering::SeqCst);
            rustix::net::sockopt::set_socket_recv_buffer_size(fd, 65536)?;
            Ok(())
        })
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let addr = ln.local_addr().unwrap();
    let again = fds
        .listen_with::<TcpListener>(addr, |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    assert_eq!(again.local_addr().unwrap(), addr);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "not called for a socket in use"
    );
    // Its error is the listen call's.
    let err = fds
        .listen_with::<UdpSocket>("127.0.0.1:0", |_| {
            Err(std::io::Error::other("setup refused"))
        })
        .unwrap_err();
    assert!(err.to_string().contains("setup refused"), "{err}");
}

/// The setup function runs without the registry's lock: it may use the registry.
#[test]
fn per_call_setup_may_use_the_registry() {
    let upg = Arc::new(standalone());
    let (tx, rx) = mpsc::channel();
    let f = Arc::clone(&upg);
    std::thread::spawn(move || {
        let inner = Arc::clone(&f);
        let result = f
            .fds()
            .listen_with::<TcpListener>("127.0.0.1:0", move |fd| {
                let _ = format!("{:?} {:?}", inner.fds(), inner.fds().inherited());
                let _ = inner.fds().listen::<UdpSocket>("127.0.0.1:0");
                let _ = fd.as_raw_fd();
                Ok(())
            });
        let _ = tx.send(result.is_ok());
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(20)),
        Ok(true),
        "deadlocked (or failed) in the setup function"
    );
}

#[test]
fn standalone_registries_work_side_by_side() {
    let threads: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(|| {
                let fds_upg = standalone();
                let fds = fds_upg.fds();
                let ln = fds.listen::<TcpListener>("127.0.0.1:0").unwrap();
                assert!(fds.inherited().is_empty());
                ln.local_addr().unwrap().port()
            })
        })
        .collect();
    for t in threads {
        assert_ne!(t.join().unwrap(), 0);
    }
}

/// A registry of its own (an `Upgrader` for tests): any number at once.
fn standalone() -> Upgrader {
    Upgrader::standalone(Options::new()).unwrap()
}
