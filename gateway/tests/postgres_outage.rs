//! Postgres stops and comes back: while it is away the gateway answers at once with a
//! retryable 503 (never hangs a request), and it serves again within a couple of
//! seconds of Postgres's return. A private cluster of its own (the cached server, on a
//! free port), so stopping it disturbs no other test.

mod common;

use std::time::{Duration, Instant};

use clisonix_dev::postgres::Postgres;
use clisonix_e2e::{free_port, TestEnv};
use clisonix_gateway::{Application, Config};
use common::{token, TestApp};
use tokio_util::sync::CancellationToken;

/// Stops the private cluster and deletes it however the test ends.
struct ClusterGuard(Postgres, std::path::PathBuf);

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        let _ = self.0.stop();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_postgres_outage_the_gateway_serves_again_within_seconds() {
    let dir = std::env::temp_dir().join(TestEnv::unique("clisonix-outage-pg"));
    let pg = Postgres::Private {
        dir: dir.clone(),
        port: free_port(),
    };
    let _guard = ClusterGuard(pg.clone(), dir);
    let p = pg.clone();
    blocking(move || p.start())
        .await
        .expect("the private Postgres starts");
    pg.prepare(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations"))
        .await
        .expect("the database is prepared");

    let mut config = Config::defaults();
    config.database_url = clisonix_gateway::config::Secret::new(pg.url());
    config.listen = "127.0.0.1:0".parse().unwrap();
    let app = Application::build(config.clone()).await.unwrap();
    let addr = format!("127.0.0.1:{}", app.port());
    let stop = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(stop.clone()));
    let gateway = TestApp {
        addr,
        db: None,
        stop,
        config,
    };
    let access = token(&gateway.signup("outage@example.com").await);
    assert_eq!(gateway.me(&access).await.status, 200);

    let p = pg.clone();
    blocking(move || p.stop()).await.unwrap();
    // Away: refused at once, retryably.
    for path in ["/v1/me", "/ready"] {
        let asked = Instant::now();
        let r = gateway
            .request(
                "GET",
                path,
                None,
                &[("Authorization", &format!("Bearer {access}"))],
            )
            .await;
        assert_eq!(r.status, 503, "{path}: {}", r.body);
        assert!(
            asked.elapsed() < Duration::from_secs(3),
            "{path} took {:?} to answer",
            asked.elapsed()
        );
    }

    let p = pg.clone();
    blocking(move || p.start()).await.unwrap();
    let back = Instant::now();
    let (mut me, mut ready) = (None, None);
    while me.is_none() || ready.is_none() {
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "not serving 30 s after Postgres came back"
        );
        if me.is_none() && gateway.me(&access).await.status == 200 {
            me = Some(back.elapsed());
        }
        if ready.is_none() && gateway.request("GET", "/ready", None, &[]).await.status == 200 {
            ready = Some(back.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (me, ready) = (me.unwrap(), ready.unwrap());
    println!("serving again {me:?} (ready {ready:?}) after Postgres came back");
    assert!(me < Duration::from_secs(2), "serving again after {me:?}");
    assert!(
        ready < Duration::from_secs(2),
        "ready again after {ready:?}"
    );
}
