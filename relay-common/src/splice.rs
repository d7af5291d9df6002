//! SOCKS5 CONNECT bytes carried by the kernel: the two sockets of a CONNECT sit in a
//! `SOCKHASH` under their socket cookies, and a stream-verdict program sends what arrives on one
//! out of the other (`bpf_sk_redirect_hash`), so the bytes never reach userspace.
//!
//! The controller keeps the byte order exact with two counts per socket. The verdict hands a
//! chunk to the controller (`SK_PASS`, read with an ordinary `recv`) while the socket is not
//! linked to its peer yet, or while the controller has not yet read and forwarded everything
//! handed to it before: `SpliceLink::drained` (written by the controller after each forwarded
//! chunk) must equal `SpliceCount::passed` (counted by the verdict) before a chunk may be
//! redirected. So a chunk is never redirected past one the controller still holds.

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
    /// Bytes the controller has read from this socket (and forwarded) since it was added.
    pub drained: u64,
}

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
pub const SPLICE_TOTAL_SLOTS: u32 = 4;

/// The verdict's decision for a chunk on a socket with `link` and `count`: redirect only when
/// linked and the controller holds nothing passed before.
pub const fn may_redirect(link: &SpliceLink, count: &SpliceCount) -> bool {
    link.peer != 0 && link.drained == count.passed
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
    fn redirects_only_when_linked_and_nothing_is_held() {
        let unlinked = SpliceLink::default();
        let none = SpliceCount::default();
        assert!(!may_redirect(&unlinked, &none), "not linked yet");
        let linked = SpliceLink {
            peer: 7,
            drained: 0,
        };
        assert!(may_redirect(&linked, &none));
        let held = SpliceCount {
            passed: 100,
            redirected: 0,
        };
        assert!(
            !may_redirect(&linked, &held),
            "100 bytes passed before the link are not forwarded yet"
        );
        let linked = SpliceLink {
            drained: 60,
            ..linked
        };
        assert!(!may_redirect(&linked, &held), "40 still held");
        let linked = SpliceLink {
            drained: 100,
            ..linked
        };
        assert!(may_redirect(&linked, &held), "all forwarded");
        let gone = SpliceLink { peer: 0, ..linked };
        assert!(!may_redirect(&gone, &held), "unlinked again");
    }
}
