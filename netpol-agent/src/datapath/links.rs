//! Link notifications from the kernel (rtnetlink group `RTMGRP_LINK`): a pod's veth gets
//! the programs within milliseconds of being created, not at the next resync. The
//! messages are not parsed: any link change means "look at the interfaces again", which
//! [`super::Datapath::attach_new_interfaces`] does from the kernel's own list.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
};
use tokio::sync::Notify;
use tracing::warn;

/// Wakes whoever waits on [`LinkEvents::changed`] after any link appears, changes or
/// goes away in the agent's network namespace.
pub struct LinkEvents {
    notify: Arc<Notify>,
}

impl LinkEvents {
    /// Subscribes in the current network namespace; a thread reads the socket.
    pub fn subscribe() -> std::io::Result<Self> {
        let fd: OwnedFd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        bind(
            fd.as_raw_fd(),
            &NetlinkAddr::new(0, libc::RTMGRP_LINK as u32),
        )?;
        let notify = Arc::new(Notify::new());
        let waker = notify.clone();
        std::thread::Builder::new()
            .name("netlink-links".into())
            .spawn(move || read_loop(&fd, &waker))?;
        Ok(LinkEvents { notify })
    }

    /// Resolves after the next link change (at once if one happened since the last
    /// call: a notification is never lost, several coalesce into one).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

fn read_loop(fd: &OwnedFd, waker: &Notify) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match recv(fd.as_raw_fd(), &mut buffer, MsgFlags::empty()) {
            Ok(_) => waker.notify_one(),
            Err(Errno::EINTR) => {}
            // The socket overran (a burst of links): some were missed, so look anyway.
            Err(Errno::ENOBUFS) => waker.notify_one(),
            Err(error) => {
                warn!(%error, "netlink link notifications stopped; new interfaces are found at resync");
                return;
            }
        }
    }
}
