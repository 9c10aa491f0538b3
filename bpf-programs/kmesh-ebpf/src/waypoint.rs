//! The origin option on the SYN of a connection connect4/6 steered to a waypoint
//! (`kmesh_common::waypoint_origin`, docs/dual-engine.md). Part of `programs.rs`; `kmesh_sockops`
//! (`events.rs`) calls these hooks.
//!
//! The socket's state (`KM_SOCK_STATE`) says whether connect4/6 steered it to a waypoint
//! (`sock_flags::WAYPOINT`) and which service it dialled. For such a socket, `events.rs`'s `start`
//! turns on `BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG` at `TCP_CONNECT_CB`, before the SYN is built; the
//! kernel then asks, for every packet it builds:
//! - [`reserve_origin`] at `HDR_OPT_LEN_CB`: for a SYN (not the ACKs; a retransmitted SYN again),
//!   room for the option's 10 bytes (`bpf_reserve_hdr_opt`);
//! - [`write_origin`] at `WRITE_HDR_OPT_CB`: the option's bytes in that room (`bpf_store_hdr_opt`).
//!
//! [`established`] turns the flag off at `ACTIVE_ESTABLISHED_CB` (before the handshake's last ACK
//! is built), so no later packet of the connection calls the program. A SYN that leaves without the
//! option (no room left, or no socket state) is counted in `counter::WAYPOINT_ORIGIN_FAILED`; the
//! connection still goes to the waypoint, which sees no origin.
//!
//! The waypoint reads the option in user space from the SYN its kernel saved (`TCP_SAVE_SYN`), so
//! nothing runs on the waypoint's side here.
use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
    helpers::generated::{bpf_reserve_hdr_opt, bpf_store_hdr_opt},
    programs::SockOpsContext,
};
use kmesh_common::{
    counter,
    events::sock_flags,
    waypoint_origin::{self, LEN},
};

use super::{
    count,
    events::{sock_of, sock_state},
};

/// TCP header flags (`TCP_SKB_CB(skb)->tcp_flags`).
const TCPHDR_SYN: u32 = 0x02;
const TCPHDR_ACK: u32 = 0x10;

/// The option's bytes if the packet being built is a SYN (SYN set, ACK clear) of a socket steered
/// to a waypoint.
#[inline(always)]
fn origin_of_syn(ctx: &SockOpsContext) -> Option<[u8; LEN as usize]> {
    // SAFETY: one whole-field read of the context (0 when the op has no packet).
    let tcp_flags = unsafe { read_volatile(&raw const (*ctx.ops).skb_tcp_flags) };
    if tcp_flags & (TCPHDR_SYN | TCPHDR_ACK) != TCPHDR_SYN {
        return None;
    }
    let state = sock_state(sock_of(ctx), false)?;
    if state.flags & sock_flags::WAYPOINT == 0 {
        return None;
    }
    Some(waypoint_origin::encode(
        state.service_id,
        state.service_port,
    ))
}

/// `HDR_OPT_LEN_CB`: room for the origin option in a waypoint-bound SYN.
#[inline(always)]
pub(super) fn reserve_origin(ctx: &SockOpsContext) {
    if origin_of_syn(ctx).is_none() {
        return;
    }
    // SAFETY: the context is the program's; the helper only changes the packet's option room.
    if unsafe { bpf_reserve_hdr_opt(ctx.ops, u32::from(LEN), 0) } != 0 {
        // No write callback follows without room: this is the SYN's only count.
        count(counter::WAYPOINT_ORIGIN_FAILED);
    }
}

/// `WRITE_HDR_OPT_CB`: the origin option in the room [`reserve_origin`] made.
#[inline(always)]
pub(super) fn write_origin(ctx: &SockOpsContext) {
    let Some(option) = origin_of_syn(ctx) else {
        return;
    };
    // SAFETY: `option` is LEN bytes on our stack; the helper copies them into the packet.
    let written = unsafe { bpf_store_hdr_opt(ctx.ops, option.as_ptr().cast(), u32::from(LEN), 0) };
    if written != 0 {
        count(counter::WAYPOINT_ORIGIN_FAILED);
    }
}

/// `ACTIVE_ESTABLISHED_CB`: the SYN is acknowledged; stop the header option callbacks of a
/// waypoint-bound socket (keeping the state callbacks `start` turned on).
#[inline(always)]
pub(super) fn established(ctx: &SockOpsContext) {
    let Some(state) = sock_state(sock_of(ctx), false) else {
        return;
    };
    if state.flags & sock_flags::WAYPOINT == 0 {
        return;
    }
    // SAFETY: one whole-field read of the context.
    let flags = unsafe { read_volatile(&raw const (*ctx.ops).bpf_sock_ops_cb_flags) };
    if flags & BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG != 0 {
        // Failure leaves the callbacks on: later packets are not SYNs, so they get no option.
        let _ = ctx.set_cb_flags((flags & !BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
    }
}
