//! Issue 16: the same protocol transcripts (`tests/conformance/`) against the Rust and
//! the Python SDK, so that neither drifts from PROTOCOL.md or from the other.

use baton_tests::conformance::{Sdk, play, transcripts};
use baton_tests::harness::python3;

async fn all_pass(sdk: Sdk) {
    let python = python3().await.unwrap();
    let all = transcripts();
    assert!(all.len() >= 9, "transcripts missing: {}", all.len());
    let mut failed = Vec::new();
    for (name, t) in &all {
        match play(sdk, &python, t).await {
            Ok(()) => println!("{sdk:?} {name}: ok ({})", t.about),
            Err(e) => failed.push(format!("{name}: {e}")),
        }
    }
    assert!(failed.is_empty(), "{sdk:?} SDK:\n{}", failed.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_sdk_conforms_to_every_transcript() {
    all_pass(Sdk::Rust).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_conforms_to_every_transcript() {
    all_pass(Sdk::Python).await;
}
