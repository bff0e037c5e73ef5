//! The whole pipeline end to end: a device streams the reference recording through
//! ingest; the features read through the API equal the reference values; the audio
//! comes back as a WAV of the expected length, the same bytes every time, in byte
//! ranges too; another tenant sees none of it.

mod common;

use std::time::Duration;

use clisonix_player::http::Format;
use clisonix_player::play::{play, PlayOptions, Transport};
use clisonix_player::recording::load;
use common::{recording_path, text, Pipeline};
use futures::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

const FEATURES: [&str; 17] = [
    "abs_delta",
    "abs_theta",
    "abs_alpha",
    "abs_beta",
    "abs_gamma",
    "total_abs",
    "rel_delta",
    "rel_theta",
    "rel_alpha",
    "rel_beta",
    "rel_gamma",
    "peak_alpha_hz",
    "peak_alpha_psd",
    "spectral_entropy",
    "hjorth_activity",
    "hjorth_mobility",
    "hjorth_complexity",
];

fn close(got: &Value, want: &Value) -> bool {
    match (got.as_f64(), want.as_f64()) {
        (Some(g), Some(w)) => (g - w).abs() <= 1e-6 * w.abs().max(1e-300),
        _ => got.is_null() && want.is_null(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_recording_is_readable_and_audible_through_the_api() {
    let p = Pipeline::start().await;
    let recording = load(&recording_path(), 125).unwrap();
    // The device streams in the background; a live client connects as soon as the
    // session exists.
    let device = {
        let (url, key) = (p.ingest.clone(), p.tenant.ingest_key.clone());
        tokio::spawn(async move {
            play(
                &recording,
                &PlayOptions {
                    url,
                    key,
                    transport: Transport::WebSocket,
                    format: Format::Binary,
                    speed: 0.0,
                    audio_presets: Some("audification,parameter_mapping".into()),
                    ..PlayOptions::default()
                },
            )
            .await
            .unwrap()
        })
    };
    let mut reader = p.reader(&p.tenant.read_key);
    let listed = p
        .wait_for(&mut reader, "/v1/sessions", Duration::from_secs(60), |v| {
            v["sessions"].as_array().is_some_and(|s| !s.is_empty())
        })
        .await;
    let live_session = listed["sessions"][0]["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let live = tokio::spawn(watch(format!(
        "{}/v1/sessions/{live_session}/live?access_token={}",
        p.gateway.replace("http", "ws"),
        p.tenant.read_key
    )));
    let report = device.await.unwrap();
    assert_eq!(report.acked, 1904, "{}", report.summary());
    let session = report.sessions[0].1;
    assert_eq!(live_session, session.to_string());

    // The session ends (the player marks the last frame) with everything stored.
    let detail = p
        .wait_for(
            &mut reader,
            &format!("/v1/sessions/{session}"),
            Duration::from_secs(120),
            |v| {
                v["status"] == "ended"
                    && v["feature_windows"] == 119
                    && v["audio"].as_array().is_some_and(|a| {
                        a.len() == 2 && a.iter().all(|p| p["chunks"].as_i64() == Some(239))
                    })
            },
        )
        .await;
    assert_eq!(detail["frames"], 1904);
    assert_eq!(detail["samples_per_channel"], 238 * 128);
    assert_eq!(detail["seq_gaps"], 0);
    assert_eq!(detail["end_reason"], "explicit");
    assert_eq!(detail["channel_labels"].as_array().unwrap().len(), 32);

    // Features through the API equal the reference values.
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(
            common::data_dir().join("eeglab_sample_32ch_128hz_238s.reference.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let first = detail["first_device_time"].as_str().unwrap();
    let to = chrono_add(first, 20);
    let a = reader
        .get(&format!(
            "/v1/sessions/{session}/features?from={first}&to={to}&features={}",
            FEATURES.join(",")
        ))
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", text(&a));
    let body = a.json();
    let rows = body["rows"].as_array().unwrap();
    assert_eq!(
        rows.len(),
        10 * 32,
        "the first 20 s: ten windows of 32 channels"
    );
    let mut compared = 0;
    for w in reference["windows"].as_array().unwrap() {
        let row = rows
            .iter()
            .find(|r| r["channel_index"] == w["channel"] && r["window_index"] == w["window"])
            .unwrap();
        assert_eq!(row["channel_label"], w["label"]);
        for f in FEATURES {
            assert!(
                close(&row[f], &w[f]),
                "window {} channel {} {f}: {} vs {}",
                w["window"],
                w["channel"],
                row[f],
                w[f]
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 320 * FEATURES.len());
    // Windows come in order; CSV and NDJSON carry the same rows; channel and feature
    // filters narrow them.
    let order: Vec<(i64, i64)> = rows
        .iter()
        .map(|r| {
            (
                r["window_index"].as_i64().unwrap(),
                r["channel_index"].as_i64().unwrap(),
            )
        })
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]));
    let csv = reader
        .get(&format!(
            "/v1/sessions/{session}/features?format=csv&channels=Cz,0&features=rel_alpha,flat"
        ))
        .await
        .unwrap();
    assert_eq!(csv.status, 200);
    assert!(csv.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    let csv = text(&csv);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "window_index,window_start,channel_index,channel_label,rel_alpha,flat"
    );
    assert_eq!(lines.len(), 1 + 119 * 2);
    assert!(lines[1..]
        .iter()
        .all(|l| l.contains(",FPz,") || l.contains(",Cz,")));
    let nd = reader
        .get(&format!(
            "/v1/sessions/{session}/features?format=ndjson&from_window=100&features=psd"
        ))
        .await
        .unwrap();
    let lines: Vec<Value> = text(&nd)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 19 * 32);
    // Welch with 128-sample segments at 128 Hz: 65 bins, 0 to 64 Hz.
    assert!(lines
        .iter()
        .all(|l| l["psd"].as_array().is_some_and(|p| p.len() == 65)));
    // Parquet: the same rows and values, read back by pyarrow.
    let pq = reader
        .get(&format!(
            "/v1/sessions/{session}/features?from={first}&to={to}&features=rel_alpha,flat,seq_gaps,unit,psd&format=parquet"
        ))
        .await
        .unwrap();
    assert_eq!(pq.status, 200, "{}", text(&pq));
    assert_eq!(
        pq.headers["content-type"].to_str().unwrap(),
        "application/vnd.apache.parquet"
    );
    let file = std::env::temp_dir().join(format!("clisonix-features-{session}.parquet"));
    std::fs::write(&file, &pq.body).unwrap();
    let python = std::env::var("CLISONIX_PYTHON").expect(
        "CLISONIX_PYTHON names the tests' Python environment: run the tests with ./dev test",
    );
    let out = std::process::Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/python/parquet_check.py"
        ))
        .arg(&file)
        .args(["rel_alpha", "window_index", "channel_label", "window_start"])
        .args(["flat", "seq_gaps", "unit", "psd"])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pq: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(pq["rows"], 10 * 32);
    assert_eq!(pq["types"]["window_start"], "timestamp[us, tz=UTC]");
    assert_eq!(pq["types"]["psd"], "list<element: double not null>");
    let json = reader
        .get(&format!(
            "/v1/sessions/{session}/features?from={first}&to={to}&features=rel_alpha,flat,seq_gaps,unit,psd"
        ))
        .await
        .unwrap()
        .json();
    let json = json["rows"].as_array().unwrap();
    assert_eq!(json.len(), 10 * 32);
    for (i, r) in json.iter().enumerate() {
        let named = &pq["named"];
        for name in ["window_index", "channel_label", "flat", "seq_gaps", "unit"] {
            assert_eq!(named[name][i], r[name], "row {i} {name}");
        }
        assert_eq!(
            named["rel_alpha"][i].as_f64(),
            r["rel_alpha"].as_f64(),
            "row {i}"
        );
        let floats = |v: &Value| -> Vec<Option<f64>> {
            v.as_array().unwrap().iter().map(Value::as_f64).collect()
        };
        assert_eq!(floats(&named["psd"][i]), floats(&r["psd"]), "row {i} psd");
        assert_eq!(floats(&r["psd"]).len(), 65);
    }
    // The first row's start, as pyarrow prints it.
    assert!(pq["named"]["window_start"][0]
        .as_str()
        .unwrap()
        .starts_with(&rows[0]["window_start"].as_str().unwrap()[..19].replace('T', " ")));

    let bad = reader
        .get(&format!("/v1/sessions/{session}/features?features=nope"))
        .await
        .unwrap();
    assert_eq!(
        (bad.status, bad.json()["error"]["field"].as_str()),
        (422, Some("features"))
    );

    // Audio: a WAV of the expected length, the same bytes every time, ranges too.
    let wav = reader
        .get(&format!(
            "/v1/sessions/{session}/audio?preset=parameter_mapping"
        ))
        .await
        .unwrap();
    assert_eq!(wav.status, 200, "{}", text(&wav));
    assert_eq!(wav.headers["content-type"], "audio/wav");
    let (rate, channels, data) = parse_wav(&wav.body);
    assert_eq!((rate, channels), (44_100, 2));
    // 238 s of EEG in real time, plus the 50 ms fade at the end.
    assert_eq!(data.len(), (238 * 44_100 + 2_205) * 4);
    let again = reader
        .get(&format!(
            "/v1/sessions/{session}/audio?preset=parameter_mapping"
        ))
        .await
        .unwrap();
    assert_eq!(again.body, wav.body, "the audio is deterministic");
    let ranged = reader
        .send_with(
            "GET",
            &format!("/v1/sessions/{session}/audio"),
            None,
            Vec::new(),
            None,
            &[("range", "bytes=1000-1999")],
        )
        .await
        .unwrap();
    assert_eq!(ranged.status, 206);
    assert_eq!(&ranged.body[..], &wav.body[1000..2000]);
    assert_eq!(
        ranged.headers["content-range"].to_str().unwrap(),
        format!("bytes 1000-1999/{}", wav.body.len())
    );
    let fast = reader
        .get(&format!("/v1/sessions/{session}/audio?preset=audification"))
        .await
        .unwrap();
    let (_, _, fast_data) = parse_wav(&fast.body);
    let frames = fast_data.len() / 4;
    assert!(
        (238 * 44_100 / 60 + 2_205..=238 * 44_100 / 60 + 2_206).contains(&frames),
        "{frames}"
    );
    let part = reader
        .get(&format!(
            "/v1/sessions/{session}/audio?preset=parameter_mapping&from={first}&to={to}"
        ))
        .await
        .unwrap();
    let (_, _, part_data) = parse_wav(&part.body);
    assert_eq!(
        part_data.len(),
        20 * 44_100 * 4,
        "a time range is whole chunks"
    );
    assert_eq!(part_data, &data[..part_data.len()]);

    // Chunk by chunk as FLAC: each decodes to its stretch of the WAV, bit for bit, at a
    // fraction of its bytes.
    let mut offset = 0;
    let (mut flac_bytes, mut pcm_bytes) = (0, 0);
    for index in 0..239 {
        let chunk = reader
            .get(&format!("/v1/sessions/{session}/audio/chunks/{index}"))
            .await
            .unwrap();
        assert_eq!(chunk.status, 200, "{}", text(&chunk));
        assert_eq!(chunk.headers["content-type"], "audio/flac");
        let pcm = clisonix_audio::flac::decode(&chunk.body).unwrap();
        assert_eq!((pcm.channels, pcm.sample_rate_hz), (2, 44_100));
        let bytes = clisonix_sink::pcm_bytes(&pcm.samples);
        assert_eq!(
            bytes[..],
            data[offset..offset + bytes.len()],
            "chunk {index}"
        );
        offset += bytes.len();
        (flac_bytes, pcm_bytes) = (flac_bytes + chunk.body.len(), pcm_bytes + bytes.len());
    }
    assert_eq!(offset, data.len());
    assert!(
        flac_bytes * 3 < pcm_bytes,
        "{flac_bytes} bytes of FLAC for {pcm_bytes} of PCM"
    );
    let missing = reader
        .get(&format!("/v1/sessions/{session}/audio/chunks/239"))
        .await
        .unwrap();
    assert_eq!(
        (missing.status, missing.json()["error"]["code"].as_str()),
        (404, Some("audio_not_found"))
    );

    // The live stream pushed every window in order with all channels, every chunk with
    // its PCM, then the end.
    let (live_windows, chunks, end) = live.await.unwrap();
    let windows: Vec<i64> = live_windows
        .iter()
        .map(|w| w["window_index"].as_i64().unwrap())
        .collect();
    assert_eq!(windows, (0..119).collect::<Vec<i64>>());
    assert_eq!(
        chunks.iter().map(|(i, _)| *i).collect::<Vec<i64>>(),
        (0..239).collect::<Vec<i64>>()
    );
    let pushed: Vec<u8> = chunks.into_iter().flat_map(|(_, pcm)| pcm).collect();
    assert_eq!(pushed, data, "the pushed audio is the WAV's");
    assert_eq!(end["session"]["status"], "ended");
    // Resuming from a window, features only.
    let (windows, chunks, _) = watch(format!(
        "{}/v1/sessions/{session}/live?from_window=100&audio=false&access_token={}",
        p.gateway.replace("http", "ws"),
        p.tenant.read_key
    ))
    .await;
    let indexes: Vec<i64> = windows
        .iter()
        .map(|w| w["window_index"].as_i64().unwrap())
        .collect();
    assert_eq!(indexes, (100..119).collect::<Vec<i64>>());
    assert!(chunks.is_empty());
    // The first stream took its windows from the features topic as Albi wrote them;
    // the resumed one, connected after the session ended, from the database: the same
    // windows, value for value.
    assert_eq!(windows[..], live_windows[100..]);
    let metrics = p.reader("").get("/metrics").await.unwrap();
    let from_topic: f64 = String::from_utf8_lossy(&metrics.body)
        .lines()
        .find_map(|l| l.strip_prefix("clisonix_live_windows_total{source=\"topic\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(from_topic > 0.0, "no window was pushed from the topic");

    // A user's token reads the same; another tenant sees nothing.
    let mut user = p.reader(&p.tenant.access_token);
    assert_eq!(
        user.get(&format!("/v1/sessions/{session}"))
            .await
            .unwrap()
            .status,
        200
    );
    let mut other = p.reader(&p.other.read_key);
    let list = other.get("/v1/sessions").await.unwrap();
    assert_eq!(list.json()["sessions"].as_array().unwrap().len(), 0);
    for path in ["", "/features", "/audio", "/audio/chunks/0"] {
        let a = other
            .get(&format!("/v1/sessions/{session}{path}"))
            .await
            .unwrap();
        assert_eq!(a.status, 404, "{path}: {}", text(&a));
    }
    let mine = reader
        .get("/v1/sessions?status=ended&limit=1")
        .await
        .unwrap();
    assert_eq!(
        mine.json()["sessions"][0]["session_id"],
        session.to_string()
    );
    let ingest_only = p
        .reader(&p.tenant.ingest_key)
        .get("/v1/sessions")
        .await
        .unwrap();
    assert_eq!(ingest_only.status, 403, "an ingest key does not read");
    p.stop().await;
}

/// `t` (RFC 3339) plus `seconds`.
fn chrono_add(t: &str, seconds: i64) -> String {
    let t = chrono::DateTime::parse_from_rfc3339(t).unwrap() + chrono::Duration::seconds(seconds);
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Sample rate, channels and data of a 16-bit PCM WAV.
fn parse_wav(bytes: &[u8]) -> (u32, u16, &[u8]) {
    assert_eq!(&bytes[..4], b"RIFF");
    assert_eq!(&bytes[8..16], b"WAVEfmt ");
    assert_eq!(u16::from_le_bytes([bytes[20], bytes[21]]), 1, "PCM");
    assert_eq!(u16::from_le_bytes([bytes[34], bytes[35]]), 16, "16-bit");
    assert_eq!(&bytes[36..40], b"data");
    let len = u32::from_le_bytes(bytes[40..44].try_into().unwrap()) as usize;
    assert_eq!(len, bytes.len() - 44, "the header's length is the data's");
    (
        u32::from_le_bytes(bytes[24..28].try_into().unwrap()),
        u16::from_le_bytes([bytes[22], bytes[23]]),
        &bytes[44..],
    )
}

/// Reads a live stream to its end: the window messages and audio chunks in arrival
/// order, and the end message.
async fn watch(url: String) -> (Vec<Value>, Vec<(i64, Vec<u8>)>, Value) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    let first: Value = match ws.next().await.unwrap().unwrap() {
        Message::Text(t) => serde_json::from_str(&t).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(first["type"], "session");
    let (mut windows, mut chunks) = (Vec::new(), Vec::new());
    let mut pending: Option<i64> = None;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .expect("the live stream goes on")
            .expect("the stream ends with an end message")
            .unwrap();
        match m {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert!(pending.is_none(), "PCM follows its header");
                match v["type"].as_str().unwrap() {
                    "features" => {
                        assert_eq!(v["channels"].as_array().unwrap().len(), 32);
                        assert!(v["channels"][0]["rel_alpha"].is_number());
                        windows.push(v);
                    }
                    "audio" => pending = Some(v["chunk_index"].as_i64().unwrap()),
                    "end" => return (windows, chunks, v),
                    other => panic!("unexpected {other}"),
                }
            }
            Message::Binary(b) => chunks.push((pending.take().unwrap(), b.to_vec())),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_frames_is_reflected_in_its_session_when_nothing_follows() {
    let p = Pipeline::start_with(common::Parts {
        jona: false,
        sink: true,
    })
    .await;
    // Three seconds of EEG sent at once, then nothing (no end marker).
    let mut recording = load(&recording_path(), 125).unwrap();
    recording.frames.truncate(24);
    let report = play(
        &recording,
        &PlayOptions {
            url: p.ingest.clone(),
            key: p.tenant.ingest_key.clone(),
            transport: Transport::Http,
            format: Format::Binary,
            speed: 0.0,
            end_sessions: false,
            ..PlayOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(report.acked, 24, "{}", report.summary());
    let session = report.sessions[0].1;
    let mut reader = p.reader(&p.tenant.read_key);
    // Within the sessions stage's update interval (5 s) and the sink's delay.
    let started = std::time::Instant::now();
    let state = p
        .wait_for(
            &mut reader,
            &format!("/v1/sessions/{session}"),
            Duration::from_secs(30),
            |v| v["frames"] == 24,
        )
        .await;
    assert_eq!(state["status"], "active");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    p.stop().await;
}
