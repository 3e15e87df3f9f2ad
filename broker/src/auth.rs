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
//!   one misconfigured client does not lock out the others on its host;
//!   and an address with [`MAX_FAILURES_PER_ADDRESS`] failures of any
//!   names is refused for all. IPv6 addresses count per /64.
//! - The table is bounded ([`MAX_TRACKED_ADDRESSES`]) without ever
//!   forgetting a live window: cheap failures (unknown client ids cost no
//!   argon2) from anywhere cannot reset a lockout. While it is full of
//!   live windows, addresses it does not hold are refused.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
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
/// Failures allowed per address per window, whatever names they try.
pub const MAX_FAILURES_PER_ADDRESS: u32 = 50;
/// Addresses tracked at most. One is dropped only once its window is over;
/// while every tracked one is live, other addresses are refused.
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

/// Where failures are counted: an IPv4 address (IPv4-mapped IPv6 ones
/// included), or an IPv6 /64 network — one host is commonly given a whole
/// /64, so counting single IPv6 addresses would let it try forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4([u8; 4]),
    V6([u8; 8]),
}

impl Source {
    fn of(address: IpAddr) -> Source {
        match address {
            IpAddr::V4(v4) => Source::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.octets()),
                None => {
                    let octets = v6.octets();
                    let mut network = [0u8; 8];
                    network.copy_from_slice(&octets[..8]);
                    Source::V6(network)
                }
            },
        }
    }
}

/// Failures counted since `start`; over once [`FAILURE_WINDOW`] has passed.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    failures: u32,
}

impl Window {
    fn new(now: Instant) -> Window {
        Window {
            start: now,
            failures: 0,
        }
    }

    fn live(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.start) < FAILURE_WINDOW
    }

    fn failures(&self, now: Instant) -> u32 {
        if self.live(now) {
            self.failures
        } else {
            0
        }
    }

    fn record(&mut self, now: Instant) {
        if !self.live(now) {
            *self = Window::new(now);
        }
        self.failures = self.failures.saturating_add(1);
    }
}

/// The failures of one address: all of them, and per credential name
/// (client id, or the admin token), the names hashed.
#[derive(Debug)]
struct AddressFailures {
    all: Window,
    /// At most [`MAX_FAILURES_PER_ADDRESS`] live entries (each needs a
    /// failure, and the address stops at that many).
    by_name: Vec<(u64, Window)>,
}

impl AddressFailures {
    fn live(&self, now: Instant) -> bool {
        self.all.live(now) || self.by_name.iter().any(|(_, window)| window.live(now))
    }

    fn locked(&self, name: u64, now: Instant) -> bool {
        self.all.failures(now) >= MAX_FAILURES_PER_ADDRESS
            || self.by_name.iter().any(|(known, window)| {
                *known == name && window.failures(now) >= MAX_FAILURES_PER_WINDOW
            })
    }

    fn record(&mut self, name: u64, now: Instant) {
        self.all.record(now);
        self.by_name.retain(|(_, window)| window.live(now));
        if let Some((_, window)) = self.by_name.iter_mut().find(|(known, _)| *known == name) {
            window.record(now);
        } else if self.by_name.len() < MAX_FAILURES_PER_ADDRESS as usize {
            let mut window = Window::new(now);
            window.record(now);
            self.by_name.push((name, window));
        }
        // Else: only the address's total counts, and it is at its limit.
    }
}

#[derive(Debug, Default)]
struct FailureTable {
    addresses: HashMap<Source, AddressFailures>,
    /// Keyed per process: names are hashed so that an entry stays small
    /// whatever the client id's length.
    names: std::collections::hash_map::RandomState,
}

impl FailureTable {
    /// Whether a new address can be tracked: the table has room, or gets
    /// it by dropping addresses whose windows are all over. An address
    /// with a live window is never dropped, so no number of failures from
    /// elsewhere can reset a lockout.
    fn has_room(&mut self, now: Instant) -> bool {
        if self.addresses.len() < MAX_TRACKED_ADDRESSES {
            return true;
        }
        self.addresses.retain(|_, failures| failures.live(now));
        self.addresses.len() < MAX_TRACKED_ADDRESSES
    }
}

/// Failed attempts per address and per (address, credential name).
///
/// Rules, all within one [`FAILURE_WINDOW`]:
/// - a name (client id, or the admin token) with
///   [`MAX_FAILURES_PER_WINDOW`] failures from an address is refused from
///   it;
/// - an address with [`MAX_FAILURES_PER_ADDRESS`] failures, whatever the
///   names, is refused for every name (so spraying client ids buys no
///   more guesses);
/// - at most [`MAX_TRACKED_ADDRESSES`] addresses are tracked, and one is
///   forgotten only once its windows are over; while the table is full of
///   live ones, an address it does not hold is refused.
#[derive(Debug, Default)]
pub struct FailedAttempts {
    table: Mutex<FailureTable>,
}

impl FailedAttempts {
    /// True if `address` may try now as `who`.
    pub fn allowed(&self, address: IpAddr, who: &str, now: Instant) -> bool {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let name = table.names.hash_one(who);
        match table.addresses.get(&Source::of(address)) {
            Some(failures) => !failures.locked(name, now),
            None => table.has_room(now),
        }
    }

    /// Counts a failure of `address` as `who`.
    pub fn record_failure(&self, address: IpAddr, who: &str, now: Instant) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let name = table.names.hash_one(who);
        let source = Source::of(address);
        if !table.addresses.contains_key(&source) && !table.has_room(now) {
            // Not trackable: `allowed` refuses this address until there is
            // room.
            return;
        }
        table
            .addresses
            .entry(source)
            .or_insert_with(|| AddressFailures {
                all: Window::new(now),
                by_name: Vec::new(),
            })
            .record(name, now);
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .addresses
            .len()
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
        assert!(failures.tracked() <= MAX_TRACKED_ADDRESSES);
        // Full of live windows: an address it does not hold is refused...
        let newcomer: IpAddr = [192, 0, 2, 1].into();
        assert!(!failures.allowed(newcomer, "c", now));
        // ...until they are over.
        let later = now + FAILURE_WINDOW;
        assert!(failures.allowed(newcomer, "c", later));
        failures.record_failure(newcomer, "c", later);
        assert_eq!(failures.tracked(), 1, "over windows are dropped");
    }

    #[test]
    fn spraying_names_from_one_address_is_limited_as_a_whole() {
        let failures = FailedAttempts::default();
        let now = Instant::now();
        let sprayer: IpAddr = [10, 0, 0, 9].into();
        for i in 0..MAX_FAILURES_PER_ADDRESS {
            let name = format!("client-{i}");
            assert!(failures.allowed(sprayer, &name, now), "{name}");
            failures.record_failure(sprayer, &name, now);
        }
        assert!(!failures.allowed(sprayer, "never-tried", now));
        assert!(!failures.allowed(sprayer, ADMIN, now));
        assert!(failures.allowed([10, 0, 0, 10].into(), "client-1", now));
        assert!(failures.allowed(sprayer, "x", now + FAILURE_WINDOW));
    }

    #[test]
    fn ipv6_addresses_count_per_64_network() {
        let failures = FailedAttempts::default();
        let now = Instant::now();
        for i in 0..MAX_FAILURES_PER_WINDOW {
            let address: IpAddr = format!("2001:db8:1:2::{:x}", i + 1).parse().unwrap();
            failures.record_failure(address, ADMIN, now);
        }
        let same_network: IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        assert!(!failures.allowed(same_network, ADMIN, now));
        let other_network: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(failures.allowed(other_network, ADMIN, now));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        failures.record_failure(mapped, "c", now);
        assert_eq!(
            Source::of(mapped),
            Source::of(IpAddr::from([10, 0, 0, 1])),
            "an IPv4-mapped address is its IPv4 address"
        );
    }

    /// The old attack: a table evicting its oldest entries let 10,050
    /// cheap failures from other (address, client) keys push an admin
    /// lockout out within the minute.
    #[test]
    fn cheap_failures_elsewhere_never_reset_a_lockout() {
        let failures = FailedAttempts::default();
        let start = Instant::now();
        let attacker: IpAddr = [10, 0, 0, 1].into();
        for _ in 0..MAX_FAILURES_PER_WINDOW {
            failures.record_failure(attacker, ADMIN, start);
        }
        assert!(!failures.allowed(attacker, ADMIN, start));
        let later = start + Duration::from_secs(1);
        // From other addresses (one failure each, more than the table holds)...
        for i in 0..(MAX_TRACKED_ADDRESSES as u32 + 50) {
            let other = IpAddr::from((0x0b00_0000 + i).to_be_bytes());
            if failures.allowed(other, &format!("c{i}"), later) {
                failures.record_failure(other, &format!("c{i}"), later);
            }
        }
        assert!(!failures.allowed(attacker, ADMIN, later), "still locked");
        // ...and from the attacker's own address under other client ids.
        for i in 0..(MAX_TRACKED_ADDRESSES as u32 + 50) {
            let name = format!("c{i}");
            if failures.allowed(attacker, &name, later) {
                failures.record_failure(attacker, &name, later);
            }
        }
        assert!(!failures.allowed(attacker, ADMIN, later), "still locked");
        assert!(failures.tracked() <= MAX_TRACKED_ADDRESSES);
        // The minute over, it may try again.
        assert!(failures.allowed(attacker, ADMIN, start + FAILURE_WINDOW));
    }

    #[test]
    fn credentials_keep_an_admin_lockout_through_a_hello_flood() {
        let token = hash_secret("the-token").unwrap();
        let credentials = Credentials::new(BTreeMap::new(), vec![token]);
        let attacker: IpAddr = [10, 0, 0, 1].into();
        for _ in 0..MAX_FAILURES_PER_WINDOW {
            assert_eq!(
                credentials.verify_admin(attacker, b"guess"),
                Verdict::Refused
            );
        }
        assert_eq!(
            credentials.verify_admin(attacker, b"the-token"),
            Verdict::RateLimited
        );
        for i in 0..(MAX_TRACKED_ADDRESSES as u32 + 50) {
            let (address, client) = if i % 2 == 0 {
                (attacker, format!("c{i}"))
            } else {
                (
                    IpAddr::from((0x0b00_0000 + i).to_be_bytes()),
                    format!("c{i}"),
                )
            };
            assert_ne!(
                credentials.verify_client(address, &client, b"x"),
                Verdict::Admitted
            );
        }
        assert_eq!(
            credentials.verify_admin(attacker, b"the-token"),
            Verdict::RateLimited,
            "the lockout outlives the flood"
        );
        assert_eq!(
            credentials.verify_admin([10, 0, 0, 2].into(), b"the-token"),
            Verdict::Admitted,
            "an address with room left is still served"
        );
    }
}
