//! CIDR values as the Kubernetes API server reads them.
//!
//! The API server validates `ipBlock.cidr` and `ipBlock.except` with
//! `k8s.io/utils/net.ParseCIDRSloppy`, Go 1.16's `net.ParseCIDR` kept for values stored
//! before Go 1.17 became strict, and compares them with Go's `IPNet.Contains`. Since
//! the `StrictIPCIDRValidation` gate, new values may be refused in the forms below, but
//! a value already stored in a policy stays accepted on every update of it (the
//! validation ratchets), so a stored policy may hold any of them:
//!
//! - IPv4 parts with leading zeros, read as **decimal** (`010.0.0.0/8` is 10.0.0.0/8,
//!   not the octal 8.0.0.0/8 of C's `inet_aton`), as many as a part likes;
//! - a prefix length with leading zeros (`10.0.0.0/08`);
//! - IPv6 groups of more than four hex digits when the excess are leading zeros;
//! - bits set beyond the prefix length (`10.1.2.3/8`): the network is the masked
//!   prefix, 10.0.0.0/8;
//! - an IPv4-mapped IPv6 value (`::ffff:10.0.0.0/104`). Go parses it as a 16-byte
//!   network, but `IPNet.Contains` compares any address that is IPv4 or IPv4-mapped as
//!   the 4-byte IPv4 address against the last 4 bytes of the network and mask: the
//!   value *is* the IPv4 network 10.0.0.0/8, and the API server's own subset check of
//!   `except` reads it so. A mapped value with a prefix shorter than 96 bits keeps no
//!   `::ffff` and is an ordinary IPv6 network.
//!
//! Conversely, Go's `Contains` of an IPv6 network never holds an IPv4-mapped address (it
//! is compared as IPv4): an IPv6 block covering `::ffff:0:0/96` excludes that range
//! ([`mapped_range`]). An address written IPv4-mapped on an IPv6 packet is in no block
//! at all here, where Go would compare it as IPv4: never more than Go would allow (it
//! can only drop what an IPv4 block would have let through).

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// A CIDR value as Go reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GoCidr {
    /// The network `IPNet.Contains` tests against: masked, IPv4 for an IPv4-mapped value.
    pub net: IpNet,
    /// The prefix length as written (`IPNet.Mask.Size()`: 104 for `::ffff:10.0.0.0/104`),
    /// which the API server's subset check of `except` compares.
    pub written_len: u8,
}

/// `::ffff:0:0/96`, the IPv4-mapped IPv6 addresses.
pub(crate) fn mapped_range() -> Ipv6Net {
    Ipv6Net::new(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96).expect("a valid prefix")
}

/// Parses `text` as `ParseCIDRSloppy` does; `None` where it fails.
pub(crate) fn parse(text: &str) -> Option<GoCidr> {
    // Go splits at the first '/'.
    let (address, length) = text.split_once('/')?;
    let length = decimal(length).filter(|(_, used)| *used == length.len())?.0;
    if let Some(v4) = ipv4(address) {
        let len = u8::try_from(length).ok().filter(|l| *l <= 32)?;
        let net = Ipv4Net::new(v4, len).ok()?.trunc();
        return Some(GoCidr {
            net: IpNet::V4(net),
            written_len: len,
        });
    }
    let v6 = ipv6(address)?;
    let len = u8::try_from(length).ok().filter(|l| *l <= 128)?;
    let net = Ipv6Net::new(v6, len).ok()?.trunc();
    let net = match net.addr().to_ipv4_mapped() {
        Some(v4) if len >= 96 => IpNet::V4(Ipv4Net::new(v4, len - 96).ok()?),
        _ => IpNet::V6(net),
    };
    Some(GoCidr {
        net,
        written_len: len,
    })
}

/// Whether Go's `IPNet.Contains` of `outer` holds the network address of `inner` (both
/// as [`parse`] returns them): the API server's test that an `except` lies in `cidr`.
pub(crate) fn contains_address(outer: &IpNet, inner: &IpNet) -> bool {
    outer.contains(&inner.network())
}

/// Go's `dtoi`: the decimal number at the start of `s` and how many bytes it took;
/// `None` without a digit or when it reaches 0xFFFFFF.
fn decimal(s: &str) -> Option<(u32, usize)> {
    const BIG: u32 = 0xFF_FFFF;
    let mut n: u32 = 0;
    let mut used = 0;
    for b in s.bytes() {
        if !b.is_ascii_digit() {
            break;
        }
        n = n * 10 + u32::from(b - b'0');
        if n >= BIG {
            return None;
        }
        used += 1;
    }
    (used > 0).then_some((n, used))
}

/// Go's `xtoi`: the hex number at the start of `s` and how many bytes it took.
fn hex(s: &str) -> Option<(u32, usize)> {
    const BIG: u32 = 0xFF_FFFF;
    let mut n: u32 = 0;
    let mut used = 0;
    for b in s.bytes() {
        let Some(digit) = (b as char).to_digit(16) else {
            break;
        };
        n = n * 16 + digit;
        if n >= BIG {
            return None;
        }
        used += 1;
    }
    (used > 0).then_some((n, used))
}

/// Go 1.16's `parseIPv4`: four decimal parts of at most 255, leading zeros allowed.
fn ipv4(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut rest = s;
    for (i, octet) in octets.iter_mut().enumerate() {
        if i > 0 {
            rest = rest.strip_prefix('.')?;
        }
        let (n, used) = decimal(rest)?;
        *octet = u8::try_from(n).ok()?;
        rest = &rest[used..];
    }
    rest.is_empty().then_some(Ipv4Addr::from(octets))
}

/// Go 1.16's `parseIPv6` (no zone): groups of hex digits up to 0xFFFF, one `::`, an
/// IPv4 tail in the last 4 bytes.
fn ipv6(s: &str) -> Option<Ipv6Addr> {
    let mut bytes = [0u8; 16];
    let mut ellipsis: Option<usize> = None;
    let mut rest = s;
    if let Some(after) = rest.strip_prefix("::") {
        ellipsis = Some(0);
        rest = after;
        if rest.is_empty() {
            return Some(Ipv6Addr::UNSPECIFIED);
        }
    }
    let mut i = 0;
    while i < 16 {
        let (n, used) = hex(rest)?;
        if n > 0xFFFF {
            return None;
        }
        if rest[used..].starts_with('.') {
            // An IPv4 tail: only where the last 4 bytes start, or with an ellipsis.
            if (ellipsis.is_none() && i != 12) || i + 4 > 16 {
                return None;
            }
            let v4 = ipv4(rest)?;
            bytes[i..i + 4].copy_from_slice(&v4.octets());
            rest = "";
            i += 4;
            break;
        }
        bytes[i] = (n >> 8) as u8;
        bytes[i + 1] = n as u8;
        i += 2;
        rest = &rest[used..];
        if rest.is_empty() {
            break;
        }
        rest = rest.strip_prefix(':')?;
        if rest.is_empty() {
            return None;
        }
        if let Some(after) = rest.strip_prefix(':') {
            if ellipsis.is_some() {
                return None;
            }
            ellipsis = Some(i);
            rest = after;
            if rest.is_empty() {
                break;
            }
        }
    }
    if !rest.is_empty() {
        return None;
    }
    match ellipsis {
        Some(at) if i < 16 => {
            // Move what follows the ellipsis to the end; zeros in between.
            let n = 16 - i;
            bytes.copy_within(at..i, at + n);
            bytes[at..at + n].fill(0);
        }
        // An ellipsis must stand for at least one group.
        Some(_) => return None,
        None if i < 16 => return None,
        None => {}
    }
    Some(Ipv6Addr::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> Option<String> {
        parse(text).map(|c| c.net.to_string())
    }

    #[test]
    fn ipv4_parts_with_leading_zeros_are_decimal() {
        assert_eq!(net("010.0.0.0/8").as_deref(), Some("10.0.0.0/8"));
        assert_eq!(net("010.001.002.003/32").as_deref(), Some("10.1.2.3/32"));
        assert_eq!(
            net("0000000192.168.0.0/16").as_deref(),
            Some("192.168.0.0/16")
        );
        assert_eq!(net("10.0.0.0/08").as_deref(), Some("10.0.0.0/8"));
        assert_eq!(net("10.0.0.0/0000032").as_deref(), Some("10.0.0.0/32"));
        for bad in [
            "256.0.0.0/8",
            "0256.0.0.0/8",
            "10.0.0/8",
            "10.0.0.0.0/8",
            "10.0.0.0/33",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0.0/ 8",
            "10.0.0.0/",
            "10.0.0.0",
            "/8",
            "10.0.0.0/8/8",
            " 10.0.0.0/8",
            "10.0.0.0/8 ",
            "0x0a.0.0.0/8",
            "10.0.0.0/99999999999",
        ] {
            assert_eq!(net(bad), None, "{bad}");
        }
    }

    #[test]
    fn host_bits_are_masked() {
        assert_eq!(net("10.1.2.3/8").as_deref(), Some("10.0.0.0/8"));
        assert_eq!(net("fd00::1:2/64").as_deref(), Some("fd00::/64"));
        assert_eq!(parse("10.1.2.3/8").unwrap().written_len, 8);
    }

    #[test]
    fn ipv6_forms_go_accepts() {
        assert_eq!(net("::/0").as_deref(), Some("::/0"));
        assert_eq!(net("FD00::/8").as_deref(), Some("fd00::/8"));
        assert_eq!(net("000fd00::/8").as_deref(), Some("fd00::/8"));
        assert_eq!(
            net("fd00:0:0:0:0:0:0:1/128").as_deref(),
            Some("fd00::1/128")
        );
        assert_eq!(net("::1.2.3.4/128").as_deref(), Some("::102:304/128"));
        assert_eq!(
            net("1:2:3:4:5:6:1.2.3.4/128").as_deref(),
            Some("1:2:3:4:5:6:102:304/128")
        );
        assert_eq!(net("fd00::/0008").as_deref(), Some("fd00::/8"));
        for bad in [
            "fd00::/129",
            ":::/0",
            "fd00:::1/64",
            "1::2::3/64",
            "fd00::1%eth0/64",
            "1:2:3:4:5:6:7:8:9/64",
            "1:2:3:4:5:6:7/64",
            "1:2:3:4:5:6:7:8::/64",
            "fd00:/8",
            "10000::/8",
            "1:2:3:4:5:1.2.3.4/128",
            "::1.2.3/128",
        ] {
            assert_eq!(net(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_ipv4_mapped_value_is_the_ipv4_network() {
        let c = parse("::ffff:10.0.0.0/104").unwrap();
        assert_eq!(c.net.to_string(), "10.0.0.0/8");
        assert_eq!(c.written_len, 104);
        assert_eq!(net("::ffff:a00:0/104").as_deref(), Some("10.0.0.0/8"));
        assert_eq!(net("::ffff:010.1.2.3/120").as_deref(), Some("10.1.2.0/24"));
        assert_eq!(net("::ffff:0.0.0.0/96").as_deref(), Some("0.0.0.0/0"));
        // Shorter than 96 bits: no ::ffff left after masking, an IPv6 network.
        assert_eq!(net("::ffff:10.0.0.0/95").as_deref(), Some("::fffe:0:0/95"));
        assert_eq!(net("::ffff:10.0.0.0/80").as_deref(), Some("::/80"));
    }

    #[test]
    fn the_subset_test_compares_addresses_as_go_does() {
        let c = |t| parse(t).unwrap().net;
        assert!(contains_address(
            &c("10.0.0.0/8"),
            &c("::ffff:10.1.0.0/112")
        ));
        assert!(contains_address(
            &c("::ffff:10.0.0.0/104"),
            &c("10.1.0.0/16")
        ));
        assert!(!contains_address(&c("::/0"), &c("::ffff:10.1.0.0/112")));
        assert!(!contains_address(&c("::/0"), &c("10.1.0.0/16")));
        assert!(contains_address(
            &c("10.0.0.0/16"),
            &c("::ffff:10.0.0.0/104")
        ));
    }

    #[test]
    fn the_mapped_range_is_the_ipv4_mapped_addresses() {
        assert!(mapped_range().contains(&"::ffff:10.0.0.5".parse::<Ipv6Addr>().unwrap()));
        assert!(!mapped_range().contains(&"::fffe:10.0.0.5".parse::<Ipv6Addr>().unwrap()));
    }

    /// A CIDR-like text: IPv4 parts with leading zeros, IPv6 groups with `::` and an
    /// IPv4 tail, prefix lengths with leading zeros, and noise.
    fn cidr_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let part = (0u32..=260, "0{0,2}").prop_map(|(n, zeros)| format!("{zeros}{n}"));
        let v4 = prop_oneof![
            8 => proptest::collection::vec(part.clone(), 4),
            1 => proptest::collection::vec(part, 3..=5),
        ]
        .prop_map(|p| p.join("."));
        let group = "0{0,3}[0-9a-fA-F]{0,4}";
        let v6 = (
            proptest::collection::vec(group, 1..=9),
            proptest::option::of(0..9usize),
            proptest::option::of(v4.clone()),
        )
            .prop_map(|(mut groups, ellipsis, tail)| {
                if let Some(at) = ellipsis {
                    groups.insert(at.min(groups.len()), String::new());
                }
                if let Some(tail) = tail {
                    groups.push(tail);
                }
                groups.join(":")
            });
        let mapped = v4.clone().prop_map(|v4| format!("::ffff:{v4}"));
        let address = prop_oneof![v4, v6, mapped, "[0-9a-fA-F:.]{0,20}"];
        let length = prop_oneof![
            (0u32..=130, "0{0,2}").prop_map(|(n, zeros)| format!("{zeros}{n}")),
            (94u32..=128).prop_map(|n| n.to_string()),
            "[+-]?[0-9 ]{0,3}",
        ];
        (address, length, "/?").prop_map(|(a, l, slash)| {
            if slash.is_empty() {
                format!("{a}/{l}")
            } else {
                format!("{a}/{l}{slash}")
            }
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, ..Default::default() })]

        /// The reference evaluator reads CIDRs with its own implementation; both must
        /// agree on every text.
        #[test]
        fn the_reference_reads_every_cidr_text_alike(text in cidr_text()) {
            let ours = parse(&text).map(|c| c.net);
            proptest::prop_assert_eq!(ours, crate::reference::go_cidr(&text), "{}", text);
        }
    }
}
