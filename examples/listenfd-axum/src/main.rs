//! listenfd-axum: an axum app written for systemd socket activation, with no baton SDK.
//!
//! It takes its listener with the `listenfd` crate (fd 3, `LISTEN_FDS`), says `READY=1`
//! with the `sd-notify` crate, and on SIGTERM stops accepting and finishes its requests.
//! That is all baton needs for a zero-downtime swap (level 1 of PROTOCOL.md):
//! `baton run --listen http=127.0.0.1:3000 -- listenfd-axum`.
//!
//! One detail matters, under baton as under any socket hand-over: hyper's graceful shutdown
//! closes a connection at once if it has not read a byte yet (hyperium/hyper#3808), so a
//! client whose connection was accepted a moment before SIGTERM would see it reset. The app
//! therefore stops accepting first, gives just-accepted connections a second to be read,
//! and only then starts axum's graceful shutdown. The socket itself stays open in baton,
//! and the next generation accepts from the same queue meanwhile.

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// How long just-accepted connections get to send their request after SIGTERM.
const FIRST_BYTE_GRACE: Duration = Duration::from_secs(1);

fn main() -> anyhow::Result<()> {
    // Before any thread exists: listenfd removes LISTEN_FDS/LISTEN_PID from the environment.
    let mut fds = listenfd::ListenFd::from_env();
    let inherited = fds.take_tcp_listener(0)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = match inherited {
            Some(l) => {
                l.set_nonblocking(true)?;
                TcpListener::from_std(l)?
            }
            None => TcpListener::bind("127.0.0.1:3000").await?,
        };
        let hello = format!("hello from listenfd-axum pid={}\n", std::process::id());
        let app = Router::new().route("/", get(move || async move { hello }));

        let (stop, stopped) = watch::channel(false);
        let mut term = signal(SignalKind::terminate())?;
        sd_notify::notify(&[sd_notify::NotifyState::Ready])?;
        axum::serve(StopOnTerm { listener, stopped }, app)
            .with_graceful_shutdown(async move {
                term.recv().await;
                let _ = stop.send(true);
                tokio::time::sleep(FIRST_BYTE_GRACE).await;
            })
            .await?;
        Ok(())
    })
}

/// A listener that stops accepting when told, without closing the shared socket.
struct StopOnTerm {
    listener: TcpListener,
    stopped: watch::Receiver<bool>,
}

impl axum::serve::Listener for StopOnTerm {
    type Io = TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (TcpStream, std::net::SocketAddr) {
        loop {
            tokio::select! {
                res = self.listener.accept() => match res {
                    Ok(conn) => return conn,
                    // EMFILE and friends: the connection waits in the kernel queue.
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                },
                _ = self.stopped.changed() => {
                    if *self.stopped.borrow() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }
}
