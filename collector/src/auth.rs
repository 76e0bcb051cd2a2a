//! Device tokens and admin-token checks.
//!
//! A device token is `pb1.<key id>.<secret>`: the key id (64 random bits,
//! hex) finds the enrolment, the secret (256 random bits, base64url) proves
//! possession. Only SHA-256 of the secret is stored; a fast hash is right
//! here because the secret is full-entropy, not a password. The comparison
//! is constant-time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const PREFIX: &str = "pb1";

/// A freshly generated token: what to give the device and what to store.
pub struct NewToken {
    /// The full token, shown once.
    pub token: String,
    /// Lookup id.
    pub key_id: String,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
}

/// Generates a device token.
pub fn generate() -> NewToken {
    generate_with(PREFIX)
}

/// Prefix of provisioning keys (`pbk1.<id>.<secret>`).
pub const PROVISION_PREFIX: &str = "pbk1";

/// Generates a token with `prefix` (device tokens, provisioning keys).
pub fn generate_with(prefix: &str) -> NewToken {
    let mut rng = rand::rng();
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    let key_id = hex::encode(id);
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
    let secret_sha256 = hex::encode(Sha256::digest(secret.as_bytes()));
    NewToken { token: format!("{prefix}.{key_id}.{secret}"), key_id, secret_sha256 }
}

/// Splits a device token into key id and secret, if it has the right shape.
pub fn parse(token: &str) -> Option<(&str, &str)> {
    parse_with(PREFIX, token)
}

/// Splits a token with `prefix` into key id and secret.
pub fn parse_with<'a>(prefix: &str, token: &'a str) -> Option<(&'a str, &'a str)> {
    let mut parts = token.splitn(3, '.');
    let (p, key_id, secret) = (parts.next()?, parts.next()?, parts.next()?);
    let hex_id = key_id.len() == 16 && key_id.bytes().all(|b| b.is_ascii_hexdigit());
    (p == prefix && hex_id && !secret.is_empty() && secret.len() <= 64).then_some((key_id, secret))
}

/// Whether `secret` hashes to `stored_sha256_hex`, in constant time.
pub fn verify_secret(secret: &str, stored_sha256_hex: &str) -> bool {
    let Ok(stored) = hex::decode(stored_sha256_hex) else { return false };
    let actual = Sha256::digest(secret.as_bytes());
    actual.as_slice().ct_eq(&stored).into()
}

/// Whether `given` equals `expected`, in constant time (admin token).
pub fn tokens_equal(given: &str, expected: &str) -> bool {
    // Hash both so the comparison does not leak the length either.
    Sha256::digest(given.as_bytes()).ct_eq(&Sha256::digest(expected.as_bytes())).into()
}

/// HMAC-SHA-256 (RFC 2104) of `msg` under `key`.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| k.map(|b| b ^ byte);
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(msg).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
}

/// The dashboard's CSRF token for session `sid`: bound to the session and
/// to the admin token, so it cannot be forged without the token and dies
/// with the session. Sent back in the `X-CSRF-Token` header by every
/// state-changing request the dashboard makes.
pub fn csrf_token(admin_token: &str, sid: &str) -> String {
    hex::encode(hmac_sha256(admin_token.as_bytes(), format!("pulsebell csrf {sid}").as_bytes()))
}

/// A new random session id (128 bits, hex).
pub fn new_session_id() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Counts failed authentications per source address and refuses an address
/// that fails too often, so tokens cannot be guessed at line rate.
pub struct Throttle {
    per_minute: u32,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// Addresses remembered at most; beyond it the oldest windows are dropped.
const THROTTLE_TABLE: usize = 65_536;

impl Throttle {
    /// Allows `per_minute` failures per address per minute.
    pub fn new(per_minute: u32) -> Self {
        Throttle { per_minute, failures: Mutex::new(HashMap::new()) }
    }

    /// Whether `ip` is currently refused.
    pub fn is_blocked(&self, ip: IpAddr, now: Instant) -> bool {
        let map = self.failures.lock().expect("throttle lock");
        map.get(&ip)
            .is_some_and(|(start, n)| now.duration_since(*start) < Duration::from_secs(60) && *n >= self.per_minute)
    }

    /// Records one failure from `ip`.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) {
        let mut map = self.failures.lock().expect("throttle lock");
        if map.len() >= THROTTLE_TABLE {
            map.retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(60));
        }
        let entry = map.entry(ip).or_insert((now, 0));
        if now.duration_since(entry.0) >= Duration::from_secs(60) {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test cases 1 and 6 (a key longer than a block).
        let mac = hmac_sha256(&[0x0b; 20], b"Hi There");
        assert_eq!(hex::encode(mac), "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
        let mac = hmac_sha256(&[0xaa; 131], b"Test Using Larger Than Block-Size Key - Hash Key First");
        assert_eq!(hex::encode(mac), "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
        let a = csrf_token("admin", "s1");
        assert_ne!(a, csrf_token("admin", "s2"), "bound to the session");
        assert_ne!(a, csrf_token("other", "s1"), "bound to the admin token");
        assert_ne!(new_session_id(), new_session_id());
    }

    #[test]
    fn tokens_verify_and_differ() {
        let a = generate();
        let b = generate();
        assert_ne!(a.token, b.token);
        let (key_id, secret) = parse(&a.token).unwrap();
        assert_eq!(key_id, a.key_id);
        assert!(verify_secret(secret, &a.secret_sha256));
        assert!(!verify_secret(secret, &b.secret_sha256));
        assert!(!a.token.contains(&a.secret_sha256), "the stored hash is not the token");
        assert!(parse("pb1.short.x").is_none());
        assert!(parse("garbage").is_none());
        assert!(parse(&a.token.replace("pb1", "pb2")).is_none());
    }

    #[test]
    fn bearer_header() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert!(tokens_equal("x", "x"));
        assert!(!tokens_equal("x", "y"));
    }

    #[test]
    fn throttle_blocks_after_the_limit_and_forgets_after_a_minute() {
        let t = Throttle::new(3);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let now = Instant::now();
        for _ in 0..3 {
            assert!(!t.is_blocked(ip, now));
            t.record_failure(ip, now);
        }
        assert!(t.is_blocked(ip, now));
        assert!(!t.is_blocked("10.0.0.2".parse().unwrap(), now));
        assert!(!t.is_blocked(ip, now + Duration::from_secs(61)));
    }
}
