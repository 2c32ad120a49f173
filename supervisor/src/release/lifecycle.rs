//! The running baton's side of the release store: which release boots, the
//! checks before an install, and persisting what the machine decides.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use baton_protocol::{Release, ReleaseStatus};

use crate::release::exe::Exe;
use crate::release::health::{self, Vars};
use crate::release::store::{InUse, Meta, Store};
use baton_machine::ReleaseEvent;

/// A store opened by `baton run --releases`.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    preflight: Option<String>,
    preflight_timeout: Duration,
    keep: Option<usize>,
    /// Why the last write to the store failed, until one succeeds.
    store_error: std::sync::Mutex<Option<String>>,
    /// Changes not written yet because the store could not be written: replayed, in
    /// order, with the next change and at every housekeeping tick.
    pending: std::sync::Mutex<Vec<Change>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("store", &self.store)
            .field("store_error", &self.store_error)
            .finish_non_exhaustive()
    }
}

/// One change to the store's metadata, kept until it is written.
type Change = Box<dyn Fn(&mut Meta) -> Result<(), crate::release::store::StoreError> + Send>;

/// What a starting baton runs.
pub struct Boot {
    /// The release.
    pub version: String,
    /// Whether it is permanent (else it goes on probation).
    pub permanent: bool,
    /// Why this one (for status).
    pub why: String,
    /// Its executable, checked.
    pub exe: Exe,
}

impl Lifecycle {
    /// Opens the store at `dir` for PROGRAM `program` and picks the release to boot.
    ///
    /// # Errors
    /// One line: the store is missing, unreadable, corrupt or empty, or the
    /// release to boot fails its check.
    pub fn open(
        dir: &std::path::Path,
        program: &str,
        preflight: Option<String>,
        preflight_timeout: Duration,
        keep: Option<usize>,
    ) -> Result<(Lifecycle, Boot), String> {
        let store = Store::open(dir, false).map_err(|e| e.0)?;
        store.adopt_program(program).map_err(|e| e.0)?;
        let meta = store.read().map_err(|e| e.0)?;
        if meta.releases.is_empty() {
            return Err(format!(
                "release store {} is empty: add one with 'baton release add --releases {} VERSION PATH'",
                dir.display(),
                dir.display()
            ));
        }
        let (version, why) = meta.boot_choice().map_err(|e| e.0)?;
        let permanent = meta
            .get(&version)
            .is_some_and(|r| r.status == ReleaseStatus::Permanent);
        let lc = Lifecycle::with_store(store, preflight, preflight_timeout, keep);
        if let Some(c) = meta.current().filter(|c| c.version != version) {
            // Never confirmed: OTP boots the old release too, and forgets the new one.
            let v = c.version.clone();
            lc.update(Box::new(move |m| {
                if let Some(r) = m.releases.iter_mut().find(|r| r.version == v) {
                    r.status = ReleaseStatus::Old;
                }
                m.record(
                    &v,
                    "boot",
                    false,
                    "baton restarted while it was on probation; booted the permanent release",
                );
                Ok(())
            }));
        }
        let exe = lc.open_exe(&version)?;
        Ok((
            lc,
            Boot {
                version,
                permanent,
                why,
                exe,
            },
        ))
    }

    fn with_store(
        store: Store,
        preflight: Option<String>,
        preflight_timeout: Duration,
        keep: Option<usize>,
    ) -> Lifecycle {
        Lifecycle {
            inner: Arc::new(Inner {
                store,
                preflight,
                preflight_timeout,
                keep,
                store_error: std::sync::Mutex::new(None),
                pending: std::sync::Mutex::new(Vec::new()),
            }),
        }
    }

    /// Reopens the store of a running baton after a reexec: no boot choice, the
    /// machine that was handed over knows what runs.
    ///
    /// # Errors
    /// The store is missing or unsafe.
    pub fn reopen(
        dir: &std::path::Path,
        preflight: Option<String>,
        preflight_timeout: Duration,
        keep: Option<usize>,
    ) -> Result<Lifecycle, String> {
        let store = Store::open(dir, false).map_err(|e| e.0)?;
        Ok(Lifecycle::with_store(
            store,
            preflight,
            preflight_timeout,
            keep,
        ))
    }

    /// The store's directory.
    pub fn dir(&self) -> PathBuf {
        self.inner.store.dir().to_path_buf()
    }

    /// The metadata now.
    ///
    /// # Errors
    /// The file is unreadable or corrupt.
    pub fn meta(&self) -> Result<Meta, String> {
        self.inner.store.read().map_err(|e| e.0)
    }

    /// Every release, newest first.
    ///
    /// # Errors
    /// The file is unreadable or corrupt.
    pub fn list(&self) -> Result<Vec<Release>, String> {
        Ok(newest_first(self.meta()?.releases))
    }

    /// Opens `version`'s executable and checks its sha256 against the store.
    ///
    /// # Errors
    /// Unknown version, missing file or sha256 mismatch.
    pub fn open_exe(&self, version: &str) -> Result<Exe, String> {
        let meta = self.meta()?;
        open_exe(&self.inner.store, &meta, version)
    }

    /// The version a plain upgrade restarts: the current release, else the
    /// permanent one, else what boot would pick.
    ///
    /// # Errors
    /// The store is unreadable or empty.
    pub fn plain_upgrade_version(&self) -> Result<String, String> {
        let meta = self.meta()?;
        if let Some(r) = meta.current().or(meta.permanent()) {
            return Ok(r.version.clone());
        }
        meta.boot_choice().map(|(v, _)| v).map_err(|e| e.0)
    }

    /// release check: the executable exists, matches its sha256 and runs on this
    /// machine, then the preflight passes. Records the result; a failure marks
    /// the release failed (unless it is permanent or current).
    ///
    /// # Errors
    /// What failed, with the preflight's output.
    pub async fn check(&self, version: &str) -> Result<(Exe, String), String> {
        let r = self.check_inner(version).await;
        let (ok, detail) = match &r {
            Ok((_, out)) => (true, out.clone()),
            Err(e) => (false, e.clone()),
        };
        let v = version.to_string();
        self.update(Box::new(move |m| {
            if m.get(&v).is_none() {
                return Ok(());
            }
            m.record(&v, "check", ok, &detail);
            if !ok
                && m.get(&v)
                    .is_some_and(|r| r.status == ReleaseStatus::Unpacked)
            {
                m.set_failed(&v)?;
            }
            Ok(())
        }));
        r
    }

    async fn check_inner(&self, version: &str) -> Result<(Exe, String), String> {
        // Hashing a large executable must not stall the supervisor's loop.
        let (lc, v) = (self.clone(), version.to_string());
        let exe = tokio::task::spawn_blocking(move || lc.open_exe(&v))
            .await
            .map_err(|e| format!("checking {version}: {e}"))??;
        exe.check_runs_here()
            .map_err(|why| format!("release {version} cannot run here: {why}"))?;
        let Some(cmd) = &self.inner.preflight else {
            return Ok((exe, String::new()));
        };
        let vars = Vars {
            exe: exe.path.display().to_string(),
            version: version.to_string(),
            dir: self.inner.store.release_dir(version).display().to_string(),
            pid: String::new(),
        };
        let (ok, out) = health::run_command(&vars.expand(cmd), self.inner.preflight_timeout).await;
        if ok {
            Ok((exe, out))
        } else {
            Err(format!("preflight of {version} {out}"))
        }
    }

    /// Persists what the machine decided.
    pub fn persist(&self, event: &ReleaseEvent<'_>) {
        let keep = self.inner.keep;
        let prune_after = matches!(event, ReleaseEvent::Permanent(_));
        let change: Change = match *event {
            ReleaseEvent::Current(v) => {
                let v = v.clone();
                Box::new(move |m| {
                    m.set_current(&v)?;
                    m.record(&v, "install", true, "promoted; on probation");
                    Ok(())
                })
            }
            ReleaseEvent::Permanent(v) => {
                let v = v.clone();
                Box::new(move |m| {
                    m.set_permanent(&v)?;
                    m.record(&v, "permanent", true, "");
                    Ok(())
                })
            }
            ReleaseEvent::Failed { image, reason } => {
                let (v, reason) = (image.clone(), reason.to_owned());
                Box::new(move |m| {
                    m.set_failed(&v)?;
                    m.record(&v, "install", false, &reason);
                    Ok(())
                })
            }
            ReleaseEvent::RevertRefused { image, reason } => {
                let (v, reason) = (image.clone(), reason.to_owned());
                Box::new(move |m| {
                    m.record(&v, "revert", false, &reason);
                    Ok(())
                })
            }
        };
        self.update(change);
        if let (true, Some(keep)) = (prune_after, keep) {
            let in_use = self.meta().map(|m| m.live_in_use()).unwrap_or_default();
            match self.inner.store.prune(keep, &in_use) {
                Ok(gone) if !gone.is_empty() => tracing::info!(?gone, keep, "pruned old releases"),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "cannot prune old releases"),
            }
        }
    }

    /// Records which versions this baton's generations run (none: baton is
    /// done with the store).
    pub fn set_in_use(&self, versions: Vec<String>) {
        self.update(Box::new(move |m| {
            m.in_use = (!versions.is_empty()).then(|| InUse {
                pid: std::process::id(),
                versions: versions.clone(),
            });
            Ok(())
        }));
    }

    /// release remove: deletes VERSION unless a generation uses it.
    ///
    /// # Errors
    /// Unknown release or the store cannot be written.
    pub fn remove(&self, version: &str, in_use: &[String]) -> Result<(), String> {
        self.inner.store.remove(version, in_use).map_err(|e| e.0)
    }

    /// Writes `change`, after any change still pending. When the store cannot be
    /// written (a full disk, a corrupt file), the change is kept and status says the
    /// store is out of sync until a later write succeeds.
    fn update(&self, change: Change) {
        let mut pending = self
            .inner
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        pending.push(change);
        self.write_pending(&mut pending);
    }

    /// Housekeeping: retries the changes a failed write left pending.
    pub fn retry_pending(&self) {
        let mut pending = self
            .inner
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !pending.is_empty() {
            self.write_pending(&mut pending);
        }
    }

    fn write_pending(&self, pending: &mut Vec<Change>) {
        // A change that no longer applies (its release was removed) is dropped and
        // reported; it must not hold back the others forever.
        let mut refused = Vec::new();
        let r = self.inner.store.update(|m| {
            for change in pending.iter() {
                if let Err(e) = change(m) {
                    refused.push(e.0);
                }
            }
            Ok(())
        });
        let mut last = self
            .inner
            .store_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match r {
            Ok(()) => {
                if last.is_some() {
                    tracing::info!(
                        changes = pending.len(),
                        "wrote the release store: back in sync"
                    );
                }
                pending.clear();
                *last = refused.pop();
                if let Some(why) = &*last {
                    tracing::error!(error = %why, "a release store change no longer applies");
                }
            }
            Err(e) => {
                if last.is_none() {
                    tracing::error!(error = %e, "cannot update the release store: it is out of sync; retrying");
                }
                *last = Some(e.0);
            }
        }
    }

    /// Why the store is out of sync with what runs, if it is.
    pub fn store_error(&self) -> Option<String> {
        self.inner
            .store_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Opens `version`'s executable from `store` and checks it against `meta`.
///
/// # Errors
/// Unknown version, missing file or sha256 mismatch.
pub fn open_exe(store: &Store, meta: &Meta, version: &str) -> Result<Exe, String> {
    let r = meta.get(version).ok_or_else(|| {
        format!(
            "no release '{version}' in the store {}",
            store.dir().display()
        )
    })?;
    let path = store.exe_path(meta, version).map_err(|e| e.0)?;
    Exe::open_release(&path, &r.sha256, version, &store.release_dir(version))
}

/// Releases sorted newest first.
pub fn newest_first(mut v: Vec<Release>) -> Vec<Release> {
    v.reverse();
    v.sort_by_key(|r| std::cmp::Reverse(r.added));
    v
}
