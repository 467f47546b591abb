//! Locates the Go-built servers, building them on first use through `tools/testenv/build.sh`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// Paths of `kube-apiserver`, `etcd`, `kubectl` and `hydra`. Panics with the build output when they
/// cannot be built: a test must fail, never skip, when its real peer is missing.
pub fn path(name: &str) -> PathBuf {
    static PATHS: OnceLock<Result<HashMap<String, PathBuf>, String>> = OnceLock::new();
    let paths = PATHS.get_or_init(build).as_ref().unwrap_or_else(|e| panic!("testenv binaries unavailable: {e}"));
    paths.get(name).cloned().unwrap_or_else(|| panic!("build.sh did not produce {name}"))
}

fn build() -> Result<HashMap<String, PathBuf>, String> {
    let script = crate::repo_root().join("tools/testenv/build.sh");
    let out = Command::new("bash").arg(&script).output().map_err(|e| format!("run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}):\n{}{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), PathBuf::from(v)))
        .collect())
}
