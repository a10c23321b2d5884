//! Host-side interfaces of local pods by name (the routes that lead to them are read in
//! [`crate::node`]).

/// Whether `name` is the host side of a pod's interface by the configured prefixes
/// (loopback never is).
pub fn is_pod_interface(name: &str, prefixes: &[String]) -> bool {
    name != "lo"
        && prefixes
            .iter()
            .any(|p| !p.is_empty() && name.starts_with(p.as_str()))
}

/// Index of an interface by name, `None` if it does not exist (now).
pub fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_interfaces_are_recognised_by_prefix() {
        let prefixes = vec!["veth".to_string(), "cali".to_string(), String::new()];
        assert!(is_pod_interface("veth1a2b", &prefixes));
        assert!(is_pod_interface("cali0123", &prefixes));
        // An empty prefix matches nothing rather than everything.
        assert!(!is_pod_interface("eth0", &prefixes));
        assert!(!is_pod_interface("lo", &["l".to_string()]));
    }
}
