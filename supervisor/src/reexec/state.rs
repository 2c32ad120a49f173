//! The hand-over: everything a reexec carries from one image of baton to the
//! next, as JSON in a sealed memfd, with the fds it names left open across the
//! exec. Versioned by [`FORMAT`]; an image reads every format from
//! [`OLDEST_FORMAT`] on (new fields get defaults), and refuses the rest.

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::Instant;

use baton_protocol::{BatonBuild, ReexecReport};
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::daemon::io::listeners::ListenAddr;
use baton_machine::{GenId, WaiterId};

/// The hand-over format this image writes.
pub const FORMAT: u32 = 1;
/// The oldest format this image reads.
pub const OLDEST_FORMAT: u32 = 1;

/// The memfd holding the hand-over (a number), for the new image.
pub const ENV_STATE: &str = "BATON_REEXEC_STATE";
/// The previous executable, kept open (a number): the new image execs it back
/// if it cannot take over.
pub const ENV_PREV: &str = "BATON_REEXEC_PREV";
/// Set when an image execs the previous one back: why it could not take over.
pub const ENV_FAILED: &str = "BATON_REEXEC_FAILED";

/// Everything that carries over.
#[derive(Debug, Serialize, Deserialize)]
pub struct HandOver {
    /// [`FORMAT`] of the writer.
    pub format: u32,
    /// The executable that wrote this.
    pub from: BatonBuild,
    /// The executable it exec'd, as its probe described it.
    pub to: BatonBuild,
    /// When the reexec was asked for.
    #[serde(with = "crate::clock")]
    pub requested: Instant,
    /// baton itself.
    pub me: SelfOver,
    /// The settings baton started with.
    pub config: RunConfig,
    /// Listeners, in `LISTEN_FDS` order.
    pub listeners: Vec<ListenerOver>,
    /// The control socket.
    pub control: SocketOver,
    /// The children's notify socket.
    pub notify: SocketOver,
    /// The listeners are in systemd's fd store already.
    pub fd_stored: bool,
    /// Every running generation.
    pub gens: Vec<GenOver>,
    /// Cgroups of running generations, and of exited ones still being emptied.
    pub cgroups: (Vec<(GenId, PathBuf)>, Vec<PathBuf>),
    /// Stray processes killed so far.
    pub strays_killed: u64,
    /// Strays found without cgroups and still alive: status keeps showing them.
    #[serde(default)]
    pub strays: Vec<u32>,
    /// Open executables.
    pub images: Vec<ImageOver>,
    /// Label counter for executables opened from PROGRAM.
    pub next_exe: u64,
    /// Control clients waiting for an outcome.
    pub waiters: Vec<WaiterOver>,
    /// Next waiter id.
    pub next_waiter: WaiterId,
    /// What the upgrade machine carries (a [`baton_machine::Carried`]), decoded
    /// only once every fd is checked.
    pub machine: serde_json::Value,
    /// Which release booted, and why.
    pub boot_note: String,
    /// Versions recorded as in use in the store.
    pub in_use: Vec<String>,
    /// baton's `--metrics` socket.
    #[serde(default)]
    pub metrics: Option<ListenerOver>,
    /// The upgrade history (also in `--state-dir`, when there is one).
    #[serde(default)]
    pub history: Vec<baton_protocol::HistoryEntry>,
    /// Promotions whose history line waits for these older generations to go.
    #[serde(default)]
    pub settling: Vec<(baton_protocol::HistoryEntry, Vec<u64>)>,
    /// The recent events, for `baton events`.
    #[serde(default)]
    pub events: Vec<baton_protocol::Event>,
}

/// baton's own record, across reexecs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelfOver {
    /// Where baton's executable is (re-opened at each reexec).
    pub exe_path: PathBuf,
    /// baton's command line, unchanged across reexecs.
    pub argv: Vec<OsString>,
    /// Unix time (ms) of the first start.
    pub started_at: u64,
    /// Successful reexecs.
    pub reexecs: u32,
    /// The last reexec.
    pub last_reexec: Option<ReexecReport>,
}

/// A listener.
#[derive(Debug, Serialize, Deserialize)]
pub struct ListenerOver {
    /// Name.
    pub name: String,
    /// Address.
    pub addr: ListenAddr,
    /// From systemd.
    pub inherited: bool,
    /// The socket.
    pub fd: RawFd,
    /// The socket file baton bound, with its (dev, inode).
    pub bound_file: Option<(PathBuf, (u64, u64))>,
}

/// A bound socket of baton's own.
#[derive(Debug, Serialize, Deserialize)]
pub struct SocketOver {
    /// The socket.
    pub fd: RawFd,
    /// Its path.
    pub path: PathBuf,
    /// The group allowed on it (the control socket).
    pub group: Option<u32>,
}

/// A generation's process and control channel.
#[derive(Debug, Serialize, Deserialize)]
pub struct GenOver {
    /// Generation.
    pub id: GenId,
    /// Its pid (a child of this process).
    pub pid: u32,
    /// baton's end of its control socket.
    pub control_fd: RawFd,
    /// Unix time (ms) it was spawned.
    pub started_at: u64,
    /// Last connection count.
    pub connections: Option<u64>,
    /// Last `STATUS=`.
    pub status_text: Option<String>,
    /// Bytes read from its control socket that are not a whole message yet.
    pub buffered: Vec<u8>,
    /// Fds received with those bytes.
    pub buffered_fds: Vec<RawFd>,
}

/// An open executable.
#[derive(Debug, Serialize, Deserialize)]
pub struct ImageOver {
    /// Its label (a release's version, or `exe-N`).
    pub label: String,
    /// The open file.
    pub fd: RawFd,
    /// Where it was opened.
    pub path: PathBuf,
    /// A `#!` script.
    pub script: bool,
    /// Its release and directory.
    pub release: Option<(String, PathBuf)>,
    /// A release's recorded sha256, checked again before every exec.
    #[serde(default)]
    pub sha256: Option<String>,
}

/// What a waiting control client waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitKind {
    /// `baton upgrade --wait`.
    Upgrade,
    /// `baton release install|rollback --wait` of this release.
    Release(String),
    /// `baton reexec --wait`.
    Reexec,
}

/// A control client waiting for an outcome.
#[derive(Debug, Serialize, Deserialize)]
pub struct WaiterOver {
    /// Its id in the machine.
    pub id: WaiterId,
    /// Its connection.
    pub fd: RawFd,
    /// What it waits for.
    pub kind: WaitKind,
}

impl HandOver {
    /// Every fd the hand-over names.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.control.fd, self.notify.fd];
        v.extend(self.listeners.iter().map(|l| l.fd));
        v.extend(self.metrics.iter().map(|l| l.fd));
        for g in &self.gens {
            v.push(g.control_fd);
            v.extend(&g.buffered_fds);
        }
        v.extend(self.images.iter().map(|i| i.fd));
        v.extend(self.waiters.iter().map(|w| w.fd));
        v
    }

    /// Encodes it.
    ///
    /// # Errors
    /// Serialization failed (a bug).
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        serde_json::to_vec(self).map_err(|e| format!("cannot encode the hand-over: {e}"))
    }

    /// Decodes a hand-over of any format this image reads, checking that it names
    /// each fd once.
    ///
    /// # Errors
    /// One line: malformed, or a format this image does not read.
    pub fn decode(data: &[u8]) -> Result<HandOver, String> {
        let v: serde_json::Value =
            serde_json::from_slice(data).map_err(|e| format!("malformed hand-over: {e}"))?;
        let format = v.get("format").and_then(serde_json::Value::as_u64);
        match format {
            Some(f) if (u64::from(OLDEST_FORMAT)..=u64::from(FORMAT)).contains(&f) => {}
            Some(f) => {
                return Err(format!(
                    "hand-over format {f} is not one this baton reads ({OLDEST_FORMAT} to {FORMAT})"
                ));
            }
            None => return Err("malformed hand-over: no format".into()),
        }
        let h: HandOver =
            serde_json::from_value(v).map_err(|e| format!("malformed hand-over: {e}"))?;
        let fds = h.fds();
        let unique: HashSet<_> = fds.iter().collect();
        if unique.len() != fds.len() || fds.iter().any(|fd| *fd < 3) {
            return Err("malformed hand-over: an fd is named twice, or is stdio".into());
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-over written by a real baton (format 1): every later baton must
    /// still read it.
    const V1: &str = include_str!("testdata/handover-v1.json");

    #[test]
    fn reads_a_format_1_hand_over() {
        let h = HandOver::decode(V1.as_bytes()).unwrap();
        assert_eq!(h.format, 1);
        assert_eq!(h.gens.len(), 1);
        assert_eq!(h.waiters[0].kind, WaitKind::Reexec);
        assert_eq!(h.listeners.len(), 2);
        let m = crate::reexec::machine(&h).unwrap();
        assert_eq!(m.active(), Some(3));
        // What this image writes back has every field format 1 had (and the ones
        // added since, with defaults, which a format-1 reader ignores), so that the
        // baton that wrote it can read it again (a downgrade).
        let mut before = std::collections::BTreeSet::new();
        paths(&h.machine, "", &mut before);
        let again = serde_json::to_value(m.carry(&crate::clock::Mono).unwrap()).unwrap();
        let mut after = std::collections::BTreeSet::new();
        paths(&again, "", &mut after);
        let missing: Vec<_> = before.difference(&after).collect();
        assert!(missing.is_empty(), "not written back: {missing:?}");
        for key in ["permanent", "boot_image", "crashes", "next_gen"] {
            assert_eq!(again[key], h.machine[key], "{key}");
        }
        assert_eq!(again["last"]["pid"], h.machine["last"]["pid"]);
        assert_eq!(
            again["gens"]["3"]["pid"], h.machine["gens"]["3"]["pid"],
            "the generation's pid"
        );
    }

    /// A hand-over carrying an upgrade under way is refused: no baton writes one (a
    /// reexec happens only when idle), so it is corrupt.
    #[test]
    fn a_machine_with_work_under_way_is_refused() {
        for (field, value) in [
            ("upgrade", serde_json::json!({"candidate": 4})),
            ("stopping", serde_json::json!(true)),
        ] {
            let bytes = with(|v| v["machine"][field] = value.clone());
            let h = HandOver::decode(&bytes).unwrap();
            let Err(e) = crate::reexec::machine(&h) else {
                panic!("{field}: taken");
            };
            assert!(e.contains("under way"), "{field}: {e}");
        }
    }

    /// Every field path of today's hand-over (and of the machine inside it), as
    /// written from the format-1 fixture: `testdata/handover-shape.txt`.
    const SHAPE: &str = include_str!("testdata/handover-shape.txt");

    fn paths(v: &serde_json::Value, at: &str, out: &mut std::collections::BTreeSet<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let here = format!("{at}.{k}");
                    out.insert(here.clone());
                    paths(v, &here, out);
                }
            }
            serde_json::Value::Array(items) => {
                for v in items {
                    paths(v, &format!("{at}[]"), out);
                }
            }
            _ => {}
        }
    }

    /// The hand-over is a wire format between baton versions: a reexec from the
    /// installed baton must read what it wrote. So a field added, renamed or removed
    /// (in the hand-over or in the machine it carries) fails here until it is a
    /// decision: bump [`FORMAT`] when an older baton could not read it (and keep a
    /// `handover-v<N>.json` written by a real baton), or, for a field an older baton
    /// ignores and a newer one defaults, keep the format. Then rewrite the shape
    /// with `BATON_BLESS=1 cargo test -p baton the_hand_over_shape`.
    #[test]
    fn the_hand_over_shape_changes_only_by_decision() {
        let h = HandOver::decode(V1.as_bytes()).unwrap();
        let machine = crate::reexec::machine(&h).unwrap();
        let mut v = serde_json::to_value(&h).unwrap();
        v["machine"] = serde_json::to_value(machine.carry(&crate::clock::Mono).unwrap()).unwrap();
        let mut set = std::collections::BTreeSet::new();
        paths(&v, "", &mut set);
        let got = format!(
            "format {FORMAT}\n{}\n",
            set.into_iter().collect::<Vec<_>>().join("\n")
        );
        if std::env::var_os("BATON_BLESS").is_some() {
            let file = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/src/reexec/testdata/handover-shape.txt"
            );
            std::fs::write(file, &got).unwrap();
            return;
        }
        let want: std::collections::BTreeSet<&str> = SHAPE.lines().collect();
        let have: std::collections::BTreeSet<&str> = got.lines().collect();
        let added: Vec<_> = have.difference(&want).collect();
        let removed: Vec<_> = want.difference(&have).collect();
        assert!(
            added.is_empty() && removed.is_empty(),
            "the hand-over changed shape (added {added:?}, removed {removed:?}): bump FORMAT or keep it, then bless (see this test's doc)"
        );
    }

    fn with(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_str(V1).unwrap();
        edit(&mut v);
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn refuses_formats_it_does_not_read() {
        for f in [0, FORMAT + 1] {
            let e = HandOver::decode(&with(|v| v["format"] = f.into())).unwrap_err();
            assert!(
                e.contains(&format!("format {f} is not one this baton reads")),
                "{e}"
            );
        }
        let e = HandOver::decode(&with(|v| {
            v.as_object_mut().unwrap().remove("format");
        }))
        .unwrap_err();
        assert!(e.contains("no format"), "{e}");
    }

    #[test]
    fn refuses_an_fd_named_twice_or_stdio() {
        let e = HandOver::decode(&with(|v| {
            let fd = v["control"]["fd"].clone();
            v["notify"]["fd"] = fd;
        }))
        .unwrap_err();
        assert!(e.contains("named twice"), "{e}");
        let e = HandOver::decode(&with(|v| v["control"]["fd"] = 1.into())).unwrap_err();
        assert!(e.contains("stdio"), "{e}");
    }

    #[test]
    fn malformed_is_one_line() {
        for bad in [&b"{"[..], b"[]", b"{\"format\":1}"] {
            let e = HandOver::decode(bad).unwrap_err();
            assert!(
                e.starts_with("malformed hand-over") && !e.contains('\n'),
                "{e}"
            );
        }
    }
}
