//! Naming of everything the harness creates: `kmt-<name>-<pid>[-<pod>]`.
//!
//! The owning pid is the first dash-separated part after `kmt-` that is all digits;
//! test names may therefore not contain an all-digit part (`case-1` is refused,
//! `case1` is fine). Pod names may contain anything allowed, since they come after
//! the pid.

use std::collections::BTreeSet;
use std::io;
use std::path::Path;
use std::sync::Mutex;

/// Prefix of every netns and cgroup the harness creates.
pub const PREFIX: &str = "kmt-";

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Checks a test name (the `<name>` of `kmt-<name>-<pid>`).
pub(crate) fn validate_test_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name.len() > 40 {
        return Err(invalid(format!(
            "test name {name:?} must be 1..=40 characters"
        )));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(invalid(format!(
            "test name {name:?} may only contain ASCII letters, digits, '_' and '-'"
        )));
    }
    for part in name.split('-') {
        if part.is_empty() {
            return Err(invalid(format!(
                "test name {name:?} must not start or end with '-' or contain \"--\""
            )));
        }
        if part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid(format!(
                "test name {name:?} must not have an all-digit part ({part:?}): the first \
                 all-digit part of a kmt- name is the owning pid"
            )));
        }
    }
    Ok(())
}

/// Checks a pod name (used in a netns name, an interface name and as the reply line).
pub(crate) fn validate_pod_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name.len() > 32 {
        return Err(invalid(format!(
            "pod name {name:?} must be 1..=32 characters"
        )));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err(invalid(format!(
            "pod name {name:?} may only contain ASCII letters, digits, '_', '-' and '.'"
        )));
    }
    if name == "node" {
        return Err(invalid(
            "pod name \"node\" is reserved for the node namespace".into(),
        ));
    }
    Ok(())
}

/// The pid that owns a `kmt-` name, if the name has one.
pub fn owner_pid(name: &str) -> Option<i32> {
    name.strip_prefix(PREFIX)?
        .split('-')
        .find(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))?
        .parse()
        .ok()
}

/// Whether a process with this pid exists (in our pid namespace).
pub fn pid_alive(pid: i32) -> bool {
    pid > 0 && Path::new("/proc").join(pid.to_string()).exists()
}

/// Our pid, as used in names.
pub(crate) fn my_pid() -> u32 {
    std::process::id()
}

static IN_USE: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// A name reserved by this process until dropped: two live objects of this process
/// never share a name, and a name that exists on the system but is not reserved here
/// is a stale leftover (of an earlier process that had our pid) and may be removed.
#[derive(Debug)]
pub(crate) struct NameClaim(String);

impl NameClaim {
    pub(crate) fn new(key: String) -> io::Result<NameClaim> {
        let mut set = IN_USE.lock().unwrap_or_else(|e| e.into_inner());
        if !set.insert(key.clone()) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{key} is already in use by another live object of this test process; \
                     give each test a unique name"
                ),
            ));
        }
        Ok(NameClaim(key))
    }
}

impl Drop for NameClaim {
    fn drop(&mut self) {
        IN_USE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parsing() {
        assert_eq!(owner_pid("kmt-two-pods-1234-node"), Some(1234));
        assert_eq!(owner_pid("kmt-x-77-pod-1"), Some(77));
        assert_eq!(owner_pid("kmt-cg-5"), Some(5));
        assert_eq!(owner_pid("kmt-nopid"), None);
        assert_eq!(owner_pid("other-12"), None);
    }

    #[test]
    fn test_name_validation() {
        assert!(validate_test_name("two-pods").is_ok());
        assert!(validate_test_name("v6").is_ok());
        assert!(validate_test_name("case-1").is_err());
        assert!(validate_test_name("").is_err());
        assert!(validate_test_name("a--b").is_err());
        assert!(validate_test_name("a/b").is_err());
        assert!(validate_pod_name("pod-1").is_ok());
        assert!(validate_pod_name("node").is_err());
        assert!(validate_pod_name("a b").is_err());
    }
}
