//! The Rust SDK's conformance child: the behaviour `tests/conformance/README.md`
//! specifies, which `sdk/python/tests/conformance_child.py` implements on the Python
//! SDK. The transcripts in `tests/conformance/` are played against both.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use baton_child::{Baton, Env, Event, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// `{"n": <int>}`, in every schema.
#[derive(Debug, serde::Deserialize)]
struct State {
    n: i64,
}

#[derive(Debug, Default)]
struct Args {
    state: Option<u32>,
    restores: Option<Vec<u32>>,
    adopt: bool,
}

fn parse_args() -> Args {
    let mut a = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--state" => a.state = it.next().and_then(|v| v.parse().ok()),
            "--restores" => {
                a.restores = Some(
                    it.next()
                        .unwrap_or_default()
                        .split(',')
                        .filter_map(|v| v.parse().ok())
                        .collect(),
                )
            }
            "--adopt" => a.adopt = true,
            other => {
                eprintln!("conformance_child: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    a
}

fn main() {
    let args = parse_args();
    #[allow(unsafe_code)] // Env::take is unsafe by contract (no other thread).
    // SAFETY: single-threaded still: nothing else reads the environment.
    let env = match unsafe { Env::take() } {
        Ok(e) => e,
        Err(e) => {
            eprintln!("conformance_child: {e}");
            std::process::exit(1);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("conformance_child: {e}");
            std::process::exit(1)
        });
    let code = rt.block_on(run(args, env));
    std::process::exit(code);
}

async fn run(args: Args, env: Env) -> i32 {
    let mut b = Baton::builder();
    if let Some(v) = args.state {
        b = b.stateful(v);
        if let Some(r) = args.restores.clone() {
            b = b.restores(r);
        }
    }
    if args.adopt {
        b = b.adopt();
    }
    let baton = match b.start(env) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("conformance_child: {e}");
            return 1;
        }
    };
    let mut incoming = match baton.incoming("tcp", "127.0.0.1:0") {
        Ok(i) => i,
        Err(e) => {
            eprintln!("conformance_child: {e}");
            return 1;
        }
    };
    // The runner connects here (listeners are not passed: see tests/conformance/README.md).
    println!("LISTENING {}", incoming.local_addr().unwrap_or_default());
    let n = Arc::new(AtomicI64::new(0));
    if let Some(own) = args.state {
        // The SDK decodes the own schema as `State`, and asks this for the others.
        let restored = baton
            .restore(|version, json| {
                if version > own {
                    return Err(format!("schema {version} is newer than {own}"));
                }
                serde_json::from_value::<State>(json).map_err(|_| "state has no n".to_owned())
            })
            .await;
        match restored {
            Ok(v) => n.store(v.map_or(0, |s| s.n), Ordering::SeqCst),
            Err(e) => {
                eprintln!("conformance_child: {e}");
                return 1;
            }
        }
    }
    if let Err(e) = baton.ready() {
        eprintln!("conformance_child: {e}");
        return 1;
    }
    // Some(migrate) once draining: connections hand over or close at a boundary.
    let (stop_tx, stop_rx) = watch::channel(None::<bool>);
    let mut conns = Vec::new();
    loop {
        tokio::select! {
            s = incoming.accept() => match s {
                Ok(s) => conns.push(tokio::spawn(serve(s, baton.clone(), Arc::clone(&n), stop_rx.clone()))),
                Err(e) => eprintln!("conformance_child: accept: {e}"),
            },
            ev = baton.next_event() => match ev {
                Event::Quiesce => {
                    let own = args.state.unwrap_or(1);
                    let state = serde_json::json!({"n": n.load(Ordering::SeqCst)});
                    let r = match baton.successor_restores() {
                        None => baton.snapshot_as(own, &state),
                        Some(accept) => match accept.iter().copied().filter(|&v| v <= own).max() {
                            Some(v) => baton.snapshot_as(v, &state),
                            None => baton.snapshot_failed(&format!("cannot write schemas {accept:?}")),
                        },
                    };
                    if let Err(e) = r {
                        eprintln!("conformance_child: {e}");
                    }
                }
                Event::Drain(info) => {
                    let _ = stop_tx.send(Some(info.migrate));
                    // Adopted connections already relayed are served to a boundary too.
                    while let Some(s) = incoming.try_accept_adopted() {
                        conns.push(tokio::spawn(serve(s, baton.clone(), Arc::clone(&n), stop_rx.clone())));
                    }
                    incoming.stop();
                    for c in conns {
                        let _ = c.await;
                    }
                    return 0;
                }
                _ => {}
            },
        }
    }
}

/// `PING` → `PONG <listener>`, `INCR` → `N <n>`, one per line, until the drain.
async fn serve(
    mut s: Stream,
    baton: Baton,
    n: Arc<AtomicI64>,
    mut stop: watch::Receiver<Option<bool>>,
) {
    let mut buf = Vec::new();
    loop {
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let reply = match line.trim_ascii() {
                b"PING" => format!("PONG {}\n", s.listener()),
                b"INCR" => format!("N {}\n", n.fetch_add(1, Ordering::SeqCst) + 1),
                _ => "ERR\n".to_owned(),
            };
            if s.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
        }
        let draining = *stop.borrow();
        if let Some(migrate) = draining {
            if migrate {
                if let Err(e) = baton.hand_over(s, &buf, &serde_json::Value::Null).await {
                    eprintln!("conformance_child: hand over: {e}");
                }
            }
            return;
        }
        let mut chunk = [0u8; 4096];
        // Bytes that arrived before the drain are read first (not a random pick when
        // both are ready), so a partial request travels as the buffered bytes.
        tokio::select! {
            biased;
            r = s.read(&mut chunk) => match r {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            },
            _ = stop.changed() => {}
        }
    }
}
