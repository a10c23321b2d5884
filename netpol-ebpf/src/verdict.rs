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
    Addr, Counter, DIR_EGRESS, EVENTS_BURST, EVENTS_PER_SECOND_PER_CPU, IFACE_REFUSED,
    IFACE_SHARED, IFACE_UNBOUND, RULE_NONE, Reason, STATE_DENY_UNPROGRAMMED, VerdictEvent,
    counter_index, reason_emits_event,
};

use crate::{
    conntrack::{self, Ends, Table},
    maps::{COUNTERS, ENDPOINTS, EVENT_BUDGET, EVENTS, IFACES, RULE_COUNTERS, STATE},
    parse::{self, Family, Malformed, Packet, Parsed, V4},
    policy,
};

/// How a packet was judged, with what the exit needs to report it.
struct Verdict {
    reason: Reason,
    rule: u32,
    endpoint: u32,
    identity: u32,
}

impl Verdict {
    const fn of(reason: Reason) -> Self {
        Verdict {
            reason,
            rule: RULE_NONE,
            endpoint: 0,
            identity: 0,
        }
    }
}

/// Entry point shared by both hooks. Allowed packets go on to whatever else is attached
/// (`TC_ACT_UNSPEC`, i.e. TCX_NEXT), so netpol composes with a CNI's own programs.
#[inline(always)]
pub fn run(ctx: &TcContext, direction: u8) -> i32 {
    match parse::parse(ctx) {
        Ok(Parsed::V4(packet)) => {
            let verdict = decide(ctx, &packet, direction);
            finish(ctx, Some(&packet), direction, &verdict)
        }
        Ok(Parsed::V6(packet)) => {
            let verdict = decide(ctx, &packet, direction);
            finish(ctx, Some(&packet), direction, &verdict)
        }
        Ok(Parsed::Other) => finish::<V4>(ctx, None, direction, &Verdict::of(Reason::NotEndpoint)),
        Err(Malformed) => finish::<V4>(ctx, None, direction, &Verdict::of(Reason::Malformed)),
    }
}

/// Conntrack, then (for a new connection) the endpoint, its interface and its policy.
/// `T` is the packet's address family, with its conntrack table.
#[inline(always)]
fn decide<T: Table>(ctx: &TcContext, packet: &Packet<T>, direction: u8) -> Verdict {
    if packet.is_network_control() {
        return Verdict::of(Reason::NetworkControl);
    }
    let ends = Ends::of(direction);
    let (local, remote) = ends.addresses(packet);
    // SAFETY (both lookups): ENDPOINTS is only written from userspace; the value is
    // copied at once.
    let endpoint = || (unsafe { ENDPOINTS.get(T::addr(&local)) }).copied();
    if packet.later_fragment {
        return match endpoint() {
            Some(endpoint) => Verdict {
                endpoint: endpoint.id,
                ..Verdict::of(Reason::Fragment)
            },
            None => not_an_endpoint(&T::addr(&local), direction),
        };
    }
    let (generation, flags, hz) = STATE.get(0).map_or((0, 0, 0), |state| {
        (state.generation, state.flags, state.jiffies_hz)
    });
    let clock = conntrack::Clock::now(hz);
    // SAFETY: the context pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let key = T::key(packet, ends, ifindex);
    // Conntrack first: a packet of a known connection costs one lookup. Entries exist
    // only for endpoints, so ENDPOINTS is consulted only when the policy changed since
    // the entry was judged (a pod that is no longer an endpoint is not ours to judge).
    let recheck = |connection: &policy::Connection| match endpoint() {
        Some(endpoint) => {
            let decision = policy::decide(&endpoint, connection);
            (!decision.reason.is_drop()).then_some(decision.rule)
        }
        None => Some(RULE_NONE),
    };
    if let Some(tracked) = conntrack::track::<T>(&key, packet, ends, &clock, generation, recheck) {
        return Verdict {
            reason: tracked.reason,
            rule: tracked.rule,
            endpoint: 0,
            identity: 0,
        };
    }
    // SAFETY: IFACES is only written from userspace; the value is copied at once.
    let owner = (unsafe { IFACES.get(ifindex) }).map_or(IFACE_UNBOUND, |owner| *owner);
    if owner == IFACE_REFUSED {
        return Verdict::of(Reason::Refused);
    }
    let Some(endpoint) = endpoint() else {
        return if owner == IFACE_UNBOUND {
            unprogrammed(flags)
        } else {
            not_an_endpoint(&T::addr(&local), direction)
        };
    };
    // A veth bound to one pod carries only that pod's addresses. (An unbound one is
    // being programmed right now: its pod's policy already applies.)
    if direction == DIR_EGRESS
        && owner != IFACE_UNBOUND
        && owner != endpoint.id
        && owner != IFACE_SHARED
    {
        return Verdict::of(Reason::Spoofed);
    }
    let connection = policy::Connection {
        direction,
        peer: T::addr(&remote),
        protocol: packet.protocol,
        port: packet.dport,
    };
    let decision = policy::decide(&endpoint, &connection);
    if !decision.reason.is_drop() {
        conntrack::open::<T>(&key, packet, direction, decision.rule, generation, &clock);
    }
    Verdict {
        reason: decision.reason,
        rule: decision.rule,
        endpoint: endpoint.id,
        identity: decision.identity,
    }
}

/// The verdict for an IP packet whose local address is no endpoint. Our programs sit
/// only on pod veths, so a packet leaving the pod must carry one of the pod's addresses
/// (or a link-local / unspecified one, e.g. for ND or DHCP): anything else would slip
/// past the pod's egress policy and is dropped as spoofed.
#[inline(always)]
fn not_an_endpoint(local: &Addr, direction: u8) -> Verdict {
    if direction == DIR_EGRESS && !local.is_link_local_or_unspecified() {
        Verdict::of(Reason::Spoofed)
    } else {
        Verdict::of(Reason::NotEndpoint)
    }
}

/// The verdict for a packet of no known endpoint on an interface the agent has not
/// bound to a pod: a veth that appeared before its pod was programmed. The agent's
/// `--unprogrammed` default decides: dropped (so a pod that policies will select is
/// isolated from its first packet), or passed unjudged.
#[inline(always)]
fn unprogrammed(flags: u32) -> Verdict {
    if flags & STATE_DENY_UNPROGRAMMED != 0 {
        Verdict::of(Reason::Unprogrammed)
    } else {
        Verdict::of(Reason::NotEndpoint)
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

#[inline(always)]
fn emit<F: Family>(ctx: &TcContext, packet: Option<&Packet<F>>, direction: u8, verdict: &Verdict) {
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if !take_event_token(now) {
        return;
    }
    let none = Addr::default();
    let event = VerdictEvent {
        timestamp_ns: now,
        src: packet.map_or(none, |p| F::addr(&p.src)),
        dst: packet.map_or(none, |p| F::addr(&p.dst)),
        sport: packet.map_or(0, |p| p.sport),
        dport: packet.map_or(0, |p| p.dport),
        protocol: packet.map_or(0, |p| p.protocol),
        direction,
        reason: verdict.reason as u8,
        _pad0: 0,
        endpoint: verdict.endpoint,
        peer_identity: verdict.identity,
        rule: verdict.rule,
        // SAFETY: the context pointer is valid for the program's run.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        len: ctx.len(),
        _pad1: 0,
    };
    if EVENTS.output::<VerdictEvent>(&event, 0).is_err()
        && let Some(budget) = EVENT_BUDGET.get_ptr_mut(0)
    {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { (*budget).lost += 1 };
    }
}

/// The one exit: count, report, then pass or drop.
#[inline(always)]
fn finish<F: Family>(
    ctx: &TcContext,
    packet: Option<&Packet<F>>,
    direction: u8,
    verdict: &Verdict,
) -> i32 {
    let len = ctx.len();
    add(
        COUNTERS.get_ptr_mut(counter_index(verdict.reason, direction)),
        len,
    );
    if verdict.rule != RULE_NONE {
        add(RULE_COUNTERS.get_ptr_mut(verdict.rule), len);
    }
    if reason_emits_event(verdict.reason) {
        emit(ctx, packet, direction, verdict);
    }
    if verdict.reason.is_drop() {
        TC_ACT_SHOT
    } else {
        TC_ACT_UNSPEC
    }
}
