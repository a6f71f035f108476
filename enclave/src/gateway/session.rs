//! Legacy-era sessions: minted by the gateway at `initialize`, 128 random bits, bound to the
//! agent identity and the endpoint that created them.
//!
//! A session id is a capability only together with the agent's token: a request that presents
//! another agent's session id (or one made at another endpoint) is answered 404, exactly like
//! an unknown one, so a session id learned from traffic is worth nothing without the token
//! that made it. Sessions are bounded in number and expire when idle.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Who a session belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionOwner {
    /// The endpoint's server id.
    pub server: String,
    /// The agent (`sub`) and the issuer that vouched for it.
    pub agent: String,
    /// The identity provider.
    pub issuer: String,
}

#[derive(Debug)]
struct Session {
    owner: SessionOwner,
    last_used: Instant,
}

/// Why a session could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// No such session for this agent at this endpoint (unknown, expired, deleted, or
    /// another agent's): the client must initialize again (HTTP 404).
    #[error("unknown session")]
    Unknown,
    /// Too many sessions are open.
    #[error("too many sessions")]
    Full,
}

/// The open sessions.
#[derive(Debug)]
pub struct Sessions {
    map: HashMap<String, Session>,
    max: usize,
    idle: Duration,
}

impl Sessions {
    /// At most `max` sessions, each expiring after `idle` unused.
    pub fn new(max: usize, idle: Duration) -> Self {
        Self {
            map: HashMap::new(),
            max,
            idle,
        }
    }

    /// Opens a session for `owner` under the id made from `random` (16 bytes from the NSM).
    pub fn open(
        &mut self,
        owner: SessionOwner,
        random: &[u8],
        now: Instant,
    ) -> Result<String, SessionError> {
        if self.map.len() >= self.max {
            let idle = self.idle;
            self.map
                .retain(|_, s| now.saturating_duration_since(s.last_used) < idle);
            if self.map.len() >= self.max {
                return Err(SessionError::Full);
            }
        }
        let id = hex::encode(random);
        self.map.insert(
            id.clone(),
            Session {
                owner,
                last_used: now,
            },
        );
        Ok(id)
    }

    /// Checks that session `id` exists, is not idle-expired, and belongs to `owner`.
    pub fn touch(
        &mut self,
        id: &str,
        owner: &SessionOwner,
        now: Instant,
    ) -> Result<(), SessionError> {
        let idle = self.idle;
        match self.map.get_mut(id) {
            Some(s) if s.owner == *owner && now.saturating_duration_since(s.last_used) < idle => {
                s.last_used = now;
                Ok(())
            }
            Some(s) if now.saturating_duration_since(s.last_used) >= idle => {
                self.map.remove(id);
                Err(SessionError::Unknown)
            }
            _ => Err(SessionError::Unknown),
        }
    }

    /// Ends session `id` if `owner` holds it.
    pub fn close(&mut self, id: &str, owner: &SessionOwner) -> Result<(), SessionError> {
        match self.map.get(id) {
            Some(s) if s.owner == *owner => {
                self.map.remove(id);
                Ok(())
            }
            _ => Err(SessionError::Unknown),
        }
    }

    /// How many sessions are open.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(agent: &str) -> SessionOwner {
        SessionOwner {
            server: "weather".into(),
            agent: agent.into(),
            issuer: "idp".into(),
        }
    }

    #[test]
    fn another_agents_session_id_is_unknown() {
        let mut s = Sessions::new(10, Duration::from_secs(60));
        let now = Instant::now();
        let id = s.open(owner("alice"), &[7; 16], now).unwrap();
        assert_eq!(s.touch(&id, &owner("alice"), now), Ok(()));
        assert_eq!(
            s.touch(&id, &owner("mallory"), now),
            Err(SessionError::Unknown)
        );
        assert_eq!(s.close(&id, &owner("mallory")), Err(SessionError::Unknown));
        // Still alice's.
        assert_eq!(s.touch(&id, &owner("alice"), now), Ok(()));
        assert_eq!(s.close(&id, &owner("alice")), Ok(()));
        assert_eq!(
            s.touch(&id, &owner("alice"), now),
            Err(SessionError::Unknown)
        );
    }

    #[test]
    fn sessions_expire_and_are_bounded() {
        let mut s = Sessions::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        let a = s.open(owner("a"), &[1; 16], t0).unwrap();
        s.open(owner("b"), &[2; 16], t0).unwrap();
        assert_eq!(s.open(owner("c"), &[3; 16], t0), Err(SessionError::Full));
        let later = t0 + Duration::from_secs(61);
        assert_eq!(s.touch(&a, &owner("a"), later), Err(SessionError::Unknown));
        assert!(s.open(owner("c"), &[3; 16], later).is_ok());
    }
}
