//! Per-user limits the XDP program enforces on the SOCKS5 UDP datagrams it carries.
//!
//! Two maps per user slot (indexed like `USERS`), one writer each:
//!
//! - `USER_LIMITS` ([`UserLimit`], the controller's): what the user may still send in the
//!   kernel, as totals of the kernel's own counter: `allow[d]` for the rate in direction `d`,
//!   `quota_allow` for the quota (both directions together), and whether the user is blocked.
//!   The controller advances them on its tick (every few tens of milliseconds) from its token
//!   buckets and the quota left, giving the kernel a lease of what the user may spend until
//!   the next tick; so XDP reads no clock.
//! - `USER_SPENT` ([`UserSpent`], XDP's): payload bytes the kernel carried for the user, per
//!   direction, while it has a quota or a rate (a user without limits costs XDP one array
//!   read; the controller learns its usage from its flows' own counters).
//!
//! A datagram passes when `spent + len` stays within what is allowed; two CPUs may both pass
//! the last one, so the kernel overshoots its lease by at most one datagram per CPU.

use crate::counters::Reason;

/// `UserLimit::flags`: `allow[d]` applies (the user has a bandwidth limit).
pub const LIMIT_RATE: u32 = 1;
/// `UserLimit::flags`: `quota_allow` applies (the user has a data quota).
pub const LIMIT_QUOTA: u32 = 2;
/// `UserLimit::flags`: drop everything (expired, disabled, out of quota).
pub const LIMIT_BLOCKED: u32 = 4;
/// `UserLimit::flags`: count the user's bytes in `USER_SPENT` (set with a quota or a rate).
pub const LIMIT_COUNT: u32 = 8;

/// Value of `USER_LIMITS` (the controller's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserLimit {
    /// Per direction: the most `UserSpent::bytes[d]` may reach (rate lease).
    pub allow: [u64; 2],
    /// The most `UserSpent::bytes[0] + bytes[1]` may reach (quota lease).
    pub quota_allow: u64,
    /// `LIMIT_*` bits; 0: no limit, nothing counted.
    pub flags: u32,
    pub _pad: u32,
}

/// Value of `USER_SPENT` (XDP's): payload bytes carried in the kernel for a metered user.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserSpent {
    pub bytes: [u64; 2],
}

/// Whether a datagram of `len` payload bytes in `direction` may pass: the reason it may not.
/// Only called for a user with `flags != 0`.
#[inline(always)]
pub fn check(limit: &UserLimit, spent: &UserSpent, direction: u32, len: u64) -> Result<(), Reason> {
    if limit.flags & LIMIT_BLOCKED != 0 {
        return Err(Reason::UserBlocked);
    }
    let d = (direction & 1) as usize;
    // Saturating: a sum past the top of u64 must not wrap round to look small.
    if limit.flags & LIMIT_QUOTA != 0
        && spent.bytes[0]
            .saturating_add(spent.bytes[1])
            .saturating_add(len)
            > limit.quota_allow
    {
        return Err(Reason::UserOverQuota);
    }
    if limit.flags & LIMIT_RATE != 0 && spent.bytes[d].saturating_add(len) > limit.allow[d] {
        return Err(Reason::UserOverRate);
    }
    Ok(())
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `repr(C)`, `Copy`, integers only, padding spelled out as a field.
    unsafe impl aya::Pod for super::UserLimit {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UserSpent {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_flags_never_refuses_and_blocked_always_does() {
        let spent = UserSpent {
            bytes: [u64::MAX, 5],
        };
        let free = UserLimit::default();
        // Not called for flags 0 in XDP, but harmless if it were.
        assert_eq!(check(&free, &spent, 0, 1500), Ok(()));
        let blocked = UserLimit {
            flags: LIMIT_BLOCKED | LIMIT_RATE,
            allow: [u64::MAX; 2],
            ..UserLimit::default()
        };
        assert_eq!(
            check(&blocked, &UserSpent::default(), 1, 1),
            Err(Reason::UserBlocked)
        );
    }

    #[test]
    fn rate_lease_is_per_direction_and_exact() {
        let limit = UserLimit {
            allow: [1000, 10],
            flags: LIMIT_RATE,
            ..UserLimit::default()
        };
        let spent = UserSpent { bytes: [900, 10] };
        assert_eq!(check(&limit, &spent, 0, 100), Ok(()));
        assert_eq!(check(&limit, &spent, 0, 101), Err(Reason::UserOverRate));
        assert_eq!(check(&limit, &spent, 1, 1), Err(Reason::UserOverRate));
    }

    #[test]
    fn quota_lease_counts_both_directions() {
        let limit = UserLimit {
            quota_allow: 2000,
            flags: LIMIT_QUOTA,
            ..UserLimit::default()
        };
        let spent = UserSpent { bytes: [1000, 900] };
        assert_eq!(check(&limit, &spent, 1, 100), Ok(()));
        assert_eq!(check(&limit, &spent, 0, 101), Err(Reason::UserOverQuota));
    }

    #[test]
    fn sums_past_the_top_of_u64_are_refused_not_wrapped() {
        let spent = UserSpent {
            bytes: [u64::MAX - 10, 5],
        };
        let limit = UserLimit {
            allow: [u64::MAX - 1, u64::MAX],
            quota_allow: u64::MAX - 1,
            flags: LIMIT_RATE,
            ..UserLimit::default()
        };
        assert_eq!(check(&limit, &spent, 0, 9), Ok(()));
        assert_eq!(check(&limit, &spent, 0, 10), Err(Reason::UserOverRate));
        // Wrapped, MAX - 10 + 1000 would be 989: far below the lease.
        assert_eq!(check(&limit, &spent, 0, 1000), Err(Reason::UserOverRate));
        let quota = UserLimit {
            flags: LIMIT_QUOTA,
            ..limit
        };
        assert_eq!(check(&quota, &spent, 1, 1000), Err(Reason::UserOverQuota));
    }
}
