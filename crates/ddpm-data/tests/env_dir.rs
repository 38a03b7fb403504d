//! `DDPM_DATA_DIR` is honoured after `--data-dir` (own process: it sets the environment).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use ddpm_data::{load_dataset, resolve_idx_dir, DatasetKind, Split, DATA_DIR_ENV};

#[test]
fn explicit_dir_then_env_then_shipped() {
    let shipped = ddpm_data::shipped_mnist_dir().expect("assets/mnist is shipped");
    std::env::remove_var(DATA_DIR_ENV);
    assert_eq!(resolve_idx_dir(&DatasetKind::Mnist, None), Some(shipped));
    assert_eq!(resolve_idx_dir(&DatasetKind::FashionMnist, None), None);
    let empty = tempfile::tempdir().unwrap();
    std::env::set_var(DATA_DIR_ENV, empty.path());
    assert_eq!(
        resolve_idx_dir(&DatasetKind::Mnist, None).as_deref(),
        Some(empty.path())
    );
    // The env dir is empty: loading fails naming a file there, not falling back silently.
    let e = load_dataset(&DatasetKind::Mnist, None, Split::Test, (28, 28)).unwrap_err();
    assert!(
        e.to_string().contains(&empty.path().display().to_string()),
        "{e}"
    );
    let explicit = Path::new("/explicit");
    assert_eq!(
        resolve_idx_dir(&DatasetKind::Mnist, Some(explicit)).as_deref(),
        Some(explicit)
    );
}
