//! A bounded memo of Cedar decisions, for replay.
//!
//! A decision is a pure function of (policy set, request): [`PolicyEngine::decide`] builds the
//! entities and the context from the [`DecisionRequest`] alone. A replay re-decides the same
//! agent asking the same server for the same tool over and over, so [`DecisionMemo`] answers a
//! request it has seen with the decision it computed then, under the same engine.
//!
//! ## The key
//!
//! Two requests share an answer only when Cedar could not tell them apart:
//!
//! - the same engine: the memo holds the [`Arc`] of the engine its answers came from and
//!   forgets them all when asked about another (a policy re-install is a new engine);
//! - every field of the request equal, compared in full (the hash only picks the bucket):
//!   principal (agent, user, tenant, roles, issuer: what the identity provider asserted),
//!   action, server facts (id, name, tenant, resource, assurance: what the registry says),
//!   item, attestation flags, the call's arguments and PII findings. An answer keeps these
//!   fields as one byte string that two requests share exactly when the fields are equal
//!   (every text length-prefixed, every optional field tagged: `encode`), compared whole;
//! - the context's numbers (`time`, `attestation.age_ms`, `counters.calls_last_minute`,
//!   `counters.spend_micros`) either equal as Cedar sees them, or, for a number that every
//!   policy of the set only compares with integer literals (`context.time > 1700000000`), the
//!   same outcome of every such comparison in the set: then no policy can observe anything
//!   else of it. `attestation.age_ms` must also be present in both or absent in both.
//!
//! Which numbers are only compared with literals is read from each policy's JSON form
//! ([`NumberUses::of`]), denying the shortcut by default: any other reading of a number (in
//! arithmetic, compared with another expression, in a set, its record or the whole `context`
//! used as a value, `in`, `contains`, anything this analysis does not recognise) makes the
//! exact value part of the key.
//!
//! Memory is bounded: two generations of at most `capacity` answers each; a full current
//! generation becomes the old one and the old one is dropped. Answers found in the old
//! generation move to the current one.
//!
//! The enclave's live decisions do not use it ([`PolicyEngine::decide`] is unchanged); the
//! replay fold does ([`crate::replay`]): it looks a request up borrowed from its own records
//! (`RequestKey`), and builds the request only when Cedar has to answer it.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};

use cedar_policy::PolicySet;
use serde_json::Value as J;

use super::{
    Action, AttestationFacts, CallFacts, Counters, Decision, DecisionRequest, PolicyEngine,
    Principal, ServerFacts, saturating_long,
};
use crate::time::UnixMillis;

/// A [`DecisionRequest`] borrowed: every field of it, so that the replay's fold can look an
/// answer up without building (and then dropping) the request's strings. Made from a request
/// by [`DecisionRequest::key`] or from the state's own records; [`RequestKey::to_request`]
/// builds the request when Cedar has to answer it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RequestKey<'a> {
    pub agent: &'a str,
    pub user: &'a str,
    pub tenant: &'a str,
    pub roles: &'a [String],
    pub issuer: &'a str,
    pub action: Action,
    pub server_id: &'a str,
    pub server_name: &'a str,
    pub server_tenant: &'a str,
    pub server_resource: &'a str,
    pub server_assurance: &'a str,
    pub tool: Option<&'a str>,
    pub attestation: AttestationFacts,
    pub time: UnixMillis,
    pub counters: Counters,
    /// The call's arguments and PII findings ([`DecisionRequest::call`]).
    pub call: Option<(Option<&'a str>, &'a BTreeMap<String, u64>)>,
}

impl DecisionRequest {
    /// The request borrowed as the memo keys it. Written with every field named, so that a
    /// field added to the request is a compile error here until the key has it.
    pub(crate) fn key(&self) -> RequestKey<'_> {
        let DecisionRequest {
            principal:
                Principal {
                    agent,
                    user,
                    tenant,
                    roles,
                    issuer,
                },
            action,
            server:
                ServerFacts {
                    id,
                    name,
                    tenant: server_tenant,
                    resource,
                    assurance,
                },
            tool,
            attestation,
            time,
            counters,
            call,
        } = self;
        RequestKey {
            agent,
            user,
            tenant,
            roles,
            issuer,
            action: *action,
            server_id: id,
            server_name: name,
            server_tenant,
            server_resource: resource,
            server_assurance: assurance,
            tool: tool.as_deref(),
            attestation: *attestation,
            time: *time,
            counters: *counters,
            call: call.as_ref().map(|c| (c.arguments.as_deref(), &c.pii)),
        }
    }
}

impl RequestKey<'_> {
    /// The owned request.
    pub(crate) fn to_request(self) -> DecisionRequest {
        DecisionRequest {
            principal: Principal {
                agent: self.agent.to_owned(),
                user: self.user.to_owned(),
                tenant: self.tenant.to_owned(),
                roles: self.roles.to_vec(),
                issuer: self.issuer.to_owned(),
            },
            action: self.action,
            server: ServerFacts {
                id: self.server_id.to_owned(),
                name: self.server_name.to_owned(),
                tenant: self.server_tenant.to_owned(),
                resource: self.server_resource.to_owned(),
                assurance: self.server_assurance.to_owned(),
            },
            tool: self.tool.map(str::to_owned),
            attestation: self.attestation,
            time: self.time,
            counters: self.counters,
            call: self.call.map(|(arguments, pii)| CallFacts {
                arguments: arguments.map(str::to_owned),
                pii: pii.clone(),
            }),
        }
    }
}

/// The context's numbers as Cedar sees them, in [`NUMBER_PATHS`] order: `time` (whole
/// seconds), `attestation.age_ms` (absent without a verified attestation),
/// `counters.calls_last_minute`, `counters.spend_micros`; each saturated at `i64::MAX`. The
/// context is built from these very values.
pub(super) fn context_numbers(req: &RequestKey<'_>) -> [Option<i64>; 4] {
    [
        Some(saturating_long(req.time.as_secs())),
        req.attestation.age_ms.map(saturating_long),
        Some(saturating_long(req.counters.calls_last_minute)),
        Some(saturating_long(req.counters.spend_micros)),
    ]
}

/// Where the numbers of [`context_numbers`] are in the context.
const NUMBER_PATHS: [&[&str]; 4] = [
    &["time"],
    &["attestation", "age_ms"],
    &["counters", "calls_last_minute"],
    &["counters", "spend_micros"],
];

/// The most distinct literal comparisons of one number kept as its key; past it the exact
/// value is the key.
const MAX_THRESHOLDS: usize = 64;

/// A comparison of a number with an integer literal, the number on the left.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Cmp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl Cmp {
    fn parse(op: &str) -> Option<Self> {
        Some(match op {
            "<" => Cmp::Lt,
            "<=" => Cmp::Le,
            ">" => Cmp::Gt,
            ">=" => Cmp::Ge,
            "==" => Cmp::Eq,
            "!=" => Cmp::Ne,
            _ => return None,
        })
    }

    /// The comparison with its operands swapped: `n < x` is `x > n`.
    fn swapped(self) -> Self {
        match self {
            Cmp::Lt => Cmp::Gt,
            Cmp::Le => Cmp::Ge,
            Cmp::Gt => Cmp::Lt,
            Cmp::Ge => Cmp::Le,
            Cmp::Eq => Cmp::Eq,
            Cmp::Ne => Cmp::Ne,
        }
    }

    fn holds(self, x: i64, n: i64) -> bool {
        match self {
            Cmp::Lt => x < n,
            Cmp::Le => x <= n,
            Cmp::Gt => x > n,
            Cmp::Ge => x >= n,
            Cmp::Eq => x == n,
            Cmp::Ne => x != n,
        }
    }
}

/// How a policy set reads one of the context's numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
enum NumberUse {
    /// Only in these comparisons with integer literals (none: not at all).
    Thresholds(Vec<(Cmp, i64)>),
    /// Some other way: the exact value matters.
    Exact,
}

/// How a policy set reads each of the context's numbers ([`NUMBER_PATHS`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct NumberUses([NumberUse; 4]);

impl Default for NumberUses {
    /// Read by no policy (the empty set).
    fn default() -> Self {
        Self(std::array::from_fn(|_| NumberUse::Thresholds(Vec::new())))
    }
}

/// What the memo keys one number by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Seen {
    /// Absent from the context (`attestation.age_ms` without an attestation).
    Absent,
    /// The value itself.
    Exact(i64),
    /// The outcomes of the set's comparisons of it, one bit each.
    Outcomes(u64),
}

impl NumberUses {
    /// Reads `set`'s policies. Any policy this cannot read makes every number exact.
    pub(super) fn of(set: &PolicySet) -> Self {
        let mut uses = Self::default();
        for policy in set.policies() {
            match policy.to_json() {
                Ok(json) => uses.visit(&json),
                Err(_) => return Self::exact(),
            }
        }
        for u in &mut uses.0 {
            if let NumberUse::Thresholds(t) = u {
                t.sort_unstable();
                t.dedup();
                if t.len() > MAX_THRESHOLDS {
                    *u = NumberUse::Exact;
                }
            }
        }
        uses
    }

    fn exact() -> Self {
        Self(std::array::from_fn(|_| NumberUse::Exact))
    }

    /// Walks an expression (or any JSON around one): every `{"Var": "context"}` it meets is
    /// either part of a form recognised here or makes something exact.
    fn visit(&mut self, v: &J) {
        match v {
            J::Array(items) => items.iter().for_each(|i| self.visit(i)),
            J::Object(map) => {
                if let (1, Some((op, inner))) = (map.len(), map.iter().next()) {
                    if let Some(cmp) = Cmp::parse(op)
                        && self.threshold(cmp, inner)
                    {
                        return;
                    }
                    match op.as_str() {
                        "." => {
                            if let Some(path) = context_path(v) {
                                self.read(&path);
                                return;
                            }
                        }
                        // Whether an attribute of the context is present: the key has every
                        // presence (only `attestation.age_ms` can be absent; `arguments`' are
                        // compared in full).
                        "has" if inner.get("left").and_then(context_path).is_some() => return,
                        "Var" if inner.as_str() == Some("context") => {
                            *self = Self::exact();
                            return;
                        }
                        _ => {}
                    }
                }
                map.values().for_each(|x| self.visit(x));
            }
            _ => {}
        }
    }

    /// Records `number CMP literal` (or `literal CMP number`) if `operands` is one.
    fn threshold(&mut self, cmp: Cmp, operands: &J) -> bool {
        let (Some(left), Some(right)) = (operands.get("left"), operands.get("right")) else {
            return false;
        };
        let literal = |e: &J| {
            e.as_object()
                .filter(|m| m.len() == 1)
                .and_then(|m| m.get("Value"))
                .and_then(J::as_i64)
        };
        let number = |e: &J| {
            let path = context_path(e)?;
            NUMBER_PATHS.iter().position(|p| *p == path.as_slice())
        };
        let (index, cmp, n) = match (number(left), literal(right), literal(left), number(right)) {
            (Some(i), Some(n), _, _) => (i, cmp, n),
            (_, _, Some(n), Some(i)) => (i, cmp.swapped(), n),
            _ => return false,
        };
        if let Some(NumberUse::Thresholds(t)) = self.0.get_mut(index) {
            t.push((cmp, n));
        }
        true
    }

    /// `path` of the context is read as a value: every number at, under or above it is exact.
    fn read(&mut self, path: &[&str]) {
        for (u, p) in self.0.iter_mut().zip(NUMBER_PATHS) {
            if p.starts_with(path) || path.starts_with(p) {
                *u = NumberUse::Exact;
            }
        }
    }

    fn seen(&self, numbers: [Option<i64>; 4]) -> [Seen; 4] {
        let mut out = [Seen::Absent; 4];
        for ((o, value), u) in out.iter_mut().zip(numbers).zip(&self.0) {
            *o = match (value, u) {
                (None, _) => Seen::Absent,
                (Some(x), NumberUse::Exact) => Seen::Exact(x),
                (Some(x), NumberUse::Thresholds(t)) => Seen::Outcomes(
                    t.iter()
                        .enumerate()
                        .filter(|(_, (cmp, n))| cmp.holds(x, *n))
                        .fold(0u64, |bits, (i, _)| bits | (1u64 << i)),
                ),
            };
        }
        out
    }
}

/// The context path an expression reads (`context.attestation.age_ms` is
/// `["attestation", "age_ms"]`, `context` itself `[]`), if it is one.
fn context_path(e: &J) -> Option<Vec<&str>> {
    let m = e.as_object().filter(|m| m.len() == 1)?;
    if let Some(var) = m.get("Var") {
        return (var.as_str() == Some("context")).then(Vec::new);
    }
    let dot = m.get(".")?;
    let mut path = context_path(dot.get("left")?)?;
    path.push(dot.get("attr")?.as_str()?);
    Some(path)
}

/// Writes every field of `key` but the context's numbers (which [`Seen`] compares) into `out`,
/// so that two keys write the same bytes exactly when those fields are equal: every text and
/// list is length-prefixed, every optional field tagged. Written with every field named, so
/// that a field added to the key is a compile error here until it is written.
fn encode(key: &RequestKey<'_>, out: &mut Vec<u8>) {
    fn text(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let RequestKey {
        agent,
        user,
        tenant,
        roles,
        issuer,
        action,
        server_id,
        server_name,
        server_tenant,
        server_resource,
        server_assurance,
        tool,
        attestation:
            AttestationFacts {
                verified,
                age_ms: _,
                pcr_match,
                debug,
            },
        time: _,
        counters:
            Counters {
                calls_last_minute: _,
                spend_micros: _,
            },
        call,
    } = key;
    out.clear();
    out.push(*action as u8);
    out.push(u8::from(*verified) | (u8::from(*pcr_match) << 1) | (u8::from(*debug) << 2));
    for s in [
        agent,
        user,
        tenant,
        issuer,
        server_id,
        server_name,
        server_tenant,
        server_resource,
        server_assurance,
    ] {
        text(out, s);
    }
    out.extend_from_slice(&(roles.len() as u64).to_le_bytes());
    for r in *roles {
        text(out, r);
    }
    match tool {
        None => out.push(0),
        Some(t) => {
            out.push(1);
            text(out, t);
        }
    }
    match call {
        None => out.push(0),
        Some((arguments, pii)) => {
            out.push(1);
            match arguments {
                None => out.push(0),
                Some(a) => {
                    out.push(1);
                    text(out, a);
                }
            }
            out.extend_from_slice(&(pii.len() as u64).to_le_bytes());
            for (kind, n) in *pii {
                text(out, kind);
                out.extend_from_slice(&n.to_le_bytes());
            }
        }
    }
}

/// The encoded fields ([`encode`]) and the numbers' key, hashed with a keyed hash: a log
/// cannot choose requests that share a bucket. Equal keys hash equally; within a bucket the
/// bytes are compared in full.
fn hash_key(state: &RandomState, encoded: &[u8], seen: &[Seen; 4]) -> u64 {
    let mut h = state.build_hasher();
    encoded.hash(&mut h);
    seen.hash(&mut h);
    h.finish()
}

thread_local! {
    /// Each thread's buffer for [`encode`]: a lookup allocates nothing.
    static ENCODED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One remembered answer.
struct Slot {
    /// The request's fields but its numbers, [`encode`]d: compact (one allocation, compared
    /// with one `memcmp`).
    key: Box<[u8]>,
    seen: [Seen; 4],
    decision: Arc<Decision>,
}

/// One generation of answers, by key hash.
#[derive(Default)]
struct Table {
    buckets: HashMap<u64, Vec<Slot>>,
    len: usize,
}

impl Table {
    fn position(&self, hash: u64, key: &[u8], seen: &[Seen; 4]) -> Option<usize> {
        self.buckets
            .get(&hash)?
            .iter()
            .position(|s| s.seen == *seen && *s.key == *key)
    }

    fn take(&mut self, hash: u64, at: usize) -> Option<Slot> {
        let bucket = self.buckets.get_mut(&hash)?;
        if at >= bucket.len() {
            return None;
        }
        let slot = bucket.swap_remove(at);
        if bucket.is_empty() {
            self.buckets.remove(&hash);
        }
        self.len -= 1;
        Some(slot)
    }

    fn push(&mut self, hash: u64, slot: Slot) {
        self.buckets.entry(hash).or_default().push(slot);
        self.len += 1;
    }
}

/// What the memo holds: the engine its answers are of, and two generations of them.
#[derive(Default)]
struct Inner {
    engine: Option<Arc<PolicyEngine>>,
    current: Table,
    old: Table,
    stats: MemoStats,
}

impl Inner {
    fn is_for(&self, engine: &Arc<PolicyEngine>) -> bool {
        self.engine.as_ref().is_some_and(|e| Arc::ptr_eq(e, engine))
    }

    fn get(
        &mut self,
        engine: &Arc<PolicyEngine>,
        hash: u64,
        req: &[u8],
        seen: &[Seen; 4],
        capacity: usize,
    ) -> Option<Arc<Decision>> {
        if !self.is_for(engine) {
            return None;
        }
        if let Some(at) = self.current.position(hash, req, seen) {
            return self
                .current
                .buckets
                .get(&hash)
                .and_then(|b| b.get(at))
                .map(|s| Arc::clone(&s.decision));
        }
        let at = self.old.position(hash, req, seen)?;
        let slot = self.old.take(hash, at)?;
        let decision = Arc::clone(&slot.decision);
        self.push(hash, slot, capacity);
        Some(decision)
    }

    fn insert(&mut self, engine: &Arc<PolicyEngine>, hash: u64, slot: Slot, capacity: usize) {
        if !self.is_for(engine) {
            // Answers of another engine are never given for this one: forget them.
            self.engine = Some(Arc::clone(engine));
            self.current = Table::default();
            self.old = Table::default();
        }
        // Another thread may have answered the same request meanwhile.
        if self.current.position(hash, &slot.key, &slot.seen).is_none() {
            self.push(hash, slot, capacity);
        }
    }

    fn push(&mut self, hash: u64, slot: Slot, capacity: usize) {
        if self.current.len >= capacity {
            self.old = std::mem::take(&mut self.current);
        }
        self.current.push(hash, slot);
    }
}

/// How often a [`DecisionMemo`] answered from memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoStats {
    /// Requests answered from memory.
    pub hits: u64,
    /// Requests Cedar evaluated.
    pub misses: u64,
}

/// A bounded memo of Cedar decisions, shared by the threads of a replay (see the module
/// documentation for what its key holds and why its answers are exactly Cedar's).
pub struct DecisionMemo {
    inner: Mutex<Inner>,
    hasher: RandomState,
    capacity: usize,
}

impl fmt::Debug for DecisionMemo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecisionMemo")
            .field("capacity", &self.capacity)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Default for DecisionMemo {
    fn default() -> Self {
        Self::new()
    }
}

impl DecisionMemo {
    /// Answers per generation of [`DecisionMemo::new`]. When an answer held the whole request
    /// (about 2.7 KiB of heap with its strings and the tables), two generations of 8,192 took
    /// a replay of a log whose requests all differ from 36 to 82 MiB peak RSS, against a bound
    /// of 64; of 2,048, to 47 MiB, but the benchmark's world of about 3,800 distinct requests
    /// then no longer fits (75 % answered from memory instead of 97 %). An answer now holds
    /// the request's encoded fields (a few hundred bytes): 42 MiB on that log at 4,096.
    pub const DEFAULT_CAPACITY: usize = 4096;

    /// An empty memo of [`DecisionMemo::DEFAULT_CAPACITY`] answers per generation.
    pub fn new() -> Self {
        Self::with_capacity(Self::DEFAULT_CAPACITY)
    }

    /// An empty memo of `capacity` answers per generation (at least one).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            hasher: RandomState::new(),
            capacity: capacity.max(1),
        }
    }

    /// `engine.decide(req)`, answered from memory when the memo holds an answer of `engine`
    /// for a request Cedar cannot tell from `req`.
    pub fn decide(&self, engine: &Arc<PolicyEngine>, req: &DecisionRequest) -> Decision {
        let key = req.key();
        let seen = engine.numbers.seen(context_numbers(&key));
        let (hash, found, encoded) = ENCODED.with_borrow_mut(|buf| {
            encode(&key, buf);
            let hash = hash_key(&self.hasher, buf, &seen);
            let found = self.inner.lock().ok().map(|mut inner| {
                let hit = inner.get(engine, hash, buf, &seen, self.capacity);
                match hit {
                    Some(_) => inner.stats.hits += 1,
                    None => inner.stats.misses += 1,
                }
                hit
            });
            // Kept only for an answer to remember.
            let encoded = matches!(found, Some(None)).then(|| buf.as_slice().into());
            (hash, found, encoded)
        });
        if let Some(Some(d)) = found {
            return Decision::clone(&d);
        }
        let decision = engine.decide(req);
        if let (Some(key), Ok(mut inner)) = (encoded, self.inner.lock()) {
            let slot = Slot {
                key,
                seen,
                decision: Arc::new(decision.clone()),
            };
            inner.insert(engine, hash, slot, self.capacity);
        }
        decision
    }

    /// The memo's answer of `engine` for a request Cedar cannot tell from `key`, if it holds
    /// one. Not counted: the caller counts the answers it used ([`DecisionMemo::answered`]);
    /// one it could not use, or a `None`, it leaves to [`DecisionMemo::decide`], which counts
    /// what it does.
    pub(crate) fn lookup(
        &self,
        engine: &Arc<PolicyEngine>,
        key: &RequestKey<'_>,
    ) -> Option<Arc<Decision>> {
        let seen = engine.numbers.seen(context_numbers(key));
        ENCODED.with_borrow_mut(|buf| {
            encode(key, buf);
            let hash = hash_key(&self.hasher, buf, &seen);
            let mut inner = self.inner.lock().ok()?;
            inner.get(engine, hash, buf, &seen, self.capacity)
        })
    }

    /// Counts `n` requests answered from memory through [`DecisionMemo::lookup`].
    pub(crate) fn answered(&self, n: u64) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.stats.hits += n;
        }
    }

    /// Hits and misses so far.
    pub fn stats(&self) -> MemoStats {
        self.inner.lock().map(|i| i.stats).unwrap_or_default()
    }

    /// Answers held now (both generations).
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .map(|i| i.current.len + i.old.len)
            .unwrap_or(0)
    }

    /// Whether it holds no answer.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::policy::{Action, CallFacts};
    use crate::time::UnixMillis;

    const T: u64 = 1_700_000_000;

    /// The policy tests' request, with the call's facts.
    fn request() -> DecisionRequest {
        DecisionRequest {
            call: Some(CallFacts::default()),
            ..crate::policy::tests::request(Action::Call)
        }
    }

    fn engine(text: &str) -> Arc<PolicyEngine> {
        Arc::new(PolicyEngine::new(text).unwrap_or_else(|e| panic!("{text}: {e}")))
    }

    fn uses(text: &str) -> NumberUses {
        let set: PolicySet = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
        NumberUses::of(&set)
    }

    /// Decides `requests` in order through one memo and directly: the answers must be equal,
    /// the verdict must flip somewhere (else the sequence could not catch a memo that answers
    /// the wrong request), and the memo must have answered some from memory (else it was not
    /// tested). Returns the memo's stats.
    fn agrees(engine: &Arc<PolicyEngine>, requests: &[DecisionRequest]) -> MemoStats {
        let memo = DecisionMemo::new();
        let mut verdicts = std::collections::BTreeSet::new();
        for (i, req) in requests.iter().enumerate() {
            let direct = engine.decide(req);
            assert_eq!(memo.decide(engine, req), direct, "request {i}: {req:?}");
            verdicts.insert(direct.allowed);
        }
        assert_eq!(verdicts.len(), 2, "no request flipped the verdict");
        let stats = memo.stats();
        assert!(
            stats.hits > 0,
            "nothing was answered from memory: {stats:?}"
        );
        stats
    }

    #[test]
    fn numbers_compared_only_with_literals_are_keyed_by_the_outcomes() {
        let u = uses(
            r#"permit(principal, action, resource) when { context.time > 1700000000 };
               permit(principal, action, resource) when { 600 > context.counters.calls_last_minute };
               permit(principal, action, resource) when {
                   context.attestation has age_ms && context.attestation.age_ms <= 60000 };
               permit(principal, action, resource) when {
                   if context.attestation.verified then context.time != 5 else false };"#,
        );
        assert_eq!(
            u,
            NumberUses([
                NumberUse::Thresholds(vec![(Cmp::Gt, 1_700_000_000), (Cmp::Ne, 5)]),
                NumberUse::Thresholds(vec![(Cmp::Le, 60_000)]),
                NumberUse::Thresholds(vec![(Cmp::Lt, 600)]),
                NumberUse::Thresholds(Vec::new()),
            ])
        );
        let t = |x: u64| {
            let mut r = request();
            r.time = UnixMillis::from_millis(x);
            u.seen(context_numbers(&r.key()))
        };
        // Milliseconds Cedar never sees, and seconds on the same side of every literal.
        assert_eq!(t(T * 1000 + 1), t(T * 1000 + 999));
        assert_eq!(t((T + 1) * 1000), t((T + 9) * 1000));
        assert_ne!(t(T * 1000), t((T + 1) * 1000));
    }

    #[test]
    fn numbers_read_any_other_way_are_keyed_exactly() {
        let exact = |text: &str, which: &[usize]| {
            let u = uses(text);
            for (i, use_) in u.0.iter().enumerate() {
                assert_eq!(
                    *use_ == NumberUse::Exact,
                    which.contains(&i),
                    "{text}: number {i} is {use_:?}"
                );
            }
        };
        exact(
            "permit(principal, action, resource) when { context.time + 1 > 5 };",
            &[0],
        );
        exact(
            "permit(principal, action, resource) when { context.time == context.counters.spend_micros };",
            &[0, 3],
        );
        exact(
            r#"permit(principal, action, resource) when {
                   context.counters == {"calls_last_minute": 1, "spend_micros": 0} };"#,
            &[2, 3],
        );
        exact(
            "permit(principal, action, resource) when { [context.time, 1].contains(5) };",
            &[0],
        );
        exact(
            "permit(principal, action, resource) when { context.time > -5 };",
            &[],
        );
        exact(
            r#"permit(principal, action, resource) when { context.attestation == context.attestation };"#,
            &[1],
        );
        exact(
            "permit(principal, action, resource) when { context == context };",
            &[0, 1, 2, 3],
        );
        exact(
            r#"permit(principal, action, resource) when { context.time > "x" };"#,
            &[0],
        );
        exact(
            "permit(principal, action, resource) when { (if true then context else context).time > 5 };",
            &[0, 1, 2, 3],
        );
        // A comparison with more literals than the key keeps.
        let many: String = (0..=MAX_THRESHOLDS)
            .map(|i| format!("permit(principal, action, resource) when {{ context.time == {i} }};"))
            .collect();
        exact(&many, &[0]);
    }

    #[test]
    fn a_policy_reading_the_time_flips_a_later_decision() {
        let e =
            engine(r#"permit(principal, action, resource) when { context.time > 1700000000 };"#);
        let at = |ms: u64| {
            let mut r = request();
            r.time = UnixMillis::from_millis(ms);
            r
        };
        let s = agrees(
            &e,
            &[
                at(T * 1000),
                at(T * 1000 + 999),
                at(T * 1000 + 1000),
                at(T * 1000 + 5000),
                at(T * 1000 - 1),
            ],
        );
        assert_eq!(s, MemoStats { hits: 3, misses: 2 });
        // Read some other way, every second is its own key.
        let exact = engine(
            r#"permit(principal, action, resource) when { context.time - 1 == 1700000000 };"#,
        );
        agrees(
            &exact,
            &[
                at(T * 1000),
                at(T * 1000 + 1),
                at((T + 1) * 1000),
                at(T * 1000),
            ],
        );
    }

    #[test]
    fn a_policy_reading_a_counter_flips_a_later_decision() {
        let e = engine(
            r#"permit(principal, action, resource);
               forbid(principal, action, resource) unless { context.counters.calls_last_minute < 600 };"#,
        );
        let calls = |n: u64| {
            let mut r = request();
            r.counters.calls_last_minute = n;
            r
        };
        agrees(
            &e,
            &[calls(0), calls(599), calls(600), calls(u64::MAX), calls(1)],
        );
        let record = engine(
            r#"permit(principal, action, resource) when {
                   context.counters == {"calls_last_minute": 5, "spend_micros": 0} };"#,
        );
        agrees(&record, &[calls(5), calls(6), calls(5)]);
        let spend = engine(
            r#"permit(principal, action, resource) when { context.counters.spend_micros * 2 < 10 };"#,
        );
        let spent = |n: u64| {
            let mut r = request();
            r.counters.spend_micros = n;
            r
        };
        agrees(&spend, &[spent(4), spent(5), spent(4)]);
    }

    #[test]
    fn an_attestation_age_or_its_absence_flips_a_later_decision() {
        let e = engine(
            r#"permit(principal, action, resource) when {
                   context.attestation has age_ms && context.attestation.age_ms < 60000 };"#,
        );
        let aged = |age: Option<u64>, verified: bool| {
            let mut r = request();
            r.attestation.age_ms = age;
            r.attestation.verified = verified;
            r
        };
        agrees(
            &e,
            &[
                aged(Some(0), true),
                aged(Some(59_999), true),
                aged(Some(60_000), true),
                aged(None, true),
                aged(Some(1), true),
            ],
        );
        let verified =
            engine(r#"permit(principal, action, resource) when { context.attestation.verified };"#);
        agrees(
            &verified,
            &[
                aged(Some(1), true),
                aged(Some(1), false),
                aged(Some(1), true),
            ],
        );
    }

    #[test]
    fn a_call_argument_or_its_pii_flips_a_later_decision() {
        let e = engine(
            r#"@arguments("amount: Long")
               permit(principal, action == Attestplane::Action::"call", resource) when {
                   context.arguments has amount && context.arguments.amount <= 100 &&
                   context.pii.count == 0 };"#,
        );
        let call = |args: &str, pii: u64| {
            let mut r = request();
            r.call = Some(CallFacts {
                arguments: Some(args.into()),
                pii: if pii > 0 {
                    BTreeMap::from([("email".to_owned(), pii)])
                } else {
                    BTreeMap::new()
                },
            });
            r
        };
        agrees(
            &e,
            &[
                call(r#"{"amount":100}"#, 0),
                call(r#"{"amount":101}"#, 0),
                call(r#"{"amount":100}"#, 1),
                call(r#"{"amount":100}"#, 0),
            ],
        );
    }

    #[test]
    fn an_identity_provider_or_registry_change_flips_a_later_decision() {
        let e = engine(
            r#"permit(principal, action, resource is Attestplane::Tool) when {
                   principal.roles.contains("tool-user") && resource.server.name == "files" &&
                   context.server_assurance == "nitro" };"#,
        );
        let base = request();
        let mut roles = request();
        roles.principal.roles = vec!["viewer".into()];
        let mut renamed = request();
        renamed.server.name = "other".into();
        let mut plain = request();
        plain.server.assurance = "none".into();
        let mut item = request();
        item.tool = Some("write".into());
        agrees(
            &e,
            &[
                base.clone(),
                roles,
                base.clone(),
                renamed,
                plain,
                item,
                base,
            ],
        );
    }

    #[test]
    fn a_policy_reinstall_flips_a_later_decision() {
        let allow = engine("permit(principal, action, resource);");
        let deny =
            engine("permit(principal, action, resource); forbid(principal, action, resource);");
        let memo = DecisionMemo::new();
        let req = request();
        assert!(memo.decide(&allow, &req).allowed);
        assert!(memo.decide(&allow, &req).allowed);
        // The same text installed again is another engine: answers are not carried over.
        let again = engine("permit(principal, action, resource);");
        assert!(memo.decide(&again, &req).allowed);
        assert!(!memo.decide(&deny, &req).allowed);
        assert!(memo.decide(&allow, &req).allowed);
        assert_eq!(memo.stats(), MemoStats { hits: 1, misses: 4 });
    }

    #[test]
    fn memory_stays_bounded_and_old_answers_stay_right() {
        let e = engine(
            r#"permit(principal, action, resource) when { principal.roles.contains("even") };"#,
        );
        let memo = DecisionMemo::with_capacity(4);
        for round in 0..3 {
            for i in 0..20u32 {
                let mut r = request();
                r.principal.agent = format!("agent-{i}");
                r.principal.roles = if i % 2 == 0 {
                    vec!["even".into()]
                } else {
                    vec![]
                };
                assert_eq!(
                    memo.decide(&e, &r),
                    e.decide(&r),
                    "round {round}, agent {i}"
                );
                assert!(memo.len() <= 8, "{} answers held", memo.len());
            }
        }
        // A request seen just before is answered from memory, through the old generation too.
        let before = memo.stats();
        for i in [19u32, 18, 17, 16, 15] {
            let mut r = request();
            r.principal.agent = format!("agent-{i}");
            r.principal.roles = if i % 2 == 0 {
                vec!["even".into()]
            } else {
                vec![]
            };
            assert_eq!(memo.decide(&e, &r), e.decide(&r));
        }
        assert_eq!(memo.stats().hits - before.hits, 5);
    }

    /// Random requests over small domains against sets reading the numbers every way: the
    /// memo (small, so that it evicts) always answers what Cedar answers.
    #[test]
    fn memo_answers_equal_cedar_answers_on_random_requests() {
        let sets = [
            r#"permit(principal, action, resource) when { context.time > 1700000002 };
               forbid(principal, action, resource) when { context.counters.calls_last_minute >= 3 };"#,
            r#"permit(principal, action, resource) when {
                   context.attestation has age_ms && context.attestation.age_ms < 2 };
               forbid(principal, action, resource) when { context.time == 1700000001 };"#,
            r#"permit(principal, action, resource) when { context.counters.calls_last_minute + 1 < 3 };
               permit(principal, action, resource) when { principal.roles.contains("a") };"#,
            r#"permit(principal, action, resource) when {
                   context.counters == {"calls_last_minute": 1, "spend_micros": 2} };"#,
        ];
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for text in sets {
            let e = engine(text);
            let memo = DecisionMemo::with_capacity(16);
            for _ in 0..2_000 {
                let mut r = request();
                r.time = UnixMillis::from_millis((T + next(4)) * 1000 + next(1000));
                r.counters.calls_last_minute = next(5);
                r.counters.spend_micros = next(3);
                r.attestation.age_ms = [None, Some(0), Some(1), Some(2), Some(3)]
                    .get(next(5) as usize)
                    .copied()
                    .flatten();
                r.principal.roles = [vec![], vec!["a".to_owned()]]
                    .get(next(2) as usize)
                    .cloned()
                    .unwrap_or_default();
                r.principal.agent = format!("agent-{}", next(3));
                assert_eq!(memo.decide(&e, &r), e.decide(&r), "{text}: {r:?}");
            }
            assert!(memo.stats().hits > 0, "{text}: {:?}", memo.stats());
        }
    }

    #[test]
    fn the_encoding_tells_apart_requests_that_differ_in_any_field_but_the_numbers() {
        let base = request();
        let bytes = |r: &DecisionRequest| {
            let mut out = Vec::new();
            encode(&r.key(), &mut out);
            out
        };
        let same = {
            let mut r = request();
            r.time = UnixMillis::from_millis(5);
            r.counters.calls_last_minute = 9;
            r.counters.spend_micros = 9;
            r.attestation.age_ms = Some(123_456);
            r
        };
        assert_eq!(bytes(&base), bytes(&same));
        let changes: Vec<fn(&mut DecisionRequest)> = vec![
            |r| r.principal.agent.push('x'),
            |r| r.principal.user.push('x'),
            |r| r.principal.tenant.push('x'),
            |r| r.principal.roles.push("x".into()),
            |r| r.principal.issuer.push('x'),
            |r| r.action = Action::Resolve,
            |r| r.server.id.push('x'),
            |r| r.server.name.push('x'),
            |r| r.server.tenant.push('x'),
            |r| r.server.resource.push('x'),
            |r| r.server.assurance.push('x'),
            |r| r.tool = None,
            |r| r.tool = Some(String::new()),
            |r| r.attestation.verified = !r.attestation.verified,
            |r| r.attestation.pcr_match = !r.attestation.pcr_match,
            |r| r.attestation.debug = !r.attestation.debug,
            |r| r.call = None,
            |r| {
                r.call = Some(CallFacts {
                    arguments: Some("{}".into()),
                    pii: BTreeMap::new(),
                })
            },
            |r| {
                r.call = Some(CallFacts {
                    arguments: None,
                    pii: BTreeMap::from([("email".to_owned(), 1)]),
                })
            },
            // The same characters split otherwise between two fields.
            |r| {
                r.principal.agent.push('x');
                r.principal.user.insert(0, 'x');
            },
        ];
        let base_bytes = bytes(&base);
        for (i, change) in changes.iter().enumerate() {
            let mut r = request();
            change(&mut r);
            if r == base {
                continue;
            }
            assert_ne!(bytes(&r), base_bytes, "change {i}: {r:?}");
        }
        let split = |roles: &[&str]| {
            let mut r = request();
            r.principal.roles = roles.iter().map(|s| s.to_string()).collect();
            bytes(&r)
        };
        assert_ne!(split(&["ab", "c"]), split(&["a", "bc"]));
        assert_ne!(split(&["ab"]), split(&["a", "b"]));
    }
}
