//! Cedar policy decisions: the one function the enclave decides with and the auditor replays.
//!
//! The enclave asks [`PolicyEngine::decide`] whether an agent may `discover`, `resolve` or `call`
//! an MCP server (or one of its tools), and logs the request facts, the decision and the policy
//! text. The auditor's verifier rebuilds the engine from the logged text and calls the same
//! function with the same facts, so a logged decision that the policy did not produce is caught.
//! For that to hold this module is a pure function of (policy text, [`DecisionRequest`]): it
//! reads no clock (the time is [`DecisionRequest::time`]), no counters of its own (they are
//! [`DecisionRequest::counters`]) and does no I/O.
//!
//! ## Model
//!
//! Cedar, deny by default: a request is allowed only when at least one `permit` is satisfied
//! and no `forbid` is. A policy whose evaluation errors (e.g. integer overflow) is skipped, as
//! Cedar specifies; the error is reported in [`Decision::errors`]. The entity types, actions and
//! context are fixed by [`SCHEMA`], and every policy set is validated against it in strict mode
//! before it is accepted, so a policy that names an unknown attribute, type or action, or whose
//! scope can never match (a `call` on a `Server`), is refused at install time rather than
//! silently never applying. Validator warnings are refused like errors.
//!
//! For each request the engine builds a handful of entities (the agent, its user, the
//! tenant(s), the server and, for `call`, the tool) and the context record; nothing else is in
//! the entity store. In particular, action entities are not in the store and the schema has no
//! action groups, so `action in [..]` means "is one of".
//!
//! ## The index
//!
//! Cedar evaluates every policy of a set on every request. The engine therefore splits the set
//! by scope at construction: per action, one bucket of policies whose resource scope holds for
//! any resource of that action's type (`resource`, `resource is T`), and one bucket per entity
//! named in a resource scope (`resource == E`, `resource in E`, `resource is T in E`). A
//! request evaluates the "any" bucket of its action plus the buckets of its resource and the
//! resource's ancestors (server and tenant), and merges the results the way Cedar's authorizer
//! does (forbids win; the determining policies are the satisfied forbids if any, otherwise the
//! satisfied permits). A policy left out cannot have matched: its scope names an entity that
//! is neither the resource nor one of its ancestors, or another action or resource type. A
//! policy put in needlessly is harmless: its scope is still evaluated. Memory is bounded: each
//! policy is stored at most once per action. [`PolicyEngine::decide_unindexed`] evaluates the
//! whole set; a property test checks that both always agree.
//!
//! ## Trust assumptions
//!
//! The policy text comes from a signed admin request, but it is still parsed defensively: it is
//! bounded by [`MAX_POLICY_TEXT_LEN`] and [`MAX_POLICIES`]. The request facts are whatever the
//! caller says; this module judges them, it does not check them.
//!
//! ## What this module deliberately does not do
//!
//! - It does not accept templates or template links: only static policies.
//! - It does not enable Cedar's `ipaddr`, `decimal` or `datetime` extensions; a policy that
//!   uses them fails to validate. Times are plain integers (`context.time`, unix seconds).
//! - It does not count, rate-limit or remember anything: counters are inputs.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::OnceLock;

use cedar_policy as cedar;
use cedar_policy::{
    ActionConstraint, Authorizer, Context, Entities, Entity, EntityId, EntityTypeName, EntityUid,
    PolicyId, PolicySet, ResourceConstraint, RestrictedExpression, Schema, ValidationMode,
    Validator,
};

mod memo;

use memo::NumberUses;
pub(crate) use memo::RequestKey;
pub use memo::{DecisionMemo, MemoStats};

use crate::gateway::json::{self, Value as JsonValue};
use crate::gateway::pii::PiiKind;
use crate::time::UnixMillis;

/// The Cedar schema (human-readable `.cedarschema` syntax) every policy set is validated against.
pub const SCHEMA: &str = r#"// Attestplane policy schema. Every policy set is validated against it in strict mode.
//
// Entities, built per request from the request's facts (nothing else is in the store):
//   Agent::"<agent id>"              the principal; member of its Tenant
//   User::"<user id>"                the agent's user; member of the agent's Tenant
//   Tenant::"<tenant id>"
//   Server::"<server id>"            member of its Tenant
//   Tool::"<server id>/<tool name>"  member of its Server (so, transitively, of its Tenant)
//   Resource::"<server id>/<uri>"    a server's resource, by URI; member of its Server
//   Prompt::"<server id>/<name>"     a server's prompt, by name; member of its Server
//
// Actions: discover and resolve apply to (Agent, Server); call applies to (Agent, Tool);
// read_resource to (Agent, Resource); get_prompt to (Agent, Prompt).
// There are no action groups: `action in [A, B]` means "action is A or B".
//
// Context:
//   attestation.verified  the server's attestation document verified
//   attestation.age_ms    milliseconds since that verification. ABSENT when the server has no
//                         verified attestation: guard it with `context.attestation has age_ms`
//                         (strict validation insists). Saturates at 9223372036854775807.
//   attestation.pcr_match the document's PCRs equal the registered ones
//   attestation.debug     the document came from an enclave in debug mode
//   time                  the decision's time in whole unix seconds
//   server_assurance      how the server is known, exactly as its signed registration says:
//                         "nitro" (attested against its PCRs), "none" (a plain server);
//                         later "webpki", "pinned". Not derived from the attestation facts.
//   counters.calls_last_minute, counters.spend_micros
//                         the agent's counters as the enclave keeps them; saturate at
//                         9223372036854775807.
// `call`, `read_resource` and `get_prompt` (the gateway's actions):
//   arguments.<name>      a declared argument of the call (or the prompt) as forwarded (see
//                         Arguments below); absent when not passed (and in listings; a
//                         resource read has none)
//   pii.count, pii.types  PII findings in the arguments: how many, of which kinds
//   pii.<kind>            findings of one kind (email, phone, card, iban, national_id,
//                         ip_address, cloud_key, jwt, private_key)
namespace Attestplane {
  entity Tenant;
  entity User in [Tenant];
  entity Agent in [Tenant] = {
    user: User,
    tenant: Tenant,
    roles: Set<String>,
    issuer: String,
  };
  entity Server in [Tenant] = {
    tenant: Tenant,
    name: String,
    resource: String,
  };
  // `tenant` is the server's tenant, so `principal.tenant == resource.tenant` works for every
  // action.
  entity Tool in [Server] = {
    name: String,
    server: Server,
    tenant: Tenant,
  };
  // `name` is the URI too: every resource type has `name` and `tenant`, so a policy over any
  // resource's `name` (valid before resources existed) still validates.
  entity Resource in [Server] = {
    uri: String,
    name: String,
    server: Server,
    tenant: Tenant,
  };
  entity Prompt in [Server] = {
    name: String,
    server: Server,
    tenant: Tenant,
  };
  type Attestation = {
    verified: Bool,
    age_ms?: Long,
    pcr_match: Bool,
    debug: Bool,
  };
  type Counters = {
    calls_last_minute: Long,
    spend_micros: Long,
  };
  type RequestContext = {
    attestation: Attestation,
    time: Long,
    counters: Counters,
    server_assurance: String,
  };
  // The call's arguments: only those declared with @arguments("name: Type, ...") on some
  // policy of the set, each optional (guard with `context.arguments has name`).
  type Arguments = {};
  type Pii = {
    count: Long,
    types: Set<String>,
    email: Long,
    phone: Long,
    card: Long,
    iban: Long,
    national_id: Long,
    ip_address: Long,
    cloud_key: Long,
    jwt: Long,
    private_key: Long,
  };
  type CallContext = {
    attestation: Attestation,
    time: Long,
    counters: Counters,
    arguments: Arguments,
    pii: Pii,
    server_assurance: String,
  };
  action discover, resolve appliesTo {
    principal: [Agent],
    resource: [Server],
    context: RequestContext,
  };
  action call appliesTo {
    principal: [Agent],
    resource: [Tool],
    context: CallContext,
  };
  action read_resource appliesTo {
    principal: [Agent],
    resource: [Resource],
    context: CallContext,
  };
  action get_prompt appliesTo {
    principal: [Agent],
    resource: [Prompt],
    context: CallContext,
  };
}
"#;

/// Longest policy text accepted, in bytes.
pub const MAX_POLICY_TEXT_LEN: usize = 256 * 1024;

/// Most policies accepted in one set. Reachable within [`MAX_POLICY_TEXT_LEN`] (the shortest
/// policy is 34 bytes), so both limits bind.
pub const MAX_POLICIES: usize = 4_096;

/// The most call arguments a policy set may declare.
pub const MAX_ARGUMENT_DECLARATIONS: usize = 256;

/// The longest call arguments (JSON text) the context is built from, in bytes.
pub const MAX_ARGUMENTS_LEN: usize = 1024 * 1024;

/// The longest projection of a call's arguments on the declared ones (RFC 8785 canonical
/// JSON, [`PolicyEngine::project_arguments`]), in bytes: what a decision entry records. Far
/// below the entry limit, so that a decision entry always fits however large the arguments
/// (canonical numbers can be longer than the agent's spelling: `1e15` is sixteen digits). A
/// call over it is refused before it is decided.
pub const MAX_PROJECTION_LEN: usize = 64 * 1024;

/// The most elements of a `Set` argument put in the context.
pub const MAX_ARGUMENT_SET_LEN: usize = 1024;

/// The annotation that declares call arguments: `@arguments("amount: Long, memo: String")`.
const ARGUMENTS_ANNOTATION: &str = "arguments";

/// The annotation by which a permit chooses what happens to PII: `@pii("redact")`.
const PII_ANNOTATION: &str = "pii";

/// The annotation that names a policy: `@id("tenant-isolation")`.
const ID_ANNOTATION: &str = "id";

/// The agent asking: the principal of every request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The agent's id (`Attestplane::Agent::"<agent>"`).
    pub agent: String,
    /// The user the agent acts for (`Attestplane::User::"<user>"`).
    pub user: String,
    /// The agent's tenant (`Attestplane::Tenant::"<tenant>"`).
    pub tenant: String,
    /// The agent's roles, as its identity provider asserted them.
    pub roles: Vec<String>,
    /// The identity provider that authenticated the agent.
    pub issuer: String,
}

/// What the agent asks to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// See that a server exists (resource: the server).
    Discover,
    /// Obtain a signed handle for a server (resource: the server).
    Resolve,
    /// Call one of a server's tools (resource: the tool).
    Call,
    /// Read one of a server's resources, through the gateway (resource: the resource, by URI).
    ReadResource,
    /// Get one of a server's prompts, through the gateway (resource: the prompt, by name).
    GetPrompt,
}

impl Action {
    /// Every action, in a fixed order.
    pub const ALL: [Action; 5] = [
        Action::Discover,
        Action::Resolve,
        Action::Call,
        Action::ReadResource,
        Action::GetPrompt,
    ];

    /// The Cedar action id: `"discover"`, `"resolve"`, `"call"`, `"read_resource"` or
    /// `"get_prompt"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Action::Discover => "discover",
            Action::Resolve => "resolve",
            Action::Call => "call",
            Action::ReadResource => "read_resource",
            Action::GetPrompt => "get_prompt",
        }
    }

    /// The action named `s` in the log, if any.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// Whether the action is decided on a server's item through the gateway (`call`,
    /// `read_resource`, `get_prompt`): its context has `arguments` and `pii`, and its request
    /// names the item ([`DecisionRequest::tool`]).
    pub const fn is_gated(self) -> bool {
        matches!(
            self,
            Action::Call | Action::ReadResource | Action::GetPrompt
        )
    }
}

/// The server a request is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerFacts {
    /// The server's registry id (`Attestplane::Server::"<id>"`).
    pub id: String,
    /// Its display name.
    pub name: String,
    /// The tenant that registered it.
    pub tenant: String,
    /// Its resource URI (the handle's `aud`).
    pub resource: String,
    /// Its assurance level exactly as the signed registration records it (`nitro`, `none`;
    /// later `webpki`, `pinned`): `context.server_assurance`. Never derived from the
    /// attestation facts: a `none` server stays `none` whatever evidence is presented.
    pub assurance: String,
}

/// What the enclave knows of the server's attestation at decision time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttestationFacts {
    /// The server's attestation document verified.
    pub verified: bool,
    /// Milliseconds since that verification; `None` when there is none (the context then has
    /// no `age_ms` attribute).
    pub age_ms: Option<u64>,
    /// The document's PCRs equal the registered ones.
    pub pcr_match: bool,
    /// The document came from an enclave in debug mode.
    pub debug: bool,
}

/// The agent's counters, kept by the enclave and passed in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Calls the agent made in the last minute.
    pub calls_last_minute: u64,
    /// The agent's spend so far, in millionths of the currency unit.
    pub spend_micros: u64,
}

/// What the policy sees of one `tools/call` besides the common facts.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CallFacts {
    /// The arguments as they will be forwarded (a JSON object's text), if any. Only the
    /// arguments the policy set declares reach the context.
    pub arguments: Option<String>,
    /// PII findings in the call, by kind name (`card` → 2).
    pub pii: BTreeMap<String, u64>,
}

impl fmt::Debug for CallFacts {
    /// The arguments' length only: they may carry secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallFacts")
            .field("arguments_len", &self.arguments.as_ref().map(String::len))
            .field("pii", &self.pii)
            .finish()
    }
}

/// The type of a declared call argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgumentType {
    /// Cedar `Long`: a JSON integer within ±(2^53 − 1).
    Long,
    /// Cedar `String`: a JSON string.
    String,
    /// Cedar `Bool`: a JSON boolean.
    Bool,
    /// `Set<Long>`: a JSON array of integers.
    SetOfLong,
    /// `Set<String>`: a JSON array of strings.
    SetOfString,
    /// `Set<Bool>`: a JSON array of booleans.
    SetOfBool,
}

impl ArgumentType {
    fn parse(s: &str) -> Option<Self> {
        let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        Some(match compact.as_str() {
            "Long" => ArgumentType::Long,
            "String" => ArgumentType::String,
            "Bool" => ArgumentType::Bool,
            "Set<Long>" => ArgumentType::SetOfLong,
            "Set<String>" => ArgumentType::SetOfString,
            "Set<Bool>" => ArgumentType::SetOfBool,
            _ => return None,
        })
    }

    fn cedar(self) -> &'static str {
        match self {
            ArgumentType::Long => "Long",
            ArgumentType::String => "String",
            ArgumentType::Bool => "Bool",
            ArgumentType::SetOfLong => "Set<Long>",
            ArgumentType::SetOfString => "Set<String>",
            ArgumentType::SetOfBool => "Set<Bool>",
        }
    }
}

/// What the gateway does with PII found in a call's arguments and its result, chosen by the
/// policy: each permit may say `@pii("allow" | "redact" | "refuse")`, and an allowed call gets
/// the strictest rule of the permits that allowed it, where a permit that says nothing counts
/// as [`PiiAction::DEFAULT`]. So PII reaches a tool unredacted only when every permit that
/// allowed the call says `allow`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PiiAction {
    /// Forward PII as it is (findings are still counted and logged).
    Allow,
    /// Replace each finding with `[REDACTED:kind]` before forwarding (arguments) or answering
    /// (results).
    Redact,
    /// Refuse a call whose arguments carry PII, and withhold a result that does.
    Refuse,
}

impl PiiAction {
    /// The rule of a permit that does not say.
    pub const DEFAULT: PiiAction = PiiAction::Redact;

    /// The annotation's (and the log's) word for it.
    pub const fn as_str(self) -> &'static str {
        match self {
            PiiAction::Allow => "allow",
            PiiAction::Redact => "redact",
            PiiAction::Refuse => "refuse",
        }
    }

    /// Parses the annotation's (and the log's) word.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "allow" => PiiAction::Allow,
            "redact" => PiiAction::Redact,
            "refuse" => PiiAction::Refuse,
            _ => return None,
        })
    }
}

impl fmt::Display for PiiAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything a decision depends on, besides the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecisionRequest {
    /// The agent asking.
    pub principal: Principal,
    /// What it asks to do.
    pub action: Action,
    /// The server concerned.
    pub server: ServerFacts,
    /// The item the request is about: the tool's name for [`Action::Call`], the resource's
    /// URI for [`Action::ReadResource`], the prompt's name for [`Action::GetPrompt`]; required
    /// for those, ignored for the others.
    pub tool: Option<String>,
    /// The server's attestation facts.
    pub attestation: AttestationFacts,
    /// The decision's time (passed to Cedar as whole unix seconds).
    pub time: UnixMillis,
    /// The agent's counters.
    pub counters: Counters,
    /// For [`Action::Call`]: the call's arguments, PII findings and server assurance. `None`
    /// is the listing context (no argument present, no finding): what a tool listing is
    /// filtered with.
    pub call: Option<CallFacts>,
}

/// The outcome of one decision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// At least one permit was satisfied and no forbid was.
    pub allowed: bool,
    /// Ids of the determining policies, sorted: the satisfied permits when allowed, the
    /// satisfied forbids when a forbid denied, empty when no permit matched.
    pub policies: Vec<String>,
    /// Evaluation errors (each names its policy), sorted. A policy that errors is skipped.
    pub errors: Vec<String>,
}

impl Decision {
    fn deny_with_error(message: String) -> Self {
        Self {
            allowed: false,
            policies: Vec::new(),
            errors: vec![message],
        }
    }
}

/// Why a policy set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The text is longer than [`MAX_POLICY_TEXT_LEN`].
    #[error("policy text is {len} bytes, more than the maximum {max}")]
    TooLong {
        /// The text's length in bytes.
        len: usize,
        /// [`MAX_POLICY_TEXT_LEN`].
        max: usize,
    },
    /// The text holds more than [`MAX_POLICIES`] policies.
    #[error("policy text holds {count} policies, more than the maximum {max}")]
    TooMany {
        /// The number of policies (and templates) parsed.
        count: usize,
        /// [`MAX_POLICIES`].
        max: usize,
    },
    /// The text is not Cedar.
    #[error("policy text does not parse: {message}")]
    Parse {
        /// Cedar's parse errors, joined with `; `.
        message: String,
    },
    /// The text holds a template (a policy with `?principal` or `?resource` slots).
    #[error("policy `{id}` is a template; only static policies are accepted")]
    Template {
        /// The template's id as Cedar assigned it.
        id: String,
    },
    /// A policy's `@id` annotation is empty.
    #[error("policy number {index} has an empty @id")]
    EmptyId {
        /// The policy's position in the text, from 0.
        index: usize,
    },
    /// Two policies have the same id (from `@id`, or an `@id` equal to a default `policyN`).
    #[error("policy id `{id}` is used more than once")]
    DuplicateId {
        /// The repeated id.
        id: String,
    },
    /// The set does not validate against [`SCHEMA`] in strict mode.
    #[error("policy set does not validate against the schema: {}", messages.join("; "))]
    Validation {
        /// The validator's messages, each naming its policy.
        messages: Vec<String>,
    },
    /// A `@pii` annotation is not `allow`, `redact` or `refuse`, or is on a forbid.
    #[error("policy `{policy}` has a bad @pii annotation: {reason}")]
    Pii {
        /// The policy's id.
        policy: String,
        /// What is wrong.
        reason: String,
    },
    /// An `@arguments` annotation does not parse, or declares an argument twice with two
    /// types.
    #[error("policy `{policy}` declares arguments badly: {reason}")]
    Arguments {
        /// The policy's id.
        policy: String,
        /// What is wrong.
        reason: String,
    },
    /// The built-in schema or the index could not be built (a bug in this module).
    #[error("internal policy engine error: {message}")]
    Internal {
        /// What failed.
        message: String,
    },
}

/// The parsed schema and the names requests are built from; built once per process.
struct Model {
    schema: Schema,
    agent: EntityTypeName,
    user: EntityTypeName,
    tenant: EntityTypeName,
    server: EntityTypeName,
    tool: EntityTypeName,
    resource: EntityTypeName,
    prompt: EntityTypeName,
    actions: [EntityUid; 5],
}

impl Model {
    fn build() -> Result<Self, String> {
        let (schema, _warnings) =
            Schema::from_cedarschema_str(SCHEMA).map_err(|e| format!("schema: {e}"))?;
        let name = |n: &str| -> Result<EntityTypeName, String> {
            n.parse::<EntityTypeName>()
                .map_err(|e| format!("entity type `{n}`: {e}"))
        };
        let action_type = name("Attestplane::Action")?;
        let action = |a: Action| {
            EntityUid::from_type_name_and_id(action_type.clone(), EntityId::new(a.as_str()))
        };
        Ok(Self {
            agent: name("Attestplane::Agent")?,
            user: name("Attestplane::User")?,
            tenant: name("Attestplane::Tenant")?,
            server: name("Attestplane::Server")?,
            tool: name("Attestplane::Tool")?,
            resource: name("Attestplane::Resource")?,
            prompt: name("Attestplane::Prompt")?,
            actions: Action::ALL.map(action),
            schema,
        })
    }

    fn get() -> Result<&'static Model, String> {
        static MODEL: OnceLock<Result<Model, String>> = OnceLock::new();
        MODEL
            .get_or_init(Model::build)
            .as_ref()
            .map_err(Clone::clone)
    }

    fn action(&self, a: Action) -> &EntityUid {
        let [discover, resolve, call, read, get] = &self.actions;
        match a {
            Action::Discover => discover,
            Action::Resolve => resolve,
            Action::Call => call,
            Action::ReadResource => read,
            Action::GetPrompt => get,
        }
    }

    /// The type of the resource of requests for `a`.
    fn resource_type(&self, a: Action) -> &EntityTypeName {
        match a {
            Action::Discover | Action::Resolve => &self.server,
            Action::Call => &self.tool,
            Action::ReadResource => &self.resource,
            Action::GetPrompt => &self.prompt,
        }
    }

    fn uid(ty: &EntityTypeName, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(id))
    }
}

/// The policies one action's requests may need, split by resource scope.
#[derive(Debug, Default)]
struct ActionIndex {
    /// Policies whose resource scope holds for every resource of the action's type.
    any: PolicySet,
    /// Policies whose resource scope names this entity (`==`, `in`, `is .. in`).
    by_entity: HashMap<EntityUid, PolicySet>,
}

impl ActionIndex {
    fn add(set: &mut PolicySet, policy: &cedar::Policy) -> Result<(), PolicyError> {
        set.add(policy.clone()).map_err(|e| PolicyError::Internal {
            message: format!("index: {e}"),
        })
    }
}

/// Where one policy goes in an [`ActionIndex`].
enum ResourceKey {
    /// Every resource (of the given type, if any).
    Any(Option<EntityTypeName>),
    /// Only this entity and its descendants (a superset of `==`).
    Entity(EntityUid),
}

/// A validated Cedar policy set, indexed by action and resource scope.
#[derive(Debug)]
pub struct PolicyEngine {
    text: String,
    arguments: BTreeMap<String, ArgumentType>,
    pii: BTreeMap<String, PiiAction>,
    full: PolicySet,
    index: [ActionIndex; 5],
    authorizer: Authorizer,
    /// How the set reads the context's numbers: what a [`DecisionMemo`] may abstract.
    numbers: NumberUses,
}

impl PolicyEngine {
    /// Parses `text`, names each policy by its `@id("...")` annotation (or Cedar's `policyN`
    /// when it has none), validates the set against [`SCHEMA`] in strict mode (refusing
    /// warnings as well as errors: impossible policies, bidi or confusable characters) and
    /// builds the index. A set that fails any step is refused whole.
    pub fn new(text: &str) -> Result<Self, PolicyError> {
        if text.len() > MAX_POLICY_TEXT_LEN {
            return Err(PolicyError::TooLong {
                len: text.len(),
                max: MAX_POLICY_TEXT_LEN,
            });
        }
        let parsed: PolicySet = text.parse().map_err(|e: cedar::ParseErrors| {
            let message = e
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            PolicyError::Parse { message }
        })?;
        let count = parsed
            .policies()
            .count()
            .saturating_add(parsed.templates().count());
        if count > MAX_POLICIES {
            return Err(PolicyError::TooMany {
                count,
                max: MAX_POLICIES,
            });
        }
        if let Some(template) = parsed.templates().next() {
            return Err(PolicyError::Template {
                id: template.id().to_string(),
            });
        }

        let mut full = PolicySet::new();
        let mut seen = HashSet::new();
        for (index, policy) in parsed.policies().enumerate() {
            let id = match policy.annotation(ID_ANNOTATION) {
                Some("") => return Err(PolicyError::EmptyId { index }),
                Some(id) => id.to_owned(),
                None => policy.id().to_string(),
            };
            if !seen.insert(id.clone()) {
                return Err(PolicyError::DuplicateId { id });
            }
            full.add(policy.new_id(PolicyId::new(&id)))
                .map_err(|e| PolicyError::Internal {
                    message: format!("renaming policy `{id}`: {e}"),
                })?;
        }

        let model = Model::get().map_err(|message| PolicyError::Internal { message })?;
        let arguments = declared_arguments(&full)?;
        let schema = if arguments.is_empty() {
            model.schema.clone()
        } else {
            let text = SCHEMA.replace("  type Arguments = {};", &arguments_type(&arguments));
            Schema::from_cedarschema_str(&text)
                .map(|(schema, _)| schema)
                .map_err(|e| PolicyError::Internal {
                    message: format!("schema with arguments: {e}"),
                })?
        };
        let validation = Validator::new(schema).validate(&full, ValidationMode::Strict);
        // Warnings are refused too: an impossible policy (say a forbid on `call` scoped to a
        // Server) would silently never apply, and bidi or confusable characters make a policy
        // read differently from how it evaluates.
        if !validation.validation_passed_without_warnings() {
            let messages = validation
                .validation_errors()
                .map(ToString::to_string)
                .chain(validation.validation_warnings().map(ToString::to_string))
                .collect();
            return Err(PolicyError::Validation { messages });
        }

        let pii = pii_rules(&full)?;
        let index = build_index(model, &full)?;
        let numbers = NumberUses::of(&full);
        Ok(Self {
            text: text.to_owned(),
            arguments,
            pii,
            full,
            index,
            authorizer: Authorizer::new(),
            numbers,
        })
    }

    /// The empty policy set: every request is denied.
    pub fn deny_all() -> Self {
        Self {
            text: String::new(),
            arguments: BTreeMap::new(),
            pii: BTreeMap::new(),
            full: PolicySet::new(),
            index: Default::default(),
            authorizer: Authorizer::new(),
            numbers: NumberUses::default(),
        }
    }

    /// Decides `req`, evaluating only the policies whose scope can match it. Always equal to
    /// [`PolicyEngine::decide_unindexed`].
    pub fn decide(&self, req: &DecisionRequest) -> Decision {
        let model = match Model::get() {
            Ok(m) => m,
            Err(message) => return Decision::deny_with_error(message),
        };
        let built = match BuiltRequest::new(model, req, &self.arguments) {
            Ok(b) => b,
            Err(message) => return Decision::deny_with_error(message),
        };
        let mut merged = Merge::default();
        for set in self.candidates(req.action, &built) {
            merged.add(
                &self
                    .authorizer
                    .is_authorized(&built.request, set, &built.entities),
            );
        }
        merged.finish()
    }

    /// Decides `req` by evaluating every policy of the set: the reference the index is tested
    /// against, and a baseline for benchmarks.
    pub fn decide_unindexed(&self, req: &DecisionRequest) -> Decision {
        let model = match Model::get() {
            Ok(m) => m,
            Err(message) => return Decision::deny_with_error(message),
        };
        let built = match BuiltRequest::new(model, req, &self.arguments) {
            Ok(b) => b,
            Err(message) => return Decision::deny_with_error(message),
        };
        let mut merged = Merge::default();
        merged.add(
            &self
                .authorizer
                .is_authorized(&built.request, &self.full, &built.entities),
        );
        merged.finish()
    }

    /// What of a call's arguments this policy set can see: the declared arguments the call
    /// passes, as RFC 8785 canonical JSON of an object (members sorted, numbers in their
    /// canonical spelling), or `None` when the call passes none of them (or the set declares
    /// none). Deciding with the projection gives the same verdict as deciding with the whole
    /// arguments (undeclared members are invisible to policies, and a declared member keeps
    /// its value and its type, right or wrong), which is why the log records the projection
    /// and not the arguments: a decision replays exactly from it, and what no policy reads is
    /// never written down.
    ///
    /// A projection longer than [`MAX_PROJECTION_LEN`] is an error (as are arguments that are
    /// not an I-JSON object of at most [`MAX_ARGUMENTS_LEN`] bytes): the gateway refuses the
    /// call as invalid params and writes nothing.
    pub fn project_arguments(&self, arguments: Option<&str>) -> Result<Option<String>, String> {
        let Some(text) = arguments else {
            return Ok(None);
        };
        if self.arguments.is_empty() {
            return Ok(None);
        }
        if text.len() > MAX_ARGUMENTS_LEN {
            return Err(format!(
                "call arguments are {} bytes, more than {MAX_ARGUMENTS_LEN}",
                text.len()
            ));
        }
        let node = json::parse_ijson(text).map_err(|e| format!("call arguments: {e}"))?;
        let JsonValue::Object(members) = &node.value else {
            return Err("call arguments are not an object".to_owned());
        };
        let mut object = String::from("{");
        let mut any = false;
        for m in members
            .iter()
            .filter(|m| self.arguments.contains_key(m.key.as_ref()))
        {
            if any {
                object.push(',');
            }
            any = true;
            json::write_string(&mut object, &m.key);
            object.push(':');
            object.push_str(m.value.span.of(text));
        }
        if !any {
            return Ok(None);
        }
        object.push('}');
        let projection = crate::gateway::jcs::canonicalize(&object)
            .map_err(|e| format!("call arguments: {e}"))?;
        if projection.len() > MAX_PROJECTION_LEN {
            return Err(format!(
                "the declared call arguments' projection is {} bytes, more than \
                 {MAX_PROJECTION_LEN}",
                projection.len()
            ));
        }
        Ok(Some(projection))
    }

    /// The PII rule of an allowed call whose determining permits are `policies` (a
    /// [`Decision::policies`]): the strictest of their `@pii` rules, a permit without one
    /// counting as [`PiiAction::DEFAULT`]. With no policies (nothing allowed it) the default.
    pub fn pii_action(&self, policies: &[String]) -> PiiAction {
        policies
            .iter()
            .map(|id| self.pii.get(id).copied().unwrap_or(PiiAction::DEFAULT))
            .max()
            .unwrap_or(PiiAction::DEFAULT)
    }

    /// The call arguments the set declares (`@arguments`), by name.
    pub fn declared_arguments(&self) -> &BTreeMap<String, ArgumentType> {
        &self.arguments
    }

    /// The number of policies in the set.
    pub fn policy_count(&self) -> usize {
        self.full.policies().count()
    }

    /// The policy text the engine was built from (empty for [`PolicyEngine::deny_all`]).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The non-empty parts of the index a request must evaluate: its action's "any" bucket and
    /// the buckets of its resource and the resource's ancestors.
    fn candidates<'a>(
        &'a self,
        action: Action,
        built: &'a BuiltRequest,
    ) -> impl Iterator<Item = &'a PolicySet> + 'a {
        let index = self.action_index(action);
        std::iter::once(&index.any)
            .chain(
                built
                    .resource_and_ancestors
                    .iter()
                    .filter_map(|uid| index.by_entity.get(uid)),
            )
            .filter(|set| !set.is_empty())
    }

    fn action_index(&self, a: Action) -> &ActionIndex {
        let [discover, resolve, call, read, get] = &self.index;
        match a {
            Action::Discover => discover,
            Action::Resolve => resolve,
            Action::Call => call,
            Action::ReadResource => read,
            Action::GetPrompt => get,
        }
    }
}

/// Splits `full` by action and resource scope (see the module docs).
fn build_index(model: &Model, full: &PolicySet) -> Result<[ActionIndex; 5], PolicyError> {
    let mut index: [ActionIndex; 5] = Default::default();
    for policy in full.policies() {
        let key = match policy.resource_constraint() {
            ResourceConstraint::Any => ResourceKey::Any(None),
            ResourceConstraint::Is(ty) => ResourceKey::Any(Some(ty)),
            ResourceConstraint::Eq(uid)
            | ResourceConstraint::In(uid)
            | ResourceConstraint::IsIn(_, uid) => ResourceKey::Entity(uid),
        };
        let action_constraint = policy.action_constraint();
        for (action, slot) in Action::ALL.into_iter().zip(index.iter_mut()) {
            let uid = model.action(action);
            // No action groups and no action entities in the store: `in` is membership.
            let applies = match &action_constraint {
                ActionConstraint::Any => true,
                ActionConstraint::Eq(a) => a == uid,
                ActionConstraint::In(list) => list.contains(uid),
            };
            if !applies {
                continue;
            }
            match &key {
                ResourceKey::Any(None) => ActionIndex::add(&mut slot.any, policy)?,
                ResourceKey::Any(Some(ty)) => {
                    if ty == model.resource_type(action) {
                        ActionIndex::add(&mut slot.any, policy)?;
                    }
                }
                ResourceKey::Entity(uid) => {
                    let set = slot.by_entity.entry(uid.clone()).or_default();
                    ActionIndex::add(set, policy)?;
                }
            }
        }
    }
    Ok(index)
}

/// A request's Cedar form.
struct BuiltRequest {
    request: cedar::Request,
    entities: Entities,
    /// The resource, then its ancestors in `entities`.
    resource_and_ancestors: Vec<EntityUid>,
}

impl BuiltRequest {
    fn new(
        model: &Model,
        req: &DecisionRequest,
        arguments: &BTreeMap<String, ArgumentType>,
    ) -> Result<Self, String> {
        let p = &req.principal;
        let s = &req.server;
        let agent_tenant = Model::uid(&model.tenant, &p.tenant);
        let server_tenant = Model::uid(&model.tenant, &s.tenant);
        let user = Model::uid(&model.user, &p.user);
        let agent = Model::uid(&model.agent, &p.agent);
        let server = Model::uid(&model.server, &s.id);

        let entity = |uid: &EntityUid,
                      attrs: Vec<(&str, RestrictedExpression)>,
                      parent: &EntityUid|
         -> Result<Entity, String> {
            Entity::new_with_tags(
                uid.clone(),
                attrs.into_iter().map(|(k, v)| (k.to_owned(), v)),
                [parent.clone()],
                [],
            )
            .map_err(|e| format!("building entity {uid}: {e}"))
        };
        let uid_expr = |u: &EntityUid| RestrictedExpression::new_entity_uid(u.clone());
        let str_expr = |v: &str| RestrictedExpression::new_string(v.to_owned());

        let mut entities = Vec::with_capacity(6);
        entities.push(entity(
            &agent,
            vec![
                ("user", uid_expr(&user)),
                ("tenant", uid_expr(&agent_tenant)),
                (
                    "roles",
                    RestrictedExpression::new_set(p.roles.iter().map(|r| str_expr(r))),
                ),
                ("issuer", str_expr(&p.issuer)),
            ],
            &agent_tenant,
        )?);
        entities.push(entity(&user, Vec::new(), &agent_tenant)?);
        entities.push(entity(
            &server,
            vec![
                ("tenant", uid_expr(&server_tenant)),
                ("name", str_expr(&s.name)),
                ("resource", str_expr(&s.resource)),
            ],
            &server_tenant,
        )?);
        entities.push(Entity::new_no_attrs(agent_tenant.clone(), HashSet::new()));
        if server_tenant != agent_tenant {
            entities.push(Entity::new_no_attrs(server_tenant.clone(), HashSet::new()));
        }

        let (resource, resource_and_ancestors) = match req.action {
            Action::Discover | Action::Resolve => (server.clone(), vec![server, server_tenant]),
            Action::Call | Action::ReadResource | Action::GetPrompt => {
                let Some(item) = &req.tool else {
                    let what = match req.action {
                        Action::ReadResource => "resource",
                        Action::GetPrompt => "prompt",
                        _ => "tool",
                    };
                    return Err(format!("{} request names no {what}", req.action.as_str()));
                };
                let ty = match req.action {
                    Action::ReadResource => &model.resource,
                    Action::GetPrompt => &model.prompt,
                    _ => &model.tool,
                };
                let uid = Model::uid(ty, &format!("{}/{}", s.id, item));
                let mut attrs = vec![
                    ("name", str_expr(item)),
                    ("server", uid_expr(&server)),
                    ("tenant", uid_expr(&server_tenant)),
                ];
                if req.action == Action::ReadResource {
                    attrs.push(("uri", str_expr(item)));
                }
                entities.push(entity(&uid, attrs, &server)?);
                (uid.clone(), vec![uid, server, server_tenant])
            }
        };
        let entities = Entities::from_entities(entities, None)
            .map_err(|e| format!("building entities: {e}"))?;

        let context = Context::from_pairs(context_pairs(req, arguments)?)
            .map_err(|e| format!("building context: {e}"))?;
        let request = cedar::Request::new(
            agent,
            model.action(req.action).clone(),
            resource,
            context,
            None,
        )
        .map_err(|e| format!("building request: {e}"))?;
        Ok(Self {
            request,
            entities,
            resource_and_ancestors,
        })
    }
}

/// A Cedar `Long` from a `u64`, saturating at `i64::MAX`.
fn long(v: u64) -> RestrictedExpression {
    RestrictedExpression::new_long(saturating_long(v))
}

/// The `Long` the context carries for a `u64`: saturated at `i64::MAX`.
fn saturating_long(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The request context (see [`SCHEMA`]).
fn context_pairs(
    req: &DecisionRequest,
    declared: &BTreeMap<String, ArgumentType>,
) -> Result<Vec<(String, RestrictedExpression)>, String> {
    let a = &req.attestation;
    // The numbers come from the one function a memo's key is computed with.
    let [time, age_ms, calls_last_minute, spend_micros] = memo::context_numbers(&req.key());
    let mut attestation = vec![
        (
            "verified".to_owned(),
            RestrictedExpression::new_bool(a.verified),
        ),
        (
            "pcr_match".to_owned(),
            RestrictedExpression::new_bool(a.pcr_match),
        ),
        ("debug".to_owned(), RestrictedExpression::new_bool(a.debug)),
    ];
    if let Some(age) = age_ms {
        attestation.push(("age_ms".to_owned(), RestrictedExpression::new_long(age)));
    }
    let counters = vec![
        (
            "calls_last_minute".to_owned(),
            RestrictedExpression::new_long(calls_last_minute.unwrap_or(0)),
        ),
        (
            "spend_micros".to_owned(),
            RestrictedExpression::new_long(spend_micros.unwrap_or(0)),
        ),
    ];
    let record = |fields| {
        RestrictedExpression::new_record(fields).map_err(|e| format!("building context: {e}"))
    };
    let mut pairs = vec![
        ("attestation".to_owned(), record(attestation)?),
        (
            "time".to_owned(),
            RestrictedExpression::new_long(time.unwrap_or(0)),
        ),
        ("counters".to_owned(), record(counters)?),
    ];
    if req.action.is_gated() {
        let listing = CallFacts::default();
        let call = req.call.as_ref().unwrap_or(&listing);
        pairs.push((
            "arguments".to_owned(),
            record(argument_pairs(call.arguments.as_deref(), declared)?)?,
        ));
        pairs.push(("pii".to_owned(), record(pii_pairs(&call.pii))?));
    }
    // The registration's level, for every action: never derived from the attestation facts.
    pairs.push((
        "server_assurance".to_owned(),
        RestrictedExpression::new_string(req.server.assurance.clone()),
    ));
    Ok(pairs)
}

/// `context.pii`: the total, the kinds, and a count per known kind (0 when none).
fn pii_pairs(pii: &BTreeMap<String, u64>) -> Vec<(String, RestrictedExpression)> {
    let total = pii.values().fold(0u64, |a, b| a.saturating_add(*b));
    let mut pairs = vec![
        ("count".to_owned(), long(total)),
        (
            "types".to_owned(),
            RestrictedExpression::new_set(
                pii.iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(k, _)| RestrictedExpression::new_string(k.clone())),
            ),
        ),
    ];
    for kind in PiiKind::ALL {
        let n = pii.get(kind.as_str()).copied().unwrap_or(0);
        pairs.push((kind.as_str().to_owned(), long(n)));
    }
    pairs
}

/// `context.arguments`: each declared argument the call passes, converted to its declared
/// type. A declared argument of another type refuses the request (an error, so deny): a
/// policy such as `context.arguments.amount <= 10000` must never be skipped because the agent
/// sent `"amount": "1e9"`.
fn argument_pairs(
    text: Option<&str>,
    declared: &BTreeMap<String, ArgumentType>,
) -> Result<Vec<(String, RestrictedExpression)>, String> {
    let Some(text) = text else {
        return Ok(Vec::new());
    };
    if declared.is_empty() {
        return Ok(Vec::new());
    }
    if text.len() > MAX_ARGUMENTS_LEN {
        return Err(format!(
            "call arguments are {} bytes, more than {MAX_ARGUMENTS_LEN}",
            text.len()
        ));
    }
    let node = json::parse_ijson(text).map_err(|e| format!("call arguments: {e}"))?;
    let JsonValue::Object(members) = &node.value else {
        return Err("call arguments are not an object".to_owned());
    };
    let mut out = Vec::new();
    for m in members {
        let Some(ty) = declared.get(m.key.as_ref()) else {
            continue;
        };
        let bad = || format!("argument `{}` is not a {}", m.key, ty.cedar());
        let scalar = |v: &JsonValue<'_>, want: ArgumentType| -> Option<RestrictedExpression> {
            match (want, v) {
                (ArgumentType::Long, JsonValue::Number(raw)) => {
                    json_long(raw).map(RestrictedExpression::new_long)
                }
                (ArgumentType::String, JsonValue::String(s)) => {
                    Some(RestrictedExpression::new_string(s.to_string()))
                }
                (ArgumentType::Bool, JsonValue::Bool(b)) => {
                    Some(RestrictedExpression::new_bool(*b))
                }
                _ => None,
            }
        };
        let expr = match ty {
            ArgumentType::Long | ArgumentType::String | ArgumentType::Bool => {
                scalar(&m.value.value, *ty).ok_or_else(bad)?
            }
            ArgumentType::SetOfLong | ArgumentType::SetOfString | ArgumentType::SetOfBool => {
                let JsonValue::Array(items) = &m.value.value else {
                    return Err(bad());
                };
                if items.len() > MAX_ARGUMENT_SET_LEN {
                    return Err(format!(
                        "argument `{}` has more than {MAX_ARGUMENT_SET_LEN} elements",
                        m.key
                    ));
                }
                let element = match ty {
                    ArgumentType::SetOfLong => ArgumentType::Long,
                    ArgumentType::SetOfString => ArgumentType::String,
                    _ => ArgumentType::Bool,
                };
                let values = items
                    .iter()
                    .map(|i| scalar(&i.value, element).ok_or_else(bad))
                    .collect::<Result<Vec<_>, String>>()?;
                RestrictedExpression::new_set(values)
            }
        };
        out.push((m.key.to_string(), expr));
    }
    Ok(out)
}

/// A JSON number as a Cedar `Long`, if it is an integer (however spelled: `1e3` is 1000)
/// within ±(2^53 − 1).
fn json_long(raw: &str) -> Option<i64> {
    const MAX_SAFE: i64 = (1 << 53) - 1;
    let v = match raw.parse::<i64>() {
        Ok(v) => v,
        Err(_) => {
            let f: f64 = raw.parse().ok()?;
            if !f.is_finite() || f.fract() != 0.0 || f.abs() > MAX_SAFE as f64 {
                return None;
            }
            f as i64
        }
    };
    (-MAX_SAFE..=MAX_SAFE).contains(&v).then_some(v)
}

/// The `@pii` rules of the set's permits, by policy id. A forbid never allows anything, so a
/// rule on one would mean nothing: refused, like every other annotation that cannot apply.
fn pii_rules(set: &PolicySet) -> Result<BTreeMap<String, PiiAction>, PolicyError> {
    let mut out = BTreeMap::new();
    for policy in set.policies() {
        let Some(text) = policy.annotation(PII_ANNOTATION) else {
            continue;
        };
        let id = policy.id().to_string();
        let Some(action) = PiiAction::parse(text) else {
            return Err(PolicyError::Pii {
                policy: id,
                reason: format!("`{text}` is not allow, redact or refuse"),
            });
        };
        if policy.effect() != cedar_policy::Effect::Permit {
            return Err(PolicyError::Pii {
                policy: id,
                reason: "only a permit chooses what happens to PII".into(),
            });
        }
        out.insert(id, action);
    }
    Ok(out)
}

/// The arguments declared by the set's `@arguments` annotations.
fn declared_arguments(set: &PolicySet) -> Result<BTreeMap<String, ArgumentType>, PolicyError> {
    let mut out: BTreeMap<String, ArgumentType> = BTreeMap::new();
    for policy in set.policies() {
        let Some(text) = policy.annotation(ARGUMENTS_ANNOTATION) else {
            continue;
        };
        let bad = |reason: String| PolicyError::Arguments {
            policy: policy.id().to_string(),
            reason,
        };
        for decl in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            let Some((name, ty)) = decl.split_once(':') else {
                return Err(bad(format!("`{decl}` is not `name: Type`")));
            };
            let name = name.trim();
            let valid_name = name.len() <= 64
                && name
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid_name {
                return Err(bad(format!(
                    "`{name}` is not an identifier of at most 64 characters"
                )));
            }
            let ty = ArgumentType::parse(ty).ok_or_else(|| {
                bad(format!(
                    "`{}` is not Long, String, Bool or a Set of them",
                    ty.trim()
                ))
            })?;
            match out.get(name) {
                Some(t) if *t != ty => {
                    return Err(bad(format!(
                        "`{name}` is declared as {} elsewhere",
                        t.cedar()
                    )));
                }
                _ => {
                    out.insert(name.to_owned(), ty);
                }
            }
            if out.len() > MAX_ARGUMENT_DECLARATIONS {
                return Err(bad(format!(
                    "more than {MAX_ARGUMENT_DECLARATIONS} arguments declared"
                )));
            }
        }
    }
    Ok(out)
}

/// The schema's `Arguments` type for the declared arguments (every one optional).
fn arguments_type(declared: &BTreeMap<String, ArgumentType>) -> String {
    let fields: Vec<String> = declared
        .iter()
        .map(|(name, ty)| format!("\"{name}\"?: {}", ty.cedar()))
        .collect();
    format!("  type Arguments = {{ {} }};", fields.join(", "))
}

/// Combines responses over disjoint parts of a policy set into the response over their union,
/// by Cedar's rule: any satisfied forbid denies and determines; otherwise any satisfied permit
/// allows and determines; otherwise deny with no determining policy.
#[derive(Default)]
struct Merge {
    /// Determining policies of denying responses: the satisfied forbids.
    forbids: BTreeSet<String>,
    /// Determining policies of allowing responses: the satisfied permits.
    permits: BTreeSet<String>,
    errors: Vec<String>,
}

impl Merge {
    fn add(&mut self, response: &cedar::Response) {
        let reasons = response.diagnostics().reason().map(ToString::to_string);
        match response.decision() {
            cedar::Decision::Allow => self.permits.extend(reasons),
            cedar::Decision::Deny => self.forbids.extend(reasons),
        }
        self.errors
            .extend(response.diagnostics().errors().map(ToString::to_string));
    }

    fn finish(self) -> Decision {
        let mut errors = self.errors;
        errors.sort();
        let allowed = self.forbids.is_empty() && !self.permits.is_empty();
        let policies = if self.forbids.is_empty() {
            self.permits
        } else {
            self.forbids
        };
        Decision {
            allowed,
            policies: policies.into_iter().collect(),
            errors,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A call-shaped request of agent-1 (tenant acme) to srv-1's `read`, attested, at
    /// 1,700,000,000 s; shared with the memo's tests.
    pub(crate) fn request(action: Action) -> DecisionRequest {
        DecisionRequest {
            principal: Principal {
                agent: "agent-1".into(),
                user: "alice".into(),
                tenant: "acme".into(),
                roles: vec!["tool-user".into()],
                issuer: "https://idp.example".into(),
            },
            action,
            server: ServerFacts {
                id: "srv-1".into(),
                name: "files".into(),
                tenant: "acme".into(),
                resource: "https://files.example/mcp".into(),
                assurance: "nitro".into(),
            },
            tool: Some("read".into()),
            attestation: AttestationFacts {
                verified: true,
                age_ms: Some(1_000),
                pcr_match: true,
                debug: false,
            },
            time: UnixMillis::from_secs(1_700_000_000),
            counters: Counters::default(),
            call: None,
        }
    }

    #[test]
    fn the_logged_projection_decides_like_the_whole_arguments() {
        let engine = PolicyEngine::new(
            r#"@id("cap") @arguments("amount: Long, to: String, tags: Set<String>")
               permit(principal, action == Attestplane::Action::"call", resource)
               when { context.arguments has amount && context.arguments.amount <= 10000 }
               unless { context.arguments has to && context.arguments.to == "mallory" };"#,
        )
        .unwrap();
        let cases = [
            r#"{"amount":10000}"#,
            r#"{"amount":1e4,"memo":"card 4111 1111 1111 1111"}"#,
            r#"{"amount":10001}"#,
            r#"{"amount":"5"}"#,
            r#"{"amount":2.5}"#,
            r#"{"to":"mallory","amount":1}"#,
            r#"{"to":"alice","amount":1,"tags":["a","b"]}"#,
            r#"{"tags":[1],"amount":1}"#,
            r#"{"memo":"x"}"#,
            r#"{}"#,
        ];
        let mut verdicts = std::collections::BTreeSet::new();
        for args in cases {
            let mut whole = request(Action::Call);
            whole.call = Some(CallFacts {
                arguments: Some(args.into()),
                ..CallFacts::default()
            });
            let projection = engine.project_arguments(Some(args)).unwrap();
            if let Some(p) = &projection {
                assert!(!p.contains("memo"), "undeclared member logged: {p}");
            }
            let mut projected = whole.clone();
            projected.call = Some(CallFacts {
                arguments: projection,
                ..CallFacts::default()
            });
            let (a, b) = (engine.decide(&whole), engine.decide(&projected));
            assert_eq!(a.allowed, b.allowed, "{args}");
            assert_eq!(a.policies, b.policies, "{args}");
            assert_eq!(a.errors.is_empty(), b.errors.is_empty(), "{args}");
            verdicts.insert(a.allowed);
        }
        // Both verdicts occur, so the comparison above can fail.
        assert_eq!(verdicts.len(), 2);
        assert_eq!(
            engine
                .project_arguments(Some(r#"{"to":"bob","amount":1e3}"#))
                .unwrap()
                .as_deref(),
            Some(r#"{"amount":1000,"to":"bob"}"#)
        );
        assert_eq!(
            PolicyEngine::deny_all().project_arguments(Some("{}")),
            Ok(None)
        );
        assert!(engine.project_arguments(Some("[1]")).is_err());
    }

    #[test]
    fn a_projection_over_its_bound_is_refused_even_when_the_agent_sent_less() {
        let engine = PolicyEngine::new(
            r#"@id("cap") @arguments("to: String")
               permit(principal, action == Attestplane::Action::"call", resource);"#,
        )
        .unwrap();
        // A string at the bound's edge projects; one byte more does not.
        let frame = r#"{"to":""}"#.len();
        let fits = format!(r#"{{"to":"{}"}}"#, "x".repeat(MAX_PROJECTION_LEN - frame));
        assert_eq!(
            engine
                .project_arguments(Some(&fits))
                .unwrap()
                .map(|p| p.len()),
            Some(MAX_PROJECTION_LEN)
        );
        let over = format!(
            r#"{{"to":"{}"}}"#,
            "x".repeat(MAX_PROJECTION_LEN - frame + 1)
        );
        assert!(engine.project_arguments(Some(&over)).is_err());
        // Canonical numbers outgrow their spelling: 1e15 is sixteen digits. Arguments far
        // under the bound as sent are over it as projected.
        let numbers = vec!["1e15"; MAX_PROJECTION_LEN / 16].join(",");
        let sent = format!(r#"{{"to":[{numbers}],"memo":"{}"}}"#, "m".repeat(1000));
        assert!(sent.len() < MAX_PROJECTION_LEN / 2);
        let e = engine.project_arguments(Some(&sent)).unwrap_err();
        assert!(e.contains("projection"), "{e}");
        // Undeclared members do not count.
        let quiet = format!(
            r#"{{"to":"x","memo":"{}"}}"#,
            "m".repeat(MAX_PROJECTION_LEN * 2)
        );
        assert!(engine.project_arguments(Some(&quiet)).is_ok());
    }

    #[test]
    fn pii_rule_is_the_strictest_of_the_permits_that_allowed_the_call() {
        let engine = PolicyEngine::new(
            r#"@id("open") @pii("allow") permit(principal, action, resource);
               @id("quiet") permit(principal, action, resource);
               @id("strict") @pii("refuse") permit(principal, action, resource);"#,
        )
        .unwrap();
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(engine.pii_action(&ids(&["open"])), PiiAction::Allow);
        // A permit that says nothing counts as the default, so it cannot be loosened by
        // another permit's `allow`.
        assert_eq!(
            engine.pii_action(&ids(&["open", "quiet"])),
            PiiAction::Redact
        );
        assert_eq!(
            engine.pii_action(&ids(&["open", "quiet", "strict"])),
            PiiAction::Refuse
        );
        assert_eq!(engine.pii_action(&[]), PiiAction::DEFAULT);
        let bad = PolicyEngine::new(r#"@pii("sometimes") permit(principal, action, resource);"#);
        assert!(matches!(bad, Err(PolicyError::Pii { .. })), "{bad:?}");
        let on_forbid = PolicyEngine::new(
            r#"permit(principal, action, resource);
               @pii("allow") forbid(principal, action, resource) when { principal.issuer == "x" };"#,
        );
        assert!(
            matches!(on_forbid, Err(PolicyError::Pii { .. })),
            "{on_forbid:?}"
        );
    }

    #[test]
    fn schema_parses() {
        assert!(Model::get().is_ok(), "{:?}", Model::get().err());
    }

    #[test]
    fn built_requests_conform_to_the_schema() {
        let model = Model::get().unwrap();
        for action in Action::ALL {
            for age in [None, Some(5), Some(u64::MAX)] {
                let mut req = request(action);
                req.attestation.age_ms = age;
                req.counters.spend_micros = u64::MAX;
                let built = BuiltRequest::new(model, &req, &BTreeMap::new()).unwrap();
                let p = built.request.principal().unwrap().clone();
                let a = built.request.action().unwrap().clone();
                let r = built.request.resource().unwrap().clone();
                let c = built.request.context().unwrap().clone();
                cedar::Request::new(p, a, r, c, Some(&model.schema)).unwrap();
                let entities: Vec<Entity> = built.entities.iter().cloned().collect();
                Entities::from_entities(entities, Some(&model.schema)).unwrap();
            }
        }
    }

    #[test]
    fn counters_saturate_instead_of_overflowing() {
        let engine = PolicyEngine::new(
            r#"@id("huge") permit(principal, action, resource)
               when { context.counters.spend_micros == 9223372036854775807 };"#,
        )
        .unwrap();
        let mut req = request(Action::Resolve);
        req.counters.spend_micros = u64::MAX;
        assert!(engine.decide(&req).allowed);
        req.counters.spend_micros = 1;
        assert!(!engine.decide(&req).allowed);
    }

    #[test]
    fn age_is_absent_without_attestation() {
        let engine = PolicyEngine::new(
            r#"@id("fresh") permit(principal, action, resource)
               when { context.attestation has age_ms && context.attestation.age_ms < 60000 };"#,
        )
        .unwrap();
        let mut req = request(Action::Resolve);
        assert!(engine.decide(&req).allowed);
        req.attestation.age_ms = None;
        assert!(!engine.decide(&req).allowed);
        assert!(engine.decide(&req).errors.is_empty());
    }

    #[test]
    fn call_without_tool_is_denied_with_an_error() {
        let engine = PolicyEngine::new("permit(principal, action, resource);").unwrap();
        let mut req = request(Action::Call);
        assert!(engine.decide(&req).allowed);
        req.tool = None;
        let d = engine.decide(&req);
        assert!(!d.allowed);
        assert_eq!(d.errors, vec!["call request names no tool".to_owned()]);
        assert_eq!(d, engine.decide_unindexed(&req));
    }

    #[test]
    fn rejects_templates() {
        let err =
            PolicyEngine::new("permit(principal == ?principal, action, resource);").unwrap_err();
        assert!(matches!(err, PolicyError::Template { .. }), "{err}");
    }

    #[test]
    fn rejects_duplicate_and_empty_ids() {
        let dup = r#"@id("a") permit(principal, action, resource);
                     @id("a") forbid(principal, action, resource);"#;
        assert_eq!(
            PolicyEngine::new(dup).unwrap_err(),
            PolicyError::DuplicateId { id: "a".into() }
        );
        let clash = r#"@id("policy1") permit(principal, action, resource);
                       forbid(principal, action, resource);"#;
        assert_eq!(
            PolicyEngine::new(clash).unwrap_err(),
            PolicyError::DuplicateId {
                id: "policy1".into()
            }
        );
        let empty =
            r#"permit(principal, action, resource); @id("") permit(principal, action, resource);"#;
        assert_eq!(
            PolicyEngine::new(empty).unwrap_err(),
            PolicyError::EmptyId { index: 1 }
        );
    }

    #[test]
    fn rejects_too_many_policies() {
        let text = "permit(principal,action,resource);".repeat(MAX_POLICIES + 1);
        assert!(text.len() <= MAX_POLICY_TEXT_LEN);
        assert_eq!(
            PolicyEngine::new(&text).unwrap_err(),
            PolicyError::TooMany {
                count: MAX_POLICIES + 1,
                max: MAX_POLICIES
            }
        );
    }

    #[test]
    fn rejects_impossible_policies_and_bidi_text() {
        for text in [
            // `call`'s resource is a Tool, so this forbid could never apply.
            r#"forbid(principal, action == Attestplane::Action::"call",
                      resource == Attestplane::Server::"evil");"#,
            r#"permit(principal, action, resource == Attestplane::Tenant::"t");"#,
            "permit(principal, action, resource) when { principal.issuer == \"a\u{202e}b\" };",
        ] {
            let err = PolicyEngine::new(text).unwrap_err();
            assert!(
                matches!(err, PolicyError::Validation { .. }),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn index_evaluates_only_policies_whose_scope_can_match() {
        let engine = PolicyEngine::new(
            r#"@id("any") permit(principal, action, resource);
               @id("srv-1") permit(principal, action, resource == Attestplane::Server::"srv-1");
               @id("srv-2") permit(principal, action, resource == Attestplane::Server::"srv-2");
               @id("in-srv-2") permit(principal, action, resource in Attestplane::Server::"srv-2");
               @id("acme") permit(principal, action, resource in Attestplane::Tenant::"acme");
               @id("globex") permit(principal, action, resource in Attestplane::Tenant::"globex");
               @id("read") forbid(principal, action, resource == Attestplane::Tool::"srv-1/read");
               @id("write") forbid(principal, action, resource == Attestplane::Tool::"srv-1/write");
               @id("tools") permit(principal, action, resource is Attestplane::Tool);
               @id("calls") permit(principal, action == Attestplane::Action::"call", resource);"#,
        )
        .unwrap();
        let model = Model::get().unwrap();
        let evaluated = |req: &DecisionRequest| -> BTreeSet<String> {
            let built = BuiltRequest::new(model, req, &BTreeMap::new()).unwrap();
            engine
                .candidates(req.action, &built)
                .flat_map(|set| set.policies().map(|p| p.id().to_string()))
                .collect()
        };
        let ids = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(
            evaluated(&request(Action::Resolve)),
            ids(&["any", "srv-1", "acme"])
        );
        assert_eq!(
            evaluated(&request(Action::Call)),
            ids(&["any", "srv-1", "acme", "read", "tools", "calls"])
        );
    }

    #[test]
    fn engine_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<PolicyEngine>();
    }
}
