//! Builds the kernel programs (`bpf-programs/kmesh-ebpf`) for bpfel-unknown-none and places the
//! object in OUT_DIR, where `src/loader.rs` includes it.
//!
//! The eBPF target needs `-Z build-std=core`. We build it with the same stable toolchain as
//! everything else, unlocking that one unstable flag with RUSTC_BOOTSTRAP=1, so a machine needs
//! one toolchain (plus rust-src and bpf-linker, which scripts/setup.sh installs).
use std::env;

fn main() {
    let toolchain = env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".to_string());
    // The nested cargo inherits this process's environment.
    // SAFETY: the build script is single-threaded here.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    // aya-build reruns us when the eBPF crate changes; the shared records live elsewhere.
    println!("cargo:rerun-if-changed=../bpf-programs/kmesh-common");
    let package = aya_build::Package {
        name: "kmesh-ebpf",
        root_dir: "../bpf-programs/kmesh-ebpf",
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain)) {
        panic!(
            "building the eBPF programs failed: {e:#}\n\
             (needs rust-src and bpf-linker: run scripts/setup.sh)"
        );
    }
}
