//! How the enclave reads an agent's identity token, claim by claim: what is required, what is
//! optional, and the exact refusal (claim and problem) for each missing, mistyped or failing
//! claim. Every token here carries a genuine signature of the installed provider, so only the
//! claims decide. Time is pinned at the harness's clock.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use attestplane_enclave::identity::{
    Audience, BearerCache, IdentityError, LEEWAY_SECS, MAX_ROLES, authenticate,
};
use attestplane_verifier::UnixMillis;
use common::*;
use serde_json::{Value, json};

const AGENT: &str = "agent-7";

struct Fixture {
    h: Harness,
    idp: Idp,
}

impl Fixture {
    fn new() -> Self {
        let admin = Admin::new(1);
        let idp = Idp::new(40, "https://idp.acme.example");
        let mut h = Harness::new(&[&admin]);
        h.admin_ok(&admin, idp.install());
        Fixture { h, idp }
    }

    fn now(&self) -> UnixMillis {
        self.h.now
    }

    /// Good claims for [`AGENT`] of acme with role tool-user, issued now, valid an hour.
    fn claims(&self) -> Value {
        self.idp.claims(AGENT, "acme", &["tool-user"], self.now())
    }

    /// The claims signed by the provider and read by the enclave for the provider's audience.
    fn read(
        &self,
        claims: &Value,
    ) -> Result<attestplane_verifier::entry::PrincipalRecord, IdentityError> {
        authenticate(
            self.h.enclave.state(),
            &self.idp.sign_claims(claims),
            self.now(),
        )
    }

    /// The claims with `claim` set to `value` (removed when `None`).
    fn with(&self, claim: &str, value: Option<Value>) -> Value {
        let mut c = self.claims();
        let map = c.as_object_mut().unwrap();
        match value {
            Some(v) => {
                map.insert(claim.into(), v);
            }
            None => {
                map.remove(claim);
            }
        }
        c
    }

    fn refused(&self, claim: &str, value: Option<Value>) -> IdentityError {
        let c = self.with(claim, value.clone());
        self.read(&c)
            .expect_err(&format!("claim {claim} = {value:?} must be refused"))
    }
}

fn claim(claim: &'static str, problem: &'static str) -> IdentityError {
    IdentityError::Claim { claim, problem }
}

const TEXT: &str = "must be a non-empty string of at most 256 bytes";
const SECS: &str = "must be a non-negative integer (seconds)";

#[test]
fn a_good_token_maps_to_its_principal_with_user_defaulting_to_sub_and_roles_sorted() {
    let f = Fixture::new();
    let mut c = f.claims();
    c["roles"] = json!(["b", "a", "b"]);
    let p = f.read(&c).unwrap();
    assert_eq!(p.agent, AGENT);
    assert_eq!(p.user, AGENT);
    assert_eq!(p.tenant, "acme");
    assert_eq!(p.roles, vec!["a", "b"]);
    assert_eq!(p.issuer, f.idp.issuer);
    c["user"] = json!("alice");
    assert_eq!(f.read(&c).unwrap().user, "alice");
    // Roles, `nbf` and `iat` are optional.
    let mut c = f.claims();
    let map = c.as_object_mut().unwrap();
    map.remove("roles");
    map.remove("iat");
    assert_eq!(f.read(&c).unwrap().roles, Vec::<String>::new());
}

#[test]
fn sub_missing_empty_long_or_not_a_string_is_refused() {
    let f = Fixture::new();
    assert_eq!(f.refused("sub", None), claim("sub", "is required"));
    for bad in [
        json!(""),
        json!(7),
        json!(null),
        json!(["a"]),
        json!("x".repeat(257)),
    ] {
        assert_eq!(f.refused("sub", Some(bad)), claim("sub", TEXT));
    }
    assert!(f.read(&f.with("sub", Some(json!("x".repeat(256))))).is_ok());
}

#[test]
fn tenant_missing_or_mistyped_and_user_mistyped_are_refused() {
    let f = Fixture::new();
    assert_eq!(f.refused("tenant", None), claim("tenant", "is required"));
    assert_eq!(f.refused("tenant", Some(json!(1))), claim("tenant", TEXT));
    assert_eq!(f.refused("user", Some(json!(""))), claim("user", TEXT));
    assert_eq!(f.refused("user", Some(json!(false))), claim("user", TEXT));
}

#[test]
fn exp_missing_mistyped_or_past_is_refused_with_leeway() {
    let f = Fixture::new();
    let now = f.now().as_secs();
    assert_eq!(f.refused("exp", None), claim("exp", "is required"));
    for bad in [json!("9999999999"), json!(-1), json!(1.5), json!(null)] {
        assert_eq!(f.refused("exp", Some(bad)), claim("exp", SECS));
    }
    assert_eq!(
        f.refused("exp", Some(json!(now - LEEWAY_SECS))),
        claim("exp", "token has expired")
    );
    assert!(
        f.read(&f.with("exp", Some(json!(now - LEEWAY_SECS + 1))))
            .is_ok()
    );
}

#[test]
fn nbf_and_iat_in_the_future_or_mistyped_are_refused_with_leeway() {
    let f = Fixture::new();
    let now = f.now().as_secs();
    assert_eq!(f.refused("nbf", Some(json!("0"))), claim("nbf", SECS));
    assert_eq!(
        f.refused("nbf", Some(json!(now + LEEWAY_SECS + 1))),
        claim("nbf", "token is not yet valid")
    );
    assert!(
        f.read(&f.with("nbf", Some(json!(now + LEEWAY_SECS))))
            .is_ok()
    );
    assert_eq!(f.refused("iat", Some(json!(-5))), claim("iat", SECS));
    assert_eq!(
        f.refused("iat", Some(json!(now + LEEWAY_SECS + 1))),
        claim("iat", "token was issued in the future")
    );
    assert!(
        f.read(&f.with("iat", Some(json!(now + LEEWAY_SECS))))
            .is_ok()
    );
}

#[test]
fn aud_as_string_or_array_must_name_the_audience() {
    let f = Fixture::new();
    let aud = f.idp.audience.clone();
    let refused = claim("aud", "does not name this control plane");
    assert!(f.read(&f.with("aud", Some(json!(aud)))).is_ok());
    assert!(f.read(&f.with("aud", Some(json!(["other", aud])))).is_ok());
    for bad in [
        None,
        Some(json!("other")),
        Some(json!(["other"])),
        Some(json!([])),
        Some(json!([[aud]])),
        Some(json!({ "aud": aud })),
        Some(json!(7)),
    ] {
        assert_eq!(f.refused("aud", bad), refused);
    }
}

#[test]
fn a_resource_audience_is_required_in_place_of_the_providers() {
    let f = Fixture::new();
    let uri = "https://cp.example/mcp/weather";
    let mut cache = BearerCache::new(0);
    let state = f.h.enclave.state();
    let provider_token = f.idp.sign_claims(&f.claims());
    assert_eq!(
        cache.authenticate_for(state, &provider_token, Audience::Resource(uri), f.now()),
        Err(claim("aud", "does not name this control plane"))
    );
    let resource_token = f.idp.sign_claims(&f.with("aud", Some(json!([uri]))));
    assert!(
        cache
            .authenticate_for(state, &resource_token, Audience::Resource(uri), f.now())
            .is_ok()
    );
    assert_eq!(
        cache.authenticate(state, &resource_token, f.now()),
        Err(claim("aud", "does not name this control plane"))
    );
}

#[test]
fn roles_not_an_array_too_many_or_not_strings_are_refused() {
    let f = Fixture::new();
    let many = vec!["r"; MAX_ROLES + 1];
    for bad in [json!("tool-user"), json!(many), json!({})] {
        assert_eq!(
            f.refused("roles", Some(bad)),
            claim("roles", "must be an array of at most 64 strings")
        );
    }
    for bad in [
        json!([1]),
        json!([""]),
        json!(["ok", null]),
        json!(["x".repeat(257)]),
    ] {
        assert_eq!(
            f.refused("roles", Some(bad)),
            claim("roles", "must be an array of non-empty strings")
        );
    }
    assert!(
        f.read(&f.with("roles", Some(json!(vec!["r"; MAX_ROLES]))))
            .is_ok()
    );
}

#[test]
fn the_first_failing_claim_is_the_one_named() {
    // The order of the checks is part of the refusal: aud, exp, nbf, iat, sub, tenant, user,
    // roles.
    let f = Fixture::new();
    let mut c = f.claims();
    let map = c.as_object_mut().unwrap();
    map.remove("sub");
    map.remove("tenant");
    map.insert("roles".into(), json!(7));
    map.insert("iat".into(), json!("x"));
    assert_eq!(f.read(&c), Err(claim("iat", SECS)));
    c.as_object_mut().unwrap().remove("iat");
    assert_eq!(f.read(&c), Err(claim("sub", "is required")));
    c["aud"] = json!("other");
    assert_eq!(
        f.read(&c),
        Err(claim("aud", "does not name this control plane"))
    );
}

#[test]
fn an_issuer_that_is_not_a_string_is_malformed() {
    let f = Fixture::new();
    for bad in [None, Some(json!(7))] {
        assert_eq!(
            f.refused("iss", bad),
            IdentityError::Malformed("no iss claim")
        );
    }
}
