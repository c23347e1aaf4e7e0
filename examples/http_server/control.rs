//! The control socket (`--control`, `--upgrade`), kept apart from the HTTP code.

use std::ffi::OsString;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tableflip::control::{request_upgrade, ClientConfig, Server};
use tableflip::{UnixAddr, Upgrader};

use super::{error_chain, Config};

/// `@NAME` is an abstract socket name, anything else a path.
pub fn addr(v: OsString) -> UnixAddr {
    match v.to_str().and_then(|s| s.strip_prefix('@')) {
        Some(name) => UnixAddr::abstract_name(name),
        None => UnixAddr::Path(v.into()),
    }
}

/// `--upgrade`: asks the server to upgrade and waits (its timeout and probation, and
/// a margin).
pub fn ask_upgrade(config: &Config) -> ExitCode {
    let Some(addr) = config.control.clone() else {
        eprintln!("http_server: --upgrade needs --control");
        return ExitCode::from(2);
    };
    let wait = config.upgrade_timeout + config.probation + Duration::from_secs(10);
    let mut client = ClientConfig::new(wait);
    if let Some(uid) = config.control_uid {
        client = client.server_uid(uid);
    }
    match request_upgrade(addr, client) {
        Ok(pid) => {
            println!("{pid}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("http_server: upgrade failed: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

pub fn listen(config: &Config, upg: &Upgrader) -> tableflip::Result<Option<Server>> {
    config
        .control
        .clone()
        .map(|addr| Server::listen(upg, addr))
        .transpose()
}

/// Serves on a thread of its own until this process should exit.
pub fn serve(
    server: Option<Server>,
    upg: &Arc<Upgrader>,
) -> std::io::Result<Option<JoinHandle<()>>> {
    let Some(server) = server else {
        return Ok(None);
    };
    let upg = Arc::clone(upg);
    thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            if let Err(e) = server.serve(&upg) {
                log!("control socket failed: {}", error_chain(&e));
            }
        })
        .map(Some)
}
