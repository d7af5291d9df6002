//! Per-user limits: data quota with a reset period, expiry, enabled flag, bandwidth limit.
//! Pure arithmetic, no sockets and no maps: the SOCKS5 server feeds a [`Ledger`] what the
//! kernel and the controller carried, and applies what its [`Ledger::tick`] returns (a lease
//! for the kernel's `USER_LIMITS` record, budgets for the controller's own paths, whether the
//! user is blocked).
//!
//! How the bytes are shared out: the ledger holds one token pool per direction (refilled at
//! the rate, capped at the burst) and the quota left. Each tick it gives the kernel a share of
//! both (the share of the user's bytes the kernel carried in the last tick, kept between 1/8
//! and 7/8) and the controller the rest, so the two never spend the same byte: the quota is
//! overshot by at most a datagram per CPU, and the rate holds over any second within the
//! burst. What one side leaves unspent goes back to the pool at the next tick.

use std::time::Duration;

use relay_common::limits::{UserLimit, LIMIT_BLOCKED, LIMIT_COUNT, LIMIT_QUOTA, LIMIT_RATE};

/// When a quota starts again from zero. Periods are in UTC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Period {
    /// Never: the quota is for the life of the user.
    #[default]
    Never,
    /// At 00:00 UTC each day.
    Daily,
    /// At 00:00 UTC on this day of each month (1-28, so that every month has it).
    Monthly(u8),
}

impl std::str::FromStr for Period {
    type Err = anyhow::Error;

    /// `never`, `daily`, `monthly` (on the 1st) or `monthly:DAY` (1-28).
    fn from_str(s: &str) -> anyhow::Result<Period> {
        match s {
            "never" => Ok(Period::Never),
            "daily" => Ok(Period::Daily),
            "monthly" => Ok(Period::Monthly(1)),
            _ => {
                let day = s
                    .strip_prefix("monthly:")
                    .and_then(|d| d.parse::<u8>().ok())
                    .filter(|d| (1..=28).contains(d))
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "{s:?} is not a quota period: never, daily, monthly or monthly:DAY (1-28)"
                        )
                    })?;
                Ok(Period::Monthly(day))
            }
        }
    }
}

impl std::fmt::Display for Period {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Period::Never => f.write_str("never"),
            Period::Daily => f.write_str("daily"),
            Period::Monthly(d) => write!(f, "monthly:{d}"),
        }
    }
}

/// Start (Unix seconds, UTC) of the period `now` falls in; 0 for [`Period::Never`].
pub fn period_start(period: Period, now: i64) -> i64 {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp(now) else {
        return 0;
    };
    let midnight = |d: time::Date| d.midnight().assume_utc().unix_timestamp();
    match period {
        Period::Never => 0,
        Period::Daily => midnight(t.date()),
        Period::Monthly(day) => {
            let day = day.clamp(1, 28);
            let (mut year, mut month) = (t.year(), t.month());
            if t.day() < day {
                month = month.previous();
                if month == time::Month::December {
                    year -= 1;
                }
            }
            time::Date::from_calendar_date(year, month, day).map_or(0, midnight)
        }
    }
}

/// A user's limits; `Limits::default()` is none at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes per period, both directions together.
    pub quota: Option<u64>,
    pub period: Period,
    /// Unix seconds after which the user is refused.
    pub expires: Option<i64>,
    /// Bytes per second, each way.
    pub rate: Option<u64>,
    /// Bytes a direction may send at once above the rate (the token pool's size).
    pub burst: u64,
    /// Distinct client addresses at once.
    pub max_devices: Option<u32>,
    pub enabled: bool,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            quota: None,
            period: Period::Never,
            expires: None,
            rate: None,
            burst: 0,
            max_devices: None,
            enabled: true,
        }
    }
}

impl Limits {
    /// The burst when the configuration gives none: a tenth of a second at the rate (which
    /// keeps a second's bytes within 10 % of the rate), at least 64 KiB (a TCP window's worth).
    pub fn default_burst(rate: u64) -> u64 {
        (rate / 10).max(64 * 1024)
    }

    /// Whether bytes are metered: a quota or a rate (the kernel CONNECT path, which cannot
    /// hold bytes back, is then not used).
    pub fn meters_bytes(&self) -> bool {
        self.quota.is_some() || self.rate.is_some()
    }
}

/// Why a user may not use the relay now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    Disabled,
    Expired,
    OutOfQuota,
}

impl Block {
    pub fn name(self) -> &'static str {
        match self {
            Block::Disabled => "disabled",
            Block::Expired => "expired",
            Block::OutOfQuota => "out of quota",
        }
    }
}

/// What a user used in one period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Start of the period the bytes belong to (Unix seconds; 0 for [`Period::Never`]).
    pub period_start: i64,
    /// Bytes client to destination, destination to client.
    pub bytes: [u64; 2],
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.bytes[0].saturating_add(self.bytes[1])
    }

    /// Moves to the period `now` falls in if that one is later than the period held; usage
    /// starts again from zero. Returns whether it did. A clock set back never moves it back
    /// (the period held keeps counting), so no period is counted twice; a period change
    /// (`daily` to `monthly`) starts the new period's count.
    pub fn roll(&mut self, period: Period, now: i64) -> bool {
        let start = period_start(period, now);
        let moved_on = start > self.period_start
            || (period == Period::Never && self.period_start != 0)
            || (period != Period::Never && self.period_start == 0);
        if moved_on {
            *self = Usage {
                period_start: start,
                bytes: [0, 0],
            };
        }
        moved_on
    }
}

/// What the controller's own paths may spend until the next tick (bytes; `i64::MAX`: no
/// limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub quota: i64,
    pub rate: [i64; 2],
}

impl Budget {
    pub const UNLIMITED: Budget = Budget {
        quota: i64::MAX,
        rate: [i64::MAX; 2],
    };
}

/// One tick's decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tick {
    /// The kernel's lease (`USER_LIMITS`).
    pub kernel: UserLimit,
    /// The controller's paths' budget.
    pub budget: Budget,
    pub blocked: Option<Block>,
    /// The period moved on at this tick (usage started again from zero).
    pub reset: bool,
}

/// What each side asks for the next tick: twice what it moved in the last, and a little
/// more, so that a side that starts moving is not held back for a tick: the kernel more (a
/// datagram it cannot carry is dropped), the controller less (it waits for the next tick).
const SHARE_FLOOR: u64 = 64 * 1024;
const SHARE_FLOOR_USER: u64 = 16 * 1024;

/// A quota is used up once less than this is left: less than a few datagrams, which would
/// otherwise be shared out in ever smaller leases that no datagram fits.
pub const QUOTA_SLACK: u64 = 4 * 1024;

/// Shares `avail` bytes between the kernel (returned first) and the controller, from what
/// each moved in the last tick. Each gets what it asks for when both fit, the kernel the rest
/// (a datagram XDP cannot carry is dropped, where the controller only waits); when they do not
/// fit, in proportion to what they ask.
fn share(avail: u64, (kernel, user): (u64, u64)) -> (u64, i64) {
    let want_k = kernel.saturating_mul(2).saturating_add(SHARE_FLOOR);
    let want_u = user.saturating_mul(2).saturating_add(SHARE_FLOOR_USER);
    let u = if want_k.saturating_add(want_u) <= avail {
        want_u
    } else {
        (u128::from(avail) * u128::from(want_u) / (u128::from(want_k) + u128::from(want_u))) as u64
    };
    (avail - u, u.min(i64::MAX as u64) as i64)
}

/// A user's accounting and limits, advanced by [`Ledger::tick`].
#[derive(Clone, Debug)]
pub struct Ledger {
    pub limits: Limits,
    pub usage: Usage,
    /// The kernel's and the controller's byte counters (monotonic, per direction) as last
    /// seen: each tick counts what they moved since.
    pub kernel_seen: [u64; 2],
    pub user_seen: [u64; 2],
    /// Rate tokens per direction, as of the last tick.
    pool: [i64; 2],
    /// Monotonic nanoseconds of the last tick.
    last: Option<u64>,
    /// Bytes the kernel and the controller moved for the user in the last tick: how what is
    /// left is shared out at the next.
    last_moved: (u64, u64),
    /// The kernel counter given to the next tick is a new baseline (its source changed).
    rebase: bool,
}

/// The longest gap a tick refills for: a stalled controller does not hand out a burst of
/// saved-up tokens beyond the pool's size anyway, but the arithmetic stays small.
const MAX_GAP: Duration = Duration::from_secs(1);

impl Ledger {
    /// A ledger that takes up `usage`, with the counters at `kernel`/`user` as its baseline.
    pub fn new(limits: Limits, usage: Usage, kernel: [u64; 2], user: [u64; 2]) -> Ledger {
        let burst = limits.burst.min(i64::MAX as u64) as i64;
        Ledger {
            limits,
            usage,
            kernel_seen: kernel,
            user_seen: user,
            pool: [burst; 2],
            last: None,
            last_moved: (0, 0),
            rebase: false,
        }
    }

    /// New limits (a reload); usage, counters and tokens carry on. A user whose bytes become
    /// metered, or no longer are, has its kernel bytes read from another counter from the next
    /// tick on (see [`Ledger::tick`]): that tick takes it as a new baseline.
    pub fn set_limits(&mut self, limits: Limits) {
        if limits.meters_bytes() != self.limits.meters_bytes() {
            self.rebase = true;
        }
        let burst = limits.burst.min(i64::MAX as u64) as i64;
        if self.limits.rate != limits.rate {
            self.pool = [burst; 2];
        }
        for p in &mut self.pool {
            *p = (*p).min(burst);
        }
        self.limits = limits;
    }

    /// Why the user is refused at `now` (Unix seconds), going by the usage counted so far.
    pub fn blocked(&self, now: i64) -> Option<Block> {
        if !self.limits.enabled {
            Some(Block::Disabled)
        } else if self.limits.expires.is_some_and(|e| now >= e) {
            Some(Block::Expired)
        } else if self
            .limits
            .quota
            .is_some_and(|q| self.usage.total().saturating_add(QUOTA_SLACK) > q)
        {
            Some(Block::OutOfQuota)
        } else {
            None
        }
    }

    /// Counts what the counters moved since the last tick, rolls the period, refills the
    /// pools and shares out what the user may spend until the next tick.
    ///
    /// `mono_ns` is a monotonic clock (token refill); `now` the wall clock (periods, expiry);
    /// `kernel` and `user` the kernel's and the controller's byte counters for the user: for a
    /// metered user (a quota or a rate) the kernel's own per-user count (`USER_SPENT`), which
    /// only such users pay for; for the others, what their fast-path flows carried.
    /// A counter below what was seen (maps made anew, a slot reused) is a new baseline.
    pub fn tick(&mut self, mono_ns: u64, now: i64, kernel: [u64; 2], user: [u64; 2]) -> Tick {
        if std::mem::take(&mut self.rebase) {
            self.kernel_seen = kernel;
        }
        let mut moved = [0u64; 2];
        let (mut k_total, mut u_total) = (0u64, 0u64);
        for d in 0..2 {
            let k = kernel[d].saturating_sub(self.kernel_seen[d]);
            let u = user[d].saturating_sub(self.user_seen[d]);
            self.kernel_seen[d] = kernel[d];
            self.user_seen[d] = user[d];
            moved[d] = k.saturating_add(u);
            k_total = k_total.saturating_add(k);
            u_total = u_total.saturating_add(u);
        }
        let reset = self.usage.roll(self.limits.period, now);
        for (used, m) in self.usage.bytes.iter_mut().zip(moved) {
            *used = used.saturating_add(m);
        }
        self.last_moved = (k_total, u_total);
        let gap = self.last.map_or(0, |l| mono_ns.saturating_sub(l));
        let gap = gap.min(MAX_GAP.as_nanos() as u64);
        self.last = Some(mono_ns);
        let blocked = self.blocked(now);
        // The kernel counts a user's bytes itself only when they are metered: a user without
        // limits pays nothing per datagram but the look at its flags.
        let mut flags = if self.limits.meters_bytes() {
            LIMIT_COUNT
        } else {
            0
        };
        let mut budget = Budget::UNLIMITED;
        let mut kernel_limit = UserLimit::default();
        let last_moved = self.last_moved;
        let split = |avail: i64| share(avail.max(0) as u64, last_moved);
        if let Some(rate) = self.limits.rate {
            flags |= LIMIT_RATE;
            let burst = self.limits.burst.min(i64::MAX as u64) as i64;
            let refill = (u128::from(rate) * u128::from(gap) / 1_000_000_000) as i64;
            for d in 0..2 {
                let spent = moved[d].min(i64::MAX as u64) as i64;
                self.pool[d] = self.pool[d]
                    .saturating_sub(spent)
                    .saturating_add(refill)
                    .min(burst);
                let (k, u) = split(self.pool[d]);
                kernel_limit.allow[d] = kernel[d].saturating_add(k);
                budget.rate[d] = u;
            }
        }
        if let Some(quota) = self.limits.quota {
            flags |= LIMIT_QUOTA;
            let left = quota
                .saturating_sub(self.usage.total())
                .min(i64::MAX as u64) as i64;
            let (k, u) = split(left);
            kernel_limit.quota_allow = kernel[0].saturating_add(kernel[1]).saturating_add(k);
            budget.quota = u;
        }
        if blocked.is_some() {
            flags |= LIMIT_BLOCKED;
            budget = Budget {
                quota: 0,
                rate: [0, 0],
            };
        }
        kernel_limit.flags = flags;
        Tick {
            kernel: kernel_limit,
            budget,
            blocked,
            reset,
        }
    }
}

/// Parses a byte size: a number with an optional unit, `B`, `KB`/`MB`/`GB`/`TB` (powers of
/// 1000) or `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024); `10 GB`, `512MiB`, `1000000`.
pub fn parse_bytes(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => {
            anyhow::bail!("{s:?}: unknown unit {other:?} (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("{s:?} is not a size (e.g. 10 GB, 512 MiB, 2 MB)"))?;
    let v = n * mult as f64;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        anyhow::bail!("{s:?} is out of range");
    }
    Ok(v.round() as u64)
}

/// Parses an RFC 3339 time (`2027-01-31T00:00:00Z`) or a date (`2027-01-31`, its start in
/// UTC) into Unix seconds.
pub fn parse_time(s: &str) -> anyhow::Result<i64> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(t) = time::OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t.unix_timestamp());
    }
    let date_format = time::format_description::parse_borrowed::<2>("[year]-[month]-[day]")
        .map_err(|e| anyhow::anyhow!("date format: {e}"))?;
    time::Date::parse(s, &date_format)
        .map(|d| d.midnight().assume_utc().unix_timestamp())
        .map_err(|_| {
            anyhow::anyhow!(
                "{s:?} is not a time: RFC 3339 (2027-01-31T00:00:00Z) or a date (2027-01-31)"
            )
        })
}

/// Unix seconds as RFC 3339 in UTC.
pub fn format_time(t: i64) -> String {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;
    /// 2027-01-31T13:00:00Z.
    const JAN31: i64 = 1_801_400_400;

    fn at(s: &str) -> i64 {
        parse_time(s).unwrap()
    }

    #[test]
    fn periods_start_at_utc_boundaries() {
        assert_eq!(JAN31, at("2027-01-31T13:00:00Z"));
        assert_eq!(period_start(Period::Never, JAN31), 0);
        assert_eq!(period_start(Period::Daily, JAN31), at("2027-01-31"));
        assert_eq!(period_start(Period::Monthly(1), JAN31), at("2027-01-01"));
        // Before the reset day: the period began last month (across a year, too).
        assert_eq!(
            period_start(Period::Monthly(15), at("2027-01-10T00:00:00Z")),
            at("2026-12-15")
        );
        // On the day itself, at midnight: the new period.
        assert_eq!(
            period_start(Period::Monthly(15), at("2027-03-15T00:00:00Z")),
            at("2027-03-15")
        );
        assert_eq!(
            period_start(Period::Monthly(15), at("2027-03-14T23:59:59Z")),
            at("2027-02-15")
        );
        assert_eq!(
            period_start(Period::Daily, at("2027-03-15T00:00:00Z") - 1),
            at("2027-03-14")
        );
        // Local offsets are read as the instant they name.
        assert_eq!(at("2027-01-31T16:00:00+03:00"), JAN31);
    }

    #[test]
    fn period_names_round_trip_and_bad_ones_are_refused() {
        for p in [
            Period::Never,
            Period::Daily,
            Period::Monthly(1),
            Period::Monthly(28),
        ] {
            assert_eq!(p.to_string().parse::<Period>().unwrap(), p);
        }
        assert_eq!("monthly".parse::<Period>().unwrap(), Period::Monthly(1));
        for bad in ["weekly", "monthly:0", "monthly:29", "monthly:x", ""] {
            let e = bad.parse::<Period>().unwrap_err().to_string();
            assert!(e.contains("quota period"), "{bad}: {e}");
        }
    }

    #[test]
    fn usage_rolls_forward_only() {
        let mut u = Usage {
            period_start: period_start(Period::Daily, JAN31),
            bytes: [5, 6],
        };
        // Same day: nothing.
        assert!(!u.roll(Period::Daily, JAN31 + 3600));
        assert_eq!(u.total(), 11);
        // The clock set back a week: the period held keeps counting.
        assert!(!u.roll(Period::Daily, JAN31 - 7 * DAY));
        assert_eq!(u.total(), 11);
        // Next day: from zero.
        assert!(u.roll(Period::Daily, JAN31 + DAY));
        assert_eq!(u.bytes, [0, 0]);
        assert_eq!(u.period_start, at("2027-02-01"));
        // A quota without a period never resets; switching to one starts its count.
        let mut never = Usage {
            bytes: [1, 1],
            ..Usage::default()
        };
        assert!(!never.roll(Period::Never, JAN31 + 100 * DAY));
        assert!(never.roll(Period::Monthly(1), JAN31));
        assert_eq!(never.total(), 0);
    }

    fn limits(quota: Option<u64>, rate: Option<u64>) -> Limits {
        Limits {
            quota,
            rate,
            burst: rate.map_or(0, Limits::default_burst),
            ..Limits::default()
        }
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn no_limits_unlimited_budget_and_no_kernel_flags() {
        let mut l = Ledger::new(Limits::default(), Usage::default(), [0; 2], [0; 2]);
        let t = l.tick(0, JAN31, [100, 200], [1, 2]);
        assert_eq!(
            t.kernel.flags, 0,
            "nothing refused, nothing counted by the kernel"
        );
        assert_eq!(t.budget, Budget::UNLIMITED);
        assert_eq!(l.usage.bytes, [101, 202]);
        assert_eq!(t.blocked, None);
    }

    #[test]
    fn quota_is_shared_out_and_never_overshot() {
        let quota = 10_000_000;
        let mut l = Ledger::new(limits(Some(quota), None), Usage::default(), [0; 2], [0; 2]);
        let (mut kernel, mut user) = ([0u64; 2], [0u64; 2]);
        let mut t = l.tick(0, JAN31, kernel, user);
        // Both sides spend everything they are given, every tick, until blocked.
        for i in 1..200 {
            if t.blocked.is_some() {
                break;
            }
            let k = t.kernel.quota_allow - (kernel[0] + kernel[1]);
            kernel[1] += k;
            user[0] += t.budget.quota as u64;
            t = l.tick(i * 50 * MS, JAN31, kernel, user);
        }
        assert_eq!(t.blocked, Some(Block::OutOfQuota));
        assert_eq!(l.usage.total(), quota, "exactly the quota, no byte over");
        assert!(t.kernel.flags & LIMIT_BLOCKED != 0);
        assert_eq!(t.budget.quota, 0);
    }

    #[test]
    fn a_user_on_one_side_runs_out_in_a_few_ticks() {
        // Only the controller moves bytes (a CONNECT download), spending all it is given; or
        // only the kernel, in whole 1000-byte datagrams. Either way the user is out within a
        // few ticks of reaching the quota, never stuck just below it.
        for kernel_side in [false, true] {
            let quota = 10_000_000;
            let mut l = Ledger::new(limits(Some(quota), None), Usage::default(), [0; 2], [0; 2]);
            let (mut kernel, mut user) = ([0u64; 2], [0u64; 2]);
            let mut t = l.tick(0, JAN31, kernel, user);
            let mut ticks = 0;
            while t.blocked.is_none() {
                ticks += 1;
                assert!(
                    ticks < 400,
                    "still not out after {ticks} ticks: {:?}",
                    l.usage
                );
                if kernel_side {
                    let lease = t.kernel.quota_allow - (kernel[0] + kernel[1]);
                    kernel[0] += lease.min(1_000_000) / 1000 * 1000;
                } else {
                    user[1] += (t.budget.quota as u64).min(1_000_000);
                }
                t = l.tick(ticks * 50 * MS, JAN31, kernel, user);
            }
            let used = l.usage.total();
            assert!(used <= quota && used + QUOTA_SLACK > quota, "{used}");
            assert!(ticks < 40, "{ticks} ticks at 20 MB/s for 10 MB");
        }
    }

    #[test]
    fn a_kernel_only_user_gets_most_of_what_is_left() {
        let mut l = Ledger::new(
            limits(Some(8_000_000), None),
            Usage::default(),
            [0; 2],
            [0; 2],
        );
        l.tick(0, JAN31, [0; 2], [0; 2]);
        let t = l.tick(50 * MS, JAN31, [1_000_000, 0], [0; 2]);
        // 7 MB left: the controller gets what it asks for having moved nothing (the floor),
        // the kernel the rest.
        assert_eq!(t.budget.quota, SHARE_FLOOR_USER as i64);
        assert_eq!(
            t.kernel.quota_allow,
            1_000_000 + 7_000_000 - SHARE_FLOOR_USER
        );
        // Near the end both ask more than is left: shared in proportion.
        assert_eq!(share(1000, (0, 0)), (800, 200));
        let (k, u) = share(100_000, (1_000_000, 0));
        assert!(k > 90_000 && k + u as u64 == 100_000, "{k} {u}");
    }

    #[test]
    fn rate_holds_over_a_second_within_the_burst() {
        let rate = 2_000_000;
        let mut l = Ledger::new(limits(None, Some(rate)), Usage::default(), [0; 2], [0; 2]);
        let (mut kernel, mut user) = ([0u64; 2], [0u64; 2]);
        let mut t = l.tick(0, JAN31, kernel, user);
        // A greedy user on both paths, ticks every 50 ms for 5 s.
        for i in 1..=100 {
            kernel[0] = t.kernel.allow[0];
            user[0] += t.budget.rate[0] as u64;
            t = l.tick(i * 50 * MS, JAN31, kernel, user);
        }
        let sent = kernel[0] + user[0];
        let want = 5 * rate;
        assert!(
            sent <= want + Limits::default_burst(rate) && sent >= want * 9 / 10,
            "sent {sent} in 5 s at {rate} B/s"
        );
        // The other direction was not touched: its pool is full.
        assert_eq!(
            t.kernel.allow[1] + t.budget.rate[1] as u64,
            Limits::default_burst(rate)
        );
    }

    #[test]
    fn expiry_disable_and_period_reset() {
        let mut lim = limits(Some(100_000), None);
        lim.period = Period::Daily;
        lim.expires = Some(JAN31 + 2 * DAY);
        let mut l = Ledger::new(lim.clone(), Usage::default(), [0; 2], [0; 2]);
        assert_eq!(l.tick(0, JAN31, [0; 2], [0; 2]).blocked, None);
        assert_eq!(
            l.tick(MS, JAN31, [0; 2], [60_000, 40_000]).blocked,
            Some(Block::OutOfQuota)
        );
        // The next day the quota is back, without anything else happening.
        let t = l.tick(2 * MS, JAN31 + DAY, [0; 2], [60_000, 40_000]);
        assert_eq!((t.blocked, t.reset), (None, true));
        assert_eq!(l.usage.total(), 0);
        assert_eq!(
            l.tick(3 * MS, JAN31 + 2 * DAY, [0; 2], [60_000, 40_000])
                .blocked,
            Some(Block::Expired)
        );
        lim.enabled = false;
        lim.expires = None;
        l.set_limits(lim);
        assert_eq!(
            l.tick(4 * MS, JAN31 + 2 * DAY, [0; 2], [60_000, 40_000])
                .blocked,
            Some(Block::Disabled)
        );
    }

    #[test]
    fn a_user_that_becomes_metered_is_counted_from_the_kernels_counter_on() {
        let mut l = Ledger::new(Limits::default(), Usage::default(), [0; 2], [0; 2]);
        // Its flows' counters: 5000 bytes.
        l.tick(0, JAN31, [5000, 0], [0; 2]);
        assert_eq!(l.usage.total(), 5000);
        // A reload gives it a quota: the kernel's own count (here 9000, from when it was
        // metered before) is the next baseline, not 4000 bytes more.
        l.set_limits(limits(Some(1_000_000), None));
        let t = l.tick(MS, JAN31, [9000, 0], [0; 2]);
        assert_eq!(t.kernel.flags, LIMIT_COUNT | LIMIT_QUOTA);
        assert_eq!(l.usage.total(), 5000);
        l.tick(2 * MS, JAN31, [9200, 0], [0; 2]);
        assert_eq!(l.usage.total(), 5200);
    }

    #[test]
    fn counters_that_go_back_are_a_new_baseline_not_a_huge_delta() {
        let mut l = Ledger::new(Limits::default(), Usage::default(), [1000, 1000], [50, 50]);
        // Maps made anew (a reboot): the kernel counters start from zero again.
        l.tick(0, JAN31, [10, 0], [60, 50]);
        assert_eq!(l.usage.bytes, [10, 0]);
        l.tick(MS, JAN31, [30, 5], [60, 50]);
        assert_eq!(l.usage.bytes, [30, 5]);
        // Counters near the top of u64 count as they move.
        let mut l = Ledger::new(
            Limits::default(),
            Usage::default(),
            [u64::MAX - 5; 2],
            [0; 2],
        );
        l.tick(0, JAN31, [u64::MAX; 2], [0; 2]);
        assert_eq!(l.usage.bytes, [5, 5]);
    }

    #[test]
    fn sizes_and_times_parse() {
        assert_eq!(parse_bytes("10 MB").unwrap(), 10_000_000);
        assert_eq!(parse_bytes("2MiB").unwrap(), 2 << 20);
        assert_eq!(parse_bytes("1.5 GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("12345").unwrap(), 12345);
        assert!(parse_bytes("10 XB")
            .unwrap_err()
            .to_string()
            .contains("unknown unit"));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("-1 MB").is_err());
        assert_eq!(at("2027-01-31"), JAN31 - 13 * 3600);
        assert!(parse_time("31/01/2027").is_err());
        assert_eq!(format_time(JAN31), "2027-01-31T13:00:00Z");
    }
}
