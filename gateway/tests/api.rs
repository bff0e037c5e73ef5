//! The gateway over real HTTP on the real Postgres, a fresh database per test.

mod common;

use std::time::Duration;

use common::{assert_error, token, TestApp};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_up_log_in_refresh_and_log_out() {
    let app = TestApp::spawn().await;
    let tokens = app.signup("  Ada@Example.org ").await;
    assert_eq!(tokens["role"], "owner");
    assert_eq!(tokens["token_type"], "Bearer");
    let me = app.me(tokens["access_token"].as_str().unwrap()).await;
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(me.body["email"], "ada@example.org");
    assert_eq!(me.body["tenant_name"], "Acme Lab");
    assert_eq!(me.body["tenant_id"], tokens["tenant_id"]);

    let login = app
        .post(
            "/v1/auth/login",
            json!({"email": "ADA@example.org", "password": "Correct horse 42"}),
        )
        .await;
    assert_eq!(login.status, 200, "{}", login.body);
    let wrong = app
        .post(
            "/v1/auth/login",
            json!({"email": "ada@example.org", "password": "Wrong horse 42!"}),
        )
        .await;
    assert_error(&wrong, 401, "invalid_credentials");
    let nobody = app
        .post(
            "/v1/auth/login",
            json!({"email": "bob@example.org", "password": "Correct horse 42"}),
        )
        .await;
    assert_error(&nobody, 401, "invalid_credentials");

    let refresh = login.body["refresh_token"].as_str().unwrap();
    let renewed = app
        .post("/v1/auth/refresh", json!({"refresh_token": refresh}))
        .await;
    assert_eq!(renewed.status, 200, "{}", renewed.body);
    assert_ne!(renewed.body["refresh_token"], login.body["refresh_token"]);
    assert_eq!(
        app.me(renewed.body["access_token"].as_str().unwrap())
            .await
            .status,
        200
    );
    let next = renewed.body["refresh_token"].as_str().unwrap();
    let out = app
        .post("/v1/auth/logout", json!({"refresh_token": next}))
        .await;
    assert_eq!(out.status, 204);
    let after = app
        .post("/v1/auth/refresh", json!({"refresh_token": next}))
        .await;
    assert_error(&after, 401, "unauthorized");
    // The sign-up session is a separate family and still works.
    let first = app
        .post(
            "/v1/auth/refresh",
            json!({"refresh_token": tokens["refresh_token"]}),
        )
        .await;
    assert_eq!(first.status, 200);

    assert_eq!(
        app.audit_actions().await,
        ["signup", "login", "login_failed", "login_failed"]
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_refresh_token_revokes_its_family() {
    let app = TestApp::spawn().await;
    let tokens = app.signup("eve@example.org").await;
    let stolen = tokens["refresh_token"].clone();
    let legit = app
        .post("/v1/auth/refresh", json!({"refresh_token": stolen}))
        .await;
    assert_eq!(legit.status, 200);
    let replay = app
        .post("/v1/auth/refresh", json!({"refresh_token": stolen}))
        .await;
    assert_error(&replay, 401, "unauthorized");
    // The legitimate successor is revoked too: the family is burnt.
    let successor = app
        .post(
            "/v1/auth/refresh",
            json!({"refresh_token": legit.body["refresh_token"]}),
        )
        .await;
    assert_error(&successor, 401, "unauthorized");
    assert!(app
        .audit_actions()
        .await
        .contains(&"refresh_token_reused".to_owned()));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_stale_tokens_are_rejected() {
    let app = TestApp::spawn().await;
    let tokens = app.signup("mal@example.org").await;
    let good: Value = {
        let token = tokens["access_token"].as_str().unwrap();
        let payload = token.split('.').nth(1).unwrap();
        serde_json::from_slice(&base64url_decode(payload)).unwrap()
    };
    let secret = app.config.jwt_secret.expose().as_bytes().to_vec();
    let now = good["iat"].as_u64().unwrap();
    let sign = |alg: Algorithm, key: &[u8], claims: &Value| {
        jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(key)).unwrap()
    };
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let none = format!(
        "{}.{}.",
        base64url_encode(br#"{"alg":"none","typ":"JWT"}"#),
        base64url_encode(good.to_string().as_bytes())
    );
    let cases = [
        ("alg none", none),
        ("HS512", sign(Algorithm::HS512, &secret, &good)),
        (
            "wrong key",
            sign(Algorithm::HS256, b"another-secret-another-secret-xx", &good),
        ),
        (
            "expired",
            sign(Algorithm::HS256, &secret, &with("exp", json!(now - 3600))),
        ),
        (
            "not yet valid",
            sign(Algorithm::HS256, &secret, &with("nbf", json!(now + 3600))),
        ),
        (
            "wrong audience",
            sign(
                Algorithm::HS256,
                &secret,
                &with("aud", json!("someone-else")),
            ),
        ),
        (
            "wrong issuer",
            sign(Algorithm::HS256, &secret, &with("iss", json!("evil"))),
        ),
        ("tampered", {
            let t = tokens["access_token"].as_str().unwrap();
            let mut parts: Vec<&str> = t.split('.').collect();
            let forged = base64url_encode(with("role", json!("admin")).to_string().as_bytes());
            parts[1] = &forged;
            parts.join(".")
        }),
        ("garbage", "not.a.token".to_owned()),
    ];
    assert_eq!(
        app.me(&sign(Algorithm::HS256, &secret, &good)).await.status,
        200,
        "the control works"
    );
    for (what, token) in cases {
        let r = app.me(&token).await;
        assert_error(&r, 401, "unauthorized");
        assert!(r.status == 401, "{what}");
    }
    let missing = app.request("GET", "/v1/me", None, &[]).await;
    assert_error(&missing, 401, "unauthorized");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_one_error_shape() {
    let app = TestApp::spawn().await;
    let r = app
        .request("POST", "/v1/auth/signup", Some("{not json"), &[])
        .await;
    assert_error(&r, 400, "invalid_json");
    let r = app
        .post(
            "/v1/auth/signup",
            json!({"email": "a@example.org", "tenant_name": "x"}),
        )
        .await;
    assert_error(&r, 422, "invalid_field");
    assert_eq!(r.body["error"]["field"], "password");
    let r = app
        .post(
            "/v1/auth/signup",
            json!({"email": "a@example.org", "password": "short", "tenant_name": "x"}),
        )
        .await;
    assert_error(&r, 422, "weak_password");
    assert_eq!(r.body["error"]["field"], "password");
    let r = app
        .post(
            "/v1/auth/signup",
            json!({"email": "not-an-email", "password": "Correct horse 42", "tenant_name": "x"}),
        )
        .await;
    assert_error(&r, 422, "invalid_email");
    let big =
        json!({"email": "a@example.org", "password": "x".repeat(100_000), "tenant_name": "x"})
            .to_string();
    let r = app
        .request("POST", "/v1/auth/signup", Some(&big), &[])
        .await;
    assert_error(&r, 413, "body_too_large");
    let r = app
        .request(
            "POST",
            "/v1/auth/login",
            Some("{}"),
            &[("Content-Type", "text/plain")],
        )
        .await;
    assert_error(&r, 415, "unsupported_media_type");
    let r = app
        .request(
            "GET",
            "/v1/nothing-here",
            None,
            &[("x-request-id", "req-42")],
        )
        .await;
    assert_error(&r, 404, "not_found");
    assert_eq!(r.body["error"]["request_id"], "req-42");
    app.signup("dup@example.org").await;
    let r = app.post("/v1/auth/signup", json!({"email": "DUP@example.org", "password": "Correct horse 42", "tenant_name": "Other"})).await;
    assert_error(&r, 409, "email_taken");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_and_metrics() {
    let app = TestApp::spawn().await;
    assert_eq!(app.request("GET", "/health", None, &[]).await.status, 200);
    assert_eq!(app.request("GET", "/ready", None, &[]).await.status, 200);
    app.post(
        "/v1/auth/login",
        json!({"email": "x@example.org", "password": "Correct horse 42"}),
    )
    .await;
    let r = app.request("GET", "/metrics", None, &[]).await;
    let text = r.body.as_str().unwrap_or_default().to_owned();
    assert!(
        text.contains(
            r#"clisonix_api_requests_total{method="POST",route="/v1/auth/login",status="401"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains("clisonix_api_latency_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("clisonix_active_users 0"), "{text}");
    // Business metrics: two signed-up users on the free plan, one moved to pro.
    let a = app.signup("a@example.org").await;
    app.signup("b@example.org").await;
    let r = app
        .authed(
            "PUT",
            "/v1/subscription",
            &token(&a),
            Some(json!({"plan_id": "pro"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let text = app.request("GET", "/metrics", None, &[]).await.body;
    let text = text.as_str().unwrap_or_default();
    assert!(text.contains("clisonix_active_users 2"), "{text}");
    assert!(
        text.contains(r#"clisonix_subscriptions_active{plan="free"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"clisonix_subscriptions_active{plan="pro"} 1"#),
        "{text}"
    );
    app.stop().await;
}

fn base64url_encode(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn base64url_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' => 62,
        _ => 63,
    };
    let mut out = Vec::new();
    let (mut bits, mut n) = (0u32, 0);
    for &c in text.as_bytes() {
        bits = (bits << 6) | u32::from(value(c));
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_shown_once_verified_and_revoked_at_once() {
    let app = TestApp::spawn().await;
    let owner = app.signup("ops@example.org").await;
    let admin = token(&owner);
    let created = app
        .authed(
            "POST",
            "/v1/api-keys",
            &admin,
            Some(json!({"name": "headset 1", "scopes": ["ingest", "read", "ingest"]})),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let key = created.body["key"].as_str().unwrap().to_owned();
    let prefix = created.body["prefix"].as_str().unwrap();
    assert!(key.starts_with(prefix));
    assert_eq!(created.body["scopes"], json!(["ingest", "read"]));
    let list = app.authed("GET", "/v1/api-keys", &admin, None).await;
    assert_eq!(list.status, 200);
    assert_eq!(list.body.as_array().unwrap().len(), 1);
    assert_eq!(list.body[0]["prefix"], prefix);
    assert!(
        !list.body.to_string().contains(&key[12..]),
        "the secret is never listed"
    );
    let stored: Vec<u8> = sqlx::query_scalar("SELECT key_hash FROM api_keys")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_ne!(stored, key.as_bytes(), "only a hash is stored");

    let verifier = clisonix_gateway::keys::KeyVerifier::new(app.pool().clone());
    let verified = verifier.verify(&key).await.unwrap();
    assert_eq!(
        verified.tenant_id.to_string(),
        owner["tenant_id"].as_str().unwrap()
    );
    assert!(verified.allows(clisonix_gateway::keys::Scope::Ingest));
    assert!(!verified.allows(clisonix_gateway::keys::Scope::Admin));
    assert!(matches!(
        verifier.verify("ck_00000000_nope").await,
        Err(clisonix_gateway::keys::KeyError::Unknown)
    ));
    let used: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT last_used_at FROM api_keys")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert!(used.is_some(), "the last use is recorded");

    let id = created.body["id"].as_str().unwrap();
    assert_eq!(
        app.authed("DELETE", &format!("/v1/api-keys/{id}"), &admin, None)
            .await
            .status,
        204
    );
    let revoked_at = std::time::Instant::now();
    loop {
        match verifier.verify(&key).await {
            Err(clisonix_gateway::keys::KeyError::Revoked) => break,
            Ok(_) => assert!(
                revoked_at.elapsed()
                    <= clisonix_gateway::keys::KeyVerifier::CACHE_TTL + Duration::from_millis(200),
                "a revoked key stops working within the cache time"
            ),
            Err(e) => panic!("{e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = app
        .authed("DELETE", &format!("/v1/api-keys/{id}"), &admin, None)
        .await;
    assert_error(&again, 404, "not_found");

    let expiring = app
        .authed(
            "POST",
            "/v1/api-keys",
            &admin,
            Some(json!({"name": "temp", "scopes": ["read"], "expires_in_days": 1})),
        )
        .await;
    let k2 = expiring.body["key"].as_str().unwrap();
    sqlx::query("UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE prefix = $1")
        .bind(expiring.body["prefix"].as_str().unwrap())
        .execute(app.pool())
        .await
        .unwrap();
    let fresh = clisonix_gateway::keys::KeyVerifier::new(app.pool().clone());
    assert!(matches!(
        fresh.verify(k2).await,
        Err(clisonix_gateway::keys::KeyError::Expired)
    ));
    let bad = app
        .authed(
            "POST",
            "/v1/api-keys",
            &admin,
            Some(json!({"name": "x", "scopes": ["root"]})),
        )
        .await;
    assert_error(&bad, 422, "invalid_field");
    assert_eq!(bad.body["error"]["field"], "scopes");

    let audit = app.authed("GET", "/v1/audit", &admin, None).await;
    let actions: Vec<&str> = audit
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "api_key_created",
            "api_key_revoked",
            "api_key_created",
            "signup"
        ]
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_enforced_and_tenants_never_see_each_other() {
    let app = TestApp::spawn().await;
    let a = app.signup("a@example.org").await;
    let b = app.signup("b@example.org").await;
    let key = app
        .authed(
            "POST",
            "/v1/api-keys",
            &token(&a),
            Some(json!({"name": "a's", "scopes": ["read"]})),
        )
        .await;
    let id = key.body["id"].as_str().unwrap();
    // Tenant B sees none of A's keys and cannot touch them: 404, not 403.
    let list = app.authed("GET", "/v1/api-keys", &token(&b), None).await;
    assert_eq!(list.body, json!([]));
    let r = app
        .authed("DELETE", &format!("/v1/api-keys/{id}"), &token(&b), None)
        .await;
    assert_error(&r, 404, "not_found");
    let audit = app.authed("GET", "/v1/audit", &token(&b), None).await;
    assert!(audit
        .body
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["action"] == "signup"));
    assert_eq!(audit.body.as_array().unwrap().len(), 1);

    // A plain member of A's tenant may not manage it.
    sqlx::query(
        "INSERT INTO memberships (tenant_id, user_id, role) VALUES ($1::uuid, $2::uuid, 'member')",
    )
    .bind(a["tenant_id"].as_str().unwrap())
    .bind(b["user_id"].as_str().unwrap())
    .execute(app.pool())
    .await
    .unwrap();
    let member = app
        .post("/v1/auth/login", json!({"email": "b@example.org", "password": "Correct horse 42", "tenant_id": a["tenant_id"]}))
        .await;
    assert_eq!(member.status, 200, "{}", member.body);
    assert_eq!(member.body["role"], "member");
    for (method, path) in [
        ("GET", "/v1/api-keys".to_owned()),
        ("GET", "/v1/audit".to_owned()),
        ("DELETE", format!("/v1/api-keys/{id}")),
    ] {
        let r = app.authed(method, &path, &token(&member.body), None).await;
        assert_error(&r, 403, "forbidden");
    }
    let me = app.me(&token(&member.body)).await;
    assert_eq!(me.body["tenant_id"], a["tenant_id"]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_password_ends_every_session() {
    let app = TestApp::spawn().await;
    let t = app.signup("pw@example.org").await;
    let wrong = app
        .authed(
            "POST",
            "/v1/auth/password",
            &token(&t),
            Some(json!({"current_password": "Nope nope 123", "new_password": "Better horse 43"})),
        )
        .await;
    assert_error(&wrong, 403, "wrong_password");
    let weak = app
        .authed(
            "POST",
            "/v1/auth/password",
            &token(&t),
            Some(json!({"current_password": "Correct horse 42", "new_password": "weak"})),
        )
        .await;
    assert_error(&weak, 422, "weak_password");
    assert_eq!(weak.body["error"]["field"], "new_password");
    let ok = app
        .authed(
            "POST",
            "/v1/auth/password",
            &token(&t),
            Some(
                json!({"current_password": "Correct horse 42", "new_password": "Better horse 43"}),
            ),
        )
        .await;
    assert_eq!(ok.status, 204, "{}", ok.body);
    let old = app
        .post(
            "/v1/auth/refresh",
            json!({"refresh_token": t["refresh_token"]}),
        )
        .await;
    assert_error(&old, 401, "unauthorized");
    let old_pw = app
        .post(
            "/v1/auth/login",
            json!({"email": "pw@example.org", "password": "Correct horse 42"}),
        )
        .await;
    assert_error(&old_pw, 401, "invalid_credentials");
    let new_pw = app
        .post(
            "/v1/auth/login",
            json!({"email": "pw@example.org", "password": "Better horse 43"}),
        )
        .await;
    assert_eq!(new_pw.status, 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_in_attempts_are_rate_limited() {
    let app = TestApp::spawn_with(|c| c.login_attempts_per_account = 3).await;
    app.signup("rl@example.org").await;
    for _ in 0..3 {
        let r = app
            .post(
                "/v1/auth/login",
                json!({"email": "rl@example.org", "password": "Guess guess 99"}),
            )
            .await;
        assert_error(&r, 401, "invalid_credentials");
    }
    let r = app
        .post(
            "/v1/auth/login",
            json!({"email": "RL@example.org", "password": "Correct horse 42"}),
        )
        .await;
    assert_error(&r, 429, "too_many_attempts");
    let other = app
        .post(
            "/v1/auth/login",
            json!({"email": "someone@example.org", "password": "Correct horse 42"}),
        )
        .await;
    assert_error(&other, 401, "invalid_credentials");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invitations_and_role_changes_are_audited() {
    let app = TestApp::spawn().await;
    let owner = app.signup("boss@example.org").await;
    let other = app.signup("solo@example.org").await;
    let invite = app
        .authed(
            "POST",
            "/v1/invitations",
            &token(&owner),
            Some(json!({"email": "New.Hire@example.org", "role": "premium"})),
        )
        .await;
    assert_eq!(invite.status, 201, "{}", invite.body);
    let inv = invite.body["token"].as_str().unwrap().to_owned();
    let weak = app
        .post(
            "/v1/auth/accept-invitation",
            json!({"token": inv, "password": "weak"}),
        )
        .await;
    assert_error(&weak, 422, "weak_password");
    let joined = app
        .post(
            "/v1/auth/accept-invitation",
            json!({"token": inv, "password": "Fresh start 2026"}),
        )
        .await;
    assert_eq!(joined.status, 200, "{}", joined.body);
    assert_eq!(joined.body["role"], "premium");
    assert_eq!(joined.body["tenant_id"], owner["tenant_id"]);
    let again = app
        .post(
            "/v1/auth/accept-invitation",
            json!({"token": inv, "password": "Fresh start 2026"}),
        )
        .await;
    assert_error(&again, 410, "invitation_used");
    let unknown = app
        .post(
            "/v1/auth/accept-invitation",
            json!({"token": "inv_nope", "password": "Fresh start 2026"}),
        )
        .await;
    assert_error(&unknown, 404, "not_found");

    // An existing account joins a second tenant with its own password.
    let second = app
        .authed(
            "POST",
            "/v1/invitations",
            &token(&owner),
            Some(json!({"email": "solo@example.org", "role": "member"})),
        )
        .await;
    let wrong = app
        .post(
            "/v1/auth/accept-invitation",
            json!({"token": second.body["token"], "password": "Wrong pass 123"}),
        )
        .await;
    assert_error(&wrong, 401, "invalid_credentials");
    let ok = app
        .post(
            "/v1/auth/accept-invitation",
            json!({"token": second.body["token"], "password": "Correct horse 42"}),
        )
        .await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.body["role"], "member");

    let members = app.authed("GET", "/v1/members", &token(&owner), None).await;
    assert_eq!(members.body.as_array().unwrap().len(), 3);
    let new_hire = joined.body["user_id"].as_str().unwrap();
    let promote = app
        .authed(
            "PUT",
            &format!("/v1/members/{new_hire}"),
            &token(&owner),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(promote.status, 204, "{}", promote.body);
    let owner_id = owner["user_id"].as_str().unwrap();
    let demote_owner = app
        .authed(
            "PUT",
            &format!("/v1/members/{owner_id}"),
            &token(&owner),
            Some(json!({"role": "member"})),
        )
        .await;
    assert_error(&demote_owner, 404, "not_found");
    let grant_owner = app
        .authed(
            "PUT",
            &format!("/v1/members/{new_hire}"),
            &token(&owner),
            Some(json!({"role": "owner"})),
        )
        .await;
    assert_error(&grant_owner, 422, "invalid_field");
    // Another tenant's admin cannot see or change these members.
    let foreign = app
        .authed(
            "PUT",
            &format!("/v1/members/{new_hire}"),
            &token(&other),
            Some(json!({"role": "member"})),
        )
        .await;
    assert_error(&foreign, 404, "not_found");
    let foreign_list = app.authed("GET", "/v1/members", &token(&other), None).await;
    assert_eq!(foreign_list.body.as_array().unwrap().len(), 1);

    let audit = app.authed("GET", "/v1/audit", &token(&owner), None).await;
    let actions: Vec<&str> = audit
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "role_changed",
            "invitation_accepted",
            "invitation_created",
            "invitation_accepted",
            "invitation_created",
            "signup"
        ]
    );
    assert_eq!(
        audit.body[0]["detail"],
        json!({"user_id": new_hire, "from": "premium", "to": "admin"})
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_every_route() {
    let app = TestApp::spawn().await;
    let r = app.request("GET", "/openapi.json", None, &[]).await;
    assert_eq!(r.status, 200);
    let doc = &r.body;
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let mut documented: Vec<String> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    documented.sort();
    // Every route the router serves (docs and the document itself aside).
    let mut served = vec![
        "POST /v1/auth/signup",
        "POST /v1/auth/login",
        "POST /v1/auth/refresh",
        "POST /v1/auth/logout",
        "POST /v1/auth/password",
        "POST /v1/auth/accept-invitation",
        "GET /v1/me",
        "POST /v1/api-keys",
        "GET /v1/api-keys",
        "DELETE /v1/api-keys/{id}",
        "GET /v1/audit",
        "GET /v1/members",
        "PUT /v1/members/{user_id}",
        "POST /v1/invitations",
        "GET /v1/sessions",
        "GET /v1/sessions/{id}",
        "GET /v1/sessions/{id}/features",
        "GET /v1/sessions/{id}/audio",
        "GET /v1/sessions/{id}/audio/chunks/{chunk_index}",
        "GET /v1/sessions/{id}/live",
        "GET /v1/plans",
        "GET /v1/subscription",
        "PUT /v1/subscription",
        "GET /v1/usage",
        "GET /v1/usage/sessions/{id}",
        "GET /v1/billing/invoices",
        "GET /v1/billing/invoices/{id}",
        "POST /v1/billing/checkout",
        "POST /v1/billing/portal",
        "POST /v1/billing/stripe/webhook",
        "POST /v1/webhooks",
        "GET /v1/webhooks",
        "DELETE /v1/webhooks/{id}",
        "GET /v1/webhooks/{id}/deliveries",
        "POST /v1/webhooks/{id}/deliveries/{event_id}/replay",
        "GET /health",
        "GET /ready",
        "GET /metrics",
    ];
    served.sort();
    assert_eq!(documented, served);
    // Every documented route exists (answers something other than the 404 fallback).
    for route in &served {
        let (method, path) = route.split_once(' ').unwrap();
        let path = path
            .replace("{id}", "00000000-0000-4000-8000-000000000000")
            .replace("{user_id}", "00000000-0000-4000-8000-000000000000")
            .replace("{event_id}", "00000000-0000-4000-8000-000000000000");
        let r = app.request(method, &path, Some("{}"), &[]).await;
        assert_ne!(r.body["error"]["code"], "not_found", "{route} is served");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    let docs = app.request("GET", "/docs", None, &[]).await;
    assert_eq!(docs.status, 200);
    assert!(docs.body.as_str().unwrap().contains("/openapi.json"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn premium_callers_get_a_higher_request_rate_within_their_plan() {
    let app = TestApp::spawn().await;
    let owner = app.signup("rich@example.org").await;
    let basic = app.signup("basic@example.org").await;
    // The tenants' plan sets the rates: 5 a minute for members, 50 for premium callers.
    app.add_private_plan("slow", 5, 50).await;
    sqlx::query("UPDATE subscriptions SET plan_id = 'slow', plan_version = 1")
        .execute(app.pool())
        .await
        .unwrap();
    // Make "basic" a plain member of its own tenant.
    sqlx::query("UPDATE memberships SET role = 'member' WHERE user_id = $1::uuid")
        .bind(basic["user_id"].as_str().unwrap())
        .execute(app.pool())
        .await
        .unwrap();
    let member = app
        .post(
            "/v1/auth/login",
            json!({"email": "basic@example.org", "password": "Correct horse 42"}),
        )
        .await;
    assert_eq!(member.body["role"], "member");
    for _ in 0..5 {
        assert_eq!(app.me(&token(&member.body)).await.status, 200);
    }
    let limited = app.me(&token(&member.body)).await;
    assert_error(&limited, 429, "rate_limited");
    assert!(
        limited.headers.contains("retry-after: "),
        "{}",
        limited.headers
    );
    for _ in 0..12 {
        assert_eq!(
            app.me(&token(&owner)).await.status,
            200,
            "premium (owner) callers go on"
        );
    }
    app.stop().await;
}
