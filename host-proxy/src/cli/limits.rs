//! `limits set`: replace the gateway's rate limits and spend caps.
//!
//! A signed `set_limits` admin request ([`super::submit`]). It replaces every limit in force
//! (`limits set` with no flag clears them): GCRA rate limits counted per tenant, user, agent or
//! tool, and spend caps over a window in the atomic units of an asset the registrations price
//! their tools in. The enclave logs the act like any admin change; the state fold holds the
//! limits, and `attestplane-verify log` replays them.

use std::time::Duration;

use attestplane_verifier::admin::{AdminAction, RateLimit, ScopeKind, SpendCap};
use attestplane_verifier::gateway::limits::check_rules;
use clap::{Args, Subcommand};

use super::keys::admin_key;
use super::submit::submit_admin;
use super::{CliError, CliResult, ClientContext};

/// `limits ...`.
#[derive(Debug, Subcommand)]
pub enum LimitsCommand {
    /// Replace every rate limit and spend cap with the ones given (none given: no limits).
    Set(LimitFlags),
}

/// The limits of a `set_limits`.
#[derive(Debug, Args)]
pub struct LimitFlags {
    /// A GCRA rate limit: SCOPE:RATE_PER_MINUTE:BURST, SCOPE one of tenant, user, agent, tool
    /// (repeatable; e.g. `agent:60:10`).
    #[arg(long = "rate", value_name = "SCOPE:PER_MINUTE:BURST", value_parser = parse_rate)]
    pub rates: Vec<RateLimit>,
    /// A spend cap: SCOPE:ASSET:CAP:WINDOW, CAP in atomic units of ASSET per WINDOW
    /// (repeatable; e.g. `tenant:credits:100000:24h`).
    #[arg(long = "spend", value_name = "SCOPE:ASSET:CAP:WINDOW", value_parser = parse_spend)]
    pub spends: Vec<SpendCap>,
}

fn parse_scope(s: &str) -> Result<ScopeKind, String> {
    match s {
        "tenant" => Ok(ScopeKind::Tenant),
        "user" => Ok(ScopeKind::User),
        "agent" => Ok(ScopeKind::Agent),
        "tool" => Ok(ScopeKind::Tool),
        _ => Err(format!("scope {s:?}: want tenant, user, agent or tool")),
    }
}

fn positive(what: &str, s: &str) -> Result<u64, String> {
    s.parse::<u64>()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{what} {s:?}: want a whole number of at least 1"))
}

/// Parses `SCOPE:PER_MINUTE:BURST` (a clap value parser).
pub fn parse_rate(s: &str) -> Result<RateLimit, String> {
    let [scope, rate, burst] = s
        .split(':')
        .collect::<Vec<_>>()
        .try_into()
        .map_err(|_| format!("expected SCOPE:PER_MINUTE:BURST, got {s:?}"))?;
    Ok(RateLimit {
        scope: parse_scope(scope)?,
        rate_per_minute: positive("rate per minute", rate)?,
        burst: positive("burst", burst)?,
    })
}

/// Parses `SCOPE:ASSET:CAP:WINDOW` (a clap value parser).
pub fn parse_spend(s: &str) -> Result<SpendCap, String> {
    let [scope, asset, cap, window] = s
        .split(':')
        .collect::<Vec<_>>()
        .try_into()
        .map_err(|_| format!("expected SCOPE:ASSET:CAP:WINDOW, got {s:?}"))?;
    if asset.is_empty() {
        return Err(format!("empty asset in {s:?}"));
    }
    let cap = cap
        .parse::<u64>()
        .map_err(|_| format!("cap {cap:?}: want a whole number of units"))?;
    let window: Duration = window
        .parse::<humantime::Duration>()
        .map_err(|e| format!("window {window:?}: {e}"))?
        .into();
    let window_ms = u64::try_from(window.as_millis())
        .ok()
        .filter(|ms| *ms > 0)
        .ok_or_else(|| format!("window in {s:?}: want at least 1ms"))?;
    Ok(SpendCap {
        scope: parse_scope(scope)?,
        asset: asset.to_owned(),
        cap,
        window_ms,
    })
}

impl LimitFlags {
    /// The `set_limits` action these flags describe.
    pub fn action(&self) -> CliResult<AdminAction> {
        // The gateway's own rule check (at most 256 rules, one per scope, one cap per scope
        // and asset): refused here rather than by the enclave, which would log the refusal.
        check_rules(&self.rates, &self.spends)
            .map_err(|e| CliError::Usage(format!("limits: {e}")))?;
        Ok(AdminAction::SetLimits {
            rates: self.rates.clone(),
            spends: self.spends.clone(),
        })
    }
}

/// Runs a `limits` command.
pub async fn run(command: LimitsCommand, context: &ClientContext) -> CliResult {
    match command {
        LimitsCommand::Set(flags) => {
            let action = flags.action()?;
            let key = admin_key(context)?;
            submit_admin(context, &key, action).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_rates_for_one_scope_are_refused_before_signing() {
        let flags = LimitFlags {
            rates: vec![
                parse_rate("agent:60:10").unwrap(),
                parse_rate("agent:30:1").unwrap(),
            ],
            spends: vec![],
        };
        assert!(matches!(flags.action(), Err(CliError::Usage(_))));
        let none = LimitFlags {
            rates: vec![],
            spends: vec![],
        };
        assert!(matches!(
            none.action(),
            Ok(AdminAction::SetLimits { rates, spends }) if rates.is_empty() && spends.is_empty()
        ));
    }

    #[test]
    fn parses_rates_and_spend_caps() {
        assert_eq!(
            parse_rate("agent:60:10"),
            Ok(RateLimit {
                scope: ScopeKind::Agent,
                rate_per_minute: 60,
                burst: 10
            })
        );
        assert_eq!(
            parse_spend("tenant:credits:100000:24h"),
            Ok(SpendCap {
                scope: ScopeKind::Tenant,
                asset: "credits".into(),
                cap: 100_000,
                window_ms: 86_400_000
            })
        );
    }

    #[test]
    fn refuses_malformed_limits() {
        for bad in [
            "agent:60",
            "agent:0:10",
            "agent:60:0",
            "server:60:10",
            "agent:-1:1",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        for bad in [
            "tenant:credits:100",
            "tenant::100:1h",
            "tenant:credits:x:1h",
            "tenant:credits:100:0s",
            "org:credits:100:1h",
        ] {
            assert!(parse_spend(bad).is_err(), "{bad}");
        }
    }
}
