//! `relay run` with neither a configuration file nor `--forward` rules: a SOCKS5 proxy on
//! port 1080 of the interface, with one user whose password is generated at the first run and
//! kept in the state directory (later runs reuse it), and instructions to connect: Telegram's
//! links, a curl line, and the link as a QR code.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::config::Config;

/// The SOCKS5 port of the default proxy.
pub const PORT: u16 = 1080;
/// The file in the state directory that keeps the default user.
pub const FILE: &str = "default-user.json";

/// The default user: its name, password (shown to the operator) and the password's hash.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
    pub password_hash: String,
}

/// A password of `n` letters and digits from the kernel's random bytes (rejection sampling:
/// no letter is likelier than another).
pub fn password(n: usize) -> anyhow::Result<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(n);
    while out.len() < n {
        for b in crate::socks5::users::random::<32>()? {
            // 248 = 4 * 62: bytes above it would favour the first letters.
            if b < 248 && out.len() < n {
                out.push(ALPHABET[usize::from(b) % ALPHABET.len()] as char);
            }
        }
    }
    Ok(out)
}

/// The default user kept in `state`, made (and saved, readable by root only) at the first
/// call. Returns it and whether it is new.
pub fn credentials(state: &Path) -> anyhow::Result<(Credentials, bool)> {
    let path = state.join(FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let c: Credentials = serde_json::from_slice(&bytes).with_context(|| {
                format!("{} is damaged; remove it for a new user", path.display())
            })?;
            return Ok((c, false));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let password = password(20)?;
    let c = Credentials {
        user: "relay".into(),
        password_hash: crate::socks5::users::hash_password(password.as_bytes())?,
        password,
    };
    crate::system::write_private(&path, &serde_json::to_string_pretty(&c)?)?;
    Ok((c, true))
}

/// The address the proxy listens on: the interface's first IPv4 address (else its first
/// global IPv6 one), port 1080.
pub fn listen_on(iface: &str) -> anyhow::Result<SocketAddr> {
    let addrs = crate::policy::interface_addresses(iface);
    let ip = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.iter().find(|a| matches!(a, IpAddr::V6(v6) if !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80)))
        .ok_or_else(|| anyhow::anyhow!("{iface} has no address to serve SOCKS5 on"))?;
    Ok(SocketAddr::new(*ip, PORT))
}

/// The configuration of the default proxy (the same defaults as a file with these lines).
pub fn config(listen: SocketAddr, c: &Credentials) -> anyhow::Result<Config> {
    Config::from_toml(&format!(
        "[socks5]\nlisten = \"{listen}\"\n[[socks5.users]]\nname = \"{}\"\npassword_hash = \"{}\"\n",
        c.user, c.password_hash
    ))
}

/// Characters left as they are in a link's user name and password; the rest is
/// percent-encoded.
const KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn enc(s: &str) -> percent_encoding::PercentEncode<'_> {
    percent_encoding::utf8_percent_encode(s, KEEP)
}

/// The links that hand a user to a client: Telegram's (`tg://` and its `https://t.me/` form)
/// and a `socks5h://` URL (curl, tun2socks, browsers' proxy settings).
pub fn share_links(at: SocketAddr, user: &str, password: &str) -> crate::api::Links {
    let query = format!(
        "server={}&port={}&user={}&pass={}",
        at.ip(),
        at.port(),
        enc(user),
        enc(password)
    );
    crate::api::Links {
        tg: format!("tg://socks?{query}"),
        tme: format!("https://t.me/socks?{query}"),
        url: format!("socks5h://{}:{}@{at}", enc(user), enc(password)),
    }
}

/// The links, a curl line, the settings for any client and the `tg://` link as a QR code.
pub fn share_text(at: SocketAddr, user: &str, password: &str) -> anyhow::Result<String> {
    let l = share_links(at, user, password);
    let qr = qrcode::QrCode::new(l.tg.as_bytes())
        .context("making the QR code")?
        .render::<qrcode::render::unicode::Dense1x2>()
        .dark_color(qrcode::render::unicode::Dense1x2::Light)
        .light_color(qrcode::render::unicode::Dense1x2::Dark)
        .quiet_zone(true)
        .build();
    Ok(format!(
        "Telegram:  {tg}\n           {web}\n\
         curl:      curl --proxy {url} https://example.org/\n\
         Any SOCKS5 client (tun2socks, browsers): server {ip}, port {port}, user {user}, \
         password {password}\n\n{qr}\n",
        tg = l.tg,
        web = l.tme,
        url = l.url,
        ip = at.ip(),
        port = at.port(),
    ))
}

/// What the operator needs to connect: the address and user, then [`share_text`].
pub fn instructions(at: SocketAddr, c: &Credentials, new: bool) -> anyhow::Result<String> {
    Ok(format!(
        "\nSOCKS5 proxy on {at}, user {user:?}, password {pass} ({kept})\n\n{share}",
        user = c.user,
        pass = c.password,
        kept = if new {
            "new; kept for the next runs"
        } else {
            "the same as before"
        },
        share = share_text(at, &c.user, &c.password)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_is_made_once_and_its_file_is_private() {
        let dir = std::env::temp_dir().join(format!("relay-quickstart-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (first, new) = credentials(&dir).unwrap();
        assert!(new);
        assert_eq!(first.password.len(), 20);
        assert!(first.password.bytes().all(|b| b.is_ascii_alphanumeric()));
        let (again, new) = credentials(&dir).unwrap();
        assert!(!new);
        assert_eq!(again, first);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let users = crate::socks5::users::Users::new(
            config(SocketAddr::from(([192, 0, 2, 1], PORT)), &first)
                .unwrap()
                .socks5
                .unwrap()
                .users,
        )
        .unwrap();
        assert!(users.verify("relay", first.password.as_bytes()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn links_name_the_proxy() {
        let c = Credentials {
            user: "relay".into(),
            password: "abc123".into(),
            password_hash: String::new(),
        };
        let at = SocketAddr::from(([203, 0, 113, 5], PORT));
        let l = share_links(at, &c.user, &c.password);
        assert_eq!(
            l.tg,
            "tg://socks?server=203.0.113.5&port=1080&user=relay&pass=abc123"
        );
        assert_eq!(
            l.tme,
            "https://t.me/socks?server=203.0.113.5&port=1080&user=relay&pass=abc123"
        );
        // Names and passwords with spaces, '@', ':' or '&' stay one value each.
        let l = share_links(at, "ana maria", "p@ss:w&rd");
        assert_eq!(
            l.url,
            "socks5h://ana%20maria:p%40ss%3Aw%26rd@203.0.113.5:1080"
        );
        assert!(
            l.tg.ends_with("user=ana%20maria&pass=p%40ss%3Aw%26rd"),
            "{}",
            l.tg
        );
        let text = instructions(at, &c, true).unwrap();
        assert!(
            text.contains("curl --proxy socks5h://relay:abc123@203.0.113.5:1080 "),
            "{text}"
        );
        assert!(
            text.contains('█') || text.contains('▀'),
            "a QR code: {text}"
        );
    }
}
