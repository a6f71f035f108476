//! Per-call receipts: what an MCP server checks before it runs a tool, so that only calls the
//! control plane decided (and logged) reach it, with exactly the arguments it decided on.
//!
//! A receipt is a compact JWS (EdDSA) signed by the control plane's epoch key, explicitly typed
//! `attestplane-receipt+jwt` (RFC 8725 §3.11), so a handle or an agent token is never accepted as
//! a receipt and a receipt never as either. Its claims:
//!
//! | claim | meaning |
//! |---|---|
//! | `iss` | the control plane |
//! | `aud` | the server's registered resource URI |
//! | `sub`, `usr`, `ten` | agent, user, tenant |
//! | `mth` | the JSON-RPC method (`tools/call`) |
//! | `tool` | the tool name |
//! | `args` | base64url SHA-256 of the RFC 8785 canonical JSON of the arguments as forwarded |
//! | `def` | base64url of the tool's pinned digest |
//! | `jti` | 128 random bits (hex) |
//! | `iat`, `exp` | seconds; `exp - iat` at most [`MAX_RECEIPT_LIFETIME_SECS`] |
//! | `seq` | the log entry that decided the call |
//!
//! The gateway sends it in the `Attestplane-Receipt` header and in
//! `params._meta["io.attestplane/receipt"]` (which works over stdio too).
//!
//! A server checks it with a [`ReceiptVerifier`] (or the one-shot [`verify_receipt`]): the key
//! is the control plane's *attested* epoch key (from a verified attestation document,
//! [`attested_key`]), never a JWKS the host merely serves; the audience is its own resource URI;
//! method, tool and the hash of the arguments it received must match; the time is the server's,
//! a parameter; and a [`ReplayCache`] refuses a `jti` seen before its expiry. A server builds
//! its `ReceiptVerifier` once per key: preparing a key (decompressing the point, checking it is
//! canonical and of prime order) costs about as much as checking a signature, and
//! [`verify_receipt`] pays it on every call. Canonical JSON makes the argument hash independent of
//! whitespace, key order and number spelling, so the server hashes what it parsed, not bytes a
//! framework may have re-serialised.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer, VerifyingKey};
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

use crate::UnixMillis;
use crate::attestation::VerifiedAttestation;
use crate::handle::{HandleError, Jwks, verify_jws_typed};

use super::jcs;

/// The JWS `typ` of a receipt.
pub const RECEIPT_TYP: &str = "attestplane-receipt+jwt";

/// The HTTP header a receipt travels in.
pub const RECEIPT_HEADER: &str = "Attestplane-Receipt";

/// The longest a receipt may live.
pub const MAX_RECEIPT_LIFETIME_SECS: u64 = 60;

/// Clock skew a verifier allows on `iat` and `exp`.
pub const RECEIPT_LEEWAY_SECS: u64 = 5;

/// Why a receipt was refused. Messages carry no secret (a receipt is not one, but arguments
/// may be: only their hashes appear).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ReceiptError {
    /// No receipt came with the call.
    #[error("the call carries no receipt")]
    Missing,
    /// The JWS layer did not verify (shape, type, key, signature).
    #[error("receipt rejected: {0}")]
    Jws(#[from] HandleError),
    /// A claim is missing or has the wrong type.
    #[error("receipt claim {0} is missing or malformed")]
    Claim(&'static str),
    /// The receipt is for another server.
    #[error("receipt is for audience {found:?}, not {expected:?}")]
    WrongAudience {
        /// This server's resource URI.
        expected: String,
        /// The receipt's.
        found: String,
    },
    /// The receipt is for another method or tool.
    #[error("receipt is for {found_method} {found_tool:?}, not {method} {tool:?}")]
    WrongCall {
        /// The method received.
        method: String,
        /// The tool received.
        tool: String,
        /// The receipt's method.
        found_method: String,
        /// The receipt's tool.
        found_tool: String,
    },
    /// The arguments received are not the ones decided.
    #[error("receipt is for other arguments (hash {expected}, received {found})")]
    OtherArguments {
        /// The receipt's `args`.
        expected: String,
        /// The hash of the arguments received.
        found: String,
    },
    /// The arguments are not JSON the canonicaliser accepts.
    #[error("arguments cannot be canonicalised: {0}")]
    Arguments(String),
    /// Expired (at the verifier's time, with leeway).
    #[error("receipt expired at {exp} (now {now})")]
    Expired {
        /// The receipt's `exp`.
        exp: u64,
        /// The verifier's time, seconds.
        now: u64,
    },
    /// Issued in the future.
    #[error("receipt issued at {iat}, after now ({now})")]
    NotYetValid {
        /// The receipt's `iat`.
        iat: u64,
        /// The verifier's time, seconds.
        now: u64,
    },
    /// Lives longer than [`MAX_RECEIPT_LIFETIME_SECS`] or expires before it is issued.
    #[error("receipt lifetime iat {iat} to exp {exp} is not allowed")]
    Lifetime {
        /// `iat`.
        iat: u64,
        /// `exp`.
        exp: u64,
    },
    /// Its `jti` was seen before.
    #[error("receipt {jti} was already used")]
    Replayed {
        /// The `jti`.
        jti: String,
    },
    /// The replay cache is full of unexpired receipts: refuse rather than forget one.
    #[error("too many receipts in flight")]
    CacheFull,
}

/// A receipt's claims.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReceiptClaims {
    /// The control plane.
    pub iss: String,
    /// The server's resource URI.
    pub aud: String,
    /// The agent.
    pub sub: String,
    /// The user.
    pub usr: String,
    /// The tenant.
    pub ten: String,
    /// The method.
    pub mth: String,
    /// The tool.
    pub tool: String,
    /// base64url SHA-256 of the canonical arguments.
    pub args: String,
    /// base64url of the pinned tool digest.
    pub def: String,
    /// 128 random bits, hex.
    pub jti: String,
    /// Issued at, seconds.
    pub iat: u64,
    /// Expires at, seconds.
    pub exp: u64,
    /// The deciding log entry.
    pub seq: u64,
}

/// base64url SHA-256 of the RFC 8785 canonical form of `arguments` (JSON text; `None` hashes
/// as `{}`).
pub fn arguments_hash(arguments: Option<&str>) -> Result<String, ReceiptError> {
    arguments_digest(arguments).map(|d| URL_SAFE_NO_PAD.encode(d))
}

/// SHA-256 of the RFC 8785 canonical form of `arguments` (`None` hashes as `{}`): the bytes
/// [`arguments_hash`] encodes, and what a call's decision entry records.
pub fn arguments_digest(arguments: Option<&str>) -> Result<[u8; 32], ReceiptError> {
    let canonical = jcs::canonicalize(arguments.unwrap_or("{}"))
        .map_err(|e| ReceiptError::Arguments(e.to_string()))?;
    Ok(Sha256::digest(canonical.as_bytes()).into())
}

/// Encodes and signs a receipt under key id `kid`.
pub fn encode_receipt<S: Signer<Signature>>(
    claims: &ReceiptClaims,
    kid: &str,
    signer: &S,
) -> Result<String, ReceiptError> {
    if claims.exp <= claims.iat || claims.exp - claims.iat > MAX_RECEIPT_LIFETIME_SECS {
        return Err(ReceiptError::Lifetime {
            iat: claims.iat,
            exp: claims.exp,
        });
    }
    Ok(crate::handle::encode_jws_typed(
        claims,
        RECEIPT_TYP,
        kid,
        signer,
    )?)
}

/// The control plane's epoch key from its verified attestation document: the only key a
/// server should check receipts with.
pub fn attested_key(document: &VerifiedAttestation) -> Option<VerifyingKey> {
    let raw: [u8; 32] = document.public_key()?.try_into().ok()?;
    VerifyingKey::from_bytes(&raw).ok()
}

/// What the server received, to check a receipt against.
#[derive(Clone, Copy, Debug)]
pub struct ReceivedCall<'a> {
    /// The server's own resource URI.
    pub audience: &'a str,
    /// The JSON-RPC method.
    pub method: &'a str,
    /// The tool name (`params.name`).
    pub tool: &'a str,
    /// `params.arguments` as JSON text, if present.
    pub arguments: Option<&'a str>,
}

/// A receipt that checked out. Only [`verify_receipt`] makes one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedReceipt {
    claims: ReceiptClaims,
}

impl VerifiedReceipt {
    /// The verified claims.
    pub fn claims(&self) -> &ReceiptClaims {
        &self.claims
    }
}

/// Receipts seen and not yet expired, bounded.
///
/// Expired receipts are dropped as the cache's time advances (each `jti` is queued by expiry
/// when recorded and dropped once, so the cost is amortised over the receipts recorded), not
/// only once the cache is full: a busy server's cache holds about a receipt lifetime's worth of
/// calls. The cache's time is the latest `now` it was given and never goes back: a receipt that
/// has expired by that time is refused even when a later call is checked at an earlier time
/// (otherwise a clock stepped back could replay a receipt whose `jti` was already dropped).
#[derive(Debug)]
pub struct ReplayCache {
    seen: HashSet<Arc<str>>,
    /// The same receipts by expiry, earliest first.
    by_expiry: BinaryHeap<Reverse<(u64, Arc<str>)>>,
    capacity: usize,
    /// The latest time (seconds) the cache was given.
    horizon: u64,
}

impl ReplayCache {
    /// A cache holding at most `capacity` unexpired receipts.
    pub fn new(capacity: usize) -> Self {
        Self {
            seen: HashSet::new(),
            by_expiry: BinaryHeap::new(),
            capacity,
            horizon: 0,
        }
    }

    /// The receipts held (recorded and not yet dropped as expired).
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether the cache holds no receipt.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Drops the receipts expired at the cache's time (with leeway: a receipt is dropped only
    /// once no verifier at that time would accept it).
    fn prune(&mut self) {
        while let Some(Reverse((exp, _))) = self.by_expiry.peek() {
            if exp.saturating_add(RECEIPT_LEEWAY_SECS) >= self.horizon {
                break;
            }
            if let Some(Reverse((_, jti))) = self.by_expiry.pop() {
                self.seen.remove(&jti);
            }
        }
    }

    /// Records `jti` (valid until `exp`, seconds) at `now_s`; refuses one already recorded,
    /// one expired at the cache's time, and any once the cache holds `capacity` unexpired
    /// receipts.
    fn record(&mut self, jti: &str, exp: u64, now_s: u64) -> Result<(), ReceiptError> {
        self.horizon = self.horizon.max(now_s);
        self.prune();
        if self.seen.contains(jti) {
            return Err(ReceiptError::Replayed {
                jti: jti.to_owned(),
            });
        }
        if self.horizon >= exp.saturating_add(RECEIPT_LEEWAY_SECS) {
            return Err(ReceiptError::Expired {
                exp,
                now: self.horizon,
            });
        }
        if self.seen.len() >= self.capacity {
            return Err(ReceiptError::CacheFull);
        }
        let jti: Arc<str> = Arc::from(jti);
        self.seen.insert(Arc::clone(&jti));
        self.by_expiry.push(Reverse((exp, jti)));
        Ok(())
    }
}

fn text(claims: &Map<String, Value>, name: &'static str) -> Result<String, ReceiptError> {
    match claims.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(ReceiptError::Claim(name)),
    }
}

fn secs(claims: &Map<String, Value>, name: &'static str) -> Result<u64, ReceiptError> {
    claims
        .get(name)
        .and_then(Value::as_u64)
        .ok_or(ReceiptError::Claim(name))
}

/// Checks receipts with one key, prepared once: the control plane's attested epoch key,
/// decoded and checked (canonical, prime order) when the verifier is built rather than on every
/// call. Build one per key (a new epoch has a new key) and share it; the replay cache is the
/// caller's, so several verifiers may share one or not.
#[derive(Clone, Debug)]
pub struct ReceiptVerifier {
    /// The key alone, under its key id.
    jwks: Jwks,
}

impl ReceiptVerifier {
    /// A verifier for receipts signed by `key`. Refused: a key that is not canonical or not of
    /// prime order (the same rules as every key the verifier accepts).
    pub fn new(key: &VerifyingKey) -> Result<Self, ReceiptError> {
        let kid = crate::entry::KeyId::of(key).to_hex();
        let jwks = Jwks::from_keys([(kid, *key)]).map_err(ReceiptError::Jws)?;
        Ok(Self { jwks })
    }

    /// Verifies `token` for `call` at `now`, recording it in `replay`. Every check runs
    /// before the receipt is recorded, so a refused receipt does not use up its `jti`.
    pub fn verify(
        &self,
        token: &str,
        call: &ReceivedCall<'_>,
        now: UnixMillis,
        replay: &mut ReplayCache,
    ) -> Result<VerifiedReceipt, ReceiptError> {
        let (_, c) = verify_jws_typed(token, &self.jwks, Some(RECEIPT_TYP))?;
        let claims = ReceiptClaims {
            iss: text(&c, "iss")?,
            aud: text(&c, "aud")?,
            sub: text(&c, "sub")?,
            usr: text(&c, "usr")?,
            ten: text(&c, "ten")?,
            mth: text(&c, "mth")?,
            tool: text(&c, "tool")?,
            args: text(&c, "args")?,
            def: text(&c, "def")?,
            jti: text(&c, "jti")?,
            iat: secs(&c, "iat")?,
            exp: secs(&c, "exp")?,
            seq: secs(&c, "seq")?,
        };
        if claims.aud != call.audience {
            return Err(ReceiptError::WrongAudience {
                expected: call.audience.to_owned(),
                found: claims.aud,
            });
        }
        if claims.mth != call.method || claims.tool != call.tool {
            return Err(ReceiptError::WrongCall {
                method: call.method.to_owned(),
                tool: call.tool.to_owned(),
                found_method: claims.mth,
                found_tool: claims.tool,
            });
        }
        let found = arguments_hash(call.arguments)?;
        if found != claims.args {
            return Err(ReceiptError::OtherArguments {
                expected: claims.args,
                found,
            });
        }
        if claims.exp <= claims.iat || claims.exp - claims.iat > MAX_RECEIPT_LIFETIME_SECS {
            return Err(ReceiptError::Lifetime {
                iat: claims.iat,
                exp: claims.exp,
            });
        }
        let now_s = now.as_secs();
        if now_s >= claims.exp.saturating_add(RECEIPT_LEEWAY_SECS) {
            return Err(ReceiptError::Expired {
                exp: claims.exp,
                now: now_s,
            });
        }
        if now_s.saturating_add(RECEIPT_LEEWAY_SECS) < claims.iat {
            return Err(ReceiptError::NotYetValid {
                iat: claims.iat,
                now: now_s,
            });
        }
        replay.record(&claims.jti, claims.exp, now_s)?;
        Ok(VerifiedReceipt { claims })
    }
}

/// Verifies `token` for `call` with the control plane's attested key at `now`, recording it
/// in `replay`: [`ReceiptVerifier::verify`] with a verifier built for this one call. A server
/// that checks more than one receipt keeps a [`ReceiptVerifier`] instead.
pub fn verify_receipt(
    token: &str,
    key: &VerifyingKey,
    call: &ReceivedCall<'_>,
    now: UnixMillis,
    replay: &mut ReplayCache,
) -> Result<VerifiedReceipt, ReceiptError> {
    ReceiptVerifier::new(key)?.verify(token, call, now, replay)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    const T: u64 = 1_800_000_000;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[5; 32])
    }

    fn claims(args: Option<&str>) -> ReceiptClaims {
        ReceiptClaims {
            iss: "attestplane".into(),
            aud: "https://weather.example/mcp".into(),
            sub: "agent-7".into(),
            usr: "alice".into(),
            ten: "acme".into(),
            mth: "tools/call".into(),
            tool: "add".into(),
            args: arguments_hash(args).unwrap(),
            def: URL_SAFE_NO_PAD.encode([1u8; 32]),
            jti: "00112233445566778899aabbccddeeff".into(),
            iat: T,
            exp: T + 30,
            seq: 42,
        }
    }

    fn call<'a>(args: Option<&'a str>) -> ReceivedCall<'a> {
        ReceivedCall {
            audience: "https://weather.example/mcp",
            method: "tools/call",
            tool: "add",
            arguments: args,
        }
    }

    fn at(s: u64) -> UnixMillis {
        UnixMillis::from_millis(s * 1000)
    }

    fn kid() -> String {
        crate::entry::KeyId::of(&key().verifying_key()).to_hex()
    }

    fn token(c: &ReceiptClaims) -> String {
        encode_receipt(c, &kid(), &key()).unwrap()
    }

    #[test]
    fn valid_receipt_verifies_once_and_whitespace_or_key_order_do_not_matter() {
        let t = token(&claims(Some(r#"{"a":1,"b":"x"}"#)));
        let mut cache = ReplayCache::new(16);
        let v = verify_receipt(
            &t,
            &key().verifying_key(),
            &call(Some(r#"{ "b": "x", "a": 1.0 }"#)),
            at(T + 1),
            &mut cache,
        )
        .unwrap();
        assert_eq!(v.claims().seq, 42);
        assert_eq!(
            verify_receipt(
                &t,
                &key().verifying_key(),
                &call(Some(r#"{"a":1,"b":"x"}"#)),
                at(T + 2),
                &mut cache,
            ),
            Err(ReceiptError::Replayed {
                jti: "00112233445566778899aabbccddeeff".into()
            })
        );
    }

    #[test]
    fn receipt_for_other_arguments_audience_tool_or_key_is_refused() {
        let t = token(&claims(Some(r#"{"amount":10}"#)));
        let vk = key().verifying_key();
        let mut cache = ReplayCache::new(16);
        let e = verify_receipt(
            &t,
            &vk,
            &call(Some(r#"{"amount":10000}"#)),
            at(T),
            &mut cache,
        );
        assert!(
            matches!(e, Err(ReceiptError::OtherArguments { .. })),
            "{e:?}"
        );
        let other = ReceivedCall {
            audience: "https://other.example/mcp",
            ..call(Some(r#"{"amount":10}"#))
        };
        let e = verify_receipt(&t, &vk, &other, at(T), &mut cache);
        assert!(
            matches!(e, Err(ReceiptError::WrongAudience { .. })),
            "{e:?}"
        );
        let other = ReceivedCall {
            tool: "transfer",
            ..call(Some(r#"{"amount":10}"#))
        };
        let e = verify_receipt(&t, &vk, &other, at(T), &mut cache);
        assert!(matches!(e, Err(ReceiptError::WrongCall { .. })), "{e:?}");
        let mallory = SigningKey::from_bytes(&[6; 32]).verifying_key();
        let e = verify_receipt(
            &t,
            &mallory,
            &call(Some(r#"{"amount":10}"#)),
            at(T),
            &mut cache,
        );
        assert!(matches!(e, Err(ReceiptError::Jws(_))), "{e:?}");
        // None of the refusals used up the receipt.
        assert!(
            verify_receipt(&t, &vk, &call(Some(r#"{"amount":10}"#)), at(T), &mut cache).is_ok()
        );
    }

    #[test]
    fn expired_future_and_long_lived_receipts_are_refused() {
        let vk = key().verifying_key();
        let mut cache = ReplayCache::new(16);
        let t = token(&claims(None));
        let e = verify_receipt(
            &t,
            &vk,
            &call(None),
            at(T + 30 + RECEIPT_LEEWAY_SECS),
            &mut cache,
        );
        assert!(matches!(e, Err(ReceiptError::Expired { .. })), "{e:?}");
        let e = verify_receipt(
            &t,
            &vk,
            &call(None),
            at(T - RECEIPT_LEEWAY_SECS - 1),
            &mut cache,
        );
        assert!(matches!(e, Err(ReceiptError::NotYetValid { .. })), "{e:?}");
        let mut long = claims(None);
        long.exp = T + MAX_RECEIPT_LIFETIME_SECS + 1;
        assert!(encode_receipt(&long, &kid(), &key()).is_err());
    }

    #[test]
    fn a_handle_or_untyped_jwt_is_no_receipt() {
        let c = claims(None);
        let header = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"alg":"EdDSA","typ":"JWT","kid":"{}"}}"#,
            kid()
        ));
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).unwrap());
        let input = format!("{header}.{payload}");
        let sig = URL_SAFE_NO_PAD.encode(key().sign(input.as_bytes()).to_bytes());
        let jwt = format!("{input}.{sig}");
        let mut cache = ReplayCache::new(16);
        let e = verify_receipt(&jwt, &key().verifying_key(), &call(None), at(T), &mut cache);
        assert!(matches!(e, Err(ReceiptError::Jws(_))), "{e:?}");
    }

    #[test]
    fn a_full_replay_cache_refuses_rather_than_forgets() {
        let vk = key().verifying_key();
        let mut cache = ReplayCache::new(1);
        let mut a = claims(None);
        a.jti = "a".repeat(32);
        let mut b = claims(None);
        b.jti = "b".repeat(32);
        assert!(verify_receipt(&token(&a), &vk, &call(None), at(T), &mut cache).is_ok());
        assert_eq!(
            verify_receipt(&token(&b), &vk, &call(None), at(T), &mut cache),
            Err(ReceiptError::CacheFull)
        );
        // Once the first has expired, there is room.
        let mut later = claims(None);
        later.jti = "c".repeat(32);
        later.iat = T + 40;
        later.exp = T + 60;
        assert!(verify_receipt(&token(&later), &vk, &call(None), at(T + 41), &mut cache).is_ok());
    }

    fn receipt_with(jti: char, iat: u64, exp: u64) -> String {
        let mut c = claims(None);
        c.jti = jti.to_string().repeat(32);
        c.iat = iat;
        c.exp = exp;
        token(&c)
    }

    #[test]
    fn an_expired_receipts_slot_is_reclaimed_before_the_cache_is_full() {
        let verifier = ReceiptVerifier::new(&key().verifying_key()).unwrap();
        let mut cache = ReplayCache::new(16);
        let a = receipt_with('a', T, T + 30);
        verifier.verify(&a, &call(None), at(T), &mut cache).unwrap();
        assert_eq!(cache.len(), 1);
        // Still within its lifetime and leeway: kept.
        let b = receipt_with('b', T + 34, T + 60);
        verifier
            .verify(&b, &call(None), at(T + 34), &mut cache)
            .unwrap();
        assert_eq!(cache.len(), 2);
        // Past it: the next receipt recorded reclaims the first's slot, though the cache is
        // far from full.
        let c = receipt_with('c', T + 36, T + 60);
        verifier
            .verify(&c, &call(None), at(T + 36), &mut cache)
            .unwrap();
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn a_replayed_receipt_is_refused_throughout_its_lifetime_while_others_expire() {
        let verifier = ReceiptVerifier::new(&key().verifying_key()).unwrap();
        let mut cache = ReplayCache::new(4);
        let short = receipt_with('s', T, T + 1);
        verifier
            .verify(&short, &call(None), at(T), &mut cache)
            .unwrap();
        let long = receipt_with('l', T, T + 60);
        verifier
            .verify(&long, &call(None), at(T), &mut cache)
            .unwrap();
        for (i, now) in [T + 10, T + 30, T + 50, T + 64].into_iter().enumerate() {
            // Others come and go (the short one is dropped on the way) ...
            let other = receipt_with(char::from(b'0' + u8::try_from(i).unwrap()), now, now + 2);
            verifier
                .verify(&other, &call(None), at(now), &mut cache)
                .unwrap();
            // ... and the long one is refused as a replay until it expires.
            assert_eq!(
                verifier.verify(&long, &call(None), at(now), &mut cache),
                Err(ReceiptError::Replayed {
                    jti: "l".repeat(32)
                }),
                "at {now}"
            );
        }
        assert!(cache.len() <= 3, "expired receipts kept: {}", cache.len());
    }

    #[test]
    fn a_clock_stepped_back_cannot_replay_a_dropped_receipt() {
        let verifier = ReceiptVerifier::new(&key().verifying_key()).unwrap();
        let mut cache = ReplayCache::new(4);
        let a = receipt_with('a', T, T + 30);
        verifier.verify(&a, &call(None), at(T), &mut cache).unwrap();
        // Time moves past a's expiry: a's slot is reclaimed.
        let b = receipt_with('b', T + 40, T + 60);
        verifier
            .verify(&b, &call(None), at(T + 40), &mut cache)
            .unwrap();
        assert_eq!(cache.len(), 1);
        // A verifier whose clock stepped back would take a as fresh: the cache's time does not
        // go back, so it is refused.
        let e = verifier.verify(&a, &call(None), at(T + 1), &mut cache);
        assert!(matches!(e, Err(ReceiptError::Expired { .. })), "{e:?}");
    }

    #[test]
    fn a_prepared_verifier_checks_exactly_what_verify_receipt_checks() {
        let vk = key().verifying_key();
        let verifier = ReceiptVerifier::new(&vk).unwrap();
        let t = token(&claims(Some(r#"{"amount":10}"#)));
        let mut cache = ReplayCache::new(16);
        let e = verifier.verify(&t, &call(Some(r#"{"amount":11}"#)), at(T), &mut cache);
        assert!(
            matches!(e, Err(ReceiptError::OtherArguments { .. })),
            "{e:?}"
        );
        let mallory =
            ReceiptVerifier::new(&SigningKey::from_bytes(&[6; 32]).verifying_key()).unwrap();
        let e = mallory.verify(&t, &call(Some(r#"{"amount":10}"#)), at(T), &mut cache);
        assert!(matches!(e, Err(ReceiptError::Jws(_))), "{e:?}");
        let ok = verifier
            .verify(&t, &call(Some(r#"{"amount":10}"#)), at(T), &mut cache)
            .unwrap();
        assert_eq!(ok.claims().seq, 42);
    }

    #[test]
    fn a_small_order_key_is_refused_when_the_verifier_is_built() {
        // The identity point: every signature "verifies" under it with a lax verifier.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = VerifyingKey::from_bytes(&identity).unwrap();
        assert!(matches!(
            ReceiptVerifier::new(&weak),
            Err(ReceiptError::Jws(_))
        ));
    }
}
