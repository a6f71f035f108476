//! Rate limits and spend caps: integer arithmetic on logged time, so the verifier replays
//! every limit decision exactly.
//!
//! **Rates** use GCRA (the generic cell rate algorithm): one `u64` per key, the theoretical
//! arrival time `TAT` in milliseconds. A limit of `rate_per_minute` with burst `b` has the
//! emission interval `T = ⌈60000 / rate_per_minute⌉` ms (rounded up, so the limit never
//! admits more than it says) and the tolerance `τ = T × (b − 1)`. A call at `now` is allowed
//! iff `TAT − τ ≤ now`; then `TAT = max(TAT, now) + T`. A refused call changes nothing. Over
//! any interval of length `d` at most `b + d / T` calls are allowed (a property test holds
//! this). A rate of 0 or a burst of 0 allows nothing.
//!
//! **Spend** uses fixed windows: a cap of `cap` atomic units of `asset` per `window_ms`
//! (windows aligned to multiples of `window_ms` since the epoch). At decision the call's
//! quoted maximum (the registered price) is *reserved*: the call is allowed iff
//! `spent + quote ≤ cap` in the current window. At the result the actual amount is
//! *settled*: within the same window the reservation is replaced by the actual amount (a
//! refund when less); an amount above the quote is charged in full, to the window current at
//! settlement if the reservation's window has passed. An aborted call settles at its quote.
//!
//! Limits are keyed by scope ([`ScopeKind`]: tenant, user, agent, tool), so "each agent 60
//! calls a minute" is one rule and every agent has its own key. A call must pass every rule
//! that applies to it; if any refuses, no state changes.
//!
//! The functions here are pure: they read the state they are given and return the decision
//! and the updates to apply ([`RateOutcome`], [`SpendOutcome`]); the enclave applies them
//! live and the verifier's fold applies them on replay, with the logged enclave time as `now`.
//! All arithmetic saturates; nothing here can overflow or panic.
//!
//! ## What this module does not do
//!
//! It does not read a clock, know prices (the caller passes the registered price), settle
//! payments or read x402 headers; amounts are what the caller says. It does not bound the
//! number of keys: [`RateState::prune`] and [`SpendState::prune`] drop the keys whose state
//! equals "never seen", which keeps memory proportional to recent activity.

use std::collections::BTreeMap;

use serde::Serialize;
use thiserror::Error;

/// Milliseconds in a minute.
const MINUTE_MS: u64 = 60_000;

/// The most rate rules or spend caps a configuration may hold.
pub const MAX_LIMIT_RULES: usize = 256;

/// The longest asset name accepted, in bytes.
pub const MAX_ASSET_LEN: usize = 64;

/// What a limit is counted per.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScopeKind {
    /// Per tenant.
    Tenant,
    /// Per user.
    User,
    /// Per agent.
    Agent,
    /// Per tool (of a server).
    Tool,
}

impl ScopeKind {
    /// `tenant`, `user`, `agent` or `tool`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ScopeKind::Tenant => "tenant",
            ScopeKind::User => "user",
            ScopeKind::Agent => "agent",
            ScopeKind::Tool => "tool",
        }
    }

    /// Parses [`ScopeKind::as_str`]'s names.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tenant" => Some(ScopeKind::Tenant),
            "user" => Some(ScopeKind::User),
            "agent" => Some(ScopeKind::Agent),
            "tool" => Some(ScopeKind::Tool),
            _ => None,
        }
    }
}

/// Who makes a call, and to what: the keys its limits are counted under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallScope {
    /// The agent's tenant.
    pub tenant: String,
    /// The agent's user.
    pub user: String,
    /// The agent.
    pub agent: String,
    /// The server's id.
    pub server: String,
    /// The tool's name.
    pub tool: String,
}

/// The key of one counter: the scope kind and the id in it (for tools, `server/tool`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LimitKey {
    /// The scope kind.
    pub kind: ScopeKind,
    /// The tenant, user or agent id, or `server/tool`.
    pub id: String,
}

impl CallScope {
    /// This call's key under `kind`.
    pub fn key(&self, kind: ScopeKind) -> LimitKey {
        let id = match kind {
            ScopeKind::Tenant => self.tenant.clone(),
            ScopeKind::User => self.user.clone(),
            ScopeKind::Agent => self.agent.clone(),
            ScopeKind::Tool => format!("{}/{}", self.server, self.tool),
        };
        LimitKey { kind, id }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum LimitError {
    /// More than [`MAX_LIMIT_RULES`] rules.
    #[error("{count} limit rules, more than the maximum {max}")]
    TooManyRules {
        /// How many.
        count: usize,
        /// [`MAX_LIMIT_RULES`].
        max: usize,
    },
    /// A spend cap with a zero window.
    #[error("spend cap for {asset:?} per {scope} has a zero window")]
    ZeroWindow {
        /// The cap's scope.
        scope: &'static str,
        /// Its asset.
        asset: String,
    },
    /// An asset name that is empty or longer than [`MAX_ASSET_LEN`].
    #[error("asset name is empty or longer than {max} bytes")]
    BadAsset {
        /// [`MAX_ASSET_LEN`].
        max: usize,
    },
    /// Two rules for the same scope (and asset).
    #[error("two limits for the same {scope} scope")]
    DuplicateRule {
        /// The scope.
        scope: &'static str,
    },
}

/// A rate limit: `rate_per_minute` calls a minute per key of `scope`, up to `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RateLimit {
    /// What it counts per.
    pub scope: ScopeKind,
    /// Sustained calls per minute.
    pub rate_per_minute: u64,
    /// Calls allowed at once.
    pub burst: u64,
}

impl RateLimit {
    /// The emission interval `T` in ms, rounded up (`None` when the rate is 0).
    pub fn interval_ms(&self) -> Option<u64> {
        if self.rate_per_minute == 0 {
            return None;
        }
        Some(MINUTE_MS.div_ceil(self.rate_per_minute).max(1))
    }

    /// The tolerance `τ = T × (burst − 1)` in ms (`None` when nothing is allowed).
    pub fn tolerance_ms(&self) -> Option<u64> {
        let t = self.interval_ms()?;
        let extra = self.burst.checked_sub(1)?;
        Some(t.saturating_mul(extra))
    }
}

/// One GCRA step for one key: `tat` is the key's state (`None` for a key never seen), `now`
/// the call's time. Returns whether the call is allowed and the key's state afterwards
/// (unchanged when refused), or the milliseconds until it would be allowed.
pub fn gcra(tat: Option<u64>, now: u64, limit: &RateLimit) -> Result<u64, u64> {
    let (Some(t), Some(tau)) = (limit.interval_ms(), limit.tolerance_ms()) else {
        return Err(u64::MAX);
    };
    let tat = tat.unwrap_or(0);
    let earliest = tat.saturating_sub(tau);
    if earliest <= now {
        Ok(tat.max(now).saturating_add(t))
    } else {
        Err(earliest - now)
    }
}

/// The GCRA state of every key: its TAT in ms.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RateState {
    tat: BTreeMap<LimitKey, u64>,
}

/// What [`decide_rate`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RateDecision {
    /// Every rule allows the call.
    Allowed,
    /// The rule for `key` refuses it; it would be allowed in `retry_after_ms`.
    Limited {
        /// The key that is over its limit (the first, in rule order).
        key: LimitKey,
        /// Milliseconds until that key would allow it (`u64::MAX`: never).
        retry_after_ms: u64,
    },
}

/// A rate decision and the state updates it implies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateOutcome {
    /// The decision.
    pub decision: RateDecision,
    /// The new TAT of each key the call counts under (empty when limited).
    pub updates: Vec<(LimitKey, u64)>,
}

impl RateState {
    /// The TAT of `key`.
    pub fn tat(&self, key: &LimitKey) -> Option<u64> {
        self.tat.get(key).copied()
    }

    /// Applies the updates of an outcome.
    pub fn apply(&mut self, outcome: &RateOutcome) {
        for (k, v) in &outcome.updates {
            self.tat.insert(k.clone(), *v);
        }
    }

    /// Drops every key whose TAT is at or before `now`: its state is then the same as a key
    /// never seen (`max(TAT, now) = now`, and `TAT − τ ≤ now`).
    pub fn prune(&mut self, now: u64) {
        self.tat.retain(|_, tat| *tat > now);
    }

    /// How many keys are held.
    pub fn len(&self) -> usize {
        self.tat.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.tat.is_empty()
    }
}

/// Checks that a rule set is usable: at most [`MAX_LIMIT_RULES`] rules, one rate rule per
/// scope kind, one spend cap per (scope kind, asset), valid assets, non-zero windows.
pub fn check_rules(rates: &[RateLimit], caps: &[SpendCap]) -> Result<(), LimitError> {
    let count = rates.len().saturating_add(caps.len());
    if count > MAX_LIMIT_RULES {
        return Err(LimitError::TooManyRules {
            count,
            max: MAX_LIMIT_RULES,
        });
    }
    for (i, r) in rates.iter().enumerate() {
        if rates.iter().take(i).any(|o| o.scope == r.scope) {
            return Err(LimitError::DuplicateRule {
                scope: r.scope.as_str(),
            });
        }
    }
    for (i, c) in caps.iter().enumerate() {
        if c.asset.is_empty() || c.asset.len() > MAX_ASSET_LEN {
            return Err(LimitError::BadAsset { max: MAX_ASSET_LEN });
        }
        if c.window_ms == 0 {
            return Err(LimitError::ZeroWindow {
                scope: c.scope.as_str(),
                asset: c.asset.clone(),
            });
        }
        if caps
            .iter()
            .take(i)
            .any(|o| o.scope == c.scope && o.asset == c.asset)
        {
            return Err(LimitError::DuplicateRule {
                scope: c.scope.as_str(),
            });
        }
    }
    Ok(())
}

/// Decides whether `call` at `now` passes every rate rule, and how the state changes.
pub fn decide_rate(
    state: &RateState,
    now: u64,
    rules: &[RateLimit],
    call: &CallScope,
) -> RateOutcome {
    let mut updates = Vec::with_capacity(rules.len());
    for rule in rules {
        let key = call.key(rule.scope);
        match gcra(state.tat(&key), now, rule) {
            Ok(tat) => updates.push((key, tat)),
            Err(retry_after_ms) => {
                return RateOutcome {
                    decision: RateDecision::Limited {
                        key,
                        retry_after_ms,
                    },
                    updates: Vec::new(),
                };
            }
        }
    }
    RateOutcome {
        decision: RateDecision::Allowed,
        updates,
    }
}

/// A spend cap: at most `cap` atomic units of `asset` per `window_ms` per key of `scope`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SpendCap {
    /// What it counts per.
    pub scope: ScopeKind,
    /// The asset (e.g. `USDC`), compared exactly.
    pub asset: String,
    /// The most spent in one window, in atomic units.
    pub cap: u64,
    /// The window's length in ms (windows start at multiples of it).
    pub window_ms: u64,
}

/// A call's quoted price: the most it may cost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Price {
    /// Atomic units.
    pub amount: u64,
    /// The asset.
    pub asset: String,
}

/// One key's spend in its current window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpendWindow {
    /// The window's start (a multiple of the cap's window length), ms.
    pub start: u64,
    /// Reserved and settled amounts in the window, atomic units.
    pub spent: u64,
}

/// The key of a spend counter: a scope key and an asset.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpendKey {
    /// The scope key.
    pub key: LimitKey,
    /// The asset.
    pub asset: String,
}

/// The spend of every key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpendState {
    windows: BTreeMap<SpendKey, SpendWindow>,
}

/// What was reserved for one call: logged with the decision, passed back at settlement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The reserved amount (the quote).
    pub amount: u64,
    /// The asset.
    pub asset: String,
    /// Each capped key and the start of the window it was reserved in.
    pub windows: Vec<(SpendKey, u64)>,
}

/// What [`reserve`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpendDecision {
    /// Every cap leaves room for the quote.
    Allowed,
    /// The cap for `key` does not.
    OverCap {
        /// The capped key.
        key: SpendKey,
        /// Spent in its current window.
        spent: u64,
        /// The quote.
        quote: u64,
        /// The cap.
        cap: u64,
    },
}

/// A spend decision and the state updates it implies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpendOutcome {
    /// The decision.
    pub decision: SpendDecision,
    /// The reservation to log and settle (when allowed).
    pub reservation: Option<Reservation>,
    /// The new window of each key it counts under (empty when refused).
    pub updates: Vec<(SpendKey, SpendWindow)>,
}

fn window_start(now: u64, window_ms: u64) -> u64 {
    now - now % window_ms.max(1)
}

impl SpendState {
    /// The window of `key` as it stands at `now` for a cap of `window_ms`: a window that has
    /// ended reads as empty.
    pub fn window(&self, key: &SpendKey, now: u64, window_ms: u64) -> SpendWindow {
        let start = window_start(now, window_ms);
        match self.windows.get(key) {
            Some(w) if w.start == start => *w,
            _ => SpendWindow { start, spent: 0 },
        }
    }

    /// Applies the updates of an outcome (or of a settlement).
    pub fn apply(&mut self, updates: &[(SpendKey, SpendWindow)]) {
        for (k, w) in updates {
            self.windows.insert(k.clone(), *w);
        }
    }

    /// Drops every window that has ended by `now` under `caps` (a key with no cap any more is
    /// dropped too).
    pub fn prune(&mut self, now: u64, caps: &[SpendCap]) {
        self.windows.retain(|k, w| {
            caps.iter()
                .find(|c| c.scope == k.key.kind && c.asset == k.asset)
                .is_some_and(|c| w.start == window_start(now, c.window_ms))
        });
    }

    /// How many keys are held.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}

/// Reserves `price` for `call` at `now` under every cap for its asset. A call with no price
/// costs nothing and is always allowed.
pub fn reserve(
    state: &SpendState,
    now: u64,
    caps: &[SpendCap],
    call: &CallScope,
    price: Option<&Price>,
) -> SpendOutcome {
    let Some(price) = price else {
        return SpendOutcome {
            decision: SpendDecision::Allowed,
            reservation: None,
            updates: Vec::new(),
        };
    };
    let mut updates = Vec::new();
    let mut windows = Vec::new();
    for cap in caps.iter().filter(|c| c.asset == price.asset) {
        let key = SpendKey {
            key: call.key(cap.scope),
            asset: cap.asset.clone(),
        };
        let w = state.window(&key, now, cap.window_ms);
        let after = w.spent.saturating_add(price.amount);
        if after > cap.cap {
            return SpendOutcome {
                decision: SpendDecision::OverCap {
                    key,
                    spent: w.spent,
                    quote: price.amount,
                    cap: cap.cap,
                },
                reservation: None,
                updates: Vec::new(),
            };
        }
        windows.push((key.clone(), w.start));
        updates.push((
            key,
            SpendWindow {
                start: w.start,
                spent: after,
            },
        ));
    }
    SpendOutcome {
        decision: SpendDecision::Allowed,
        reservation: Some(Reservation {
            amount: price.amount,
            asset: price.asset.clone(),
            windows,
        }),
        updates,
    }
}

/// Settles a reservation at `now` with the `actual` amount charged (`None` for an aborted
/// call: the quote stands). Returns the window updates.
pub fn settle(
    state: &SpendState,
    now: u64,
    caps: &[SpendCap],
    reservation: &Reservation,
    actual: Option<u64>,
) -> Vec<(SpendKey, SpendWindow)> {
    let actual = actual.unwrap_or(reservation.amount);
    let mut updates = Vec::new();
    for (key, reserved_in) in &reservation.windows {
        let Some(cap) = caps
            .iter()
            .find(|c| c.scope == key.key.kind && c.asset == key.asset)
        else {
            continue;
        };
        let w = state.window(key, now, cap.window_ms);
        let spent = if w.start == *reserved_in {
            // Same window: replace the reservation by the actual amount.
            w.spent
                .saturating_sub(reservation.amount)
                .saturating_add(actual)
        } else {
            // The reservation's window has passed: only an overcharge counts, now.
            w.spent
                .saturating_add(actual.saturating_sub(reservation.amount))
        };
        if spent != w.spent {
            updates.push((
                key.clone(),
                SpendWindow {
                    start: w.start,
                    spent,
                },
            ));
        }
    }
    updates
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(agent: &str) -> CallScope {
        CallScope {
            tenant: "acme".into(),
            user: "alice".into(),
            agent: agent.into(),
            server: "srv".into(),
            tool: "pay".into(),
        }
    }

    #[test]
    fn gcra_allows_the_burst_then_one_per_interval() {
        let l = RateLimit {
            scope: ScopeKind::Agent,
            rate_per_minute: 60,
            burst: 3,
        };
        let mut tat = None;
        for _ in 0..3 {
            tat = Some(gcra(tat, 10_000, &l).unwrap());
        }
        assert_eq!(gcra(tat, 10_000, &l), Err(1_000));
        assert_eq!(gcra(tat, 10_999, &l), Err(1));
        let t = gcra(tat, 11_000, &l).unwrap();
        assert_eq!(gcra(Some(t), 11_000, &l), Err(1_000));
    }

    #[test]
    fn zero_rate_or_burst_allows_nothing() {
        for (rate_per_minute, burst) in [(0, 5), (5, 0), (0, 0)] {
            let l = RateLimit {
                scope: ScopeKind::Tool,
                rate_per_minute,
                burst,
            };
            assert_eq!(gcra(None, 0, &l), Err(u64::MAX));
        }
    }

    #[test]
    fn interval_rounds_up_so_the_rate_is_never_exceeded() {
        let l = RateLimit {
            scope: ScopeKind::Agent,
            rate_per_minute: 7,
            burst: 1,
        };
        assert_eq!(l.interval_ms(), Some(8_572)); // 60000 / 7 = 8571.4…
        let huge = RateLimit {
            rate_per_minute: u64::MAX,
            ..l
        };
        assert_eq!(huge.interval_ms(), Some(1));
    }

    #[test]
    fn saturates_at_the_end_of_time() {
        let l = RateLimit {
            scope: ScopeKind::Agent,
            rate_per_minute: 1,
            burst: u64::MAX,
        };
        assert_eq!(gcra(Some(u64::MAX), u64::MAX, &l), Ok(u64::MAX));
        assert!(gcra(None, u64::MAX, &l).is_ok());
    }

    #[test]
    fn a_limited_call_changes_no_key() {
        let rules = [
            RateLimit {
                scope: ScopeKind::Tenant,
                rate_per_minute: 600,
                burst: 10,
            },
            RateLimit {
                scope: ScopeKind::Agent,
                rate_per_minute: 60,
                burst: 1,
            },
        ];
        let mut state = RateState::default();
        let first = decide_rate(&state, 0, &rules, &call("a"));
        assert_eq!(first.decision, RateDecision::Allowed);
        state.apply(&first);
        let second = decide_rate(&state, 0, &rules, &call("a"));
        assert!(matches!(
            second.decision,
            RateDecision::Limited { ref key, .. } if key.kind == ScopeKind::Agent
        ));
        assert!(second.updates.is_empty());
        // Another agent of the same tenant has its own agent key.
        let other = decide_rate(&state, 0, &rules, &call("b"));
        assert_eq!(other.decision, RateDecision::Allowed);
        state.apply(&other);
        state.prune(100_000);
        assert!(state.is_empty());
    }

    fn cap(amount: u64) -> SpendCap {
        SpendCap {
            scope: ScopeKind::User,
            asset: "USDC".into(),
            cap: amount,
            window_ms: 3_600_000,
        }
    }

    fn price(amount: u64) -> Price {
        Price {
            amount,
            asset: "USDC".into(),
        }
    }

    #[test]
    fn spend_reserves_the_quote_and_refunds_at_settlement() {
        let caps = [cap(1_000)];
        let mut s = SpendState::default();
        let r1 = reserve(&s, 10, &caps, &call("a"), Some(&price(600)));
        assert_eq!(r1.decision, SpendDecision::Allowed);
        s.apply(&r1.updates);
        // The second quote does not fit while the first is reserved…
        let r2 = reserve(&s, 20, &caps, &call("b"), Some(&price(600)));
        assert!(matches!(
            r2.decision,
            SpendDecision::OverCap { spent: 600, .. }
        ));
        // …but fits once the first settles at 100.
        let res = r1.reservation.unwrap();
        let upd = settle(&s, 30, &caps, &res, Some(100));
        s.apply(&upd);
        let r3 = reserve(&s, 40, &caps, &call("b"), Some(&price(600)));
        assert_eq!(r3.decision, SpendDecision::Allowed);
    }

    #[test]
    fn spend_windows_roll_over_and_overcharges_count_later() {
        let caps = [cap(1_000)];
        let mut s = SpendState::default();
        let r = reserve(&s, 3_599_000, &caps, &call("a"), Some(&price(1_000)));
        s.apply(&r.updates);
        // Settled in the next window with more than the quote: the excess counts there.
        let upd = settle(
            &s,
            3_600_500,
            &caps,
            r.reservation.as_ref().unwrap(),
            Some(1_300),
        );
        s.apply(&upd);
        let key = &r.reservation.unwrap().windows[0].0;
        assert_eq!(s.window(key, 3_600_600, 3_600_000).spent, 300);
        // An aborted call keeps its quote.
        let r = reserve(&s, 3_600_700, &caps, &call("a"), Some(&price(700)));
        s.apply(&r.updates);
        assert!(settle(&s, 3_600_800, &caps, r.reservation.as_ref().unwrap(), None).is_empty());
        assert_eq!(s.window(key, 3_600_900, 3_600_000).spent, 1_000);
        s.prune(7_200_000, &caps);
        assert!(s.is_empty());
    }

    #[test]
    fn other_assets_and_free_calls_are_not_capped() {
        let caps = [cap(0)];
        let s = SpendState::default();
        assert_eq!(
            reserve(&s, 0, &caps, &call("a"), None).decision,
            SpendDecision::Allowed
        );
        let eth = Price {
            amount: 5,
            asset: "ETH".into(),
        };
        assert_eq!(
            reserve(&s, 0, &caps, &call("a"), Some(&eth)).decision,
            SpendDecision::Allowed
        );
        assert!(matches!(
            reserve(&s, 0, &caps, &call("a"), Some(&price(1))).decision,
            SpendDecision::OverCap { .. }
        ));
    }

    #[test]
    fn rejects_unusable_rules() {
        let r = RateLimit {
            scope: ScopeKind::Agent,
            rate_per_minute: 1,
            burst: 1,
        };
        assert!(check_rules(&[r, r], &[]).is_err());
        let mut c = cap(1);
        c.window_ms = 0;
        assert!(matches!(
            check_rules(&[], &[c]),
            Err(LimitError::ZeroWindow { .. })
        ));
        assert!(check_rules(&[r], &[cap(1), cap(2)]).is_err());
        assert!(check_rules(&[r], &[cap(1)]).is_ok());
    }
}
