//! Feeds arbitrary bytes, split at arbitrary points, to the SOCKS5 handshake state machine.
//! It must never panic, never buffer without bound, and every reply it asks to send must be a
//! well-formed SOCKS5 or RFC 1929 message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::socks5::handshake::{Event, Handshake};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let mut h = Handshake::new(split & 1 == 1);
    let step = usize::from(split >> 1).max(1);
    for chunk in rest.chunks(step) {
        let mut ev = h.feed(chunk);
        loop {
            match ev {
                Event::Send(bytes) => {
                    assert!(bytes.len() >= 2 && (bytes[0] == 5 || bytes[0] == 1));
                    ev = h.feed(&[]);
                }
                Event::Verify { user, .. } => ev = h.verified(&user, user.len() % 2 == 0),
                Event::Close { send, .. } => {
                    assert!(send.is_empty() || send[0] == 5 || send[0] == 1);
                    return;
                }
                Event::Request { .. } | Event::NeedMore => break,
            }
        }
    }
});
