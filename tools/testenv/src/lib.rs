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
pub mod watch_lag_proxy;

pub use cluster::Cluster;
pub use control_plane::ControlPlane;
pub use fault_server::{Fault, FaultServer, TokenRequest};
pub use hydra::{Callback, Hydra, HydraOptions, OAuthClient, Subscriber};
pub use recording_proxy::RecordingProxy;
pub use tcp_proxy::TcpProxy;
pub use token_server::RotatingTokenServer;
pub use watch_lag_proxy::WatchLagProxy;

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

/// A loopback port that was free a moment ago, for a server that a test starts next.
///
/// Picked below the kernel's ephemeral range: a port taken from that range (bind to port 0) can be
/// given to any outgoing connection (the apiserver's to etcd, a test's client) before the server
/// binds it, which then fails to start (the likely cause of a Hydra that exited at start in CI). Below 30000 also keeps clear of NodePorts; at or above
/// 15000 clears the kubelet's and the control plane's fixed ports. Never handed out twice by this
/// process, so concurrent tests in one binary cannot pick the same port either.
pub fn free_port() -> u16 {
    use rand::Rng;
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (15000, ephemeral_low.min(30000));
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    if high > low {
        let mut rng = rand::rng();
        for _ in 0..1000 {
            let port = rng.random_range(low..high);
            if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.insert(port);
                return port;
            }
        }
    }
    // An ephemeral range that starts too low to stay below it: the racy way, still unique here.
    loop {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind loopback").port();
        if given.insert(port) {
            return port;
        }
    }
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
