//! Writes a set of files into a directory so that a reader never sees a mix of two versions, the
//! way kubelet updates Secret volumes (its AtomicWriter): each version goes into a new hidden
//! directory, the symlink `..data` is swapped to it with one rename, and each visible name is a
//! symlink through `..data`. A reader that resolves `..data` once (or reads `token.json`, one
//! file) sees one version; one that opens the names one by one sees, per file, a whole version.
//!
//! Hand-written: no maintained crate does this (kubelet's is Go), and it is a few file operations.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, symlink};
use std::path::Path;

/// The symlink to the current version's directory.
pub const DATA_LINK: &str = "..data";
const DATA_LINK_TMP: &str = "..data_tmp";
/// One file with every key as JSON: a consistent set in a single read.
pub const JSON_FILE: &str = crate::api::TARGET_FILE_TOKEN_JSON;

/// Writes `files` as the new version in `dir` with `mode` and returns the version directory's name.
/// Names starting with `..` are refused (they are the writer's own).
pub fn write_version(dir: &Path, files: &BTreeMap<String, Vec<u8>>, mode: u32) -> std::io::Result<String> {
    if let Some(bad) = files.keys().find(|k| !valid_name(k)) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("file name {bad:?} is not allowed")));
    }
    let previous = current_version(dir);
    let version = unique_version_name(dir);
    let version_dir = dir.join(&version);
    fs::create_dir(&version_dir)?;
    // Readable (and listable) by whoever may read the files; the files carry the restriction.
    fs::set_permissions(&version_dir, fs::Permissions::from_mode(0o755))?;
    for (name, content) in files {
        let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(version_dir.join(name))?;
        // The umask may have narrowed the mode at creation; set exactly what was asked.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(content)?;
    }
    // The swap: a new symlink renamed over the old one is one atomic step.
    let tmp = dir.join(DATA_LINK_TMP);
    let _ = fs::remove_file(&tmp);
    symlink(&version, &tmp)?;
    fs::rename(&tmp, dir.join(DATA_LINK))?;
    // Visible names point through `..data`; names of the previous version that are gone go too.
    for name in files.keys() {
        let link = dir.join(name);
        if fs::symlink_metadata(&link).is_err() {
            symlink(Path::new(DATA_LINK).join(name), &link)?;
        }
    }
    if let Some(previous) = &previous {
        for entry in fs::read_dir(dir.join(previous)).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !files.contains_key(&name) {
                let _ = fs::remove_file(dir.join(&name));
            }
        }
    }
    // Older versions: a reader that resolved one a moment ago and finds it gone reads again.
    for entry in fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_version = name.starts_with("..") && name != DATA_LINK && name != DATA_LINK_TMP;
        if is_version && name != version && entry.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir_all(entry.path())?;
        }
    }
    Ok(version)
}

/// The version directory `..data` points to.
pub fn current_version(dir: &Path) -> Option<String> {
    fs::read_link(dir.join(DATA_LINK)).ok().map(|p| p.to_string_lossy().into_owned())
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with("..") && !name.contains('/') && name != "."
}

fn unique_version_name(dir: &Path) -> String {
    let now = jiff::Timestamp::now();
    let base = format!("..{}", now.strftime("%Y_%m_%d_%H_%M_%S.%f"));
    let mut name = base.clone();
    let mut n = 0;
    while dir.join(&name).exists() {
        n += 1;
        name = format!("{base}_{n}");
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect()
    }

    fn read(dir: &Path, name: &str) -> String {
        fs::read_to_string(dir.join(name)).unwrap()
    }

    #[test]
    fn each_version_replaces_the_last_through_one_symlink_and_keeps_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let first =
            write_version(dir.path(), &files(&[("access_token", "a1"), ("phone_number", "+47")]), 0o440).unwrap();
        assert_eq!(read(dir.path(), "access_token"), "a1");
        assert_eq!(current_version(dir.path()).as_deref(), Some(first.as_str()));
        let second = write_version(dir.path(), &files(&[("access_token", "a2"), ("scope", "s")]), 0o440).unwrap();
        assert_ne!(first, second);
        assert_eq!(read(dir.path(), "access_token"), "a2");
        assert_eq!(read(dir.path(), "scope"), "s");
        assert!(fs::symlink_metadata(dir.path().join("phone_number")).is_err(), "a key that went is removed");
        assert!(!dir.path().join(&first).exists(), "the old version is removed");
        let mut names: Vec<String> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, [second.as_str(), "..data", "access_token", "scope"]);
        assert!(fs::symlink_metadata(dir.path().join("access_token")).unwrap().file_type().is_symlink());
    }

    #[test]
    fn files_get_exactly_the_mode_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let version = write_version(dir.path(), &files(&[("access_token", "a")]), 0o400).unwrap();
        let mode = fs::metadata(dir.path().join(&version).join("access_token")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o400);
    }

    #[test]
    fn names_of_the_writer_itself_or_with_a_slash_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["..data", "..x", "a/b", ""] {
            let err = write_version(dir.path(), &files(&[(bad, "x")]), 0o400).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{bad}");
        }
        assert!(current_version(dir.path()).is_none(), "nothing was written");
    }
}
