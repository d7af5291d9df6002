//! Configuration: the TOML file (see `examples/relay.toml`) and the equivalent flags, checked
//! into typed rules with errors that name the offending field.

use std::{
    fmt,
    net::{IpAddr, SocketAddr, ToSocketAddrs as _},
    path::Path,
    str::FromStr,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _};
use serde::Deserialize;

/// Idle timeout of a session when a rule does not set one: long enough for VPN keepalives
/// (WireGuard: 25 s) and for calls on hold.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Sessions one client address may hold on a rule when the rule does not say: room for a
/// household or an office behind one NAT address, not for one host taking the table.
pub const DEFAULT_MAX_SESSIONS_PER_SOURCE: u32 = 256;
/// New sessions per second a rule opens when it does not say, and in one burst (a relay's
/// users reconnecting at once after an outage or a move).
pub const DEFAULT_NEW_SESSIONS_PER_SECOND: u32 = 1000;
pub const DEFAULT_NEW_SESSIONS_BURST: u32 = 10_000;
/// How long a session may wait for its upstream's first answer when the rule does not say.
pub const DEFAULT_UNANSWERED_TIMEOUT: Duration = Duration::from_secs(30);

/// Sessions the kernel maps hold when the configuration does not say: one per session port.
pub const DEFAULT_SESSION_CAPACITY: u32 = 10_000;
/// Relay-side ports of sessions when the configuration does not say: below Linux's ephemeral
/// range (32768-60999), so other programs' outgoing sockets do not compete for them.
pub const DEFAULT_SESSION_PORTS: PortRange = PortRange {
    first: 20_000,
    last: 29_999,
};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    relay: RawRelay,
    #[serde(default)]
    forward: Vec<RawForward>,
    socks5: Option<RawSocks5>,
    #[serde(default)]
    policy: RawPolicy,
    fleet: Option<RawFleet>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    database: String,
    name: Option<String>,
}

/// A fleet of relays sharing users, quotas and usage through PostgreSQL (`[fleet]`).
#[derive(Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// A libpq-style connection string (`host=/run/postgresql dbname=relay user=relay` or
    /// `postgresql://relay:PASSWORD@db.internal/relay`).
    pub database: String,
    /// This relay's name in the fleet (default: the host name).
    pub name: String,
}

impl std::fmt::Debug for FleetConfig {
    // The connection string may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetConfig")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl RawFleet {
    fn check(self) -> anyhow::Result<FleetConfig> {
        if self.database.trim().is_empty() {
            bail!("database: a PostgreSQL connection string is needed");
        }
        let name = match self.name {
            Some(n) => n,
            None => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .filter(|h| !h.is_empty())
                .context("name: the host has no name; give one")?,
        };
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            bail!("name: 1 to 64 bytes without control characters");
        }
        Ok(FleetConfig {
            database: self.database,
            name,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSocks5 {
    listen: String,
    public_address: Option<String>,
    udp_ports: Option<String>,
    #[serde(default)]
    allow_no_auth: bool,
    handshake_timeout: Option<String>,
    connect_timeout: Option<String>,
    udp_idle_timeout: Option<String>,
    max_handshakes: Option<u32>,
    max_handshakes_per_source: Option<u32>,
    max_connections_per_source: Option<u32>,
    connect_idle_timeout: Option<String>,
    fast_path_flows: Option<u32>,
    #[serde(default)]
    connect_path: ConnectPath,
    #[serde(default)]
    users: Vec<RawUser>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: String,
    password_hash: String,
    max_associations: Option<u32>,
    max_connections: Option<u32>,
    /// Bytes per period, both directions: `10 GB`, `500 MiB` or a number of bytes.
    quota: Option<Size>,
    /// `never` (default), `daily`, `monthly` or `monthly:DAY`.
    quota_period: Option<String>,
    /// RFC 3339 time or a date (UTC midnight) after which the user is refused.
    expires: Option<String>,
    /// Bytes per second, each way: `2 MB`.
    rate: Option<Size>,
    /// Bytes above the rate at once [default: a tenth of a second's, at least 64 KiB].
    burst: Option<Size>,
    /// Distinct client addresses at once.
    max_devices: Option<u32>,
    #[serde(default = "yes")]
    enabled: bool,
}

fn yes() -> bool {
    true
}

/// A byte size in the file: a string with a unit or a plain number of bytes.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    fn bytes(&self) -> anyhow::Result<u64> {
        match self {
            Size::Bytes(n) => Ok(*n),
            Size::Text(s) => crate::limits::parse_bytes(s),
        }
    }
}

impl RawUser {
    fn limits(&self) -> anyhow::Result<crate::limits::Limits> {
        let size = |v: &Option<Size>, what: &str| {
            v.as_ref()
                .map(|s| s.bytes().with_context(|| what.to_owned()))
                .transpose()
        };
        let quota = size(&self.quota, "quota")?;
        let rate = size(&self.rate, "rate")?;
        if rate == Some(0) {
            bail!("rate: must be more than 0 (leave it out for no limit; set enabled = false to stop a user)");
        }
        let burst = size(&self.burst, "burst")?;
        if burst.is_some() && rate.is_none() {
            bail!("burst: needs a rate");
        }
        if self.max_devices == Some(0) {
            bail!("max_devices: must be at least 1 (set enabled = false to stop a user)");
        }
        let period = match &self.quota_period {
            Some(p) => p.parse().context("quota_period")?,
            None => crate::limits::Period::Never,
        };
        if self.quota_period.is_some() && quota.is_none() {
            bail!("quota_period: needs a quota");
        }
        Ok(crate::limits::Limits {
            quota,
            period,
            expires: self
                .expires
                .as_deref()
                .map(crate::limits::parse_time)
                .transpose()
                .context("expires")?,
            rate,
            burst: burst.unwrap_or_else(|| rate.map_or(0, crate::limits::Limits::default_burst)),
            max_devices: self.max_devices,
            enabled: self.enabled,
        })
    }
}

/// A user's settings as the management API and the store hold them (the same fields, names
/// and meaning as in `[[socks5.users]]`; sizes are numbers of bytes).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_associations: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_period: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_devices: Option<u32>,
    #[serde(default = "yes")]
    pub enabled: bool,
}

impl Default for Spec {
    fn default() -> Spec {
        Spec {
            max_connections: None,
            max_associations: None,
            quota: None,
            quota_period: None,
            expires: None,
            rate: None,
            burst: None,
            max_devices: None,
            enabled: true,
        }
    }
}

/// The longest user name and password SOCKS5 can carry (RFC 1929: one length byte).
pub const MAX_NAME: usize = 255;

/// Checks a user name: 1 to 255 bytes, no control characters, no surrounding spaces.
pub fn check_user_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.len() > MAX_NAME {
        bail!("a user name is 1 to {MAX_NAME} bytes");
    }
    if name.chars().any(char::is_control) || name.trim() != name {
        bail!("a user name has no control characters and no leading or trailing spaces");
    }
    Ok(())
}

impl Spec {
    /// A configured user's settings in this form.
    pub fn of(u: &crate::socks5::users::User) -> Spec {
        let l = &u.limits;
        Spec {
            max_connections: Some(u.max_connections),
            max_associations: Some(u.max_associations),
            quota: l.quota,
            quota_period: l.quota.map(|_| l.period.to_string()),
            expires: l.expires.map(crate::limits::format_time),
            rate: l.rate,
            burst: l.rate.map(|_| l.burst),
            max_devices: l.max_devices,
            enabled: l.enabled,
        }
    }

    /// The user these settings make, checked as the file's users are; `expires` comes back
    /// in one form (RFC 3339, UTC).
    pub fn user(
        &self,
        name: &str,
        password_hash: &str,
    ) -> anyhow::Result<(crate::socks5::users::User, Spec)> {
        check_user_name(name)?;
        let raw = RawUser {
            name: name.to_owned(),
            password_hash: password_hash.to_owned(),
            max_associations: self.max_associations,
            max_connections: self.max_connections,
            quota: self.quota.map(Size::Bytes),
            quota_period: self.quota_period.clone(),
            expires: self.expires.clone(),
            rate: self.rate.map(Size::Bytes),
            burst: self.burst.map(Size::Bytes),
            max_devices: self.max_devices,
            enabled: self.enabled,
        };
        let limits = raw.limits()?;
        for (what, v) in [
            ("max_connections", self.max_connections),
            ("max_associations", self.max_associations),
        ] {
            if v == Some(0) {
                bail!("{what}: must be at least 1 (set enabled = false to stop a user)");
            }
        }
        let mut spec = self.clone();
        spec.expires = limits.expires.map(crate::limits::format_time);
        let user = crate::socks5::users::User {
            name: raw.name,
            password_hash: raw.password_hash,
            max_associations: self.max_associations.unwrap_or(DEFAULT_MAX_ASSOCIATIONS),
            max_connections: self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            limits,
            origin: crate::socks5::users::Origin::Api,
            password: None,
        };
        Ok((user, spec))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default)]
    allow_ports: Vec<String>,
    #[serde(default)]
    deny_ports: Vec<String>,
}

/// The SOCKS5 server's settings.
#[derive(Clone, Debug)]
pub struct Socks5Config {
    pub listen: SocketAddr,
    /// BND.ADDR for UDP ASSOCIATE when the relay sits behind NAT (default: the address the
    /// client connected to).
    pub public_address: Option<IpAddr>,
    pub udp_ports: PortRange,
    pub allow_no_auth: bool,
    /// The whole handshake (greeting to request) must end within this.
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    /// A CONNECT without a byte either way for this long is closed.
    pub connect_idle_timeout: Duration,
    pub udp_idle_timeout: Duration,
    pub max_handshakes: u32,
    /// Handshakes at once from one source (an IPv4 address or an IPv6 /64).
    pub max_handshakes_per_source: u32,
    /// Connections at once (handshaking or established) from one source.
    pub max_connections_per_source: u32,
    /// (association, destination) pairs the XDP fast path can hold.
    pub fast_path_flows: u32,
    /// How CONNECT bytes move between the two sockets.
    pub connect_path: ConnectPath,
    pub users: Vec<crate::socks5::users::User>,
}

/// How CONNECT bytes move between the client's and the destination's socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectPath {
    /// In the kernel (sockmap and a stream verdict): no byte enters userspace, no system call
    /// per chunk while each side keeps up; a side that falls behind gets its bytes through the
    /// controller, at its own pace. Falls back to `splice` where the kernel refuses the
    /// program or with `--xdp-mode off`.
    Kernel,
    /// splice(2) through a pipe each way, driven by the controller; TCP's own flow control
    /// holds a fast side back for a slow one.
    #[default]
    Splice,
}

impl RawSocks5 {
    fn check(self) -> anyhow::Result<Socks5Config> {
        let listen: SocketAddr = self
            .listen
            .parse()
            .with_context(|| format!("listen: {:?} is not ADDRESS:PORT", self.listen))?;
        let dur = |v: &Option<String>, d: u64, what: &str| -> anyhow::Result<Duration> {
            v.as_deref().map_or(Ok(Duration::from_secs(d)), |s| {
                parse_duration(s).with_context(|| what.to_owned())
            })
        };
        let users = self
            .users
            .into_iter()
            .map(|u| {
                let limits = u.limits().with_context(|| format!("user {:?}", u.name))?;
                Ok(crate::socks5::users::User {
                    name: u.name,
                    password_hash: u.password_hash,
                    max_associations: u.max_associations.unwrap_or(DEFAULT_MAX_ASSOCIATIONS),
                    max_connections: u.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
                    limits,
                    ..Default::default()
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let max_handshakes = self.max_handshakes.unwrap_or(DEFAULT_MAX_HANDSHAKES);
        let max_handshakes_per_source = self
            .max_handshakes_per_source
            .unwrap_or(DEFAULT_MAX_HANDSHAKES_PER_SOURCE);
        let max_connections_per_source = self
            .max_connections_per_source
            .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_SOURCE);
        for (what, v) in [
            ("max_handshakes", max_handshakes),
            ("max_handshakes_per_source", max_handshakes_per_source),
            ("max_connections_per_source", max_connections_per_source),
        ] {
            if v == 0 {
                bail!("{what}: must be at least 1");
            }
        }
        let handshake_timeout = dur(&self.handshake_timeout, 10, "handshake_timeout")?;
        if handshake_timeout < Duration::from_secs(1) {
            bail!("handshake_timeout: at least 1s (a whole handshake over a slow link)");
        }
        let connect_idle_timeout = dur(
            &self.connect_idle_timeout,
            DEFAULT_CONNECT_IDLE_TIMEOUT.as_secs(),
            "connect_idle_timeout",
        )?;
        if connect_idle_timeout < Duration::from_secs(1) {
            bail!("connect_idle_timeout: at least 1s");
        }
        // No users in the file is allowed: they may all come from the store (`relay users
        // add`, the management API). Until there is one, every client is refused.
        Ok(Socks5Config {
            listen,
            public_address: self
                .public_address
                .map(|a| {
                    a.parse()
                        .with_context(|| format!("public_address: {a:?} is not an IP address"))
                })
                .transpose()?,
            udp_ports: match &self.udp_ports {
                Some(s) => s.parse().context("udp_ports")?,
                None => DEFAULT_SOCKS_UDP_PORTS,
            },
            allow_no_auth: self.allow_no_auth,
            handshake_timeout,
            connect_timeout: dur(&self.connect_timeout, 10, "connect_timeout")?,
            connect_idle_timeout,
            udp_idle_timeout: dur(&self.udp_idle_timeout, 300, "udp_idle_timeout")?,
            max_handshakes,
            max_handshakes_per_source,
            max_connections_per_source,
            fast_path_flows: self.fast_path_flows.unwrap_or(4096),
            connect_path: self.connect_path,
            users,
        })
    }
}

/// CONNECTs at once per user when the user's settings give none.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 256;

/// Handshakes at once, all sources together.
pub const DEFAULT_MAX_HANDSHAKES: u32 = 256;
/// Handshakes at once from one source: a tenth of the slots or so, so that one address (or
/// one IPv6 /64) cannot take them all, while a tun2socks client opening a burst of flows
/// over a slow link still gets through.
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: u32 = 24;
/// Connections at once from one source (a household or a carrier-grade NAT shares an
/// address; one tun2socks client opens one per flow).
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: u32 = 1024;
/// A CONNECT with no byte either way for this long is closed (dead peers are found sooner,
/// by TCP keepalive).
pub const DEFAULT_CONNECT_IDLE_TIMEOUT: Duration = Duration::from_secs(2 * 3600);

/// UDP associations a user may hold at once when the configuration does not say: tun2socks
/// clients open one per UDP flow, and a phone opens dozens at once.
pub const DEFAULT_MAX_ASSOCIATIONS: u32 = 256;

/// UDP ASSOCIATE ports when the configuration does not say.
pub const DEFAULT_SOCKS_UDP_PORTS: PortRange = PortRange {
    first: 30_000,
    last: 31_999,
};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    session_capacity: Option<u32>,
    session_ports: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    name: Option<String>,
    listen: String,
    upstream: String,
    allow: Option<Vec<String>>,
    idle_timeout: Option<String>,
    max_sessions: Option<u32>,
    max_sessions_per_source: Option<u32>,
    new_sessions_per_second: Option<u32>,
    new_sessions_burst: Option<u32>,
    unanswered_timeout: Option<String>,
    #[serde(default)]
    allow_private_upstream: bool,
    /// "udp" (the default), "tcp" or "both".
    protocol: Option<String>,
}

/// Idle timeout of an established TCP session when the rule sets none: RFC 5382 (REQ-5)
/// asks a NAT for at least 2 hours 4 minutes, the time TCP keepalives take to show.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(2 * 3600 + 4 * 60);

/// How long a TCP session stays after both FINs or a RST: its last segments (the final ACK,
/// a retransmitted FIN) still pass.
pub const TCP_LINGER: Duration = Duration::from_secs(10);

/// The transport protocols a forward rule relays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Protocols {
    pub udp: bool,
    pub tcp: bool,
}

impl FromStr for Protocols {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Protocols> {
        Ok(match s {
            "udp" => Protocols {
                udp: true,
                tcp: false,
            },
            "tcp" => Protocols {
                udp: false,
                tcp: true,
            },
            "both" => Protocols {
                udp: true,
                tcp: true,
            },
            other => bail!("{other:?} is not one of \"udp\", \"tcp\", \"both\""),
        })
    }
}

/// An inclusive port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    /// How many ports (never zero: FIRST <= LAST).
    pub fn count(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl FromStr for PortRange {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<PortRange> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let first: u16 = a
            .trim()
            .parse()
            .with_context(|| format!("bad port {a:?}"))?;
        let last: u16 = b
            .trim()
            .parse()
            .with_context(|| format!("bad port {b:?}"))?;
        if first == 0 || last < first {
            bail!("bad port range {s:?}: want FIRST-LAST with 0 < FIRST <= LAST");
        }
        Ok(PortRange { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// An address prefix such as `198.51.100.0/24` or `2001:db8::/32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// Whether this entry names exactly `ip` (a /32 or /128 of it).
    pub fn is_host(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        let full = if ip.is_ipv4() { 32 } else { 128 };
        self.len == full && canonical(self.addr) == ip
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Cidr> {
        let (a, l) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a.parse().with_context(|| format!("bad address in {s:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = if l.is_empty() {
            max
        } else {
            l.parse::<u8>()
                .with_context(|| format!("bad prefix length in {s:?}"))?
        };
        if len > max {
            bail!("prefix length {len} too long in {s:?}");
        }
        Ok(Cidr { addr, len })
    }
}

/// IPv4-mapped IPv6 addresses are IPv4 addresses.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Addresses a relay must not send to unless a rule says so: loopback, private, link-local,
/// unique-local, multicast, unspecified, benchmarking and documentation ranges.
pub fn is_internal(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_multicast()
                || a.is_unspecified()
                || a.is_broadcast()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64/10 shared address space
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18/15 benchmarking
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        }
    }
}

/// One forward rule as configured.
#[derive(Clone, Debug)]
pub struct ForwardRule {
    pub name: String,
    /// Listen address and its ports.
    pub listen_ip: IpAddr,
    pub listen_ports: PortRange,
    /// Upstream as written (host name or address) and its ports: one port, or as many as
    /// `listen_ports` (mapped one to one).
    pub upstream_host: String,
    pub upstream_ports: PortRange,
    /// Clients allowed to open sessions (empty: everyone).
    pub allow: Vec<Cidr>,
    pub idle_timeout: Duration,
    pub max_sessions: u32,
    /// Sessions one client address may hold on the rule at once.
    pub max_sessions_per_source: u32,
    /// New sessions the rule opens per second on average, and at once.
    pub new_sessions_per_second: u32,
    pub new_sessions_burst: u32,
    /// A session whose upstream has not answered ends this long after it opened.
    pub unanswered_timeout: Duration,
    pub allow_private_upstream: bool,
    pub protocols: Protocols,
    /// TCP sessions' idle timeout (the rule's `idle_timeout` if set, else
    /// [`DEFAULT_TCP_IDLE_TIMEOUT`]).
    pub tcp_idle_timeout: Duration,
}

impl ForwardRule {
    /// The upstream port for a listen port.
    pub fn upstream_port(&self, listen_port: u16) -> u16 {
        if self.upstream_ports.first == self.upstream_ports.last {
            self.upstream_ports.first
        } else {
            self.upstream_ports.first + (listen_port - self.listen_ports.first)
        }
    }

    pub fn client_allowed(&self, ip: IpAddr) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|c| c.contains(ip))
    }

    /// Resolves the upstream host to one address (preferring the listen address's family)
    /// and checks it against the internal-address policy.
    pub fn resolve_upstream(&self) -> anyhow::Result<IpAddr> {
        let addrs: Vec<SocketAddr> = (self.upstream_host.as_str(), 0)
            .to_socket_addrs()
            .with_context(|| {
                format!(
                    "rule {}: resolving upstream {:?}",
                    self.name, self.upstream_host
                )
            })?
            .collect();
        let ip = addrs
            .iter()
            .map(|a| canonical(a.ip()))
            .find(|ip| ip.is_ipv4() == self.listen_ip.is_ipv4())
            .or_else(|| addrs.first().map(|a| canonical(a.ip())))
            .ok_or_else(|| {
                anyhow!(
                    "rule {}: upstream {:?} has no address",
                    self.name,
                    self.upstream_host
                )
            })?;
        if is_internal(ip) && !self.allow_private_upstream {
            bail!(
                "rule {}: upstream {ip} is a loopback/private/internal address; set \
                 allow_private_upstream = true in the rule if that is intended",
                self.name
            );
        }
        Ok(ip)
    }
}

/// Settings given on the command line of `relay run`, applied over the file's with
/// [`Config::apply_flags`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Flags<'a> {
    pub session_capacity: Option<u32>,
    pub session_ports: Option<&'a str>,
    /// `--forward LISTEN=UPSTREAM` rules.
    pub forward: &'a [String],
    /// For the `--forward` rules.
    pub allow_private_upstream: bool,
    pub idle_timeout: Option<&'a str>,
    pub max_sessions_per_source: Option<u32>,
}

/// The whole configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub session_capacity: u32,
    pub session_ports: PortRange,
    pub forward: Vec<ForwardRule>,
    pub socks5: Option<Socks5Config>,
    pub policy: crate::policy::Policy,
    /// Users and usage shared with other relays through PostgreSQL.
    pub fleet: Option<FleetConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            session_capacity: DEFAULT_SESSION_CAPACITY,
            session_ports: DEFAULT_SESSION_PORTS,
            forward: Vec::new(),
            socks5: None,
            policy: crate::policy::Policy::default(),
            fleet: None,
        }
    }
}

/// Sessions the maps can be sized for.
fn check_capacity(capacity: u32) -> anyhow::Result<()> {
    if capacity == 0 || capacity > 16 << 20 {
        bail!("{capacity} is out of range (1 to 16777216)");
    }
    Ok(())
}

/// A session idle timeout must outlast VPN keepalives (WireGuard: 25 s).
pub fn check_idle_timeout(t: Duration) -> anyhow::Result<()> {
    if t < Duration::from_secs(10) {
        bail!(
            "idle_timeout: {}s is shorter than VPN keepalives; use at least 10s",
            t.as_secs()
        );
    }
    Ok(())
}

/// `"300"`, `"300s"`, `"5m"`, `"1h"`.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num.parse().with_context(|| format!("bad duration {s:?}"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "m" | "min" => n * 60,
        "h" => n * 3600,
        other => bail!("bad duration unit {other:?} in {s:?} (use s, m or h)"),
    };
    Ok(Duration::from_secs(secs))
}

/// Splits `HOST:PORTS` or `[V6]:PORTS` into host and port range.
fn split_host_ports(s: &str) -> anyhow::Result<(String, PortRange)> {
    let (host, ports) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest
            .split_once("]:")
            .ok_or_else(|| anyhow!("{s:?}: want [ADDRESS]:PORT"))?;
        (h, p)
    } else {
        s.rsplit_once(':')
            .ok_or_else(|| anyhow!("{s:?}: want HOST:PORT or HOST:FIRST-LAST"))?
    };
    if host.is_empty() {
        bail!("{s:?}: missing host");
    }
    Ok((
        host.to_owned(),
        ports.parse().with_context(|| format!("in {s:?}"))?,
    ))
}

impl RawForward {
    fn check(self, index: usize, capacity: u32) -> anyhow::Result<ForwardRule> {
        let (listen_host, listen_ports) = split_host_ports(&self.listen).context("listen")?;
        let listen_ip: IpAddr = listen_host
            .parse()
            .with_context(|| format!("listen: {listen_host:?} is not an IP address"))?;
        let (upstream_host, upstream_ports) =
            split_host_ports(&self.upstream).context("upstream")?;
        if upstream_ports.count() != 1 && upstream_ports.count() != listen_ports.count() {
            bail!(
                "upstream: port range {upstream_ports} must be one port or as long as the listen range {listen_ports}"
            );
        }
        let allow = self
            .allow
            .unwrap_or_default()
            .iter()
            .map(|c| c.parse())
            .collect::<anyhow::Result<Vec<Cidr>>>()
            .context("allow")?;
        let protocols: Protocols = match &self.protocol {
            Some(p) => p.parse().context("protocol")?,
            None => Protocols {
                udp: true,
                tcp: false,
            },
        };
        let idle_timeout = match &self.idle_timeout {
            Some(s) => parse_duration(s).context("idle_timeout")?,
            None => DEFAULT_IDLE_TIMEOUT,
        };
        check_idle_timeout(idle_timeout)?;
        let tcp_idle_timeout = match self.idle_timeout {
            Some(_) => idle_timeout,
            None => DEFAULT_TCP_IDLE_TIMEOUT,
        };
        let unanswered_timeout = match &self.unanswered_timeout {
            Some(s) => parse_duration(s).context("unanswered_timeout")?,
            None => DEFAULT_UNANSWERED_TIMEOUT.min(idle_timeout),
        };
        if unanswered_timeout < Duration::from_secs(5) || unanswered_timeout > idle_timeout {
            bail!(
                "unanswered_timeout: {}s must be at least 5s (an upstream's first answer can take \
                 a few round trips) and at most idle_timeout ({}s)",
                unanswered_timeout.as_secs(),
                idle_timeout.as_secs()
            );
        }
        let positive = |v: Option<u32>, default: u32, what: &str| -> anyhow::Result<u32> {
            match v {
                Some(0) => bail!("{what}: must be at least 1"),
                Some(n) => Ok(n),
                None => Ok(default),
            }
        };
        let max_sessions_per_source = positive(
            self.max_sessions_per_source,
            DEFAULT_MAX_SESSIONS_PER_SOURCE,
            "max_sessions_per_source",
        )?;
        let new_sessions_per_second = positive(
            self.new_sessions_per_second,
            DEFAULT_NEW_SESSIONS_PER_SECOND,
            "new_sessions_per_second",
        )?;
        let new_sessions_burst = positive(
            self.new_sessions_burst,
            DEFAULT_NEW_SESSIONS_BURST.max(new_sessions_per_second),
            "new_sessions_burst",
        )?;
        Ok(ForwardRule {
            name: self.name.unwrap_or_else(|| format!("forward{index}")),
            listen_ip,
            listen_ports,
            upstream_host,
            upstream_ports,
            allow,
            idle_timeout,
            max_sessions: self.max_sessions.unwrap_or(capacity).min(capacity),
            max_sessions_per_source,
            new_sessions_per_second,
            new_sessions_burst,
            unanswered_timeout,
            allow_private_upstream: self.allow_private_upstream,
            protocols,
            tcp_idle_timeout,
        })
    }
}

impl Config {
    /// Parses and checks a TOML document.
    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| anyhow!("{}", e.message().trim()))?;
        let capacity = raw
            .relay
            .session_capacity
            .unwrap_or(DEFAULT_SESSION_CAPACITY);
        check_capacity(capacity).context("relay.session_capacity")?;
        let session_ports = match &raw.relay.session_ports {
            Some(s) => s.parse().context("relay.session_ports")?,
            None => DEFAULT_SESSION_PORTS,
        };
        let forward = raw
            .forward
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                f.check(i, capacity)
                    .with_context(|| format!("forward[{i}]"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let cidrs = |v: &[String]| {
            v.iter()
                .map(|c| c.parse())
                .collect::<anyhow::Result<Vec<Cidr>>>()
        };
        let ports = |v: &[String]| {
            v.iter()
                .map(|c| c.parse())
                .collect::<anyhow::Result<Vec<PortRange>>>()
        };
        let policy = crate::policy::Policy {
            allow: cidrs(&raw.policy.allow).context("policy.allow")?,
            deny: cidrs(&raw.policy.deny).context("policy.deny")?,
            allow_ports: ports(&raw.policy.allow_ports).context("policy.allow_ports")?,
            deny_ports: ports(&raw.policy.deny_ports).context("policy.deny_ports")?,
            own: Vec::new(),
        };
        let socks5 = raw
            .socks5
            .map(RawSocks5::check)
            .transpose()
            .context("socks5")?;
        let fleet = raw
            .fleet
            .map(RawFleet::check)
            .transpose()
            .context("fleet")?;
        if fleet.is_some() && socks5.is_none() {
            bail!("fleet: shares SOCKS5 users; it needs a [socks5] section");
        }
        let config = Config {
            session_capacity: capacity,
            session_ports,
            forward,
            socks5,
            policy,
            fleet,
        };
        config.check_overlaps()?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Config::from_toml(&text).with_context(|| format!("{}", path.display()))
    }

    /// The port ranges the relay hands out itself (session ports, SOCKS5 association
    /// ports), named as in the file: reserved from the kernel's own choices while it runs.
    pub fn reserved_ranges(&self) -> Vec<(&'static str, PortRange)> {
        let mut v = vec![("relay.session_ports", self.session_ports)];
        if let Some(s) = &self.socks5 {
            v.push(("socks5.udp_ports", s.udp_ports));
        }
        v
    }

    /// Applies the command line's settings over the file's, each checked as the file's are.
    pub fn apply_flags(&mut self, flags: &Flags<'_>) -> anyhow::Result<()> {
        if let Some(c) = flags.session_capacity {
            self.set_session_capacity(c)?;
        }
        if let Some(p) = flags.session_ports {
            self.set_session_ports(p)?;
        }
        if flags.max_sessions_per_source == Some(0) {
            bail!("--max-sessions-per-source: must be at least 1");
        }
        let idle = flags
            .idle_timeout
            .map(|t| {
                let t = parse_duration(t).context("--idle-timeout")?;
                check_idle_timeout(t).context("--idle-timeout")?;
                Ok::<_, anyhow::Error>(t)
            })
            .transpose()?;
        for spec in flags.forward {
            self.add_flag_rule(spec)?;
            if let Some(rule) = self.forward.last_mut() {
                rule.allow_private_upstream = flags.allow_private_upstream;
                if let Some(t) = idle {
                    rule.idle_timeout = t;
                    rule.unanswered_timeout = rule.unanswered_timeout.min(t);
                }
                if let Some(n) = flags.max_sessions_per_source {
                    rule.max_sessions_per_source = n;
                }
            }
        }
        Ok(())
    }

    /// `--session-capacity`: checked as `relay.session_capacity` is in a file; rules keep at
    /// most that many sessions.
    pub fn set_session_capacity(&mut self, capacity: u32) -> anyhow::Result<()> {
        check_capacity(capacity).context("--session-capacity")?;
        self.session_capacity = capacity;
        for rule in &mut self.forward {
            rule.max_sessions = rule.max_sessions.min(capacity);
        }
        Ok(())
    }

    /// `--session-ports`: checked as `relay.session_ports` is in a file, also against the
    /// listeners.
    pub fn set_session_ports(&mut self, ports: &str) -> anyhow::Result<()> {
        self.session_ports = ports.parse().context("--session-ports")?;
        self.check_overlaps().context("--session-ports")
    }

    /// Adds a rule given on the command line as `[udp:|tcp:|both:]LISTEN=UPSTREAM`.
    pub fn add_flag_rule(&mut self, spec: &str) -> anyhow::Result<()> {
        let (protocol, rest) = match spec.split_once(':') {
            Some((p @ ("udp" | "tcp" | "both"), rest)) => (Some(p.to_owned()), rest),
            _ => (None, spec),
        };
        let (listen, upstream) = rest
            .split_once('=')
            .ok_or_else(|| anyhow!("--forward {spec:?}: want LISTEN=UPSTREAM, e.g. 0.0.0.0:51820=vpn.example.net:51820"))?;
        let index = self.forward.len();
        let rule = RawForward {
            name: None,
            listen: listen.to_owned(),
            upstream: upstream.to_owned(),
            allow: None,
            idle_timeout: None,
            max_sessions: None,
            max_sessions_per_source: None,
            new_sessions_per_second: None,
            new_sessions_burst: None,
            unanswered_timeout: None,
            allow_private_upstream: false,
            protocol,
        }
        .check(index, self.session_capacity)
        .with_context(|| format!("--forward {spec:?}"))?;
        self.forward.push(rule);
        self.check_overlaps()
    }

    /// Listen ports must not collide with each other or with the session port range.
    fn check_overlaps(&self) -> anyhow::Result<()> {
        if let Some(s) = &self.socks5 {
            let (a, b) = (s.udp_ports, self.session_ports);
            if a.first <= b.last && b.first <= a.last {
                bail!("socks5.udp_ports {a} overlap relay.session_ports {b}");
            }
            for (name, r) in [("socks5.udp_ports", a), ("relay.session_ports", b)] {
                if r.contains(s.listen.port()) {
                    bail!(
                        "socks5.listen port {} is inside {name} {r}",
                        s.listen.port()
                    );
                }
            }
        }
        for (i, a) in self.forward.iter().enumerate() {
            let sp = self.session_ports;
            if a.listen_ports.first <= sp.last && sp.first <= a.listen_ports.last {
                bail!(
                    "rule {}: listen ports {} overlap the session port range {sp}",
                    a.name,
                    a.listen_ports
                );
            }
            for b in &self.forward[i + 1..] {
                let same_ip = a.listen_ip == b.listen_ip
                    || a.listen_ip.is_unspecified()
                    || b.listen_ip.is_unspecified();
                let overlap = a.listen_ports.first <= b.listen_ports.last
                    && b.listen_ports.first <= a.listen_ports.last;
                let shared =
                    (a.protocols.udp && b.protocols.udp) || (a.protocols.tcp && b.protocols.tcp);
                if same_ip && overlap && shared && a.listen_ip.is_ipv4() == b.listen_ip.is_ipv4() {
                    bail!(
                        "rules {} and {} listen on overlapping ports",
                        a.name,
                        b.name
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_rule_is_two_lines() {
        let c = Config::from_toml(
            "[[forward]]\nlisten = \"0.0.0.0:51820\"\nupstream = \"203.0.113.7:51820\"\n",
        )
        .unwrap();
        let r = &c.forward[0];
        assert_eq!(r.name, "forward0");
        assert_eq!(
            r.listen_ports,
            PortRange {
                first: 51820,
                last: 51820
            }
        );
        assert_eq!(r.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert!(
            r.idle_timeout >= Duration::from_secs(60),
            "minutes, never seconds"
        );
        assert_eq!(r.max_sessions, DEFAULT_SESSION_CAPACITY);
        assert!(r.client_allowed("198.51.100.1".parse().unwrap()));
        assert_eq!(c.session_ports, DEFAULT_SESSION_PORTS);
    }

    #[test]
    fn the_example_file_parses() {
        let text = include_str!("../../examples/relay.toml");
        let c = Config::from_toml(text).unwrap();
        assert!(c.forward.len() >= 2);
        let socks = c.socks5.expect("the example has a [socks5] section");
        let users = crate::socks5::users::Users::new(socks.users).unwrap();
        assert!(
            users.verify("alice", b"example password"),
            "the documented example hash"
        );
        assert_eq!(c.policy.deny_ports.len(), 1);
    }

    #[test]
    fn port_ranges_map_one_to_one_or_to_one_port() {
        let c = Config::from_toml(
            "[[forward]]\nlisten = \"[::]:1000-1009\"\nupstream = \"[2001:db8::1]:2000-2009\"\n\
             [[forward]]\nlisten = \"0.0.0.0:3000-3004\"\nupstream = \"x.example:53\"\n",
        )
        .unwrap();
        assert_eq!(c.forward[0].upstream_port(1003), 2003);
        assert_eq!(c.forward[1].upstream_port(3004), 53);
        let e = Config::from_toml(
            "[[forward]]\nlisten = \"0.0.0.0:1000-1009\"\nupstream = \"h:2000-2001\"\n",
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("must be one port or as long"),
            "{e:#}"
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("[[forward]]\nlisten = \"0.0.0.0\"\nupstream = \"h:1\"\n", "forward[0]: listen"),
            ("[[forward]]\nlisten = \"nothost:1\"\nupstream = \"h:1\"\n", "not an IP address"),
            ("[[forward]]\nlisten = \"0.0.0.0:1\"\nupstream = \"h:1\"\nidle_timeout = \"5s\"\n", "idle_timeout"),
            ("[[forward]]\nlisten = \"0.0.0.0:1\"\nupstream = \"h:1\"\nallow = [\"10.0.0.0/33\"]\n", "allow"),
            ("[[forward]]\nlisten = \"0.0.0.0:1\"\nupstream = \"h:1\"\nbogus = 1\n", "unknown field"),
            ("[[forward]]\nlisten = \"0.0.0.0:25000\"\nupstream = \"h:1\"\n", "overlap the session port range"),
            ("[relay]\nsession_capacity = 0\n", "session_capacity"),
            ("[[forward]]\nlisten = \"0.0.0.0:1\"\nupstream = \"h:1\"\n[[forward]]\nlisten = \"0.0.0.0:1\"\nupstream = \"h:2\"\n", "overlapping"),
        ];
        for (text, want) in cases {
            let e = format!("{:#}", Config::from_toml(text).unwrap_err());
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn cidrs_and_internal_addresses() {
        let c: Cidr = "198.51.100.0/24".parse().unwrap();
        assert!(c.contains("198.51.100.77".parse().unwrap()));
        assert!(!c.contains("198.51.101.1".parse().unwrap()));
        assert!(
            c.contains("::ffff:198.51.100.1".parse().unwrap()),
            "v4-mapped is v4"
        );
        let all: Cidr = "::/0".parse().unwrap();
        assert!(all.contains("2001:db8::1".parse().unwrap()));
        assert!(!all.contains("192.0.2.1".parse().unwrap()));
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.1.1",
            "169.254.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "224.0.0.1",
            "0.0.0.0",
            "198.18.0.1",
        ] {
            assert!(is_internal(internal.parse().unwrap()), "{internal}");
        }
        for public in ["203.0.113.7", "8.8.8.8", "2606:4700::1111"] {
            assert!(!is_internal(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn private_upstreams_need_consent() {
        let mut c = Config::default();
        c.add_flag_rule("127.0.0.1:5000=127.0.0.1:6000").unwrap();
        let e = c.forward[0].resolve_upstream().unwrap_err();
        assert!(format!("{e}").contains("allow_private_upstream"));
        c.forward[0].allow_private_upstream = true;
        assert_eq!(
            c.forward[0].resolve_upstream().unwrap(),
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn command_line_settings_are_checked_as_the_file_is() {
        let forward = ["0.0.0.0:51820=203.0.113.7:51820".to_owned()];
        let flags = Flags {
            forward: &forward,
            ..Flags::default()
        };
        let cases = [
            (
                Flags {
                    idle_timeout: Some("0"),
                    ..flags
                },
                "--idle-timeout: idle_timeout: 0s is shorter",
            ),
            (
                Flags {
                    idle_timeout: Some("5s"),
                    ..flags
                },
                "use at least 10s",
            ),
            (
                Flags {
                    session_capacity: Some(0),
                    ..flags
                },
                "--session-capacity: 0 is out of range",
            ),
            (
                Flags {
                    session_ports: Some("9-1"),
                    ..flags
                },
                "--session-ports: bad port range",
            ),
        ];
        let file = "[socks5]\nlisten = \"0.0.0.0:1080\"\nallow_no_auth = true\n";
        for (f, want) in cases {
            let mut c = Config::from_toml(file).unwrap();
            let e = format!("{:#}", c.apply_flags(&f).unwrap_err());
            assert!(e.contains(want), "{f:?}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        // Session ports over a --forward listener, and over the SOCKS5 association ports.
        let mut c = Config::default();
        let e = c
            .apply_flags(&Flags {
                session_ports: Some("51800-51900"),
                forward: &forward,
                ..Flags::default()
            })
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("overlap the session port range"),
            "{e:#}"
        );
        let mut c = Config::from_toml(file).unwrap();
        let e = c
            .apply_flags(&Flags {
                session_ports: Some("30000-30010"),
                ..Flags::default()
            })
            .unwrap_err();
        assert!(format!("{e:#}").contains("overlap"), "{e:#}");
        // A good override takes effect; an idle timeout also bounds the unanswered one.
        let mut c = Config::default();
        c.apply_flags(&Flags {
            idle_timeout: Some("20s"),
            session_capacity: Some(50),
            ..flags
        })
        .unwrap();
        let r = &c.forward[0];
        assert_eq!(r.idle_timeout, Duration::from_secs(20));
        assert_eq!(r.unanswered_timeout, Duration::from_secs(20));
        assert_eq!((c.session_capacity, r.max_sessions), (50, 50));
    }

    #[test]
    fn flood_limits_have_defaults_and_are_checked() {
        let base = "[[forward]]\nlisten = \"0.0.0.0:51820\"\nupstream = \"203.0.113.7:51820\"\n";
        let c = Config::from_toml(base).unwrap();
        let r = &c.forward[0];
        assert_eq!(r.max_sessions_per_source, DEFAULT_MAX_SESSIONS_PER_SOURCE);
        assert_eq!(r.new_sessions_per_second, DEFAULT_NEW_SESSIONS_PER_SECOND);
        assert_eq!(r.new_sessions_burst, DEFAULT_NEW_SESSIONS_BURST);
        assert_eq!(r.unanswered_timeout, Duration::from_secs(30));
        for (extra, want) in [
            ("max_sessions_per_source = 0\n", "max_sessions_per_source"),
            ("new_sessions_per_second = 0\n", "new_sessions_per_second"),
            ("unanswered_timeout = \"1s\"\n", "unanswered_timeout"),
            ("unanswered_timeout = \"10m\"\n", "at most idle_timeout"),
        ] {
            let e = format!(
                "{:#}",
                Config::from_toml(&format!("{base}{extra}")).unwrap_err()
            );
            assert!(e.contains(want), "{extra}: {e}");
        }
    }

    #[test]
    fn user_limits_parse_and_bad_ones_name_the_field() {
        let hash = "$argon2id$v=19$m=19456,t=2,p=1$78uEBMWrN8igmbz+11VHPQ$KxJ1FCRT//sSd/Alf06Jp8O9qgVCkvAlQF2yNPjpsZk";
        let user = |extra: &str| {
            format!(
                "[socks5]\nlisten = \"0.0.0.0:1080\"\n[[socks5.users]]\nname = \"alice\"\n\
                 password_hash = \"{hash}\"\n{extra}"
            )
        };
        // Two lines: no limits.
        let c = Config::from_toml(&user("")).unwrap();
        let l = &c.socks5.unwrap().users[0].limits;
        assert_eq!(*l, crate::limits::Limits::default());
        let c = Config::from_toml(&user(
            "quota = \"10 GB\"\nquota_period = \"monthly:5\"\nexpires = \"2027-06-30\"\n\
             rate = 2000000\nmax_devices = 3\nenabled = false\n",
        ))
        .unwrap();
        let l = c.socks5.unwrap().users[0].limits.clone();
        assert_eq!(l.quota, Some(10_000_000_000));
        assert_eq!(l.period, crate::limits::Period::Monthly(5));
        assert_eq!(
            l.expires,
            Some(crate::limits::parse_time("2027-06-30").unwrap())
        );
        assert_eq!((l.rate, l.burst), (Some(2_000_000), 200_000));
        assert_eq!((l.max_devices, l.enabled), (Some(3), false));
        for (extra, want) in [
            ("quota = \"ten\"\n", "quota"),
            ("quota = \"10 XB\"\n", "unknown unit"),
            ("quota_period = \"daily\"\n", "quota_period: needs a quota"),
            ("quota = 1\nquota_period = \"weekly\"\n", "quota_period"),
            ("rate = 0\n", "rate: must be more than 0"),
            ("burst = \"1 MB\"\n", "burst: needs a rate"),
            ("max_devices = 0\n", "max_devices"),
            ("expires = \"next week\"\n", "expires"),
            ("quotas = 1\n", "unknown field"),
        ] {
            let e = format!("{:#}", Config::from_toml(&user(extra)).unwrap_err());
            assert!(e.contains(want), "{extra}: {e}");
            assert!(
                e.contains("alice") || want == "unknown field",
                "{extra}: {e}"
            );
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("").is_err());
    }
}
