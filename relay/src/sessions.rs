//! The session table: who may open a session, which relay port it gets, when it expires.
//!
//! No sockets and no maps here: the I/O layer (`forward`) asks, this answers, and the same
//! answers hold whether XDP or the controller moves the bytes. Time is passed in (monotonic
//! nanoseconds). The XDP program keeps no clock (a clock read per packet costs as much as a
//! fifth of the fast path): the table learns that XDP carried a session's packets from its
//! packet counters changing.

use relay_common::session::POOLS;
use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use crate::config::PortRange;

/// Why a new session was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The client's address is not in the rule's `allow` list.
    NotAllowed,
    /// The rule has `max_sessions` sessions already.
    RuleLimit,
    /// The session table (and the kernel maps sized from it) is full.
    Full,
    /// Every session port is in use.
    NoPort,
    /// The client's address has `max_sessions_per_source` sessions on the rule already.
    SourceLimit,
    /// The rule opened `new_sessions_per_second` (plus its burst) sessions just now.
    RateLimited,
}

impl Refusal {
    pub fn name(self) -> &'static str {
        match self {
            Refusal::NotAllowed => "not_allowed",
            Refusal::RuleLimit => "rule_limit",
            Refusal::Full => "table_full",
            Refusal::NoPort => "no_port",
            Refusal::SourceLimit => "source_limit",
            Refusal::RateLimited => "rate_limited",
        }
    }
}

/// What the table knows of one session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub id: u32,
    pub rule: u16,
    pub client: SocketAddr,
    pub port: u16,
    /// Last time the controller knows of traffic of this session: relayed by itself, or
    /// carried by XDP (seen as the kernel's packet count having changed).
    pub last_seen: u64,
    /// When the kernel's count was last looked at, and what it was.
    pub checked: u64,
    pub kernel_packets: u64,
    /// When the session was opened (or taken over after a restart).
    pub opened: u64,
    /// Whether the upstream has sent anything back. Unanswered sessions end after the rule's
    /// short `unanswered_timeout` and are the only ones a full table evicts.
    pub answered: bool,
    /// TCP: when both FINs or a RST were seen (0: not yet); closed [`Table::linger`] later.
    pub closing: u64,
    /// The pool its port came from (its upstream's, `relay_common::session::pool_of`).
    pub pool: usize,
}

impl Entry {
    pub fn new(id: u32, rule: u16, client: SocketAddr, port: u16, now: u64) -> Entry {
        Entry {
            id,
            rule,
            client,
            port,
            pool: 0,
            last_seen: now,
            checked: now,
            kernel_packets: 0,
            opened: now,
            answered: false,
            closing: 0,
        }
    }

    /// The same entry, with its port from pool `pool`.
    pub fn in_pool(self, pool: usize) -> Entry {
        Entry { pool, ..self }
    }
}

/// A session [`Table::open`] made, and the unanswered session it evicted to make room (the
/// caller closes that one's sockets and map entries).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    pub entry: Entry,
    pub evicted: Option<Entry>,
}

/// One pass of [`Table::expired`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expiry {
    /// Sessions to close: idle for longer than their timeout, unanswered for longer than the
    /// rule's `unanswered_timeout`, or their rule is gone.
    pub closed: Vec<u32>,
    /// Of `closed`, those that closed because the upstream never answered.
    pub unanswered: Vec<u32>,
    /// Sessions whose XDP packet count moved since the last look: seen now.
    pub carried: Vec<u32>,
}

/// What the others who move a session's bytes say about it: the XDP program's packet count
/// (both directions), the last time the controller's own relays saw a packet (0 if never),
/// and whether either has carried a packet from the upstream to the client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub kernel_packets: u64,
    pub slow_seen: u64,
    pub answered: bool,
    /// TCP: both FINs or a RST went by.
    pub closing: bool,
}

/// Session ports, handed out oldest-freed first so that a port is reused as late as possible
/// (late datagrams of an old session then rarely reach a new one).
#[derive(Debug)]
pub struct PortPool {
    /// Free ports in the order they are handed out. A port claimed while it waits here stays
    /// until `take` passes it (so that a claim costs no search).
    free: VecDeque<u16>,
    first: u16,
    /// Per port of the range: in use (taken or claimed).
    used: Vec<bool>,
    /// Per port of the range: somewhere in `free`.
    queued: Vec<bool>,
    available: usize,
}

impl PortPool {
    pub fn new(range: PortRange) -> PortPool {
        let n = usize::from(range.last - range.first) + 1;
        PortPool {
            free: (range.first..=range.last).collect(),
            first: range.first,
            used: vec![false; n],
            queued: vec![true; n],
            available: n,
        }
    }

    fn slot(&self, port: u16) -> Option<usize> {
        let i = usize::from(port.checked_sub(self.first)?);
        (i < self.used.len()).then_some(i)
    }

    /// Takes the port that has been free longest.
    pub fn take(&mut self) -> Option<u16> {
        while let Some(port) = self.free.pop_front() {
            if let Some(p) = self.use_popped(port) {
                return Some(p);
            }
        }
        None
    }

    /// A port just removed from `free`: taken if it is not in use.
    fn use_popped(&mut self, port: u16) -> Option<u16> {
        let i = self.slot(port)?;
        self.queued[i] = false;
        if self.used[i] {
            return None;
        }
        self.used[i] = true;
        self.available -= 1;
        Some(port)
    }

    pub fn is_empty(&self) -> bool {
        self.available == 0
    }

    /// Ports in the range, free or not.
    pub fn len(&self) -> usize {
        self.used.len()
    }

    /// Takes the free port at position `pick` modulo the number of waiting ports (a random
    /// `pick` makes the port unpredictable).
    pub fn take_nth(&mut self, pick: u64) -> Option<u16> {
        while !self.free.is_empty() {
            let at = (pick % self.free.len() as u64) as usize;
            let port = self.free.remove(at)?;
            if let Some(p) = self.use_popped(port) {
                return Some(p);
            }
        }
        None
    }

    /// Returns a port to the pool (a closed session's, or one another socket holds: it is
    /// tried again last).
    pub fn put(&mut self, port: u16) {
        let Some(i) = self.slot(port) else { return };
        if !self.used[i] {
            return;
        }
        self.used[i] = false;
        self.available += 1;
        if !self.queued[i] {
            self.queued[i] = true;
            self.free.push_back(port);
        }
    }

    /// Takes a specific port out of the pool (a session recovered after a restart).
    pub fn claim(&mut self, port: u16) -> bool {
        match self.slot(port) {
            Some(i) if !self.used[i] => {
                self.used[i] = true;
                self.available -= 1;
                true
            }
            _ => false,
        }
    }
}

/// The table of live sessions.
#[derive(Debug)]
pub struct Table {
    capacity: u32,
    entries: HashMap<u32, Entry>,
    by_client: HashMap<(u16, SocketAddr), u32>,
    free_ids: Vec<u32>,
    next_id: u32,
    per_rule: HashMap<u16, u32>,
    /// Sessions per (rule, client address): what `max_sessions_per_source` counts.
    per_source: HashMap<(u16, IpAddr), u32>,
    /// New-session token buckets per rule.
    buckets: HashMap<u16, Bucket>,
    /// Unanswered sessions by age: (opened, id), oldest first. The eviction candidates.
    unanswered: BTreeSet<(u64, u32)>,
    /// Closing TCP sessions by when they started to close.
    closing: BTreeSet<(u64, u32)>,
    /// Ids with their pools and ports lent to the kernel (it opens sessions with them).
    lent: HashMap<u32, (usize, u16)>,
    /// How many of `lent` each pool holds.
    lent_per_pool: [usize; POOLS],
    /// Sessions by relay port and pool (a port is in use at most once per pool).
    by_port: HashMap<(u16, usize), u32>,
    /// Sessions per pool.
    per_pool: [usize; POOLS],
    /// How long a closing session stays.
    linger: u64,
    /// One per pool: a port is unique among the sessions to the upstreams of a pool.
    pub ports: Vec<PortPool>,
}

/// Limits that apply to one rule.
#[derive(Clone, Copy, Debug)]
pub struct RuleLimits {
    pub max_sessions: u32,
    pub idle_timeout: Duration,
    /// Sessions one client address may hold on the rule at once.
    pub max_sessions_per_source: u32,
    /// New sessions the rule opens per second, on average, and in one burst.
    pub new_sessions_per_second: u32,
    pub new_sessions_burst: u32,
    /// A session whose upstream has sent nothing back ends this long after it opened.
    pub unanswered_timeout: Duration,
}

impl RuleLimits {
    /// Limits that never refuse anything but `max_sessions` (tests and tools).
    pub fn sessions(max_sessions: u32, idle_timeout: Duration) -> RuleLimits {
        RuleLimits {
            max_sessions,
            idle_timeout,
            max_sessions_per_source: u32::MAX,
            new_sessions_per_second: u32::MAX,
            new_sessions_burst: u32::MAX,
            unanswered_timeout: idle_timeout,
        }
    }
}

/// A token bucket in whole sessions, refilled from monotonic nanoseconds.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Tokens, in billionths of a session (so that refills need no floating point).
    nano_tokens: u128,
    last: u64,
}

impl Bucket {
    fn take(&mut self, now: u64, rate: u32, burst: u32) -> bool {
        if rate == u32::MAX {
            return true;
        }
        let cap = u128::from(burst.max(1)) * 1_000_000_000;
        let elapsed = u128::from(now.saturating_sub(self.last));
        self.nano_tokens = (self.nano_tokens + elapsed * u128::from(rate)).min(cap);
        self.last = self.last.max(now);
        if self.nano_tokens >= 1_000_000_000 {
            self.nano_tokens -= 1_000_000_000;
            true
        } else {
            false
        }
    }
}

/// Which sessions an eviction may close: of one rule, of one pool (it frees a port there),
/// or (both `None`) any.
#[derive(Clone, Copy, Debug)]
struct Only {
    rule: Option<u16>,
    pool: Option<usize>,
}

/// Eviction candidates looked at per new session, at most: a bounded cost per packet even
/// when the table believes many sessions unanswered that the kernel has seen answered.
const EVICTION_TRIES: usize = 8;

impl Table {
    pub fn new(capacity: u32, ports: PortRange) -> Table {
        Table {
            capacity,
            entries: HashMap::new(),
            by_client: HashMap::new(),
            free_ids: Vec::new(),
            next_id: 0,
            per_rule: HashMap::new(),
            per_source: HashMap::new(),
            buckets: HashMap::new(),
            unanswered: BTreeSet::new(),
            closing: BTreeSet::new(),
            lent: HashMap::new(),
            lent_per_pool: [0; POOLS],
            by_port: HashMap::new(),
            per_pool: [0; POOLS],
            linger: crate::config::TCP_LINGER.as_nanos() as u64,
            ports: (0..POOLS).map(|_| PortPool::new(ports)).collect(),
        }
    }

    /// Lends up to `n` free ids, each with a free port of pool `pool`, to the kernel's queue
    /// of that pool. They count as used until the kernel opens a session with one
    /// ([`Table::adopt`]) or they come back ([`Table::unlend`]).
    pub fn lend(&mut self, pool: usize, n: usize) -> Vec<(u32, u16)> {
        let mut out = Vec::with_capacity(n);
        if pool >= POOLS {
            return out;
        }
        // An eighth of the table (rounded up) and a thirty-second of the pool's ports are never
        // lent: the sessions the kernel leaves to the controller (a pool ran dry for a
        // moment) still find an id and a port while the pools hold lent ones.
        let room = (self.capacity - self.capacity.div_ceil(8)) as usize;
        let keep = self.ports[pool].len() / 32;
        while out.len() < n
            && (self.entries.len() + self.lent.len()) < room
            && self.ports[pool].available > keep
        {
            let Some(port) = self.ports[pool].take() else {
                break;
            };
            let Some(id) = self.alloc_id() else {
                self.ports[pool].put(port);
                break;
            };
            self.lent.insert(id, (pool, port));
            self.lent_per_pool[pool] += 1;
            out.push((id, port));
        }
        out
    }

    /// Ids and ports lent to the kernel's queue of pool `pool` and not used by it.
    pub fn lent(&self, pool: usize) -> usize {
        self.lent_per_pool.get(pool).copied().unwrap_or(0)
    }

    /// Takes a lent id back from `lent`, with its pool and port.
    fn take_lent(&mut self, id: u32) -> Option<(usize, u16)> {
        let (pool, port) = self.lent.remove(&id)?;
        self.lent_per_pool[pool] -= 1;
        Some((pool, port))
    }

    /// Takes lent ids back (the pool was drained, or refused them).
    pub fn unlend(&mut self, ids: impl IntoIterator<Item = u32>) {
        for id in ids {
            if let Some((pool, port)) = self.take_lent(id) {
                self.free_ids.push(id);
                self.ports[pool].put(port);
            }
        }
    }

    /// How many ports each pool has (the session port range).
    pub fn ports_per_pool(&self) -> usize {
        self.ports.first().map_or(0, PortPool::len)
    }

    /// Sessions whose ports come from pool `pool`.
    pub fn held(&self, pool: usize) -> usize {
        self.per_pool.get(pool).copied().unwrap_or(0)
    }

    /// The session on relay port `port` in pool `pool`, if one holds it.
    pub fn on_port_in(&self, port: u16, pool: usize) -> Option<u32> {
        self.by_port.get(&(port, pool)).copied()
    }

    /// A session the kernel opened (its allow list and limits were checked there), with an
    /// id lent to it, or one a predecessor lent (opened while this controller took over).
    /// False if the id or the port is in use.
    pub fn adopt(&mut self, entry: Entry) -> bool {
        if entry.id >= self.capacity || self.entries.contains_key(&entry.id) {
            return false;
        }
        match self.lent.get(&entry.id) {
            Some(&lent) if lent == (entry.pool, entry.port) => {
                self.take_lent(entry.id);
            }
            Some(_) => return false,
            None => {
                if !self.claim_port(&entry) {
                    return false;
                }
                self.free_ids.retain(|id| *id != entry.id);
                // Ids skipped over are free.
                self.free_ids.extend(self.next_id..entry.id);
                self.next_id = self.next_id.max(entry.id + 1);
            }
        }
        if let Some(old) = self.find(entry.rule, entry.client) {
            // A client reusing its address and port while its old session lingers.
            self.close(old);
        }
        self.insert(entry);
        true
    }

    /// TCP session `id` has seen both FINs or a RST: it closes after the linger.
    pub fn set_closing(&mut self, id: u32, now: u64) {
        if let Some(e) = self.entries.get_mut(&id) {
            if e.closing == 0 {
                e.closing = now.max(1);
                self.closing.insert((e.closing, id));
            }
        }
    }

    /// Closing TCP session `id` carries a new connection: it is no longer closing, and is
    /// unanswered (evictable, ended by `unanswered_timeout`) until that connection's
    /// handshake completes.
    fn reopen(&mut self, id: u32, now: u64) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        self.closing.remove(&(e.closing, id));
        e.closing = 0;
        if !e.answered {
            self.unanswered.remove(&(e.opened, id));
        }
        e.answered = false;
        (e.opened, e.last_seen, e.checked) = (now, now, now);
        self.unanswered.insert((now, id));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, id: u32) -> Option<&Entry> {
        self.entries.get(&id)
    }

    pub fn find(&self, rule: u16, client: SocketAddr) -> Option<u32> {
        self.by_client.get(&(rule, client)).copied()
    }

    pub fn sessions_of(&self, rule: u16) -> u32 {
        self.per_rule.get(&rule).copied().unwrap_or(0)
    }

    fn alloc_id(&mut self) -> Option<u32> {
        if let Some(id) = self.free_ids.pop() {
            return Some(id);
        }
        (self.next_id < self.capacity).then(|| {
            self.next_id += 1;
            self.next_id - 1
        })
    }

    /// The (rule, client address) pairs that hold sessions.
    pub fn sources(&self) -> Vec<(u16, IpAddr)> {
        self.per_source.keys().copied().collect()
    }

    /// Sessions `client`'s address holds on `rule`.
    pub fn sessions_of_source(&self, rule: u16, client: IpAddr) -> u32 {
        self.per_source.get(&(rule, client)).copied().unwrap_or(0)
    }

    /// Opens a session for `client` on `rule`, with a port of pool `pool` (its upstream's),
    /// given whether the client is allowed. The caller has checked [`Table::find`] first. The
    /// port is a candidate: if the I/O layer cannot bind it, it calls [`Table::replace_port`].
    ///
    /// Refusals come in this order: not allowed, the client address's share, the rule's
    /// new-session rate, and then room: when the rule is at `max_sessions`, the table is full
    /// or no port of the pool is free, the oldest session whose upstream never answered (of
    /// the rule, of any rule when the table is full, of the pool when its ports are) is
    /// evicted to make room; sessions that were
    /// answered are never evicted. `observe` confirms that a candidate is still unanswered
    /// (the kernel may have carried a reply the table has not heard of yet).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        &mut self,
        rule: u16,
        pool: usize,
        limits: RuleLimits,
        client: SocketAddr,
        allowed: bool,
        now: u64,
        mut observe: impl FnMut(u32) -> Observed,
    ) -> Result<Opened, Refusal> {
        if !allowed {
            return Err(Refusal::NotAllowed);
        }
        // Per source before the rule's rate: one host's flood must not use up everyone's.
        if self.sessions_of_source(rule, client.ip()) >= limits.max_sessions_per_source {
            return Err(Refusal::SourceLimit);
        }
        let bucket = self.buckets.entry(rule).or_insert(Bucket {
            nano_tokens: u128::from(limits.new_sessions_burst.max(1)) * 1_000_000_000,
            last: now,
        });
        if !bucket.take(
            now,
            limits.new_sessions_per_second,
            limits.new_sessions_burst,
        ) {
            return Err(Refusal::RateLimited);
        }
        let pool = pool.min(POOLS - 1);
        let mut evicted = None;
        let rule_full = self.sessions_of(rule) >= limits.max_sessions;
        let table_full = (self.entries.len() + self.lent.len()) as u32 >= self.capacity;
        let no_port = self.ports[pool].is_empty();
        if rule_full || table_full || no_port {
            // Room where it is missing: in the rule, in the pool (for a port), or anywhere.
            let only = Only {
                rule: rule_full.then_some(rule),
                pool: no_port.then_some(pool),
            };
            evicted = self.evict_unanswered(only, &mut observe);
            if evicted.is_none() {
                return Err(if rule_full {
                    Refusal::RuleLimit
                } else if table_full {
                    Refusal::Full
                } else {
                    Refusal::NoPort
                });
            }
        }
        let port = self.ports[pool].take().ok_or(Refusal::NoPort)?;
        let Some(id) = self.alloc_id() else {
            self.ports[pool].put(port);
            return Err(Refusal::Full);
        };
        let entry = Entry::new(id, rule, client, port, now).in_pool(pool);
        self.insert(entry.clone());
        Ok(Opened { entry, evicted })
    }

    /// Gives back the new-session token [`Table::open`] took for `rule` (an open refused for
    /// want of room, tried again once the caller made some).
    pub fn give_back_token(&mut self, rule: u16, limits: RuleLimits) {
        if let Some(b) = self.buckets.get_mut(&rule) {
            let cap = u128::from(limits.new_sessions_burst.max(1)) * 1_000_000_000;
            b.nano_tokens = (b.nano_tokens + 1_000_000_000).min(cap);
        }
    }

    /// Closes the oldest unanswered session (of `rule` only, if given), after `observe`
    /// confirms it is still unanswered; sessions found answered are marked so. Looks at no
    /// more than [`EVICTION_TRIES`] candidates.
    fn evict_unanswered(
        &mut self,
        only: Only,
        observe: &mut impl FnMut(u32) -> Observed,
    ) -> Option<Entry> {
        let fits = |e: &Entry| {
            only.rule.is_none_or(|r| e.rule == r) && only.pool.is_none_or(|p| e.pool == p)
        };
        // The oldest few hundred only: a bounded cost per new session even when few of them
        // are the rule's or the pool's.
        let candidates: Vec<u32> = self
            .unanswered
            .iter()
            .take(EVICTION_TRIES * 32)
            .map(|&(_, id)| id)
            .filter(|id| self.entries.get(id).is_some_and(fits))
            .take(EVICTION_TRIES)
            .collect();
        for id in candidates {
            if observe(id).answered {
                self.mark_answered(id);
                continue;
            }
            return self.close(id);
        }
        None
    }

    /// Sessions whose client `allowed(rule, client)` no longer admits (an allow list or a
    /// rule changed by a reload, or sessions taken over after a restart): the caller closes
    /// them.
    pub fn revoked(&self, allowed: impl Fn(u16, SocketAddr) -> bool) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .entries
            .values()
            .filter(|e| !allowed(e.rule, e.client))
            .map(|e| e.id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Records that the upstream of session `id` answered: it is no longer an eviction
    /// candidate, and only its idle timeout ends it.
    pub fn mark_answered(&mut self, id: u32) {
        if let Some(e) = self.entries.get_mut(&id) {
            if !e.answered {
                e.answered = true;
                self.unanswered.remove(&(e.opened, id));
            }
        }
    }

    fn insert(&mut self, entry: Entry) {
        self.by_client.insert((entry.rule, entry.client), entry.id);
        *self.per_rule.entry(entry.rule).or_default() += 1;
        *self
            .per_source
            .entry((entry.rule, entry.client.ip()))
            .or_default() += 1;
        if !entry.answered {
            self.unanswered.insert((entry.opened, entry.id));
        }
        self.by_port.insert((entry.port, entry.pool), entry.id);
        self.per_pool[entry.pool] += 1;
        self.entries.insert(entry.id, entry);
    }

    /// Gives session `id` another port because its candidate was taken by another socket.
    /// The taken port goes to the back of the pool.
    pub fn replace_port(&mut self, id: u32) -> Option<u16> {
        let pool = self.entries.get(&id)?.pool;
        let next = self.ports[pool].take()?;
        let entry = self.entries.get_mut(&id)?;
        let old = std::mem::replace(&mut entry.port, next);
        self.by_port.remove(&(old, pool));
        self.by_port.insert((next, pool), id);
        self.ports[pool].put(old);
        Some(next)
    }

    /// Takes an entry's port out of its pool (a session found after a restart, or opened with
    /// an id this controller did not lend).
    fn claim_port(&mut self, entry: &Entry) -> bool {
        self.ports
            .get_mut(entry.pool)
            .is_some_and(|ports| ports.claim(entry.port))
    }

    /// Re-creates a session found in the pinned maps after a restart.
    pub fn recover(&mut self, entry: Entry) -> bool {
        if entry.id >= self.capacity || self.entries.contains_key(&entry.id) {
            return false;
        }
        if !self.claim_port(&entry) {
            return false;
        }
        self.next_id = self.next_id.max(entry.id + 1);
        self.insert(entry);
        true
    }

    /// Frees ids below `next_id` that no recovered session holds. Call once after recovery.
    pub fn finish_recovery(&mut self) {
        self.free_ids = (0..self.next_id)
            .filter(|id| !self.entries.contains_key(id))
            .collect();
    }

    pub fn touch(&mut self, id: u32, now: u64) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.last_seen = e.last_seen.max(now);
        }
    }

    /// Closes session `id`, freeing its id and port.
    pub fn close(&mut self, id: u32) -> Option<Entry> {
        let entry = self.entries.remove(&id)?;
        self.by_client.remove(&(entry.rule, entry.client));
        if let Some(n) = self.per_rule.get_mut(&entry.rule) {
            *n = n.saturating_sub(1);
        }
        let source = (entry.rule, entry.client.ip());
        if let Some(n) = self.per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
        self.unanswered.remove(&(entry.opened, id));
        if entry.closing != 0 {
            self.closing.remove(&(entry.closing, id));
        }
        self.free_ids.push(id);
        self.by_port.remove(&(entry.port, entry.pool));
        self.per_pool[entry.pool] -= 1;
        self.ports[entry.pool].put(entry.port);
        Some(entry)
    }

    /// Sessions idle for longer than their rule's timeout at `now`, or unanswered for longer
    /// than its `unanswered_timeout`. `observe` reports what the XDP program and the
    /// controller's relays saw of a session; it costs a map read, so it is asked only of
    /// sessions quiet for a quarter of their timeout, at most once per quarter timeout, and
    /// always before closing one. A packet count that changed since the last look means traffic
    /// since then, counted as traffic now: a session therefore closes between 1 and 1.25
    /// timeouts after its last packet.
    pub fn expired(
        &mut self,
        now: u64,
        limits: impl Fn(u16) -> Option<RuleLimits>,
        mut observe: impl FnMut(u32) -> Observed,
    ) -> Expiry {
        let mut out = Expiry::default();
        let mut answered = Vec::new();
        let mut closing = Vec::new();
        // Closing TCP sessions whose linger is over; one the kernel found reopened (a new SYN
        // on the same addresses and ports) lives on.
        let mut reopened = Vec::new();
        for &(since, id) in &self.closing {
            if now.saturating_sub(since) <= self.linger {
                break;
            }
            if observe(id).closing {
                out.closed.push(id);
            } else {
                reopened.push(id);
            }
        }
        for id in reopened {
            self.reopen(id, now);
        }
        for e in self.entries.values_mut() {
            if e.closing != 0 {
                continue;
            }
            // The rule is gone (configuration changed): close.
            let Some(l) = limits(e.rule) else {
                out.closed.push(e.id);
                continue;
            };
            let unanswered_due = !e.answered
                && now.saturating_sub(e.opened) > l.unanswered_timeout.as_nanos() as u64;
            let timeout = l.idle_timeout.as_nanos() as u64;
            let quiet = now.saturating_sub(e.last_seen);
            let due = now.saturating_sub(e.checked) >= timeout / 4 || quiet > timeout;
            if !unanswered_due && (quiet <= timeout / 4 || !due) {
                continue;
            }
            let o = observe(e.id);
            e.checked = now;
            if o.closing {
                closing.push(e.id);
                continue;
            }
            if o.kernel_packets != e.kernel_packets {
                e.kernel_packets = o.kernel_packets;
                e.last_seen = now;
                out.carried.push(e.id);
            }
            e.last_seen = e.last_seen.max(o.slow_seen);
            if o.answered && !e.answered {
                answered.push(e.id);
            } else if unanswered_due {
                out.closed.push(e.id);
                out.unanswered.push(e.id);
                continue;
            }
            if now.saturating_sub(e.last_seen) > timeout {
                out.closed.push(e.id);
            }
        }
        for id in answered {
            self.mark_answered(id);
        }
        for id in closing {
            self.set_closing(id, now);
        }
        out.closed.sort_unstable();
        out.unanswered.sort_unstable();
        out.carried.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn limits(max: u32) -> RuleLimits {
        RuleLimits::sessions(max, Duration::from_secs(300))
    }

    /// What `observe` says of a session nobody has heard from.
    fn silent(_: u32) -> Observed {
        Observed::default()
    }

    /// What `observe` says of a session whose upstream has answered.
    fn answered(_: u32) -> Observed {
        Observed {
            answered: true,
            ..Observed::default()
        }
    }

    fn client(n: u16) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, 1], 40000 + n))
    }

    fn table(capacity: u32, ports: (u16, u16)) -> Table {
        Table::new(
            capacity,
            PortRange {
                first: ports.0,
                last: ports.1,
            },
        )
    }

    #[test]
    fn opens_finds_and_closes() {
        let mut t = table(10, (20000, 20009));
        let e = t
            .open(0, 0, limits(10), client(1), true, 5, silent)
            .map(|o| o.entry)
            .unwrap();
        assert_eq!((e.id, e.port), (0, 20000));
        assert_eq!(t.find(0, client(1)), Some(0));
        assert_eq!(t.find(1, client(1)), None, "sessions are per rule");
        assert_eq!(t.sessions_of(0), 1);
        let closed = t.close(0).unwrap();
        assert_eq!(closed.client, client(1));
        assert_eq!(t.find(0, client(1)), None);
        assert_eq!(t.sessions_of(0), 0);
        assert!(t.is_empty());
    }

    #[test]
    fn refusals_are_explicit_and_never_evict() {
        let mut t = table(3, (20000, 20009));
        let open = |t: &mut Table, rule, max, n| {
            t.open(rule, 0, limits(max), client(n), true, 0, answered)
                .map(|o| o.entry)
        };
        assert_eq!(
            t.open(0, 0, limits(10), client(1), false, 0, answered)
                .map(|o| o.entry),
            Err(Refusal::NotAllowed)
        );
        for n in 0..2 {
            open(&mut t, 0, 2, n).unwrap();
        }
        assert_eq!(open(&mut t, 0, 2, 9), Err(Refusal::RuleLimit));
        open(&mut t, 1, 10, 2).unwrap();
        assert_eq!(open(&mut t, 1, 10, 3), Err(Refusal::Full));
        assert_eq!(t.len(), 3, "no answered session was evicted");
        let mut few_ports = table(10, (20000, 20000));
        open(&mut few_ports, 0, 10, 1).unwrap();
        assert_eq!(open(&mut few_ports, 0, 10, 2), Err(Refusal::NoPort));
    }

    #[test]
    fn one_address_gets_its_share_and_no_more() {
        let mut t = table(100, (20000, 20099));
        let l = RuleLimits {
            max_sessions_per_source: 3,
            ..limits(100)
        };
        for n in 0..3 {
            t.open(0, 0, l, client(n), true, 0, silent).unwrap();
        }
        assert_eq!(
            t.open(0, 0, l, client(3), true, 0, silent).map(|o| o.entry),
            Err(Refusal::SourceLimit),
            "a fourth port of the same address"
        );
        let other = SocketAddr::from(([198, 51, 100, 2], 40000));
        assert!(
            t.open(0, 0, l, other, true, 0, silent).is_ok(),
            "another address"
        );
        assert!(
            t.open(1, 0, l, client(3), true, 0, silent).is_ok(),
            "the share is per rule"
        );
        t.close(t.find(0, client(0)).unwrap());
        assert!(
            t.open(0, 0, l, client(3), true, 0, silent).is_ok(),
            "a closed session gives its share back"
        );
    }

    #[test]
    fn new_sessions_are_rate_limited_per_rule() {
        let mut t = table(1000, (20000, 20999));
        let l = RuleLimits {
            new_sessions_per_second: 10,
            new_sessions_burst: 5,
            ..limits(1000)
        };
        let mut n = 0;
        let mut open = |t: &mut Table, rule: u16, now: u64| {
            n += 1;
            t.open(rule, 0, l, client(n), true, now, silent)
                .map(|o| o.entry.id)
        };
        for _ in 0..5 {
            open(&mut t, 0, 0).unwrap();
        }
        assert_eq!(open(&mut t, 0, 0), Err(Refusal::RateLimited), "burst used");
        assert!(open(&mut t, 1, 0).is_ok(), "other rules have their own");
        // 10 per second: one more every 100 ms, never more than the burst.
        assert_eq!(open(&mut t, 0, SEC / 20), Err(Refusal::RateLimited));
        assert!(open(&mut t, 0, SEC / 10).is_ok());
        assert_eq!(open(&mut t, 0, SEC / 10), Err(Refusal::RateLimited));
        let later = 100 * SEC;
        for _ in 0..5 {
            open(&mut t, 0, later).unwrap();
        }
        assert_eq!(open(&mut t, 0, later), Err(Refusal::RateLimited));
    }

    #[test]
    fn a_full_table_evicts_the_oldest_unanswered_session_and_never_an_answered_one() {
        let mut t = table(4, (20000, 20099));
        let l = limits(100);
        let ids: Vec<u32> = (0..4)
            .map(|n| {
                t.open(0, 0, l, client(n), true, u64::from(n) * SEC, silent)
                    .unwrap()
                    .entry
                    .id
            })
            .collect();
        // The kernel carried a reply of the oldest; the table learns it only when it asks.
        let observe = |id: u32| Observed {
            answered: id == ids[0],
            ..Observed::default()
        };
        let o = t.open(0, 0, l, client(9), true, 10 * SEC, observe).unwrap();
        let evicted = o.evicted.expect("room was made");
        assert_eq!(evicted.id, ids[1], "the oldest still unanswered");
        assert_eq!(t.find(0, client(1)), None);
        assert!(t.get(ids[0]).unwrap().answered);
        t.mark_answered(ids[2]);
        t.mark_answered(ids[3]);
        t.mark_answered(o.entry.id);
        assert_eq!(
            t.open(0, 0, l, client(10), true, 11 * SEC, silent)
                .map(|o| o.entry),
            Err(Refusal::Full),
            "answered sessions stay"
        );
        assert_eq!(t.len(), 4);
        // A rule at max_sessions evicts only its own unanswered sessions.
        let mut t = table(10, (20000, 20099));
        t.open(1, 0, l, client(1), true, 0, silent).unwrap();
        t.open(0, 0, limits(1), client(2), true, SEC, silent)
            .unwrap();
        let o = t
            .open(0, 0, limits(1), client(3), true, 2 * SEC, silent)
            .unwrap();
        assert_eq!(o.evicted.map(|e| e.client), Some(client(2)));
        assert!(t.find(1, client(1)).is_some());
    }

    #[test]
    fn sessions_a_new_allow_list_refuses_are_revoked() {
        let mut t = table(10, (20000, 20009));
        let a = t
            .open(0, 0, limits(10), client(1), true, 0, silent)
            .unwrap()
            .entry;
        let other = SocketAddr::from(([203, 0, 113, 9], 5));
        let b = t
            .open(0, 0, limits(10), other, true, 0, silent)
            .unwrap()
            .entry;
        let c = t
            .open(1, 0, limits(10), client(2), true, 0, silent)
            .unwrap()
            .entry;
        assert_eq!(t.revoked(|_, _| true), Vec::<u32>::new());
        // Rule 0 now admits only 203.0.113.0/24; rule 1 is unchanged.
        let allowed = |rule: u16, c: SocketAddr| rule != 0 || c.ip() == other.ip();
        assert_eq!(t.revoked(allowed), vec![a.id]);
        assert!(t.get(b.id).is_some() && t.get(c.id).is_some());
    }

    #[test]
    fn unanswered_sessions_end_after_the_short_timeout() {
        let mut t = table(10, (20000, 20009));
        let l = RuleLimits {
            unanswered_timeout: Duration::from_secs(30),
            ..limits(10)
        };
        let quiet = t
            .open(0, 0, l, client(1), true, 0, silent)
            .unwrap()
            .entry
            .id;
        let replied = t
            .open(0, 0, l, client(2), true, 0, silent)
            .unwrap()
            .entry
            .id;
        let rules = |_: u16| Some(l);
        // The client keeps sending (XDP counts), the upstream never answers.
        let observe = |id: u32| Observed {
            kernel_packets: 7,
            slow_seen: 0,
            answered: id == replied,
            closing: false,
        };
        let e = t.expired(20 * SEC, rules, observe);
        assert!(e.closed.is_empty(), "{e:?}");
        let e = t.expired(31 * SEC, rules, observe);
        assert_eq!(e.closed, vec![quiet]);
        assert_eq!(e.unanswered, vec![quiet]);
        t.close(quiet);
        assert!(t.get(replied).unwrap().answered);
        let e = t.expired(60 * SEC, rules, observe);
        assert!(e.closed.is_empty(), "answered: the idle timeout applies");
    }

    #[test]
    fn association_ports_are_not_handed_out_in_order() {
        let mut pool = PortPool::new(PortRange {
            first: 30000,
            last: 31999,
        });
        let taken: Vec<u16> = (0..50)
            .map(|_| {
                let pick = u64::from_ne_bytes(crate::socks5::users::random::<8>().unwrap());
                pool.take_nth(pick).unwrap()
            })
            .collect();
        let in_order = taken.windows(2).filter(|w| w[1] == w[0] + 1).count();
        assert!(in_order < 5, "{taken:?}");
        let mut unique = taken.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 50, "each port once");
    }

    #[test]
    fn ports_are_reused_as_late_as_possible() {
        let mut t = table(10, (20000, 20002));
        let a = t
            .open(0, 0, limits(10), client(1), true, 0, silent)
            .map(|o| o.entry)
            .unwrap();
        t.close(a.id);
        let b = t
            .open(0, 0, limits(10), client(2), true, 0, silent)
            .map(|o| o.entry)
            .unwrap();
        assert_eq!(
            b.port, 20001,
            "the freed port waits behind the never-used ones"
        );
        assert_eq!(t.replace_port(b.id), Some(20002));
        assert_eq!(t.get(b.id).unwrap().port, 20002);
        assert_eq!(t.ports[0].take(), Some(20000));
        assert_eq!(
            t.ports[0].take(),
            Some(20001),
            "the port another socket held is tried last"
        );
    }

    #[test]
    fn expiry_follows_the_kernel_counters_and_the_slow_path() {
        let mut t = table(10, (20000, 20009));
        let a = t
            .open(0, 0, limits(10), client(1), true, 0, silent)
            .map(|o| o.entry)
            .unwrap();
        let b = t
            .open(0, 0, limits(10), client(2), true, 0, silent)
            .map(|o| o.entry)
            .unwrap();
        let c = t
            .open(7, 0, limits(10), client(3), true, 0, silent)
            .map(|o| o.entry)
            .unwrap();
        let rules = |r: u16| (r == 0).then(|| limits(10));
        // a: XDP carries its packets (the count keeps growing); b: nothing after opening;
        // c: its rule is gone.
        let asked = std::cell::RefCell::new(Vec::new());
        let packets = std::cell::Cell::new(0u64);
        let observe = |id: u32| {
            asked.borrow_mut().push(id);
            Observed {
                kernel_packets: if id == a.id { packets.get() } else { 0 },
                slow_seen: 0,
                // Only idle expiry here: both sessions were answered.
                answered: true,
                closing: false,
            }
        };
        let pass = |closed: Vec<u32>, carried: Vec<u32>| Expiry {
            closed,
            carried,
            unanswered: vec![],
        };
        // Within a quarter timeout of opening, nobody is asked; the orphan closes at once.
        assert_eq!(
            t.expired(60 * SEC, rules, observe),
            pass(vec![c.id], vec![])
        );
        assert!(asked.borrow().is_empty());
        t.close(c.id);
        // At 80 s both are asked; a's count moved, so it was seen now.
        packets.set(5);
        assert_eq!(
            t.expired(80 * SEC, rules, observe),
            pass(vec![], vec![a.id])
        );
        let mut both = asked.borrow().clone();
        both.sort_unstable();
        assert_eq!(both, vec![a.id, b.id]);
        // Asked again only a quarter timeout later.
        asked.borrow_mut().clear();
        assert_eq!(t.expired(100 * SEC, rules, observe), pass(vec![], vec![]));
        assert!(asked.borrow().is_empty(), "{:?}", asked.borrow());
        // b is over its timeout: asked once more before closing, and closed. a is quiet
        // (its count did not move since 80 s) and lives until 80 s + 300 s.
        assert_eq!(
            t.expired(301 * SEC, rules, observe),
            pass(vec![b.id], vec![])
        );
        t.close(b.id);
        assert_eq!(t.expired(380 * SEC, rules, observe), pass(vec![], vec![]));
        // A packet relayed by the controller at 370 s counts as well: a lives until 670 s.
        let slow = |_: u32| Observed {
            kernel_packets: 5,
            slow_seen: 370 * SEC,
            answered: true,
            closing: false,
        };
        assert_eq!(t.expired(381 * SEC, rules, slow), pass(vec![], vec![]));
        assert_eq!(t.expired(669 * SEC, rules, slow), pass(vec![], vec![]));
        assert_eq!(t.expired(671 * SEC, rules, slow), pass(vec![a.id], vec![]));
    }

    #[test]
    fn recovery_claims_ids_and_ports() {
        let mut t = table(10, (20000, 20009));
        assert!(t.recover(Entry::new(4, 0, client(1), 20005, 0)));
        assert!(
            !t.recover(Entry::new(4, 0, client(2), 20006, 0)),
            "an id is recovered once"
        );
        t.finish_recovery();
        let mut ids = Vec::new();
        let mut ports = Vec::new();
        for n in 0..9 {
            let e = t
                .open(0, 0, limits(100), client(10 + n), true, 0, silent)
                .map(|o| o.entry)
                .unwrap();
            ids.push(e.id);
            ports.push(e.port);
        }
        assert!(!ids.contains(&4) && !ports.contains(&20005));
        assert_eq!(
            t.open(0, 0, limits(100), client(99), true, 0, answered)
                .map(|o| o.entry),
            Err(Refusal::Full)
        );
    }

    #[test]
    fn sessions_to_upstreams_of_different_pools_share_ports() {
        // Two ports, four sessions: two to an upstream of pool 0, two to one of pool 1.
        let mut t = table(10, (20000, 20001));
        let mut open = |pool: usize, n: u16, observe: fn(u32) -> Observed| {
            t.open(0, pool, limits(100), client(n), true, 0, observe)
                .map(|o| o.entry)
        };
        let a = open(0, 1, silent).unwrap();
        let b = open(0, 2, silent).unwrap();
        assert_eq!(
            open(0, 3, answered),
            Err(Refusal::NoPort),
            "pool 0 has no port left (and its sessions were answered)"
        );
        let c = open(1, 4, silent).unwrap();
        let d = open(1, 5, silent).unwrap();
        assert_eq!(
            [a.port, b.port],
            [c.port, d.port],
            "the same ports, in pool 1"
        );
        assert_eq!(t.len(), 4);
        // A closed session's port comes back to its own pool only.
        t.close(a.id);
        assert_eq!(t.on_port_in(a.port, 0), None);
        assert_eq!(
            t.on_port_in(a.port, 1),
            Some(c.id),
            "the other pool's session holds it"
        );
        assert_eq!(t.ports[1].take(), None);
        let e = t
            .open(0, 0, limits(100), client(6), true, 0, silent)
            .map(|o| o.entry)
            .unwrap();
        assert_eq!((e.port, e.pool), (a.port, 0));
        // When a pool's ports are all held, only an unanswered session of that pool is
        // evicted for a port: pool 1's older unanswered session would free nothing there.
        let f = t
            .open(0, 0, limits(100), client(7), true, 0, silent)
            .map(|o| o.entry);
        assert!(
            f.as_ref().is_ok_and(|o| o.pool == 0 && o.port == e.port),
            "{f:?}: the unanswered session of pool 0 gave its port"
        );
        assert!(t.find(0, client(6)).is_none(), "e was evicted");
        assert!(t.get(c.id).is_some() && t.get(b.id).is_some());
        // Lending takes from the pool asked for.
        t.close(d.id);
        assert_eq!(t.lend(0, 5), vec![]);
        assert_eq!(
            t.lend(1, 5).iter().map(|l| l.1).collect::<Vec<_>>(),
            vec![d.port]
        );
        assert_eq!((t.lent(0), t.lent(1)), (0, 1));
    }

    #[test]
    fn a_refusal_for_room_gives_its_token_back_for_the_retry() {
        // One new session a second, a burst of one; one port.
        let mut t = table(10, (20000, 20000));
        let l = RuleLimits {
            new_sessions_per_second: 1,
            new_sessions_burst: 1,
            ..limits(100)
        };
        let a = t.open(0, 0, l, client(1), true, 0, answered).unwrap().entry;
        // A second later: a token, but no port (the one port is a's, answered).
        let sec = 1_000_000_000;
        assert_eq!(
            t.open(0, 0, l, client(2), true, sec, answered)
                .map(|o| o.entry),
            Err(Refusal::NoPort)
        );
        // The caller makes room and gives the token back: the retry is not rate-limited.
        t.close(a.id);
        t.give_back_token(0, l);
        assert!(t.open(0, 0, l, client(2), true, sec, answered).is_ok());
        assert_eq!(
            t.open(0, 0, l, client(3), true, sec, answered)
                .map(|o| o.entry),
            Err(Refusal::RateLimited),
            "one token, used once"
        );
    }

    #[test]
    fn a_claimed_port_is_skipped_and_comes_back_once() {
        let mut pool = PortPool::new(PortRange {
            first: 100,
            last: 103,
        });
        assert!(pool.claim(101) && !pool.claim(101), "claimed once");
        assert_eq!(pool.take(), Some(100));
        assert_eq!(pool.take(), Some(102), "the claimed port is passed over");
        pool.put(101);
        pool.put(101);
        pool.put(100);
        assert!(!pool.claim(99) && !pool.claim(104), "outside the range");
        let rest: Vec<u16> = std::iter::from_fn(|| pool.take()).collect();
        assert_eq!(
            rest,
            vec![103, 101, 100],
            "each free port once, freed last, taken last"
        );
        assert!(pool.is_empty());
    }

    #[test]
    fn ids_lent_to_the_kernel_are_neither_handed_out_nor_lost() {
        let mut t = table(4, (20000, 20009));
        let lent = t.lend(0, 3);
        assert_eq!(lent.len(), 3);
        assert_eq!(t.lent(0), 3);
        // One id left for the controller's own sessions; then the table is full.
        let own = t
            .open(0, 0, limits(100), client(1), true, 0, silent)
            .map(|o| o.entry)
            .unwrap();
        assert!(lent
            .iter()
            .all(|(id, port)| *id != own.id && *port != own.port));
        assert_eq!(
            t.open(0, 0, limits(100), client(2), true, 0, answered)
                .map(|o| o.entry),
            Err(Refusal::Full)
        );
        assert!(t.lend(0, 1).is_empty(), "nothing left to lend");
        // The kernel opened a session with the first id: it counts like any other.
        let (id, port) = lent[0];
        assert!(t.adopt(Entry::new(id, 1, client(3), port, 0)));
        assert!(
            !t.adopt(Entry::new(id, 1, client(4), port, 0)),
            "adopted once"
        );
        assert_eq!((t.lent(0), t.len(), t.sessions_of(1)), (2, 2, 1));
        // A wrong port for a lent id is refused.
        assert!(!t.adopt(Entry::new(lent[1].0, 1, client(5), 29999, 0)));
        // The rest come back (the pool was drained) and can be handed out again.
        t.unlend(lent.iter().map(|(id, _)| *id));
        assert_eq!(t.lent(0), 0);
        let again = t
            .open(0, 0, limits(100), client(6), true, 0, silent)
            .map(|o| o.entry)
            .unwrap();
        assert!(lent[1..].iter().any(|(id, _)| *id == again.id));
        // Closing an adopted session frees its id and port; two ids are free, and the
        // table's last eighth (rounded up: one id) is never lent.
        assert!(t.close(id).is_some());
        assert_eq!(t.lend(0, 10).len(), 1);
    }

    #[test]
    fn a_session_a_predecessor_lent_is_adopted_with_its_id_and_port() {
        let mut t = table(8, (20000, 20009));
        t.finish_recovery();
        // Opened by the kernel from a pool this controller never filled (a takeover).
        assert!(t.adopt(Entry::new(5, 1, client(1), 20007, 0)));
        let lent = t.lend(0, 10);
        assert!(lent.iter().all(|(id, port)| *id != 5 && *port != 20007));
        assert_eq!(
            lent.len(),
            6,
            "the table's last eighth (one id) is never lent"
        );
    }

    #[test]
    fn closing_tcp_sessions_end_after_the_linger_not_the_idle_timeout() {
        let mut t = table(8, (20000, 20009));
        let a = t
            .open(0, 0, limits(100), client(1), true, 0, answered)
            .map(|o| o.entry)
            .unwrap();
        let b = t
            .open(0, 0, limits(100), client(2), true, 0, answered)
            .map(|o| o.entry)
            .unwrap();
        let rules = |_| Some(limits(100));
        // `a` closed (both FINs) at 10 s; `b` is reported closing by a look at the kernel.
        t.set_closing(a.id, 10 * SEC);
        let linger = crate::config::TCP_LINGER.as_nanos() as u64;
        let none = Expiry::default();
        assert_eq!(t.expired(10 * SEC + linger, rules, answered), none);
        let closing = |_| Observed {
            answered: true,
            closing: true,
            ..Observed::default()
        };
        // 80 s: `b` has been quiet for a quarter of its timeout: looked at, found closing.
        let out = t.expired(80 * SEC, rules, closing);
        assert_eq!(out.closed, vec![a.id]);
        t.close(a.id);
        assert_eq!(t.expired(80 * SEC + linger, rules, closing), none);
        assert_eq!(
            t.expired(81 * SEC + linger, rules, closing).closed,
            vec![b.id]
        );
    }

    #[test]
    fn a_closing_session_the_kernel_reopened_lives_on_as_a_new_connection() {
        let mut t = table(8, (20000, 20009));
        let a = t
            .open(0, 0, limits(100), client(1), true, 0, answered)
            .map(|o| o.entry)
            .unwrap();
        let rules = |_| {
            let mut l = limits(100);
            l.unanswered_timeout = Duration::from_secs(5);
            Some(l)
        };
        t.set_closing(a.id, 10 * SEC);
        let linger = crate::config::TCP_LINGER.as_nanos() as u64;
        // A new SYN cleared the kernel's marks before the linger ended.
        let reopened = |_| Observed::default();
        let end = 10 * SEC + linger + 1;
        assert_eq!(t.expired(end, rules, reopened), Expiry::default(), "kept");
        assert_eq!(
            t.get(a.id).map(|e| (e.closing, e.answered)),
            Some((0, false))
        );
        // Its new connection is never answered: it ends after the unanswered timeout.
        let out = t.expired(end + 6 * SEC, rules, reopened);
        assert_eq!((out.closed, out.unanswered), (vec![a.id], vec![a.id]));
    }
}
