//! A real test environment on loopback: etcd + kube-apiserver (RBAC on) and Ory Hydra, built from
//! the Go module proxy by `tools/testenv/build.sh` and started per test. Every process is killed and
//! every temp dir removed when its guard drops, also when a test panics; a child also dies with the
//! thread that spawned it (PR_SET_PDEATHSIG), so a killed test run leaves nothing behind.

pub mod binaries;
pub mod certs;
pub mod cluster;
pub mod control_plane;
pub mod fault_server;
pub mod hydra;
pub mod image;
pub mod process;
pub mod recording_proxy;
pub mod tcp_proxy;
pub mod token_server;

pub use cluster::Cluster;
pub use control_plane::ControlPlane;
pub use fault_server::{Fault, FaultServer, TokenRequest};
pub use hydra::{Callback, Hydra, HydraOptions, OAuthClient, Subscriber};
pub use recording_proxy::RecordingProxy;
pub use tcp_proxy::TcpProxy;
pub use token_server::RotatingTokenServer;

use std::net::TcpListener;
use std::path::PathBuf;

/// The repository root (this crate lives in `tools/testenv`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

/// A Secret named `name` holding `pairs` as (UTF-8) data.
pub fn string_secret(name: &str, pairs: &[(&str, &str)]) -> k8s_openapi::api::core::v1::Secret {
    k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta { name: Some(name.to_owned()), ..Default::default() },
        data: Some(
            pairs.iter().map(|(k, v)| (k.to_string(), k8s_openapi::ByteString(v.as_bytes().to_vec()))).collect(),
        ),
        ..Default::default()
    }
}

/// sha256 of a token, hex: how the test environment names tokens without showing them.
pub fn sha256_hex(token: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind loopback").port()
}

/// A temp dir that is kept (and printed) instead of removed when `WGTWO_TESTENV_KEEP` is set,
/// so a failing test's server logs can be read.
pub(crate) fn temp_dir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    let mut dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    if std::env::var_os("WGTWO_TESTENV_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!("testenv: keeping {}", dir.path().display());
    }
    Ok(dir)
}
