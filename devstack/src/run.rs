//! The main job: the whole pipeline on a real recording, locally. The gateway, ingest,
//! Albi, Jona, the sessions stage and the results sink run in this process (each as
//! it runs in production, as a task); a tenant is signed up through the API with an
//! ingest and a read key; the recording is streamed as a device over ingest's
//! WebSocket, in real time by default; then the features are read through the API
//! and the audio saved as WAV files. It prints how to read, listen and watch, and keeps
//! serving until Ctrl-C.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clisonix_player::http::{Client, Format};
use clisonix_player::play::{play, PlayOptions, Transport};
use clisonix_player::recording::load;
use clisonix_schemas::SessionId;
use clisonix_stage::Stage;
use clisonix_stage_runtime::{
    run, run_tables, Health, Metering, RuntimeConfig, Sink, StageMetrics, TableWriter, TablesConfig,
};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::stack::Stack;

/// The audio presets the local run renders for its session.
const PRESETS: [&str; 2] = ["parameter_mapping", "audification"];

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub file: PathBuf,
    pub frame_ms: u32,
    /// Multiple of real time; 0 streams as fast as possible.
    pub speed: f64,
    /// Stop once the results are in, instead of serving until Ctrl-C.
    pub exit_when_done: bool,
    pub gateway: SocketAddr,
    pub ingest: SocketAddr,
    /// Where the WAV files go.
    pub out_dir: PathBuf,
}

/// The services of the pipeline, running as tasks until `stop`.
struct Services {
    stop: CancellationToken,
    /// The gateway's and ingest's (a child of `stop`): they stop first, so the stages
    /// see everything they wrote, their last usage events included.
    front: CancellationToken,
    tasks: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
}

impl Services {
    async fn start(
        stack: &Stack,
        options: &RunOptions,
        stop: CancellationToken,
    ) -> anyhow::Result<Services> {
        let mut services = Services {
            front: stop.child_token(),
            stop,
            tasks: Vec::new(),
        };
        let database = stack.postgres.url();

        let mut config = clisonix_gateway::Config::defaults();
        config.database_url = clisonix_gateway::config::Secret::new(database.clone());
        config.audio_store = Some(stack.audio_store.clone());
        config.listen = options.gateway;
        config.kafka_bootstrap = Some(stack.bootstrap());
        config.topic_prefix = stack.topics.prefix().to_owned();
        let gateway = clisonix_gateway::Application::build(config)
            .await
            .with_context(|| format!("starting the gateway on {}", options.gateway))?;
        let token = services.front.clone();
        services.tasks.push((
            "gateway",
            tokio::spawn(async move { Ok(gateway.run_until_stopped(token).await?) }),
        ));

        let mut config = clisonix_alba::Config::defaults();
        config.database_url = clisonix_gateway::config::Secret::new(database.clone());
        config.listen = options.ingest;
        config.kafka = stack.kafka_settings("clisonix-alba");
        config.topic_prefix = stack.topics.prefix().to_owned();
        let ingest = clisonix_alba::Application::build(config)
            .await
            .with_context(|| format!("starting ingest on {}", options.ingest))?;
        let token = services.front.clone();
        services.tasks.push((
            "ingest",
            tokio::spawn(async move { Ok(ingest.run_until_stopped(token).await?) }),
        ));

        services.stage(
            stack,
            clisonix_albi::Albi::new(clisonix_albi::AlbiConfig::default()),
        );
        services.stage(
            stack,
            clisonix_jona::Jona::new(clisonix_jona::JonaConfig::default()),
        );
        services.stage(
            stack,
            clisonix_sessions::Sessions::new(clisonix_sessions::SessionsConfig::default()),
        );
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&database)
            .await
            .context("connecting the sink and metering to Postgres")?;
        let audio = clisonix_audio::AudioStore::from_url(&stack.audio_store)
            .context("opening the audio store")?;
        let sink = Sink::new(
            clisonix_sink::Results::new(pool.clone(), audio),
            &stack.topics,
        )
        .with_retention(
            Duration::from_secs(600),
            Duration::from_secs(600),
            StageMetrics::default(),
        );
        services.tables(stack, sink);
        let metering = Metering::new(
            clisonix_metering::MeteringStore::new(pool),
            &stack.topics,
            StageMetrics::default(),
        );
        services.tables(stack, metering);
        Ok(services)
    }

    /// Runs a consumer that writes to Postgres (the sink, metering).
    fn tables<W: TableWriter + 'static>(&mut self, stack: &Stack, writer: W) {
        let name = writer.name();
        let config = TablesConfig {
            kafka: stack.kafka_settings(&format!("clisonix-{name}")),
            topics: stack.topics.clone(),
            group: name.to_owned(),
            batch_max: 500,
            batch_linger: Duration::from_millis(20),
        };
        let token = self.stop.clone();
        self.tasks.push((
            name,
            tokio::spawn(
                async move { Ok(run_tables(writer, config, Health::default(), token).await?) },
            ),
        ));
    }

    fn stage<S: Stage + 'static>(&mut self, stack: &Stack, stage: S) {
        let name = stage.name();
        let config = RuntimeConfig {
            kafka: stack.kafka_settings(&format!("clisonix-{name}")),
            topics: stack.topics.clone(),
            group: name.to_owned(),
            instance_id: "dev-run".to_owned(),
            batch_max: 500,
            batch_linger: Duration::from_millis(20),
        };
        let token = self.stop.clone();
        self.tasks.push((
            name,
            tokio::spawn(async move { Ok(run(stage, config, Health::default(), token).await?) }),
        ));
    }

    /// A service that stopped on its own (an error: they run until told).
    fn failed(&mut self) -> Option<anyhow::Error> {
        let i = self.tasks.iter().position(|(_, t)| t.is_finished())?;
        let (name, task) = self.tasks.remove(i);
        let outcome = futures::executor::block_on(task);
        Some(match outcome {
            Ok(Ok(())) => anyhow::anyhow!("{name} stopped unexpectedly"),
            Ok(Err(e)) => e.context(format!("{name} failed")),
            Err(e) => anyhow::anyhow!("{name} panicked: {e}"),
        })
    }

    /// Stops the gateway and ingest, lets metering read the usage they emitted as they
    /// stopped (up to 15 s), then stops the rest.
    async fn shut_down(self, stack: &Stack) -> anyhow::Result<()> {
        self.front.cancel();
        let (front, rest): (Vec<_>, Vec<_>) = self
            .tasks
            .into_iter()
            .partition(|(name, _)| matches!(*name, "gateway" | "ingest"));
        let mut first_error = Self::join(front).await;
        let settings = stack.kafka_settings("clisonix-dev-run");
        let usage = vec![stack.topics.name(&clisonix_topics::catalog::USAGE_EVENTS)];
        let caught_up = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while std::time::Instant::now() < deadline {
                let observed = clisonix_topics::lag::observe(
                    &settings,
                    "metering",
                    &usage,
                    Duration::ZERO,
                    Duration::from_secs(1),
                );
                match observed {
                    Ok(lag) if lag.lag == 0 => return true,
                    Err(clisonix_topics::lag::LagError::NoOffsets(_)) | Ok(_) => {}
                    Err(_) => return false,
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            false
        })
        .await
        .unwrap_or(false);
        if !caught_up {
            eprintln!("==> Metering had not read all usage within 15 s; the rest waits in usage.events for its next start");
        }
        self.stop.cancel();
        if let Some(e) = Self::join(rest).await {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Waits for `tasks` to end (30 s each); the first failure.
    async fn join(
        tasks: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
    ) -> Option<anyhow::Error> {
        let mut first_error = None;
        for (name, task) in tasks {
            match tokio::time::timeout(Duration::from_secs(30), task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    first_error.get_or_insert(e.context(format!("{name} failed")));
                }
                Ok(Err(e)) => {
                    first_error.get_or_insert(anyhow::anyhow!("{name} panicked: {e}"));
                }
                Err(_) => {
                    first_error.get_or_insert(anyhow::anyhow!("{name} did not stop within 30 s"));
                }
            }
        }
        first_error
    }
}

/// A tenant signed up through the API, with an ingest and a read key.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub email: String,
    pub password: String,
    pub access_token: String,
    pub ingest_key: String,
    pub read_key: String,
}

/// Signs a new tenant up at the gateway `gateway` (`http://host:port`) and makes its
/// keys, the way a user would.
pub async fn sign_up(gateway: &str, name: &str) -> anyhow::Result<Tenant> {
    let mut c = Client::new(gateway, "")?;
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let email = format!("{name}-{tag}@clisonix.local");
    let password = format!("Dev-{}-run", uuid::Uuid::new_v4().simple());
    let body =
        json!({"email": email, "password": password, "tenant_name": format!("{name} {tag}")});
    let a = c
        .send(
            "POST",
            "/v1/auth/signup",
            Some("application/json"),
            body.to_string().into_bytes(),
            Some(""),
        )
        .await?;
    if a.status != 201 {
        bail!(
            "signing up failed: {} {}",
            a.status,
            String::from_utf8_lossy(&a.body)
        );
    }
    let access_token = a.json()["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mut keys = Vec::new();
    for scope in ["ingest", "read"] {
        keys.push(create_key(gateway, &access_token, &format!("{name} {scope}"), scope).await?);
    }
    let read_key = keys.pop().unwrap_or_default();
    let ingest_key = keys.pop().unwrap_or_default();
    Ok(Tenant {
        email,
        password,
        access_token,
        ingest_key,
        read_key,
    })
}

/// Creates an API key named `name` with one `scope` for the tenant whose admin holds
/// `access_token` (`POST /v1/api-keys`); returns its secret.
pub async fn create_key(
    gateway: &str,
    access_token: &str,
    name: &str,
    scope: &str,
) -> anyhow::Result<String> {
    let mut c = Client::new(gateway, "")?;
    let body = json!({"name": name, "scopes": [scope]});
    let a = c
        .send(
            "POST",
            "/v1/api-keys",
            Some("application/json"),
            body.to_string().into_bytes(),
            Some(access_token),
        )
        .await?;
    if a.status != 201 {
        bail!(
            "creating a key failed: {} {}",
            a.status,
            String::from_utf8_lossy(&a.body)
        );
    }
    Ok(a.json()["key"].as_str().unwrap_or_default().to_owned())
}

/// Moves the tenant whose admin holds `access_token` to the plan `plan_id`, the way
/// an admin would (`PUT /v1/subscription`).
pub async fn choose_plan(gateway: &str, access_token: &str, plan_id: &str) -> anyhow::Result<()> {
    let mut c = Client::new(gateway, "")?;
    let a = c
        .send(
            "PUT",
            "/v1/subscription",
            Some("application/json"),
            json!({ "plan_id": plan_id }).to_string().into_bytes(),
            Some(access_token),
        )
        .await?;
    if a.status != 200 {
        bail!(
            "choosing the plan {plan_id} failed: {} {}",
            a.status,
            String::from_utf8_lossy(&a.body)
        );
    }
    Ok(())
}

/// Runs the main job until it is done (with `exit_when_done`) or `stop` is cancelled.
pub async fn run_pipeline(
    stack: &Stack,
    options: &RunOptions,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let recording = load(&options.file, options.frame_ms)?;
    // A child token: shutting the services down after `--exit-when-done` must not look
    // like the Ctrl-C that `stop` stands for (which exits with 130).
    let mut services = Services::start(stack, options, stop.child_token()).await?;
    let outcome = tokio::select! {
        r = job(&mut services, options, &recording, &stop) => r,
        _ = stop.cancelled() => {
            eprintln!("==> Stopping");
            Ok(())
        }
    };
    let stopped = services.shut_down(stack).await;
    outcome.and(stopped)
}

async fn job(
    services: &mut Services,
    options: &RunOptions,
    recording: &clisonix_player::Recording,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let gateway = format!("http://{}", options.gateway);
    let ingest = format!("http://{}", options.ingest);
    let tenant = sign_up(&gateway, "dev-run").await?;
    // A new tenant starts on free, which renders one audio preset; the run shows both.
    choose_plan(&gateway, &tenant.access_token, "pro").await?;
    let session = SessionId::random();
    let keys = options.out_dir.join("keys.env");
    std::fs::create_dir_all(&options.out_dir)
        .with_context(|| format!("creating {}", options.out_dir.display()))?;
    std::fs::write(
        &keys,
        format!(
            "# The local run's tenant (account {} / {})\nCLISONIX_INGEST_KEY={}\nCLISONIX_READ_KEY={}\nCLISONIX_SESSION={session}\n",
            tenant.email, tenant.password, tenant.ingest_key, tenant.read_key
        ),
    )
    .with_context(|| format!("writing {}", keys.display()))?;
    let seconds = recording.frames.len() as f64 * recording.frame_seconds();
    let key = &tenant.read_key;
    eprintln!(
        "==> Pipeline up: gateway {gateway} (docs {gateway}/docs), ingest {ingest}; Albi, Jona, sessions and the sink running\n\
         ==> Tenant {} signed up; keys in {}\n\
         ==> Streaming {} ({} channels, {} Hz, {seconds:.0} s) as a device, session {session}{}\n\n\
         Watch it live (any WebSocket client):\n  \
           websocat '{}/v1/sessions/{session}/live?access_token={key}'\n\
         Read the features (JSON, NDJSON or CSV; by time, channel and feature):\n  \
           curl -H 'Authorization: Bearer {key}' '{gateway}/v1/sessions/{session}/features?format=csv&channels=Cz,Oz&features=rel_alpha,peak_alpha_hz'\n\
         The session:\n  \
           curl -H 'Authorization: Bearer {key}' {gateway}/v1/sessions/{session}\n",
        tenant.email,
        keys.display(),
        options.file.file_name().unwrap_or_default().to_string_lossy(),
        recording.channels,
        recording.sample_rate_hz,
        if options.speed == 0.0 { ", as fast as possible" } else if options.speed == 1.0 { ", in real time" } else { "" },
        gateway.replace("http://", "ws://"),
    );
    let report = play(
        recording,
        &PlayOptions {
            url: ingest.clone(),
            key: tenant.ingest_key.clone(),
            transport: Transport::WebSocket,
            format: Format::Binary,
            speed: options.speed,
            audio_presets: Some(PRESETS.join(",")),
            end_sessions: true,
            session_ids: vec![session],
            progress: true,
            device_prefix: "dev-run".into(),
            ..PlayOptions::default()
        },
    )
    .await?;
    eprintln!("{}", report.summary());
    if let Some(e) = services.failed() {
        return Err(e);
    }

    // Everything stored: the session ended, every window and chunk in.
    let fs = recording.sample_rate_hz;
    let samples = recording
        .frames
        .iter()
        .map(|f| u64::from(f.samples_per_channel))
        .sum::<u64>();
    let windows = samples / (2.0 * fs).round() as u64;
    let chunks = samples / fs.round() as u64 + 1;
    let started = Instant::now();
    let mut reader = Client::new(&gateway, key)?;
    let detail = loop {
        let a = reader.get(&format!("/v1/sessions/{session}")).await?;
        if a.status == 200 {
            let v = a.json();
            let audio_done = v["audio"].as_array().is_some_and(|a| {
                a.len() == PRESETS.len() && a.iter().all(|p| p["chunks"].as_u64() == Some(chunks))
            });
            if v["status"] == "ended"
                && v["feature_windows"].as_u64() == Some(windows)
                && audio_done
            {
                break v;
            }
        }
        if started.elapsed() > Duration::from_secs(180) {
            bail!("the results did not arrive within 3 minutes of the last frame");
        }
        if let Some(e) = services.failed() {
            return Err(e);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let settled = started.elapsed();
    print_features(&mut reader, session, &detail, settled).await?;
    for preset in PRESETS {
        let a = reader
            .get(&format!("/v1/sessions/{session}/audio?preset={preset}"))
            .await?;
        if a.status != 200 {
            bail!(
                "reading the {preset} audio: {} {}",
                a.status,
                String::from_utf8_lossy(&a.body)
            );
        }
        let path = options.out_dir.join(format!("{session}-{preset}.wav"));
        std::fs::write(&path, &a.body).with_context(|| format!("writing {}", path.display()))?;
        let seconds = (a.body.len() - 44) as f64 / (44_100.0 * 4.0);
        println!("Audio ({preset}, {seconds:.1} s): {}", path.display());
    }
    println!(
        "  or stream it: curl -H 'Authorization: Bearer {key}' -o session.wav '{gateway}/v1/sessions/{session}/audio?preset=parameter_mapping'"
    );
    if options.exit_when_done {
        return Ok(());
    }
    println!("\nThe pipeline keeps serving at {gateway}: Ctrl-C stops everything.");
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                if let Some(e) = services.failed() {
                    return Err(e);
                }
            }
        }
    }
}

/// A few lines about the stored session and its features: enough to see it worked.
async fn print_features(
    reader: &mut Client,
    session: SessionId,
    detail: &Value,
    took: Duration,
) -> anyhow::Result<()> {
    println!(
        "\nDone: session {session}: {} frames ({} channels, {} samples per channel, {} gaps), {} feature windows and {} audio presets stored, all readable {:.1} s after the last frame.",
        detail["frames"],
        detail["channel_labels"].as_array().map_or(0, Vec::len),
        detail["samples_per_channel"],
        detail["seq_gaps"],
        detail["feature_windows"],
        detail["audio"].as_array().map_or(0, Vec::len),
        took.as_secs_f64()
    );
    let a = reader
        .get(&format!(
            "/v1/sessions/{session}/features?channels=Cz,Oz&features=rel_delta,rel_alpha,rel_beta,peak_alpha_hz,spectral_entropy"
        ))
        .await?;
    let rows = a.json()["rows"].as_array().cloned().unwrap_or_default();
    println!(
        "  {:<6} {:>6} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "channel", "window", "delta", "alpha", "beta", "peak Hz", "entropy"
    );
    let pct = |v: &Value| {
        v.as_f64()
            .map_or("-".to_owned(), |v| format!("{:.1} %", 100.0 * v))
    };
    for r in rows.iter().take(6) {
        println!(
            "  {:<6} {:>6} {:>10} {:>10} {:>10} {:>9} {:>9}",
            r["channel_label"].as_str().unwrap_or(""),
            r["window_index"],
            pct(&r["rel_delta"]),
            pct(&r["rel_alpha"]),
            pct(&r["rel_beta"]),
            r["peak_alpha_hz"]
                .as_f64()
                .map_or("-".to_owned(), |v| format!("{v:.0}")),
            r["spectral_entropy"]
                .as_f64()
                .map_or("-".to_owned(), |v| format!("{v:.3}")),
        );
    }
    Ok(())
}

/// The default folder for a run's outputs.
pub fn out_dir(root: &Path) -> PathBuf {
    root.join(".dev").join("run")
}
