//! Whether the app serves: one request on its first listener.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

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
            Some(path) => {
                let h = load::HttpLoad::start(addr, path, 1);
                let until = Instant::now() + Duration::from_secs(10);
                while h.ok() == 0 && Instant::now() < until {
                    let (n, first) = h
                        .failures_between(Instant::now() - Duration::from_secs(60), Instant::now());
                    if n > 0 {
                        return Err(first.unwrap_or_default());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                let (ok, failed, _) = h.stop();
                if ok == 0 || failed > 0 {
                    return Err(format!("{ok} answered, {failed} failed"));
                }
                Ok(())
            }
            None => std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .map(drop)
                .map_err(|e| format!("connect {addr}: {e}")),
        }
    }
}
