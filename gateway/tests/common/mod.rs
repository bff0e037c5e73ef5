//! The gateway's test harness: the real gateway over real HTTP on the real Postgres,
//! a fresh database per test.

#![allow(dead_code)]

use std::time::Duration;

use clisonix_e2e::{TestDatabase, TestEnv};
use clisonix_gateway::{Application, Config};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

pub struct TestApp {
    pub addr: String,
    pub db: Option<TestDatabase>,
    pub stop: CancellationToken,
    pub config: Config,
}

pub struct Reply {
    pub status: u16,
    pub headers: String,
    pub body: Value,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
        let env = TestEnv::get();
        let db = env.fresh_database().await;
        let mut config = Config::defaults();
        adjust(&mut config);
        config.database_url = clisonix_gateway::config::Secret::new(db.url());
        config.listen = "127.0.0.1:0".parse().unwrap();
        let app = Application::build(config.clone())
            .await
            .expect("the gateway builds");
        let addr = format!("127.0.0.1:{}", app.port());
        let stop = CancellationToken::new();
        tokio::spawn(app.run_until_stopped(stop.clone()));
        TestApp {
            addr,
            db: Some(db),
            stop,
            config,
        }
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut stream = tokio::net::TcpStream::connect(&self.addr).await.unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        let body = body.unwrap_or("");
        if !body.is_empty()
            && !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut raw))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        // Bodies come with a Content-Length here (no chunking for these small replies).
        let body = serde_json::from_str(rest).unwrap_or(Value::String(rest.to_owned()));
        Reply {
            status,
            headers: head.to_lowercase(),
            body,
        }
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.request("POST", path, Some(&body.to_string()), &[])
            .await
    }

    pub async fn authed(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> Reply {
        let body = body.map(|b| b.to_string());
        self.request(
            method,
            path,
            body.as_deref(),
            &[("Authorization", &format!("Bearer {token}"))],
        )
        .await
    }

    pub fn pool(&self) -> &sqlx::PgPool {
        &self.db.as_ref().unwrap().pool
    }

    pub async fn me(&self, token: &str) -> Reply {
        self.request(
            "GET",
            "/v1/me",
            None,
            &[("Authorization", &format!("Bearer {token}"))],
        )
        .await
    }

    pub async fn signup(&self, email: &str) -> Value {
        let r = self
            .post(
                "/v1/auth/signup",
                json!({"email": email, "password": "Correct horse 42", "tenant_name": "Acme Lab"}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        r.body
    }

    /// Adds a plan that is not public, with these request rates (members, premium)
    /// and no meters.
    pub async fn add_private_plan(&self, plan_id: &str, member: i32, premium: i32) {
        sqlx::query(
            "INSERT INTO plans (plan_id, version, name, currency, base_fee_minor, requests_per_minute_member, \
             requests_per_minute_premium, audio_presets, retention_days, public) \
             VALUES ($1, 1, $1, 'EUR', 0, $2, $3, '{}', 1, false)",
        )
        .bind(plan_id)
        .bind(member)
        .bind(premium)
        .execute(self.pool())
        .await
        .unwrap();
    }

    pub async fn audit_actions(&self) -> Vec<String> {
        sqlx::query_scalar("SELECT action FROM audit_log ORDER BY id")
            .fetch_all(&self.db.as_ref().unwrap().pool)
            .await
            .unwrap()
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(db) = self.db.take() {
            db.drop_now().await;
        }
    }
}

pub fn assert_error(r: &Reply, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    assert_eq!(r.body["error"]["code"], code, "{}", r.body);
    let id = r.body["error"]["request_id"].as_str().unwrap();
    assert!(
        !id.is_empty() && r.headers.contains(&format!("x-request-id: {id}")),
        "{}",
        r.headers
    );
}

pub fn token(v: &Value) -> String {
    v["access_token"].as_str().unwrap().to_owned()
}
