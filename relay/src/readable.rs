//! One loop for the kernel's buffers the controller reads as they fill (ring buffers, perf
//! buffers, the XDP program's log): register the descriptor with the runtime, and on each
//! readiness hand the source to a reader.

use std::os::fd::AsRawFd;

use log::warn;
use tokio::io::{unix::AsyncFd, Interest};

/// Calls `read` with `source` each time its descriptor is readable, forever; on an error of
/// the runtime's polling, warns (naming `what`, and `lost`: what goes unread from then on)
/// and returns.
///
/// # Safety
/// `source` must own its descriptor and keep it open, unchanged, for its whole life (the
/// runtime polls it until `source` is dropped here).
pub async unsafe fn each_readable<T: AsRawFd>(
    source: T,
    what: &str,
    lost: &str,
    mut read: impl FnMut(&mut T),
) {
    // SAFETY: the caller's promise, above.
    let registered = unsafe { AsyncFd::register_with_interest(source, Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!("watching {what}: {e}; {lost}");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                warn!("{what}: {e}; {lost}");
                return;
            }
        };
        read(guard.get_inner_mut());
        guard.clear_ready();
    }
}
