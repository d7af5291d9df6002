//! The XDP side of `relay_common::packet::{Packet, FrameMut}`: reads and writes checked
//! against `data_end`, and `bpf_xdp_adjust_head`.

use core::{
    arch::asm,
    mem::{size_of, MaybeUninit},
};

use aya_ebpf::{
    bindings::xdp_md,
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use relay_common::packet::{FrameMut, Packet};

/// Offsets are masked to this before use, so that the verifier always sees a bounded offset
/// however the value travelled (headers never reach this far).
const OFFSET_MASK: usize = 0x3fff;

pub struct XdpFrame {
    /// The program's context, for `bpf_xdp_adjust_head` and for `data`/`data_end` after it.
    ctx: *mut xdp_md,
    start: usize,
    end: usize,
}

impl XdpFrame {
    #[inline(always)]
    pub fn new(ctx: &XdpContext) -> Self {
        Self {
            ctx: ctx.ctx,
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

    /// Writes `value` at `off`, if the frame holds all of it. (Also what `FrameMut::write`
    /// does; this one needs no `&mut`, for programs that never move the frame's start.)
    #[inline(always)]
    pub fn write<T: Copy>(&self, off: usize, value: T) -> Option<()> {
        let p = self.ptr_at::<T>(off)? as *mut u8;
        let buf = Words(MaybeUninit::new(value));
        let src = buf.0.as_ptr() as *const u8;
        // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes at `p` lie inside the frame,
        // which XDP lets the program modify; `src` is `buf`, 8-aligned and `size_of::<T>()`
        // bytes long, read within bounds.
        unsafe { copy_words(src, p, size_of::<T>(), Side::Destination) };
        Some(())
    }
}

/// A value on the stack, 8-aligned, so that copies to and from the frame move whole words.
#[repr(C, align(8))]
struct Words<T>(MaybeUninit<T>);

/// Which side of a copy is the frame (where accesses may be misaligned).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

/// Copies `n` bytes from `src` to `dst` in 8, 4, 2 and 1-byte moves; one of them is an
/// 8-aligned stack buffer, the other points into the frame.
///
/// Headers sit at 2-byte offsets (after 14 bytes of Ethernet), so frame accesses are often
/// misaligned. Rust's and LLVM's BPF lowering would then move every byte on its own (the BPF
/// target assumes alignment traps); the kernel's verifier, however, allows misaligned packet
/// access on CPUs that handle it (x86-64, arm64, without BPF_F_STRICT_ALIGNMENT). The frame
/// side therefore goes through inline assembly, which says exactly which load or store to
/// emit; the stack side stays aligned, as the verifier requires.
///
/// # Safety
/// `src` must be readable and `dst` writable for `n` bytes; the non-frame side 8-aligned.
#[inline(always)]
unsafe fn copy_words(src: *const u8, dst: *mut u8, n: usize, frame: Side) {
    let mut i = 0;
    // SAFETY (whole block): offsets stay below `n`, as the caller's bounds allow.
    unsafe {
        while i + 8 <= n {
            if frame == Side::Source {
                (dst.add(i) as *mut u64).write(load::<8>(src.add(i)));
            } else {
                store::<8>(dst.add(i), (src.add(i) as *const u64).read());
            }
            i += 8;
        }
        if i + 4 <= n {
            if frame == Side::Source {
                (dst.add(i) as *mut u32).write(load::<4>(src.add(i)) as u32);
            } else {
                store::<4>(dst.add(i), u64::from((src.add(i) as *const u32).read()));
            }
            i += 4;
        }
        if i + 2 <= n {
            if frame == Side::Source {
                (dst.add(i) as *mut u16).write(load::<2>(src.add(i)) as u16);
            } else {
                store::<2>(dst.add(i), u64::from((src.add(i) as *const u16).read()));
            }
            i += 2;
        }
        if i < n {
            dst.add(i).write(src.add(i).read());
        }
    }
}

/// One load of `N` (2, 4 or 8) bytes at `p`, whatever its alignment.
///
/// # Safety
/// `p` must be readable for `N` bytes.
#[inline(always)]
unsafe fn load<const N: usize>(p: *const u8) -> u64 {
    let v: u64;
    // SAFETY: the caller guarantees `p` is readable for N bytes; the instruction reads exactly
    // those and touches nothing else.
    unsafe {
        match N {
            8 => {
                asm!("{0} = *(u64 *)({1} + 0)", lateout(reg) v, in(reg) p, options(nostack, readonly, preserves_flags))
            }
            4 => {
                asm!("{0} = *(u32 *)({1} + 0)", lateout(reg) v, in(reg) p, options(nostack, readonly, preserves_flags))
            }
            _ => {
                asm!("{0} = *(u16 *)({1} + 0)", lateout(reg) v, in(reg) p, options(nostack, readonly, preserves_flags))
            }
        }
    }
    v
}

/// One store of the low `N` (2, 4 or 8) bytes of `v` at `p`, whatever its alignment.
///
/// # Safety
/// `p` must be writable for `N` bytes.
#[inline(always)]
unsafe fn store<const N: usize>(p: *mut u8, v: u64) {
    // SAFETY: the caller guarantees `p` is writable for N bytes; the instruction writes
    // exactly those.
    unsafe {
        match N {
            8 => {
                asm!("*(u64 *)({0} + 0) = {1}", in(reg) p, in(reg) v, options(nostack, preserves_flags))
            }
            4 => {
                asm!("*(u32 *)({0} + 0) = {1}", in(reg) p, in(reg) v, options(nostack, preserves_flags))
            }
            _ => {
                asm!("*(u16 *)({0} + 0) = {1}", in(reg) p, in(reg) v, options(nostack, preserves_flags))
            }
        }
    }
}

impl Packet for XdpFrame {
    /// `data_end - data`, computed where LLVM cannot see it: from `len() >= n` LLVM would
    /// conclude that a later `start + off + size <= end` check is redundant and drop it, but
    /// the verifier learns packet bounds only from comparisons of packet pointers, so every
    /// access must keep its own.
    #[inline(always)]
    fn len(&self) -> usize {
        let len: usize;
        // SAFETY: one subtraction of two registers; no memory is touched.
        unsafe {
            asm!("{0} -= {1}", inout(reg) self.end => len, in(reg) self.start, options(pure, nomem, nostack, preserves_flags));
        }
        len
    }

    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Option<T> {
        let p = self.ptr_at::<T>(off)? as *const u8;
        let mut buf = Words::<T>(MaybeUninit::uninit());
        // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes at `p` lie inside the frame;
        // `buf` is 8-aligned and as long. All of it is written, and `T` is `Copy` plain data
        // (header bytes and integers), valid for any bytes.
        unsafe {
            copy_words(
                p,
                buf.0.as_mut_ptr() as *mut u8,
                size_of::<T>(),
                Side::Source,
            );
            Some(buf.0.assume_init())
        }
    }
}

impl FrameMut for XdpFrame {
    #[inline(always)]
    fn write<T: Copy>(&mut self, off: usize, value: T) -> Option<()> {
        XdpFrame::write(self, off, value)
    }

    #[inline(always)]
    fn adjust_head(&mut self, delta: i32) -> Option<()> {
        // SAFETY: `self.ctx` is the context this program run was given (`XdpFrame::new`). The
        // helper moves `data`; on failure it changes nothing.
        if unsafe { bpf_xdp_adjust_head(self.ctx, delta) } != 0 {
            return None;
        }
        // The helper invalidates every packet pointer: take both ends afresh from the context.
        // SAFETY: `self.ctx` is valid for the whole program run; reading its fields is how
        // `XdpContext::data` and `data_end` do it.
        unsafe {
            self.start = (*self.ctx).data as usize;
            self.end = (*self.ctx).data_end as usize;
        }
        Some(())
    }

    #[inline(always)]
    fn adjust_tail(&mut self, delta: i32) -> Option<()> {
        // SAFETY: as for `adjust_head`: the program's own context; on failure nothing moves.
        if unsafe { bpf_xdp_adjust_tail(self.ctx, delta) } != 0 {
            return None;
        }
        // SAFETY: as above; the packet pointers are taken afresh.
        unsafe {
            self.start = (*self.ctx).data as usize;
            self.end = (*self.ctx).data_end as usize;
        }
        Some(())
    }
}
