//! SOCKS5 CONNECT bytes carried by the kernel: the two sockets of a CONNECT sit in a
//! `SOCKHASH` under their socket cookies, and a stream-verdict program sends what arrives on one
//! out of the other (`bpf_sk_redirect_hash`), so the bytes never reach userspace.
//!
//! The kernel does not hold a fast side back for a slow one on its own: what the verdict
//! redirects waits in a queue for the peer socket that nothing bounds, and taking it keeps the
//! sender's receive window open. So the verdict redirects only within a credit
//! (`SpliceLink::allow`, in bytes redirected) the controller grants while the peer keeps up;
//! past it, chunks go to the controller (`SK_PASS`: they wait in the socket's own queue, and
//! its window closes until the controller reads them, which it does at the peer's pace).
//!
//! The byte order stays exact: a chunk is redirected only while the controller holds nothing
//! handed to it before (`SpliceLink::drained`, the verdict's `passed` count when the
//! controller last linked, equal to `SpliceCount::passed`); after one chunk is handed over,
//! every later one is too until the controller has forwarded them all (waiting first for what
//! was redirected before to be in the peer's send queue) and links again.

/// Sockets the kernel path holds at once (two per CONNECT).
pub const SPLICE_SOCKETS: u32 = 65_536;

/// One socket of a CONNECT as the controller describes it to the verdict (`SPLICE_LINKS`,
/// keyed by socket cookie; the controller's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpliceLink {
    /// Cookie of the socket that what arrives here goes out of; 0: everything goes to the
    /// controller.
    pub peer: u64,
    /// The verdict's `passed` count when the controller linked, having forwarded every byte
    /// handed to it: chunks are redirected only while `passed` still equals it.
    pub drained: u64,
    /// Redirect only while `redirected` stays within this (the credit the controller grants
    /// while the peer keeps up).
    pub allow: u64,
}

/// Bytes redirected toward a peer that may wait for room in its send queue (the kernel's
/// queue for it, which nothing else bounds); the controller grants credit up to this.
pub const SPLICE_WINDOW: u64 = 4 << 20;

/// What the verdict counted for one socket since it was added (`SPLICE_COUNTS`, keyed by
/// socket cookie). Created zeroed by the controller before it adds the socket, counted by the
/// verdict, removed by the controller when the socket is closed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpliceCount {
    /// Bytes handed to the controller.
    pub passed: u64,
    /// Bytes sent out of the peer socket.
    pub redirected: u64,
}

/// `SPLICE_TOTALS` slots (per CPU): what the verdict did, over every socket.
pub const SPLICE_REDIRECTED: u32 = 0;
/// Bytes handed to the controller (not linked yet, or the controller still held bytes).
pub const SPLICE_PASSED: u32 = 1;
/// Chunks whose peer socket was gone (handed to the controller, which closes the CONNECT).
pub const SPLICE_NO_PEER: u32 = 2;
/// Chunks of sockets the verdict has no count for (handed to the controller).
pub const SPLICE_UNKNOWN: u32 = 3;
/// Chunks handed to the controller because the credit ran out (the peer fell behind).
pub const SPLICE_NO_CREDIT: u32 = 4;
pub const SPLICE_TOTAL_SLOTS: u32 = 5;

/// Whether the verdict may redirect a chunk on a socket with `link` and `count`: linked, the
/// controller holds nothing passed before, and the chunk is not the one that holds back.
pub const fn may_redirect(link: &SpliceLink, count: &SpliceCount) -> bool {
    link.peer != 0 && link.drained == count.passed
}

/// Whether `len` more bytes fit the credit.
pub const fn within_credit(link: &SpliceLink, count: &SpliceCount, len: u64) -> bool {
    count.redirected + len <= link.allow
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` integers, no padding.
    unsafe impl aya::Pod for super::SpliceLink {}
    // SAFETY: plain `repr(C)` integers, no padding.
    unsafe impl aya::Pod for super::SpliceCount {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_only_when_linked_nothing_is_held_and_within_credit() {
        let unlinked = SpliceLink::default();
        let none = SpliceCount::default();
        assert!(!may_redirect(&unlinked, &none), "not linked yet");
        let linked = SpliceLink {
            peer: 7,
            drained: 0,
            allow: 1000,
        };
        assert!(may_redirect(&linked, &none) && within_credit(&linked, &none, 1000));
        assert!(!within_credit(&linked, &none, 1001), "past the credit");
        let held = SpliceCount {
            passed: 100,
            redirected: 900,
        };
        assert!(
            !may_redirect(&linked, &held),
            "100 bytes passed since the link are not forwarded yet"
        );
        // The controller forwarded them and linked again at passed = 100.
        let relinked = SpliceLink {
            drained: 100,
            allow: 900 + 4000,
            ..linked
        };
        assert!(may_redirect(&relinked, &held) && within_credit(&relinked, &held, 4000));
        let gone = SpliceLink {
            peer: 0,
            ..relinked
        };
        assert!(!may_redirect(&gone, &held), "unlinked again");
    }
}
