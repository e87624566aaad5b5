//! Where the repository, the shared reference data and the build cache live.

use std::path::{Path, PathBuf};

/// The root of the paddock repository (the workspace root).
pub fn repository_root() -> PathBuf {
    // This crate lives at `<root>/tests`, so its manifest directory's parent is the root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The shared reference data (`../shared` beside the repository), overridable with `PADDOCK_SHARED_DIR`.
pub fn shared_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PADDOCK_SHARED_DIR") {
        return PathBuf::from(dir);
    }
    repository_root().join("..").join("shared")
}

/// The directory holding the KubeVirt, CDI and Zarf schemas.
pub fn schemas_dir() -> PathBuf {
    shared_dir().join("schemas")
}

/// A cache directory for expensive artifacts (test disk, built binaries) reused across runs on one machine.
/// `PADDOCK_CACHE_DIR` overrides it; the default is `<root>/.cache`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PADDOCK_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    repository_root().join(".cache")
}
