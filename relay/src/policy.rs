//! Where SOCKS5 clients may go. By default nowhere internal: loopback, private, link-local,
//! unique-local, multicast and the relay's own addresses are refused, so the relay is never a
//! way into the operator's network. Configured lists widen or narrow that.
//!
//! An IPv6 address that carries an IPv4 address (NAT64 `64:ff9b::/96` and `64:ff9b:1::/48`,
//! 6to4 `2002::/16`, IPv4-compatible `::/96`, Teredo `2001::/32`) is judged as the IPv4
//! address(es) it carries too: a NAT64 gateway or a 6to4 relay on the path would deliver it
//! there. The relay's own addresses (its interfaces', `public_address`, loopback and the
//! unspecified address, which reach the relay host itself) stay refused even inside an
//! `allow` range, unless an `allow` entry names that very address.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::config::{canonical, is_internal, Cidr, PortRange};

#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Destinations allowed even if internal; when non-empty, only these are allowed.
    pub allow: Vec<Cidr>,
    /// Destinations always refused.
    pub deny: Vec<Cidr>,
    /// When non-empty, only these destination ports are allowed.
    pub allow_ports: Vec<PortRange>,
    pub deny_ports: Vec<PortRange>,
    /// The relay's own addresses (refused unless explicitly allowed).
    pub own: Vec<IpAddr>,
}

/// Why a destination was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    Denied,
    NotAllowed,
    Internal,
    Own,
    Port,
}

impl Refused {
    pub fn name(self) -> &'static str {
        match self {
            Refused::Denied => "denied by the deny list",
            Refused::NotAllowed => "not in the allow list",
            Refused::Internal => "an internal address",
            Refused::Own => "one of the relay's own addresses",
            Refused::Port => "a refused port",
        }
    }
}

/// The IPv4 addresses an IPv6 address carries (see the module documentation), at most two.
pub fn embedded_ipv4(ip: IpAddr) -> Vec<Ipv4Addr> {
    let IpAddr::V6(v6) = canonical(ip) else {
        return Vec::new();
    };
    let s = v6.segments();
    let o = v6.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match s {
        // NAT64, well-known prefix and local-use prefix (/96 forms).
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] | [0x64, 0xff9b, 1, ..] => vec![tail],
        // 6to4: 2002:AABB:CCDD::/48.
        [0x2002, ..] => vec![Ipv4Addr::new(o[2], o[3], o[4], o[5])],
        // Teredo: server in bits 32-63, client (obfuscated) in the last 32 bits.
        [0x2001, 0, ..] => vec![
            Ipv4Addr::new(o[4], o[5], o[6], o[7]),
            Ipv4Addr::from(!u32::from(tail)),
        ],
        // IPv4-compatible (deprecated), but not :: and ::1.
        [0, 0, 0, 0, 0, 0, _, _] if u32::from(tail) > 1 => vec![tail],
        _ => Vec::new(),
    }
}

impl Policy {
    pub fn check(&self, dest: SocketAddr) -> Result<(), Refused> {
        let ip = canonical(dest.ip());
        let port = dest.port();
        let mut ips = vec![ip];
        ips.extend(embedded_ipv4(ip).into_iter().map(IpAddr::V4));
        if ips
            .iter()
            .any(|ip| self.deny.iter().any(|c| c.contains(*ip)))
        {
            return Err(Refused::Denied);
        }
        if self.deny_ports.iter().any(|r| r.contains(port))
            || (!self.allow_ports.is_empty() && !self.allow_ports.iter().any(|r| r.contains(port)))
        {
            return Err(Refused::Port);
        }
        // The relay host itself, in whatever form, unless an allow entry names it exactly.
        let own = |ip: &IpAddr| {
            (self.own.contains(ip) || ip.is_loopback() || ip.is_unspecified())
                && !self.allow.iter().any(|c| c.is_host(*ip))
        };
        if ips.iter().any(own) {
            return Err(Refused::Own);
        }
        if self.allow.iter().any(|c| c.contains(ip)) {
            return Ok(());
        }
        if !self.allow.is_empty() {
            return Err(Refused::NotAllowed);
        }
        if ips.iter().any(|ip| is_internal(*ip)) {
            return Err(Refused::Internal);
        }
        Ok(())
    }
}

/// Every address configured on this host's interfaces (in this network namespace).
pub fn local_addresses() -> Vec<IpAddr> {
    addresses(None)
}

/// The addresses of interface `name`, in the order the kernel lists them.
pub fn interface_addresses(name: &str) -> Vec<IpAddr> {
    addresses(Some(name))
}

fn addresses(only: Option<&str>) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut p = ifap;
    while !p.is_null() {
        // SAFETY: `p` is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*p };
        // SAFETY: `ifa_name` is the NUL-terminated name of the node's interface.
        let named = || unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_bytes();
        if !ifa.ifa_addr.is_null() && only.is_none_or(|n| named() == n.as_bytes()) {
            // SAFETY: `ifa_addr` points at a sockaddr of the family it declares, which is
            // no larger than sockaddr_storage for the families socket_addr accepts.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as libc::c_int;
            if family == libc::AF_INET || family == libc::AF_INET6 {
                // SAFETY: as above; we copy only as many bytes as the family's sockaddr has.
                let storage = unsafe {
                    let mut s: libc::sockaddr_storage = std::mem::zeroed();
                    let len = if family == libc::AF_INET {
                        std::mem::size_of::<libc::sockaddr_in>()
                    } else {
                        std::mem::size_of::<libc::sockaddr_in6>()
                    };
                    std::ptr::copy_nonoverlapping(
                        ifa.ifa_addr.cast::<u8>(),
                        (&mut s as *mut libc::sockaddr_storage).cast::<u8>(),
                        len,
                    );
                    s
                };
                if let Some(a) = crate::udp::socket_addr(&storage) {
                    out.push(a.ip());
                }
            }
        }
        p = ifa.ifa_next;
    }
    // SAFETY: `ifap` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(ifap) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn internal_and_own_addresses_are_refused_by_default() {
        let p = Policy {
            own: vec!["203.0.113.5".parse().unwrap()],
            ..Default::default()
        };
        assert_eq!(p.check(sa("93.184.216.34:443")), Ok(()));
        assert_eq!(p.check(sa("[2606:2800:220:1::1]:443")), Ok(()));
        for internal in [
            "127.0.0.1:80",
            "10.0.0.1:22",
            "192.168.1.1:80",
            "169.254.169.254:80",
            "[::1]:80",
            "[fd00::1]:80",
            "224.0.0.1:5353",
            "[::ffff:127.0.0.1]:80",
        ] {
            let want = if sa(internal).ip().is_loopback() || internal.contains("127.0.0.1") {
                // Loopback is the relay host itself.
                Refused::Own
            } else {
                Refused::Internal
            };
            assert_eq!(p.check(sa(internal)), Err(want), "{internal}");
        }
        assert_eq!(p.check(sa("203.0.113.5:80")), Err(Refused::Own));
    }

    #[test]
    fn lists_widen_and_narrow() {
        let p = Policy {
            allow: vec!["198.18.2.0/24".parse().unwrap()],
            deny: vec!["198.18.2.66/32".parse().unwrap()],
            deny_ports: vec!["25".parse().unwrap()],
            ..Default::default()
        };
        assert_eq!(
            p.check(sa("198.18.2.2:80")),
            Ok(()),
            "explicitly allowed internal range"
        );
        assert_eq!(p.check(sa("198.18.2.66:80")), Err(Refused::Denied));
        assert_eq!(p.check(sa("198.18.2.2:25")), Err(Refused::Port));
        assert_eq!(
            p.check(sa("93.184.216.34:443")),
            Err(Refused::NotAllowed),
            "allow list is exclusive"
        );
        let ports = Policy {
            allow_ports: vec!["80".parse().unwrap(), "443".parse().unwrap()],
            ..Default::default()
        };
        assert_eq!(ports.check(sa("93.184.216.34:443")), Ok(()));
        assert_eq!(ports.check(sa("93.184.216.34:22")), Err(Refused::Port));
    }

    #[test]
    fn ipv4_inside_ipv6_is_judged_as_ipv4() {
        let p = Policy {
            own: vec!["198.18.1.1".parse().unwrap()],
            ..Default::default()
        };
        for (dest, why) in [
            ("[64:ff9b::7f00:1]:80", Refused::Own),     // NAT64 127.0.0.1
            ("[64:ff9b::a00:1]:80", Refused::Internal), // NAT64 10.0.0.1
            ("[64:ff9b:1::c0a8:101]:80", Refused::Internal), // local-use NAT64 192.168.1.1
            ("[64:ff9b::c612:101]:80", Refused::Own),   // NAT64 of the relay
            ("[2002:a00:1::1]:80", Refused::Internal),  // 6to4 10.0.0.1
            ("[2002:c612:101::1]:80", Refused::Own),    // 6to4 of the relay
            ("[::a00:1]:80", Refused::Internal),        // IPv4-compatible 10.0.0.1
            ("[2001:0:a00:1::34ff:8efe]:80", Refused::Internal), // Teredo via 10.0.0.1
        ] {
            assert_eq!(p.check(sa(dest)), Err(why), "{dest}");
        }
        assert_eq!(
            p.check(sa("[64:ff9b::808:808]:53")),
            Ok(()),
            "public in NAT64"
        );
        assert_eq!(p.check(sa("[2606:4700::1111]:443")), Ok(()));
    }

    #[test]
    fn own_addresses_stay_refused_inside_an_allow_list_unless_named() {
        let p = Policy {
            allow: vec![
                "198.18.0.0/15".parse().unwrap(),
                "198.18.2.1/32".parse().unwrap(),
            ],
            own: vec!["198.18.1.1".parse().unwrap(), "198.18.2.1".parse().unwrap()],
            ..Default::default()
        };
        assert_eq!(p.check(sa("198.18.2.2:80")), Ok(()));
        assert_eq!(p.check(sa("198.18.1.1:1080")), Err(Refused::Own));
        assert_eq!(p.check(sa("198.18.2.1:80")), Ok(()), "named exactly");
        assert_eq!(p.check(sa("0.0.0.0:1080")), Err(Refused::Own));
        let everything = Policy {
            allow: vec!["0.0.0.0/0".parse().unwrap()],
            ..Default::default()
        };
        assert_eq!(everything.check(sa("127.0.0.1:22")), Err(Refused::Own));
    }

    #[test]
    fn finds_loopback_among_local_addresses() {
        assert!(local_addresses().contains(&"127.0.0.1".parse().unwrap()));
    }
}
