//! What the fake supervisor receives from a child: snapshots, restore answers and
//! migrated connections.

use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};

use baton_protocol::ChildMsg;

use super::protocol;
use crate::{adopt, sys};

/// A snapshot the old generation sent, to restore into a candidate.
#[derive(Debug)]
pub struct Snapshot {
    /// The schema version it says it was written with.
    pub version: u32,
    /// What the child declared its down-migration loses (JSON pointers).
    pub dropped: Vec<String>,
    pub(super) size: u64,
    pub(super) fd: OwnedFd,
}

impl Snapshot {
    /// A snapshot made here, for fault tests of a candidate: `bytes` as the memfd's
    /// content, announced as `version`, sealed or (to test that it is refused) not.
    ///
    /// # Errors
    ///
    /// Creating, writing or sealing the memfd failed.
    pub fn from_bytes(version: u32, bytes: &[u8], sealed: bool) -> io::Result<Snapshot> {
        let fd = sys::memfd("baton-fake-snapshot")?;
        std::io::Write::write_all(&mut std::fs::File::from(fd.try_clone()?), bytes)?;
        if sealed {
            sys::seal_immutable(fd.as_fd())?;
        }
        Ok(Snapshot {
            version,
            dropped: Vec::new(),
            size: bytes.len() as u64,
            fd,
        })
    }

    /// The snapshot's bytes (`{"version": V, "state": ...}`).
    ///
    /// # Errors
    ///
    /// Reading the memfd failed.
    pub fn bytes(&self) -> io::Result<Vec<u8>> {
        let mut f = std::fs::File::from(self.fd.try_clone()?);
        let mut out = Vec::new();
        std::io::Seek::rewind(&mut f)?;
        f.read_to_end(&mut out)?;
        Ok(out)
    }

    /// The state part as JSON.
    ///
    /// # Errors
    ///
    /// Reading failed, or the bytes are not a snapshot.
    pub fn state(&self) -> io::Result<serde_json::Value> {
        let mut v: serde_json::Value = serde_json::from_slice(&self.bytes()?)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(v["state"].take())
    }
}

/// How a candidate answered a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restore {
    /// It restored the state, written with `from_version`.
    Restored {
        /// The version found in the snapshot.
        from_version: u32,
    },
    /// It refused the snapshot.
    Rejected {
        /// Why.
        reason: String,
    },
}

/// A live connection the old generation handed over.
#[derive(Debug)]
pub struct Migrated {
    /// The listener it was accepted on.
    pub listener: String,
    /// Bytes read from it but not processed.
    pub buffered: Vec<u8>,
    /// The app's metadata.
    pub meta: serde_json::Value,
    /// The connection.
    pub fd: OwnedFd,
}

impl Migrated {
    /// A `migrate` message and its fds (the connection, and the memfd of its
    /// unread bytes when there are many), decoded.
    ///
    /// # Errors
    ///
    /// Not a `migrate`, no fd, or bad `buffered`.
    pub fn from_message(msg: ChildMsg, fds: Vec<OwnedFd>) -> io::Result<Migrated> {
        let mut fds = fds.into_iter();
        let (
            ChildMsg::Migrate {
                listener,
                buffered,
                meta,
                ..
            },
            Some(fd),
        ) = (msg, fds.next())
        else {
            return Err(protocol("migrate without its fd".to_owned()));
        };
        let buffered = adopt::decode_buffered(&buffered, fds.next()).map_err(protocol)?;
        Ok(Migrated {
            listener,
            buffered,
            meta,
            fd,
        })
    }
}
