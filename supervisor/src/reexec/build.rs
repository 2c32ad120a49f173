//! Which baton executable this is: its version and build id, for reexec reports
//! and the probe a new executable answers before baton execs it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use baton_protocol::BatonBuild;
use serde::{Deserialize, Serialize};

use super::state::{FORMAT, OLDEST_FORMAT};

/// Set when baton runs a new executable to ask it about itself: it prints a
/// [`Probe`] line and exits, touching nothing.
pub const ENV_PROBE: &str = "BATON_REEXEC_PROBE";

/// A new executable's answer to the probe.
#[derive(Debug, Serialize, Deserialize)]
pub struct Probe {
    /// Its version.
    pub version: String,
    /// Its build id.
    pub build_id: String,
    /// The hand-over formats it reads, oldest and newest.
    pub formats: (u32, u32),
}

/// This executable, opened from `/proc/self/exe` (the file that runs, even if its
/// path was replaced since), known by `path`.
pub fn own_build(path: &Path) -> BatonBuild {
    BatonBuild {
        version: env!("CARGO_PKG_VERSION").to_string(),
        build_id: File::open("/proc/self/exe")
            .ok()
            .and_then(|f| build_id(&f))
            .unwrap_or_else(|| "unknown".into()),
        exe: path.display().to_string(),
    }
}

/// Answers the probe on stdout.
pub fn answer_probe() -> std::process::ExitCode {
    let b = own_build(Path::new("/proc/self/exe"));
    let p = Probe {
        version: b.version,
        build_id: b.build_id,
        formats: (OLDEST_FORMAT, FORMAT),
    };
    match serde_json::to_string(&p) {
        Ok(line) => {
            println!("{line}");
            std::process::ExitCode::SUCCESS
        }
        Err(_) => std::process::ExitCode::FAILURE,
    }
}

/// The GNU build id of an ELF file (hex), else the first 20 bytes of its sha256.
pub fn build_id(f: &File) -> Option<String> {
    gnu_build_id(f).or_else(|| {
        struct At<'a>(&'a File, u64);
        impl std::io::Read for At<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.read_at(buf, self.1)?;
                self.1 += n as u64;
                Ok(n)
            }
        }
        crate::release::store::sha256(At(f, 0))
            .ok()
            .map(|h| h[..40].to_string())
    })
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// `NT_GNU_BUILD_ID` from the note sections of a little-endian ELF64.
fn gnu_build_id(f: &File) -> Option<String> {
    let mut eh = [0u8; 64];
    f.read_exact_at(&mut eh, 0).ok()?;
    if &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return None;
    }
    let shoff = u64_at(&eh, 0x28)?;
    let shentsize = u64::from(u16_at(&eh, 0x3a)?);
    let shnum = u64::from(u16_at(&eh, 0x3c)?);
    if shentsize < 64 || shnum > 4096 {
        return None;
    }
    for i in 0..shnum {
        let mut sh = [0u8; 64];
        f.read_exact_at(&mut sh, shoff + i * shentsize).ok()?;
        if u32_at(&sh, 4)? != 7 {
            continue; // not SHT_NOTE
        }
        let (off, size) = (u64_at(&sh, 0x18)?, u64_at(&sh, 0x20)?);
        if size > 4096 {
            continue;
        }
        let mut notes = vec![0u8; size as usize];
        f.read_exact_at(&mut notes, off).ok()?;
        let mut at = 0usize;
        while at + 12 <= notes.len() {
            let namesz = u32_at(&notes, at)? as usize;
            let descsz = u32_at(&notes, at + 4)? as usize;
            let kind = u32_at(&notes, at + 8)?;
            let name_at = at + 12;
            let desc_at = name_at + namesz.div_ceil(4) * 4;
            let desc = notes.get(desc_at..desc_at + descsz)?;
            if kind == 3 && notes.get(name_at..name_at + namesz)? == b"GNU\0" {
                return Some(desc.iter().map(|b| format!("{b:02x}")).collect());
            }
            at = desc_at + descsz.div_ceil(4) * 4;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_build_id_of_this_test_binary() {
        let f = File::open("/proc/self/exe").unwrap();
        // Debian's linker adds a GNU build id to every binary.
        let id = gnu_build_id(&f).unwrap();
        assert!(
            id.len() >= 16 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "{id}"
        );
    }

    #[test]
    fn a_script_gets_a_hash() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, "#!/bin/sh\nexit 0\n").unwrap();
        let id = build_id(&File::open(&p).unwrap()).unwrap();
        assert_eq!(id.len(), 40);
    }
}
