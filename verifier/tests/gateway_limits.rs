//! Property tests of the gateway's limits: GCRA never admits more than its burst plus the
//! elapsed time's worth of calls, and a replay of the logged calls reaches the same decisions
//! as the live run whenever the live run pruned its state.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use attestplane_verifier::gateway::limits::{
    CallScope, Price, RateDecision, RateLimit, RateState, ScopeKind, SpendCap, SpendDecision,
    SpendState, decide_rate, gcra, reserve, settle,
};
use proptest::prelude::*;

fn call(agent: u8) -> CallScope {
    CallScope {
        tenant: "t".into(),
        user: format!("u{}", agent % 2),
        agent: format!("a{agent}"),
        server: "s".into(),
        tool: "x".into(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn gcra_never_admits_more_than_burst_plus_elapsed_over_interval(
        rate in 1u64..600,
        burst in 1u64..20,
        gaps in prop::collection::vec(0u64..3_000, 1..200),
    ) {
        let l = RateLimit { scope: ScopeKind::Agent, rate_per_minute: rate, burst };
        let t = l.interval_ms().unwrap();
        let mut tat = None;
        let mut now = 1_000_000u64;
        let mut allowed: Vec<u64> = Vec::new();
        for g in gaps {
            now += g;
            if let Ok(next) = gcra(tat, now, &l) {
                tat = Some(next);
                allowed.push(now);
            }
        }
        // Every window [allowed[i], allowed[j]] holds at most burst + elapsed / T calls.
        for i in 0..allowed.len() {
            for j in i..allowed.len() {
                let n = (j - i + 1) as u64;
                let elapsed = allowed[j] - allowed[i];
                prop_assert!(n <= burst + elapsed / t, "{n} calls in {elapsed} ms (T {t}, burst {burst})");
            }
        }
    }

    #[test]
    fn gcra_admits_a_steady_caller_at_its_rate(rate in 1u64..600, burst in 1u64..20) {
        let l = RateLimit { scope: ScopeKind::Agent, rate_per_minute: rate, burst };
        let t = l.interval_ms().unwrap();
        let mut tat = None;
        for k in 0..50u64 {
            let r = gcra(tat, 5_000 + k * t, &l);
            prop_assert!(r.is_ok(), "call {k} at the rate was refused");
            tat = r.ok();
        }
    }

    #[test]
    fn replay_equals_live_whatever_the_live_run_pruned(
        steps in prop::collection::vec((0u8..4, 0u64..20_000, 0u64..400, any::<bool>(), prop::option::of(0u64..500)), 1..120),
    ) {
        let rates = [
            RateLimit { scope: ScopeKind::Agent, rate_per_minute: 30, burst: 3 },
            RateLimit { scope: ScopeKind::Tenant, rate_per_minute: 120, burst: 6 },
        ];
        let caps = [
            SpendCap { scope: ScopeKind::User, asset: "USDC".into(), cap: 1_000, window_ms: 60_000 },
            SpendCap { scope: ScopeKind::Tool, asset: "USDC".into(), cap: 1_500, window_ms: 30_000 },
        ];
        // Live: prunes whenever the step says so.
        let run = |prune: bool| {
            let mut rate = RateState::default();
            let mut spend = SpendState::default();
            let mut now = 0u64;
            let mut log = Vec::new();
            for (agent, gap, quote, p, actual) in &steps {
                now += gap;
                if prune && *p {
                    rate.prune(now);
                    spend.prune(now, &caps);
                }
                let c = call(*agent);
                let r = decide_rate(&rate, now, &rates, &c);
                let allowed = r.decision == RateDecision::Allowed;
                let mut spend_ok = None;
                if allowed {
                    let price = Price { amount: *quote, asset: "USDC".into() };
                    let s = reserve(&spend, now, &caps, &c, Some(&price));
                    spend_ok = Some(s.decision == SpendDecision::Allowed);
                    if s.decision == SpendDecision::Allowed {
                        rate.apply(&r);
                        spend.apply(&s.updates);
                        let res = s.reservation.unwrap();
                        let upd = settle(&spend, now + 5, &caps, &res, *actual);
                        spend.apply(&upd);
                    }
                }
                log.push((r.decision, spend_ok));
            }
            log
        };
        prop_assert_eq!(run(true), run(false));
    }
}
