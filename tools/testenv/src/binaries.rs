//! Locates the Go-built servers, building them on first use through `tools/testenv/build.sh`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

static PARTS: OnceLock<Mutex<HashMap<&'static str, Built>>> = OnceLock::new();

/// The path of a Go-built peer (`kube-apiserver`, `etcd`, `kubectl`, `kube-controller-manager`,
/// `hydra`, `promtool`, `helm`), building only its part on first use. Panics with the build output
/// when it cannot be built: a test must fail, never skip, when its real peer is missing.
pub fn path(name: &str) -> PathBuf {
    let part = part_of(name);
    let mut parts = PARTS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    let paths = parts.entry(part).or_insert_with(|| build(part));
    let paths = paths.as_ref().unwrap_or_else(|e| panic!("testenv binaries unavailable: {e}"));
    paths.get(name).cloned().unwrap_or_else(|| panic!("build.sh {part} did not produce {name}"))
}

/// The path of a peer if its part was already built in this process (for cleanup code, which must
/// never start a build).
pub fn built_path(name: &str) -> Option<PathBuf> {
    let parts = PARTS.get()?.lock().unwrap_or_else(|e| e.into_inner());
    parts.get(part_of(name))?.as_ref().ok()?.get(name).cloned()
}

/// What one part of build.sh produced: binary name -> path, or the build's output.
type Built = Result<HashMap<String, PathBuf>, String>;

/// The part of `tools/testenv/build.sh` that builds `name`.
fn part_of(name: &str) -> &'static str {
    match name {
        "kube-apiserver" | "etcd" | "kubectl" => "kube",
        "kube-controller-manager" => "kcm",
        "hydra" => "hydra",
        "promtool" => "promtool",
        "helm" => "helm",
        "kubelet" | "kube-scheduler" | "kube-proxy" => "node",
        "containerd" | "containerd-shim-runc-v2" | "ctr" | "runc" => "containerd",
        other => panic!("no testenv binary {other}"),
    }
}

fn build(part: &str) -> Built {
    let script = crate::repo_root().join("tools/testenv/build.sh");
    let out =
        Command::new("bash").arg(&script).arg(part).output().map_err(|e| format!("run {}: {e}", script.display()))?;
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
