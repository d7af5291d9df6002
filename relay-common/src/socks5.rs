//! SOCKS5 wire formats (RFC 1928, RFC 1929): pure parsers and encoders, no I/O.
//!
//! Every parser takes the bytes received so far and answers `Ok(None)` when more are needed,
//! `Ok(Some((value, consumed)))` when a whole message is there, or an error saying why the
//! bytes can never become a valid message. They never panic on any input (see the tests and
//! the fuzz targets in `fuzz/`).

pub const VERSION: u8 = 5;
pub const AUTH_VERSION: u8 = 1;

pub const METHOD_NO_AUTH: u8 = 0x00;
pub const METHOD_USER_PASS: u8 = 0x02;
pub const METHOD_NONE_ACCEPTABLE: u8 = 0xff;

pub const CMD_CONNECT: u8 = 1;
pub const CMD_BIND: u8 = 2;
pub const CMD_UDP_ASSOCIATE: u8 = 3;

pub const ATYP_V4: u8 = 1;
pub const ATYP_DOMAIN: u8 = 3;
pub const ATYP_V6: u8 = 4;

/// Reply codes (RFC 1928 section 6).
pub mod reply {
    pub const SUCCEEDED: u8 = 0;
    pub const GENERAL_FAILURE: u8 = 1;
    pub const NOT_ALLOWED: u8 = 2;
    pub const NETWORK_UNREACHABLE: u8 = 3;
    pub const HOST_UNREACHABLE: u8 = 4;
    pub const CONNECTION_REFUSED: u8 = 5;
    pub const TTL_EXPIRED: u8 = 6;
    pub const COMMAND_NOT_SUPPORTED: u8 = 7;
    pub const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 8;
}

/// Why bytes are not a valid message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// The version byte is not 5 (or 1 for the RFC 1929 sub-negotiation).
    BadVersion,
    /// A greeting that offers no methods.
    NoMethods,
    /// A reserved byte is not zero.
    BadReserved,
    /// An address type other than 1, 3 or 4.
    BadAddressType,
    /// A domain name of length 0.
    EmptyDomain,
    /// A username or password of length 0.
    EmptyCredential,
}

/// A destination as the client wrote it. Domain names borrow the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addr<'a> {
    V4([u8; 4], u16),
    V6([u8; 16], u16),
    Domain(&'a [u8], u16),
}

impl Addr<'_> {
    pub fn port(&self) -> u16 {
        match self {
            Addr::V4(_, p) | Addr::V6(_, p) | Addr::Domain(_, p) => *p,
        }
    }

    /// Bytes of the address in SOCKS form (ATYP, address, port).
    pub fn encoded_len(&self) -> usize {
        match self {
            Addr::V4(..) => 1 + 4 + 2,
            Addr::V6(..) => 1 + 16 + 2,
            Addr::Domain(d, _) => 1 + 1 + d.len() + 2,
        }
    }
}

/// Parses ATYP, address and port at the start of `b`.
pub fn parse_addr(b: &[u8]) -> Result<Option<(Addr<'_>, usize)>, WireError> {
    let Some(&atyp) = b.first() else {
        return Ok(None);
    };
    let port_at =
        |at: usize| -> Option<u16> { Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?])) };
    match atyp {
        ATYP_V4 => {
            let (Some(a), Some(p)) = (b.get(1..5), port_at(5)) else {
                return Ok(None);
            };
            let mut ip = [0u8; 4];
            ip.copy_from_slice(a);
            Ok(Some((Addr::V4(ip, p), 7)))
        }
        ATYP_V6 => {
            let (Some(a), Some(p)) = (b.get(1..17), port_at(17)) else {
                return Ok(None);
            };
            let mut ip = [0u8; 16];
            ip.copy_from_slice(a);
            Ok(Some((Addr::V6(ip, p), 19)))
        }
        ATYP_DOMAIN => {
            let Some(&len) = b.get(1) else {
                return Ok(None);
            };
            if len == 0 {
                return Err(WireError::EmptyDomain);
            }
            let end = 2 + len as usize;
            let (Some(name), Some(p)) = (b.get(2..end), port_at(end)) else {
                return Ok(None);
            };
            Ok(Some((Addr::Domain(name, p), end + 2)))
        }
        _ => Err(WireError::BadAddressType),
    }
}

/// Writes `addr` in SOCKS form into `out`; returns the length written, or `None` if `out` is
/// too small (or a domain is longer than 255 bytes).
pub fn encode_addr(addr: &Addr<'_>, out: &mut [u8]) -> Option<usize> {
    let len = addr.encoded_len();
    let out = out.get_mut(..len)?;
    match addr {
        Addr::V4(ip, p) => {
            out[0] = ATYP_V4;
            out[1..5].copy_from_slice(ip);
            out[5..7].copy_from_slice(&p.to_be_bytes());
        }
        Addr::V6(ip, p) => {
            out[0] = ATYP_V6;
            out[1..17].copy_from_slice(ip);
            out[17..19].copy_from_slice(&p.to_be_bytes());
        }
        Addr::Domain(d, p) => {
            out[0] = ATYP_DOMAIN;
            out[1] = u8::try_from(d.len()).ok()?;
            out[2..2 + d.len()].copy_from_slice(d);
            out[2 + d.len()..].copy_from_slice(&p.to_be_bytes());
        }
    }
    Some(len)
}

/// The client's greeting: which methods it offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Greeting<'a> {
    pub methods: &'a [u8],
}

impl Greeting<'_> {
    pub fn offers(&self, method: u8) -> bool {
        self.methods.contains(&method)
    }
}

pub fn parse_greeting(b: &[u8]) -> Result<Option<(Greeting<'_>, usize)>, WireError> {
    let (Some(&ver), Some(&n)) = (b.first(), b.get(1)) else {
        return Ok(None);
    };
    if ver != VERSION {
        return Err(WireError::BadVersion);
    }
    if n == 0 {
        return Err(WireError::NoMethods);
    }
    let end = 2 + n as usize;
    match b.get(2..end) {
        Some(methods) => Ok(Some((Greeting { methods }, end))),
        None => Ok(None),
    }
}

/// RFC 1929 username/password request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Credentials<'a> {
    pub user: &'a [u8],
    pub password: &'a [u8],
}

pub fn parse_credentials(b: &[u8]) -> Result<Option<(Credentials<'_>, usize)>, WireError> {
    let (Some(&ver), Some(&ulen)) = (b.first(), b.get(1)) else {
        return Ok(None);
    };
    if ver != AUTH_VERSION {
        return Err(WireError::BadVersion);
    }
    if ulen == 0 {
        return Err(WireError::EmptyCredential);
    }
    let uend = 2 + ulen as usize;
    let (Some(user), Some(&plen)) = (b.get(2..uend), b.get(uend)) else {
        return Ok(None);
    };
    if plen == 0 {
        return Err(WireError::EmptyCredential);
    }
    let pend = uend + 1 + plen as usize;
    match b.get(uend + 1..pend) {
        Some(password) => Ok(Some((Credentials { user, password }, pend))),
        None => Ok(None),
    }
}

/// A request: command and destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub command: u8,
    pub addr: Addr<'a>,
}

pub fn parse_request(b: &[u8]) -> Result<Option<(Request<'_>, usize)>, WireError> {
    let (Some(&ver), Some(&command), Some(&rsv)) = (b.first(), b.get(1), b.get(2)) else {
        return Ok(None);
    };
    if ver != VERSION {
        return Err(WireError::BadVersion);
    }
    if rsv != 0 {
        return Err(WireError::BadReserved);
    }
    Ok(parse_addr(&b[3..])?.map(|(addr, n)| (Request { command, addr }, 3 + n)))
}

/// The header of a UDP ASSOCIATE datagram: RSV RSV FRAG, then the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpHeader<'a> {
    pub frag: u8,
    pub addr: Addr<'a>,
    /// Offset of the payload in the datagram.
    pub payload: usize,
}

pub fn parse_udp_header(b: &[u8]) -> Result<Option<UdpHeader<'_>>, WireError> {
    let (Some(&r0), Some(&r1), Some(&frag)) = (b.first(), b.get(1), b.get(2)) else {
        return Ok(None);
    };
    if r0 != 0 || r1 != 0 {
        return Err(WireError::BadReserved);
    }
    Ok(parse_addr(&b[3..])?.map(|(addr, n)| UdpHeader {
        frag,
        addr,
        payload: 3 + n,
    }))
}

/// Writes the header of a UDP ASSOCIATE datagram coming from `addr`; returns its length.
pub fn encode_udp_header(addr: &Addr<'_>, out: &mut [u8]) -> Option<usize> {
    let head = out.get_mut(..3)?;
    head.copy_from_slice(&[0, 0, 0]);
    Some(3 + encode_addr(addr, out.get_mut(3..)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting() {
        assert_eq!(parse_greeting(&[5]), Ok(None));
        assert_eq!(parse_greeting(&[5, 2, 0]), Ok(None));
        let (g, n) = parse_greeting(&[5, 2, 0, 2, 99]).unwrap().unwrap();
        assert_eq!(n, 4);
        assert!(g.offers(METHOD_USER_PASS) && g.offers(METHOD_NO_AUTH));
        assert_eq!(parse_greeting(&[4, 1, 0]), Err(WireError::BadVersion));
        assert_eq!(parse_greeting(&[5, 0]), Err(WireError::NoMethods));
    }

    #[test]
    fn credentials() {
        let msg = [1, 5, b'a', b'l', b'i', b'c', b'e', 3, b'p', b'w', b'd'];
        for cut in 0..msg.len() {
            assert_eq!(parse_credentials(&msg[..cut]), Ok(None), "cut {cut}");
        }
        let (c, n) = parse_credentials(&msg).unwrap().unwrap();
        assert_eq!(
            (c.user, c.password, n),
            (&b"alice"[..], &b"pwd"[..], msg.len())
        );
        assert_eq!(
            parse_credentials(&[5, 1, b'a', 1, b'b']),
            Err(WireError::BadVersion)
        );
        assert_eq!(parse_credentials(&[1, 0]), Err(WireError::EmptyCredential));
        assert_eq!(
            parse_credentials(&[1, 1, b'a', 0]),
            Err(WireError::EmptyCredential)
        );
    }

    #[test]
    fn requests_of_every_address_type() {
        let v4 = [5, 1, 0, 1, 192, 0, 2, 1, 0, 80];
        assert_eq!(
            parse_request(&v4),
            Ok(Some((
                Request {
                    command: CMD_CONNECT,
                    addr: Addr::V4([192, 0, 2, 1], 80)
                },
                10
            )))
        );
        let mut v6 = std::vec![5, 3, 0, 4];
        v6.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        v6.extend_from_slice(&443u16.to_be_bytes());
        let (r, n) = parse_request(&v6).unwrap().unwrap();
        assert_eq!((r.command, r.addr.port(), n), (CMD_UDP_ASSOCIATE, 443, 22));
        let dom = [
            5, 1, 0, 3, 11, b'e', b'x', b'a', b'm', b'p', b'l', b'e', b'.', b'o', b'r', b'g', 1,
            187,
        ];
        let (r, _) = parse_request(&dom).unwrap().unwrap();
        assert_eq!(r.addr, Addr::Domain(b"example.org", 443));
        for cut in 0..dom.len() {
            assert_eq!(parse_request(&dom[..cut]), Ok(None), "cut {cut}");
        }
        assert_eq!(parse_request(&[5, 1, 1, 1]), Err(WireError::BadReserved));
        assert_eq!(parse_request(&[5, 1, 0, 9]), Err(WireError::BadAddressType));
        assert_eq!(
            parse_request(&[5, 1, 0, 3, 0, 0, 80]),
            Err(WireError::EmptyDomain)
        );
    }

    #[test]
    fn udp_headers_round_trip() {
        let mut buf = [0u8; 300];
        let name = [b'x'; 255];
        for addr in [
            Addr::V4([198, 51, 100, 7], 53),
            Addr::V6(
                [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
                443,
            ),
            Addr::Domain(&name, 8080),
        ] {
            let n = encode_udp_header(&addr, &mut buf).unwrap();
            buf[n..n + 4].copy_from_slice(b"data");
            let h = parse_udp_header(&buf[..n + 4]).unwrap().unwrap();
            assert_eq!((h.frag, h.addr, h.payload), (0, addr, n));
            assert_eq!(&buf[h.payload..n + 4], b"data");
        }
        assert_eq!(
            encode_udp_header(&Addr::V4([1, 2, 3, 4], 5), &mut [0u8; 9]),
            None,
            "too small"
        );
        assert_eq!(parse_udp_header(&[0, 1, 0, 1]), Err(WireError::BadReserved));
        let frag = [0, 0, 3, 1, 1, 2, 3, 4, 0, 53, b'x'];
        assert_eq!(parse_udp_header(&frag).unwrap().unwrap().frag, 3);
    }

    /// A deterministic fuzz loop over every parser (the `fuzz/` targets go further).
    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state = 0x9e37_79b9_u32;
        let mut buf = [0u8; 64];
        for round in 0..200_000 {
            for b in buf.iter_mut() {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                *b = state as u8;
            }
            // Bias towards valid prefixes so that deeper code runs.
            buf[0] = [5, 1, 0][round % 3];
            if round % 4 == 0 {
                buf[3] = [1, 3, 4][round % 3];
            }
            let len = (state as usize) % buf.len();
            let b = &buf[..len];
            let _ = parse_greeting(b);
            let _ = parse_credentials(b);
            let _ = parse_request(b);
            if let Ok(Some(h)) = parse_udp_header(b) {
                assert!(h.payload <= b.len());
            }
        }
    }
}
