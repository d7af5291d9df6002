//! Where SOCKS5 clients may go. By default nowhere internal: loopback, private, link-local,
//! unique-local, multicast and the relay's own addresses are refused, so the relay is never a
//! way into the operator's network. Configured lists widen or narrow that.

use std::net::{IpAddr, SocketAddr};

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

impl Policy {
    pub fn check(&self, dest: SocketAddr) -> Result<(), Refused> {
        let ip = canonical(dest.ip());
        let port = dest.port();
        if self.deny.iter().any(|c| c.contains(ip)) {
            return Err(Refused::Denied);
        }
        if self.deny_ports.iter().any(|r| r.contains(port))
            || (!self.allow_ports.is_empty() && !self.allow_ports.iter().any(|r| r.contains(port)))
        {
            return Err(Refused::Port);
        }
        if self.allow.iter().any(|c| c.contains(ip)) {
            return Ok(());
        }
        if !self.allow.is_empty() {
            return Err(Refused::NotAllowed);
        }
        if self.own.contains(&ip) {
            return Err(Refused::Own);
        }
        if is_internal(ip) {
            return Err(Refused::Internal);
        }
        Ok(())
    }
}

/// Every address configured on this host's interfaces (in this network namespace).
pub fn local_addresses() -> Vec<IpAddr> {
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
        if !ifa.ifa_addr.is_null() {
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
            assert_eq!(p.check(sa(internal)), Err(Refused::Internal), "{internal}");
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
    fn finds_loopback_among_local_addresses() {
        assert!(local_addresses().contains(&"127.0.0.1".parse().unwrap()));
    }
}
