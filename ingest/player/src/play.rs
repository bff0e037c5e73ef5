//! Playing a recording as N devices at once, paced in real time (or a multiple of it)
//! or as fast as possible, with a progress line and a summary.

use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clisonix_ingest_protocol::{FrameStatus, Rejection};
use clisonix_schemas::{DeviceId, Frame, SessionId, Timestamp};

use crate::http::{Client, Format};
use crate::recording::{mark_session, Recording};
use crate::stream::{stream_frames, DeviceStats, Progress, StreamOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Http,
    WebSocket,
}

#[derive(Debug, Clone)]
pub struct PlayOptions {
    pub url: String,
    pub key: String,
    pub transport: Transport,
    pub format: Format,
    pub devices: usize,
    /// Multiple of real time; 0 plays as fast as possible.
    pub speed: f64,
    /// Frames per HTTP request or WebSocket message, at most.
    pub batch: usize,
    /// Frames sent ahead without an answer (WebSocket).
    pub window: usize,
    /// Device ids are `<prefix>-<n>`.
    pub device_prefix: String,
    /// Keep the recording's own timestamps instead of starting now.
    pub original_time: bool,
    /// Draw a progress line on stderr.
    pub progress: bool,
    /// Audio presets each session asks for (a `clisonix.audio=` marker on its first
    /// frame).
    pub audio_presets: Option<String>,
    /// Put the end marker on each session's last frame.
    pub end_sessions: bool,
    /// Session ids of the first devices (the rest get random ones).
    pub session_ids: Vec<SessionId>,
    /// Devices start one after another, evenly over this time, as devices switched
    /// on at different moments do (zero: all at once, their frames in step).
    pub spread: Duration,
}

impl Default for PlayOptions {
    fn default() -> PlayOptions {
        PlayOptions {
            url: "http://127.0.0.1:8100".into(),
            key: String::new(),
            transport: Transport::WebSocket,
            format: Format::Binary,
            devices: 1,
            speed: 1.0,
            batch: 64,
            window: 512,
            device_prefix: "player".into(),
            original_time: false,
            progress: false,
            audio_presets: None,
            end_sessions: true,
            session_ids: Vec::new(),
            spread: Duration::ZERO,
        }
    }
}

/// What a play did, all devices together.
#[derive(Debug, Clone, Default)]
pub struct PlayReport {
    pub sessions: Vec<(DeviceId, SessionId)>,
    pub frames: usize,
    pub acked: usize,
    pub duplicates: usize,
    pub resumed: usize,
    pub rejected: Vec<(u64, Rejection)>,
    pub resent: usize,
    pub reconnects: u32,
    pub bytes: usize,
    pub elapsed: Duration,
    /// Send-to-acknowledgement, microseconds, sorted.
    pub latencies_us: Vec<u64>,
    /// Per device (in the order of `sessions`): when each frame, by `seq`, was
    /// acknowledged.
    pub acked_at: Vec<Vec<(u64, std::time::SystemTime)>>,
}

/// Session ids, one per line (blank lines skipped), as `clisonix-player --sessions`
/// reads them.
pub fn parse_session_ids(text: &str) -> Result<Vec<SessionId>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| SessionId::parse(l.trim()).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect()
}

impl PlayReport {
    /// Writes when each frame was acknowledged, a line per frame: the device's index,
    /// its session, the frame's seq, microseconds since the Unix epoch (tab-separated).
    pub fn write_acks(&self, mut out: impl std::io::Write) -> std::io::Result<()> {
        for (device, acks) in self.acked_at.iter().enumerate() {
            let session = &self.sessions[device].1;
            for (seq, at) in acks {
                let us = at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros());
                writeln!(out, "{device}\t{session}\t{seq}\t{us}")?;
            }
        }
        out.flush()
    }

    pub fn percentile_ms(&self, p: f64) -> Option<f64> {
        if self.latencies_us.is_empty() {
            return None;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * p).round() as usize;
        Some(self.latencies_us[i] as f64 / 1000.0)
    }

    pub fn summary(&self) -> String {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let mut s = format!(
            "{} devices: {} frames, {} acknowledged, {} duplicates, {} already published on reconnect, {} rejected; {} resent, {} reconnects\n{:.1} s, {:.0} frames/s, {:.2} MB/s sent",
            self.sessions.len(),
            self.frames,
            self.acked,
            self.duplicates,
            self.resumed,
            self.rejected.len(),
            self.resent,
            self.reconnects,
            secs,
            (self.acked + self.duplicates + self.resumed) as f64 / secs,
            self.bytes as f64 / secs / 1e6,
        );
        if let (Some(p50), Some(p99)) = (self.percentile_ms(0.5), self.percentile_ms(0.99)) {
            s.push_str(&format!(
                "; acknowledgement latency p50 {p50:.1} ms, p99 {p99:.1} ms"
            ));
        }
        for (seq, r) in self.rejected.iter().take(5) {
            s.push_str(&format!(
                "\n  rejected seq {seq}: {}: {}",
                r.code, r.message
            ));
        }
        s
    }
}

/// Plays `recording` as `options.devices` devices.
pub async fn play(recording: &Recording, options: &PlayOptions) -> anyhow::Result<PlayReport> {
    let progress = Arc::new(Progress::default());
    let start = Instant::now();
    let total = recording.frames.len() * options.devices;
    let frame_s = recording.frame_seconds();
    let mut tasks = Vec::new();
    let mut sessions = Vec::new();
    for d in 0..options.devices {
        let device = DeviceId::parse(&format!("{}-{d}", options.device_prefix))
            .context("the device prefix makes an invalid device id")?;
        let session = options
            .session_ids
            .get(d)
            .copied()
            .unwrap_or_else(SessionId::random);
        sessions.push((device.clone(), session));
        // Device d starts d/devices of the spread after the first.
        let offset = options.spread.mul_f64(d as f64 / options.devices as f64);
        let begin = (!options.original_time).then(|| {
            Timestamp::from_micros(Timestamp::now().as_micros() + offset.as_micros() as i64)
        });
        let mut frames = recording.for_device(&device, session, begin);
        mark_session(
            &mut frames,
            options.audio_presets.as_deref(),
            options.end_sessions,
        );
        let options = options.clone();
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            let speed = options.speed;
            let due = move |i: usize| {
                if speed > 0.0 {
                    start + offset + Duration::from_secs_f64(i as f64 * frame_s / speed)
                } else {
                    start + offset
                }
            };
            match options.transport {
                Transport::WebSocket => {
                    let stream = StreamOptions {
                        window: options.window,
                        max_batch: options.batch,
                        format: options.format,
                        ..Default::default()
                    };
                    stream_frames(
                        &options.url,
                        &options.key,
                        &frames,
                        due,
                        &stream,
                        Some(progress),
                    )
                    .await
                }
                Transport::Http => post_frames(&options, &frames, due, &progress).await,
            }
        }));
    }
    let drawer = options.progress.then(|| {
        let progress = progress.clone();
        tokio::spawn(draw(progress, total, start))
    });
    let mut report = PlayReport {
        sessions,
        frames: total,
        acked: 0,
        duplicates: 0,
        resumed: 0,
        rejected: Vec::new(),
        resent: 0,
        reconnects: 0,
        bytes: 0,
        elapsed: Duration::ZERO,
        latencies_us: Vec::new(),
        acked_at: Vec::new(),
    };
    let mut first_error = None;
    for t in tasks {
        match t.await.context("a device task failed")? {
            Ok(s) => {
                report.acked += s.acked;
                report.duplicates += s.duplicates;
                report.resumed += s.resumed;
                report.rejected.extend(s.rejected);
                report.resent += s.resent;
                report.reconnects += s.reconnects;
                report.bytes += s.bytes;
                report.latencies_us.extend(s.latencies_us);
                report.acked_at.push(s.acked_at);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    report.elapsed = start.elapsed();
    if let Some(d) = drawer {
        d.abort();
        eprintln!();
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    report.latencies_us.sort_unstable();
    Ok(report)
}

/// One device over HTTP: requests one at a time, each with the frames that are due;
/// after a retryable refusal, waits and resends from the first refused frame.
async fn post_frames(
    options: &PlayOptions,
    frames: &[Frame],
    due: impl Fn(usize) -> Instant,
    progress: &Progress,
) -> anyhow::Result<DeviceStats> {
    let mut client = Client::new(&options.url, &options.key)?;
    let mut stats = DeviceStats {
        frames: frames.len(),
        ..Default::default()
    };
    let mut next = 0;
    let mut failures = 0u32;
    while next < frames.len() {
        let wait = due(next);
        tokio::time::sleep_until(wait.into()).await;
        let now = Instant::now();
        let mut end = next;
        while end < frames.len() && end - next < options.batch && due(end) <= now {
            end += 1;
        }
        let batch = &frames[next..end];
        let answer = match client.post_frames(batch, options.format).await {
            Ok(a) => {
                failures = 0;
                a
            }
            Err(e) => {
                failures += 1;
                if failures > 30 {
                    return Err(anyhow::Error::new(e).context("giving up after 30 attempts"));
                }
                stats.reconnects += 1;
                tokio::time::sleep(Duration::from_millis(200 * u64::from(failures.min(10)))).await;
                continue;
            }
        };
        let Some(result) = answer.batch() else {
            // A whole-request refusal (auth, body): not retryable by resending.
            anyhow::bail!(
                "ingest answered {}: {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            );
        };
        stats.bytes += batch.iter().map(|f| f.samples.len() * 4).sum::<usize>();
        let mut retry_from = None;
        for r in &result.results {
            match r.status {
                FrameStatus::Accepted => {
                    stats.acked += 1;
                    stats
                        .acked_at
                        .push((batch[r.index].seq, std::time::SystemTime::now()));
                    stats.latencies_us.push(now.elapsed().as_micros() as u64);
                    progress.acked.fetch_add(1, Ordering::Relaxed);
                }
                FrameStatus::Duplicate => {
                    stats.duplicates += 1;
                    progress.acked.fetch_add(1, Ordering::Relaxed);
                }
                FrameStatus::Rejected => {
                    let e = r.error.clone().expect("a refusal has a reason");
                    if e.retryable() {
                        retry_from = Some(retry_from.map_or(r.index, |x: usize| x.min(r.index)));
                    } else {
                        progress.rejected.fetch_add(1, Ordering::Relaxed);
                        stats.rejected.push((r.seq.unwrap_or_default(), e));
                    }
                }
            }
        }
        match retry_from {
            Some(i) => {
                stats.resent += batch.len() - i;
                let wait = answer.retry_after().unwrap_or(1);
                tokio::time::sleep(Duration::from_secs(wait)).await;
                next += i;
            }
            None => next = end,
        }
    }
    Ok(stats)
}

async fn draw(progress: Arc<Progress>, total: usize, start: Instant) {
    let tty = std::io::stderr().is_terminal();
    let every = if tty {
        Duration::from_millis(250)
    } else {
        Duration::from_secs(5)
    };
    loop {
        tokio::time::sleep(every).await;
        let acked = progress.acked.load(Ordering::Relaxed) as usize;
        let rejected = progress.rejected.load(Ordering::Relaxed);
        let frac = (acked as f64 / total.max(1) as f64).min(1.0);
        let width = 30;
        let filled = (frac * width as f64) as usize;
        let secs = start.elapsed().as_secs_f64();
        let rate = acked as f64 / secs.max(1e-9);
        let eta = if rate > 0.0 {
            (total - acked.min(total)) as f64 / rate
        } else {
            0.0
        };
        let line = format!(
            "[{}{}] {acked}/{total} frames {:>3.0}%  {rate:.0} frames/s  {rejected} rejected  {secs:.0} s, ~{eta:.0} s left",
            "#".repeat(filled),
            "-".repeat(width - filled),
            frac * 100.0
        );
        let mut err = std::io::stderr();
        if tty {
            let _ = write!(err, "\r{line}\x1b[K");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_read_a_line_each_and_a_bad_one_is_named_by_its_line() {
        let (a, b) = (SessionId::random(), SessionId::random());
        assert_eq!(
            parse_session_ids(&format!("{a}\n\n  {b}  \n")).unwrap(),
            vec![a, b]
        );
        let err = parse_session_ids(&format!("{a}\nnot-an-id\n")).unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
    }

    #[test]
    fn acks_are_written_a_line_per_frame_in_microseconds() {
        let session = SessionId::random();
        let at = std::time::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        let report = PlayReport {
            sessions: vec![(DeviceId::parse("d-0").unwrap(), session)],
            acked_at: vec![vec![(0, at), (1, at + Duration::from_micros(1))]],
            ..PlayReport::default()
        };
        let mut out = Vec::new();
        report.write_acks(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("0\t{session}\t0\t1700000000123456\n0\t{session}\t1\t1700000000123457\n")
        );
    }
}
