//! This process's memory, for the operator's benchmarks (`compile` and `fanout`).

/// (VmRSS, VmHWM) of this process, in MB.
pub fn rss_mb() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb >> 10)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `MemAvailable` of `/proc/meminfo`, in bytes (0 if unreadable: nothing large is run).
pub fn mem_available_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb << 10)
}
