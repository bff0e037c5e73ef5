//! Gateway figures: log-in latency (p50, p99; argon2id dominates by design) and
//! requests/s of an authenticated GET over keep-alive connections. Needs a Postgres:
//! `./dev up && eval "$(./dev env)"`.
//!
//! Run: `cargo bench -p clisonix-gateway --bench api`

use std::time::{Duration, Instant};

use clisonix_e2e::TestEnv;
use clisonix_gateway::{Application, Config};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    stream: BufReader<TcpStream>,
}

impl Conn {
    async fn open(addr: &str) -> Conn {
        Conn {
            stream: BufReader::new(TcpStream::connect(addr).await.unwrap()),
        }
    }

    async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: &str,
        bearer: Option<&str>,
    ) -> (u16, String) {
        let auth = bearer
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: b\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.stream
            .get_mut()
            .write_all(req.as_bytes())
            .await
            .unwrap();
        let mut status = String::new();
        self.stream.read_line(&mut status).await.unwrap();
        let code = status.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut length = 0;
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).await.unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await.unwrap();
        (code, String::from_utf8(body).unwrap())
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let env = TestEnv::get();
        let db = env.fresh_database().await;
        let mut config = Config::defaults();
        config.database_url = clisonix_gateway::config::Secret::new(db.url());
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.login_attempts_per_account = usize::MAX;
        config.login_attempts_per_ip = usize::MAX;
        // Measure the API, not the rate limiter.
        config.requests_per_minute_premium = u32::MAX;
        let app = Application::build(config).await.unwrap();
        let addr = format!("127.0.0.1:{}", app.port());
        let stop = CancellationToken::new();
        tokio::spawn(app.run_until_stopped(stop.clone()));

        let mut c = Conn::open(&addr).await;
        let signup = r#"{"email":"bench@example.org","password":"Correct horse 42","tenant_name":"Bench"}"#;
        let (code, body) = c.call("POST", "/v1/auth/signup", signup, None).await;
        assert_eq!(code, 201, "{body}");
        let login = r#"{"email":"bench@example.org","password":"Correct horse 42"}"#;
        let mut times = Vec::new();
        let mut token = String::new();
        for _ in 0..60 {
            let t = Instant::now();
            let (code, body) = c.call("POST", "/v1/auth/login", login, None).await;
            times.push(t.elapsed());
            assert_eq!(code, 200);
            token = body.split("\"access_token\":\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
        }
        times.sort();
        println!(
            "login (argon2id, default parameters): p50 {:.1} ms, p99 {:.1} ms over {} logins",
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            percentile(&times, 0.99).as_secs_f64() * 1e3,
            times.len()
        );

        let clients = 16;
        let run_for = Duration::from_secs(5);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (addr, token) = (addr.clone(), token.clone());
            tasks.push(tokio::spawn(async move {
                let mut c = Conn::open(&addr).await;
                let mut latencies = Vec::new();
                while start.elapsed() < run_for {
                    let t = Instant::now();
                    let (code, _) = c.call("GET", "/v1/me", "", Some(&token)).await;
                    assert_eq!(code, 200);
                    latencies.push(t.elapsed());
                }
                latencies
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let elapsed = start.elapsed();
        all.sort();
        println!(
            "GET /v1/me (JWT check + one indexed join), {clients} keep-alive clients: {:.0} requests/s, p50 {:.2} ms, p99 {:.2} ms",
            all.len() as f64 / elapsed.as_secs_f64(),
            percentile(&all, 0.5).as_secs_f64() * 1e3,
            percentile(&all, 0.99).as_secs_f64() * 1e3
        );
        stop.cancel();
        db.drop_now().await;
    });
}
