//! Issue 32 item 14: the public API of the published crates (`baton-child`,
//! `baton-protocol`) changes only by decision. Every `pub` item's signature, read from the
//! source, is pinned in `tests/fixtures/public-api/<crate>.txt`. A change fails here until
//! it is looked at: a removal or a changed signature is a semver-major change (bump the
//! crate's major version, or 0.x minor), an addition a minor one. Then rewrite the
//! snapshot with `BATON_BLESS=1 cargo test -p baton-tests --test public_api`.
//!
//! Read from the source rather than rustdoc's JSON, which needs a nightly toolchain that
//! CI does not have. Items `pub` inside private modules are listed too: stricter than
//! needed, never looser.

use std::collections::BTreeSet;
use std::path::Path;

use baton_tests::harness::fixture;
use baton_tests::systemd::repo_root;

/// Every `pub` item of the `.rs` files under `dir`, one normalised signature per line,
/// prefixed with its file; `#[cfg(test)]` modules and doc comments left out.
fn api(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut files: Vec<_> = walk(dir);
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let rel = file.strip_prefix(dir).unwrap().display().to_string();
        // Test modules end the file in this workspace's style; their items are not API.
        let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
        let mut lines = text.lines().map(str::trim);
        while let Some(line) = lines.next() {
            let item = [
                "pub fn ",
                "pub async fn ",
                "pub unsafe fn ",
                "pub struct ",
                "pub enum ",
                "pub trait ",
                "pub type ",
                "pub const ",
                "pub mod ",
                "pub use ",
            ]
            .iter()
            .any(|p| line.starts_with(p));
            let field = line.starts_with("pub ") && !item && line.contains(':');
            if !(item || field) {
                continue;
            }
            // An enum's variants (and their fields and attributes) are its API: on the
            // wire too, for the protocol. Its whole body, comments left out.
            if line.starts_with("pub enum ") {
                let mut body = vec![line.to_owned()];
                let mut depth = line.matches('{').count() as i64 - line.matches('}').count() as i64;
                while depth > 0 {
                    let Some(more) = lines.next() else { break };
                    depth += more.matches('{').count() as i64 - more.matches('}').count() as i64;
                    if !more.starts_with("//") && !more.is_empty() {
                        body.push(more.to_owned());
                    }
                }
                out.insert(format!("{rel}: {}", body.join(" ")));
                continue;
            }
            // A signature runs until its body, its end or its type: `{`, `;` or `,`.
            let mut sig = line.to_owned();
            while !sig.contains('{')
                && !sig.ends_with(';')
                && !sig.ends_with(',')
                && !sig.ends_with(')')
            {
                match lines.next() {
                    Some(more) => {
                        sig.push(' ');
                        sig.push_str(more);
                    }
                    None => break,
                }
            }
            let sig = sig
                .split('{')
                .next()
                .unwrap_or("")
                .trim()
                .trim_end_matches(',');
            out.insert(format!(
                "{rel}: {}",
                sig.split_whitespace().collect::<Vec<_>>().join(" ")
            ));
        }
    }
    out
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "rs")
            && p.file_name().is_some_and(|n| n != "tests.rs")
        {
            out.push(p);
        }
    }
    out
}

fn check(krate: &str, src: &str) {
    let have = api(&repo_root().join(src));
    assert!(have.len() > 20, "{krate}: read {} items only", have.len());
    let file = fixture(&format!("public-api/{krate}.txt"));
    let text: String = have.iter().map(|l| format!("{l}\n")).collect();
    if std::env::var_os("BATON_BLESS").is_some() {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, &text).unwrap();
        return;
    }
    let want: BTreeSet<String> = std::fs::read_to_string(&file)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    let removed: Vec<_> = want.difference(&have).collect();
    let added: Vec<_> = have.difference(&want).collect();
    assert!(
        removed.is_empty() && added.is_empty(),
        "{krate}'s public API changed.\nremoved or changed (semver-major): {removed:#?}\nadded (minor): {added:#?}\n\
         Decide the version, then bless (see this file's doc)."
    );
}

#[test]
fn the_sdk_public_api_changes_only_by_decision() {
    check("baton-child", "child-sdk/src");
}

#[test]
fn the_protocol_public_api_changes_only_by_decision() {
    check("baton-protocol", "protocol/src");
}
