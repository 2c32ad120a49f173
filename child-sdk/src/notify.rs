//! sd_notify: `READY=1` and friends as datagrams to `NOTIFY_SOCKET`.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use crate::error::{Error, Result};

/// A stuck receiver must not hang the app forever.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends sd_notify datagrams to one socket.
#[derive(Debug)]
pub(crate) struct Notifier {
    /// The `NOTIFY_SOCKET` value, for errors.
    name: String,
    addr: SocketAddr,
}

impl Notifier {
    /// `socket` is a `NOTIFY_SOCKET` value: an absolute path or `@abstract`.
    pub(crate) fn new(socket: &str) -> Result<Notifier> {
        let addr = match socket.strip_prefix('@') {
            Some(abs) => SocketAddr::from_abstract_name(abs.as_bytes()),
            None => SocketAddr::from_pathname(socket),
        }
        .map_err(|e| Error::Notify {
            socket: socket.to_owned(),
            source: e,
        })?;
        Ok(Notifier {
            name: socket.to_owned(),
            addr,
        })
    }

    /// Sends one notification, e.g. `READY=1` or `STATUS=...`. Blocks for at
    /// most a few seconds if the receiver's queue is full.
    pub(crate) fn send(&self, state: &str) -> Result<()> {
        let fail = |source: io::Error| Error::Notify {
            socket: self.name.clone(),
            source,
        };
        // A fresh unbound socket per message, like sd_notify(3): cheap, and
        // nothing stays open between the rare notifications. std creates it
        // close-on-exec.
        let sock = UnixDatagram::unbound().map_err(fail)?;
        sock.set_write_timeout(Some(SEND_TIMEOUT)).map_err(fail)?;
        let n = sock
            .send_to_addr(state.as_bytes(), &self.addr)
            .map_err(fail)?;
        if n != state.len() {
            return Err(fail(io::Error::new(
                io::ErrorKind::WriteZero,
                "datagram truncated",
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_reaches_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("baton-notify-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.to_str().unwrap()).unwrap();
        n.send("READY=1").unwrap();
        let mut buf = [0u8; 64];
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ready_reaches_an_abstract_socket() {
        let name = format!("baton-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::new(&format!("@{name}")).unwrap();
        n.send("STATUS=hi").unwrap();
        let mut buf = [0u8; 64];
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STATUS=hi");
    }

    #[test]
    fn missing_socket_is_an_error() {
        let n = Notifier::new("/nonexistent/baton/notify").unwrap();
        assert!(matches!(n.send("READY=1"), Err(Error::Notify { .. })));
    }
}
