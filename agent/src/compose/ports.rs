//! `ports` entries → [`PortSpec`].
//!
//! The agent's proxy owns every published port and forwards to containers,
//! which never publish themselves: that is what lets a new release start
//! beside the old one and take over the port without a gap. So each entry
//! must name the host port the proxy listens on, and only TCP fits.

use std::net::{IpAddr, Ipv4Addr};

use super::raw::{RawPort, StrOrMap};
use crate::spec::PortSpec;

const NEED_HOST_PORT: &str =
    "the agent's proxy publishes ports; give host:container, like `8080:80`";
const TCP_ONLY: &str = "only TCP ports are supported (the agent's proxy forwards TCP): remove this entry, or run that service outside deploy-agent";
const NO_RANGES: &str = "port ranges are not supported: list each port on its own line";

/// Parses one `ports` entry; the error is a message without the key path.
pub(crate) fn parse_port(entry: &StrOrMap<RawPort>) -> Result<PortSpec, String> {
    match entry {
        StrOrMap::Str(s) => parse_short(s),
        StrOrMap::Map(long) => parse_long(long),
    }
}

/// `"8080:80"`, `"127.0.0.1:8080:80"`, `"[::1]:8080:80"`, with an optional
/// `/tcp`.
fn parse_short(text: &str) -> Result<PortSpec, String> {
    let s = text.trim();
    let body = match s.rsplit_once('/') {
        Some((body, proto)) => {
            check_protocol(proto).map_err(|m| format!("`{text}`: {m}"))?;
            body
        }
        None => s,
    };

    let (host_ip, rest) = if let Some(bracketed) = body.strip_prefix('[') {
        let (ip, rest) = bracketed.split_once(']').ok_or_else(|| {
            format!("`{text}`: `[` without `]`: write an IPv6 address as `[::1]:8080:80`")
        })?;
        let rest = rest.strip_prefix(':').ok_or_else(|| {
            format!("`{text}`: expected `:` after `[{ip}]`: write it as `[{ip}]:8080:80`")
        })?;
        (Some(parse_ip(text, ip)?), rest)
    } else {
        (None, body)
    };

    let parts: Vec<&str> = rest.split(':').collect();
    let (ip, host, container) = match (host_ip, parts.as_slice()) {
        (_, [container]) => {
            if container.contains('-') {
                return Err(format!("`{text}`: {NO_RANGES}"));
            }
            return Err(format!("`{text}` has no host port: {NEED_HOST_PORT}"));
        }
        (Some(ip), [host, container]) => (ip, *host, *container),
        (None, [host, container]) => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), *host, *container),
        (None, [ip, host, container]) => (parse_ip(text, ip)?, *host, *container),
        (Some(_), _) => {
            return Err(format!(
                "`{text}` is not `[ip]:host:container`: write it like `[::1]:8080:80`"
            ));
        }
        (None, _) => {
            return Err(format!(
                "`{text}` has too many `:`: write `host:container` or `ip:host:container`, with an IPv6 address in brackets (`[::1]:8080:80`)"
            ));
        }
    };
    if host.contains('-') || container.contains('-') {
        return Err(format!("`{text}`: {NO_RANGES}"));
    }
    if host.trim().is_empty() {
        return Err(format!("`{text}` has no host port: {NEED_HOST_PORT}"));
    }
    Ok(PortSpec {
        host_ip: ip,
        host_port: port_number(text, host)?,
        target: port_number(text, container)?,
    })
}

/// `{target, published, host_ip, protocol}`.
fn parse_long(long: &RawPort) -> Result<PortSpec, String> {
    if let Some(proto) = &long.protocol {
        check_protocol(proto).map_err(|m| format!("`protocol: {proto}`: {m}"))?;
    }
    let target = long.target.ok_or_else(|| {
        "a long-syntax port needs `target` (the container port) and `published` (the host port)"
            .to_string()
    })?;
    let target = port_in_range(target.0).ok_or_else(|| {
        format!(
            "`target: {}` is not a port number: use 1 to 65535",
            target.0
        )
    })?;
    let published = long.published.as_ref().ok_or_else(|| {
        format!("`target: {target}` has no `published` host port: {NEED_HOST_PORT}")
    })?;
    let published = published.0.trim();
    if published.contains('-') {
        return Err(format!("`published: {published}`: {NO_RANGES}"));
    }
    if published.is_empty() {
        return Err(format!("`published` is empty: {NEED_HOST_PORT}"));
    }
    let host_port = port_number(&format!("published: {published}"), published)?;
    let host_ip = match &long.host_ip {
        Some(ip) => parse_ip(&format!("host_ip: {ip}"), ip)?,
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    Ok(PortSpec {
        host_ip,
        host_port,
        target,
    })
}

fn check_protocol(proto: &str) -> Result<(), String> {
    if proto.eq_ignore_ascii_case("tcp") {
        Ok(())
    } else {
        Err(format!("protocol `{proto}`: {TCP_ONLY}"))
    }
}

fn parse_ip(whole: &str, ip: &str) -> Result<IpAddr, String> {
    let ip = ip.trim();
    let ip = ip
        .strip_prefix('[')
        .and_then(|i| i.strip_suffix(']'))
        .unwrap_or(ip);
    ip.parse().map_err(|_| {
        format!("`{whole}`: `{ip}` is not an IP address: use one like `127.0.0.1` or `[::1]`")
    })
}

fn port_number(whole: &str, s: &str) -> Result<u16, String> {
    s.trim()
        .parse::<u64>()
        .ok()
        .and_then(port_in_range)
        .ok_or_else(|| format!("`{whole}`: `{s}` is not a port number: use 1 to 65535"))
}

fn port_in_range(n: u64) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// Whether two published ports would need the same host socket. A wildcard
/// address (`0.0.0.0`) takes the port on every address of its family, and
/// `::` on every address at all (dual-stack).
pub(crate) fn conflicts(a: &PortSpec, b: &PortSpec) -> bool {
    if a.host_port != b.host_port {
        return false;
    }
    let covers = |w: &IpAddr, other: &IpAddr| match w {
        IpAddr::V4(v4) => v4.is_unspecified() && other.is_ipv4(),
        IpAddr::V6(v6) => v6.is_unspecified(),
    };
    a.host_ip == b.host_ip || covers(&a.host_ip, &b.host_ip) || covers(&b.host_ip, &a.host_ip)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;
    use crate::compose::raw::{Int, Scalar};

    fn short(s: &str) -> Result<PortSpec, String> {
        parse_port(&StrOrMap::Str(s.to_string()))
    }

    fn spec(ip: IpAddr, host: u16, target: u16) -> PortSpec {
        PortSpec {
            host_ip: ip,
            host_port: host,
            target,
        }
    }

    const ANY: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const LO6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

    #[test]
    fn short_forms() {
        assert_eq!(short("8080:80").unwrap(), spec(ANY, 8080, 80));
        assert_eq!(short("8080:80/tcp").unwrap(), spec(ANY, 8080, 80));
        assert_eq!(short("127.0.0.1:8080:80").unwrap(), spec(LO, 8080, 80));
        assert_eq!(short("[::1]:8080:80").unwrap(), spec(LO6, 8080, 80));
        assert_eq!(short("[::1]:8080:80/TCP").unwrap(), spec(LO6, 8080, 80));
    }

    #[test]
    fn short_errors() {
        let cases = [
            ("80", "no host port"),
            ("127.0.0.1::80", "no host port"),
            ("53:53/udp", "only TCP"),
            ("8000-8010:8000-8010", "ranges"),
            ("8000-8010", "ranges"),
            ("::1:8080:80", "brackets"),
            ("[::1:8080:80", "without `]`"),
            ("localhost:8080:80", "not an IP address"),
            ("70000:80", "not a port number"),
            ("0:80", "not a port number"),
            ("8080:http", "not a port number"),
        ];
        for (input, needle) in cases {
            let err = short(input).unwrap_err();
            assert!(err.contains(needle), "{input}: {err}");
        }
    }

    #[test]
    fn long_forms() {
        let long = |target: Option<u64>,
                    published: Option<&str>,
                    ip: Option<&str>,
                    proto: Option<&str>| {
            parse_port(&StrOrMap::Map(RawPort {
                target: target.map(Int),
                published: published.map(|p| Scalar(p.to_string())),
                host_ip: ip.map(str::to_string),
                protocol: proto.map(str::to_string),
            }))
        };
        assert_eq!(
            long(Some(80), Some("8080"), None, None).unwrap(),
            spec(ANY, 8080, 80)
        );
        assert_eq!(
            long(Some(80), Some("8080"), Some("127.0.0.1"), Some("tcp")).unwrap(),
            spec(LO, 8080, 80)
        );
        assert_eq!(
            long(Some(80), Some("8080"), Some("::1"), None).unwrap(),
            spec(LO6, 8080, 80)
        );
        assert!(
            long(Some(80), None, None, None)
                .unwrap_err()
                .contains("no `published`")
        );
        assert!(
            long(None, Some("8080"), None, None)
                .unwrap_err()
                .contains("needs `target`")
        );
        assert!(
            long(Some(80), Some("8080"), None, Some("udp"))
                .unwrap_err()
                .contains("only TCP")
        );
        assert!(
            long(Some(80), Some("8000-8001"), None, None)
                .unwrap_err()
                .contains("ranges")
        );
        assert!(
            long(Some(0), Some("8080"), None, None)
                .unwrap_err()
                .contains("not a port")
        );
        assert!(
            long(Some(80), Some("8080"), Some("nope"), None)
                .unwrap_err()
                .contains("not an IP")
        );
    }

    #[test]
    fn conflict_rules() {
        assert!(conflicts(&spec(ANY, 80, 1), &spec(ANY, 80, 2)));
        assert!(conflicts(&spec(ANY, 80, 1), &spec(LO, 80, 2)));
        assert!(!conflicts(&spec(ANY, 80, 1), &spec(LO6, 80, 2)));
        assert!(conflicts(
            &spec(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 80, 1),
            &spec(LO, 80, 2)
        ));
        assert!(!conflicts(&spec(LO, 80, 1), &spec(LO6, 80, 2)));
        assert!(!conflicts(&spec(ANY, 80, 1), &spec(ANY, 81, 1)));
    }
}
