//! A flow to a Service: kube-proxy sends each connection to one backend, and the pod's
//! egress (and the backend's ingress) are decided after that translation, on the
//! backend and its target port. So a Service is explained once per backend.

use std::net::IpAddr;

use serde::Serialize;

use super::super::text::as_display;
use super::{Explanation, Resolver, explain_parties, staged_view};
use crate::preview::{PortProtocol, PreviewError};
use netpol_compile::Compiled;
use netpol_compile::services::{Backend, ServiceIndex};
use netpol_compile::state::{ClusterState, ObjectRef};

/// A flow to a Service port, explained for each of its backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceExplanation {
    #[serde(serialize_with = "as_display")]
    pub service: ObjectRef,
    /// The Service port's name (empty when unnamed).
    pub port_name: String,
    /// What the pod dials: the Service address (when one was given) and Service port.
    pub address: Option<IpAddr>,
    pub port: PortProtocol,
    /// One entry per backend (in one family with the source), in order.
    pub backends: Vec<BackendExplanation>,
}

/// One backend of the Service port, and the flow to it after translation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendExplanation {
    pub ip: IpAddr,
    /// The backend's (target) port.
    pub port: u16,
    pub explanation: Explanation,
}

impl ServiceExplanation {
    /// Connections reach some backend (kube-proxy picks one at random per connection).
    pub fn allowed_backends(&self) -> usize {
        self.backends
            .iter()
            .filter(|b| b.explanation.allowed)
            .count()
    }
}

/// `svc/NS/NAME`, or an address that is a Service's frontend on `port`: the Service port
/// and the address. `None` when `dst` names no Service.
fn frontend(
    index: &ServiceIndex,
    dst: &str,
    port: PortProtocol,
) -> Result<Option<(ObjectRef, String, Option<IpAddr>)>, PreviewError> {
    if let Some(name) = dst.strip_prefix("svc/") {
        let fail = |reason: String| PreviewError::Endpoint {
            input: dst.to_owned(),
            reason,
        };
        let Some((namespace, name)) = name.split_once('/') else {
            return Err(fail("expected svc/namespace/name".into()));
        };
        let service = ObjectRef::new(namespace, name);
        let mut ports = index
            .frontends()
            .filter(|(_, f)| f.service == service)
            .peekable();
        if ports.peek().is_none() {
            return Err(fail("no such Service (or it has no address)".into()));
        }
        let found = ports
            .find(|((_, number, protocol), _)| *number == port.port && *protocol == port.protocol);
        return match found {
            Some((_, f)) => Ok(Some((service, f.port_name.clone(), None))),
            None => Err(fail(format!("the Service has no port {port}"))),
        };
    }
    let Ok(ip) = dst.parse::<IpAddr>() else {
        return Ok(None);
    };
    Ok(index
        .frontend(ip, port.port, port.protocol)
        .map(|f| (f.service.clone(), f.port_name.clone(), Some(ip))))
}

/// Explains `src -> dst` when `dst` is a Service (`svc/NS/NAME` or one of its addresses
/// on `port`): once per backend of the same family as the source, on its target port.
/// `None` when `dst` is not a Service.
pub fn explain_service(
    state: &ClusterState,
    compiled: &Compiled,
    src: &str,
    dst: &str,
    port: PortProtocol,
) -> Result<Option<ServiceExplanation>, PreviewError> {
    let index = ServiceIndex::new(state);
    let Some((service, port_name, address)) = frontend(&index, dst, port)? else {
        return Ok(None);
    };
    let resolver = Resolver::new(state);
    let sources = resolver.resolve(src)?;
    let staged = staged_view(state);
    let mut backends = Vec::new();
    for &Backend {
        ip, port: target, ..
    } in index.backends(&service, &port_name, port.protocol)
    {
        let Some(source) = sources.iter().find(|s| s.ip().is_ipv4() == ip.is_ipv4()) else {
            continue;
        };
        let backend_port = PortProtocol {
            port: target,
            protocol: port.protocol,
        };
        backends.push(BackendExplanation {
            ip,
            port: target,
            explanation: explain_parties(
                state,
                compiled,
                staged.as_ref(),
                source.clone(),
                resolver.party(ip),
                backend_port,
            ),
        });
    }
    Ok(Some(ServiceExplanation {
        service,
        port_name,
        address,
        port,
        backends,
    }))
}

impl std::fmt::Display for ServiceExplanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = if self.port_name.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.port_name)
        };
        let address = self
            .address
            .map(|ip| format!(" at {ip}"))
            .unwrap_or_default();
        writeln!(
            f,
            "svc {}{address} {}{name}: {} of {} backends allowed",
            self.service,
            self.port,
            self.allowed_backends(),
            self.backends.len()
        )?;
        if self.backends.is_empty() {
            return writeln!(
                f,
                "  no endpoints: kube-proxy rejects the connection (no policy is involved)"
            );
        }
        writeln!(
            f,
            "  kube-proxy sends each connection to one backend; the policies decide on the backend and its target port:"
        )?;
        for backend in &self.backends {
            writeln!(f)?;
            write!(f, "{}", backend.explanation)?;
        }
        Ok(())
    }
}
