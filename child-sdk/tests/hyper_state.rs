//! `hyper::Server::state` with pre-copy, against the fake supervisor over real TCP: live
//! rounds while requests are served, the last round paused, and a request that arrives
//! while paused answered only after the resume, once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_child::hyper::{Server, Snapshot};
use baton_child::testing::FakeSupervisor;
use baton_child::{Baton, Result};
use baton_protocol::Feature;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const BOUND: Duration = Duration::from_secs(10);

/// Counters by name, and the names written since the current pre-copy round began.
#[derive(Default)]
struct Store(Mutex<Counters>);

type Counters = (BTreeMap<String, u64>, Option<BTreeSet<String>>);

impl Store {
    fn incr(&self, k: &str) -> u64 {
        let mut g = self.0.lock().unwrap();
        let n = g.0.entry(k.to_owned()).or_default();
        *n += 1;
        let n = *n;
        if let Some(dirty) = &mut g.1 {
            dirty.insert(k.to_owned());
        }
        n
    }
}

struct Shared(Arc<Store>);

impl Snapshot for Shared {
    fn write(&self, baton: &Baton) -> Result<()> {
        baton.snapshot(&self.0.0.lock().unwrap().0)
    }

    fn send_round(&self, baton: &Baton, round: u32) -> Result<()> {
        let chunks = baton.chunks(round)?;
        let part: Vec<(String, u64)> = {
            let mut g = self.0.0.lock().unwrap();
            let keys: Vec<String> = match round {
                0 => g.0.keys().cloned().collect(),
                _ => g.1.take().unwrap_or_default().into_iter().collect(),
            };
            // Recorded from here: a write while these go out is in the next round.
            g.1 = Some(BTreeSet::new());
            keys.into_iter().map(|k| (k.clone(), g.0[&k])).collect()
        };
        for piece in part.chunks(2) {
            chunks.send(&piece)?;
        }
        chunks.finish()
    }
}

async fn get(c: &mut BufReader<TcpStream>, key: &str) -> String {
    c.get_mut()
        .write_all(format!("GET /{key} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
    body(c).await
}

async fn body(c: &mut BufReader<TcpStream>) -> String {
    let mut len = 0;
    loop {
        let mut line = String::new();
        c.read_line(&mut line).await.unwrap();
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut b = vec![0; len];
    tokio::io::AsyncReadExt::read_exact(c, &mut b)
        .await
        .unwrap();
    String::from_utf8(b).unwrap()
}

fn chunk_pairs(round: &baton_child::testing::Round) -> Vec<(String, u64)> {
    round
        .chunks
        .iter()
        .flat_map(|c| serde_json::from_value::<Vec<(String, u64)>>(c.state().unwrap()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_rounds_serve_on_and_the_last_round_pauses_requests_until_the_outcome() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut sup = FakeSupervisor::new(1).unwrap().listener("http", listener);
    let baton = Baton::builder()
        .stateful(1)
        .precopy()
        .handle_signals(false)
        .start(sup.env().unwrap())
        .unwrap();
    assert!(sup.hello().await.unwrap().contains(&Feature::Precopy));
    let incoming = baton.incoming("http", "127.0.0.1:0").unwrap();
    let (r, f) = tokio::join!(
        baton.restore::<BTreeMap<String, u64>, _, _>(|_, v| Err(format!("no schema {v}"))),
        sup.fresh()
    );
    assert_eq!((r.unwrap(), f.unwrap()), (None, ()));
    let store = Arc::new(Store::default());
    let service = axum::Router::new()
        .route(
            "/{k}",
            axum::routing::get(
                |axum::extract::State(s): axum::extract::State<Arc<Store>>,
                 axum::extract::Path(k): axum::extract::Path<String>| async move {
                    s.incr(&k).to_string()
                },
            ),
        )
        .with_state(Arc::clone(&store));
    let server = tokio::spawn(Server::new().state(Shared(Arc::clone(&store))).serve(
        baton.clone(),
        incoming,
        service,
    ));
    let mut c = BufReader::new(TcpStream::connect(addr).await.unwrap());
    for k in ["a", "b", "c"] {
        assert_eq!(get(&mut c, k).await, "1");
    }
    let round0 = tokio::time::timeout(BOUND, sup.precopy(0))
        .await
        .unwrap()
        .unwrap();
    let mut all = chunk_pairs(&round0);
    all.sort();
    assert_eq!(all, [("a".into(), 1), ("b".into(), 1), ("c".into(), 1)]);
    // Served between the rounds, and recorded for the next one.
    assert_eq!(get(&mut c, "a").await, "2");
    assert_eq!(get(&mut c, "a").await, "3");
    let last = tokio::time::timeout(BOUND, sup.precopy_final(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(chunk_pairs(&last), [("a".into(), 3)]);
    // Paused: this request waits, unanswered, and the state does not move.
    c.get_mut()
        .write_all(b"GET /b HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let waiting = tokio::time::timeout(Duration::from_millis(300), body(&mut c)).await;
    assert!(waiting.is_err(), "answered while paused");
    assert_eq!(store.0.lock().unwrap().0["b"], 1);
    // An aborted upgrade: serving goes on, and the waiting request is answered once.
    sup.resume("candidate crashed").await.unwrap();
    assert_eq!(
        tokio::time::timeout(BOUND, body(&mut c)).await.unwrap(),
        "2"
    );
    assert_eq!(get(&mut c, "b").await, "3");
    server.abort();
}
