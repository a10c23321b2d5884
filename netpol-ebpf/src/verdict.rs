//! The pipeline and its single exit: parse → endpoint → conntrack → policy → verdict.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_ns,
    programs::TcContext,
};
use netpol_common::{DIR_EGRESS, Reason};

use crate::{
    conntrack::{self, Flow},
    maps::{COUNTERS, ENDPOINTS, STATE},
    parse::{self, Malformed},
    policy,
};

/// Entry point shared by both hooks. Allowed packets go on to whatever else is attached
/// (`TC_ACT_UNSPEC`, i.e. TCX_NEXT), so netpol composes with a CNI's own programs.
#[inline(always)]
pub fn run(ctx: &TcContext, direction: u8) -> i32 {
    let reason = decide(ctx, direction).unwrap_or(Reason::Malformed);
    finish(ctx, reason)
}

#[inline(always)]
fn decide(ctx: &TcContext, direction: u8) -> Result<Reason, Malformed> {
    let Some(packet) = parse::parse(ctx)? else {
        return Ok(Reason::NotEndpoint);
    };
    if packet.is_network_control() {
        return Ok(Reason::NetworkControl);
    }
    let local = if direction == DIR_EGRESS {
        &packet.src
    } else {
        &packet.dst
    };
    // SAFETY: ENDPOINTS is only written from userspace; the value is copied at once.
    let Some(endpoint) = (unsafe { ENDPOINTS.get(local) }).copied() else {
        return Ok(Reason::NotEndpoint);
    };
    if packet.later_fragment {
        return Ok(Reason::Fragment);
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let len = ctx.len();
    let generation = STATE.get(0).map_or(0, |state| state.generation);
    let flow = Flow::of(&packet, direction);
    let recheck = |connection: &policy::Connection| {
        let (reason, rule) = policy::decide(&endpoint, connection);
        (!reason.is_drop()).then_some(rule)
    };
    if let Some(reason) = conntrack::track(&flow, &packet, now, len, generation, recheck) {
        return Ok(reason);
    }
    let remote = if direction == DIR_EGRESS {
        &packet.dst
    } else {
        &packet.src
    };
    let connection = policy::Connection {
        direction,
        peer: remote,
        protocol: packet.protocol,
        port: packet.dport,
    };
    let (reason, rule) = policy::decide(&endpoint, &connection);
    if !reason.is_drop() {
        conntrack::open(&flow, &packet, direction, rule, generation, now, len);
    }
    Ok(reason)
}

/// The one exit: count the reason, then pass or drop.
#[inline(always)]
fn finish(ctx: &TcContext, reason: Reason) -> i32 {
    if let Some(counter) = COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer.
        let counter = unsafe { &mut *counter };
        counter.packets += 1;
        counter.bytes += u64::from(ctx.len());
    }
    if reason.is_drop() {
        TC_ACT_SHOT
    } else {
        TC_ACT_UNSPEC
    }
}
