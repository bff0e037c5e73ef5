//! Signed webhooks, both ways, HMAC-SHA256 with comparisons in constant time.
//!
//! - **Stripe, in** ([`verify_stripe`]): the `Stripe-Signature` header is
//!   `t=<unix seconds>,v1=<hex>[,v1=<hex>…]`, each `v1` the HMAC of `"{t}.{raw body}"`
//!   under one of the endpoint's secrets (several while a secret rotates). A delivery
//!   passes when some `v1` matches some configured secret and `t` is within the
//!   tolerance of now; nothing of the body is read before.
//! - **Standard Webhooks, out** ([`sign_standard`]): `webhook-signature: v1,<base64 HMAC
//!   of "{id}.{timestamp}.{body}">` under the endpoint's secret (`whsec_<base64 key>`).

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// How far a Stripe signature's time may be from now (Stripe's libraries' default).
pub const STRIPE_TOLERANCE_SECONDS: i64 = 300;

/// Why a delivery's signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no Stripe-Signature header")]
    Missing,
    #[error("the Stripe-Signature header is malformed (expected t=…,v1=…)")]
    Malformed,
    #[error(
        "the signature's time is {0} s from now, beyond the {STRIPE_TOLERANCE_SECONDS} s tolerance"
    )]
    Stale(i64),
    #[error("no signature matches the endpoint's secrets")]
    Mismatch,
}

/// Checks a Stripe delivery; answers its signature time.
pub fn verify_stripe(
    header: Option<&str>,
    body: &[u8],
    secrets: &[String],
    now_unix: i64,
) -> Result<i64, SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed)?;
        match k {
            "t" => t = Some(v.parse::<i64>().map_err(|_| SignatureError::Malformed)?),
            "v1" => v1.push(hex::decode(v).map_err(|_| SignatureError::Malformed)?),
            _ => {} // other schemes (v0) are not ours to check
        }
    }
    let t = t.ok_or(SignatureError::Malformed)?;
    if v1.is_empty() {
        return Err(SignatureError::Malformed);
    }
    let skew = (now_unix - t).abs();
    if skew > STRIPE_TOLERANCE_SECONDS {
        return Err(SignatureError::Stale(now_unix - t));
    }
    for secret in secrets {
        let mac = |sig: &[u8]| {
            let mut m = HmacSha256::new_from_slice(secret.as_bytes()).expect("any key length");
            m.update(t.to_string().as_bytes());
            m.update(b".");
            m.update(body);
            m.verify_slice(sig).is_ok()
        };
        if v1.iter().any(|sig| mac(sig)) {
            return Ok(t);
        }
    }
    Err(SignatureError::Mismatch)
}

/// A new endpoint secret: `whsec_` and the base64 of 32 random bytes.
pub fn new_secret() -> String {
    use base64::Engine;
    let mut key = Vec::with_capacity(32);
    key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// The `webhook-signature` of a Standard Webhooks delivery: `v1,<base64 HMAC-SHA256 of
/// "{id}.{timestamp}.{body}">` under the key in `secret` (`whsec_<base64>`; a secret
/// without the prefix is used as it is).
pub fn sign_standard(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = secret
        .strip_prefix("whsec_")
        .and_then(|k| b64.decode(k).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec());
    let mut m = HmacSha256::new_from_slice(&key).expect("any key length");
    m.update(format!("{id}.{timestamp}.").as_bytes());
    m.update(body);
    format!("v1,{}", b64.encode(m.finalize().into_bytes()))
}

/// A Stripe signature header for `body` at `t` under `secret` (tests and tools).
pub fn stripe_header(secret: &str, t: i64, body: &[u8]) -> String {
    let mut m = HmacSha256::new_from_slice(secret.as_bytes()).expect("any key length");
    m.update(format!("{t}.").as_bytes());
    m.update(body);
    format!("t={t},v1={}", hex::encode(m.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_signatures_match_the_specifications_example() {
        // The example of the Standard Webhooks specification (and of svix's libraries).
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign_standard(secret, id, 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let s = new_secret();
        assert!(s.starts_with("whsec_") && s.len() == 6 + 44, "{s}");
        assert_ne!(s, new_secret());
    }

    const BODY: &[u8] = br#"{"id":"evt_1","type":"invoice.paid"}"#;

    #[test]
    fn a_stripe_signature_passes_only_with_a_secret_in_time_and_untouched() {
        let secrets = vec!["whsec_new".to_owned(), "whsec_old".to_owned()];
        let now = 1_800_000_000;
        let good = stripe_header("whsec_old", now - 10, BODY);
        assert_eq!(
            verify_stripe(Some(&good), BODY, &secrets, now),
            Ok(now - 10)
        );
        // While a secret rotates Stripe signs with both; one match is enough.
        let both = format!("{good},v1={}", "00".repeat(32));
        assert!(verify_stripe(Some(&both), BODY, &secrets, now).is_ok());
        let wrong = stripe_header("whsec_other", now, BODY);
        assert_eq!(
            verify_stripe(Some(&wrong), BODY, &secrets, now),
            Err(SignatureError::Mismatch)
        );
        let tampered = br#"{"id":"evt_1","type":"invoice.paid "}"#;
        assert_eq!(
            verify_stripe(Some(&good), tampered, &secrets, now),
            Err(SignatureError::Mismatch)
        );
        let stale = stripe_header("whsec_new", now - 301, BODY);
        assert_eq!(
            verify_stripe(Some(&stale), BODY, &secrets, now),
            Err(SignatureError::Stale(301))
        );
        for bad in ["", "t=1", "v1=00", "t=x,v1=00", "t=1,v1=zz", "garbage"] {
            assert_eq!(
                verify_stripe(Some(bad), BODY, &secrets, now),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
        assert_eq!(
            verify_stripe(None, BODY, &secrets, now),
            Err(SignatureError::Missing)
        );
    }
}
