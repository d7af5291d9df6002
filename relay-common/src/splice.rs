//! SOCKS5 CONNECT bytes carried by the kernel: the two sockets of a CONNECT sit in a
//! `SOCKHASH` under their socket cookies, and a stream-verdict program sends what arrives on one
//! out of the other (`bpf_sk_redirect_hash`), so the bytes never reach userspace.
//!
//! The kernel does not hold a fast side back for a slow one on its own: what the verdict
//! redirects waits in a queue for the peer socket that nothing bounds, and taking it keeps the
//! sender's receive window open. So the verdict watches what waits for the peer: it reads how
//! much the peer socket has taken into its send queue (its `tcp_sock`, at offsets the
//! controller finds in the kernel's BTF) and compares it with what should be there by now
//! ([`room`]). Up to [`SPLICE_WINDOW`] it redirects. Past it, it still redirects up to
//! [`SPLICE_OVERFLOW`] more and tells the controller (`SPLICE_BEHIND`), which closes the
//! sender's receive window (`TCP_WINDOW_CLAMP`) until the peer has caught up: the sender
//! stops once it has sent what it was offered, and all of it stays in the kernel. Past the
//! overflow too, or where the kernel's `tcp_sock` cannot be read and the controller's credit
//! (`SpliceLink::allow`, in bytes redirected) is used up, chunks go to the controller (they
//! wait in the socket's own queue, and its window closes until the controller reads them,
//! which it does at the peer's pace).
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
    /// Redirect while `redirected` stays within this (the credit the controller grants
    /// while the peer keeps up), or while [`room`] says so.
    pub allow: u64,
    /// Bytes the peer socket must have taken into its send queue (in the units of the peer's
    /// [`sent_into`]) but for what the verdict redirected: the base the controller took before
    /// the kernel could send anything out of it, plus what the controller wrote to it.
    pub expect: u64,
    /// Bytes past the window the verdict may redirect toward a peer that fell behind, beyond
    /// [`SPLICE_OVERFLOW`]: the receive window the sender had been offered when the
    /// controller closed it (all of which it may still send). 0 until then.
    pub offered: u64,
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
    /// `redirected` when the verdict last told the controller (`SPLICE_BEHIND`) that the peer
    /// fell behind; 0: never.
    pub behind: u64,
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
/// Times the verdict told the controller that a peer fell behind (`SPLICE_BEHIND`).
pub const SPLICE_FELL_BEHIND: u32 = 5;
pub const SPLICE_TOTAL_SLOTS: u32 = 6;

/// Bytes beyond [`SPLICE_WINDOW`] the verdict still redirects toward a peer that fell behind,
/// having told the controller, until the controller closes the sender's receive window
/// (`TCP_WINDOW_CLAMP`); then as much more as that window had offered
/// (`SpliceLink::offered`), all of which the sender may still send. So what waits for a peer
/// in the kernel's queue stays within the window, this, and what the socket's own receive
/// buffer would have held, and none of it goes through the controller.
pub const SPLICE_OVERFLOW: u64 = 4 << 20;

/// The most of a sender's receive window the verdict redirects past the overflow
/// (`SpliceLink::offered`); what a larger window held goes through the controller. A socket
/// whose peer fell behind gets its receive window back at most this large.
pub const SPLICE_OFFERED_MAX: u64 = 2 * SPLICE_WINDOW;

/// Bytes of the ring through which the verdict tells the controller that a peer fell behind
/// (one socket cookie per message).
pub const SPLICE_BEHIND_RING_BYTES: u32 = 64 << 10;

/// What the verdict may do with a chunk, given the room toward the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Room {
    /// Within the credit or the window: redirect.
    Fits,
    /// Past the window, within the overflow: redirect, and have the controller stop the
    /// sender (once per quarter window redirected).
    Behind,
    /// Past both: hand it to the controller, which forwards it at the peer's pace.
    Full,
}

/// The room for `len` more bytes on a socket with `link` and `count`, the peer having taken
/// `queued` bytes into its send queue ([`sent_into`]; `None`: unknown, the credit alone
/// decides).
pub const fn room(link: &SpliceLink, count: &SpliceCount, len: u64, queued: Option<u64>) -> Room {
    if within_credit(link, count, len) {
        return Room::Fits;
    }
    let Some(queued) = queued else {
        return Room::Full;
    };
    let waiting = (link.expect + count.redirected).saturating_sub(queued) + len;
    if waiting <= SPLICE_WINDOW {
        Room::Fits
    } else if waiting <= SPLICE_WINDOW + SPLICE_OVERFLOW + link.offered {
        Room::Behind
    } else {
        Room::Full
    }
}

/// Whether the verdict, redirecting into the overflow, tells the controller (again): the first
/// time, and after each further quarter window, in case a message was lost (the ring full).
pub const fn tell_behind(count: &SpliceCount) -> bool {
    count.behind == 0 || count.redirected >= count.behind + SPLICE_WINDOW / 4
}

/// Whether the verdict may redirect a chunk on a socket with `link` and `count`: linked, the
/// controller holds nothing passed before, and the chunk is not the one that holds back.
pub const fn may_redirect(link: &SpliceLink, count: &SpliceCount) -> bool {
    link.peer != 0 && link.drained == count.passed
}

/// Whether `len` more bytes fit the credit.
pub const fn within_credit(link: &SpliceLink, count: &SpliceCount, len: u64) -> bool {
    count.redirected + len <= link.allow
}

/// Bytes a TCP socket has taken into its send queue since it connected, up to a constant (only
/// differences mean anything), from three fields of its `tcp_sock`: the bytes its receiver
/// acknowledged, plus what is still in the queue (`write_seq - snd_una`, what `SIOCOUTQ`
/// reports). The controller's `queued` reads the same through `TCP_INFO` and `SIOCOUTQ`.
pub const fn sent_into(bytes_acked: u64, snd_una: u32, write_seq: u32) -> u64 {
    bytes_acked.wrapping_add(write_seq.wrapping_sub(snd_una) as u64)
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
            expect: 0,
            offered: 0,
        };
        assert!(may_redirect(&linked, &none) && within_credit(&linked, &none, 1000));
        assert!(!within_credit(&linked, &none, 1001), "past the credit");
        let held = SpliceCount {
            passed: 100,
            redirected: 900,
            behind: 0,
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

    #[test]
    fn the_window_follows_what_the_peer_took() {
        // The peer's send queue base was 1000 when linked; the controller wrote 500 more.
        let link = SpliceLink {
            peer: 7,
            drained: 0,
            allow: 0,
            expect: 1500,
            offered: 0,
        };
        let w = SPLICE_WINDOW;
        let mut count = SpliceCount::default();
        assert_eq!(
            room(&link, &count, w, Some(1500)),
            Room::Fits,
            "nothing waits yet"
        );
        assert_eq!(room(&link, &count, w + 1, Some(1500)), Room::Behind);
        assert_eq!(
            room(&link, &count, w + SPLICE_OVERFLOW + 1, Some(1500)),
            Room::Full
        );
        // A full window redirected, none of it taken: the next bytes go into the overflow.
        count.redirected = w;
        assert_eq!(
            room(&link, &count, 1, Some(1500)),
            Room::Behind,
            "the peer fell behind"
        );
        // The peer took half of it into its send queue: half a window fits again.
        let half = w / 2;
        assert_eq!(room(&link, &count, half, Some(1500 + half)), Room::Fits);
        assert_eq!(
            room(&link, &count, half + 1, Some(1500 + half)),
            Room::Behind
        );
        // A peer that reports more than expected (a racy read) opens no more than a window.
        assert_eq!(room(&link, &count, w + 1, Some(u64::MAX)), Room::Behind);
        // The overflow used up too: the controller gets it.
        count.redirected = w + SPLICE_OVERFLOW;
        assert_eq!(room(&link, &count, 1, Some(1500)), Room::Full);
        // The controller closed the sender's window, which had offered 8 MiB: that much more.
        let closed = SpliceLink {
            offered: 8 << 20,
            ..link
        };
        assert_eq!(room(&closed, &count, 8 << 20, Some(1500)), Room::Behind);
        assert_eq!(room(&closed, &count, (8 << 20) + 1, Some(1500)), Room::Full);
        // Unknown peer progress: only the controller's credit counts.
        let credit = SpliceLink {
            allow: w + SPLICE_OVERFLOW + 10,
            ..link
        };
        assert_eq!(room(&credit, &count, 10, None), Room::Fits);
        assert_eq!(room(&credit, &count, 11, None), Room::Full);
    }

    #[test]
    fn the_controller_is_told_once_per_quarter_window() {
        let mut count = SpliceCount {
            redirected: 5 << 20,
            ..SpliceCount::default()
        };
        assert!(tell_behind(&count), "the first time");
        count.behind = count.redirected;
        count.redirected += SPLICE_WINDOW / 4 - 1;
        assert!(!tell_behind(&count), "told a moment ago");
        count.redirected += 1;
        assert!(tell_behind(&count), "again, a quarter window later");
    }

    #[test]
    fn what_a_socket_took_counts_acknowledged_and_queued_bytes_across_the_sequence_wrap() {
        // 100 bytes acknowledged, 50 queued: 150.
        assert_eq!(sent_into(100, 1000, 1050), 150);
        // The sequence numbers wrapped between the oldest unacknowledged byte and the tail.
        assert_eq!(sent_into(100, u32::MAX - 9, 40), 150);
        // An acknowledgement of 30 bytes moves them from queued to acknowledged: still 150.
        assert_eq!(sent_into(130, 1030, 1050), sent_into(100, 1000, 1050));
    }
}
