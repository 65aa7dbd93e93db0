//! Handing freed memory back to the kernel: the one place porthole needs
//! `unsafe`. After a burst (hundreds of streams, thousands of tunnels or
//! connections that ended) glibc keeps the freed heap resident, so a
//! service's RSS would stay at its peak; `malloc_trim(0)` returns it. libc
//! has no safe wrapper for it.
#![allow(unsafe_code)]

/// Returns free heap memory to the kernel (glibc only; elsewhere a no-op).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it
    // takes no pointers from us and is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
