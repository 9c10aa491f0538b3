//! Where the agent pins what, and what a starting agent does with the pins it finds (a pure plan).
//!
//! `--bpffs-dir` holds the three cgroup links at its top (`link_connect4`, `link_connect6`,
//! `link_sockops`: the connection events' `sock_ops` program), and the
//! authorization links, one per enrolled network namespace, in `authz/` (`netns_links.rs`). They
//! outlive agents and layouts: `BPF_LINK_UPDATE` replaces the program a link runs and keeps the
//! link, its id and its pin. The maps and programs of an eBPF object live in a directory of their
//! own, named by the object's layout: `v<LAYOUT_VERSION>-<FNV-1a 64 of the object>`. Any change of
//! the object — a map definition, a program — is a new layout, so a change that forgot to bump
//! `LAYOUT_VERSION` still gets maps of its own. Maps and programs pinned at the top are the layout
//! from before this versioning, and count as another layout.
//!
//! The plan ([`plan`]): if every pinned link runs this layout's pinned programs, the agent adopts
//! the pins as they are (attaching only a missing link). Otherwise it loads its object, with maps of
//! its layout, and switches the links to its programs: at once when no link is pinned (nothing is
//! steered yet), or only once its own maps hold a live snapshot and the enrolled namespaces, when
//! links run other programs (those keep steering with their maps until then). Pins of other layouts
//! are removed after the switch, when no link runs their programs.
use std::path::{Path, PathBuf};

use kmesh_common::{LAYOUT_VERSION, map_names};

use crate::sys::CgroupHook;

/// Every map the programs declare; each is pinned under its own name in the layout's directory.
pub const MAPS: [&str; 16] = [
    map_names::ACTIVE,
    map_names::GENERATION,
    map_names::SERVICES,
    map_names::ROUTES,
    map_names::BACKEND_SETS,
    map_names::ENDPOINTS,
    map_names::ENROLLED,
    map_names::COUNTERS,
    map_names::AUTHZ_WORKLOADS,
    map_names::AUTHZ_SOURCES,
    map_names::AUTHZ_VERDICTS,
    map_names::AUTHZ_COUNTERS,
    map_names::HOST_ADDRS,
    map_names::EVENTS,
    map_names::EVENTS_DROPPED,
    map_names::SOCK_STATE,
];

/// The authorization program (`sk_lookup`), attached per enrolled network namespace.
pub const AUTHZ_PROGRAM: &str = "kmesh_authz";
/// Its pin, in the layout's directory.
pub const AUTHZ_PROGRAM_PIN: &str = "prog_authz";
/// The directory below `--bpffs-dir` holding one link pin per enrolled network namespace, named by
/// the namespace's cookie. Like the cgroup links, these outlive agents and layouts.
pub const AUTHZ_LINKS_DIR: &str = "authz";

/// A cgroup hook the agent attaches a program to, with the names of its program and pins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    Connect4,
    Connect6,
    /// The connection events (`kmesh_sockops`), on the same cgroup.
    SockOps,
}

/// Number of cgroup hooks.
pub const HOOKS: usize = 3;

impl Hook {
    pub const ALL: [Hook; HOOKS] = [Hook::Connect4, Hook::Connect6, Hook::SockOps];

    /// The program's name in the object.
    pub const fn program(self) -> &'static str {
        match self {
            Hook::Connect4 => "kmesh_connect4",
            Hook::Connect6 => "kmesh_connect6",
            Hook::SockOps => "kmesh_sockops",
        }
    }

    /// The program's pin, in the layout's directory.
    pub const fn program_pin(self) -> &'static str {
        match self {
            Hook::Connect4 => "prog_connect4",
            Hook::Connect6 => "prog_connect6",
            Hook::SockOps => "prog_sockops",
        }
    }

    /// The link's pin, at the top of `--bpffs-dir`.
    pub const fn link_pin(self) -> &'static str {
        match self {
            Hook::Connect4 => "link_connect4",
            Hook::Connect6 => "link_connect6",
            Hook::SockOps => "link_sockops",
        }
    }

    pub const fn cgroup_hook(self) -> CgroupHook {
        match self {
            Hook::Connect4 => CgroupHook::Connect4,
            Hook::Connect6 => CgroupHook::Connect6,
            Hook::SockOps => CgroupHook::SockOps,
        }
    }

    /// Position in [`Hook::ALL`].
    pub const fn position(self) -> usize {
        self as usize
    }
}

/// The layout of an eBPF object: the name of its pin directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutId(String);

impl LayoutId {
    /// The layout of `object` (its ELF bytes).
    pub fn of(object: &[u8]) -> LayoutId {
        LayoutId(format!(
            "v{LAYOUT_VERSION}-{:016x}",
            kmesh_snapshot::content_hash(object)
        ))
    }

    /// The directory name, `v<LAYOUT_VERSION>-<16 hex digits>`.
    pub fn dir_name(&self) -> &str {
        &self.0
    }

    /// Whether `name` names a layout directory (of any layout).
    pub fn is_layout_dir_name(name: &str) -> bool {
        let Some((version, hash)) = name.strip_prefix('v').and_then(|n| n.split_once('-')) else {
            return false;
        };
        !version.is_empty()
            && version.bytes().all(|b| b.is_ascii_digit())
            && hash.len() == 16
            && hash.bytes().all(|b| b.is_ascii_hexdigit())
    }
}

impl std::fmt::Display for LayoutId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a starting agent finds in `--bpffs-dir`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// Per hook ([`Hook::ALL`] order): the id of the program its pinned link runs, if a link is
    /// pinned (0 for a link whose program was detached).
    pub links: [Option<u32>; HOOKS],
    /// This layout's directory holds every map and program.
    pub own_complete: bool,
    /// Per hook: the id of this layout's pinned program, if pinned.
    pub own_programs: [Option<u32>; HOOKS],
    /// Pins of other layouts: their directories, and maps or programs pinned at the top.
    pub others: Vec<PathBuf>,
}

/// When the links are to run this layout's programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchWhen {
    /// No pinned link steers (none is pinned, or they are detached): switch now.
    Now,
    /// Links run other programs, which keep steering with their own maps until this layout's maps
    /// hold a live snapshot and the enrolled namespaces.
    AfterFirstSnapshot,
}

/// What to do with the pins found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Every pinned link runs this layout's programs: use the pins as they are. Attach the hooks
    /// whose link is missing to the pinned programs; remove the pins of other layouts (no link
    /// runs their programs).
    Adopt {
        missing: Vec<Hook>,
        retire: Vec<PathBuf>,
    },
    /// Load this layout's object (reusing any map pinned in its directory), then point every link
    /// at its programs (`when`), then remove the pins of other layouts.
    Load {
        when: SwitchWhen,
        retire: Vec<PathBuf>,
    },
}

/// The plan for `found` (see the module docs).
pub fn plan(found: &Found) -> Plan {
    let runs_own = Hook::ALL.iter().all(|h| {
        let i = h.position();
        found.links[i].is_none_or(|prog| found.own_programs[i] == Some(prog))
    });
    let retire = found.others.clone();
    if found.own_complete && runs_own {
        let missing = Hook::ALL
            .into_iter()
            .filter(|h| found.links[h.position()].is_none())
            .collect();
        return Plan::Adopt { missing, retire };
    }
    // A detached link (program 0) steers nothing.
    let steering = found.links.iter().any(|l| l.is_some_and(|prog| prog != 0));
    let when = if steering {
        SwitchWhen::AfterFirstSnapshot
    } else {
        SwitchWhen::Now
    };
    Plan::Load { when, retire }
}

/// Whether `name` is a map or program pinned at the top of `--bpffs-dir`: the layout before
/// layout directories.
fn is_loose_pin(name: &str) -> bool {
    MAPS.contains(&name)
        || Hook::ALL.iter().any(|h| h.program_pin() == name)
        || name == AUTHZ_PROGRAM_PIN
}

/// The entries of `--bpffs-dir` (given by name) that belong to layouts other than `own`: other
/// layout directories, and maps or programs pinned at the top.
pub fn other_layouts(dir: &Path, names: &[String], own: &LayoutId) -> Vec<PathBuf> {
    let mut others: Vec<PathBuf> = names
        .iter()
        .filter(|name| {
            (LayoutId::is_layout_dir_name(name) && *name != own.dir_name()) || is_loose_pin(name)
        })
        .map(|name| dir.join(name))
        .collect();
    others.sort();
    others
}

/// Every entry of `--bpffs-dir` (given by name) that the agent pins: the links, every layout
/// directory, loose maps and programs. What an uninstall removes.
pub fn every_pin(dir: &Path, names: &[String]) -> Vec<PathBuf> {
    let ours = |name: &str| {
        Hook::ALL.iter().any(|h| h.link_pin() == name)
            || name == AUTHZ_LINKS_DIR
            || LayoutId::is_layout_dir_name(name)
            || is_loose_pin(name)
    };
    let mut pins: Vec<PathBuf> = names
        .iter()
        .filter(|name| ours(name))
        .map(|name| dir.join(name))
        .collect();
    pins.sort();
    pins
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(links: [Option<u32>; HOOKS], own: Option<[u32; HOOKS]>, others: &[&str]) -> Found {
        Found {
            links,
            own_complete: own.is_some(),
            own_programs: own.map_or([None; HOOKS], |ids| ids.map(Some)),
            others: others.iter().map(PathBuf::from).collect(),
        }
    }

    #[test]
    fn an_empty_directory_is_installed_and_switched_at_once() {
        assert_eq!(
            plan(&found([None, None, None], None, &[])),
            Plan::Load {
                when: SwitchWhen::Now,
                retire: vec![]
            }
        );
    }

    #[test]
    fn links_running_this_layout_are_adopted() {
        assert_eq!(
            plan(&found([Some(7), Some(8), Some(9)], Some([7, 8, 9]), &[])),
            Plan::Adopt {
                missing: vec![],
                retire: vec![]
            }
        );
        // An interrupted upgrade that had switched the links: adopt and finish the cleanup.
        assert_eq!(
            plan(&found(
                [Some(7), Some(8), Some(9)],
                Some([7, 8, 9]),
                &["/b/v1-old"]
            )),
            Plan::Adopt {
                missing: vec![],
                retire: vec!["/b/v1-old".into()]
            }
        );
        // A missing link is attached to the pinned program.
        assert_eq!(
            plan(&found([Some(7), None, Some(9)], Some([7, 8, 9]), &[])),
            Plan::Adopt {
                missing: vec![Hook::Connect6],
                retire: vec![]
            }
        );
    }

    #[test]
    fn links_running_other_programs_switch_after_the_first_snapshot() {
        // Another layout steers: fill ours first.
        assert_eq!(
            plan(&found([Some(3), Some(4), Some(5)], None, &["/b/v1-old"])),
            Plan::Load {
                when: SwitchWhen::AfterFirstSnapshot,
                retire: vec!["/b/v1-old".into()]
            }
        );
        // Our layout is pinned (an interrupted upgrade) but the links still run the old programs.
        assert_eq!(
            plan(&found(
                [Some(3), Some(4), Some(5)],
                Some([7, 8, 9]),
                &["/b/v1-old"]
            )),
            Plan::Load {
                when: SwitchWhen::AfterFirstSnapshot,
                retire: vec!["/b/v1-old".into()]
            }
        );
        // One link of ours, one of another layout: still another layout steers.
        assert_eq!(
            plan(&found([Some(7), Some(4), Some(5)], Some([7, 8, 9]), &[])),
            Plan::Load {
                when: SwitchWhen::AfterFirstSnapshot,
                retire: vec![]
            }
        );
        // A layout directory incomplete while links run its programs: rebuilt, then switched.
        let mut partial = found([Some(7), Some(8), Some(9)], None, &[]);
        partial.own_programs = [Some(7), Some(8), Some(9)];
        assert_eq!(
            plan(&partial),
            Plan::Load {
                when: SwitchWhen::AfterFirstSnapshot,
                retire: vec![]
            }
        );
    }

    #[test]
    fn a_layout_without_the_sockops_link_is_upgraded_and_the_link_added() {
        // Links of a layout before connection events: connect4/6 steer, no sock_ops link.
        assert_eq!(
            plan(&found([Some(3), Some(4), None], None, &["/b/v2-old"])),
            Plan::Load {
                when: SwitchWhen::AfterFirstSnapshot,
                retire: vec!["/b/v2-old".into()]
            }
        );
        // Our layout, its sock_ops link removed by hand: attached again to the pinned program.
        assert_eq!(
            plan(&found([Some(7), Some(8), None], Some([7, 8, 9]), &[])),
            Plan::Adopt {
                missing: vec![Hook::SockOps],
                retire: vec![]
            }
        );
    }

    #[test]
    fn detached_links_steer_nothing_and_are_switched_at_once() {
        // An uninstall that stopped half-way: links pinned but detached (program 0).
        assert_eq!(
            plan(&found([Some(0), Some(0), Some(0)], Some([7, 8, 9]), &[])),
            Plan::Load {
                when: SwitchWhen::Now,
                retire: vec![]
            }
        );
        assert_eq!(
            plan(&found([Some(0), Some(8), Some(9)], Some([7, 8, 9]), &[])),
            Plan::Load {
                when: SwitchWhen::AfterFirstSnapshot,
                retire: vec![]
            }
        );
    }

    #[test]
    fn maps_without_links_are_reused_and_attached_at_once() {
        // Maps pinned, no link (an install that stopped half-way): nothing steers, so attach now.
        let mut half = found([None, None, None], None, &[]);
        half.own_programs = [Some(7), None, None];
        assert_eq!(
            plan(&half),
            Plan::Load {
                when: SwitchWhen::Now,
                retire: vec![]
            }
        );
    }

    #[test]
    fn layout_ids_name_version_and_object() {
        let a = LayoutId::of(b"object a");
        let b = LayoutId::of(b"object b");
        assert_ne!(a, b);
        assert_eq!(a, LayoutId::of(b"object a"));
        assert!(a.dir_name().starts_with(&format!("v{LAYOUT_VERSION}-")));
        assert!(LayoutId::is_layout_dir_name(a.dir_name()));
        for not_a_layout in [
            "link_connect4",
            "KM_ACTIVE",
            "v1-xyz",
            "v-0123456789abcdef",
            "vx-0123456789abcdef",
            "v1-0123456789abcdef0",
        ] {
            assert!(
                !LayoutId::is_layout_dir_name(not_a_layout),
                "{not_a_layout}"
            );
        }
    }

    #[test]
    fn other_layouts_are_other_directories_and_loose_pins_but_never_links() {
        let own = LayoutId::of(b"ours");
        let other = LayoutId::of(b"theirs");
        let names: Vec<String> = [
            own.dir_name(),
            other.dir_name(),
            "link_connect4",
            "link_connect6",
            "link_sockops",
            "KM_ACTIVE",
            "prog_connect4",
            "authz",
            "unrelated",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let dir = Path::new("/sys/fs/bpf/kmesh");
        let mut expected = vec![
            dir.join(other.dir_name()),
            dir.join("KM_ACTIVE"),
            dir.join("prog_connect4"),
        ];
        expected.sort();
        assert_eq!(other_layouts(dir, &names, &own), expected);
        let every = every_pin(dir, &names);
        assert_eq!(every.len(), 8, "{every:?}");
        assert!(every.contains(&dir.join("authz")));
        assert!(!other_layouts(dir, &names, &own).contains(&dir.join("authz")));
        assert!(!every.contains(&dir.join("unrelated")));
    }
}
