//! `kmesh-test-layout`: the same programs over another map layout, for the upgrade tests only. Its
//! enrolled map holds twice as many namespaces as the shipped object's: a change the kernel cannot
//! make to a pinned map (`max_entries` is fixed at creation), so an agent of this layout must build
//! new maps, fill them and switch the pinned links to its programs, as a real layout change needs.
//! Agents load it only with the hidden test flag `--test-layout-variant`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

/// Network namespaces the enrolled map holds: twice the shipped capacity.
#[cfg(target_arch = "bpf")]
const ENROLLED_CAPACITY: u32 = 2 * kmesh_common::MAX_ENROLLED_NETNS;

#[cfg(target_arch = "bpf")]
#[path = "programs.rs"]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
