//! Kubernetes object names as the API server validates them (RFC 1123), the one definition used
//! by the snapshot's validation of policy names and by the operator's reading of objects (which
//! refuses a name the API server would refuse, so such a name never reaches a snapshot).
//!
//! Each check takes bytes (the decoder checks names before knowing they are UTF-8) and returns
//! what is wrong, phrased to follow "the name" or "the namespace", or `None`.

/// Longest DNS label (a namespace name).
pub const MAX_LABEL_LEN: usize = 63;
/// Longest DNS subdomain (an object name).
pub const MAX_OBJECT_NAME_LEN: usize = 253;

/// What is wrong with `namespace` as a namespace name (a DNS label), if anything.
pub fn namespace_problem(namespace: &[u8]) -> Option<&'static str> {
    if namespace.is_empty() || namespace.len() > MAX_LABEL_LEN {
        return Some("has a namespace of 0 or more than 63 bytes");
    }
    if !is_dns_label(namespace) {
        return Some(
            "has a namespace that is not a DNS label (a-z, 0-9 and '-', starting and ending with a letter or digit)",
        );
    }
    None
}

/// What is wrong with `name` as an object name (a DNS subdomain), if anything.
pub fn object_name_problem(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() || name.len() > MAX_OBJECT_NAME_LEN {
        return Some("has an object name of 0 or more than 253 bytes");
    }
    if !name.split(|&b| b == b'.').all(is_dns_label) {
        return Some(
            "has an object name that is not a DNS subdomain (dot-separated labels of a-z, 0-9 and '-', each starting and ending with a letter or digit)",
        );
    }
    None
}

/// A non-empty label of `a-z`, `0-9` and `-` that starts and ends with a letter or digit.
fn is_dns_label(label: &[u8]) -> bool {
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    label.iter().all(|b| alnum(b) || *b == b'-')
        && label.first().is_some_and(alnum)
        && label.last().is_some_and(alnum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_as_the_api_server_takes_them() {
        for good in ["a", "reviews-v1", "a.b-c.d9", &"x".repeat(253)] {
            assert_eq!(object_name_problem(good.as_bytes()), None, "{good}");
        }
        for bad in [
            "",
            "A",
            "-a",
            "a-",
            "a..b",
            ".a",
            "a_b",
            "é",
            &"x".repeat(254),
        ] {
            assert!(object_name_problem(bad.as_bytes()).is_some(), "{bad}");
        }
        assert!(object_name_problem(b"a\xff").is_some());
        for good in ["default", "istio-system", &"n".repeat(63)] {
            assert_eq!(namespace_problem(good.as_bytes()), None, "{good}");
        }
        for bad in ["", "a.b", "Default", "-a", &"n".repeat(64)] {
            assert!(namespace_problem(bad.as_bytes()).is_some(), "{bad}");
        }
    }
}
