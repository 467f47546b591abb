//! The images a cluster test runs: the operator's, built from the repository's Dockerfile, and
//! the node's own (pod sandbox, busybox), all by `tools/image/build.sh` with buildah.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::Context;

/// The operator image's name in the tests.
pub const OPERATOR_IMAGE: &str = "localhost/wgtwo-operator:test";

/// An OCI archive of the operator image: `$WGTWO_OPERATOR_IMAGE_ARCHIVE` if set (tools/test.sh
/// builds it once before the tests), else built now (a release build: minutes when cold).
pub fn operator_image() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("WGTWO_OPERATOR_IMAGE_ARCHIVE") {
                return Ok(PathBuf::from(path));
            }
            let path = std::env::temp_dir().join(format!("wgtwo-operator-image-{}.tar", std::process::id()));
            build(&["--tag", OPERATOR_IMAGE, "--archive", path.to_str().expect("utf-8 temp dir")])
                .map(|()| path)
                .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

/// Writes `pause.tar` and `busybox.tar` into `dir`.
pub(crate) fn test_images(dir: &Path) -> anyhow::Result<()> {
    build(&["test-images", dir.to_str().context("utf-8 dir")?])
}

fn build(args: &[&str]) -> anyhow::Result<()> {
    let script = crate::repo_root().join("tools/image/build.sh");
    let out =
        Command::new("bash").arg(&script).args(args).output().with_context(|| format!("run {}", script.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} {} failed ({}):\n{}{}",
        script.display(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
