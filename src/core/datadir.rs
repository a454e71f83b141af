//! The data directory: the RSA key, the storage key and the embedded store.
//!
//! ```text
//! <data-dir>/rsa_private_key.pem   PKCS#8 PEM, mode 0600, made on first `serve`
//! <data-dir>/rsa_previous_key.pem  the key before `registrar key rotate`, 0600, and
//! <data-dir>/rsa_previous_key.until  when it stops decrypting (ms since the epoch)
//! <data-dir>/storage.key           32 random bytes as hex, mode 0600, made on first use
//! <data-dir>/signing_key.pem       ECDSA P-256, PKCS#8 PEM, mode 0600, made on first `serve`
//! <data-dir>/registrar.sqlite      the embedded store (+ -wal, -shm)
//! ```
//! Listeners sharing one Redis must share the two key files as well.

use crate::core::random;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::core::crypto::ecdsa::SigningKey;
use crate::core::crypto::seal::SealKey;
use crate::core::crypto::{CryptoError, KeyRing, RsaKey, StorageKey};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataDirError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "permission denied on {path}: run as the user that owns the data dir, fix its \
         owner or mode, or choose another --data-dir"
    )]
    Permission { path: PathBuf },
    #[error(
        "no data dir at {path}: `registrar init` (or the first `registrar serve`) makes \
         one; give --data-dir or REGISTRAR_DATA_DIR if it lives elsewhere"
    )]
    Missing { path: PathBuf },
    #[error(
        "{path} is missing: the data dir is incomplete; `registrar init` makes what is \
         missing (or copy it from the listener's data dir)"
    )]
    MissingFile { path: PathBuf },
    #[error("{path}: {source}")]
    Key { path: PathBuf, source: CryptoError },
    #[error("{path}: expected 64 hex characters")]
    StorageKeyFormat { path: PathBuf },
    #[error("{path}: expected an X25519 private key as 64 hex characters")]
    SealKeyFormat { path: PathBuf },
    #[error("{path}: expected a time in milliseconds since the epoch")]
    UntilFormat { path: PathBuf },
    #[error("no RSA key to rotate at {0}: start `registrar serve` once first")]
    NoKeyToRotate(PathBuf),
    #[error(
        "the new key must have the current key's size ({current} bits): registration \
         frames are as long as the modulus, so clients of both keys could not share a \
         TCP port during the grace period"
    )]
    RotateSize { current: usize },
}

/// The outcome of `registrar key rotate`.
#[derive(Debug)]
pub struct Rotation {
    pub bits: usize,
    /// When the previous key stops decrypting (ms since the epoch).
    pub previous_until_ms: i64,
}

#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

/// Whether a key was found or made on this start (the first start prints a guide).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrigin {
    Loaded,
    Generated,
}

/// An I/O error on `path`, with a permission problem said plainly.
fn io_error(path: &Path, source: io::Error) -> DataDirError {
    if source.kind() == io::ErrorKind::PermissionDenied {
        DataDirError::Permission { path: path.into() }
    } else {
        DataDirError::Io {
            path: path.into(),
            source,
        }
    }
}

impl DataDir {
    /// The data dir at `root`, made (mode 0700, with any missing parents) if it does
    /// not exist: `serve` and `init`.
    pub fn create(root: &Path) -> Result<Self, DataDirError> {
        use std::os::unix::fs::DirBuilderExt;
        if !root.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)
                .map_err(|e| io_error(root, e))?;
        }
        Ok(DataDir {
            root: root.to_path_buf(),
        })
    }

    /// The data dir at `root`, which must exist: the admin commands never make one
    /// (run in the wrong directory, they would start an empty store of their own).
    pub fn existing(root: &Path) -> Result<Self, DataDirError> {
        match fs::metadata(root) {
            Ok(meta) if meta.is_dir() => Ok(DataDir {
                root: root.to_path_buf(),
            }),
            Ok(_) => Err(DataDirError::Missing { path: root.into() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(DataDirError::Missing { path: root.into() })
            }
            Err(e) => Err(io_error(root, e)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn rsa_key_path(&self) -> PathBuf {
        self.root.join("rsa_private_key.pem")
    }

    pub fn rsa_previous_key_path(&self) -> PathBuf {
        self.root.join("rsa_previous_key.pem")
    }

    pub fn rsa_previous_until_path(&self) -> PathBuf {
        self.root.join("rsa_previous_key.until")
    }

    /// The RSA keys in force at `now_ms`: the current one (generated with `bits` if
    /// there is none yet) and, during a rotation's grace period, the previous one.
    pub fn rsa_keyring(
        &self,
        bits: usize,
        now_ms: i64,
    ) -> Result<(KeyRing, KeyOrigin), DataDirError> {
        let (current, origin) = self.rsa_key(bits)?;
        let until_path = self.rsa_previous_until_path();
        let previous = match fs::read_to_string(&until_path) {
            Ok(text) => {
                let until: i64 = text.trim().parse().map_err(|_| DataDirError::UntilFormat {
                    path: until_path.clone(),
                })?;
                if until > now_ms {
                    let path = self.rsa_previous_key_path();
                    let pem = fs::read_to_string(&path).map_err(|e| io_error(&path, e))?;
                    let key = RsaKey::from_pkcs8_pem(&pem)
                        .map_err(|source| DataDirError::Key { path, source })?;
                    Some((key, until))
                } else {
                    None
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(io_error(&until_path, source));
            }
        };
        Ok((KeyRing::new(current, previous), origin))
    }

    /// Makes a new current RSA key of the same size; the old one becomes the previous
    /// key, decrypting until `now_ms + grace_ms`. A running listener picks both up
    /// within a second (it watches the files).
    pub fn rotate_rsa_key(
        &self,
        bits: Option<usize>,
        grace_ms: i64,
        now_ms: i64,
    ) -> Result<Rotation, DataDirError> {
        let current_path = self.rsa_key_path();
        let pem = match fs::read_to_string(&current_path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(DataDirError::NoKeyToRotate(current_path));
            }
            Err(source) => {
                return Err(io_error(&current_path, source));
            }
        };
        let current = RsaKey::from_pkcs8_pem(&pem).map_err(|source| DataDirError::Key {
            path: current_path.clone(),
            source,
        })?;
        let bits = match bits {
            Some(b) if b != current.bits() => {
                return Err(DataDirError::RotateSize {
                    current: current.bits(),
                });
            }
            _ => current.bits(),
        };
        let new = RsaKey::generate(bits).map_err(|source| DataDirError::Key {
            path: current_path.clone(),
            source,
        })?;
        let previous_until_ms = now_ms + grace_ms;
        // Order matters for a listener reading concurrently: the previous key and its
        // expiry are in place before the current key changes.
        replace_secret(&self.rsa_previous_key_path(), pem.as_bytes())?;
        replace_secret(
            &self.rsa_previous_until_path(),
            format!("{previous_until_ms}\n").as_bytes(),
        )?;
        replace_secret(&current_path, new.private_pem().as_bytes())?;
        Ok(Rotation {
            bits,
            previous_until_ms,
        })
    }

    /// Modification times of the key files: changes mean the keys must be reloaded.
    pub fn rsa_key_stamp(&self) -> Vec<Option<std::time::SystemTime>> {
        [
            self.rsa_key_path(),
            self.rsa_previous_key_path(),
            self.rsa_previous_until_path(),
        ]
        .iter()
        .map(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
    }

    pub fn storage_key_path(&self) -> PathBuf {
        self.root.join("storage.key")
    }

    pub fn sqlite_path(&self) -> PathBuf {
        self.root.join("registrar.sqlite")
    }

    pub fn signing_key_path(&self) -> PathBuf {
        self.root.join("signing_key.pem")
    }

    /// Loads the server's ECDSA P-256 signing key (published by the envelope's core
    /// Hello), or generates one if there is none yet.
    pub fn signing_key(&self) -> Result<(SigningKey, KeyOrigin), DataDirError> {
        let path = self.signing_key_path();
        let key_err = |source| DataDirError::Key {
            path: path.clone(),
            source,
        };
        match fs::read_to_string(&path) {
            Ok(text) => Ok((
                SigningKey::from_pkcs8_pem(&text).map_err(key_err)?,
                KeyOrigin::Loaded,
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let key = SigningKey::generate().map_err(key_err)?;
                let pem = key.to_pkcs8_pem().map_err(key_err)?;
                match write_secret(&path, pem.as_bytes()) {
                    Ok(()) => Ok((key, KeyOrigin::Generated)),
                    // Another listener on this data dir made it first: use theirs.
                    Err(DataDirError::Io { source, .. })
                        if source.kind() == io::ErrorKind::AlreadyExists =>
                    {
                        self.signing_key()
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(io_error(&path, e)),
        }
    }

    pub fn seal_key_path(&self) -> PathBuf {
        self.root.join("seal_key")
    }

    /// Loads the server's HPKE key (sealed payloads, published by the core `Keys`), or
    /// makes one if there is none yet: 32 random bytes, the private key, in hex.
    pub fn seal_key(&self) -> Result<(SealKey, KeyOrigin), DataDirError> {
        let path = self.seal_key_path();
        let format = || DataDirError::SealKeyFormat { path: path.clone() };
        match fs::read_to_string(&path) {
            Ok(text) => {
                let bytes = hex::decode(text.trim()).map_err(|_| format())?;
                let key = SealKey::from_private_bytes(&bytes).map_err(|_| format())?;
                Ok((key, KeyOrigin::Loaded))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let ikm: [u8; 32] = random::bytes().map_err(|e| DataDirError::Key {
                    path: path.clone(),
                    source: e.into(),
                })?;
                let key = SealKey::derive(&ikm);
                let text = format!("{}\n", hex::encode(key.private_bytes()));
                match write_secret(&path, text.as_bytes()) {
                    Ok(()) => Ok((key, KeyOrigin::Generated)),
                    // Another listener on this data dir made it first: use theirs.
                    Err(DataDirError::Io { source, .. })
                        if source.kind() == io::ErrorKind::AlreadyExists =>
                    {
                        self.seal_key()
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(io_error(&path, e)),
        }
    }

    /// Loads the RSA key, or generates one of `bits` if there is none yet.
    pub fn rsa_key(&self, bits: usize) -> Result<(RsaKey, KeyOrigin), DataDirError> {
        let path = self.rsa_key_path();
        match fs::read_to_string(&path) {
            Ok(text) => {
                let key = RsaKey::from_pkcs8_pem(&text).map_err(|source| DataDirError::Key {
                    path: path.clone(),
                    source,
                })?;
                Ok((key, KeyOrigin::Loaded))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let key = RsaKey::generate(bits).map_err(|source| DataDirError::Key {
                    path: path.clone(),
                    source,
                })?;
                write_secret(&path, key.private_pem().as_bytes())?;
                Ok((key, KeyOrigin::Generated))
            }
            Err(e) => Err(io_error(&path, e)),
        }
    }

    /// Loads the storage key, which must exist (admin commands).
    pub fn storage_key(&self) -> Result<StorageKey, DataDirError> {
        let path = self.storage_key_path();
        match fs::read_to_string(&path) {
            Ok(text) => {
                let bytes: [u8; StorageKey::LEN] = hex::decode(text.trim())
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or(DataDirError::StorageKeyFormat { path: path.clone() })?;
                Ok(StorageKey::from_bytes(&bytes))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(DataDirError::MissingFile { path })
            }
            Err(e) => Err(io_error(&path, e)),
        }
    }

    /// Loads the storage key, or makes one if there is none yet (`serve`, `init`).
    pub fn ensure_storage_key(&self) -> Result<(StorageKey, KeyOrigin), DataDirError> {
        let path = self.storage_key_path();
        match self.storage_key() {
            Ok(key) => Ok((key, KeyOrigin::Loaded)),
            Err(DataDirError::MissingFile { .. }) => {
                let bytes: [u8; StorageKey::LEN] =
                    random::bytes().map_err(|e| DataDirError::Key {
                        path: path.clone(),
                        source: e.into(),
                    })?;
                match write_secret(&path, format!("{}\n", hex::encode(bytes)).as_bytes()) {
                    Ok(()) => Ok((StorageKey::from_bytes(&bytes), KeyOrigin::Generated)),
                    // Another process (two listeners starting at once) made it first.
                    Err(DataDirError::Io { source, .. })
                        if source.kind() == io::ErrorKind::AlreadyExists =>
                    {
                        Ok((self.storage_key()?, KeyOrigin::Loaded))
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }
}

/// Writes `contents` to a fresh temporary file beside `path` (mode 0600, fsynced) and
/// returns its name. Each writer gets a name of its own, so two processes racing never
/// share a temporary file.
fn write_temp(path: &Path, contents: &[u8]) -> Result<PathBuf, DataDirError> {
    let io_err = |e| io_error(path, e);
    let nonce: [u8; 8] = random::bytes().map_err(|e| DataDirError::Key {
        path: path.into(),
        source: e.into(),
    })?;
    let tmp = path.with_extension(format!("tmp-{}", hex::encode(nonce)));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err)?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err(e)
        })?;
    Ok(tmp)
}

/// Writes `path` (mode 0600) through a temporary file and an atomic rename, replacing
/// what was there.
fn replace_secret(path: &Path, contents: &[u8]) -> Result<(), DataDirError> {
    let tmp = write_temp(path, contents)?;
    fs::rename(&tmp, path).map_err(|e| io_error(path, e))
}

/// Creates `path` (mode 0600, fsynced), failing with `AlreadyExists` if it exists.
fn write_secret(path: &Path, contents: &[u8]) -> Result<(), DataDirError> {
    let tmp = write_temp(path, contents)?;
    // hard_link fails if `path` exists, so two racing writers never both win.
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    linked.map_err(|e| io_error(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_made_once_with_mode_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::create(dir.path()).unwrap();
        let (key, origin) = data.rsa_key(2048).unwrap();
        assert_eq!(origin, KeyOrigin::Generated);
        let mode = fs::metadata(data.rsa_key_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, origin) = data.rsa_key(4096).unwrap();
        assert_eq!(origin, KeyOrigin::Loaded);
        assert_eq!(again.public_pem(), key.public_pem());
        assert_eq!(again.bits(), 2048);

        let (s1, _) = data.ensure_storage_key().unwrap();
        let mode = fs::metadata(data.storage_key_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let s2 = data.storage_key().unwrap();
        assert_eq!(s1.passphrase_hash("n", "p"), s2.passphrase_hash("n", "p"));

        let (signing, origin) = data.signing_key().unwrap();
        assert_eq!(origin, KeyOrigin::Generated);
        let mode = fs::metadata(data.signing_key_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, origin) = data.signing_key().unwrap();
        assert_eq!(origin, KeyOrigin::Loaded);
        assert_eq!(again.public_key_der(), signing.public_key_der());
    }
}
