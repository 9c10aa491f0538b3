//! Pointing the pinned cgroup links at this layout's programs, and retiring other layouts' pins.
//!
//! A link that runs another program is switched with `BPF_LINK_UPDATE` and `BPF_F_REPLACE` (the
//! kernel swaps the program in the cgroup's effective array in one step, and refuses if the link no
//! longer runs the program we saw): the link, its id and its pin stay, and each connect() runs
//! either the old program on the old maps or the new program on the new maps. A hook without a link
//! gets a new one (`BPF_LINK_CREATE`), pinned. The per-namespace authorization links are
//! re-pointed the same way (`netns_links.rs`). Only once every link runs this layout's programs are
//! the other layouts' pins removed, which frees their maps.
use std::{
    fs::File,
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use tracing::info;

use crate::{
    layout::Hook,
    loader::{Installation, LoaderError, PinOp, bpf_err, open_cgroup, remove_pins},
    netns_links::NetnsLinks,
    sys,
};

/// A cgroup link as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AttachedLink {
    pub name: &'static str,
    pub link_id: u32,
    pub program_id: u32,
}

/// The switch of every link to this layout's programs, and the pins to remove after it.
#[derive(Debug)]
pub struct LinkSwitch {
    dir: PathBuf,
    layout_dir: PathBuf,
    /// Open when a link may have to be created.
    cgroup: Option<File>,
    retire: Vec<PathBuf>,
}

/// What one hook's link did in a switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookSwitch {
    /// It ran this layout's program already.
    Kept,
    /// `BPF_LINK_UPDATE` replaced the program `from` by this layout's.
    Replaced { from: u32 },
    /// A new link was created and pinned.
    Attached,
}

impl LinkSwitch {
    /// A switch to `installation`'s layout that then removes `retire`. Opens `cgroup` when
    /// `may_attach` (so that a wrong path fails before anything is loaded or pinned).
    pub fn new(
        installation: &Installation,
        cgroup: &Path,
        retire: Vec<PathBuf>,
        may_attach: bool,
    ) -> Result<Self, LoaderError> {
        Ok(LinkSwitch {
            dir: installation.dir.clone(),
            layout_dir: installation.layout_dir.clone(),
            cgroup: may_attach.then(|| open_cgroup(cgroup)).transpose()?,
            retire,
        })
    }

    /// The pins this switch removes once done.
    pub fn retiring(&self) -> &[PathBuf] {
        &self.retire
    }

    /// Points every link at this layout's programs, then removes the retired pins. On an error the
    /// links switched so far stay switched (each runs a complete program with its own maps) and
    /// nothing is removed; running it again finishes the job.
    pub fn run(&self) -> Result<Vec<(Hook, HookSwitch)>, LoaderError> {
        let mut done = Vec::new();
        for hook in Hook::ALL {
            done.push((hook, self.switch(hook)?));
        }
        // The authorization links too: each is re-pointed in one step, never re-made.
        NetnsLinks::new(&self.dir, &self.layout_dir).switch_all()?;
        for path in &self.retire {
            remove_pins(path)?;
        }
        Ok(done)
    }

    fn switch(&self, hook: Hook) -> Result<HookSwitch, LoaderError> {
        let program_path = self.layout_dir.join(hook.program_pin());
        let program = sys::obj_get(&program_path).map_err(bpf_err(PinOp::Open, &program_path))?;
        let program_id =
            sys::prog_id(program.as_fd()).map_err(bpf_err(PinOp::ReadIds, &program_path))?;
        let link_path = self.dir.join(hook.link_pin());
        if !link_path.exists() {
            return self.attach(hook, program.as_fd(), &link_path);
        }
        let link = sys::obj_get(&link_path).map_err(bpf_err(PinOp::Open, &link_path))?;
        let (link_id, running) =
            sys::link_ids(link.as_fd()).map_err(bpf_err(PinOp::ReadIds, &link_path))?;
        if running == program_id {
            return Ok(HookSwitch::Kept);
        }
        if running == 0 {
            // A detached link (an uninstall that stopped half-way) attaches nothing: replace it.
            remove_pins(&link_path)?;
            return self.attach(hook, program.as_fd(), &link_path);
        }
        let old = sys::prog_by_id(running).map_err(bpf_err(PinOp::FindRunning, &link_path))?;
        sys::link_update(link.as_fd(), program.as_fd(), old.as_fd())
            .map_err(bpf_err(PinOp::Replace, &link_path))?;
        info!(
            link = %link_path.display(),
            link_id,
            from_program = running,
            to_program = program_id,
            "link switched to this layout's program"
        );
        Ok(HookSwitch::Replaced { from: running })
    }

    /// Attaches `program` to the cgroup at `hook` with a new link, pinned at `link_path`.
    fn attach(
        &self,
        hook: Hook,
        program: BorrowedFd<'_>,
        link_path: &Path,
    ) -> Result<HookSwitch, LoaderError> {
        let cgroup = self.cgroup.as_ref().ok_or_else(|| LoaderError::Bpf {
            op: PinOp::Attach,
            path: link_path.to_path_buf(),
            source: std::io::Error::other("no cgroup was opened for a missing link"),
        })?;
        let link = sys::link_create(program, cgroup.as_fd(), hook.cgroup_hook())
            .map_err(bpf_err(PinOp::Attach, link_path))?;
        sys::obj_pin(link.as_fd(), link_path).map_err(bpf_err(PinOp::Pin, link_path))?;
        info!(link = %link_path.display(), "attached");
        Ok(HookSwitch::Attached)
    }
}

/// The program the link pinned at `path` runs.
pub fn link_program(path: &Path) -> Result<u32, LoaderError> {
    let link = sys::obj_get(path).map_err(bpf_err(PinOp::Open, path))?;
    let (_, program) = sys::link_ids(link.as_fd()).map_err(bpf_err(PinOp::ReadIds, path))?;
    Ok(program)
}

/// The links pinned in `dir`, with the programs they run.
pub fn read_links(dir: &Path) -> Result<Vec<AttachedLink>, LoaderError> {
    let mut links = Vec::new();
    for hook in Hook::ALL {
        let path = dir.join(hook.link_pin());
        if !path.exists() {
            continue;
        }
        let link = sys::obj_get(&path).map_err(bpf_err(PinOp::Open, &path))?;
        let (link_id, program_id) =
            sys::link_ids(link.as_fd()).map_err(bpf_err(PinOp::ReadIds, &path))?;
        links.push(AttachedLink {
            name: hook.link_pin(),
            link_id,
            program_id,
        });
    }
    Ok(links)
}
