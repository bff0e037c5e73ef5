//! Jona's synthesis speed as a multiple of real time on one core: the reference
//! recording (32 channels, 128 Hz, 238 s) through each preset, rendering only (as in a
//! replay) and rendering plus encoding the chunk records (as in normal running).
//!
//! Run: `cargo bench -p clisonix-jona --bench synthesis`

use std::path::PathBuf;
use std::time::Instant;

use clisonix_edf::{FrameSpec, Framer, Reader};
use clisonix_jona::{Jona, JonaConfig, Preset};
use clisonix_schemas::{DeviceId, Frame, SessionId, TenantId, Timestamp};
use clisonix_stage::{RecordMeta, Stage};

fn recording() -> Vec<Frame> {
    let dir = std::env::var_os("CLISONIX_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"));
    let file = std::fs::File::open(dir.join("eeglab_sample_32ch_128hz_238s.edf")).unwrap();
    let mut reader = Reader::new(std::io::BufReader::new(file)).unwrap();
    let header = reader.header().clone();
    let spec = FrameSpec {
        tenant_id: TenantId::random(),
        device_id: DeviceId::parse("bench").unwrap(),
        session_id: SessionId::random(),
        samples_per_frame: 16,
    };
    let mut framer = Framer::new(&header, spec).unwrap();
    let mut frames = Vec::new();
    while let Some(r) = reader.next_record().unwrap() {
        framer.push(&r, Timestamp::from_micros(0), &mut frames);
    }
    framer.finish(Timestamp::from_micros(0), &mut frames);
    frames
}

fn main() {
    let frames = recording();
    let seconds: f64 = frames
        .iter()
        .map(|f| f64::from(f.samples_per_channel) / f.sample_rate_hz)
        .sum();
    println!("jona synthesis, one core: {seconds:.0} s of 32-channel 128 Hz EEG, 44.1 kHz stereo");
    println!(
        "{:>20} {:>10} {:>12} {:>14}",
        "preset", "encode", "seconds", "x real time"
    );
    for preset in Preset::ALL {
        for encode in [false, true] {
            let mut best = f64::INFINITY;
            for _ in 0..3 {
                let mut jona = Jona::new(JonaConfig {
                    presets: vec![preset],
                    ..JonaConfig::default()
                });
                let mut out = Vec::new();
                let started = Instant::now();
                for (i, f) in frames.iter().enumerate() {
                    let meta = RecordMeta {
                        partition: 0,
                        offset: i as i64,
                        timestamp_ms: Some(0),
                        replay: !encode,
                    };
                    jona.process(f.clone(), meta, &mut out).unwrap();
                    out.clear();
                }
                best = best.min(started.elapsed().as_secs_f64());
            }
            println!(
                "{:>20} {:>10} {:>12.3} {:>14.0}",
                preset.name(),
                if encode { "yes" } else { "no" },
                best,
                seconds / best
            );
        }
    }
}
