//! The pipeline and its single exit: parse → endpoint → conntrack → policy → verdict.
//!
//! Every packet ends in [`finish`], which counts the reason (and the rule, if any) and,
//! for drops and newly allowed connections, emits a rate-limited event.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_ns,
    programs::TcContext,
};
use netpol_common::{
    Addr, CT_SERVICE, CT_SERVICE_EGRESS, Counter, DIR_EGRESS, DIR_INGRESS, EVENTS_BURST,
    EVENTS_PER_SECOND_PER_CPU, EndpointInfo, IFACE_REFUSED, IFACE_SHARED, IFACE_UNBOUND, PROTO_TCP,
    RULE_NONE, Reason, STATE_DENY_UNPROGRAMMED, TCP_SYN, VerdictEvent, counter_index,
    reason_emits_event,
};

use crate::{
    conntrack::{self, Clock, Ends, Opening, Rechecked, Table},
    maps::{COUNTERS, ENDPOINTS, EVENT_BUDGET, EVENTS, IFACES, RULE_COUNTERS, STATE},
    parse::{self, Family, Malformed, Packet, Parsed, V4},
    policy::{self, Connection},
};

/// Where a program runs, which fixes the endpoint's end of the packet and what is judged.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// TC ingress of a pod's host veth: packets leaving the pod, its egress policy.
    FromPod,
    /// TC egress of a pod's host veth: packets entering the pod, its ingress policy; for
    /// a marked packet (a Service connection, after kube-proxy's translation) also the
    /// source pod's egress policy on this backend.
    ToPod,
    /// TC egress of an exit device: the source pod's egress policy, after translation,
    /// for marked packets (Service connections to backends on other nodes).
    LeaveNode,
}

impl Hook {
    /// The direction of the policy the hook decides first, from the endpoint's view.
    #[inline(always)]
    const fn direction(self) -> u8 {
        match self {
            Hook::ToPod => DIR_INGRESS,
            Hook::FromPod | Hook::LeaveNode => DIR_EGRESS,
        }
    }
}

/// One side's decision: reason, deciding rule, whose and against which peer identity.
#[derive(Clone, Copy)]
struct Side {
    reason: Reason,
    rule: u32,
    endpoint: u32,
    identity: u32,
    direction: u8,
}

impl Side {
    const fn of(reason: Reason, direction: u8) -> Self {
        Side {
            reason,
            rule: RULE_NONE,
            endpoint: 0,
            identity: 0,
            direction,
        }
    }
}

/// How a packet was judged, with what the exit needs to report it.
struct Verdict {
    /// Decides the packet.
    main: Side,
    /// The source pod's egress decision made after translation on the backend's veth,
    /// when it allowed (reported beside the backend's own ingress decision).
    service_egress: Option<Side>,
}

impl Verdict {
    const fn of(reason: Reason, direction: u8) -> Self {
        Verdict::side(Side::of(reason, direction))
    }

    const fn side(main: Side) -> Self {
        Verdict {
            main,
            service_egress: None,
        }
    }
}

/// What the agent wrote into STATE, read once per packet.
struct State {
    generation: u32,
    flags: u32,
    jiffies_hz: u32,
    service_mark: u32,
}

impl State {
    #[inline(always)]
    fn read() -> State {
        STATE.get(0).map_or(
            State {
                generation: 0,
                flags: 0,
                jiffies_hz: 0,
                service_mark: 0,
            },
            |state| State {
                generation: state.generation,
                flags: state.flags,
                jiffies_hz: state.jiffies_hz,
                service_mark: state.service_mark,
            },
        )
    }
}

/// The stamp of a packet without the Service mark (a real stamp is a `u16`). A plain
/// word rather than an `Option`: the BPF backend may spill an `Option`'s undefined
/// payload, which the verifier refuses to read.
const UNMARKED: u32 = u32::MAX;

/// The skb fields a Service connection carries from `from_pod` to the hook after
/// kube-proxy's translation: the mark bit says "judge my egress on the backend", and
/// `tc_index` names the source pod's endpoint, which survives a masquerade that
/// replaces the source address (kube-proxy's hairpin rule). Neither crosses a network
/// namespace into or out of a pod (veth scrubs the mark; the pod never sees tc_index
/// of the node's skb), so a pod cannot forge them.
struct Marks<'a> {
    ctx: &'a TcContext,
    bit: u32,
}

impl Marks<'_> {
    #[inline(always)]
    fn mark(&self) -> u32 {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { (*self.ctx.skb.skb).mark }
    }

    /// Whether the packet is a marked Service connection, and its stamp.
    #[inline(always)]
    fn peek(&self) -> Option<u32> {
        let mark = self.mark();
        if self.bit == 0 || mark & self.bit == 0 {
            return None;
        }
        // SAFETY: as above.
        Some(unsafe { (*self.ctx.skb.skb).tc_index })
    }

    /// [`Marks::peek`], clearing the bit so it never leaves the node (an overlay
    /// device would route the encapsulated packet by it). Towards a pod there is no
    /// need: veth scrubs the mark as the packet enters the pod's namespace.
    #[inline(always)]
    fn take(&self) -> Option<u32> {
        let stamp = self.peek()?;
        self.ctx.set_mark(self.mark() & !self.bit);
        Some(stamp)
    }

    #[inline(always)]
    fn put(&self, endpoint: u32) {
        self.ctx.set_mark(self.mark() | self.bit);
        let index = if endpoint > u32::from(u16::MAX) {
            0
        } else {
            endpoint as u16
        };
        // SAFETY: as above; tc_index is writable for TC programs.
        unsafe { (*self.ctx.skb.skb).tc_index = index.into() };
    }
}

/// Entry point shared by the hooks. Allowed packets go on to whatever else is attached
/// (`TC_ACT_UNSPEC`, i.e. TCX_NEXT), so netpol composes with a CNI's own programs.
#[inline(always)]
pub fn run(ctx: &TcContext, hook: Hook) -> i32 {
    let state = State::read();
    let marks = Marks {
        ctx,
        bit: state.service_mark,
    };
    // An exit device carries all of the node's traffic: only marked packets are ours.
    let stamp = match hook {
        Hook::FromPod => UNMARKED,
        Hook::ToPod => marks.peek().unwrap_or(UNMARKED),
        Hook::LeaveNode => match marks.take() {
            Some(stamp) => stamp,
            None => {
                return finish::<V4>(ctx, None, &Verdict::of(Reason::NotEndpoint, DIR_EGRESS));
            }
        },
    };
    let direction = hook.direction();
    match parse::parse(ctx) {
        Ok(Parsed::V4(packet)) => {
            let verdict = decide(ctx, &packet, hook, &state, &marks, stamp);
            finish(ctx, Some(&packet), &verdict)
        }
        Ok(Parsed::V6(packet)) => {
            let verdict = decide(ctx, &packet, hook, &state, &marks, stamp);
            finish(ctx, Some(&packet), &verdict)
        }
        Ok(Parsed::Other) => finish::<V4>(ctx, None, &Verdict::of(Reason::NotEndpoint, direction)),
        Err(Malformed) => finish::<V4>(ctx, None, &Verdict::of(Reason::Malformed, direction)),
    }
}

#[inline(always)]
fn endpoint_at<T: Table>(addr: &T::Raw) -> Option<EndpointInfo> {
    // SAFETY: ENDPOINTS is only written from userspace; the value is copied at once.
    (unsafe { ENDPOINTS.get(T::addr(addr)) }).copied()
}

/// Conntrack, then (for a new connection) the endpoint, its interface and its policy.
/// `T` is the packet's address family, with its conntrack table. `stamp`: for a Service
/// connection awaiting its egress decision the source's endpoint id (0 if unknown),
/// else [`UNMARKED`].
#[inline(always)]
fn decide<T: Table>(
    ctx: &TcContext,
    packet: &Packet<T>,
    hook: Hook,
    state: &State,
    marks: &Marks<'_>,
    stamp: u32,
) -> Verdict {
    let direction = hook.direction();
    if packet.is_network_control() {
        return Verdict::of(Reason::NetworkControl, direction);
    }
    let ends = Ends::of(direction);
    let (local, remote) = ends.addresses(packet);
    // SAFETY: the context pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if packet.is_neighbour_message()
        && let Some(verdict) = on_link_neighbour::<T>(packet, hook, ifindex, &local, &remote)
    {
        return verdict;
    }
    if packet.later_fragment {
        return fragment::<T>(hook, &local, ifindex, state.flags);
    }
    let clock = Clock::now(state.jiffies_hz);
    if hook != Hook::LeaveNode
        && let Some(quoted) = &packet.quoted(ctx)
    {
        // An error about a packet of a live connection of this endpoint, addressed to
        // it or sent by it: passes like the connection's replies (path MTU discovery).
        let related = conntrack::quoted_key(quoted, ends, ifindex);
        if related.local == local && conntrack::is_related::<T>(&related, &clock) {
            return Verdict::of(Reason::Related, direction);
        }
    }
    let key = T::key(packet, ends, ifindex);
    let at = At {
        ifindex,
        key: &key,
        packet,
        ends,
        local: &local,
        remote: &remote,
        clock: &clock,
        generation: state.generation,
    };
    match hook {
        Hook::FromPod => from_pod(&at, state, marks),
        Hook::ToPod => to_pod(&at, state.flags, stamp),
        Hook::LeaveNode => leave_node(&at, stamp),
    }
}

/// Neighbour discovery between global addresses ([`Packet::is_neighbour_message`]),
/// which pods of one bridge exchange directly. It passes only where it provably stays on
/// the link: leaving a pod, from its own address (the interface is bound to it), towards
/// a pod of this node; and arriving at a pod with hop limit 255 (a router would have
/// lowered it). A copy that was routed instead reaches the destination's hook with a
/// lower hop limit, and every receiver discards such a message as invalid (RFC 4861,
/// 7.1): it is dropped there, so the sender's egress policy is never bypassed. `None`:
/// judged like other traffic.
#[inline(always)]
fn on_link_neighbour<T: Table>(
    packet: &Packet<T>,
    hook: Hook,
    ifindex: u32,
    local: &T::Raw,
    remote: &T::Raw,
) -> Option<Verdict> {
    let direction = hook.direction();
    match hook {
        Hook::FromPod
            if packet.hop_limit == 255
                && endpoint_at::<T>(local).is_some_and(|own| own.id == owner_of(ifindex))
                && endpoint_at::<T>(remote).is_some() =>
        {
            Some(Verdict::of(Reason::NetworkControl, direction))
        }
        Hook::ToPod if packet.hop_limit == 255 => {
            Some(Verdict::of(Reason::NetworkControl, direction))
        }
        Hook::ToPod => Some(Verdict::of(Reason::Malformed, direction)),
        _ => None,
    }
}

/// A packet as one hook sees it: its conntrack key and ends.
struct At<'a, T: Table> {
    /// The interface the hook runs on.
    ifindex: u32,
    key: &'a conntrack::CtKeyOf<T>,
    packet: &'a Packet<T>,
    ends: Ends,
    local: &'a T::Raw,
    remote: &'a T::Raw,
    clock: &'a Clock,
    generation: u32,
}

impl<T: Table> At<'_, T> {
    #[inline(always)]
    fn track(
        &self,
        recheck: impl FnOnce(Connection, u32) -> Option<Rechecked>,
    ) -> Option<conntrack::Tracked> {
        conntrack::track::<T>(
            self.key,
            self.packet,
            self.ends,
            self.clock,
            self.generation,
            recheck,
        )
    }

    /// On a conntrack miss, a TCP packet that opens nothing (no SYN) that `decision`
    /// (the endpoint's policy, the packet's sender as initiator) denies is the reply of
    /// a connection whose entry was lost (LRU eviction, a restarted agent) when the
    /// endpoint's policy allows that connection the other way: the receiver of this
    /// packet as initiator. Returns the decision and who opened the connection, for
    /// the entry made again. (Datagrams are never taken for replies: nothing tells a
    /// reply from a new datagram, so that would open the pod to any sender its policy
    /// lets it reach.)
    #[inline(always)]
    fn or_reply(
        &self,
        endpoint: &EndpointInfo,
        decision: policy::Decision,
        direction: u8,
    ) -> (policy::Decision, u8) {
        let packet = self.packet;
        if !matches!(
            decision.reason,
            Reason::PolicyDenied | Reason::ClusterDenied
        ) || packet.protocol != PROTO_TCP
            || packet.tcp_flags & TCP_SYN != 0
        {
            return (decision, direction);
        }
        let other = if direction == DIR_EGRESS {
            DIR_INGRESS
        } else {
            DIR_EGRESS
        };
        let reverse = policy::decide(
            endpoint,
            &Connection {
                direction: other,
                peer: T::addr(self.remote),
                protocol: packet.protocol,
                // The initiator's peer is this packet's sender: its port is the
                // responder's, the one policy names.
                port: packet.sport,
                defer_services: false,
            },
        );
        if reverse.reason.is_drop() {
            return (decision, direction);
        }
        (
            policy::Decision {
                reason: Reason::Resumed,
                ..reverse
            },
            other,
        )
    }

    #[inline(always)]
    fn open(&self, opening: &Opening) {
        conntrack::open::<T>(self.key, self.packet, opening, self.generation, self.clock);
    }

    #[inline(always)]
    fn connection(&self, direction: u8, peer: &T::Raw, defer_services: bool) -> Connection {
        Connection {
            direction,
            peer: T::addr(peer),
            protocol: self.packet.protocol,
            port: self.packet.dport,
            defer_services,
        }
    }
}

#[inline(always)]
fn tracked_verdict(tracked: &conntrack::Tracked, direction: u8) -> Verdict {
    Verdict::side(Side {
        rule: tracked.rule,
        ..Side::of(tracked.reason, direction)
    })
}

/// The veth's owner, or the verdict for a veth the agent refused or has not bound and
/// a packet of no endpoint.
#[inline(always)]
fn owner_of(ifindex: u32) -> u32 {
    // SAFETY: IFACES is only written from userspace; the value is copied at once.
    (unsafe { IFACES.get(ifindex) }).map_or(IFACE_UNBOUND, |owner| *owner)
}

/// Packets leaving a pod: its egress. A connection to a Service address is let through
/// marked, to be judged after translation.
#[inline(always)]
fn from_pod<T: Table>(at: &At<'_, T>, state: &State, marks: &Marks<'_>) -> Verdict {
    let services = state.service_mark != 0;
    let recheck = |mut connection: Connection, _flags: u32| match endpoint_at::<T>(at.local) {
        // A pod is never blocked from itself, now as when the connection opened.
        Some(endpoint) if at.remote == at.local => Some(Rechecked {
            rule: RULE_NONE,
            service: endpoint.id,
            add_flags: 0,
        }),
        Some(endpoint) => {
            connection.defer_services = services;
            let decision = policy::decide(&endpoint, &connection);
            (!decision.reason.is_drop()).then_some(Rechecked {
                rule: decision.rule,
                service: endpoint.id,
                add_flags: if decision.reason == Reason::ToService {
                    CT_SERVICE
                } else {
                    0
                },
            })
        }
        None => Some(Rechecked {
            rule: RULE_NONE,
            service: RULE_NONE,
            add_flags: 0,
        }),
    };
    // Conntrack first: a packet of a known connection costs one lookup. Entries exist
    // only for endpoints, so ENDPOINTS is consulted only when the policy changed since
    // the entry was judged (a pod that is no longer an endpoint is not ours to judge).
    if let Some(tracked) = at.track(recheck) {
        if services && tracked.flags & CT_SERVICE != 0 && !tracked.reason.is_drop() {
            marks.put(tracked.service);
        }
        return tracked_verdict(&tracked, DIR_EGRESS);
    }
    let owner = owner_of(at.ifindex);
    if owner == IFACE_REFUSED {
        return Verdict::of(Reason::Refused, DIR_EGRESS);
    }
    let Some(endpoint) = endpoint_at::<T>(at.local) else {
        return if owner == IFACE_UNBOUND {
            unprogrammed(state.flags, DIR_EGRESS)
        } else {
            not_an_endpoint::<T>(at.local, DIR_EGRESS, at.packet.is_dhcp_client())
        };
    };
    // A veth bound to one pod carries only that pod's addresses. (An unbound one is
    // being programmed right now: its pod's policy already applies.)
    if owner != IFACE_UNBOUND && owner != endpoint.id && owner != IFACE_SHARED {
        return Verdict::of(Reason::Spoofed, DIR_EGRESS);
    }
    let decision = if at.remote == at.local {
        // A pod is never blocked from itself.
        policy::Decision {
            reason: Reason::Hairpin,
            rule: RULE_NONE,
            identity: 0,
        }
    } else {
        policy::decide(&endpoint, &at.connection(DIR_EGRESS, at.remote, services))
    };
    let (decision, opened) = at.or_reply(&endpoint, decision, DIR_EGRESS);
    let to_service = decision.reason == Reason::ToService;
    if !decision.reason.is_drop() {
        at.open(&Opening {
            direction: opened,
            rule: decision.rule,
            service_flags: if to_service { CT_SERVICE } else { 0 },
            service: endpoint.id,
        });
    }
    if to_service {
        marks.put(endpoint.id);
    }
    Verdict::side(Side {
        reason: decision.reason,
        rule: decision.rule,
        endpoint: endpoint.id,
        identity: decision.identity,
        direction: DIR_EGRESS,
    })
}

/// `backend_endpoint` of a backend that is no local endpoint (endpoint ids start at
/// `ENDPOINT_ID_FIRST`). A plain id rather than an `Option`: the payload of a `None`
/// is undefined, and a register holding it, once spilled, is rejected by the verifier.
const NO_ENDPOINT: u32 = 0;

/// The source pod's egress decision on the backend, after kube-proxy's translation:
/// exactly as if the pod had dialled `backend` on `port` itself. `source` is the
/// packet's source address now, `stamped` the source's endpoint id from `from_pod`
/// ([`NO_ENDPOINT`] when unmarked), `backend_endpoint` the backend's.
#[inline(always)]
fn service_egress<T: Table>(
    source: &T::Raw,
    backend: &T::Raw,
    backend_endpoint: u32,
    stamped: u32,
    protocol: u8,
    port: u16,
) -> Side {
    // A pod reaching itself through its own Service: never blocked. kube-proxy
    // masquerades exactly this case, so the source address may be the node's now; the
    // stamped endpoint still names the pod.
    if source == backend || (stamped != 0 && backend_endpoint == stamped) {
        return Side {
            endpoint: stamped,
            ..Side::of(Reason::Hairpin, DIR_EGRESS)
        };
    }
    match endpoint_at::<T>(source) {
        Some(client) => {
            let decision = policy::decide(
                &client,
                &Connection {
                    direction: DIR_EGRESS,
                    peer: T::addr(backend),
                    protocol,
                    port,
                    defer_services: false,
                },
            );
            Side {
                reason: decision.reason,
                rule: decision.rule,
                endpoint: client.id,
                identity: decision.identity,
                direction: DIR_EGRESS,
            }
        }
        // Masqueraded by something other than kube-proxy's hairpin rule (e.g. kube-
        // proxy's --masquerade-all): the pod whose egress this is cannot be named, so
        // the connection is not let through unjudged.
        None => Side {
            endpoint: stamped,
            ..Side::of(Reason::Masqueraded, DIR_EGRESS)
        },
    }
}

/// Packets entering a pod: its ingress; for a marked packet first the source pod's
/// egress on this backend.
#[inline(always)]
fn to_pod<T: Table>(at: &At<'_, T>, state_flags: u32, stamp: u32) -> Verdict {
    let backend = || endpoint_at::<T>(at.local);
    let marked = stamp != UNMARKED;
    let stamped = if marked { stamp } else { 0 };
    let recheck = |connection: Connection, flags: u32| {
        let endpoint = backend();
        // A pod is never blocked from itself, now as when the connection opened (when
        // kube-proxy masqueraded it, the source is the node's: allowed anyway).
        let rule = match endpoint {
            Some(endpoint) if at.remote != at.local => {
                let decision = policy::decide(&endpoint, &connection);
                if decision.reason.is_drop() {
                    return None;
                }
                decision.rule
            }
            _ => RULE_NONE,
        };
        let mut service = RULE_NONE;
        if flags & CT_SERVICE_EGRESS != 0 {
            let side = service_egress::<T>(
                at.remote,
                at.local,
                endpoint.map_or(NO_ENDPOINT, |e| e.id),
                stamped,
                connection.protocol,
                connection.port,
            );
            if side.reason.is_drop() {
                return None;
            }
            service = side.rule;
        }
        Some(Rechecked {
            rule,
            service,
            add_flags: 0,
        })
    };
    if let Some(tracked) = at.track(recheck) {
        // A connection opened before its source became egress isolated: its packets
        // are marked since, and its egress is judged on this backend once.
        if marked && tracked.flags & CT_SERVICE_EGRESS == 0 && !tracked.reason.is_drop() {
            let side = service_egress::<T>(
                at.remote,
                at.local,
                backend().map_or(NO_ENDPOINT, |e| e.id),
                stamped,
                at.packet.protocol,
                at.packet.dport,
            );
            if side.reason.is_drop() {
                conntrack::revoke::<T>(at.key);
                return Verdict::side(side);
            }
            conntrack::add_service_egress::<T>(at.key, side.rule);
        }
        return tracked_verdict(&tracked, DIR_INGRESS);
    }
    let endpoint = backend();
    let service_side = match marked {
        true => {
            let side = service_egress::<T>(
                at.remote,
                at.local,
                endpoint.map_or(NO_ENDPOINT, |e| e.id),
                stamped,
                at.packet.protocol,
                at.packet.dport,
            );
            if side.reason.is_drop() {
                return Verdict::side(side);
            }
            Some(side)
        }
        false => None,
    };
    let owner = owner_of(at.ifindex);
    if owner == IFACE_REFUSED {
        return Verdict::of(Reason::Refused, DIR_INGRESS);
    }
    let Some(endpoint) = endpoint else {
        return if owner == IFACE_UNBOUND {
            unprogrammed(state_flags, DIR_INGRESS)
        } else {
            not_an_endpoint::<T>(at.local, DIR_INGRESS, false)
        };
    };
    let decision = if at.remote == at.local
        || service_side.is_some_and(|side| side.reason == Reason::Hairpin)
    {
        // A pod is never blocked from itself.
        policy::Decision {
            reason: Reason::Hairpin,
            rule: RULE_NONE,
            identity: 0,
        }
    } else {
        policy::decide(&endpoint, &at.connection(DIR_INGRESS, at.remote, false))
    };
    // A marked packet is the first of its Service connection, never a reply.
    let (decision, opened) = if marked {
        (decision, DIR_INGRESS)
    } else {
        at.or_reply(&endpoint, decision, DIR_INGRESS)
    };
    if !decision.reason.is_drop() {
        at.open(&Opening {
            direction: opened,
            rule: decision.rule,
            service_flags: if service_side.is_some() {
                CT_SERVICE_EGRESS
            } else {
                0
            },
            service: service_side.map_or(RULE_NONE, |side| side.rule),
        });
    }
    Verdict {
        main: Side {
            reason: decision.reason,
            rule: decision.rule,
            endpoint: endpoint.id,
            identity: decision.identity,
            direction: DIR_INGRESS,
        },
        service_egress: service_side,
    }
}

/// Marked packets leaving the node: the source pod's egress on a backend elsewhere.
#[inline(always)]
fn leave_node<T: Table>(at: &At<'_, T>, stamped: u32) -> Verdict {
    let recheck = |connection: Connection, _flags: u32| {
        let side = service_egress::<T>(
            at.local,
            at.remote,
            NO_ENDPOINT,
            stamped,
            connection.protocol,
            connection.port,
        );
        (!side.reason.is_drop()).then_some(Rechecked {
            rule: side.rule,
            service: RULE_NONE,
            add_flags: 0,
        })
    };
    if let Some(tracked) = at.track(recheck) {
        return tracked_verdict(&tracked, DIR_EGRESS);
    }
    let side = service_egress::<T>(
        at.local,
        at.remote,
        NO_ENDPOINT,
        stamped,
        at.packet.protocol,
        at.packet.dport,
    );
    if !side.reason.is_drop() {
        at.open(&Opening {
            direction: DIR_EGRESS,
            rule: side.rule,
            service_flags: 0,
            service: RULE_NONE,
        });
    }
    Verdict::side(side)
}

/// The verdict for an IP packet whose local address is no endpoint. Our programs sit
/// only on pod veths, so a packet leaving the pod must carry one of the pod's addresses:
/// anything else would slip past the pod's egress policy and is dropped as spoofed. The
/// only exceptions are what a pod sends before it has an address, from a link-local or
/// unspecified one: DHCP and DHCPv6 (`dhcp`), and ND and MLD (let through before, see
/// [`Packet::is_network_control`]).
#[inline(always)]
fn not_an_endpoint<T: Table>(local: &T::Raw, direction: u8, dhcp: bool) -> Verdict {
    if direction == DIR_EGRESS && !(dhcp && T::link_local_or_unspecified(local)) {
        Verdict::of(Reason::Spoofed, direction)
    } else {
        Verdict::of(Reason::NotEndpoint, direction)
    }
}

/// A later fragment: no ports, nothing for policy (its first fragment was judged, and a
/// datagram whose first fragment was dropped is never reassembled), but leaving a pod it
/// must carry the pod's own address like any other packet.
#[inline(always)]
fn fragment<T: Table>(hook: Hook, local: &T::Raw, ifindex: u32, state_flags: u32) -> Verdict {
    let direction = hook.direction();
    let endpoint = endpoint_at::<T>(local);
    if hook == Hook::FromPod {
        let owner = owner_of(ifindex);
        if owner == IFACE_REFUSED {
            return Verdict::of(Reason::Refused, direction);
        }
        match endpoint {
            None if owner == IFACE_UNBOUND => return unprogrammed(state_flags, direction),
            None => return Verdict::of(Reason::Spoofed, direction),
            Some(endpoint)
                if owner != IFACE_UNBOUND && owner != endpoint.id && owner != IFACE_SHARED =>
            {
                return Verdict::of(Reason::Spoofed, direction);
            }
            Some(_) => {}
        }
    }
    match endpoint {
        Some(endpoint) => Verdict::side(Side {
            endpoint: endpoint.id,
            ..Side::of(Reason::Fragment, direction)
        }),
        None => Verdict::of(Reason::NotEndpoint, direction),
    }
}

/// The verdict for a packet of no known endpoint on an interface the agent has not
/// bound to a pod: a veth that appeared before its pod was programmed. The agent's
/// `--unprogrammed` default decides: dropped (so a pod that policies will select is
/// isolated from its first packet), or passed unjudged.
#[inline(always)]
fn unprogrammed(flags: u32, direction: u8) -> Verdict {
    if flags & STATE_DENY_UNPROGRAMMED != 0 {
        Verdict::of(Reason::Unprogrammed, direction)
    } else {
        Verdict::of(Reason::NotEndpoint, direction)
    }
}

#[inline(always)]
fn add(counter: Option<*mut Counter>, len: u32) {
    if let Some(counter) = counter {
        // SAFETY: per-CPU slot, no concurrent writer.
        let counter = unsafe { &mut *counter };
        counter.packets += 1;
        counter.bytes += u64::from(len);
    }
}

/// Takes a token from this CPU's bucket; false when the rate limit is reached.
#[inline(always)]
fn take_event_token(now: u64) -> bool {
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, no concurrent writer.
    let budget = unsafe { &mut *budget };
    // Capped so that the product cannot overflow (and no 128-bit multiply is needed,
    // which BPF cannot do): a second refills more than the burst anyway.
    let elapsed = now.saturating_sub(budget.last_refill_ns).min(1_000_000_000);
    let refill = elapsed * EVENTS_PER_SECOND_PER_CPU / 1_000_000_000;
    if refill > 0 {
        budget.tokens = (budget.tokens + refill).min(EVENTS_BURST);
        budget.last_refill_ns = now;
    }
    if budget.tokens == 0 {
        budget.suppressed += 1;
        return false;
    }
    budget.tokens -= 1;
    true
}

/// Writes the event straight into the ring buffer (no copy of it on the stack, which
/// the verifier limits to 512 bytes for a hook and everything it calls).
#[inline(always)]
fn emit<F: Family>(ctx: &TcContext, packet: Option<&Packet<F>>, side: &Side) {
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if !take_event_token(now) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<VerdictEvent>(0) else {
        if let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) {
            // SAFETY: per-CPU slot, no concurrent writer.
            unsafe { (*budget).lost += 1 };
        }
        return;
    };
    let event = entry.as_mut_ptr();
    let none = Addr::default();
    // SAFETY: `event` points to a reserved, writable VerdictEvent-sized record; every
    // field is written before it is submitted.
    unsafe {
        (*event).timestamp_ns = now;
        (*event).src = packet.map_or(none, |p| F::addr(&p.src));
        (*event).dst = packet.map_or(none, |p| F::addr(&p.dst));
        (*event).sport = packet.map_or(0, |p| p.sport);
        (*event).dport = packet.map_or(0, |p| p.dport);
        (*event).protocol = packet.map_or(0, |p| p.protocol);
        (*event).direction = side.direction;
        (*event).reason = side.reason as u8;
        (*event)._pad0 = 0;
        (*event).endpoint = side.endpoint;
        (*event).peer_identity = side.identity;
        (*event).rule = side.rule;
        (*event).ifindex = (*ctx.skb.skb).ifindex;
        (*event).len = ctx.len();
        (*event)._pad1 = 0;
    }
    entry.submit(0);
}

/// Counts one side's decision (reason, rule) and reports it.
#[inline(always)]
fn account<F: Family>(ctx: &TcContext, packet: Option<&Packet<F>>, side: &Side, len: u32) {
    add(
        COUNTERS.get_ptr_mut(counter_index(side.reason, side.direction)),
        len,
    );
    if side.rule != RULE_NONE {
        add(RULE_COUNTERS.get_ptr_mut(side.rule), len);
    }
    if reason_emits_event(side.reason) {
        emit(ctx, packet, side);
    }
}

/// The one exit: count, report, then pass or drop.
#[inline(always)]
fn finish<F: Family>(ctx: &TcContext, packet: Option<&Packet<F>>, verdict: &Verdict) -> i32 {
    let len = ctx.len();
    if let Some(side) = &verdict.service_egress {
        account(ctx, packet, side, len);
    }
    account(ctx, packet, &verdict.main, len);
    if verdict.main.reason.is_drop() {
        TC_ACT_SHOT
    } else {
        TC_ACT_UNSPEC
    }
}
