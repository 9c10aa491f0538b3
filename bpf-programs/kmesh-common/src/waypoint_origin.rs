//! The origin option: a TCP header option on the SYN of a connection that connect4/6 steered to a
//! waypoint, naming the service the client dialled (docs/dual-engine.md, option B). The waypoint
//! receives the connection at its own address; the option tells it the original destination,
//! before any byte of payload (so also for server-first protocols), in the packet itself (so across
//! nodes), per connection (so under any concurrency).
//!
//! The single definition of the option: the `sock_ops` program (`kmesh-ebpf/src/events.rs`) writes
//! [`encode`]'s bytes, the waypoint (`kmesh-waypoint`, from the SYN the kernel saved for its
//! accepted socket) reads them back with [`find`].
//!
//! Wire format, 10 bytes, an experimental option with a 16-bit ExID (RFC 6994):
//!
//! ```text
//! 0      1      2..4          4..8                      8..10
//! kind   len    ExID          service id                dialled port
//! 253    10     0x4b4d "KM"   u32, big endian           u16, big endian
//! ```
//!
//! The client's identity is not carried: the waypoint takes it from the source address (a carried
//! identity could be forged by a pod that crafts its own SYNs).

/// TCP option kind 253: experimental (RFC 4727), shared by ExIDs (RFC 6994).
pub const KIND: u8 = 253;
/// The option's length, kind and length bytes included.
pub const LEN: u8 = 10;
/// The experiment identifier, "KM".
pub const EXID: u16 = 0x4b4d;

/// The search buffer `bpf_load_hdr_opt` takes to find this option: kind, a length byte of 4 (the
/// kernel then compares the ExID too; 0 is `EINVAL` for an option of kind 253) and the ExID.
/// Unused by kmesh-rs itself (the waypoint reads the saved SYN in user space), kept as the recipe
/// for a reader in the kernel.
pub const SEARCH_PREFIX: [u8; 4] = [KIND, 4, (EXID >> 8) as u8, EXID as u8];

/// The original destination of a steered connection: what the option carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    /// The dialled service's id (`ServiceValue::service_id`).
    pub service_id: u32,
    /// The service port the client dialled.
    pub port: u16,
}

/// The option's bytes for a connection to `service_id` dialled at `port`.
pub const fn encode(service_id: u32, port: u16) -> [u8; LEN as usize] {
    let id = service_id.to_be_bytes();
    let p = port.to_be_bytes();
    let exid = EXID.to_be_bytes();
    [
        KIND, LEN, exid[0], exid[1], id[0], id[1], id[2], id[3], p[0], p[1],
    ]
}

/// What is wrong with a TCP option list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OriginError {
    /// The option at `offset` has its kind byte but no length byte.
    MissingLength { offset: usize },
    /// The option at `offset` has a length below 2 (a length covers the kind and itself).
    ShortLength { offset: usize, len: u8 },
    /// The option at `offset` is `len` bytes long, past the end of the list.
    PastEnd { offset: usize, len: u8 },
    /// Our option (kind 253, ExID "KM") at `offset` has length `len`, not [`LEN`].
    BadOriginLength { offset: usize, len: u8 },
    /// Our option appears twice (the second at `offset`): the kernel never writes it twice.
    Duplicate { offset: usize },
}

impl core::fmt::Display for OriginError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            OriginError::MissingLength { offset } => {
                write!(f, "TCP option at byte {offset}: no length byte")
            }
            OriginError::ShortLength { offset, len } => {
                write!(f, "TCP option at byte {offset}: length {len}, below 2")
            }
            OriginError::PastEnd { offset, len } => write!(
                f,
                "TCP option at byte {offset}: length {len} runs past the end of the options"
            ),
            OriginError::BadOriginLength { offset, len } => write!(
                f,
                "origin option (kind {KIND}, ExID {EXID:#06x}) at byte {offset}: length {len}, \
                 must be {LEN}"
            ),
            OriginError::Duplicate { offset } => {
                write!(f, "origin option at byte {offset}: a second one")
            }
        }
    }
}

impl core::error::Error for OriginError {}

/// Finds the origin option in `options` (the bytes of a TCP header after its 20 fixed bytes, up to
/// its data offset). `Ok(None)`: the list is well formed and has no origin option (a connection
/// that was not steered). Options of kind 253 with another ExID are skipped.
///
/// Walks the list as the kernel does: EOL (0) ends it, NOP (1) is one byte, every other option has
/// a length byte of at least 2 that must fit in the list.
pub fn find(options: &[u8]) -> Result<Option<Origin>, OriginError> {
    const EOL: u8 = 0;
    const NOP: u8 = 1;
    let mut found = None;
    let mut offset = 0;
    while let Some(&kind) = options.get(offset) {
        match kind {
            EOL => break,
            NOP => {
                offset += 1;
                continue;
            }
            _ => {}
        }
        let len = *options
            .get(offset + 1)
            .ok_or(OriginError::MissingLength { offset })?;
        if len < 2 {
            return Err(OriginError::ShortLength { offset, len });
        }
        let option = options
            .get(offset..offset + usize::from(len))
            .ok_or(OriginError::PastEnd { offset, len })?;
        if kind == KIND && option.len() >= 4 && u16::from_be_bytes([option[2], option[3]]) == EXID {
            if len != LEN {
                return Err(OriginError::BadOriginLength { offset, len });
            }
            if found.is_some() {
                return Err(OriginError::Duplicate { offset });
            }
            found = Some(Origin {
                service_id: u32::from_be_bytes([option[4], option[5], option[6], option[7]]),
                port: u16::from_be_bytes([option[8], option[9]]),
            });
        }
        offset += usize::from(len);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MSS 1460, SACK permitted, timestamps and window scale as Linux writes them on a SYN (20
    /// bytes), then our option and two NOPs to pad to a multiple of 4.
    fn linux_syn_options(origin: &[u8]) -> ([u8; 40], usize) {
        let mut out = [0u8; 40];
        let fixed = [
            2, 4, 0x05, 0xb4, // MSS 1460
            4, 2, // SACK permitted
            8, 10, 0, 0, 0, 1, 0, 0, 0, 0, // timestamps
            1, // NOP
            3, 3, 7, // window scale 7
        ];
        out[..20].copy_from_slice(&fixed);
        out[20..20 + origin.len()].copy_from_slice(origin);
        let mut n = 20 + origin.len();
        while !n.is_multiple_of(4) {
            out[n] = 1;
            n += 1;
        }
        (out, n)
    }

    #[test]
    fn encodes_kind_length_exid_id_and_port_big_endian() {
        assert_eq!(
            encode(0x0102_0304, 0x0506),
            [253, 10, b'K', b'M', 1, 2, 3, 4, 5, 6]
        );
        assert_eq!(SEARCH_PREFIX, [253, 4, b'K', b'M']);
    }

    #[test]
    fn finds_the_option_among_the_options_linux_writes_on_a_syn() {
        let (opts, n) = linux_syn_options(&encode(7001, 80));
        assert_eq!(
            find(&opts[..n]),
            Ok(Some(Origin {
                service_id: 7001,
                port: 80
            }))
        );
        // First in the list, and alone.
        assert_eq!(
            find(&encode(u32::MAX, u16::MAX)),
            Ok(Some(Origin {
                service_id: u32::MAX,
                port: u16::MAX
            }))
        );
    }

    #[test]
    fn a_list_without_it_is_none() {
        let (opts, n) = linux_syn_options(&[]);
        assert_eq!(find(&opts[..n]), Ok(None));
        assert_eq!(find(&[]), Ok(None));
        assert_eq!(find(&[1, 1, 1]), Ok(None));
    }

    #[test]
    fn eol_ends_the_list_even_before_an_origin() {
        let mut opts = [0u8; 12];
        opts[2..].copy_from_slice(&encode(1, 2));
        opts[0] = 1; // NOP, then EOL: the rest is padding
        assert_eq!(find(&opts), Ok(None));
    }

    #[test]
    fn another_experiment_of_kind_253_is_skipped() {
        let other = [253, 6, 0x12, 0x34, 9, 9];
        let mut opts = [0u8; 16];
        opts[..6].copy_from_slice(&other);
        opts[6..].copy_from_slice(&encode(42, 443));
        assert_eq!(
            find(&opts),
            Ok(Some(Origin {
                service_id: 42,
                port: 443
            }))
        );
        assert_eq!(find(&other), Ok(None));
        // Kind 254 (the other experimental kind) with our ExID is not ours.
        let mut theirs = encode(1, 2);
        theirs[0] = 254;
        assert_eq!(find(&theirs), Ok(None));
    }

    #[test]
    fn malformed_lists_are_errors() {
        assert_eq!(find(&[2]), Err(OriginError::MissingLength { offset: 0 }));
        assert_eq!(
            find(&[1, 2, 1]),
            Err(OriginError::ShortLength { offset: 1, len: 1 })
        );
        assert_eq!(
            find(&[8, 0]),
            Err(OriginError::ShortLength { offset: 0, len: 0 })
        );
        assert_eq!(
            find(&[2, 4, 5]),
            Err(OriginError::PastEnd { offset: 0, len: 4 })
        );
        let origin = encode(1, 2);
        assert_eq!(
            find(&origin[..9]),
            Err(OriginError::PastEnd { offset: 0, len: 10 })
        );
        let mut short = [0u8; 8];
        short[..8].copy_from_slice(&origin[..8]);
        short[1] = 8;
        assert_eq!(
            find(&short),
            Err(OriginError::BadOriginLength { offset: 0, len: 8 })
        );
        let mut twice = [0u8; 20];
        twice[..10].copy_from_slice(&origin);
        twice[10..].copy_from_slice(&origin);
        assert_eq!(find(&twice), Err(OriginError::Duplicate { offset: 10 }));
    }

    #[test]
    fn every_short_list_is_walked_without_panic() {
        // Every list of up to 3 bytes over the interesting byte values, and every truncation of a
        // real list: an answer, never a panic or an index out of bounds.
        let values = [0u8, 1, 2, 3, 4, 10, 253, 255];
        for a in values {
            for b in values {
                for c in values {
                    let _ = find(&[a, b, c]);
                    let _ = find(&[a, b]);
                    let _ = find(&[a]);
                }
            }
        }
        let (opts, n) = linux_syn_options(&encode(7, 8));
        for end in 0..=n {
            let _ = find(&opts[..end]);
        }
    }
}
