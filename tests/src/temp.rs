//! A temporary file or directory that is removed when dropped, also when a test fails.
use std::path::{Path, PathBuf};

pub struct TempPath(PathBuf);

impl TempPath {
    /// A path under the temporary directory, unique to this process: `kmt-<name>-<pid>`.
    pub fn new(name: &str) -> TempPath {
        TempPath(std::env::temp_dir().join(format!("kmt-{name}-{}", std::process::id())))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.0.is_dir() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
