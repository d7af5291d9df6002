//! SOCKS5 users: names with Argon2id password hashes (PHC strings) from the configuration.
//! Plain-text passwords are never stored; `relay hash-password` makes the hash.

use std::collections::HashMap;

use anyhow::{anyhow, Context as _};
use argon2::{
    password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString},
    Argon2,
};

#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    /// Argon2id hash in PHC form (`$argon2id$v=19$...`).
    pub password_hash: String,
    /// At most this many UDP associations at once.
    pub max_associations: u32,
    /// At most this many CONNECT connections at once.
    pub max_connections: u32,
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
            PasswordHash::new(&u.password_hash).map_err(|e| {
                anyhow!("user {:?}: password_hash is not a PHC hash ({e}); make one with `relay hash-password`", u.name)
            })?;
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
    let mut salt = [0u8; 16];
    // SAFETY: `salt` is a writable buffer of the length passed.
    let n = unsafe { libc::getrandom(salt.as_mut_ptr().cast(), salt.len(), 0) };
    if n != salt.len() as isize {
        anyhow::bail!("getrandom failed: {}", std::io::Error::last_os_error());
    }
    let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow!("salt: {e}"))?;
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow!("hashing: {e}"))
        .context("hashing the password")
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
        };
        let e = Users::new(vec![user("alice", "hunter2")]).unwrap_err();
        assert!(format!("{e}").contains("relay hash-password"), "{e}");
        let h = hash_password(b"x").unwrap();
        assert!(Users::new(vec![user("a", &h), user("a", &h)]).is_err());
    }
}
