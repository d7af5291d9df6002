//! The session table: who may open a session, which relay port it gets, when it expires.
//!
//! No sockets and no maps here: the I/O layer (`forward`) asks, this answers, and the same
//! answers hold whether XDP or the controller moves the bytes. Time is passed in (monotonic
//! nanoseconds). The XDP program keeps no clock (a clock read per packet costs as much as a
//! fifth of the fast path): the table learns that XDP carried a session's packets from its
//! packet counters changing.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
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
}

impl Refusal {
    pub fn name(self) -> &'static str {
        match self {
            Refusal::NotAllowed => "not_allowed",
            Refusal::RuleLimit => "rule_limit",
            Refusal::Full => "table_full",
            Refusal::NoPort => "no_port",
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
}

impl Entry {
    pub fn new(id: u32, rule: u16, client: SocketAddr, port: u16, now: u64) -> Entry {
        Entry {
            id,
            rule,
            client,
            port,
            last_seen: now,
            checked: now,
            kernel_packets: 0,
        }
    }
}

/// One pass of [`Table::expired`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expiry {
    /// Sessions to close: idle for longer than their timeout, or their rule is gone.
    pub closed: Vec<u32>,
    /// Sessions whose XDP packet count moved since the last look: seen now.
    pub carried: Vec<u32>,
}

/// What the others who move a session's bytes say about it: the XDP program's packet count
/// (both directions) and the last time the controller's own relays saw a packet (0 if never).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub kernel_packets: u64,
    pub slow_seen: u64,
}

/// Session ports, handed out oldest-freed first so that a port is reused as late as possible
/// (late datagrams of an old session then rarely reach a new one).
#[derive(Debug)]
pub struct PortPool {
    free: VecDeque<u16>,
}

impl PortPool {
    pub fn new(range: PortRange) -> PortPool {
        PortPool {
            free: (range.first..=range.last).collect(),
        }
    }

    pub fn take(&mut self) -> Option<u16> {
        self.free.pop_front()
    }

    /// Returns a port to the pool (a closed session's, or one another socket holds: it is
    /// tried again last).
    pub fn put(&mut self, port: u16) {
        self.free.push_back(port);
    }

    /// Takes a specific port out of the pool (a session recovered after a restart).
    pub fn claim(&mut self, port: u16) -> bool {
        match self.free.iter().position(|p| *p == port) {
            Some(i) => {
                self.free.remove(i);
                true
            }
            None => false,
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
    pub ports: PortPool,
}

/// Limits that apply to one rule.
#[derive(Clone, Copy, Debug)]
pub struct RuleLimits {
    pub max_sessions: u32,
    pub idle_timeout: Duration,
}

impl Table {
    pub fn new(capacity: u32, ports: PortRange) -> Table {
        Table {
            capacity,
            entries: HashMap::new(),
            by_client: HashMap::new(),
            free_ids: Vec::new(),
            next_id: 0,
            per_rule: HashMap::new(),
            ports: PortPool::new(ports),
        }
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

    /// Opens a session for `client` on `rule`, given whether the client is allowed. The caller
    /// has checked [`Table::find`] first. The port is a candidate: if the I/O layer cannot
    /// bind it, it calls [`Table::replace_port`].
    pub fn open(
        &mut self,
        rule: u16,
        limits: RuleLimits,
        client: SocketAddr,
        allowed: bool,
        now: u64,
    ) -> Result<Entry, Refusal> {
        if !allowed {
            return Err(Refusal::NotAllowed);
        }
        if self.sessions_of(rule) >= limits.max_sessions {
            return Err(Refusal::RuleLimit);
        }
        if self.entries.len() as u32 >= self.capacity {
            return Err(Refusal::Full);
        }
        let port = self.ports.take().ok_or(Refusal::NoPort)?;
        let Some(id) = self.alloc_id() else {
            self.ports.put(port);
            return Err(Refusal::Full);
        };
        let entry = Entry::new(id, rule, client, port, now);
        self.insert(entry.clone());
        Ok(entry)
    }

    fn insert(&mut self, entry: Entry) {
        self.by_client.insert((entry.rule, entry.client), entry.id);
        *self.per_rule.entry(entry.rule).or_default() += 1;
        self.entries.insert(entry.id, entry);
    }

    /// Gives session `id` another port because its candidate was taken by another socket.
    /// The taken port goes to the back of the pool.
    pub fn replace_port(&mut self, id: u32) -> Option<u16> {
        let next = self.ports.take()?;
        let entry = self.entries.get_mut(&id)?;
        let old = std::mem::replace(&mut entry.port, next);
        self.ports.put(old);
        Some(next)
    }

    /// Re-creates a session found in the pinned maps after a restart.
    pub fn recover(&mut self, entry: Entry) -> bool {
        if entry.id >= self.capacity || self.entries.contains_key(&entry.id) {
            return false;
        }
        if !self.ports.claim(entry.port) {
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
        self.free_ids.push(id);
        self.ports.put(entry.port);
        Some(entry)
    }

    /// Sessions idle for longer than their rule's timeout at `now`. `observe` reports what the
    /// XDP program and the controller's relays saw of a session; it costs a map read, so it is
    /// asked only of sessions quiet for a quarter of their timeout, at most once per quarter
    /// timeout, and always before closing one. A packet count that changed since the last look
    /// means traffic since then, counted as traffic now: a session therefore closes between 1
    /// and 1.25 timeouts after its last packet.
    pub fn expired(
        &mut self,
        now: u64,
        limits: impl Fn(u16) -> Option<RuleLimits>,
        mut observe: impl FnMut(u32) -> Observed,
    ) -> Expiry {
        let mut out = Expiry::default();
        for e in self.entries.values_mut() {
            // The rule is gone (configuration changed): close.
            let Some(l) = limits(e.rule) else {
                out.closed.push(e.id);
                continue;
            };
            let timeout = l.idle_timeout.as_nanos() as u64;
            let quiet = now.saturating_sub(e.last_seen);
            let due = now.saturating_sub(e.checked) >= timeout / 4 || quiet > timeout;
            if quiet <= timeout / 4 || !due {
                continue;
            }
            let o = observe(e.id);
            e.checked = now;
            if o.kernel_packets != e.kernel_packets {
                e.kernel_packets = o.kernel_packets;
                e.last_seen = now;
                out.carried.push(e.id);
            }
            e.last_seen = e.last_seen.max(o.slow_seen);
            if now.saturating_sub(e.last_seen) > timeout {
                out.closed.push(e.id);
            }
        }
        out.closed.sort_unstable();
        out.carried.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn limits(max: u32) -> RuleLimits {
        RuleLimits {
            max_sessions: max,
            idle_timeout: Duration::from_secs(300),
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
        let e = t.open(0, limits(10), client(1), true, 5).unwrap();
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
        assert_eq!(
            t.open(0, limits(10), client(1), false, 0),
            Err(Refusal::NotAllowed)
        );
        for n in 0..2 {
            t.open(0, limits(2), client(n), true, 0).unwrap();
        }
        assert_eq!(
            t.open(0, limits(2), client(9), true, 0),
            Err(Refusal::RuleLimit)
        );
        t.open(1, limits(10), client(2), true, 0).unwrap();
        assert_eq!(
            t.open(1, limits(10), client(3), true, 0),
            Err(Refusal::Full)
        );
        assert_eq!(t.len(), 3, "no live session was evicted");
        let mut few_ports = table(10, (20000, 20000));
        few_ports.open(0, limits(10), client(1), true, 0).unwrap();
        assert_eq!(
            few_ports.open(0, limits(10), client(2), true, 0),
            Err(Refusal::NoPort)
        );
    }

    #[test]
    fn ports_are_reused_as_late_as_possible() {
        let mut t = table(10, (20000, 20002));
        let a = t.open(0, limits(10), client(1), true, 0).unwrap();
        t.close(a.id);
        let b = t.open(0, limits(10), client(2), true, 0).unwrap();
        assert_eq!(
            b.port, 20001,
            "the freed port waits behind the never-used ones"
        );
        assert_eq!(t.replace_port(b.id), Some(20002));
        assert_eq!(t.get(b.id).unwrap().port, 20002);
        assert_eq!(t.ports.take(), Some(20000));
        assert_eq!(
            t.ports.take(),
            Some(20001),
            "the port another socket held is tried last"
        );
    }

    #[test]
    fn expiry_follows_the_kernel_counters_and_the_slow_path() {
        let mut t = table(10, (20000, 20009));
        let a = t.open(0, limits(10), client(1), true, 0).unwrap();
        let b = t.open(0, limits(10), client(2), true, 0).unwrap();
        let c = t.open(7, limits(10), client(3), true, 0).unwrap();
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
            }
        };
        let pass = |closed: Vec<u32>, carried: Vec<u32>| Expiry { closed, carried };
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
            let e = t.open(0, limits(100), client(10 + n), true, 0).unwrap();
            ids.push(e.id);
            ports.push(e.port);
        }
        assert!(!ids.contains(&4) && !ports.contains(&20005));
        assert_eq!(
            t.open(0, limits(100), client(99), true, 0),
            Err(Refusal::Full)
        );
    }
}
