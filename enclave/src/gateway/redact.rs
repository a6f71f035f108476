//! PII in the path: what the gateway does to a call's arguments before deciding it and to the
//! upstream's answer before the agent sees it. Pure functions over the bytes; the detection and
//! redaction themselves are the verifier kernel's (`attestplane_verifier::gateway::pii`), and
//! the rule (allow, redact, refuse) is the policy's, decided with the call.
//!
//! - Arguments are scanned and redacted once, before the decision: policies see the redacted
//!   form (so no PII reaches the log through a declared argument) and the findings as counts;
//!   the decision's rule then picks which form is forwarded.
//! - An answer's `result` (or `error`) member is scanned under the call's rule: `allow`
//!   counts, `redact` replaces each finding with `[REDACTED:kind]` in place (the rest of the
//!   answer byte for byte), `refuse` withholds a result that carries any.

use std::collections::BTreeMap;

use attestplane_verifier::entry::PiiRecord;
use attestplane_verifier::gateway::jsonrpc::{Kind, parse_message};
use attestplane_verifier::gateway::pii::{self, PiiError, ScanReport};
use attestplane_verifier::gateway::receipt::arguments_digest;
use attestplane_verifier::policy::PiiAction;

use super::inside::CallArguments;

/// Scans and redacts a call's arguments (JSON text, `None` when the call has none).
pub fn call_arguments(arguments: Option<&str>) -> Result<CallArguments, String> {
    let Some(text) = arguments else {
        let empty = arguments_digest(None).map_err(|e| e.to_string())?;
        return Ok(CallArguments {
            redacted: None,
            sent_digest: empty,
            redacted_digest: empty,
            pii: BTreeMap::new(),
        });
    };
    let (report, redacted) = pii::redact_json(text, &[]).map_err(|e| format!("arguments: {e}"))?;
    let sent_digest = arguments_digest(Some(text)).map_err(|e| e.to_string())?;
    let redacted_digest = if report.is_empty() {
        sent_digest
    } else {
        arguments_digest(Some(&redacted)).map_err(|e| e.to_string())?
    };
    Ok(CallArguments {
        redacted: Some(redacted),
        sent_digest,
        redacted_digest,
        pii: counts(&report),
    })
}

/// Findings by kind name.
pub fn counts(report: &ScanReport) -> BTreeMap<String, u64> {
    report
        .counts()
        .into_iter()
        .map(|(k, n)| (k.as_str().to_owned(), n))
        .collect()
}

/// An upstream's answer as the agent will receive it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Treated {
    /// Forward these bytes (the answer itself, or with its PII redacted).
    Forward(Vec<u8>, PiiRecord),
    /// The answer carries PII and the rule refuses it: answer the agent with an error instead.
    Withheld(PiiRecord),
}

/// Why an answer could not be treated (the call is aborted: an answer the gateway cannot
/// scan is never passed on).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TreatError {
    /// Not one JSON-RPC response.
    #[error("the answer is not a JSON-RPC response")]
    NotAResponse,
    /// The scan failed (too long, or redaction did not settle).
    #[error("the answer could not be scanned: {0}")]
    Scan(#[from] PiiError),
}

/// Applies the call's PII `rule` to an upstream's JSON-RPC answer.
pub fn treat_answer(body: &[u8], rule: PiiAction) -> Result<Treated, TreatError> {
    let message = parse_message(body).map_err(|_| TreatError::NotAResponse)?;
    let member = match message.kind() {
        Kind::Response => message.result(),
        Kind::ErrorResponse => message.error(),
        _ => None,
    }
    .ok_or(TreatError::NotAResponse)?;
    let record = |report: &ScanReport| PiiRecord {
        action: rule.as_str().to_owned(),
        counts: counts(report),
    };
    match rule {
        PiiAction::Allow => {
            let report = pii::scan_json(member.get(), &[])?;
            Ok(Treated::Forward(body.to_vec(), record(&report)))
        }
        PiiAction::Refuse => {
            let report = pii::scan_json(member.get(), &[])?;
            if report.is_empty() {
                Ok(Treated::Forward(body.to_vec(), record(&report)))
            } else {
                Ok(Treated::Withheld(record(&report)))
            }
        }
        PiiAction::Redact => {
            let (report, redacted) = pii::redact_json(member.get(), &[])?;
            if report.is_empty() {
                return Ok(Treated::Forward(body.to_vec(), record(&report)));
            }
            let spliced = message
                .with_replaced(member, &redacted)
                .map_err(|_| TreatError::NotAResponse)?;
            Ok(Treated::Forward(spliced.into_bytes(), record(&report)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CARD: &str = "4111 1111 1111 1111";

    #[test]
    fn arguments_are_redacted_for_policies_and_both_forms_hashed() {
        let text = format!(r#"{{"to":"alice@example.com","card":"{CARD}","n":1e3}}"#);
        let a = call_arguments(Some(&text)).unwrap();
        let redacted = a.redacted.clone().unwrap();
        assert!(!redacted.contains("alice@example.com") && !redacted.contains(CARD));
        assert!(
            redacted.contains("1e3"),
            "numbers are left as written: {redacted}"
        );
        assert_eq!(a.pii.get("email"), Some(&1));
        assert_eq!(a.pii.get("card"), Some(&1));
        assert_ne!(a.sent_digest, a.redacted_digest);
        assert_eq!(a.sent_digest, arguments_digest(Some(&text)).unwrap());
        let clean = call_arguments(Some(r#"{"city":"Paris"}"#)).unwrap();
        assert!(clean.pii.is_empty());
        assert_eq!(clean.sent_digest, clean.redacted_digest);
        assert!(
            format!("{a:?}").find("alice").is_none(),
            "Debug leaks arguments"
        );
    }

    #[test]
    fn answers_follow_the_rule() {
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":7,"result":{{"content":[{{"type":"text","text":"card {CARD}"}}],"x":1e3}}}}"#
        );
        let Treated::Forward(out, rec) = treat_answer(body.as_bytes(), PiiAction::Redact).unwrap()
        else {
            panic!("redact forwards");
        };
        let out = String::from_utf8(out).unwrap();
        assert!(
            !out.contains(CARD) && out.contains("[REDACTED:card]"),
            "{out}"
        );
        assert!(out.contains(r#""x":1e3"#) && out.starts_with(r#"{"jsonrpc":"2.0","id":7,"#));
        assert_eq!(rec.counts.get("card"), Some(&1));
        assert_eq!(rec.action, "redact");

        let Treated::Forward(same, rec) = treat_answer(body.as_bytes(), PiiAction::Allow).unwrap()
        else {
            panic!("allow forwards");
        };
        assert_eq!(same, body.as_bytes());
        assert_eq!(rec.counts.get("card"), Some(&1));

        assert!(matches!(
            treat_answer(body.as_bytes(), PiiAction::Refuse).unwrap(),
            Treated::Withheld(r) if r.counts.get("card") == Some(&1)
        ));
        let clean = br#"{"jsonrpc":"2.0","id":7,"result":{"content":[]}}"#;
        assert!(matches!(
            treat_answer(clean, PiiAction::Refuse).unwrap(),
            Treated::Forward(b, _) if b == clean
        ));
        // An error's message is scanned too.
        let err = format!(r#"{{"jsonrpc":"2.0","id":7,"error":{{"code":1,"message":"{CARD}"}}}}"#);
        assert!(matches!(
            treat_answer(err.as_bytes(), PiiAction::Refuse).unwrap(),
            Treated::Withheld(_)
        ));
        assert_eq!(
            treat_answer(b"[]", PiiAction::Allow),
            Err(TreatError::NotAResponse)
        );
    }

    #[test]
    fn an_answer_over_a_scan_limit_names_the_limit_under_every_rule() {
        let many = vec!["a@b.example"; pii::MAX_FINDINGS + 1].join(" ");
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":7,"result":{{"content":[{{"type":"text","text":"{many}"}}]}}}}"#
        );
        for rule in [PiiAction::Allow, PiiAction::Redact, PiiAction::Refuse] {
            let e = treat_answer(body.as_bytes(), rule).unwrap_err();
            assert_eq!(
                e,
                TreatError::Scan(PiiError::TooManyFindings {
                    max: pii::MAX_FINDINGS
                }),
                "{rule:?}"
            );
            assert!(e.to_string().contains("10000 findings"), "{e}");
        }
    }
}
