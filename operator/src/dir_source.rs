//! `--source dir:PATH` and `kmeshctl compile -f`: objects from YAML files.
use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use crate::{Error, Result, diagnostics::Diagnostic, inputs::Inputs};

/// The YAML files under `path` (a file or a directory, read recursively), sorted, so that results
/// do not depend on directory order.
pub fn yaml_files(path: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    collect(path, &mut out)?;
    Ok(out)
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .and_then(|dir| dir.map(|e| e.map(|e| e.path())).collect())
            .map_err(Error::read(path))?;
        entries.sort();
        for entry in entries {
            if entry.is_dir() || entry.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                collect(&entry, out)?;
            }
        }
    } else {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// Reads every YAML file under each of `paths` into one set of inputs.
pub fn load(paths: &[PathBuf], default_namespace: &str) -> Result<(Inputs, Vec<Diagnostic>)> {
    let mut inputs = Inputs::default();
    let mut diagnostics = Vec::new();
    for path in paths {
        for file in yaml_files(path)? {
            let text = std::fs::read_to_string(&file).map_err(Error::read(&file))?;
            diagnostics.extend(inputs.add_yaml(
                &text,
                &file.display().to_string(),
                default_namespace,
            ));
        }
    }
    Ok((inputs, diagnostics))
}

/// A cheap fingerprint of the files (names, sizes, modification times): it changes when any file
/// is added, removed or written.
pub fn fingerprint(paths: &[PathBuf]) -> Result<Vec<(PathBuf, u64, Option<SystemTime>)>> {
    let mut out = Vec::new();
    for path in paths {
        for file in yaml_files(path)? {
            let meta = std::fs::metadata(&file).map_err(Error::read(&file))?;
            out.push((file, meta.len(), meta.modified().ok()));
        }
    }
    Ok(out)
}
