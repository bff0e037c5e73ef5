//! The main job as a user runs it: `./dev run --fast --exit-when-done` streams the
//! example recording through the whole pipeline, prints what it stored, saves both
//! presets' audio, and exits with status 0 (Ctrl-C, not a finished job, is what exits
//! with 130). Under `./dev test` it reuses the running stack and leaves it running.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_main_job_streams_the_recording_through_the_pipeline_and_exits_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut command = Command::new(env!("CARGO_BIN_EXE_clisonix-dev"));
    command
        .args(["run", "--fast", "--exit-when-done"])
        .arg("--gateway-listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--ingest-listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .current_dir(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = command.spawn().expect("clisonix-dev starts");
    let pid = child.id().to_string();
    // `wait_with_output` reads both pipes while it waits (a child blocked on a full
    // pipe would never exit); the channel bounds the wait.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || done_tx.send(child.wait_with_output()));
    let Ok(output) = done_rx.recv_timeout(Duration::from_secs(600)) else {
        let _ = Command::new("kill").args(["-9", &pid]).status();
        panic!("./dev run --fast --exit-when-done did not finish within 10 minutes");
    };
    let output = output.unwrap();
    let (status, out, err) = (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    assert!(status.success(), "exit {status}\n{out}\n{err}");

    let done = out
        .lines()
        .find(|l| l.starts_with("Done: session "))
        .unwrap_or_else(|| panic!("no Done line:\n{out}\n{err}"));
    assert!(
        done.contains("1904 frames (32 channels, 30464 samples per channel, 0 gaps), 119 feature windows and 2 audio presets stored"),
        "{done}"
    );
    let session = done["Done: session ".len()..].split(':').next().unwrap();
    // 238 s of 44.1 kHz 16-bit stereo with the 50 ms closing fade; the audification
    // plays 60 times faster.
    for (preset, seconds) in [("parameter_mapping", 238.0), ("audification", 238.0 / 60.0)] {
        let wav = root
            .join(".dev/run")
            .join(format!("{session}-{preset}.wav"));
        let bytes = std::fs::metadata(&wav)
            .unwrap_or_else(|e| panic!("{}: {e}", wav.display()))
            .len();
        let played = (bytes - 44) as f64 / (44_100.0 * 4.0);
        assert!(
            (played - seconds).abs() < 0.2,
            "{preset}: {played} s of audio"
        );
        std::fs::remove_file(&wav).unwrap();
    }
    assert!(
        out.contains(&format!("/v1/sessions/{session}/audio")),
        "the run says how to stream the audio:\n{out}"
    );
}
