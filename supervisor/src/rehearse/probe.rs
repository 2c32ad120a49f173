//! Whether the app serves: one request on its first listener.

use std::net::SocketAddr;
use std::time::Duration;

use super::load;

/// How to tell that the app serves: a request on its first listener.
pub struct Probe {
    pub(super) addr: Option<SocketAddr>,
    pub(super) http: Option<String>,
}

impl Probe {
    /// An HTTP GET (when the built-in load is HTTP) or a TCP connect; nothing for
    /// other listeners.
    ///
    /// # Errors
    /// The connection or the request failed.
    pub fn check(&self) -> Result<(), String> {
        let Some(addr) = self.addr else {
            return Ok(());
        };
        match &self.http {
            Some(path) => match load::get_once(addr, path) {
                Ok(status) if status < 500 => Ok(()),
                Ok(status) => Err(format!("GET {path} on {addr} answered HTTP {status}")),
                Err(why) => Err(format!(
                    "GET {path} on {addr}: {why} (is it an HTTP app? give --load CMD for any other protocol)"
                )),
            },
            None => std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .map(drop)
                .map_err(|e| format!("connect {addr}: {e}")),
        }
    }
}
