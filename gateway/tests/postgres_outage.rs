//! Postgres stops and comes back: while it is away the gateway answers at once with a
//! retryable 503 (never hangs a request), and it serves again within a couple of
//! seconds of Postgres's return. A private cluster of its own (the cached server, on a
//! free port), so stopping it disturbs no other test.

mod common;

use std::time::{Duration, Instant};

use clisonix_dev::postgres::PrivatePostgres;
use clisonix_gateway::{Application, Config};
use common::{token, TestApp};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_postgres_outage_the_gateway_serves_again_within_seconds() {
    let pg = PrivatePostgres::start(clisonix_e2e::free_port()).await;

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

    pg.down().await;
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

    pg.up().await;
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
