//! Who the client is: the TCP peer, or, when that peer is one of `server.trusted_proxies`,
//! the address the proxies forwarded (`Forwarded`, RFC 7239, else `X-Forwarded-For`).
//!
//! The forwarded list is read from the right, the hop nearest to us, skipping every
//! trusted proxy: the first address that is not one is the client. Anything to its left
//! was written by the client itself and is never believed. A hop that cannot be read
//! (`unknown`, an obfuscated name, garbage) stops the walk at the proxy that handed it
//! over, which is then taken as the client: a proxy that does not know the address
//! must not let the client pick one. Headers from a peer that is not trusted are
//! ignored whatever they say.
//!
//! `serve` resolves the address once per request and stores it as the request's
//! `ConnectInfo`, so rate limits, bans, lockout, audit `source`, logs and every
//! per-address cap see the same address; `ForwardedBy` keeps the proxy's.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

/// The trusted proxy a request came through (set for every request whose peer is one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ForwardedBy(pub(crate) SocketAddr);

/// The client's address for a request from `peer` with `headers`.
pub(crate) fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops = forwarded_hops(headers);
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Some(ip) = hop else {
            // Unreadable: the proxy that wrote it stands for the client.
            return client;
        };
        client = *ip;
        if !is_trusted(ip) {
            return client;
        }
    }
    client
}

/// The forwarded addresses, nearest last; `None` for a hop that is not an address.
/// `Forwarded` wins when present (it is the standard); each header may come on several
/// lines, which read as one list in order.
fn forwarded_hops(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let forwarded: Vec<&str> = values(headers, "forwarded");
    if !forwarded.is_empty() {
        return forwarded
            .iter()
            .flat_map(|line| line.split(','))
            .map(forwarded_for)
            .collect();
    }
    values(headers, "x-forwarded-for")
        .iter()
        .flat_map(|line| line.split(','))
        .map(|item| parse_node(item.trim()))
        .collect()
}

fn values<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a str> {
    headers
        .get_all(name)
        .iter()
        // A header line that is not visible ASCII cannot be read: one unreadable hop.
        .map(|v| v.to_str().unwrap_or("\u{0}"))
        .collect()
}

/// The `for=` of one `Forwarded` element (`for=192.0.2.60;proto=https`).
fn forwarded_for(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("for") {
            return None;
        }
        parse_node(value.trim().trim_matches('"'))
    })
}

/// One node: `192.0.2.60`, `192.0.2.60:4711`, `[2001:db8::1]`, `[2001:db8::1]:4711`,
/// or a bare IPv6 address (as `X-Forwarded-For` writes it).
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(addr.ip().to_canonical());
    }
    let inner = node.strip_prefix('[')?.strip_suffix(']')?;
    inner.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().filter_map(|n| n.parse().ok()).collect()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            if let Ok(value) = value.parse() {
                map.append(*name, value);
            }
        }
        map
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_sends() {
        let h = headers(&[("x-forwarded-for", "198.51.100.1")]);
        assert_eq!(client_address(ip("127.0.0.1"), &h, &[]), ip("127.0.0.1"));
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_address(ip("192.0.2.9"), &h, &trusted),
            ip("192.0.2.9")
        );
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let trusted = nets(&["127.0.0.1/32", "10.0.0.0/8"]);
        // The client wrote 6.6.6.6 itself; 198.51.100.1 connected to the first proxy.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.1, 10.1.2.3")]);
        assert_eq!(
            client_address(ip("127.0.0.1"), &h, &trusted),
            ip("198.51.100.1")
        );
        // Several header lines read as one list.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "198.51.100.1"),
        ]);
        assert_eq!(
            client_address(ip("127.0.0.1"), &h, &trusted),
            ip("198.51.100.1")
        );
        // Every hop trusted: the leftmost.
        let h = headers(&[("x-forwarded-for", "10.0.0.5, 10.0.0.6")]);
        assert_eq!(
            client_address(ip("127.0.0.1"), &h, &trusted),
            ip("10.0.0.5")
        );
        // No header: the proxy itself.
        assert_eq!(
            client_address(ip("127.0.0.1"), &HeaderMap::new(), &trusted),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn forwarded_is_read_and_wins_over_x_forwarded_for() {
        let trusted = nets(&["::1/128", "127.0.0.0/8"]);
        let h = headers(&[
            ("x-forwarded-for", "203.0.113.50"),
            (
                "forwarded",
                "for=6.6.6.6, for=\"[2001:db8:cafe::17]:4711\";proto=https",
            ),
        ]);
        assert_eq!(
            client_address(ip("::1"), &h, &trusted),
            ip("2001:db8:cafe::17")
        );
        let h = headers(&[("forwarded", "proto=https;For=192.0.2.60:8080")]);
        assert_eq!(
            client_address(ip("127.0.0.1"), &h, &trusted),
            ip("192.0.2.60")
        );
    }

    #[test]
    fn an_unreadable_hop_stops_at_the_proxy_that_wrote_it() {
        let trusted = nets(&["127.0.0.1/32", "10.0.0.0/8"]);
        for bad in ["unknown", "_hidden", "not an address", ""] {
            let h = headers(&[("x-forwarded-for", &format!("198.51.100.1, {bad}, 10.0.0.7"))]);
            assert_eq!(
                client_address(ip("127.0.0.1"), &h, &trusted),
                ip("10.0.0.7"),
                "{bad:?}"
            );
        }
        let h = headers(&[("forwarded", "for=unknown")]);
        assert_eq!(
            client_address(ip("127.0.0.1"), &h, &trusted),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn mapped_addresses_compare_as_ipv4() {
        let trusted = nets(&["127.0.0.1/32"]);
        let h = headers(&[("x-forwarded-for", "::ffff:198.51.100.1")]);
        assert_eq!(
            client_address(ip("::ffff:127.0.0.1"), &h, &trusted),
            ip("198.51.100.1")
        );
    }
}
