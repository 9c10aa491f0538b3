//! `kmesh`: the kmesh-rs kernel programs as shipped, `cgroup/connect4` and `cgroup/connect6`
//! (connect-time service load balancing; see `programs.rs`), `sk_lookup` `kmesh_authz`
//! (authorization of inbound connections; see `authz.rs`) and `sock_ops` `kmesh_sockops` (an event
//! per finished connection of an enrolled workload; see `events.rs`).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

/// Network namespaces the enrolled map holds.
#[cfg(target_arch = "bpf")]
const ENROLLED_CAPACITY: u32 = kmesh_common::MAX_ENROLLED_NETNS;

#[cfg(target_arch = "bpf")]
#[path = "programs.rs"]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
