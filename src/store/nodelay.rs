//! Nagle's algorithm off for the PostgreSQL store's TCP connections.
//!
//! sqlx 0.9.0 opens its TCP sockets without `TCP_NODELAY` (transact-rs/sqlx#4335; the fix,
//! #4336, is merged but not released). A router batch's INSERT is larger than a TCP segment,
//! so its last partial segment waited for the server's delayed ACK, ~40 ms a batch: measured,
//! the hop ran at ~1,450 messages/s over TCP on loopback against ~3,800 over the Unix socket.
//! sqlx gives no hook to the socket, so after each new connection every TCP socket of this
//! process whose peer port is the server's and that still has Nagle on is switched to
//! `TCP_NODELAY`, which is what libpq, and sqlx before 0.9, do anyway. Sockets to other
//! services with the same port lose nothing by it. Remove this when a sqlx release sets it.

use std::os::fd::{BorrowedFd, RawFd};

use socket2::SockRef;

/// Sets `TCP_NODELAY` on every TCP socket of this process connected to `port` that does not
/// have it; returns how many it set. Does nothing where `/proc/self/fd` cannot be read.
pub(super) fn switch_off_nagle(port: u16) -> usize {
    let mut switched = 0;
    for_each_tcp_socket_to(port, |socket| {
        if socket.tcp_nodelay().is_ok_and(|on| !on) && socket.set_tcp_nodelay(true).is_ok() {
            switched += 1;
        }
    });
    switched
}

/// Whether this process's TCP socket bound to local port `local` has `TCP_NODELAY` (none such:
/// `None`).
#[cfg(test)]
pub(super) fn nodelay_of_local_port(local: u16) -> Option<bool> {
    let mut found = None;
    for_each_tcp_socket(|socket| {
        let bound_there = socket
            .local_addr()
            .ok()
            .and_then(|address| address.as_socket())
            .is_some_and(|address| address.port() == local);
        if bound_there {
            found = socket.tcp_nodelay().ok();
        }
    });
    found
}

fn for_each_tcp_socket_to(port: u16, mut visit: impl FnMut(SockRef<'_>)) {
    for_each_tcp_socket(|socket| {
        let to_port = socket
            .peer_addr()
            .ok()
            .and_then(|peer| peer.as_socket())
            .is_some_and(|peer| peer.port() == port);
        if to_port {
            visit(socket);
        }
    });
}

fn for_each_tcp_socket(mut visit: impl FnMut(SockRef<'_>)) {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<RawFd>().ok())
        else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: `fd` was open in this process a moment ago, when `/proc/self/fd` listed it,
        // and the borrow ends within this iteration. If another thread closed it in between,
        // the calls below fail with EBADF, or, should the number have been reused already, ask
        // another descriptor for its peer and at most turn Nagle off on a TCP socket: nothing
        // is read from or written to any descriptor, and none is closed.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = SockRef::from(&borrowed);
        let tcp = socket
            .r#type()
            .is_ok_and(|kind| kind == socket2::Type::STREAM)
            && socket
                .local_addr()
                .is_ok_and(|address| address.as_socket().is_some());
        if tcp {
            visit(socket);
        }
    }
}
