//! The raw syscalls of the waypoint, and nothing else: each takes a descriptor, makes one call and
//! returns its result or the call's error.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `TCP_SAVE_SYN` (`include/uapi/linux/tcp.h`): with 1, a listener keeps the IP and TCP headers
/// of the SYN of every connection it accepts, for `TCP_SAVED_SYN`.
const TCP_SAVE_SYN: libc::c_int = 27;
/// `TCP_SAVED_SYN`: the headers `TCP_SAVE_SYN` kept, read once (the kernel frees them).
const TCP_SAVED_SYN: libc::c_int = 28;

/// Room for a saved SYN: an IPv6 header (40 bytes) with extension headers, and a TCP header of at
/// most 60 bytes.
pub const SAVED_SYN_CAPACITY: usize = 512;

/// A failed syscall.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("setsockopt(IPPROTO_TCP, TCP_SAVE_SYN, 1) on the listener: {0}")]
    SaveSyn(#[source] io::Error),
    #[error("getsockopt(IPPROTO_TCP, TCP_SAVED_SYN) on the accepted socket: {0}")]
    SavedSyn(#[source] io::Error),
}

/// Sets `TCP_SAVE_SYN` to 1 on the listening socket `fd`: the kernel then keeps the SYN's IP and
/// TCP headers (not the link header) for each connection accepted from it. No capability needed.
pub fn set_save_syn(fd: BorrowedFd<'_>) -> Result<(), SysError> {
    let one: libc::c_int = 1;
    // SAFETY: a valid descriptor, and a pointer to a c_int with its length.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_SAVE_SYN,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(SysError::SaveSyn(io::Error::last_os_error()));
    }
    Ok(())
}

/// Reads `TCP_SAVED_SYN` of the accepted socket `fd` into `buf` and returns its length: 0 when the
/// socket has no saved SYN (its listener did not have `TCP_SAVE_SYN`, or it was read already).
pub fn saved_syn(
    fd: BorrowedFd<'_>,
    buf: &mut [u8; SAVED_SYN_CAPACITY],
) -> Result<usize, SysError> {
    let mut len = SAVED_SYN_CAPACITY as libc::socklen_t;
    // SAFETY: a valid descriptor, and a buffer of `len` bytes we own with its length.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_SAVED_SYN,
            buf.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        return Err(SysError::SavedSyn(io::Error::last_os_error()));
    }
    // The kernel never reports more than the buffer holds (it fails with EINVAL instead).
    Ok((len as usize).min(SAVED_SYN_CAPACITY))
}
