//! `clisonix-player`: stream a recording to ingest as one or many devices.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use clisonix_player::http::Format;
use clisonix_player::{load, play, PlayOptions, Transport};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TransportArg {
    Http,
    Ws,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    Binary,
    Json,
}

/// Stream an EDF/EDF+/BDF recording to Clisonix ingest, like a device.
///
/// Examples:
///   clisonix-player --key ck_... recording.edf                 # one device, real time, WebSocket
///   clisonix-player --key ck_... --devices 100 recording.edf   # 100 devices at once
///   clisonix-player --key ck_... --fast --transport http --format json recording.edf
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// The recording to play.
    recording: PathBuf,
    /// Ingest's base URL.
    #[arg(
        long,
        env = "CLISONIX_INGEST_URL",
        default_value = "http://127.0.0.1:8100"
    )]
    url: String,
    /// A device key with the ingest scope.
    #[arg(long, env = "CLISONIX_DEVICE_KEY", hide_env_values = true)]
    key: String,
    #[arg(long, value_enum, default_value = "ws")]
    transport: TransportArg,
    #[arg(long, value_enum, default_value = "binary")]
    format: FormatArg,
    /// Simulated devices, each its own session.
    #[arg(long, default_value_t = 1)]
    devices: usize,
    /// Multiple of real time (2 = twice as fast).
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// As fast as ingest takes it.
    #[arg(long)]
    fast: bool,
    /// Frame length in milliseconds.
    #[arg(long, default_value_t = 125)]
    frame_ms: u32,
    /// Frames per request or message, at most.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Keep the recording's own timestamps (default: the session starts now).
    #[arg(long)]
    original_time: bool,
    /// Device ids are <prefix>-<n>.
    #[arg(long, default_value = "player")]
    device_prefix: String,
    /// Audio presets each session asks for (comma-separated, e.g.
    /// audification,parameter_mapping; none: no audio; default: the audio stage's own)
    #[arg(long)]
    audio_presets: Option<String>,
    /// Leave sessions open at the end (default: the last frame ends its session)
    #[arg(long)]
    no_end: bool,
    /// Play only the first this many seconds of the recording.
    #[arg(long)]
    seconds: Option<f64>,
    /// Session ids for the first devices, one per line (the rest get random ones).
    #[arg(long, value_name = "FILE")]
    sessions: Option<PathBuf>,
    /// Write when each frame was acknowledged, a line per frame:
    /// device index, session id, seq, microseconds since the Unix epoch (tab-separated).
    #[arg(long, value_name = "FILE")]
    acks: Option<PathBuf>,
    /// Start the devices one after another, evenly over this many seconds (default 0:
    /// all at once, their frames in step), as devices switched on at different moments.
    #[arg(long, default_value_t = 0.0)]
    spread: f64,
    /// No progress line.
    #[arg(long, short)]
    quiet: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.devices == 0 || cli.batch == 0 || cli.speed.is_nan() || cli.speed < 0.0 {
        eprintln!("error: --devices and --batch must be at least 1, --speed at least 0");
        return ExitCode::from(2);
    }
    if !(cli.spread.is_finite() && (0.0..=86_400.0).contains(&cli.spread)) {
        eprintln!("error: --spread must be between 0 and 86400 seconds");
        return ExitCode::from(2);
    }
    if cli.seconds.is_some_and(|s| s.is_nan() || s <= 0.0) {
        eprintln!("error: --seconds must be above 0");
        return ExitCode::from(2);
    }
    let mut recording = match load(&cli.recording, cli.frame_ms) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(seconds) = cli.seconds {
        let frames = (seconds / recording.frame_seconds()).ceil().max(1.0) as usize;
        recording.frames.truncate(frames);
    }
    let session_ids = match &cli.sessions {
        None => Vec::new(),
        Some(path) => match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| clisonix_player::play::parse_session_ids(&text))
        {
            Ok(ids) => ids,
            Err(e) => {
                eprintln!("error: --sessions {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
    };
    let options = PlayOptions {
        url: cli.url,
        key: cli.key,
        transport: match cli.transport {
            TransportArg::Http => Transport::Http,
            TransportArg::Ws => Transport::WebSocket,
        },
        format: match cli.format {
            FormatArg::Binary => Format::Binary,
            FormatArg::Json => Format::Json,
        },
        devices: cli.devices,
        speed: if cli.fast { 0.0 } else { cli.speed },
        batch: cli.batch,
        window: 512,
        device_prefix: cli.device_prefix,
        original_time: cli.original_time,
        progress: !cli.quiet,
        audio_presets: cli.audio_presets,
        end_sessions: !cli.no_end,
        session_ids,
        spread: Duration::from_secs_f64(cli.spread),
    };
    eprintln!(
        "playing {} ({} channels at {} Hz, {} frames of {} samples, {:.0} s) as {} device(s) to {}",
        cli.recording.display(),
        recording.channels,
        recording.sample_rate_hz,
        recording.frames.len(),
        recording.samples_per_frame,
        recording.frames.len() as f64 * recording.frame_seconds(),
        options.devices,
        options.url
    );
    match play(&recording, &options).await {
        Ok(report) => {
            for (device, session) in &report.sessions {
                println!("{device}\t{session}");
            }
            if let Some(path) = &cli.acks {
                let written = std::fs::File::create(path)
                    .and_then(|f| report.write_acks(std::io::BufWriter::new(f)));
                if let Err(e) = written {
                    eprintln!("error: writing {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            eprintln!("{}", report.summary());
            if report.rejected.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
