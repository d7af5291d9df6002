//! SOCKS5 users: names with Argon2id password hashes (PHC strings) from the configuration.
//! Plain-text passwords are never stored; `relay hash-password` makes the hash.
//!
//! A hash's parameters decide what each check costs (Argon2 needs `m` KiB for `t` passes),
//! so they are bounded when the file is read: see [`MEMORY_KIB`], [`PASSES`], [`LANES`].

use std::collections::HashMap;

use anyhow::{anyhow, Context as _};
use argon2::{
    password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString},
    Argon2,
};

#[derive(Clone, Debug, Default)]
pub struct User {
    pub name: String,
    /// Where the user is kept: the configuration file, or the store (the management API).
    pub origin: Origin,
    /// The password itself, where the relay keeps it to hand out links (the API's users and
    /// the no-argument run's); the file's users are known only by their hash.
    pub password: Option<Secret>,
    /// Argon2id hash in PHC form (`$argon2id$v=19$...`).
    pub password_hash: String,
    /// At most this many UDP associations at once.
    pub max_associations: u32,
    /// At most this many CONNECT connections at once.
    pub max_connections: u32,
    /// Quota, expiry, rate, devices, enabled.
    pub limits: crate::limits::Limits,
}

/// Where a user is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// The configuration file (changed by editing it and reloading).
    #[default]
    File,
    /// The store, changed through the management API or `relay users`.
    Api,
}

/// A password kept in memory: never in a log line or a `{:?}`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// `users` (the file's, and the store's as they were) with the store's users replaced by
/// `stored`; a stored user whose name the file has is left out, with a warning.
pub fn merge(users: &mut Vec<User>, stored: Vec<User>) {
    users.retain(|u| u.origin == Origin::File);
    for u in stored {
        if users.iter().any(|f| f.name == u.name) {
            log::warn!(
                "SOCKS5: user {:?} is in the file and in the store; the file's is used",
                u.name
            );
        } else {
            users.push(u);
        }
    }
}

/// Accepted Argon2 memory sizes in KiB: 8 MiB to 256 MiB (the default is 19 MiB).
pub const MEMORY_KIB: std::ops::RangeInclusive<u32> = 8 * 1024..=256 * 1024;
/// Accepted Argon2 passes (the default is 2).
pub const PASSES: std::ops::RangeInclusive<u32> = 1..=10;
/// Accepted Argon2 lanes (the default is 1).
pub const LANES: std::ops::RangeInclusive<u32> = 1..=16;

/// Checks that `hash` is an Argon2id PHC string with parameters in the accepted bounds.
pub fn check_hash(hash: &str) -> anyhow::Result<()> {
    let h = PasswordHash::new(hash).map_err(|e| {
        anyhow!("password_hash is not a PHC hash ({e}); make one with `relay hash-password`")
    })?;
    if h.algorithm.as_str() != "argon2id" {
        anyhow::bail!(
            "password_hash uses {}, not argon2id; make one with `relay hash-password`",
            h.algorithm
        );
    }
    let params = argon2::Params::try_from(&h)
        .map_err(|e| anyhow!("password_hash has bad Argon2 parameters ({e})"))?;
    let bounds = [
        ("m (memory, KiB)", params.m_cost(), &MEMORY_KIB),
        ("t (passes)", params.t_cost(), &PASSES),
        ("p (lanes)", params.p_cost(), &LANES),
    ];
    for (what, v, range) in bounds {
        if !range.contains(&v) {
            anyhow::bail!(
                "password_hash: Argon2 {what} = {v} is outside {}..={}; make one with `relay hash-password`",
                range.start(),
                range.end()
            );
        }
    }
    if h.hash.is_none() || h.salt.is_none() {
        anyhow::bail!("password_hash has no salt or no hash; make one with `relay hash-password`");
    }
    Ok(())
}

/// The users, by name.
#[derive(Clone, Debug, Default)]
pub struct Users {
    by_name: HashMap<String, (usize, User)>,
}

impl Users {
    /// Checks every hash up front, so that a typo is an error at start, not a login failure.
    pub fn new(users: Vec<User>) -> anyhow::Result<Users> {
        let mut by_name = HashMap::new();
        for (i, u) in users.into_iter().enumerate() {
            check_hash(&u.password_hash).with_context(|| format!("user {:?}", u.name))?;
            if by_name.insert(u.name.clone(), (i, u.clone())).is_some() {
                anyhow::bail!("user {:?} is configured twice", u.name);
            }
        }
        Ok(Users { by_name })
    }

    /// The user's index (for accounting) and settings.
    pub fn get(&self, name: &str) -> Option<&(usize, User)> {
        self.by_name.get(name)
    }

    pub fn names(&self) -> Vec<(usize, String)> {
        let mut v: Vec<_> = self
            .by_name
            .values()
            .map(|(i, u)| (*i, u.name.clone()))
            .collect();
        v.sort();
        v
    }

    /// Whether `password` is `user`'s. Slow on purpose (Argon2): call off the async threads.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        let Some((_, u)) = self.by_name.get(user) else {
            // Spend comparable time for unknown users, so that timing does not tell names.
            static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
            let dummy = DUMMY.get_or_init(|| hash_password(b"no such user").unwrap_or_default());
            let _ = verify_hash(dummy, password);
            return false;
        };
        verify_hash(&u.password_hash, password)
    }
}

fn verify_hash(hash: &str, password: &[u8]) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(password, &h).is_ok())
}

/// An Argon2id PHC hash of `password` with a random salt.
pub fn hash_password(password: &[u8]) -> anyhow::Result<String> {
    let salt: [u8; 16] = random()?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow!("salt: {e}"))?;
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow!("hashing: {e}"))
        .context("hashing the password")
}

/// `N` random bytes from the kernel as 2N hex digits (tokens, identifiers).
pub fn random_hex<const N: usize>() -> anyhow::Result<String> {
    Ok(random::<N>()?.iter().map(|b| format!("{b:02x}")).collect())
}

/// Random bytes from the kernel (getrandom(2), which blocks only until the pool is
/// initialised at boot).
pub fn random<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut out = [0u8; N];
    let mut filled = 0;
    while filled < N {
        // SAFETY: the pointer and length describe the unfilled, writable tail of `out`.
        let n = unsafe { libc::getrandom(out[filled..].as_mut_ptr().cast(), N - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            anyhow::bail!("getrandom failed: {e}");
        }
        filled += n as usize;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_reject() {
        let hash = hash_password(b"correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(!hash.contains("correct horse"));
        let users = Users::new(vec![User {
            name: "alice".into(),
            password_hash: hash.clone(),
            max_associations: 4,
            max_connections: 64,
            limits: Default::default(),
            ..User::default()
        }])
        .unwrap();
        assert!(users.verify("alice", b"correct horse"));
        assert!(!users.verify("alice", b"battery staple"));
        assert!(!users.verify("bob", b"correct horse"));
        assert_ne!(hash, hash_password(b"correct horse").unwrap(), "salted");
    }

    #[test]
    fn bad_hashes_and_duplicates_are_config_errors() {
        let user = |name: &str, hash: &str| User {
            name: name.into(),
            password_hash: hash.into(),
            max_associations: 1,
            max_connections: 1,
            limits: Default::default(),
            ..User::default()
        };
        let e = Users::new(vec![user("alice", "hunter2")]).unwrap_err();
        assert!(format!("{e:#}").contains("relay hash-password"), "{e}");
        let h = hash_password(b"x").unwrap();
        assert!(Users::new(vec![user("a", &h), user("a", &h)]).is_err());
    }

    #[test]
    fn hash_parameters_outside_the_bounds_are_refused() {
        let user = |hash: &str| User {
            name: "alice".into(),
            password_hash: hash.into(),
            max_associations: 1,
            max_connections: 1,
            limits: Default::default(),
            ..User::default()
        };
        // What `relay hash-password` makes passes.
        let ours = hash_password(b"x").unwrap();
        Users::new(vec![user(&ours)]).unwrap();
        let tail = "$c2FsdHNhbHRzYWx0$KxJ1FCRT//sSd/Alf06Jp8O9qgVCkvAlQF2yNPjpsZk";
        for (params, want) in [
            ("m=4096,t=2,p=1", "m (memory, KiB) = 4096"),
            ("m=1048576,t=2,p=1", "m (memory, KiB) = 1048576"),
            ("m=19456,t=100,p=1", "t (passes) = 100"),
            ("m=19456,t=2,p=64", "p (lanes) = 64"),
        ] {
            let hash = format!("$argon2id$v=19${params}{tail}");
            let e = format!("{:#}", Users::new(vec![user(&hash)]).unwrap_err());
            assert!(e.contains(want) && e.contains("alice"), "{params}: {e}");
        }
        // In bounds, other algorithms are refused.
        Users::new(vec![user(&format!("$argon2id$v=19$m=8192,t=1,p=1{tail}"))]).unwrap();
        let e = Users::new(vec![user(&format!("$argon2i$v=19$m=19456,t=2,p=1{tail}"))]);
        assert!(format!("{:#}", e.unwrap_err()).contains("not argon2id"));
    }
}
