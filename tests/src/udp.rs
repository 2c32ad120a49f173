//! A UDP client at a steady, bounded rate for the UDP upgrade tests: datagram `N` is
//! `seq=N`; a reply starts with it and names the pid that answered. It counts what was
//! answered once, twice, or never.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::harness::{HarnessError, Result, io_err};

/// What the client has seen so far.
#[derive(Debug, Clone, Default)]
pub struct UdpStats {
    /// Datagrams sent.
    pub sent: u64,
    /// Replies per sequence number.
    pub replies: BTreeMap<u64, u32>,
    /// Replies per answering pid.
    pub pids: BTreeMap<u32, u64>,
    /// Replies that did not parse.
    pub garbled: u64,
}

impl UdpStats {
    /// Sequence numbers answered at least once.
    pub fn answered(&self) -> u64 {
        self.replies.len() as u64
    }

    /// Sequence numbers answered more than once.
    pub fn duplicated(&self) -> u64 {
        self.replies.values().filter(|&&n| n > 1).count() as u64
    }

    /// Sent and never answered.
    pub fn lost(&self) -> u64 {
        self.sent - self.answered()
    }

    /// The pids that answered.
    pub fn pid_set(&self) -> BTreeSet<u32> {
        self.pids.keys().copied().collect()
    }
}

impl std::fmt::Display for UdpStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {} answered {} lost {} duplicated {} garbled {} by pid {:?}",
            self.sent,
            self.answered(),
            self.lost(),
            self.duplicated(),
            self.garbled,
            self.pids
        )
    }
}

/// The running client; stopped (threads joined) on drop.
pub struct UdpLoad {
    stats: Arc<Mutex<UdpStats>>,
    stop_sending: Arc<AtomicBool>,
    stop_receiving: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl UdpLoad {
    /// Sends one datagram every `interval` to `addr` and collects the replies.
    ///
    /// # Errors
    /// When the client socket cannot be set up.
    pub fn start(addr: SocketAddr, interval: Duration) -> Result<Self> {
        let sock = UdpSocket::bind("127.0.0.1:0").map_err(io_err("bind the UDP client"))?;
        sock.connect(addr)
            .map_err(io_err("connect the UDP client"))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(io_err("set a read timeout"))?;
        let rx = sock.try_clone().map_err(io_err("clone the UDP client"))?;
        let stats = Arc::new(Mutex::new(UdpStats::default()));
        let stop_sending = Arc::new(AtomicBool::new(false));
        let stop_receiving = Arc::new(AtomicBool::new(false));
        let sender = {
            let (stats, stop) = (Arc::clone(&stats), Arc::clone(&stop_sending));
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // A steady rate: catch up on the schedule, never burst past it.
                    let due = started + interval * (seq as u32);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    // ECONNREFUSED (an ICMP for an earlier datagram) is not a send failure.
                    let _ = sock.send(format!("seq={seq}").as_bytes());
                    seq += 1;
                    lock(&stats).sent = seq;
                }
            })
        };
        let receiver = {
            let (stats, stop) = (Arc::clone(&stats), Arc::clone(&stop_receiving));
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(n) = rx.recv(&mut buf) else { continue };
                    let text = String::from_utf8_lossy(&buf[..n]);
                    let mut s = lock(&stats);
                    match parse_reply(&text) {
                        Some((seq, pid)) => {
                            *s.replies.entry(seq).or_default() += 1;
                            *s.pids.entry(pid).or_default() += 1;
                        }
                        None => s.garbled += 1,
                    }
                }
            })
        };
        Ok(Self {
            stats,
            stop_sending,
            stop_receiving,
            threads: vec![sender, receiver],
        })
    }

    /// A copy of the counts.
    pub fn snapshot(&self) -> UdpStats {
        lock(&self.stats).clone()
    }

    /// Waits (polling every 10 ms, at most `timeout`) until `pred` holds.
    ///
    /// # Errors
    /// [`HarnessError::Timeout`] with the last counts.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&UdpStats) -> bool,
    ) -> Result<UdpStats> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.snapshot();
            if pred(&s) {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: what.to_owned(),
                    timeout,
                    last: s.to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops sending, waits up to `grace` for the replies still due, and returns the
    /// counts.
    pub async fn stop(mut self, grace: Duration) -> UdpStats {
        self.stop_sending.store(true, Ordering::Relaxed);
        let _ = self
            .wait_until("the last replies", grace, |s| s.answered() >= s.sent)
            .await;
        self.join();
        self.snapshot()
    }

    fn join(&mut self) {
        self.stop_sending.store(true, Ordering::Relaxed);
        self.stop_receiving.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for UdpLoad {
    fn drop(&mut self) {
        self.join();
    }
}

fn lock(m: &Mutex<UdpStats>) -> std::sync::MutexGuard<'_, UdpStats> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `seq=N ... pid=P ...` → (N, P).
fn parse_reply(text: &str) -> Option<(u64, u32)> {
    let mut seq = None;
    let mut pid = None;
    for word in text.split_ascii_whitespace() {
        if let Some(v) = word.strip_prefix("seq=") {
            seq = v.parse().ok();
        } else if let Some(v) = word.strip_prefix("pid=") {
            pid = v.parse().ok();
        }
    }
    Some((seq?, pid?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse() {
        assert_eq!(parse_reply("seq=17 pid=42 generation=3"), Some((17, 42)));
        assert_eq!(parse_reply("seq=17"), None);
        assert_eq!(parse_reply("pid=1 seq=x"), None);
    }
}
