//! The write-ahead journal of refresh answers (`--journal-dir`).
//!
//! From the moment the identity service rotates a refresh token until the state Secret holds the
//! new one, that token exists only in this process: a SIGKILL or an OOM kill in between loses the
//! grant when the identity service has no rotation grace period. So the answer is written here
//! first, synchronously, before any other await (on the chart's memory-backed `emptyDir` that is a
//! few syscalls: microseconds), and removed once the state Secret holds the token. A container that
//! is killed and restarted by kubelet stays in its pod and finds the entry; [`super::replay`] writes
//! it to the state Secret before the process leads or reconciles anything.
//!
//! One file per grant, replaced atomically (a temporary file renamed over it), so a newer answer
//! supersedes the older entry: at most one entry per grant, and normally no more than
//! `--concurrency` at a time (an entry lives from the answer until its state Secret write). No `fsync`: a killed process's writes are in the kernel
//! already, and a node that loses its page cache loses the pod and its `emptyDir` with it.
//! Hand-written because no maintained crate keeps one small record per key with these file modes
//! in fewer lines than this.
//!
//! Entries hold refresh and access tokens: the directory is created 0700, the files 0600, and
//! neither their content nor a token ever reaches a log line, an error or `Debug` output.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use serde::{Deserialize, Serialize};

use super::lineage;
use super::memory::Pending;
use crate::api::WgtwoGrant;
use crate::oauth::secrets::{AccessToken, RefreshToken};
use crate::oauth::{IdTokenInfo, TokenSet};

/// The journal lives in this subdirectory of `--journal-dir`: the operator creates it, so it owns
/// it and can make it 0700 even when the volume's root belongs to someone else (an `emptyDir` is
/// created 0777 by kubelet).
const SUBDIR: &str = "wgtwo-journal-v1";
const SUFFIX: &str = ".json";
const TEMP_PREFIX: &str = ".tmp-";

/// One refresh answer, as written to disk. No `Debug`: it holds tokens.
#[derive(Clone, Serialize, Deserialize)]
pub struct Entry {
    pub namespace: String,
    pub name: String,
    /// The grant object the answer is for: a grant deleted and created again under the same name
    /// is another grant.
    pub uid: String,
    /// sha256 (see [`lineage::sha256_hex`]) of the refresh token that was presented: the entry
    /// applies only while the state Secret still holds that one.
    pub presented_sha256: String,
    /// The rotated refresh token.
    pub refresh_token: String,
    pub source: String,
    pub source_version: Option<String>,
    pub access_token: String,
    pub token_type: String,
    pub expires_at: Option<Timestamp>,
    pub scope: Option<String>,
    pub subject: Option<String>,
    pub phone_number: Option<String>,
    pub refreshed_at: Timestamp,
    /// The refresh request the answer handles (absent in entries of earlier versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_request: Option<String>,
}

impl Entry {
    /// The entry for an answer kept in memory (`pending`) that rotated `presented`.
    pub fn new(grant: &ObjectRef<WgtwoGrant>, uid: &str, presented: &RefreshToken, pending: &Pending) -> Self {
        let id_token = pending.tokens.id_token.as_ref();
        Self {
            namespace: grant.namespace.clone().unwrap_or_default(),
            name: grant.name.clone(),
            uid: uid.to_owned(),
            presented_sha256: lineage::sha256_hex(&[presented.secret()]),
            refresh_token: pending.refresh_token.secret().clone(),
            source: pending.source.clone(),
            source_version: pending.source_version.clone(),
            access_token: pending.tokens.access_token.secret().clone(),
            token_type: pending.tokens.token_type.clone(),
            expires_at: pending.tokens.expires_at,
            scope: pending.tokens.scope.clone(),
            subject: id_token.map(|id| id.subject.clone()),
            phone_number: id_token.and_then(|id| id.phone_number.clone()),
            refreshed_at: pending.refreshed_at,
            refresh_request: pending.request.clone(),
        }
    }

    pub fn grant(&self) -> ObjectRef<WgtwoGrant> {
        ObjectRef::new(&self.name).within(&self.namespace)
    }

    /// The answer as the controller keeps it, its refresh token persisted (replay wrote it).
    pub fn pending(&self) -> Pending {
        Pending {
            uid: self.uid.clone(),
            presented_sha256: self.presented_sha256.clone(),
            refresh_token: RefreshToken::new(self.refresh_token.clone()),
            source: self.source.clone(),
            source_version: self.source_version.clone(),
            tokens: self.tokens(),
            refreshed_at: self.refreshed_at,
            received: std::time::Instant::now(),
            persisted: true,
            request: self.refresh_request.clone(),
        }
    }

    /// The answer's tokens again (the ID token's claims as far as the operator uses them).
    pub fn tokens(&self) -> TokenSet {
        TokenSet {
            access_token: AccessToken::new(self.access_token.clone()),
            refresh_token: Some(RefreshToken::new(self.refresh_token.clone())),
            token_type: self.token_type.clone(),
            expires_at: self.expires_at,
            scope: self.scope.clone(),
            id_token: self.subject.as_ref().map(|subject| IdTokenInfo {
                subject: subject.clone(),
                phone_number: self.phone_number.clone(),
                phone_number_verified: None,
                nonce: None,
                expires_at: None,
            }),
            id_token_error: None,
        }
    }
}

/// An entry file that could not be read back; left in place for a person to look at.
#[derive(Debug, thiserror::Error)]
#[error("journal entry {path} is unreadable ({problem}); it is left in place")]
pub struct Unreadable {
    pub path: PathBuf,
    /// Never the file's content.
    pub problem: String,
}

#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// Opens (creating it and `root` 0700 if need be) the journal under `root`, and removes temporary files a
    /// killed process left behind (never a complete entry).
    pub fn open(root: &Path) -> io::Result<Self> {
        let dir = root.join(SUBDIR);
        // The root too, if missing (also 0700): a mounted volume exists, a local run's path may not.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", dir.display())))?;
        // Also when it existed: whoever made it, only this user may read it.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| io::Error::new(e.kind(), format!("making {} private (0700): {e}", dir.display())))?;
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with(TEMP_PREFIX)) {
                fs::remove_file(&path)?;
            }
        }
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of a grant's entry: named by a hash, so no name length or character is a problem.
    fn path(&self, grant: &ObjectRef<WgtwoGrant>) -> PathBuf {
        let namespace = grant.namespace.as_deref().unwrap_or_default();
        self.dir.join(format!("{}{SUFFIX}", &lineage::sha256_hex(&[namespace, &grant.name])[..32]))
    }

    /// Writes `entry`, replacing the grant's previous one. Synchronous on purpose: it must be on
    /// disk before the caller's next await.
    pub fn write(&self, entry: &Entry) -> io::Result<()> {
        let path = self.path(&entry.grant());
        let name = path.file_name().expect("a file name").to_string_lossy().into_owned();
        let temp = self.dir.join(format!("{TEMP_PREFIX}{name}"));
        let bytes = serde_json::to_vec(entry).expect("an entry serializes");
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temp)?;
        file.write_all(&bytes)?;
        drop(file);
        fs::rename(&temp, &path)
    }

    /// Removes the grant's entry (the state Secret holds its token, or the grant is gone).
    pub fn remove(&self, grant: &ObjectRef<WgtwoGrant>) -> io::Result<()> {
        match fs::remove_file(self.path(grant)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Removes the entries of grants not in `alive` (after a relist, which may hide deletions).
    pub fn retain<'a>(&self, alive: impl IntoIterator<Item = &'a ObjectRef<WgtwoGrant>>) -> io::Result<()> {
        let keep: std::collections::HashSet<PathBuf> = alive.into_iter().map(|g| self.path(g)).collect();
        for file in fs::read_dir(&self.dir)? {
            let path = file?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if name.ends_with(SUFFIX) && !name.starts_with(TEMP_PREFIX) && !keep.contains(&path) {
                fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    /// Every entry, and the files that could not be read as one.
    pub fn entries(&self) -> io::Result<(Vec<Entry>, Vec<Unreadable>)> {
        let (mut entries, mut unreadable) = (Vec::new(), Vec::new());
        for file in fs::read_dir(&self.dir)? {
            let path = file?.path();
            if !path.file_name().is_some_and(|n| n.to_string_lossy().ends_with(SUFFIX))
                || path.file_name().is_some_and(|n| n.to_string_lossy().starts_with(TEMP_PREFIX))
            {
                continue;
            }
            let parsed = fs::read(&path)
                .map_err(|e| e.to_string())
                // Only the kind and position: serde_json's own message can quote a value.
                .and_then(|bytes| {
                    serde_json::from_slice::<Entry>(&bytes)
                        .map_err(|e| format!("{:?} error at line {} column {}", e.classify(), e.line(), e.column()))
                });
            match parsed {
                Ok(entry) if self.path(&entry.grant()) == path => entries.push(entry),
                Ok(_) => unreadable.push(Unreadable { path, problem: "its name does not match its grant".into() }),
                Err(problem) => unreadable.push(Unreadable { path, problem }),
            }
        }
        entries.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Ok((entries, unreadable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::time::Instant;

    fn pending(refresh: &str, access: &str) -> Pending {
        Pending {
            uid: "uid-1".into(),
            presented_sha256: lineage::sha256_hex(&["presented"]),
            refresh_token: RefreshToken::new(refresh.into()),
            source: lineage::sha256_hex(&["user-token"]),
            source_version: Some("41".into()),
            tokens: TokenSet {
                access_token: AccessToken::new(access.into()),
                refresh_token: Some(RefreshToken::new(refresh.into())),
                token_type: "bearer".into(),
                expires_at: Some(Timestamp::from_second(1_900_000_000).unwrap()),
                scope: Some("phone offline_access".into()),
                id_token: Some(IdTokenInfo {
                    subject: "alice".into(),
                    phone_number: Some("+4799999999".into()),
                    phone_number_verified: Some(true),
                    nonce: None,
                    expires_at: None,
                }),
                id_token_error: None,
            },
            refreshed_at: Timestamp::from_second(1_899_996_400).unwrap(),
            received: Instant::now(),
            persisted: false,
            request: Some("2026-12-07T10:00:00Z".into()),
        }
    }

    fn grant(name: &str) -> ObjectRef<WgtwoGrant> {
        ObjectRef::new(name).within("team-a")
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o777
    }

    #[test]
    fn an_entry_round_trips_with_everything_needed_to_publish_the_answer() {
        let root = tempfile::tempdir().unwrap();
        let journal = Journal::open(root.path()).unwrap();
        let entry = Entry::new(&grant("alice"), "uid-1", &RefreshToken::new("presented".into()), &pending("r1", "a1"));
        journal.write(&entry).unwrap();
        let (entries, unreadable) = journal.entries().unwrap();
        assert!(unreadable.is_empty());
        let [read] = entries.as_slice() else { panic!("one entry") };
        assert_eq!((read.namespace.as_str(), read.name.as_str(), read.uid.as_str()), ("team-a", "alice", "uid-1"));
        assert_eq!(read.presented_sha256, lineage::sha256_hex(&["presented"]));
        assert_eq!(read.refresh_token, "r1");
        let tokens = read.tokens();
        assert_eq!(tokens.access_token.secret(), "a1");
        assert_eq!(tokens.expires_at, entry.expires_at);
        assert_eq!(tokens.id_token.unwrap().phone_number.as_deref(), Some("+4799999999"));
        assert_eq!(read.source_version.as_deref(), Some("41"));
        assert_eq!(read.pending().request.as_deref(), Some("2026-12-07T10:00:00Z"), "the request it handles");
        // An entry written before the request was journaled still reads.
        let mut earlier = serde_json::to_value(&entry).unwrap();
        earlier.as_object_mut().unwrap().remove("refresh_request");
        assert_eq!(serde_json::from_value::<Entry>(earlier).unwrap().pending().request, None);
    }

    #[test]
    fn the_directory_is_0700_and_entries_are_0600_even_under_a_world_writable_volume() {
        let root = tempfile::tempdir().unwrap();
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o777)).unwrap();
        // A directory someone made too open is tightened.
        fs::DirBuilder::new().mode(0o755).create(root.path().join(SUBDIR)).unwrap();
        let journal = Journal::open(root.path()).unwrap();
        assert_eq!(mode(journal.dir()), 0o700);
        journal.write(&Entry::new(&grant("a"), "u", &RefreshToken::new("p".into()), &pending("r", "a"))).unwrap();
        let file = fs::read_dir(journal.dir()).unwrap().next().unwrap().unwrap().path();
        assert_eq!(mode(&file), 0o600);
    }

    #[test]
    fn a_missing_journal_dir_is_created_private() {
        let root = tempfile::tempdir().unwrap();
        let missing = root.path().join("not-yet").join("journal");
        let journal = Journal::open(&missing).unwrap();
        assert_eq!(mode(&missing), 0o700);
        assert_eq!(mode(journal.dir()), 0o700);
    }

    #[test]
    fn a_newer_answer_replaces_the_grants_entry_and_removal_forgets_it() {
        let root = tempfile::tempdir().unwrap();
        let journal = Journal::open(root.path()).unwrap();
        let presented = RefreshToken::new("p".into());
        journal.write(&Entry::new(&grant("a"), "u", &presented, &pending("r1", "a1"))).unwrap();
        journal.write(&Entry::new(&grant("a"), "u", &presented, &pending("r2", "a2"))).unwrap();
        journal.write(&Entry::new(&grant("b"), "u", &presented, &pending("r3", "a3"))).unwrap();
        let (entries, _) = journal.entries().unwrap();
        let tokens: Vec<_> = entries.iter().map(|e| (e.name.as_str(), e.refresh_token.as_str())).collect();
        assert_eq!(tokens, [("a", "r2"), ("b", "r3")]);
        journal.remove(&grant("a")).unwrap();
        journal.remove(&grant("a")).unwrap(); // already gone: fine
        let (entries, _) = journal.entries().unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(fs::read_dir(journal.dir()).unwrap().count(), 1, "no temporary file remains");
    }

    #[test]
    fn retain_drops_only_the_entries_of_grants_that_are_gone() {
        let root = tempfile::tempdir().unwrap();
        let journal = Journal::open(root.path()).unwrap();
        let presented = RefreshToken::new("p".into());
        for name in ["a", "b", "c"] {
            journal.write(&Entry::new(&grant(name), "u", &presented, &pending("r", "a"))).unwrap();
        }
        journal.retain(&[grant("a"), grant("c"), grant("unrelated")]).unwrap();
        let (entries, _) = journal.entries().unwrap();
        assert_eq!(entries.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["a", "c"]);
    }

    #[test]
    fn a_temporary_file_of_a_killed_write_is_removed_and_a_corrupt_entry_is_reported_not_read() {
        let root = tempfile::tempdir().unwrap();
        let journal = Journal::open(root.path()).unwrap();
        fs::write(journal.dir().join(format!("{TEMP_PREFIX}x{SUFFIX}")), b"{\"half").unwrap();
        fs::write(journal.dir().join(format!("broken{SUFFIX}")), b"{\"refresh_token\": \"secret-value\"").unwrap();
        // A value of the wrong type, which serde's own message would quote.
        let mistyped =
            serde_json::json!({"namespace": "a", "name": "b", "refresh_token": 424242, "refreshed_at": "secret-value"});
        fs::write(journal.dir().join(format!("mistyped{SUFFIX}")), mistyped.to_string()).unwrap();
        let journal = Journal::open(root.path()).unwrap();
        let (entries, unreadable) = journal.entries().unwrap();
        assert!(entries.is_empty());
        assert_eq!(unreadable.len(), 2);
        for bad in &unreadable {
            let message = bad.to_string();
            assert!(message.contains("left in place"), "{message}");
            assert!(!message.contains("secret-value") && !message.contains("424242"), "{message}");
        }
        assert_eq!(fs::read_dir(journal.dir()).unwrap().count(), 2, "the temporary file is gone, the entries kept");
    }
}
