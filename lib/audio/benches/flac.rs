//! FLAC on Jona's real output: the reference recording (32 channels, 128 Hz, 238 s)
//! rendered by each preset into 1 s chunks of 44.1 kHz stereo, each chunk encoded and
//! decoded as the sink and the gateway do. Prints the compression ratio and the CPU per
//! second of audio (a multiple of real time on one core), best of three.
//!
//! Run: `cargo bench -p clisonix-audio --bench flac`

use std::path::PathBuf;
use std::time::Instant;

use clisonix_audio::flac;
use clisonix_jona::{Jona, JonaConfig, Preset};
use clisonix_player::recording::load;
use clisonix_schemas::{AudioChunk, DeviceId, Frame, SessionId};
use clisonix_stage::{OutputTopic, RecordMeta, Stage};

fn recording() -> Vec<Frame> {
    let dir = std::env::var_os("CLISONIX_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"));
    load(&dir.join("eeglab_sample_32ch_128hz_238s.edf"), 125)
        .unwrap()
        .for_device(
            &DeviceId::parse("bench").unwrap(),
            SessionId::random(),
            None,
        )
}

fn chunks(frames: &[Frame], preset: Preset) -> Vec<AudioChunk> {
    let mut jona = Jona::new(JonaConfig {
        presets: vec![preset],
        ..JonaConfig::default()
    });
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let meta = RecordMeta {
            partition: 0,
            offset: i as i64,
            timestamp_ms: Some(0),
            replay: false,
        };
        jona.process(f.clone(), meta, &mut out).unwrap();
    }
    out.iter()
        .filter(|o| o.topic == OutputTopic::AudioChunks)
        .map(|o| clisonix_schemas::decode::<AudioChunk>(&o.value).unwrap())
        .collect()
}

fn main() {
    let frames = recording();
    println!("FLAC on Jona's chunks of the reference recording, one core, best of 3");
    println!(
        "{:>20} {:>8} {:>10} {:>10} {:>8} {:>14} {:>14}",
        "preset", "chunks", "audio s", "PCM MB", "ratio", "encode x rt", "decode x rt"
    );
    for preset in Preset::ALL {
        let chunks = chunks(&frames, preset);
        let seconds: f64 = chunks
            .iter()
            .map(|c| c.pcm.len() as f64 / f64::from(c.channels) / f64::from(c.sample_rate_hz))
            .sum();
        let pcm_bytes: usize = chunks.iter().map(|c| c.pcm.len() * 2).sum();
        let (mut encode_best, mut decode_best, mut flac_bytes) = (f64::INFINITY, f64::INFINITY, 0);
        for _ in 0..3 {
            let started = Instant::now();
            let encoded: Vec<Vec<u8>> = chunks
                .iter()
                .map(|c| flac::encode(&c.pcm, c.channels, c.sample_rate_hz).unwrap())
                .collect();
            encode_best = encode_best.min(started.elapsed().as_secs_f64());
            flac_bytes = encoded.iter().map(Vec::len).sum();
            let started = Instant::now();
            for (e, c) in encoded.iter().zip(&chunks) {
                assert_eq!(flac::decode(e).unwrap().samples, c.pcm);
            }
            decode_best = decode_best.min(started.elapsed().as_secs_f64());
        }
        println!(
            "{:>20} {:>8} {:>10.0} {:>10.1} {:>8.2} {:>14.0} {:>14.0}",
            preset.name(),
            chunks.len(),
            seconds,
            pcm_bytes as f64 / 1e6,
            pcm_bytes as f64 / flac_bytes as f64,
            seconds / encode_best,
            seconds / decode_best
        );
    }
}
