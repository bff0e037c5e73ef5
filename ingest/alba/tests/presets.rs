//! The audio presets of a tenant's plan, on the real broker and Postgres: a frame or
//! an upload picking a preset the plan does not render is refused with 402
//! `preset_not_in_plan` and nothing of it is published; a session's first frame goes
//! out listing the plan's presets (which Jona keeps to), later ones do not; devices
//! cannot send that list themselves; a change of plan is seen within a refresh.

mod common;

use std::time::{Duration, Instant};

use clisonix_player::http::Format;
use clisonix_schemas::{
    Frame, Marker, SessionId, AUDIO_PLAN_MARKER, AUDIO_PRESETS_MARKER, SESSION_END_MARKER,
};
use common::{frames, recording_path, set_plan, TestIngest};

fn picking(mut frame: Frame, presets: &str) -> Frame {
    frame.markers.push(Marker {
        sample_offset: 0,
        duration_us: None,
        label: format!("{AUDIO_PRESETS_MARKER}{presets}"),
    });
    frame
}

fn labels(frame: &Frame) -> Vec<&str> {
    frame.markers.iter().map(|m| m.label.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presets_outside_the_plan_are_refused_and_first_frames_carry_the_plans() {
    let t = TestIngest::spawn().await;
    // Free renders parameter_mapping only.
    set_plan(&t.db, t.tenant.id, "free").await;
    let consumer = t.frames_consumer();

    // Picking audification: refused, the field named, nothing published.
    let refused = SessionId::random();
    let f = picking(frames(refused, 1, 4, 32).remove(0), "audification");
    let a = t.post(&[f], Format::Binary).await;
    assert_eq!(a.status, 402, "{}", String::from_utf8_lossy(&a.body));
    let e = &a.json()["error"];
    assert_eq!(e["code"], "preset_not_in_plan");
    assert_eq!(e["field"], "markers");
    assert!(e["message"].as_str().unwrap().contains("audification"));

    // The plan's own list cannot come from a device.
    let mut forged = frames(SessionId::random(), 1, 4, 32).remove(0);
    forged.markers.push(Marker {
        sample_offset: 0,
        duration_us: None,
        label: format!("{AUDIO_PLAN_MARKER}audification"),
    });
    let a = t.post(&[forged], Format::Json).await;
    assert_eq!(a.status, 422, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json()["error"]["code"], "bad_marker");

    // Asking for no audio is never refused, whatever the plan renders (a session of
    // one frame, ended by it).
    let mut silent = picking(frames(SessionId::random(), 1, 4, 32).remove(0), "none");
    silent.markers.push(Marker {
        sample_offset: 0,
        duration_us: None,
        label: SESSION_END_MARKER.into(),
    });
    let a = t.post(std::slice::from_ref(&silent), Format::Json).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let got = t.read_frames(&consumer, 1).await;
    assert_eq!(
        labels(&got[0].1),
        [
            format!("{AUDIO_PRESETS_MARKER}none").as_str(),
            SESSION_END_MARKER,
            &format!("{AUDIO_PLAN_MARKER}parameter_mapping")
        ]
    );

    // A session picking what the plan renders: its first frame (only) goes out with
    // the plan's list added after the device's markers.
    let session = SessionId::random();
    let mut sent = frames(session, 3, 4, 32);
    sent[0] = picking(sent[0].clone(), "parameter_mapping");
    let a = t.post(&sent[..2], Format::Binary).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let a = t.post(&sent[2..], Format::Json).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let got = t.read_frames(&consumer, 3).await;
    assert!(
        got.iter().all(|(_, f)| f.session_id == session),
        "nothing refused went out"
    );
    let plan_list = format!("{AUDIO_PLAN_MARKER}parameter_mapping");
    let mut expected = labels(&sent[0]);
    expected.push(&plan_list);
    assert_eq!(labels(&got[0].1), expected);
    assert_eq!(
        got[0].1.samples, sent[0].samples,
        "the samples are untouched"
    );
    assert_eq!(labels(&got[1].1), labels(&sent[1]));
    assert_eq!(labels(&got[2].1), labels(&sent[2]));

    // An upload picking audification is refused before it starts; picking the plan's
    // preset, its first frame carries the pick and the plan's list, and the answer
    // counts the recording's own annotations only.
    let recording = std::fs::read(recording_path()).unwrap();
    let mut client = t.client();
    let a = client
        .post(
            "/v1/recordings?audio=audification,parameter_mapping",
            "application/octet-stream",
            recording.clone(),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 402, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(
        a.headers.get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..]),
        "the unread upload's connection is not reused"
    );
    let e = &a.json()["error"];
    assert_eq!(
        (e["code"].as_str(), e["field"].as_str()),
        (Some("preset_not_in_plan"), Some("audio"))
    );
    let upload = SessionId::random();
    let a = client
        .post(
            &format!("/v1/recordings?session_id={upload}&audio=parameter_mapping"),
            "application/octet-stream",
            recording,
        )
        .await
        .unwrap();
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    let answer = a.json();
    let got = t.read_frames(&consumer, 1904).await;
    assert_eq!(
        got[0].1.session_id, upload,
        "the refused upload published nothing"
    );
    let first = labels(&got[0].1);
    assert_eq!(
        first[first.len() - 2..],
        [
            format!("{AUDIO_PRESETS_MARKER}parameter_mapping").as_str(),
            plan_list.as_str()
        ],
        "after the recording's own annotations"
    );
    let annotations: usize = got
        .iter()
        .flat_map(|(_, f)| &f.markers)
        .filter(|m| !m.label.starts_with("clisonix."))
        .count();
    assert_eq!(answer["markers"].as_u64(), Some(annotations as u64));

    // On enterprise, audification is rendered: accepted within a quota refresh.
    set_plan(&t.db, t.tenant.id, "enterprise").await;
    let upgraded = SessionId::random();
    let f = picking(frames(upgraded, 1, 4, 32).remove(0), "audification");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let a = t.post(std::slice::from_ref(&f), Format::Binary).await;
        if a.status == 200 {
            break;
        }
        assert_eq!(a.json()["error"]["code"], "preset_not_in_plan");
        assert!(Instant::now() < deadline, "the new plan was never seen");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let got = t.read_frames(&consumer, 1).await;
    assert_eq!(
        labels(&got[0].1),
        [
            format!("{AUDIO_PRESETS_MARKER}audification").as_str(),
            &format!("{AUDIO_PLAN_MARKER}audification,parameter_mapping")
        ]
    );

    t.stop().await;
}
