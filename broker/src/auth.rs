//! Credentials: argon2id hashes of client secrets and admin tokens, their
//! verification, and the rate limit on failed attempts.
//!
//! Invariants:
//! - Development mode admits anonymous peers on loopback addresses only
//!   ([`admits_anonymous`]).
//! - Only argon2id PHC strings are accepted as stored credentials; a
//!   plaintext secret in the configuration is a start-up error.
//! - A presented secret is compared with argon2 (whose output comparison is
//!   constant time) the first time; once verified it is remembered in memory
//!   and later presentations are compared with [`constant_time_eq`], so a
//!   reconnecting client does not pay 20+ ms of argon2 each time.
//! - An address with [`MAX_FAILURES_PER_WINDOW`] failures in the current
//!   [`FAILURE_WINDOW`] is refused before any check, until the window ends:
//!   per address for admin tokens, per (address, client id) for HELLO, so
//!   one misconfigured client does not lock out the others on its host.
//!   The table is bounded ([`MAX_TRACKED_ADDRESSES`]).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// Failures allowed per address per window.
pub const MAX_FAILURES_PER_WINDOW: u32 = 10;
/// The window of the failure count.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at most; beyond it the oldest windows are dropped.
pub const MAX_TRACKED_ADDRESSES: usize = 10_000;
/// Verified secrets remembered per credential set.
const MAX_REMEMBERED: usize = 1024;

/// A secret that cannot be hashed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Empty secret.
    #[error("the secret is empty")]
    Empty,
    /// argon2 failed.
    #[error("hashing failed: {0}")]
    Hash(String),
}

/// Hashes `secret` as an argon2id PHC string with a random salt: what goes
/// into the configuration.
pub fn hash_secret(secret: &str) -> Result<String, AuthError> {
    if secret.is_empty() {
        return Err(AuthError::Empty);
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// Checks that `hash` is an argon2id PHC string.
pub fn check_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash)
        .map_err(|e| format!("not an argon2id hash ({e}); secrets are stored hashed"))?;
    if parsed.algorithm.as_str() != "argon2id" {
        return Err(format!(
            "hash algorithm {:?} is not argon2id",
            parsed.algorithm.as_str()
        ));
    }
    Ok(())
}

fn verify(hash: &str, secret: &[u8]) -> bool {
    PasswordHash::new(hash)
        .is_ok_and(|parsed| Argon2::default().verify_password(secret, &parsed).is_ok())
}

/// Whether development mode admits an anonymous peer at `address`: only a
/// local one (loopback), even if the broker listens on a public address.
pub fn admits_anonymous(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Compares secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The outcome of a credential check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted.
    Admitted,
    /// Wrong or unknown credential.
    Refused,
    /// Too many failures from this address: not even checked.
    RateLimited,
}

/// Failed attempts per address.
#[derive(Debug, Default)]
pub struct FailedAttempts {
    windows: Mutex<HashMap<(IpAddr, String), (Instant, u32)>>,
}

impl FailedAttempts {
    /// True if `address` may try now as `who`.
    pub fn allowed(&self, address: IpAddr, who: &str, now: Instant) -> bool {
        let windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        match windows.get(&(address, who.to_string())) {
            Some((start, failures)) => {
                now.duration_since(*start) >= FAILURE_WINDOW || *failures < MAX_FAILURES_PER_WINDOW
            }
            None => true,
        }
    }

    /// Counts a failure of `address` as `who`.
    pub fn record_failure(&self, address: IpAddr, who: &str, now: Instant) {
        let key = (address, who.to_string());
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() >= MAX_TRACKED_ADDRESSES && !windows.contains_key(&key) {
            windows.retain(|_, (start, _)| now.duration_since(*start) < FAILURE_WINDOW);
            if windows.len() >= MAX_TRACKED_ADDRESSES {
                // Still full of live windows: forget the oldest.
                if let Some(oldest) = windows
                    .iter()
                    .min_by_key(|(_, (start, _))| *start)
                    .map(|(key, _)| key.clone())
                {
                    windows.remove(&oldest);
                }
            }
        }
        let entry = windows.entry(key).or_insert((now, 0));
        if now.duration_since(entry.0) >= FAILURE_WINDOW {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

/// Verified secrets, remembered so that they are not hashed again.
#[derive(Debug, Default)]
struct Remembered {
    entries: Mutex<Vec<(String, Vec<u8>)>>,
}

impl Remembered {
    fn contains(&self, who: &str, secret: &[u8]) -> bool {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        // Compare against every entry so the time does not depend on which
        // one matched.
        entries.iter().fold(false, |found, (name, known)| {
            found | (name == who && constant_time_eq(known, secret))
        })
    }

    fn insert(&self, who: &str, secret: &[u8]) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_REMEMBERED {
            entries.remove(0);
        }
        entries.push((who.to_string(), secret.to_vec()));
    }
}

/// Client ids and admin tokens, with the failure rate limit.
#[derive(Debug, Default)]
pub struct Credentials {
    clients: BTreeMap<String, String>,
    admin_tokens: Vec<String>,
    remembered_clients: Remembered,
    remembered_tokens: Remembered,
    failures: FailedAttempts,
}

impl Credentials {
    /// Credentials from the configured hashes.
    pub fn new(clients: BTreeMap<String, String>, admin_tokens: Vec<String>) -> Credentials {
        Credentials {
            clients,
            admin_tokens,
            ..Credentials::default()
        }
    }

    /// Checks a client's HELLO. Runs argon2 (tens of ms) unless this secret
    /// was verified before: call it off the async threads.
    pub fn verify_client(&self, address: IpAddr, client_id: &str, secret: &[u8]) -> Verdict {
        let hashes = self.clients.get(client_id).into_iter();
        check(
            &self.failures,
            &self.remembered_clients,
            address,
            client_id,
            secret,
            hashes,
        )
    }

    /// Checks an admin token. Same cost and rules as
    /// [`verify_client`](Self::verify_client).
    pub fn verify_admin(&self, address: IpAddr, token: &[u8]) -> Verdict {
        let hashes = self.admin_tokens.iter();
        check(
            &self.failures,
            &self.remembered_tokens,
            address,
            ADMIN,
            token,
            hashes,
        )
    }
}

/// The rules of every credential check: the rate limit first, then a
/// secret verified before, then argon2 against `hashes` (remembered on
/// success, counted as a failure otherwise). `remembered` is per kind of
/// credential, so a secret of one kind never admits as the other.
fn check<'a>(
    failures: &FailedAttempts,
    remembered: &Remembered,
    address: IpAddr,
    who: &str,
    secret: &[u8],
    mut hashes: impl Iterator<Item = &'a String>,
) -> Verdict {
    let now = Instant::now();
    if !failures.allowed(address, who, now) {
        return Verdict::RateLimited;
    }
    if remembered.contains(who, secret) {
        return Verdict::Admitted;
    }
    if hashes.any(|hash| verify(hash, secret)) {
        remembered.insert(who, secret);
        Verdict::Admitted
    } else {
        failures.record_failure(address, who, now);
        Verdict::Refused
    }
}

/// The failure-count key of admin tokens (client ids are never empty
/// there: HELLO's client id is counted as given, and no client is named
/// this).
const ADMIN: &str = "\0admin";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn development_mode_admits_local_peers_only() {
        for local in ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"] {
            assert!(admits_anonymous(local.parse().unwrap()), "{local}");
        }
        for remote in [
            "10.0.0.1",
            "192.168.1.5",
            "::ffff:10.0.0.1",
            "2001:db8::1",
            "0.0.0.0",
        ] {
            assert!(!admits_anonymous(remote.parse().unwrap()), "{remote}");
        }
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }

    #[test]
    fn hashes_are_salted_argon2id_and_verify() {
        let a = hash_secret("hunter2").unwrap();
        let b = hash_secret("hunter2").unwrap();
        assert_ne!(a, b, "a random salt per hash");
        assert!(a.starts_with("$argon2id$"));
        check_hash(&a).unwrap();
        assert!(check_hash("hunter2").is_err(), "plaintext is refused");
        assert!(hash_secret("").is_err());
        let mut clients = BTreeMap::new();
        clients.insert("orders".to_string(), a);
        let credentials = Credentials::new(clients, vec![b]);
        let address: IpAddr = [127, 0, 0, 1].into();
        assert_eq!(
            credentials.verify_client(address, "orders", b"hunter2"),
            Verdict::Admitted
        );
        // Remembered now; still exact.
        assert_eq!(
            credentials.verify_client(address, "orders", b"hunter2"),
            Verdict::Admitted
        );
        assert_eq!(
            credentials.verify_client(address, "orders", b"hunter3"),
            Verdict::Refused
        );
        assert_eq!(
            credentials.verify_client(address, "billing", b"hunter2"),
            Verdict::Refused,
            "a secret is bound to its client id"
        );
        assert_eq!(
            credentials.verify_admin(address, b"hunter2"),
            Verdict::Admitted
        );
        assert_eq!(credentials.verify_admin(address, b"nope"), Verdict::Refused);
    }

    #[test]
    fn failures_are_rate_limited_per_address_and_window() {
        let failures = FailedAttempts::default();
        let start = Instant::now();
        let attacker: IpAddr = [10, 0, 0, 1].into();
        let other: IpAddr = [10, 0, 0, 2].into();
        for _ in 0..MAX_FAILURES_PER_WINDOW {
            assert!(failures.allowed(attacker, "orders", start));
            failures.record_failure(attacker, "orders", start);
        }
        assert!(!failures.allowed(attacker, "orders", start));
        assert!(
            failures.allowed(other, "orders", start),
            "other addresses unaffected"
        );
        assert!(
            failures.allowed(attacker, "billing", start),
            "other clients unaffected"
        );
        let later = start + FAILURE_WINDOW;
        assert!(failures.allowed(attacker, "orders", later), "a new window");
        failures.record_failure(attacker, "orders", later);
        assert!(failures.allowed(attacker, "orders", later));
    }

    #[test]
    fn the_address_table_is_bounded() {
        let failures = FailedAttempts::default();
        let now = Instant::now();
        for i in 0..(MAX_TRACKED_ADDRESSES as u32 + 10) {
            failures.record_failure(IpAddr::from(i.to_be_bytes()), "c", now);
        }
        let tracked = failures.windows.lock().unwrap().len();
        assert!(tracked <= MAX_TRACKED_ADDRESSES);
    }
}
