//! The process's allocator: mimalloc, except for single blocks of [`HUGE`] bytes or more, which
//! are reserved address space (an anonymous `MAP_NORESERVE` mapping) instead of committed memory.
//!
//! Why: kafka-protocol 0.18 sizes a decoded array with `Vec::with_capacity(count)` taken from the
//! wire before it decodes a single element, so a response that declares 2^31 elements asks for
//! hundreds of GiB up front. An allocation that fails aborts a Rust process, and this process also
//! answers DNS. No legitimate block here comes near [`HUGE`] (frames are capped at
//! `max_frame_bytes`, 100 MiB by default); with the reservation the decoder instead runs out of
//! input after the elements actually present, returns an error, and the mapping is released.
//! Only pages written are ever backed by memory, so a real need for that much still meets the
//! kernel's limits, as any large allocation would.

use std::alloc::{GlobalAlloc, Layout};

use mimalloc::MiMalloc;

/// Blocks this large or larger are mapped, not taken from mimalloc.
pub const HUGE: usize = 1 << 30;
const PAGE: usize = 4096;

pub struct Allocator;

fn mapped(layout: &Layout) -> bool {
    layout.size() >= HUGE && layout.align() <= PAGE
}

unsafe fn reserve(size: usize) -> *mut u8 {
    // SAFETY: an anonymous private mapping touches no existing memory; failure is MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED { std::ptr::null_mut() } else { p.cast() }
}

// SAFETY: every block is either mimalloc's or a mapping of exactly `layout.size()` bytes, told
// apart by the layout the caller must pass back unchanged; mappings are page-aligned and zeroed.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if mapped(&layout) {
            // SAFETY: a fresh mapping of the layout's size; pages are page-aligned (align <= PAGE).
            unsafe { reserve(layout.size()) }
        } else {
            // SAFETY: the caller's layout goes to mimalloc unchanged.
            unsafe { MiMalloc.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if mapped(&layout) {
            // SAFETY: as in `alloc`; an anonymous mapping is zeroed by the kernel.
            unsafe { reserve(layout.size()) }
        } else {
            // SAFETY: the caller's layout goes to mimalloc unchanged.
            unsafe { MiMalloc.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if mapped(&layout) {
            // SAFETY: the same layout as at `alloc` means `ptr` is a mapping of exactly this size.
            unsafe { libc::munmap(ptr.cast(), layout.size()) };
        } else {
            // SAFETY: the same layout as at `alloc` means `ptr` came from mimalloc.
            unsafe { MiMalloc.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees new_size, rounded to align, does not overflow isize.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if !mapped(&layout) && !mapped(&new) {
            // SAFETY: both sizes are mimalloc's; `ptr` came from it with `layout`.
            return unsafe { MiMalloc.realloc(ptr, layout, new_size) };
        }
        // SAFETY: `new` is a valid layout (see above).
        let q = unsafe { self.alloc(new) };
        if !q.is_null() {
            // SAFETY: both blocks are live and distinct, each at least the smaller size long;
            // `ptr` is freed with the layout it was allocated with.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, q, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_block_is_reserved_not_refused() {
        // 2^31 elements of 256 bytes: what a hostile array count asks kafka-protocol for.
        let layout = Layout::from_size_align(256 << 31, 8).unwrap();
        // SAFETY: each block is used within its size and freed once with its own layout.
        unsafe {
            let p = Allocator.alloc(layout);
            assert!(!p.is_null());
            *p = 7;
            *p.add(layout.size() - 1) = 9;
            let q = Allocator.realloc(p, layout, 4096);
            assert_eq!(*q, 7);
            Allocator.dealloc(q, Layout::from_size_align(4096, 8).unwrap());
        }
        let small = Layout::from_size_align(64, 8).unwrap();
        // SAFETY: as above.
        unsafe {
            let p = Allocator.alloc(small);
            let q = Allocator.realloc(p, small, HUGE);
            assert!(!q.is_null());
            Allocator.dealloc(q, Layout::from_size_align(HUGE, 8).unwrap());
        }
    }
}
