//! The original destination of an accepted connection: the service and port the client dialled,
//! from the origin option (`kmesh_common::waypoint_origin`) the client node's `sock_ops` program
//! wrote on the connection's SYN.
//!
//! Read in user space, with no eBPF and no capability on the waypoint's side: the listener keeps
//! each SYN's headers (`TCP_SAVE_SYN`, [`enable_on_listener`]); after accept(), [`of_accepted`]
//! reads them once (`TCP_SAVED_SYN`; the kernel frees them on that read) and finds the option in
//! the TCP header. `Ok(None)` is a SYN without the option: a connection the kernel did not steer
//! (plain TCP to the waypoint's own address), or one whose option could not be written (the
//! client node counts those, `waypoint_origin_failed`).

use std::os::fd::AsFd;

pub use kmesh_common::waypoint_origin::Origin;
use kmesh_common::waypoint_origin::{self, OriginError as OptionsError};

use crate::sys::{self, SAVED_SYN_CAPACITY, SysError};

/// IP protocol number of TCP.
const IPPROTO_TCP: u8 = 6;
const IPV4_MIN_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const TCP_MIN_HEADER: usize = 20;
/// TCP header flags (byte 13).
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Why an accepted connection's origin could not be read.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error(
        "the accepted socket has no saved SYN: its listener lacks TCP_SAVE_SYN, or the SYN was read already"
    )]
    NoSavedSyn,
    #[error("saved SYN: {0}")]
    Syn(#[from] SynError),
}

/// What is wrong with a saved SYN's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SynError {
    #[error("IP version {0}, neither 4 nor 6")]
    IpVersion(u8),
    #[error("{what} needs {needed} bytes, the SYN has {len}")]
    Truncated {
        what: &'static str,
        needed: usize,
        len: usize,
    },
    #[error("IPv4 header length (IHL) {0}, below the minimum of 5 words")]
    Ihl(u8),
    #[error("IP protocol (or IPv6 next header) {0}, not TCP")]
    NotTcp(u8),
    #[error("IPv6 extension header {0} before the TCP header, not supported")]
    Ipv6ExtensionHeader(u8),
    #[error("TCP data offset {0}, below the minimum of 5 words")]
    DataOffset(u8),
    #[error("TCP flags {0:#04x}: not a SYN (SYN set, ACK clear)")]
    NotSyn(u8),
    #[error("TCP options: {0}")]
    Options(OptionsError),
}

/// Makes `listener` keep the SYN of every connection it accepts (`TCP_SAVE_SYN`), for
/// [`of_accepted`]. Call it before the first client connects: a connection whose SYN arrived
/// earlier has no saved SYN.
pub fn enable_on_listener(listener: &impl AsFd) -> Result<(), SysError> {
    sys::set_save_syn(listener.as_fd())
}

/// The origin the SYN of `stream` (accepted from a listener with [`enable_on_listener`]) carried;
/// `None` when it had no origin option. Reads the saved SYN, which the kernel then frees: a second
/// call on the same stream is [`OriginError::NoSavedSyn`]. Any accepted socket: std's, or
/// tokio's as its reactor holds it.
pub fn of_accepted(stream: &impl AsFd) -> Result<Option<Origin>, OriginError> {
    let mut buf = [0u8; SAVED_SYN_CAPACITY];
    let len = sys::saved_syn(stream.as_fd(), &mut buf)?;
    if len == 0 {
        return Err(OriginError::NoSavedSyn);
    }
    Ok(parse_saved_syn(&buf[..len])?)
}

/// The origin in a saved SYN: its IP header (IPv4, or IPv6 whose next header is TCP), then its
/// TCP header, whose options are searched with `kmesh_common::waypoint_origin::find`.
pub fn parse_saved_syn(syn: &[u8]) -> Result<Option<Origin>, SynError> {
    let tcp = tcp_header(syn)?;
    let need = |what, needed| {
        if tcp.len() < needed {
            Err(SynError::Truncated {
                what,
                needed,
                len: tcp.len(),
            })
        } else {
            Ok(())
        }
    };
    need("the TCP header", TCP_MIN_HEADER)?;
    let data_offset = tcp[12] >> 4;
    if usize::from(data_offset) * 4 < TCP_MIN_HEADER {
        return Err(SynError::DataOffset(data_offset));
    }
    let header_len = usize::from(data_offset) * 4;
    need("the TCP header with its options", header_len)?;
    let flags = tcp[13];
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Err(SynError::NotSyn(flags));
    }
    waypoint_origin::find(&tcp[TCP_MIN_HEADER..header_len]).map_err(SynError::Options)
}

/// The bytes of `syn` from its TCP header on, past the IP header.
fn tcp_header(syn: &[u8]) -> Result<&[u8], SynError> {
    let truncated = |what, needed| SynError::Truncated {
        what,
        needed,
        len: syn.len(),
    };
    let first = *syn.first().ok_or(truncated("the IP version", 1))?;
    let ip_len = match first >> 4 {
        4 => {
            if syn.len() < IPV4_MIN_HEADER {
                return Err(truncated("the IPv4 header", IPV4_MIN_HEADER));
            }
            let ihl = first & 0x0f;
            if usize::from(ihl) * 4 < IPV4_MIN_HEADER {
                return Err(SynError::Ihl(ihl));
            }
            if syn[9] != IPPROTO_TCP {
                return Err(SynError::NotTcp(syn[9]));
            }
            usize::from(ihl) * 4
        }
        6 => {
            if syn.len() < IPV6_HEADER {
                return Err(truncated("the IPv6 header", IPV6_HEADER));
            }
            match syn[6] {
                IPPROTO_TCP => IPV6_HEADER,
                // Hop-by-hop, routing, fragment, destination options, authentication, mobility,
                // HIP, shim6 and the experimental ones: extension headers.
                next @ (0 | 43 | 44 | 60 | 51 | 135 | 139 | 140 | 253 | 254) => {
                    return Err(SynError::Ipv6ExtensionHeader(next));
                }
                next => return Err(SynError::NotTcp(next)),
            }
        }
        version => return Err(SynError::IpVersion(version)),
    };
    syn.get(ip_len..)
        .ok_or(truncated("the IP header (by its length)", ip_len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmesh_common::waypoint_origin::encode;

    /// A TCP SYN header from port 40000 to 8080 with `options` (padded with NOPs to whole words)
    /// and the given flags.
    fn tcp(options: &[u8], flags: u8) -> Vec<u8> {
        let mut opts = options.to_vec();
        while !opts.len().is_multiple_of(4) {
            opts.push(1);
        }
        let mut h = vec![0u8; 20];
        h[0..2].copy_from_slice(&40000u16.to_be_bytes());
        h[2..4].copy_from_slice(&8080u16.to_be_bytes());
        h[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        h[12] = (((20 + opts.len()) / 4) as u8) << 4;
        h[13] = flags;
        h[14..16].copy_from_slice(&64240u16.to_be_bytes());
        h.extend_from_slice(&opts);
        h
    }

    /// Linux's SYN options (MSS, SACK permitted, timestamps, NOP, window scale) and `extra`.
    fn syn_options(extra: &[u8]) -> Vec<u8> {
        let mut o = vec![
            2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
        ];
        o.extend_from_slice(extra);
        o
    }

    fn ipv4(payload: &[u8], ihl: u8) -> Vec<u8> {
        let mut h = vec![0u8; usize::from(ihl.max(5)) * 4];
        h[0] = 0x40 | ihl;
        let total = (h.len() + payload.len()) as u16;
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[8] = 64;
        h[9] = IPPROTO_TCP;
        h[12..16].copy_from_slice(&[10, 244, 1, 10]);
        h[16..20].copy_from_slice(&[10, 244, 1, 100]);
        h.extend_from_slice(payload);
        h
    }

    fn ipv6(payload: &[u8], next_header: u8) -> Vec<u8> {
        let mut h = vec![0u8; 40];
        h[0] = 0x60;
        h[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        h[6] = next_header;
        h[7] = 64;
        h[8] = 0xfd;
        h[24] = 0xfd;
        h.extend_from_slice(payload);
        h
    }

    const A: Origin = Origin {
        service_id: 7001,
        port: 80,
    };

    #[test]
    fn ipv4_syn_with_and_without_the_option() {
        let with = ipv4(&tcp(&syn_options(&encode(7001, 80)), TCP_SYN), 5);
        assert_eq!(parse_saved_syn(&with), Ok(Some(A)));
        let without = ipv4(&tcp(&syn_options(&[]), TCP_SYN), 5);
        assert_eq!(parse_saved_syn(&without), Ok(None));
        // IP options (IHL 6) move the TCP header.
        let mut with_ip_options = ipv4(&tcp(&encode(7001, 80), TCP_SYN), 6);
        with_ip_options[20..24].copy_from_slice(&[1, 1, 1, 0]);
        assert_eq!(parse_saved_syn(&with_ip_options), Ok(Some(A)));
    }

    #[test]
    fn ipv6_syn_with_and_without_the_option() {
        let with = ipv6(&tcp(&syn_options(&encode(7001, 80)), TCP_SYN), IPPROTO_TCP);
        assert_eq!(parse_saved_syn(&with), Ok(Some(A)));
        let without = ipv6(&tcp(&syn_options(&[]), TCP_SYN), IPPROTO_TCP);
        assert_eq!(parse_saved_syn(&without), Ok(None));
    }

    #[test]
    fn ipv6_extension_headers_are_refused() {
        let hop_by_hop = ipv6(&tcp(&encode(1, 2), TCP_SYN), 0);
        assert_eq!(
            parse_saved_syn(&hop_by_hop),
            Err(SynError::Ipv6ExtensionHeader(0))
        );
        let udp = ipv6(&[0; 8], 17);
        assert_eq!(parse_saved_syn(&udp), Err(SynError::NotTcp(17)));
    }

    #[test]
    fn truncated_syns_are_errors_at_every_length() {
        for syn in [
            ipv4(&tcp(&syn_options(&encode(7001, 80)), TCP_SYN), 5),
            ipv6(&tcp(&syn_options(&encode(7001, 80)), TCP_SYN), IPPROTO_TCP),
        ] {
            assert_eq!(parse_saved_syn(&syn), Ok(Some(A)));
            for end in 0..syn.len() {
                let r = parse_saved_syn(&syn[..end]);
                assert!(
                    matches!(r, Err(SynError::Truncated { .. })),
                    "{end} bytes of {}: {r:?}",
                    syn.len()
                );
            }
        }
    }

    #[test]
    fn bad_headers_are_errors() {
        let good = ipv4(&tcp(&encode(1, 2), TCP_SYN), 5);
        let mut bad_ihl = good.clone();
        bad_ihl[0] = 0x44;
        assert_eq!(parse_saved_syn(&bad_ihl), Err(SynError::Ihl(4)));
        let mut ihl_past_end = good.clone();
        ihl_past_end[0] = 0x4f;
        assert!(matches!(
            parse_saved_syn(&ihl_past_end),
            Err(SynError::Truncated { .. })
        ));
        let mut udp = good.clone();
        udp[9] = 17;
        assert_eq!(parse_saved_syn(&udp), Err(SynError::NotTcp(17)));
        let mut version = good.clone();
        version[0] = 0x55;
        assert_eq!(parse_saved_syn(&version), Err(SynError::IpVersion(5)));
        let mut offset_low = good.clone();
        offset_low[20 + 12] = 4 << 4;
        assert_eq!(parse_saved_syn(&offset_low), Err(SynError::DataOffset(4)));
        let mut offset_past_end = good.clone();
        offset_past_end[20 + 12] = 15 << 4;
        assert!(matches!(
            parse_saved_syn(&offset_past_end),
            Err(SynError::Truncated { .. })
        ));
        let syn_ack = ipv4(&tcp(&encode(1, 2), TCP_SYN | TCP_ACK), 5);
        assert_eq!(parse_saved_syn(&syn_ack), Err(SynError::NotSyn(0x12)));
        let malformed = ipv4(&tcp(&[2, 4, 5, 0xb4, 8, 1], TCP_SYN), 5);
        assert_eq!(
            parse_saved_syn(&malformed),
            Err(SynError::Options(OptionsError::ShortLength {
                offset: 4,
                len: 1
            }))
        );
    }
}
