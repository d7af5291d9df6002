//! The SOCKS5 handshake as a state machine without sockets: bytes in, events out.
//!
//! The I/O layer feeds what it reads and acts on each [`Event`]: write bytes, verify
//! credentials (then call [`Handshake::verified`]), serve a request, or close. Every path
//! through RFC 1928 and RFC 1929 is tested here without a socket.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use relay_common::socks5::{
    self as wire, parse_credentials, parse_greeting, parse_request, reply, Addr, WireError,
};

/// A destination as requested.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dest {
    Ip(SocketAddr),
    Domain(String, u16),
}

impl Dest {
    fn from_wire(a: &Addr<'_>) -> Option<Dest> {
        Some(match a {
            Addr::V4(ip, p) => Dest::Ip(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(*ip)), *p)),
            Addr::V6(ip, p) => Dest::Ip(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(*ip)), *p)),
            Addr::Domain(name, p) => {
                let name = std::str::from_utf8(name).ok()?;
                // A host name: letters, digits, '-', '.', '_' (no spaces, no control bytes).
                if !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
                {
                    return None;
                }
                Dest::Domain(name.to_owned(), *p)
            }
        })
    }
}

impl std::fmt::Display for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dest::Ip(a) => write!(f, "{a}"),
            Dest::Domain(n, p) => write!(f, "{n}:{p}"),
        }
    }
}

/// What the I/O layer must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Wait for more bytes.
    NeedMore,
    /// Write these bytes and keep reading.
    Send(Vec<u8>),
    /// Check these credentials, then call [`Handshake::verified`].
    Verify { user: String, password: Vec<u8> },
    /// Serve this request; answer with [`reply_bytes`]. `early` is data the client sent
    /// after the request (to forward once connected).
    Request {
        command: u8,
        dest: Dest,
        early: Vec<u8>,
    },
    /// Write these bytes (if any) and close: `why` is for the log.
    Close { send: Vec<u8>, why: &'static str },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Greeting,
    Credentials,
    Verifying,
    Request,
    Done,
}

/// One client's handshake.
#[derive(Debug)]
pub struct Handshake {
    state: State,
    buf: Vec<u8>,
    allow_no_auth: bool,
    user: Option<String>,
}

/// Longest handshake the server buffers: a greeting (257), credentials (513) and a request
/// (262) fit.
const MAX_BUFFERED: usize = 1100;

/// A reply (RFC 1928 section 6) with the bound address.
pub fn reply_bytes(code: u8, bound: SocketAddr) -> Vec<u8> {
    let mut out = vec![wire::VERSION, code, 0];
    match bound.ip() {
        IpAddr::V4(a) => {
            out.push(wire::ATYP_V4);
            out.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out.push(wire::ATYP_V6);
            out.extend_from_slice(&a.octets());
        }
    }
    out.extend_from_slice(&bound.port().to_be_bytes());
    out
}

fn unbound() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
}

impl Handshake {
    /// A new handshake. Username/password is always offered when the client offers it; plain
    /// no-authentication only when `allow_no_auth`.
    pub fn new(allow_no_auth: bool) -> Handshake {
        Handshake {
            state: State::Greeting,
            buf: Vec::new(),
            allow_no_auth,
            user: None,
        }
    }

    /// The authenticated user, once there is one.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// Continues after credentials were checked.
    pub fn verified(&mut self, user: &str, ok: bool) -> Event {
        if self.state != State::Verifying {
            return self.fail(Vec::new(), "verification out of order");
        }
        if !ok {
            return self.fail(vec![wire::AUTH_VERSION, 1], "wrong username or password");
        }
        self.user = Some(user.to_owned());
        self.state = State::Request;
        Event::Send(vec![wire::AUTH_VERSION, 0])
    }

    /// Appends `bytes` and advances as far as they allow. After a [`Event::Send`], call again
    /// with no bytes to process what a pipelining client sent meanwhile.
    pub fn feed(&mut self, bytes: &[u8]) -> Event {
        if self.state == State::Done {
            return Event::Close {
                send: Vec::new(),
                why: "bytes after the handshake",
            };
        }
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > MAX_BUFFERED {
            return self.fail(Vec::new(), "handshake too long");
        }
        self.step()
    }

    fn fail(&mut self, send: Vec<u8>, why: &'static str) -> Event {
        self.state = State::Done;
        self.buf.clear();
        Event::Close { send, why }
    }

    fn consume(&mut self, n: usize) {
        self.buf.drain(..n);
    }

    fn step(&mut self) -> Event {
        match self.state {
            State::Greeting => match parse_greeting(&self.buf) {
                Ok(None) => Event::NeedMore,
                Ok(Some((g, n))) => {
                    let method = if g.offers(wire::METHOD_USER_PASS) {
                        wire::METHOD_USER_PASS
                    } else if self.allow_no_auth && g.offers(wire::METHOD_NO_AUTH) {
                        wire::METHOD_NO_AUTH
                    } else {
                        return self.fail(
                            vec![wire::VERSION, wire::METHOD_NONE_ACCEPTABLE],
                            "no acceptable authentication method",
                        );
                    };
                    self.consume(n);
                    self.state = if method == wire::METHOD_USER_PASS {
                        State::Credentials
                    } else {
                        State::Request
                    };
                    // Bytes a pipelining client sent after the greeting stay buffered; the
                    // I/O layer calls `feed(&[])` after every `Send` to go on with them.
                    Event::Send(vec![wire::VERSION, method])
                }
                Err(WireError::BadVersion) => self.fail(Vec::new(), "not SOCKS version 5"),
                Err(_) => self.fail(
                    vec![wire::VERSION, wire::METHOD_NONE_ACCEPTABLE],
                    "malformed greeting",
                ),
            },
            State::Credentials => match parse_credentials(&self.buf) {
                Ok(None) => Event::NeedMore,
                Ok(Some((c, n))) => {
                    let user = String::from_utf8_lossy(c.user).into_owned();
                    let password = c.password.to_vec();
                    self.consume(n);
                    self.state = State::Verifying;
                    Event::Verify { user, password }
                }
                Err(_) => self.fail(vec![wire::AUTH_VERSION, 1], "malformed credentials"),
            },
            State::Verifying => Event::NeedMore,
            State::Request => match parse_request(&self.buf) {
                Ok(None) => Event::NeedMore,
                Ok(Some((r, n))) => {
                    let Some(dest) = Dest::from_wire(&r.addr) else {
                        return self.fail(
                            reply_bytes(reply::ADDRESS_TYPE_NOT_SUPPORTED, unbound()),
                            "invalid domain name",
                        );
                    };
                    let command = r.command;
                    self.consume(n);
                    let early = std::mem::take(&mut self.buf);
                    self.state = State::Done;
                    match command {
                        wire::CMD_CONNECT | wire::CMD_UDP_ASSOCIATE => Event::Request {
                            command,
                            dest,
                            early,
                        },
                        _ => Event::Close {
                            send: reply_bytes(reply::COMMAND_NOT_SUPPORTED, unbound()),
                            why: "command not supported (BIND or unknown)",
                        },
                    }
                }
                Err(WireError::BadAddressType) | Err(WireError::EmptyDomain) => self.fail(
                    reply_bytes(reply::ADDRESS_TYPE_NOT_SUPPORTED, unbound()),
                    "address type not supported",
                ),
                Err(_) => self.fail(
                    reply_bytes(reply::GENERAL_FAILURE, unbound()),
                    "malformed request",
                ),
            },
            State::Done => Event::NeedMore,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GREET_USERPASS: &[u8] = &[5, 1, 2];
    const CREDS: &[u8] = &[
        1, 5, b'a', b'l', b'i', b'c', b'e', 6, b's', b'e', b'c', b'r', b'e', b't',
    ];
    const CONNECT_V4: &[u8] = &[5, 1, 0, 1, 198, 51, 100, 7, 0, 80];

    fn verify(h: &mut Handshake) {
        let ev = h.feed(CREDS);
        assert_eq!(
            ev,
            Event::Verify {
                user: "alice".into(),
                password: b"secret".to_vec()
            }
        );
        assert_eq!(h.verified("alice", true), Event::Send(vec![1, 0]));
    }

    #[test]
    fn username_password_then_connect() {
        let mut h = Handshake::new(false);
        assert_eq!(h.feed(GREET_USERPASS), Event::Send(vec![5, 2]));
        verify(&mut h);
        assert_eq!(h.user(), Some("alice"));
        assert_eq!(
            h.feed(CONNECT_V4),
            Event::Request {
                command: wire::CMD_CONNECT,
                dest: Dest::Ip("198.51.100.7:80".parse().unwrap()),
                early: vec![],
            }
        );
    }

    #[test]
    fn byte_by_byte_and_pipelined_give_the_same_events() {
        let mut whole = Vec::new();
        whole.extend_from_slice(GREET_USERPASS);
        whole.extend_from_slice(CREDS);
        whole.extend_from_slice(CONNECT_V4);
        whole.extend_from_slice(b"GET / HTTP/1.0\r\n");
        // All at once: the method choice, then (after feed(&[])) the credentials.
        let mut h = Handshake::new(false);
        assert_eq!(h.feed(&whole), Event::Send(vec![5, 2]));
        assert!(matches!(h.feed(&[]), Event::Verify { .. }));
        assert_eq!(h.verified("alice", true), Event::Send(vec![1, 0]));
        match h.feed(&[]) {
            Event::Request { early, .. } => assert_eq!(early, b"GET / HTTP/1.0\r\n"),
            other => panic!("{other:?}"),
        }
        // One byte at a time.
        let mut h = Handshake::new(false);
        let mut events = Vec::new();
        for b in &whole[..whole.len() - 16] {
            match h.feed(std::slice::from_ref(b)) {
                Event::NeedMore => {}
                Event::Verify { user, .. } => events.push(h.verified(&user, true)),
                e => events.push(e),
            }
        }
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(matches!(events[2], Event::Request { .. }));
    }

    #[test]
    fn wrong_password_gets_status_1_and_close() {
        let mut h = Handshake::new(false);
        h.feed(GREET_USERPASS);
        h.feed(CREDS);
        assert_eq!(
            h.verified("alice", false),
            Event::Close {
                send: vec![1, 1],
                why: "wrong username or password"
            }
        );
        assert!(
            matches!(h.feed(CONNECT_V4), Event::Close { .. }),
            "nothing after a failure"
        );
    }

    #[test]
    fn no_auth_only_when_enabled() {
        let mut h = Handshake::new(false);
        assert_eq!(
            h.feed(&[5, 1, 0]),
            Event::Close {
                send: vec![5, 0xff],
                why: "no acceptable authentication method"
            }
        );
        let mut h = Handshake::new(true);
        assert_eq!(h.feed(&[5, 1, 0]), Event::Send(vec![5, 0]));
        assert!(matches!(h.feed(CONNECT_V4), Event::Request { .. }));
        // Offered both: username/password wins even when no-auth is allowed.
        let mut h = Handshake::new(true);
        assert_eq!(h.feed(&[5, 2, 0, 2]), Event::Send(vec![5, 2]));
    }

    #[test]
    fn bind_and_unknown_commands_are_not_supported() {
        for cmd in [wire::CMD_BIND, 9] {
            let mut h = Handshake::new(true);
            h.feed(&[5, 1, 0]);
            match h.feed(&[5, cmd, 0, 1, 1, 2, 3, 4, 0, 1]) {
                Event::Close { send, .. } => {
                    assert_eq!(send[..2], [5, reply::COMMAND_NOT_SUPPORTED])
                }
                e => panic!("{e:?}"),
            }
        }
    }

    #[test]
    fn malformed_input_gets_the_rfc_reply_or_a_clean_close() {
        let cases: &[(&[u8], &[u8], &[u8])] = &[
            // (greeting, then, expected first bytes sent before closing)
            (&[4, 1, 0], &[], &[]),
            (&[5, 0], &[], &[5, 0xff]),
            (GREET_USERPASS, &[2, 1, b'a', 1, b'b'], &[1, 1]),
            (GREET_USERPASS, &[1, 0], &[1, 1]),
        ];
        for (greet, then, want) in cases {
            let mut h = Handshake::new(false);
            let mut ev = h.feed(greet);
            if !then.is_empty() {
                ev = h.feed(then);
            }
            match ev {
                Event::Close { send, .. } => assert_eq!(&send[..], *want, "{greet:?} {then:?}"),
                e => panic!("{greet:?} {then:?}: {e:?}"),
            }
        }
        let mut h = Handshake::new(true);
        h.feed(&[5, 1, 0]);
        match h.feed(&[5, 1, 0, 7, 0, 0]) {
            Event::Close { send, .. } => assert_eq!(send[1], reply::ADDRESS_TYPE_NOT_SUPPORTED),
            e => panic!("{e:?}"),
        }
        let mut h = Handshake::new(true);
        h.feed(&[5, 1, 0]);
        match h.feed(&[5, 1, 0, 3, 3, b'a', b' ', b'b', 0, 80]) {
            Event::Close { send, .. } => assert_eq!(send[1], reply::ADDRESS_TYPE_NOT_SUPPORTED),
            e => panic!("{e:?}"),
        }
        let mut h = Handshake::new(true);
        assert!(matches!(h.feed(&[5, 255]), Event::NeedMore));
        assert!(matches!(
            h.feed(&[0; 2000]),
            Event::Close {
                why: "handshake too long",
                ..
            }
        ));
    }

    #[test]
    fn domain_names_and_ipv6() {
        let mut h = Handshake::new(true);
        h.feed(&[5, 1, 0]);
        let mut req = vec![5, 1, 0, 3, 11];
        req.extend_from_slice(b"example.org");
        req.extend_from_slice(&443u16.to_be_bytes());
        match h.feed(&req) {
            Event::Request { dest, .. } => {
                assert_eq!(dest, Dest::Domain("example.org".into(), 443))
            }
            e => panic!("{e:?}"),
        }
        assert_eq!(
            reply_bytes(0, "[2001:db8::1]:1080".parse().unwrap()),
            [
                &[5, 0, 0, 4][..],
                &"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets(),
                &[4, 56]
            ]
            .concat()
        );
    }
}
