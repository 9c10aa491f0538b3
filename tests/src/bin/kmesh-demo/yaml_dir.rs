//! The directory of YAML that the local demo's operator reads (`kmesh-operator --source dir:`), as
//! a GitOps repository of a one-node bookinfo cluster would hold it:
//!
//! * `bookinfo-cluster.yaml`: the test fixture `tests/fixtures/bookinfo/cluster.yaml` (bookinfo's
//!   Services with their VIPs, its Pods with their IPs on the node, the enrolled namespace), moved
//!   to the demo's node name and addresses;
//! * `destination-rule-all.yaml`: Istio's sample, as it is (the v1/v2/v3 subsets);
//! * `kmeshconfig.yaml`: the shipped `config/kmeshconfig/kmeshconfig.yaml`;
//! * `virtual-service.yaml`: the Istio VirtualService sample of the current step.
//!
//! A step rewrites one file atomically (a temporary file the operator ignores, then a rename), so
//! the operator never reads half a step. The directory is removed when dropped.
use std::path::{Path, PathBuf};

use kmesh_tests::{TempPath, write_atomically};

use crate::story::{Change, context, in_repository, istio_sample};

/// The fixture, and what it says that the demo changes: the node and the address blocks (agents
/// enrol network namespaces by IP, machine-wide, so the demo uses addresses no test uses).
const FIXTURE: &str = "tests/fixtures/bookinfo/cluster.yaml";
const FIXTURE_MOVES: [(&str, &str); 3] = [
    ("node-1", crate::local::NODE),
    ("10.244.77.", "10.244.190."),
    ("10.96.77.", "10.96.190."),
];

const KMESHCONFIG: &str = "config/kmeshconfig/kmeshconfig.yaml";
const KERNEL_NATIVE: &str = "mode: KernelNative";
const DISABLED: &str = "mode: Disabled";

/// The file a step writes.
const VIRTUAL_SERVICE_FILE: &str = "virtual-service.yaml";
const KMESHCONFIG_FILE: &str = "kmeshconfig.yaml";

pub struct YamlDir {
    dir: TempPath,
}

/// What a step wrote: the file and its content.
pub struct Written {
    pub file: PathBuf,
    pub content: String,
}

impl YamlDir {
    /// The directory with the cluster, the DestinationRules and the KmeshConfig, and no
    /// VirtualService yet.
    pub fn new() -> Result<YamlDir, String> {
        let yaml = YamlDir {
            dir: TempPath::new("demo-yaml"),
        };
        std::fs::create_dir_all(yaml.path()).map_err(context("creating the YAML directory"))?;
        yaml.write("bookinfo-cluster.yaml", &moved_fixture()?)?;
        let rules = read(&in_repository(&istio_sample("destination-rule-all.yaml")?))?;
        yaml.write("destination-rule-all.yaml", &rules)?;
        yaml.write(KMESHCONFIG_FILE, &read(&in_repository(KMESHCONFIG))?)?;
        Ok(yaml)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Makes the directory say what `change` says.
    pub fn apply(&self, change: Change) -> Result<Written, String> {
        let (file, content) = match change {
            Change::VirtualService(sample) => (
                VIRTUAL_SERVICE_FILE,
                read(&in_repository(&istio_sample(sample)?))?,
            ),
            Change::ModeDisabled => (
                KMESHCONFIG_FILE,
                disabled(&read(&self.path().join(KMESHCONFIG_FILE))?)?,
            ),
        };
        self.write(file, &content)?;
        Ok(Written {
            file: self.path().join(file),
            content,
        })
    }

    fn write(&self, file: &str, content: &str) -> Result<(), String> {
        let path = self.path().join(file);
        write_atomically(&path, content.as_bytes())
            .map_err(context(format!("writing {}", path.display())))
    }
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(context(format!("reading {}", path.display())))
}

/// The fixture at the demo's node and addresses, under a header that says so.
fn moved_fixture() -> Result<String, String> {
    let fixture = read(&in_repository(FIXTURE))?;
    let mut moved: String = fixture
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    for (from, to) in FIXTURE_MOVES {
        if !moved.contains(from) {
            return Err(format!(
                "{FIXTURE} no longer mentions {from:?}, which the demo moves to {to:?}"
            ));
        }
        moved = moved.replace(from, to);
    }
    let header = format!(
        "# {FIXTURE} (bookinfo's Services and Pods as the API server would hold them), moved to \
         node {} and the addresses 10.244.190.0/24 (pods) and 10.96.190.0/24 (VIPs).\n",
        crate::local::NODE
    );
    Ok(header + &moved)
}

/// The KmeshConfig `yaml` with `spec.mode: Disabled` (what `kubectl patch --type merge -p
/// '{"spec":{"mode":"Disabled"}}'` does to it).
fn disabled(yaml: &str) -> Result<String, String> {
    match yaml.matches(KERNEL_NATIVE).count() {
        1 => Ok(yaml.replacen(KERNEL_NATIVE, DISABLED, 1)),
        n => Err(format!(
            "{KMESHCONFIG} says `{KERNEL_NATIVE}` {n} times; the demo expects it once"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixture_moves_to_the_demo_node_and_addresses() {
        let moved = moved_fixture().unwrap();
        for (from, to) in FIXTURE_MOVES {
            assert!(!moved.contains(from), "{from} left in:\n{moved}");
            assert!(moved.contains(to), "{to} missing in:\n{moved}");
        }
        assert!(moved.contains("podIP: 10.244.190.21"), "{moved}");
        assert!(moved.contains("clusterIP: 10.96.190.13"), "{moved}");
    }

    #[test]
    fn disabling_changes_only_the_mode() {
        let shipped = read(&in_repository(KMESHCONFIG)).unwrap();
        let off = disabled(&shipped).unwrap();
        assert_eq!(off.replace(DISABLED, KERNEL_NATIVE), shipped);
        assert!(disabled(&off).is_err(), "already disabled");
    }
}
