//! The XDP side of `relay_common::packet::Packet`: reads and writes checked against
//! `data_end`.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use relay_common::packet::Packet;

/// Offsets are masked to this before use, so that the verifier always sees a bounded offset
/// however the value travelled (headers never reach this far).
const OFFSET_MASK: usize = 0x3fff;

pub struct XdpFrame {
    start: usize,
    end: usize,
}

impl XdpFrame {
    #[inline(always)]
    pub fn new(ctx: &XdpContext) -> Self {
        Self {
            start: ctx.data(),
            end: ctx.data_end(),
        }
    }

    /// A pointer to `T` at `off`, if the frame holds all of it.
    #[inline(always)]
    fn ptr_at<T>(&self, off: usize) -> Option<*mut T> {
        let p = self.start + (off & OFFSET_MASK);
        if p + size_of::<T>() > self.end {
            return None;
        }
        Some(p as *mut T)
    }

    /// Writes `value` at `off`, if the frame holds all of it.
    #[inline(always)]
    pub fn write<T: Copy>(&self, off: usize, value: T) -> Option<()> {
        let p = self.ptr_at::<T>(off)?;
        // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes at `p` lie inside the frame,
        // which XDP lets the program modify; unaligned because headers sit anywhere.
        unsafe { p.write_unaligned(value) };
        Some(())
    }
}

impl Packet for XdpFrame {
    #[inline(always)]
    fn len(&self) -> usize {
        self.end - self.start
    }

    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Option<T> {
        let p = self.ptr_at::<T>(off)?;
        // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes at `p` lie inside the frame;
        // the read is unaligned because headers sit at arbitrary offsets.
        Some(unsafe { p.read_unaligned() })
    }
}
