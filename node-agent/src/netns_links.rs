//! The authorization links: the `sk_lookup` program `kmesh_authz` attached to every enrolled
//! network namespace with a `bpf_link`, pinned at `<--bpffs-dir>/authz/<netns cookie>`.
//!
//! Promises:
//! - a pinned link is never detached and re-attached while its namespace is enrolled: a starting
//!   agent adopts the pins it finds (the program keeps running with the pinned maps while no agent
//!   runs), so enforcement has no unprotected window across restarts;
//! - a namespace that left the mesh or disappeared loses its pin (the kernel detaches a link by
//!   itself when its namespace goes; the pin is then all that is left);
//! - across layouts, a link is re-pointed at the new layout's program with `BPF_LINK_UPDATE` and
//!   `BPF_F_REPLACE` (one step for the kernel), never replaced by a new link.
//!
//! A sync is a pure plan ([`plan`]: enrolled namespaces × the pins found → attach and unpin) and
//! its execution (bpf(2) through `sys`).
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File},
    io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use tracing::{info, warn};

use crate::{
    layout::{AUTHZ_LINKS_DIR, AUTHZ_PROGRAM_PIN},
    loader::{LoaderError, PinOp, bpf_err, io_err},
    sys::{self, NetnsLinkState},
};

/// A pinned authorization link, as found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FoundLink {
    pub cookie: u64,
    pub state: NetnsLinkState,
}

/// What a sync does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkPlan {
    /// Enrolled namespaces without a link: attach and pin.
    pub attach: Vec<u64>,
    /// Pins of namespaces that are gone or no longer enrolled: detach (if still attached) and
    /// unpin.
    pub unpin: Vec<u64>,
    /// Links that stay.
    pub kept: usize,
}

/// Pure: the links to create and the pins to remove so that exactly the `enrolled` namespaces
/// have an attached link. A pin whose link the kernel detached (its namespace is gone; a new
/// namespace never reuses a cookie) is removed, and its namespace — if it is somehow enrolled
/// still — gets a new link on the next sync.
pub fn plan(enrolled: &BTreeSet<u64>, found: &[FoundLink]) -> LinkPlan {
    let live: BTreeSet<u64> = found
        .iter()
        .filter(|l| l.state.attached && enrolled.contains(&l.cookie))
        .map(|l| l.cookie)
        .collect();
    LinkPlan {
        attach: enrolled.difference(&live).copied().collect(),
        unpin: found
            .iter()
            .filter(|l| !live.contains(&l.cookie))
            .map(|l| l.cookie)
            .collect(),
        kept: live.len(),
    }
}

/// What one sync changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LinkStats {
    /// Namespaces with an attached link after the sync.
    pub attached: usize,
    pub added: usize,
    pub removed: usize,
}

/// The authorization links of an installation.
#[derive(Clone, Debug)]
pub struct NetnsLinks {
    /// `<--bpffs-dir>/authz`.
    dir: PathBuf,
    /// This layout's pinned `kmesh_authz`.
    program_pin: PathBuf,
}

impl NetnsLinks {
    /// The links below `bpffs_dir`, to be attached to the program pinned in `layout_dir`.
    pub fn new(bpffs_dir: &Path, layout_dir: &Path) -> Self {
        NetnsLinks {
            dir: bpffs_dir.join(AUTHZ_LINKS_DIR),
            program_pin: layout_dir.join(AUTHZ_PROGRAM_PIN),
        }
    }

    /// Makes the pinned links match `enrolled` (cookie → an open descriptor of the namespace).
    pub fn sync(&self, enrolled: &BTreeMap<u64, Arc<File>>) -> Result<LinkStats, LoaderError> {
        let found = self.found()?;
        let cookies: BTreeSet<u64> = enrolled.keys().copied().collect();
        let plan = plan(&cookies, &found);
        for cookie in &plan.unpin {
            self.unpin(*cookie)?;
        }
        let mut added = 0;
        if !plan.attach.is_empty() {
            fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
            let program =
                sys::obj_get(&self.program_pin).map_err(bpf_err(PinOp::Open, &self.program_pin))?;
            for cookie in &plan.attach {
                let Some(netns) = enrolled.get(cookie) else {
                    continue;
                };
                let path = self.pin(*cookie);
                let link = sys::sk_lookup_link_create(program.as_fd(), netns.as_fd())
                    .map_err(bpf_err(PinOp::Attach, &path))?;
                sys::obj_pin(link.as_fd(), &path).map_err(bpf_err(PinOp::Pin, &path))?;
                info!(cookie, link = %path.display(), "authorization attached to the namespace");
                added += 1;
            }
        }
        Ok(LinkStats {
            attached: plan.kept + added,
            added,
            removed: plan.unpin.len(),
        })
    }

    /// Points every attached link at this layout's program (`BPF_LINK_UPDATE`, `BPF_F_REPLACE`);
    /// removes the pins of detached ones. Returns how many were re-pointed.
    pub fn switch_all(&self) -> Result<usize, LoaderError> {
        let found = self.found()?;
        if found.is_empty() {
            return Ok(0);
        }
        let program =
            sys::obj_get(&self.program_pin).map_err(bpf_err(PinOp::Open, &self.program_pin))?;
        let program_id =
            sys::prog_id(program.as_fd()).map_err(bpf_err(PinOp::ReadIds, &self.program_pin))?;
        let mut switched = 0;
        for link in found {
            let path = self.pin(link.cookie);
            if !link.state.attached {
                self.unpin(link.cookie)?;
                continue;
            }
            if link.state.program_id == program_id {
                continue;
            }
            let fd = sys::obj_get(&path).map_err(bpf_err(PinOp::Open, &path))?;
            let old = sys::prog_by_id(link.state.program_id)
                .map_err(bpf_err(PinOp::FindRunning, &path))?;
            match sys::link_update(fd.as_fd(), program.as_fd(), old.as_fd()) {
                Ok(()) => switched += 1,
                // The namespace went away meanwhile.
                Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => self.unpin(link.cookie)?,
                Err(e) => return Err(bpf_err(PinOp::Replace, &path)(e)),
            }
        }
        info!(
            switched,
            to_program = program_id,
            "authorization links switched to this layout's program"
        );
        Ok(switched)
    }

    /// Every pinned link with its state. A pin whose name is not a cookie is not ours: left alone.
    pub fn found(&self) -> Result<Vec<FoundLink>, LoaderError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.dir)(e)),
        };
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let Some(cookie) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            let path = entry.path();
            let link = sys::obj_get(&path).map_err(bpf_err(PinOp::Open, &path))?;
            let state =
                sys::netns_link_state(link.as_fd()).map_err(bpf_err(PinOp::ReadIds, &path))?;
            found.push(FoundLink { cookie, state });
        }
        found.sort_by_key(|l| l.cookie);
        Ok(found)
    }

    fn pin(&self, cookie: u64) -> PathBuf {
        self.dir.join(cookie.to_string())
    }

    /// Detaches the link of `cookie` (a no-op for a link the kernel detached already) and removes
    /// its pin.
    fn unpin(&self, cookie: u64) -> Result<(), LoaderError> {
        let path = self.pin(cookie);
        detach(&path);
        match fs::remove_file(&path) {
            Ok(()) => {
                info!(
                    cookie,
                    "authorization link of a namespace that left the mesh removed"
                );
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }
}

/// `BPF_LINK_DETACH` of the link pinned at `path`, effective even if another process holds it.
/// Best effort: removing the pin detaches too once nobody holds the link.
fn detach(path: &Path) {
    if let Err(e) = sys::obj_get(path).and_then(|link| sys::link_detach(link.as_fd())) {
        // A link whose namespace is gone is detached already (ENOLINK).
        if e.raw_os_error() != Some(libc::ENOLINK) {
            warn!(link = %path.display(), error = %e, "detaching an authorization link");
        }
    }
}

/// Detaches every authorization link below `bpffs_dir` (the uninstall; the pins are removed with
/// the directory after).
pub fn detach_all(bpffs_dir: &Path) {
    let dir = bpffs_dir.join(AUTHZ_LINKS_DIR);
    let Ok(entries) = fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        detach(&entry.path());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(cookie: u64, attached: bool) -> FoundLink {
        FoundLink {
            cookie,
            state: NetnsLinkState {
                link_id: cookie as u32,
                program_id: 9,
                attached,
            },
        }
    }

    #[test]
    fn enrolled_namespaces_without_a_link_are_attached_and_existing_links_are_kept() {
        let enrolled = BTreeSet::from([1, 2, 3]);
        let plan = plan(&enrolled, &[link(2, true)]);
        assert_eq!(
            plan,
            LinkPlan {
                attach: vec![1, 3],
                unpin: vec![],
                kept: 1
            }
        );
    }

    #[test]
    fn pins_of_gone_or_unenrolled_namespaces_are_removed() {
        let enrolled = BTreeSet::from([2]);
        // 1: no longer enrolled; 3: namespace gone (the kernel detached the link).
        let plan = plan(&enrolled, &[link(1, true), link(2, true), link(3, false)]);
        assert_eq!(
            plan,
            LinkPlan {
                attach: vec![],
                unpin: vec![1, 3],
                kept: 1
            }
        );
    }

    #[test]
    fn a_detached_link_of_an_enrolled_namespace_is_replaced() {
        let plan = plan(&BTreeSet::from([4]), &[link(4, false)]);
        assert_eq!(
            plan,
            LinkPlan {
                attach: vec![4],
                unpin: vec![4],
                kept: 0
            }
        );
    }
}
