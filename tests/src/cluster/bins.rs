//! The control plane's binaries: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
//! kubectl, built from Go modules by `scripts/control-plane-bins.sh` into a cache outside the
//! repository, keyed by version. The versions are the script's (read from it: one definition);
//! missing binaries fail with a message naming the script, never a skip.
use std::{
    io,
    path::{Path, PathBuf},
};

/// Set to the directory `scripts/control-plane-bins.sh` prints, to use binaries elsewhere.
pub const BIN_DIR_VAR: &str = "KMESH_CONTROL_PLANE_BIN_DIR";

/// Every binary the harness runs from the directory.
pub const NAMES: [&str; 5] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
];

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/control-plane-bins.sh")
}

/// The pinned versions, from the script's `K8S_VERSION=${K8S_VERSION:-X}` and
/// `ETCD_VERSION=${ETCD_VERSION:-Y}` lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versions {
    pub kubernetes: String,
    pub etcd: String,
}

impl Versions {
    pub fn pinned() -> io::Result<Versions> {
        let path = script();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Versions::parse(&text).ok_or_else(|| {
            io::Error::other(format!(
                "{}: no K8S_VERSION=${{K8S_VERSION:-X}} and ETCD_VERSION=${{ETCD_VERSION:-Y}} lines",
                path.display()
            ))
        })
    }

    fn parse(script: &str) -> Option<Versions> {
        let pinned = |var: &str| {
            let prefix = format!("{var}=${{{var}:-");
            script.lines().find_map(|l| {
                l.trim()
                    .strip_prefix(&prefix)?
                    .strip_suffix('}')
                    .map(str::to_string)
            })
        };
        Some(Versions {
            kubernetes: pinned("K8S_VERSION")?,
            etcd: pinned("ETCD_VERSION")?,
        })
    }
}

/// The directory holding all five binaries.
#[derive(Clone, Debug)]
pub struct Binaries {
    dir: PathBuf,
    pub versions: Versions,
}

impl Binaries {
    /// `$KMESH_CONTROL_PLANE_BIN_DIR`, else the script's default output directory
    /// (`${KMESH_CACHE:-~/.cache/kmesh-rs}/bin-k8s-vX-etcd-vY`). Fails unless every binary is there.
    pub fn locate() -> io::Result<Binaries> {
        let versions = Versions::pinned()?;
        let dir = match std::env::var_os(BIN_DIR_VAR) {
            Some(d) => PathBuf::from(d),
            None => {
                let cache = std::env::var_os("KMESH_CACHE")
                    .map(PathBuf::from)
                    .or_else(|| {
                        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kmesh-rs"))
                    })
                    .ok_or_else(|| io::Error::other("neither KMESH_CACHE nor HOME is set"))?;
                cache.join(format!(
                    "bin-k8s-v{}-etcd-v{}",
                    versions.kubernetes, versions.etcd
                ))
            }
        };
        Binaries::at(dir, versions)
    }

    /// The binaries in `dir`; fails unless all of them are there.
    pub fn at(dir: PathBuf, versions: Versions) -> io::Result<Binaries> {
        let missing: Vec<&str> = NAMES
            .iter()
            .copied()
            .filter(|n| !is_executable(&dir.join(n)))
            .collect();
        if !missing.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "the test control plane (Kubernetes v{}, etcd v{}) is missing {} in {}: run \
                     `scripts/control-plane-bins.sh` (builds them from Go modules into a cache \
                     outside the repository, about 8 minutes cold on 2 cores; seconds when cached) \
                     and export {BIN_DIR_VAR}=<the directory it prints>",
                    versions.kubernetes,
                    versions.etcd,
                    missing.join(", "),
                    dir.display()
                ),
            ));
        }
        Ok(Binaries { dir, versions })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_come_from_the_script() {
        let v = Versions::parse(
            "x\nK8S_VERSION=${K8S_VERSION:-1.36.3}\nETCD_VERSION=${ETCD_VERSION:-3.6.16}\n",
        )
        .unwrap();
        assert_eq!(v.kubernetes, "1.36.3");
        assert_eq!(v.etcd, "3.6.16");
        assert_eq!(Versions::parse("K8S_VERSION=1"), None);
        // And the real script parses.
        Versions::pinned().unwrap();
    }

    #[test]
    fn missing_binaries_name_the_script() {
        let dir = std::env::temp_dir().join("kmt-no-such-control-plane");
        let err = Binaries::at(dir, Versions::pinned().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("scripts/control-plane-bins.sh"), "{err}");
        assert!(err.contains("etcd, kube-apiserver"), "{err}");
        assert!(err.contains(BIN_DIR_VAR), "{err}");
    }
}
