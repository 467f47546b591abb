//! `crds/` is generated from `src/api.rs`; this fails when someone changes one without the other.

use std::path::Path;

#[test]
fn checked_in_crd_matches_the_rust_types() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(wgtwo_operator::api::CRD_PATH);
    let generated = wgtwo_operator::api::crd_yaml();
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if std::env::var_os("UPDATE_CRDS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    assert!(
        checked_in == generated,
        "{} is out of date with src/api.rs; regenerate it with\n  cargo run -- crd > {}",
        path.display(),
        wgtwo_operator::api::CRD_PATH
    );
}
