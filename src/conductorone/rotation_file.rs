//! The rotation state of a plain host (`rotate-credentials`): one JSON file,
//! mode 0600, replaced atomically (write a sibling, fsync, rename), so a
//! crash leaves either the previous state or the new one. It holds the
//! pending and active secrets because nothing else would: ConductorOne shows
//! a secret once.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::rotation::{CredentialRef, Pair, RotationJournal, RotationRecord, RotationState, RotationStore, StoreError};

/// A [`RotationStore`] in a file.
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FilePair {
    client_id: String,
    client_secret: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileActive {
    info: CredentialRef,
    pair: FilePair,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct FileState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    active: Option<FileActive>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending: Option<FilePair>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    journal: Option<RotationJournal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last: Option<RotationRecord>,
}

impl From<FilePair> for Pair {
    fn from(p: FilePair) -> Self {
        Pair::new(p.client_id, p.client_secret)
    }
}

impl From<&Pair> for FilePair {
    fn from(p: &Pair) -> Self {
        FilePair {
            client_id: p.client_id.clone(),
            client_secret: p.client_secret.clone(),
        }
    }
}

impl FileStore {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileStore { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Deletes the file (after a finished rotation was handed over).
    pub fn remove(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn read(&self) -> Result<RotationState, StoreError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RotationState::default()),
            Err(e) => return Err(StoreError(format!("cannot read {}: {e}", self.path.display()))),
        };
        // serde's message names the field, never its value.
        let file: FileState = serde_json::from_str(&text)
            .map_err(|e| StoreError(format!("{} is not a rotation journal: {e}", self.path.display())))?;
        Ok(RotationState {
            active: file.active.map(|a| super::rotation::StoredCredential {
                info: a.info,
                pair: a.pair.into(),
            }),
            pending: file.pending.map(Pair::from),
            journal: file.journal,
            last: file.last,
        })
    }

    fn write(&self, state: &RotationState) -> Result<(), StoreError> {
        let file = FileState {
            active: state.active.as_ref().map(|a| FileActive {
                info: a.info.clone(),
                pair: (&a.pair).into(),
            }),
            pending: state.pending.as_ref().map(FilePair::from),
            journal: state.journal.clone(),
            last: state.last.clone(),
        };
        let text = serde_json::to_vec_pretty(&file).map_err(|e| StoreError(e.to_string()))?;
        write_private(&self.path, &text).map_err(|e| StoreError(format!("cannot write {}: {e}", self.path.display())))
    }
}

/// Writes `bytes` to `path` atomically with mode 0600 (sibling + fsync + rename).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let result = (|| {
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Ok(dir) = std::fs::File::open(dir)
        {
            let _ = dir.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

impl RotationStore for FileStore {
    async fn load(&self) -> Result<RotationState, StoreError> {
        self.read()
    }

    async fn save(&self, state: &RotationState) -> Result<(), StoreError> {
        self.write(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conductorone::rotation::StoredCredential;

    #[tokio::test]
    async fn state_round_trips_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("journal.json"));
        assert_eq!(store.load().await.unwrap(), RotationState::default());
        let pair = Pair::new("a@acme.conductor.one/ccc", "s3cret");
        let state = RotationState {
            active: Some(StoredCredential {
                info: CredentialRef {
                    credential_id: "c1".into(),
                    client_id: pair.client_id.clone(),
                    fingerprint: pair.fingerprint(),
                    expires_time: None,
                },
                pair: pair.clone(),
            }),
            pending: Some(Pair::new("b@acme.conductor.one/ccc", "other")),
            journal: None,
            last: None,
        };
        store.save(&state).await.unwrap();
        assert_eq!(store.load().await.unwrap(), state);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(store.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(store.path(), "{\"active\": 3}").unwrap();
        let err = store.load().await.unwrap_err().to_string();
        assert!(err.contains("not a rotation journal"), "{err}");
    }
}
