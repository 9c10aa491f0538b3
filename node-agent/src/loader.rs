//! Loading the kernel programs, pinning them, and adopting or upgrading what an earlier agent left.
//!
//! The pins are laid out as `layout.rs` says: the three cgroup links at the top of `--bpffs-dir`,
//! maps and programs in a directory per layout of the eBPF object. [`install_or_adopt`] inspects
//! what is pinned, asks `layout::plan` what to do, and does it: adopt the pins as they are (the
//! link ids and programs stay, nothing is loaded), or load this agent's object with maps of its
//! layout and point the links at its programs (`link_switch.rs`) — at once when nothing is
//! attached, after the first snapshot is live in the new maps when another layout's programs
//! steer. Pinned links keep the programs attached while no agent runs, so traffic keeps flowing
//! through restarts and upgrades.
use std::{
    fs::{self, File},
    io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{MapData, MapError},
    programs::{CgroupSockAddr, ProgramError, SkLookup, SockOps},
};
use kmesh_common::{events::DEFAULT_EVENTS_RING_BYTES, map_names};
use tracing::{info, warn};

pub use crate::link_switch::{AttachedLink, LinkSwitch};
use crate::{
    layout::{
        self, AUTHZ_PROGRAM, AUTHZ_PROGRAM_PIN, Found, Hook, LayoutId, MAPS, Plan, SwitchWhen,
    },
    link_switch, netns_links, sys,
};

/// The shipped eBPF object.
static KMESH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kmesh"));
/// The test variant: the same programs over another map layout (see `kmesh-ebpf/src/test_layout.rs`).
static TEST_LAYOUT_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kmesh-test-layout"));

/// Which eBPF object an agent loads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BpfObject {
    /// The programs as shipped.
    #[default]
    Shipped,
    /// The upgrade tests' variant, whose enrolled map is twice as large: another map layout, so
    /// that a test can upgrade across a layout change with one agent binary (hidden flag
    /// `--test-layout-variant`).
    TestLayout,
}

impl BpfObject {
    pub fn bytes(self) -> &'static [u8] {
        match self {
            BpfObject::Shipped => KMESH_OBJECT,
            BpfObject::TestLayout => TEST_LAYOUT_OBJECT,
        }
    }

    pub fn layout(self) -> LayoutId {
        LayoutId::of(self.bytes())
    }
}

const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

/// Settings of a load that are not part of the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Size of the connection events ring buffer (`KM_EVENTS`) in bytes: a power of two and a
    /// multiple of the page size. Takes effect when the layout's maps are created; a ring already
    /// pinned keeps its size (it is a map of the layout, reused like the others).
    pub events_ring_bytes: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            events_ring_bytes: DEFAULT_EVENTS_RING_BYTES,
        }
    }
}

impl LoadOptions {
    /// Checks what the kernel would refuse with a bare EINVAL.
    pub fn check(&self) -> Result<(), LoaderError> {
        let bytes = self.events_ring_bytes;
        // SAFETY: sysconf has no preconditions.
        let page = u32::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        if !bytes.is_power_of_two() || bytes < page {
            return Err(LoaderError::EventsRingSize { bytes, page });
        }
        Ok(())
    }
}

/// A bpf(2) object operation of the loader, as named in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinOp {
    Open,
    Pin,
    ReadIds,
    Attach,
    Replace,
    FindRunning,
    Detach,
}

impl std::fmt::Display for PinOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PinOp::Open => "opening the pin",
            PinOp::Pin => "pinning",
            PinOp::ReadIds => "reading the ids of",
            PinOp::Attach => "attaching (BPF_LINK_CREATE)",
            PinOp::Replace => "replacing the program of the link (BPF_LINK_UPDATE)",
            PinOp::FindRunning => "opening the program the link runs",
            PinOp::Detach => "detaching the link (BPF_LINK_DETACH)",
        })
    }
}

#[derive(thiserror::Error, Debug)]
pub enum LoaderError {
    #[error(
        "{0} is not on a bpf filesystem; mount one first (mount -t bpf bpf /sys/fs/bpf) or pass another --bpffs-dir"
    )]
    NotBpffs(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] Box<aya::EbpfError>),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<ProgramError>,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("{op} {path}: {source}")]
    Bpf {
        op: PinOp,
        path: PathBuf,
        source: io::Error,
    },
    #[error("pinned map {path}: {source}")]
    Map { path: PathBuf, source: MapError },
    #[error(
        "events ring buffer size {bytes}: must be a power of two of at least the page size ({page} bytes)"
    )]
    EventsRingSize { bytes: u32, page: u32 },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LoaderError + '_ {
    move |source| LoaderError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn bpf_err(op: PinOp, path: &Path) -> impl FnOnce(io::Error) -> LoaderError + '_ {
    move |source| LoaderError::Bpf {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The installed programs: where their maps are pinned, and the links that keep them attached.
pub struct Installation {
    /// `--bpffs-dir`.
    pub dir: PathBuf,
    /// This agent's layout, and its directory below `dir`.
    pub layout: LayoutId,
    pub layout_dir: PathBuf,
    /// True when every pin already existed and nothing was loaded or attached.
    pub adopted: bool,
    /// The links as found or made at start. While `switch` is pending they run another layout's
    /// programs.
    pub links: Vec<AttachedLink>,
    /// Links still to be pointed at this layout's programs, once its maps hold a live snapshot
    /// and the enrolled namespaces: an upgrade across layouts in progress.
    pub switch: Option<LinkSwitch>,
}

impl Installation {
    /// The authorization links, attached to this layout's program.
    pub fn netns_links(&self) -> netns_links::NetnsLinks {
        netns_links::NetnsLinks::new(&self.dir, &self.layout_dir)
    }

    /// Opens a pinned map of this layout.
    pub fn open_map(&self, name: &str) -> Result<MapData, LoaderError> {
        let path = self.layout_dir.join(name);
        MapData::from_pin(&path).map_err(|source| LoaderError::Map { path, source })
    }
}

/// Adopts, installs or starts an upgrade, as the pins in `dir` call for (see `layout.rs`), with
/// the default [`LoadOptions`].
pub fn install_or_adopt(
    dir: &Path,
    cgroup: &Path,
    object: BpfObject,
) -> Result<Installation, LoaderError> {
    install_or_adopt_with(dir, cgroup, object, LoadOptions::default())
}

/// [`install_or_adopt`] with `options` for what it may load.
pub fn install_or_adopt_with(
    dir: &Path,
    cgroup: &Path,
    object: BpfObject,
    options: LoadOptions,
) -> Result<Installation, LoaderError> {
    options.check()?;
    ensure_bpffs_dir(dir)?;
    let layout = object.layout();
    let layout_dir = dir.join(layout.dir_name());
    let found = inspect(dir, &layout)?;
    let plan = layout::plan(&found);
    info!(layout = %layout, ?found, ?plan, "pins inspected");
    let mut installation = Installation {
        dir: dir.to_path_buf(),
        layout,
        layout_dir,
        adopted: false,
        links: Vec::new(),
        switch: None,
    };
    match plan {
        Plan::Adopt { missing, retire } => {
            installation.adopted = missing.is_empty();
            let switch = LinkSwitch::new(&installation, cgroup, retire, !missing.is_empty())?;
            switch.run()?;
        }
        Plan::Load { when, retire } => {
            // Before anything is loaded or pinned: a wrong --cgroup must leave nothing behind.
            let switch = LinkSwitch::new(&installation, cgroup, retire, true)?;
            load(&installation.layout_dir, object, options)?;
            match when {
                SwitchWhen::Now => {
                    switch.run()?;
                }
                SwitchWhen::AfterFirstSnapshot => {
                    info!(
                        layout = %installation.layout,
                        "links run another layout's programs: they switch once this layout's maps hold a live snapshot"
                    );
                    installation.switch = Some(switch);
                }
            }
        }
    }
    installation.links = link_switch::read_links(dir)?;
    Ok(installation)
}

/// What is pinned in `dir`, as the plan needs it.
fn inspect(dir: &Path, own: &LayoutId) -> Result<Found, LoaderError> {
    let names: Vec<String> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let own_dir = dir.join(own.dir_name());
    let mut found = Found {
        others: layout::other_layouts(dir, &names, own),
        own_complete: MAPS.iter().all(|m| own_dir.join(m).exists())
            && own_dir.join(AUTHZ_PROGRAM_PIN).exists(),
        ..Found::default()
    };
    for hook in Hook::ALL {
        let i = hook.position();
        let link = dir.join(hook.link_pin());
        if link.exists() {
            found.links[i] = Some(link_switch::link_program(&link)?);
        }
        let program = own_dir.join(hook.program_pin());
        if program.exists() {
            let fd = sys::obj_get(&program).map_err(bpf_err(PinOp::Open, &program))?;
            let id = sys::prog_id(fd.as_fd()).map_err(bpf_err(PinOp::ReadIds, &program))?;
            found.own_programs[i] = Some(id);
        } else {
            found.own_complete = false;
        }
    }
    Ok(found)
}

/// Loads `object` with every map pinned in `layout_dir` (reusing the maps already pinned there, so
/// their contents survive) and pins its programs there. Attaches nothing.
fn load(layout_dir: &Path, object: BpfObject, options: LoadOptions) -> Result<(), LoaderError> {
    fs::create_dir_all(layout_dir).map_err(io_err(layout_dir))?;
    let mut loader = EbpfLoader::new();
    let map_paths: Vec<(&str, PathBuf)> = MAPS.iter().map(|m| (*m, layout_dir.join(m))).collect();
    for (name, path) in &map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader.map_max_entries(map_names::EVENTS, options.events_ring_bytes);
    let mut ebpf = loader.load(object.bytes()).map_err(Box::new)?;
    for hook in Hook::ALL {
        load_cgroup_program(&mut ebpf, hook, layout_dir)?;
    }
    load_authz(&mut ebpf, layout_dir)?;
    info!(dir = %layout_dir.display(), "programs loaded and pinned");
    Ok(())
}

/// Loads the program of a cgroup hook and pins it in `layout_dir` (the link switch opens it there).
fn load_cgroup_program(
    ebpf: &mut aya::Ebpf,
    hook: Hook,
    layout_dir: &Path,
) -> Result<(), LoaderError> {
    let name = hook.program();
    let prog_err = |e: ProgramError| LoaderError::Program {
        name,
        source: Box::new(e),
    };
    let program = ebpf
        .program_mut(name)
        .ok_or(LoaderError::MissingProgram(name))?;
    // A stale pin (of an earlier, partial install) is replaced.
    let path = layout_dir.join(hook.program_pin());
    if path.exists() {
        fs::remove_file(&path).map_err(io_err(&path))?;
    }
    let pinned = match hook {
        Hook::Connect4 | Hook::Connect6 => {
            let prog: &mut CgroupSockAddr = program.try_into().map_err(prog_err)?;
            prog.load().map_err(prog_err)?;
            prog.pin(&path)
        }
        Hook::SockOps => {
            let prog: &mut SockOps = program.try_into().map_err(prog_err)?;
            prog.load().map_err(prog_err)?;
            prog.pin(&path)
        }
    };
    pinned.map_err(|source| LoaderError::Pin { path, source })
}

/// Loads `kmesh_authz` and pins it in `layout_dir` (the per-namespace links attach it from there).
fn load_authz(ebpf: &mut aya::Ebpf, layout_dir: &Path) -> Result<(), LoaderError> {
    let prog_err = |e: ProgramError| LoaderError::Program {
        name: AUTHZ_PROGRAM,
        source: Box::new(e),
    };
    let prog: &mut SkLookup = ebpf
        .program_mut(AUTHZ_PROGRAM)
        .ok_or(LoaderError::MissingProgram(AUTHZ_PROGRAM))?
        .try_into()
        .map_err(prog_err)?;
    prog.load().map_err(prog_err)?;
    let path = layout_dir.join(AUTHZ_PROGRAM_PIN);
    if path.exists() {
        fs::remove_file(&path).map_err(io_err(&path))?;
    }
    prog.pin(&path)
        .map_err(|source| LoaderError::Pin { path, source })
}

/// Detaches the programs (`BPF_LINK_DETACH`, effective even if another process holds a link open)
/// and removes every pin in `dir`, of every layout, then `dir` itself.
pub fn uninstall(dir: &Path) -> Result<(), LoaderError> {
    for hook in Hook::ALL {
        let path = dir.join(hook.link_pin());
        if !path.exists() {
            continue;
        }
        // Removing the pin below detaches too, once nobody holds the link: a failure here is
        // worth a warning, not a stop.
        match sys::obj_get(&path).and_then(|link| sys::link_detach(link.as_fd())) {
            Ok(()) => info!(link = %path.display(), "detached"),
            Err(e) => {
                warn!(link = %path.display(), error = %e, "detaching the link failed; removing its pin")
            }
        }
    }
    netns_links::detach_all(dir);
    let names: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    for path in layout::every_pin(dir, &names) {
        remove_pins(&path)?;
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(dir)(e)),
    }
}

/// Removes the pin `path`, or the layout directory `path` with the pins in it.
pub(crate) fn remove_pins(path: &Path) -> Result<(), LoaderError> {
    let removed = if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match removed {
        Ok(()) => {
            info!(pin = %path.display(), "removed");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Opens the cgroup directory the links attach to.
pub(crate) fn open_cgroup(cgroup: &Path) -> Result<File, LoaderError> {
    File::open(cgroup).map_err(io_err(cgroup))
}

/// Creates `dir` and checks that it is on bpffs (pins anywhere else fail with a confusing error).
fn ensure_bpffs_dir(dir: &Path) -> Result<(), LoaderError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let c_path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|e| io_err(dir)(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(io_err(dir)(io::Error::last_os_error()));
    }
    // f_type is a signed word with glibc and an unsigned one with musl (the static image build).
    if u64::try_from(st.f_type) != Ok(BPF_FS_MAGIC) {
        return Err(LoaderError::NotBpffs(dir.to_path_buf()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_events_ring_must_be_a_power_of_two_of_at_least_a_page() {
        let ring = |events_ring_bytes| LoadOptions { events_ring_bytes }.check();
        assert!(LoadOptions::default().check().is_ok());
        assert!(ring(4096).is_ok());
        assert!(ring(1 << 30).is_ok());
        for bad in [0, 1, 2048, 5000, 4096 + 4096 * 2] {
            let err = ring(bad).unwrap_err().to_string();
            assert!(
                err.contains(&format!("size {bad}: must be a power of two")),
                "{err}"
            );
        }
    }
}
