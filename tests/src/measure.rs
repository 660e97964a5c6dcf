//! What the tests read off a running process: its memory, threads and CPU time.

use std::time::{Duration, Instant};

/// A number from /proc/PID/status (`Threads:`, `VmRSS:` and `VmHWM:` in KiB); 0 once the
/// process is gone.
pub fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) the process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command; in
    // clock ticks of 1/100 s on Linux.
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 / 100.0
}

/// The share of one core the process used over `window` (CPU time / wall time). The window is
/// the measurement itself, not a wait for an event.
pub fn cpu_share(pid: u32, window: Duration) -> f64 {
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    std::thread::sleep(window);
    (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64()
}
