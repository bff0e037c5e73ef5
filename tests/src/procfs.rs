//! CPU time of processes from /proc, for the benchmarks' CPU-per-unit-of-work figures.

use std::process::Command;

/// Clock ticks per second (`getconf CLK_TCK`; 100 if it cannot say).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Fields of /proc/<pid>/stat after the command name and the state (the first is the
/// parent's pid).
pub fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit(')').next()?;
    Some(
        rest.split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// User + system ticks of `pid`, and of its children it has waited for.
pub fn ticks(pid: u32) -> (u64, u64) {
    // After the state: ppid pgrp session tty tpgid flags minflt cminflt majflt
    // cmajflt utime stime cutime cstime.
    stat_fields(pid).map_or((0, 0), |f| (f[10] + f[11], f[12] + f[13]))
}
