//! Loading, attaching and pinning the kernel programs, and adopting them after a restart.
//!
//! Everything lives under one bpffs directory (`--bpffs-dir`): one pin per map (named as in
//! `kmesh_common::map_names`), one per program and one per cgroup link. Pinned links keep the programs attached
//! while no agent runs, so traffic keeps flowing through restarts and upgrades; a starting agent
//! that finds every pin adopts them and attaches nothing.
use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{MapData, MapError},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use kmesh_common::map_names;
use tracing::info;

static KMESH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kmesh"));

/// A program we attach, and the names of its pins.
struct ProgramPins {
    program: &'static str,
    program_pin: &'static str,
    link_pin: &'static str,
}

const PROGRAMS: [ProgramPins; 2] = [
    ProgramPins {
        program: "kmesh_connect4",
        program_pin: "prog_connect4",
        link_pin: "link_connect4",
    },
    ProgramPins {
        program: "kmesh_connect6",
        program_pin: "prog_connect6",
        link_pin: "link_connect6",
    },
];

/// Every map the programs declare; each is pinned under its own name.
pub const MAPS: [&str; 8] = [
    map_names::ACTIVE,
    map_names::GENERATION,
    map_names::SERVICES,
    map_names::ROUTES,
    map_names::BACKEND_SETS,
    map_names::ENDPOINTS,
    map_names::ENROLLED,
    map_names::COUNTERS,
];

const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

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
    #[error("pinned link {path}: {source}")]
    Link { path: PathBuf, source: LinkError },
    #[error("pinned map {path}: {source}")]
    Map { path: PathBuf, source: MapError },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LoaderError + '_ {
    move |source| LoaderError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A cgroup link as the kernel reports it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AttachedLink {
    pub name: &'static str,
    pub link_id: u32,
    pub program_id: u32,
}

/// The installed programs: the pinned maps (opened) and the links that keep the programs attached.
pub struct Installation {
    pub dir: PathBuf,
    /// True when every pin already existed and nothing was loaded or attached.
    pub adopted: bool,
    pub links: Vec<AttachedLink>,
}

impl Installation {
    /// Opens a pinned map of this installation.
    pub fn open_map(&self, name: &str) -> Result<MapData, LoaderError> {
        let path = self.dir.join(name);
        MapData::from_pin(&path).map_err(|source| LoaderError::Map { path, source })
    }
}

/// Adopts the programs pinned in `dir` if they are all there; otherwise loads the object (reusing
/// any maps already pinned, so their contents survive), attaches what is not attached yet to
/// `cgroup`, and pins every link.
pub fn install_or_adopt(dir: &Path, cgroup: &Path) -> Result<Installation, LoaderError> {
    ensure_bpffs_dir(dir)?;
    let all_pinned = PROGRAMS
        .iter()
        .all(|p| dir.join(p.link_pin).exists() && dir.join(p.program_pin).exists())
        && MAPS.iter().all(|map| dir.join(map).exists());
    if !all_pinned {
        install(dir, cgroup)?;
    }
    let links = PROGRAMS
        .iter()
        .map(|p| {
            let name = p.link_pin;
            let path = dir.join(name);
            let link = PinnedLink::from_pin(&path).map_err(|source| LoaderError::Link {
                path: path.clone(),
                source,
            })?;
            let info = FdLink::from(link)
                .info()
                .map_err(|source| LoaderError::Link { path, source })?;
            Ok(AttachedLink {
                name,
                link_id: info.id(),
                program_id: info.program_id(),
            })
        })
        .collect::<Result<Vec<_>, LoaderError>>()?;
    Ok(Installation {
        dir: dir.to_path_buf(),
        adopted: all_pinned,
        links,
    })
}

fn install(dir: &Path, cgroup: &Path) -> Result<(), LoaderError> {
    // Before anything is loaded or pinned: a wrong --cgroup must leave nothing behind.
    let cgroup_fd = File::open(cgroup).map_err(io_err(cgroup))?;
    let mut loader = EbpfLoader::new();
    let map_paths: Vec<(&str, PathBuf)> = MAPS.iter().map(|m| (*m, dir.join(m))).collect();
    for (name, path) in &map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(KMESH_OBJECT).map_err(Box::new)?;
    for ProgramPins {
        program,
        program_pin,
        link_pin,
    } in PROGRAMS
    {
        let link_path = dir.join(link_pin);
        let program_path = dir.join(program_pin);
        let prog_err = |e: ProgramError| LoaderError::Program {
            name: program,
            source: Box::new(e),
        };
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(program)
            .ok_or(LoaderError::MissingProgram(program))?
            .try_into()
            .map_err(prog_err)?;
        prog.load().map_err(prog_err)?;
        // A program pin lets tools (bpftool prog show pinned ...) find the program by name; a stale
        // one from an earlier, partial install is replaced.
        if program_path.exists() {
            fs::remove_file(&program_path).map_err(io_err(&program_path))?;
        }
        prog.pin(&program_path).map_err(|source| LoaderError::Pin {
            path: program_path.clone(),
            source,
        })?;
        if link_path.exists() {
            continue; // attached already: keep that link (and the traffic it carries)
        }
        // A bpf_link attachment always coexists with other programs on the cgroup (a CNI's, say);
        // the kernel refuses any flag on link creation, so the mode must be the flag-less one.
        let id = prog
            .attach(&cgroup_fd, CgroupAttachMode::Single)
            .map_err(prog_err)?;
        let link: FdLink =
            prog.take_link(id)
                .map_err(prog_err)?
                .try_into()
                .map_err(|e: LinkError| LoaderError::Link {
                    path: link_path.clone(),
                    source: e,
                })?;
        link.pin(&link_path).map_err(|source| LoaderError::Pin {
            path: link_path.clone(),
            source,
        })?;
        info!(program, cgroup = %cgroup.display(), pin = %link_path.display(), "attached");
    }
    Ok(())
}

/// Detaches the programs and removes every pin in `dir`, then `dir` itself.
/// Removing a link pin detaches the program once no process holds the link open.
pub fn uninstall(dir: &Path) -> Result<(), LoaderError> {
    let pins = PROGRAMS.iter().flat_map(|p| [p.link_pin, p.program_pin]);
    for name in pins.chain(MAPS) {
        let path = dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => info!(pin = %path.display(), "removed"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(dir)(e)),
    }
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
