//! Password checks for the SOCKS5 handshake: Argon2 about one check per core, off the async
//! threads, and a cache of successful checks.
//!
//! Argon2 with the default parameters needs 19 MiB and tens of milliseconds per check, so
//! checks take one of a few permits (one per core) before they run on the blocking pool: 256
//! wrong passwords at once cost what two cost, and wait in line (no longer than their
//! handshake's deadline) instead of taking 5 GiB.
//!
//! A client such as tun2socks opens one TCP connection (and handshake) per flow; a check that
//! succeeded is remembered, so the same user and password do not pay Argon2 again. The cache
//! never holds a password: its key is a BLAKE2b MAC, under a key drawn at start and never
//! written anywhere, of the user name, the user's configured hash and the password. A changed
//! hash therefore never matches an old entry, and [`Verifier::retain`] drops the entries of
//! users a reload removed or changed. Only successful checks of configured users are cached,
//! so strangers cannot fill it; it holds at most [`CACHE_ENTRIES`] (the oldest go first).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use blake2::{
    digest::{consts::U32, Mac as _},
    Blake2bMac,
};
use tokio::{sync::Semaphore, time::Instant};

use super::users::{random, Users};

/// Successful checks remembered.
pub const CACHE_ENTRIES: usize = 4096;

/// What a check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Unknown user or wrong password.
    Wrong,
    /// No permit before the handshake's deadline (too many checks waiting).
    Busy,
}

type Tag = [u8; 32];

/// Cached successful checks: tag to (user, tag of the hash it was checked against).
struct Cache {
    entries: HashMap<Tag, (String, Tag)>,
    order: VecDeque<Tag>,
    capacity: usize,
}

/// A password check for the worker threads, with where to say the answer.
struct Job {
    users: Arc<Users>,
    name: String,
    password: Vec<u8>,
    /// Held until the check has run, even if nobody waits for the answer any more.
    permit: tokio::sync::OwnedSemaphorePermit,
    answer: tokio::sync::oneshot::Sender<bool>,
}

pub struct Verifier {
    permits: Arc<Semaphore>,
    /// The worker threads' queue (at most one job per permit waits in it).
    jobs: Mutex<std::sync::mpsc::Sender<Job>>,
    key: [u8; 32],
    cache: Mutex<Cache>,
    /// Argon2 checks run (for tests and the log).
    checks: std::sync::atomic::AtomicU64,
}

impl Verifier {
    /// A verifier running at most `workers` checks at once, on `workers` threads of its own,
    /// with a fresh random key. Own threads, not tokio's blocking pool: each thread that runs
    /// Argon2 keeps its 19 MiB in its malloc arena, so the pool's many threads would keep many
    /// of them; these few keep at most `workers`.
    pub fn new(workers: usize, capacity: usize) -> anyhow::Result<Verifier> {
        let workers = workers.max(1);
        // Argon2's block memory (19 MiB with the default parameters) is mapped for each
        // check and unmapped after it. Without a fixed threshold glibc raises its mmap
        // threshold after the first free and keeps such blocks in the threads' heaps, which
        // then hold hundreds of MiB after a burst of checks.
        // SAFETY: mallopt with integer arguments, before the checking threads exist.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..workers {
            let queue = Arc::clone(&queue);
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || loop {
                    let job = match queue.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    };
                    let ok = job.users.verify(&job.name, &job.password);
                    drop(job.permit);
                    let _ = job.answer.send(ok);
                })
                .map_err(|e| anyhow::anyhow!("starting a password-check thread: {e}"))?;
        }
        Ok(Verifier {
            jobs: Mutex::new(jobs),
            permits: Arc::new(Semaphore::new(workers)),
            key: random()?,
            cache: Mutex::new(Cache {
                entries: HashMap::new(),
                order: VecDeque::new(),
                capacity,
            }),
            checks: 0.into(),
        })
    }

    /// One worker per core.
    pub fn per_core() -> anyhow::Result<Verifier> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Verifier::new(cores, CACHE_ENTRIES)
    }

    /// Argon2 checks run so far.
    pub fn checks(&self) -> u64 {
        self.checks.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn mac(&self, parts: &[&[u8]]) -> Tag {
        let mut m = <Blake2bMac<U32> as blake2::digest::KeyInit>::new_from_slice(&self.key)
            .expect("a 32-byte key fits BLAKE2b");
        for p in parts {
            // Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
            m.update(&(p.len() as u64).to_le_bytes());
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `password` is `user`'s in `users`: from the cache, or by Argon2 on the blocking
    /// pool once a permit is free, waiting no longer than `deadline`.
    pub async fn verify(
        &self,
        users: &Arc<Users>,
        user: &str,
        password: &[u8],
        deadline: Instant,
    ) -> Verdict {
        let hash = users.get(user).map(|(_, u)| u.password_hash.as_str());
        let tags = hash.map(|h| {
            let hash_tag = self.mac(&[b"hash", h.as_bytes()]);
            let tag = self.mac(&[b"login", user.as_bytes(), h.as_bytes(), password]);
            (tag, hash_tag)
        });
        if let Some((tag, _)) = tags {
            if self.cache().entries.contains_key(&tag) {
                return Verdict::Ok;
            }
        }
        let Ok(Ok(permit)) =
            tokio::time::timeout_at(deadline, Arc::clone(&self.permits).acquire_owned()).await
        else {
            return Verdict::Busy;
        };
        self.checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (answer, check) = tokio::sync::oneshot::channel();
        let job = Job {
            users: Arc::clone(users),
            name: user.to_owned(),
            password: password.to_vec(),
            permit,
            answer,
        };
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job);
        if sent.is_err() {
            return Verdict::Busy;
        }
        match tokio::time::timeout_at(deadline, check).await {
            Ok(Ok(true)) => {
                if let Some((tag, hash_tag)) = tags {
                    self.remember(tag, user, hash_tag);
                }
                Verdict::Ok
            }
            Ok(_) => Verdict::Wrong,
            Err(_) => Verdict::Busy,
        }
    }

    fn remember(&self, tag: Tag, user: &str, hash_tag: Tag) {
        let mut c = self.cache();
        if c.capacity == 0 || c.entries.contains_key(&tag) {
            return;
        }
        while c.entries.len() >= c.capacity {
            match c.order.pop_front() {
                Some(old) => {
                    c.entries.remove(&old);
                }
                None => break,
            }
        }
        c.entries.insert(tag, (user.to_owned(), hash_tag));
        c.order.push_back(tag);
    }

    /// Forgets the checks of users that `users` no longer has, or has with another hash.
    pub fn retain(&self, users: &Users) {
        let current: HashMap<&str, Tag> = users
            .names()
            .iter()
            .filter_map(|(_, n)| users.get(n))
            .map(|(_, u)| {
                (
                    u.name.as_str(),
                    self.mac(&[b"hash", u.password_hash.as_bytes()]),
                )
            })
            .collect();
        let mut c = self.cache();
        c.entries
            .retain(|_, (user, hash)| current.get(user.as_str()) == Some(hash));
        let Cache { entries, order, .. } = &mut *c;
        order.retain(|t| entries.contains_key(t));
    }

    /// Cached checks.
    pub fn cached(&self) -> usize {
        self.cache().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::socks5::users::{hash_password, User};

    fn users(list: &[(&str, &str)]) -> Arc<Users> {
        Arc::new(
            Users::new(
                list.iter()
                    .map(|(name, hash)| User {
                        name: (*name).into(),
                        password_hash: (*hash).into(),
                        max_associations: 1,
                        max_connections: 1,
                        limits: Default::default(),
                        ..User::default()
                    })
                    .collect(),
            )
            .unwrap(),
        )
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(30)
    }

    #[tokio::test]
    async fn successful_checks_are_cached_until_the_hash_changes_or_the_user_goes() {
        let v = Verifier::new(1, 8).unwrap();
        let (a1, b) = (hash_password(b"one").unwrap(), hash_password(b"b").unwrap());
        let u = users(&[("alice", &a1), ("bob", &b)]);
        assert_eq!(v.verify(&u, "alice", b"one", soon()).await, Verdict::Ok);
        assert_eq!(v.checks(), 1);
        assert_eq!(v.verify(&u, "alice", b"one", soon()).await, Verdict::Ok);
        assert_eq!(v.checks(), 1, "the second login is a cache hit");
        // Wrong passwords and unknown users always pay, and are never cached.
        for (user, pw) in [("alice", &b"two"[..]), ("mallory", b"one"), ("bob", b"one")] {
            assert_eq!(v.verify(&u, user, pw, soon()).await, Verdict::Wrong);
        }
        assert_eq!(v.checks(), 4);
        assert_eq!(v.cached(), 1);
        assert_eq!(v.verify(&u, "bob", b"b", soon()).await, Verdict::Ok);
        assert_eq!(v.cached(), 2);

        // Alice's password changes: the old password no longer matches (even before the
        // reload's retain) and her entry goes; bob's stays.
        let a2 = hash_password(b"new").unwrap();
        let u2 = users(&[("alice", &a2), ("bob", &b)]);
        let before = v.checks();
        assert_eq!(v.verify(&u2, "alice", b"one", soon()).await, Verdict::Wrong);
        assert_eq!(v.checks(), before + 1, "not from the cache");
        v.retain(&u2);
        assert_eq!(v.cached(), 1);
        assert_eq!(v.verify(&u2, "bob", b"b", soon()).await, Verdict::Ok);
        assert_eq!(v.checks(), before + 1, "bob is still cached");

        // Bob is removed: his entry goes, and he cannot log in.
        let u3 = users(&[("alice", &a2)]);
        v.retain(&u3);
        assert_eq!(v.cached(), 0);
        assert_eq!(v.verify(&u3, "bob", b"b", soon()).await, Verdict::Wrong);
    }

    #[tokio::test]
    async fn the_cache_is_bounded() {
        let v = Verifier::new(2, 3).unwrap();
        let hashes: Vec<String> = (0..5)
            .map(|i| hash_password(format!("pw{i}").as_bytes()).unwrap())
            .collect();
        let list: Vec<(String, &str)> = hashes
            .iter()
            .enumerate()
            .map(|(i, h)| (format!("u{i}"), h.as_str()))
            .collect();
        let refs: Vec<(&str, &str)> = list.iter().map(|(n, h)| (n.as_str(), *h)).collect();
        let u = users(&refs);
        for i in 0..5 {
            let pw = format!("pw{i}");
            let name = format!("u{i}");
            assert_eq!(
                v.verify(&u, &name, pw.as_bytes(), soon()).await,
                Verdict::Ok
            );
            assert!(v.cached() <= 3);
        }
        // The newest are kept, the oldest went.
        let before = v.checks();
        assert_eq!(v.verify(&u, "u4", b"pw4", soon()).await, Verdict::Ok);
        assert_eq!(v.checks(), before);
        assert_eq!(v.verify(&u, "u0", b"pw0", soon()).await, Verdict::Ok);
        assert_eq!(v.checks(), before + 1);
    }

    #[tokio::test]
    async fn waiting_for_a_permit_ends_at_the_deadline() {
        let v = Verifier::new(1, 8).unwrap();
        let u = users(&[("alice", &hash_password(b"x").unwrap())]);
        let _held = Arc::clone(&v.permits).acquire_owned().await.unwrap();
        let start = std::time::Instant::now();
        let deadline = Instant::now() + Duration::from_millis(200);
        assert_eq!(v.verify(&u, "alice", b"x", deadline).await, Verdict::Busy);
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(v.checks(), 0);
    }
}
