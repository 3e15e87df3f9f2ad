//! `dmq hash-secret`: the argon2id PHC hash of a secret, the string an
//! operator pastes into dmqd's configuration — `[clients] id = "<hash>"` for
//! a client secret, `admin_tokens = ["<hash>"]` for an admin token.
//!
//! The secret is `--secret`, else the first line of stdin (its line break
//! removed, nothing else); an empty secret is refused. Each run draws a new
//! random salt, so two hashes of one secret differ and both verify.

use std::io::{BufRead, IsTerminal};

use anyhow::{anyhow, bail, Context, Result};
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::Argon2;
use serde_json::json;

use crate::output::{print_json, Format};
use crate::Cli;

/// The argon2id hash (default parameters, random salt) in PHC form.
pub fn hash(secret: &str) -> Result<String> {
    if secret.is_empty() {
        bail!("refusing to hash an empty secret");
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|error| anyhow!("hashing failed: {error}"))
}

/// The first line of `input` without its line break (`\n` or `\r\n`).
pub fn first_line(input: &mut impl BufRead) -> Result<String> {
    let mut line = String::new();
    input
        .read_line(&mut line)
        .context("reading the secret from stdin")?;
    if let Some(stripped) = line.strip_suffix('\n') {
        line.truncate(stripped.strip_suffix('\r').unwrap_or(stripped).len());
    }
    Ok(line)
}

/// Runs `dmq hash-secret`.
pub fn run(cli: &Cli) -> Result<()> {
    let secret = match &cli.secret {
        Some(secret) => secret.clone(),
        None => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprintln!("secret (one line; it is echoed):");
            }
            first_line(&mut stdin.lock())?
        }
    };
    if secret.is_empty() {
        bail!("refusing to hash an empty secret (give it with --secret or on the first line of stdin)");
    }
    let hash = hash(&secret)?;
    match cli.format {
        Format::Json => print_json(&json!({ "hash": hash })),
        Format::Table => {
            println!("{hash}");
            if std::io::stderr().is_terminal() {
                eprintln!(
                    "paste it into dmqd's config: `[clients] <client-id> = \"<hash>\"` or `admin_tokens = [\"<hash>\"]`"
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{PasswordHash, PasswordVerifier};

    #[test]
    fn hashes_verify_and_differ() {
        let one = hash("s3cret").expect("hash");
        let two = hash("s3cret").expect("hash");
        assert_ne!(one, two, "a fresh salt each time");
        assert!(one.starts_with("$argon2id$v=19$"), "{one}");
        for phc in [&one, &two] {
            let parsed = PasswordHash::new(phc).expect("PHC string");
            assert!(Argon2::default()
                .verify_password(b"s3cret", &parsed)
                .is_ok());
            assert!(Argon2::default()
                .verify_password(b"s3cret ", &parsed)
                .is_err());
        }
        assert!(hash("").is_err());
    }

    #[test]
    fn first_line_strips_only_the_line_break() {
        let line = |text: &str| first_line(&mut text.as_bytes()).expect("read");
        assert_eq!(line("abc\n"), "abc");
        assert_eq!(line("abc\r\nignored\n"), "abc");
        assert_eq!(line(" a b \n"), " a b ");
        assert_eq!(line("no newline"), "no newline");
        assert_eq!(line("\nsecond"), "");
        assert_eq!(line(""), "");
    }
}
