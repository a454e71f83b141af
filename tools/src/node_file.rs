//! The node's state file: the upstream C client's `node_info_t` (its `.env`), so a
//! node can move between `ijamreg` and `registrar-node` without re-registering.
//!
//! ```text
//!   0        16           32         64          68            72         76
//!   | node_id | network_id | node_key | node_type | node_status | checksum |
//! ```
//! Integers little-endian; `network_id` ASCII, NUL-padded. The checksum is the XOR of
//! the eighteen u32 LE words before it, as `ijamreg` computes it (checked against
//! `tests/vectors/ijam/ijamreg_dotenv_after_run1.bin`). The file holds the node
//! key, so it is written with mode 0600, atomically.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use registrar::wire::ijam::{NodeKey, StateCode};
use uuid::Uuid;
use zerocopy::byteorder::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub const NODE_INFO_LEN: usize = 76;
const CHECKED_LEN: usize = NODE_INFO_LEN - 4;

/// The file as laid out on disk; accepts any 76 bytes.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawNodeInfo {
    pub node_id: [u8; 16],
    pub network_id: [u8; 16],
    pub node_key: [u8; 32],
    pub node_type: U32,
    pub node_status: U32,
    pub checksum: U32,
}
const _: () = assert!(size_of::<RawNodeInfo>() == NODE_INFO_LEN);

/// A loaded state file.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub node_id: Uuid,
    /// As stored: text up to the first NUL (the C client writes whatever it was given).
    pub network_id: String,
    pub node_key: NodeKey,
    /// One-hot node type as on the wire (2 device, 4 fog, 8 cloud).
    pub node_type: u32,
    /// One-hot [`StateCode`] after a state change; 0 when `ijamreg` wrote the file
    /// (it leaves the field uninitialised).
    pub node_status: u32,
}

/// XOR of the u32 LE words of everything before the checksum (`ijamreg`'s
/// `calc_checksum`).
pub fn checksum(bytes: &[u8; CHECKED_LEN]) -> u32 {
    bytes
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes(w.try_into().expect("chunks of 4")))
        .fold(0, |acc, w| acc ^ w)
}

impl NodeInfo {
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let raw = RawNodeInfo::ref_from_bytes(bytes).map_err(|_| {
            anyhow::anyhow!(
                "{} bytes, expected {NODE_INFO_LEN}: not a node state file",
                bytes.len()
            )
        })?;
        let checked: &[u8; CHECKED_LEN] = bytes[..CHECKED_LEN].try_into().expect("length checked");
        let computed = checksum(checked);
        if computed != raw.checksum.get() {
            bail!(
                "checksum mismatch (stored {:#010x}, computed {computed:#010x}): the file is \
                 damaged; delete it to register as a new node",
                raw.checksum.get()
            );
        }
        let end = raw.network_id.iter().position(|&b| b == 0).unwrap_or(16);
        Ok(NodeInfo {
            node_id: Uuid::from_bytes(raw.node_id),
            network_id: String::from_utf8_lossy(&raw.network_id[..end]).into_owned(),
            node_key: NodeKey(raw.node_key),
            node_type: raw.node_type.get(),
            node_status: raw.node_status.get(),
        })
    }

    pub fn to_bytes(&self) -> [u8; NODE_INFO_LEN] {
        let mut network_id = [0u8; 16];
        let n = self.network_id.len().min(16);
        network_id[..n].copy_from_slice(&self.network_id.as_bytes()[..n]);
        let mut raw = RawNodeInfo {
            node_id: self.node_id.into_bytes(),
            network_id,
            node_key: self.node_key.0,
            node_type: U32::new(self.node_type),
            node_status: U32::new(self.node_status),
            checksum: U32::ZERO,
        };
        let checked: &[u8; CHECKED_LEN] = raw.as_bytes()[..CHECKED_LEN]
            .try_into()
            .expect("fixed layout");
        raw.checksum = U32::new(checksum(checked));
        let mut out = [0u8; NODE_INFO_LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }

    /// The stored status by name, for messages.
    pub fn status_name(&self) -> &'static str {
        match StateCode::from_code(self.node_status) {
            Ok(StateCode::Offline) => "offline",
            Ok(StateCode::Loading) => "loading",
            Ok(StateCode::Online) => "online",
            Err(_) => "unknown",
        }
    }
}

/// Loads the state file; `Ok(None)` when there is none.
pub fn load(path: &Path) -> Result<Option<NodeInfo>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    NodeInfo::parse(&bytes)
        .map(Some)
        .with_context(|| format!("state file {}", path.display()))
}

/// Writes the state file with mode 0600: a temporary file beside it, fsync, rename, so
/// a crash leaves either the old file or the new one.
pub fn save(path: &Path, info: &NodeInfo) -> Result<()> {
    write_atomically(path, &info.to_bytes())
        .with_context(|| format!("cannot write the state file {}", path.display()))
}

pub(crate) fn write_atomically(path: &Path, contents: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // `mode` applies only on creation; a leftover temporary file keeps its own.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // Make the rename itself durable; not every filesystem lets a directory be synced.
    let dir: PathBuf = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(name: &str) -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/vectors/ijam")
            .join(name);
        fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn reads_the_file_ijamreg_wrote() {
        let bytes = vector("ijamreg_dotenv_after_run1.bin");
        let info = NodeInfo::parse(&bytes).unwrap();
        assert_eq!(
            info.node_id.to_string(),
            "bdd1d34d-555c-4510-a286-5c049a23defc"
        );
        assert_eq!(info.network_id, "testnet01");
        assert_eq!(info.node_key.0.as_slice(), vector("reg4096_node_key.bin"));
        assert_eq!(info.node_type, 2);
        assert_eq!(info.node_status, 0);
        assert_eq!(
            info.to_bytes().as_slice(),
            bytes,
            "round trip, byte for byte"
        );
    }

    #[test]
    fn rejects_wrong_length_and_checksum() {
        let bytes = vector("ijamreg_dotenv_after_run1.bin");
        let err = NodeInfo::parse(&bytes[..75]).unwrap_err().to_string();
        assert!(err.contains("75 bytes, expected 76"), "{err}");
        let mut bad = bytes.clone();
        bad[20] ^= 1;
        let err = NodeInfo::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
    }

    #[test]
    fn saves_with_mode_0600_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.bin");
        assert!(load(&path).unwrap().is_none());
        let info = NodeInfo {
            node_id: Uuid::from_bytes([7; 16]),
            network_id: "net-1".into(),
            node_key: NodeKey([9; 32]),
            node_type: 4,
            node_status: StateCode::Offline as u32,
        };
        save(&path, &info).unwrap();
        // Overwrite: the rename replaces the file, still 0600.
        save(&path, &info).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), NODE_INFO_LEN as u64);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let back = load(&path).unwrap().unwrap();
        assert_eq!(back.node_id, info.node_id);
        assert_eq!(back.network_id, "net-1");
        assert_eq!(back.node_key, info.node_key);
        assert_eq!(back.node_type, 4);
        assert_eq!(back.status_name(), "offline");
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
    }
}
