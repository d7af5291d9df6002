//! Idle timeouts of connections the controller relays: a byte count that moves, and a future
//! that resolves once it stopped moving for long enough.

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, ReadBuf},
    time::Instant,
};

/// Resolves once `moved` has not changed for `timeout` (looked at every quarter timeout, so
/// 1 to 1.25 timeouts after the last byte).
pub async fn idle(moved: &AtomicU64, timeout: Duration) {
    let step = timeout / 4;
    let mut seen = moved.load(Ordering::Relaxed);
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(step).await;
        let now = moved.load(Ordering::Relaxed);
        if now != seen {
            (seen, since) = (now, Instant::now());
        } else if since.elapsed() >= timeout {
            return;
        }
    }
}

/// A reader that adds every byte it reads to `moved`.
pub struct Counted<'a, R> {
    pub inner: R,
    pub moved: &'a AtomicU64,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counted<'_, R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.moved.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    #[tokio::test(start_paused = true)]
    async fn idle_resolves_a_timeout_after_the_last_byte_counted() {
        let moved = AtomicU64::new(0);
        let (mut w, r) = tokio::io::duplex(64);
        let mut counted = Counted {
            inner: r,
            moved: &moved,
        };
        let start = Instant::now();
        let reader = async {
            let mut buf = [0u8; 8];
            for _ in 0..3 {
                tokio::io::AsyncWriteExt::write_all(&mut w, b"abc")
                    .await
                    .unwrap();
                counted.read_exact(&mut buf[..3]).await.unwrap();
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            std::future::pending::<()>().await;
        };
        tokio::select! {
            () = reader => unreachable!(),
            () = idle(&moved, Duration::from_secs(4)) => {}
        }
        assert_eq!(moved.load(Ordering::Relaxed), 9);
        // Bytes at 0, 3 and 6 s; idle from 6 s, seen at the first quarter step past 10 s.
        let t = start.elapsed();
        assert!(
            t >= Duration::from_secs(10) && t <= Duration::from_secs(11),
            "{t:?}"
        );
    }
}
