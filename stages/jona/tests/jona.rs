//! Jona with plain vectors: frames in, audio chunks out.

use std::f64::consts::TAU;
use std::path::PathBuf;

use clisonix_edf::{FrameSpec, Framer, Reader};
use clisonix_jona::{Jona, JonaConfig, Preset};
use clisonix_schemas::{
    decode, AudioChunk, AudioChunkKey, DeviceId, Frame, Marker, SampleUnit, SessionId, TenantId,
    Timestamp, UsageEvent, UsageKind, AUDIO_PLAN_MARKER, AUDIO_PRESETS_MARKER, SESSION_END_MARKER,
};
use clisonix_stage::{Output, OutputTopic, RecordMeta, Stage};

const TENANT: &str = "6f1c2d1e-8a1b-4c3d-9e8f-0123456789ab";
const SESSION: &str = "0b6c1a7e-3f4d-4e5a-9b8c-7d6e5f4a3b2c";

fn data_dir() -> PathBuf {
    std::env::var_os("CLISONIX_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"))
}

/// The reference recording (32 channels, 128 Hz, 238 s) as frames of `samples`.
fn recording(samples: u32) -> Vec<Frame> {
    let file = std::fs::File::open(data_dir().join("eeglab_sample_32ch_128hz_238s.edf")).unwrap();
    let mut reader = Reader::new(std::io::BufReader::new(file)).unwrap();
    let header = reader.header().clone();
    let spec = FrameSpec {
        tenant_id: TenantId::parse(TENANT).unwrap(),
        device_id: DeviceId::parse("edf").unwrap(),
        session_id: SessionId::parse(SESSION).unwrap(),
        samples_per_frame: samples,
    };
    let mut framer = Framer::new(&header, spec).unwrap();
    let mut frames = Vec::new();
    while let Some(r) = reader.next_record().unwrap() {
        framer.push(&r, Timestamp::from_micros(0), &mut frames);
    }
    framer.finish(Timestamp::from_micros(0), &mut frames);
    frames
}

/// `seconds` of synthetic EEG: channel `c` at time `t` is `signal(c, t)` µV.
fn synthetic(
    labels: &[&str],
    fs: f64,
    seconds: f64,
    spf: u32,
    signal: impl Fn(usize, f64) -> f64,
) -> Vec<Frame> {
    let total = (seconds * fs) as u64;
    (0..total.div_ceil(u64::from(spf)))
        .map(|seq| {
            let n = u64::from(spf).min(total - seq * u64::from(spf));
            let mut samples = Vec::new();
            for c in 0..labels.len() {
                for i in 0..n {
                    let t = (seq * u64::from(spf) + i) as f64 / fs;
                    samples.push(signal(c, t) as f32);
                }
            }
            Frame {
                tenant_id: TenantId::parse(TENANT).unwrap(),
                device_id: DeviceId::parse("synth").unwrap(),
                session_id: SessionId::parse(SESSION).unwrap(),
                seq,
                device_time: Timestamp::from_micros(
                    1_700_000_000_000_000 + (seq * u64::from(spf)) as i64 * 1_000_000 / fs as i64,
                ),
                received_at: Timestamp::from_micros(1_700_000_000_000_000),
                sample_rate_hz: fs,
                unit: SampleUnit::Microvolt,
                channel_labels: labels.iter().map(|l| l.to_string()).collect(),
                samples_per_channel: n as u32,
                samples,
                markers: Vec::new(),
            }
        })
        .collect()
}

fn meta(offset: i64) -> RecordMeta {
    RecordMeta {
        partition: 0,
        offset,
        timestamp_ms: Some(1_700_000_000_000 + offset),
        replay: false,
    }
}

fn chunks(out: &[Output]) -> Vec<AudioChunk> {
    out.iter()
        .filter(|o| o.topic == OutputTopic::AudioChunks)
        .map(|o| {
            let key: AudioChunkKey = decode(&o.key).unwrap();
            let c: AudioChunk = decode(&o.value).unwrap();
            assert_eq!(
                key,
                c.key(),
                "chunks are keyed by session, preset and index"
            );
            c
        })
        .collect()
}

fn run(config: JonaConfig, frames: &[Frame]) -> Vec<AudioChunk> {
    let mut jona = Jona::new(config);
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        jona.process(f.clone(), meta(i as i64), &mut out).unwrap();
    }
    chunks(&out)
}

fn with_presets(presets: &[Preset]) -> JonaConfig {
    JonaConfig {
        presets: presets.to_vec(),
        ..JonaConfig::default()
    }
}

fn end(mut frames: Vec<Frame>) -> Vec<Frame> {
    let last = frames.last_mut().unwrap();
    last.markers.push(Marker {
        sample_offset: last.samples_per_channel - 1,
        duration_us: None,
        label: SESSION_END_MARKER.into(),
    });
    frames
}

/// One preset's audio, concatenated in chunk order (checking contiguity on the way).
fn stream(chunks: &[AudioChunk], preset: Preset) -> Vec<i16> {
    let mut pcm = Vec::new();
    let mut next = 0u64;
    for (i, c) in chunks
        .iter()
        .filter(|c| c.preset == preset.name())
        .enumerate()
    {
        assert_eq!(c.chunk_index, i as u64, "chunk numbers are contiguous");
        assert_eq!(
            c.start_frame, next,
            "chunk {i} starts where the previous ended"
        );
        assert_eq!(c.preset_version, preset.version());
        assert_eq!((c.sample_rate_hz, c.channels), (44_100, 2));
        assert_eq!(c.pcm.len() % 2, 0);
        next += c.pcm.len() as u64 / 2;
        pcm.extend_from_slice(&c.pcm);
    }
    pcm
}

/// Energy of one interleaved channel at `freq` (Goertzel).
fn energy(pcm: &[i16], channel: usize, freq: f64) -> f64 {
    let coeff = 2.0 * (TAU * freq / 44_100.0).cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for frame in pcm.chunks_exact(2) {
        let s = f64::from(frame[channel]) + coeff * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    s1 * s1 + s2 * s2 - coeff * s1 * s2
}

#[test]
fn the_recording_is_rendered_deterministically_whatever_the_framing() {
    let both = with_presets(&Preset::ALL);
    // The first 120 s, as 16- and 64-sample frames.
    let a = run(both.clone(), &end(recording(16)[..960].to_vec()));
    let b = run(both.clone(), &end(recording(16)[..960].to_vec()));
    assert_eq!(a, b, "the same frames give bit-identical audio");
    let c = run(both, &end(recording(64)[..240].to_vec()));
    for preset in Preset::ALL {
        let (pa, pc) = (stream(&a, preset), stream(&c, preset));
        assert_eq!(pa, pc, "{preset}: framing changes nothing in the audio");
        let starts = |cs: &[AudioChunk]| -> Vec<(u64, i64)> {
            cs.iter()
                .filter(|c| c.preset == preset.name())
                .map(|c| (c.start_frame, c.eeg_start.as_micros()))
                .collect()
        };
        assert_eq!(
            starts(&a),
            starts(&c),
            "{preset}: chunks close at the same samples"
        );
    }
    // 120 s at 128 Hz: one chunk per EEG second, plus the closing fade.
    let mapping = stream(&a, Preset::ParameterMapping);
    let release = (0.05 * 44_100.0) as usize;
    assert_eq!(mapping.len() / 2, 120 * 44_100 + release);
    let audification = stream(&a, Preset::Audification);
    // Sixty times faster: 120 s of EEG in 2 s (to a frame: positions are floats).
    let expected = 120 * 44_100 / 60 + release;
    assert!(
        audification.len() / 2 - expected <= 1,
        "{}",
        audification.len() / 2
    );
    assert_eq!(
        a.iter().filter(|c| c.preset == "parameter_mapping").count(),
        121
    );
    // The first chunk starts at the recording's start, each next one a second later.
    let first: Vec<&AudioChunk> = a.iter().filter(|c| c.preset == "audification").collect();
    assert_eq!(
        first[1].eeg_start.as_micros() - first[0].eeg_start.as_micros(),
        1_000_000
    );
}

#[test]
fn chunking_does_not_change_the_audio_and_nothing_clicks() {
    let frames = end(recording(32)[..240].to_vec());
    let chunked = run(with_presets(&Preset::ALL), &frames);
    let whole = run(
        JonaConfig {
            chunk_seconds: 1e6,
            ..with_presets(&Preset::ALL)
        },
        &frames,
    );
    for preset in Preset::ALL {
        let pcm = stream(&chunked, preset);
        assert_eq!(
            pcm,
            stream(&whole, preset),
            "{preset}: chunk boundaries are seamless"
        );
        // Starts from silence and fades back to it.
        assert!(
            pcm[..2].iter().all(|s| s.abs() < 200),
            "{preset} starts softly"
        );
        assert!(
            pcm[pcm.len() - 2..].iter().all(|&s| s == 0),
            "{preset} ends in silence"
        );
        let steps: Vec<i32> = pcm
            .chunks_exact(2)
            .collect::<Vec<_>>()
            .windows(2)
            .flat_map(|w| {
                [
                    (w[1][0] as i32 - w[0][0] as i32).abs(),
                    (w[1][1] as i32 - w[0][1] as i32).abs(),
                ]
            })
            .collect();
        let max = *steps.iter().max().unwrap();
        assert!(
            max < 12_000,
            "{preset}: a jump of {max} between audio frames is a click"
        );
        let peak = pcm.iter().map(|s| s.unsigned_abs()).max().unwrap();
        assert!(peak > 3_000, "{preset}: audible (peak {peak})");
    }
}

#[test]
fn parameter_mapping_voices_follow_each_hemisphere_bands() {
    // Left hemisphere: a strong 10 Hz alpha; right: a strong 6 Hz theta.
    let frames = synthetic(&["F3", "F4"], 128.0, 12.0, 32, |c, t| {
        let f = if c == 0 { 10.0 } else { 6.0 };
        30.0 * (TAU * f * t).sin()
    });
    let out = run(with_presets(&[Preset::ParameterMapping]), &frames);
    let pcm = stream(&out, Preset::ParameterMapping);
    // Skip the first 4 s while envelopes and frequency estimates settle.
    let settled = &pcm[2 * 4 * 44_100..];
    // Alpha's voice is A3 moved by the frequency's place in 8-13 Hz (10 Hz: 0.4).
    let alpha = 220.0 * ((0.4 - 0.5) * 7.0 / 12.0f64).exp2();
    let theta = 146.83;
    let (l_alpha, l_theta) = (energy(settled, 0, alpha), energy(settled, 0, theta));
    let (r_alpha, r_theta) = (energy(settled, 1, alpha), energy(settled, 1, theta));
    assert!(
        l_alpha > 5.0 * l_theta,
        "left is alpha: {l_alpha:e} vs {l_theta:e}"
    );
    assert!(
        r_theta > 5.0 * r_alpha,
        "right is theta: {r_theta:e} vs {r_alpha:e}"
    );
    assert!(l_alpha > 5.0 * r_alpha, "alpha is panned left");
}

#[test]
fn audification_plays_the_eeg_sixty_times_faster() {
    let frames = synthetic(&["Cz"], 256.0, 20.0, 32, |_, t| {
        20.0 * (TAU * 10.0 * t).sin()
    });
    let out = run(with_presets(&[Preset::Audification]), &frames);
    let pcm = stream(&out, Preset::Audification);
    // Without an end marker, audio stops two EEG samples short of the newest (the
    // interpolation's look-ahead): positions below 5120 - 2 samples.
    let step = 60.0 * 256.0 / 44_100.0;
    assert_eq!(pcm.len() / 2, (5118.0f64 / step).ceil() as usize);
    let settled = &pcm[pcm.len() / 4 * 2..];
    let at = |f: f64| energy(settled, 0, f);
    assert!(at(600.0) > 50.0 * at(450.0) && at(600.0) > 50.0 * at(800.0));
    assert_eq!(
        energy(settled, 0, 600.0),
        energy(settled, 1, 600.0),
        "a midline channel is centred"
    );
}

#[test]
fn a_session_picks_its_presets_in_its_first_frame() {
    let mut frames = synthetic(&["Cz"], 128.0, 3.0, 16, |_, t| (TAU * 5.0 * t).sin());
    let default = run(JonaConfig::default(), &frames);
    assert!(default.iter().all(|c| c.preset == "parameter_mapping"));
    frames[0].markers.push(Marker {
        sample_offset: 0,
        duration_us: None,
        label: format!("{AUDIO_PRESETS_MARKER}audification,parameter_mapping,unknown"),
    });
    let chosen = run(JonaConfig::default(), &frames);
    for p in Preset::ALL {
        assert!(chosen.iter().any(|c| c.preset == p.name()), "{p} rendered");
    }
    frames[0].markers[0].label = format!("{AUDIO_PRESETS_MARKER}audification");
    let one = run(JonaConfig::default(), &frames);
    assert!(one.iter().all(|c| c.preset == "audification"));
    // `none` asks for no audio, whatever the defaults and whatever else is listed.
    for list in ["none", "none,audification"] {
        frames[0].markers[0].label = format!("{AUDIO_PRESETS_MARKER}{list}");
        let mut jona = Jona::new(with_presets(&Preset::ALL));
        let mut all = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            jona.process(f.clone(), meta(i as i64), &mut all).unwrap();
        }
        assert!(all.is_empty(), "{list}: no chunks and no usage events");
    }
}

#[test]
fn only_the_presets_the_plan_lists_are_rendered_picked_or_default() {
    let mut frames = synthetic(&["Cz"], 128.0, 3.0, 16, |_, t| (TAU * 5.0 * t).sin());
    let both = with_presets(&[Preset::Audification, Preset::ParameterMapping]);
    let plan = |list: &str| Marker {
        sample_offset: 0,
        duration_us: None,
        label: format!("{AUDIO_PLAN_MARKER}{list}"),
    };
    // Jona's defaults, narrowed to the plan's one preset.
    frames[0].markers.push(plan("parameter_mapping"));
    let out = run(both.clone(), &frames);
    assert!(!out.is_empty());
    assert!(out.iter().all(|c| c.preset == "parameter_mapping"));
    // A plan without audio renders nothing, and meters no audio.
    frames[0].markers[0] = plan("");
    assert!(run(both.clone(), &frames).is_empty());
    let mut jona = Jona::new(both.clone());
    let mut all = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        jona.process(f.clone(), meta(i as i64), &mut all).unwrap();
    }
    assert!(all.is_empty(), "no chunks and no usage events");
    // A preset the session picks that the plan does not list is not rendered.
    frames[0].markers[0] = plan("audification");
    frames[0].markers.push(Marker {
        sample_offset: 0,
        duration_us: None,
        label: format!("{AUDIO_PRESETS_MARKER}audification,parameter_mapping"),
    });
    let out = run(both, &frames);
    assert!(!out.is_empty());
    assert!(out.iter().all(|c| c.preset == "audification"));
}

#[test]
fn the_end_marker_closes_the_session_and_later_frames_are_refused() {
    let frames = synthetic(&["Cz"], 128.0, 2.5, 16, |_, t| (TAU * 5.0 * t).sin());
    let mut jona = Jona::new(JonaConfig::default());
    let mut out = Vec::new();
    let mut ended = end(frames[..10].to_vec());
    for (i, f) in ended.drain(..).enumerate() {
        jona.process(f, meta(i as i64), &mut out).unwrap();
    }
    let cs = chunks(&out);
    assert_eq!(cs.len(), 2, "the first full second and the closing chunk");
    assert_eq!((cs[1].source_first_seq, cs[1].source_last_seq), (8, 9));
    assert_eq!(jona.open_sessions(), 0);
    assert_eq!(jona.needed_from(0), Some(0), "kept until it idles out");
    let late = jona
        .process(frames[10].clone(), meta(10), &mut out)
        .unwrap_err();
    assert_eq!(late.code, "session_ended");
}

#[test]
fn an_idle_session_is_closed_by_record_time_with_its_last_chunk() {
    let frames = synthetic(&["Cz"], 128.0, 1.5, 16, |_, t| (TAU * 5.0 * t).sin());
    let config = JonaConfig {
        idle_ms: 60_000,
        ..JonaConfig::default()
    };
    let mut jona = Jona::new(config);
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        jona.process(f.clone(), meta(i as i64), &mut out).unwrap();
    }
    assert_eq!(chunks(&out).len(), 1);
    // Another session's frame two minutes later, on the same partition.
    let mut other = frames[0].clone();
    other.session_id = SessionId::random();
    let mut m = meta(100);
    m.timestamp_ms = Some(1_700_000_000_000 + 120_000);
    jona.process(other, m, &mut out).unwrap();
    let cs = chunks(&out);
    assert_eq!(
        cs.len(),
        2,
        "the idle session's last half second, faded out"
    );
    assert_eq!(cs[1].chunk_index, 1);
    assert_eq!(*cs[1].pcm.last().unwrap(), 0);
    assert_eq!(jona.needed_from(0), Some(100));
}

#[test]
fn replaying_rebuilds_state_so_the_rest_equals_a_clean_run() {
    let frames = end(recording(16)[..400].to_vec());
    let both = with_presets(&Preset::ALL);
    let clean = {
        let mut jona = Jona::new(both.clone());
        let mut out = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            jona.process(f.clone(), meta(i as i64), &mut out).unwrap();
        }
        out
    };
    let crash = 173;
    let mut before = Vec::new();
    let mut jona = Jona::new(both.clone());
    for (i, f) in frames[..crash].iter().enumerate() {
        jona.process(f.clone(), meta(i as i64), &mut before)
            .unwrap();
    }
    let mut restarted = Jona::new(both);
    let mut replayed = Vec::new();
    let mut after = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let mut m = meta(i as i64);
        m.replay = i < crash;
        let out = if m.replay { &mut replayed } else { &mut after };
        restarted.process(f.clone(), m, out).unwrap();
    }
    assert!(replayed.is_empty(), "replayed audio is not encoded again");
    before.extend(after);
    assert_eq!(
        before, clean,
        "before the crash + after the restart = one clean run"
    );
}

#[test]
fn poison_frames_are_rejected_and_the_session_goes_on() {
    let frames = synthetic(&["Cz", "C3"], 128.0, 2.0, 16, |_, t| (TAU * 5.0 * t).sin());
    let mut jona = Jona::new(JonaConfig::default());
    let mut out = Vec::new();
    jona.process(frames[0].clone(), meta(0), &mut out).unwrap();
    let mut nan = frames[1].clone();
    nan.samples[3] = f32::NAN;
    assert_eq!(
        jona.process(nan, meta(1), &mut out).unwrap_err().code,
        "non_finite_samples"
    );
    let mut rate = frames[1].clone();
    rate.sample_rate_hz = 256.0;
    assert_eq!(
        jona.process(rate, meta(2), &mut out).unwrap_err().code,
        "sample_rate_changed"
    );
    let mut chans = frames[1].clone();
    chans.channel_labels[1] = "C4".into();
    assert_eq!(
        jona.process(chans, meta(3), &mut out).unwrap_err().code,
        "channels_changed"
    );
    let mut slow = frames[0].clone();
    slow.session_id = SessionId::random();
    slow.sample_rate_hz = 16.0;
    assert_eq!(
        jona.process(slow, meta(4), &mut out).unwrap_err().code,
        "unsupported_sample_rate"
    );
    for (i, f) in frames[1..].iter().enumerate() {
        jona.process(f.clone(), meta(5 + i as i64), &mut out)
            .unwrap();
    }
    // Duplicates and late frames are dropped: the audio equals a clean run's.
    jona.process(frames[3].clone(), meta(100), &mut out)
        .unwrap();
    let clean = run(JonaConfig::default(), &frames);
    assert_eq!(chunks(&out), clean);
}

#[test]
fn each_chunk_reports_the_audio_it_adds_as_usage_per_preset_with_an_id_a_replay_repeats() {
    let mut frames = recording(16);
    frames.truncate(160);
    frames.last_mut().unwrap().markers.push(Marker {
        sample_offset: 15,
        duration_us: None,
        label: SESSION_END_MARKER.into(),
    });
    let mut jona = Jona::new(with_presets(&Preset::ALL));
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        jona.process(f.clone(), meta(i as i64), &mut out).unwrap();
    }
    let audio = chunks(&out);
    let events: Vec<UsageEvent> = out
        .iter()
        .filter(|o| o.topic == OutputTopic::UsageEvents)
        .map(|o| decode(&o.value).unwrap())
        .collect();
    for preset in Preset::ALL {
        let frames: u64 = audio
            .iter()
            .filter(|c| c.preset == preset.name())
            .map(|c| (c.pcm.len() / usize::from(c.channels)) as u64)
            .sum();
        let ms: i64 = events
            .iter()
            .filter(|e| e.detail.as_deref() == Some(preset.name()))
            .map(|e| e.quantity)
            .sum();
        assert_eq!(ms, (frames * 1000 / 44_100) as i64, "{}", preset.name());
    }
    assert!(events.iter().all(|e| e.kind == UsageKind::AudioMilliseconds
        && e.source == "jona"
        && e.session_id == Some(frames[0].session_id)
        && e.tenant_id == frames[0].tenant_id));
    // The same input gives the same events, ids included.
    let mut again = Jona::new(with_presets(&Preset::ALL));
    let mut out2 = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        again.process(f.clone(), meta(i as i64), &mut out2).unwrap();
    }
    let ids = |out: &[Output]| -> Vec<uuid::Uuid> {
        out.iter()
            .filter(|o| o.topic == OutputTopic::UsageEvents)
            .map(|o| decode::<UsageEvent>(&o.value).unwrap().event_id)
            .collect()
    };
    assert_eq!(ids(&out), ids(&out2));
    let unique: std::collections::BTreeSet<_> = ids(&out).into_iter().collect();
    assert_eq!(unique.len(), events.len());
}
