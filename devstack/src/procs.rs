//! Small process helpers: pid files, liveness, graceful stop, ports, log tails.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Reads the pid on the first line of a pid file (Postgres writes more lines after
/// it); `None` if absent or unreadable.
pub fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` is alive and its command line contains `marker` (so a recycled pid
/// of an unrelated process is not mistaken for ours).
pub fn alive(pid: i32, marker: &str) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(marker) && !is_zombie(pid)
        }
        Err(_) => false,
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Sends SIGTERM, waits up to `grace` for the process to exit, then SIGKILLs it.
/// Returns whether it exited within the grace period.
pub fn terminate(pid: i32, marker: &str, grace: Duration) -> anyhow::Result<bool> {
    if !alive(pid, marker) {
        return Ok(true);
    }
    kill(Pid::from_raw(pid), Signal::SIGTERM).context("sending SIGTERM")?;
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !alive(pid, marker) {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    Ok(false)
}

/// Fails with a clear message when something else listens on `port`.
pub fn ensure_port_free(port: u16, what: &str, env_var: &str) -> anyhow::Result<()> {
    match TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => Ok(()),
        Err(e) => bail!(
            "port {port} on 127.0.0.1, needed for {what}, is taken by another program ({e}). \
             Stop that program, or pick another port: {env_var}=<port> ./dev up"
        ),
    }
}

/// Whether something accepts TCP connections on `port`.
pub fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

/// The last `lines` lines of a log file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs a command to completion, failing with its output when it fails.
pub fn run_checked(cmd: &mut std::process::Command, what: &str) -> anyhow::Result<String> {
    let output = cmd
        .output()
        .with_context(|| format!("{what}: could not start {:?}", cmd.get_program()))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_port_is_a_clear_error() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let err = ensure_port_free(port, "the Kafka broker", "CLISONIX_KAFKA_PORT").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("port {port}")) && text.contains("CLISONIX_KAFKA_PORT"),
            "{text}"
        );
        assert!(port_open(port));
        drop(listener);
        assert!(ensure_port_free(port, "x", "Y").is_ok());
    }

    #[test]
    fn liveness_checks_the_command_line() {
        let me = std::process::id() as i32;
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_name().unwrap().to_string_lossy().into_owned();
        assert!(alive(me, &name));
        assert!(!alive(me, "definitely-not-this-program"));
        let dir = std::env::temp_dir().join(format!("pid-{me}"));
        std::fs::write(&dir, format!("{me}\n/some/data/dir\n")).unwrap();
        assert_eq!(read_pid(&dir), Some(me));
        std::fs::remove_file(&dir).unwrap();
    }
}
