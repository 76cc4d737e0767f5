//! `/api/v1`: the agent and admin API (bearer token). Claiming lets agent desktops without AMQP
//! (and single-node mode) take assignments: claim leases the highest-priority assignment of a
//! queue; ack completes it; an expired lease returns it to the queue.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, RawQuery, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use tracing::warn;

use super::AppState;
use crate::store::{LinkOutcome, MergeOutcome};
use switchboard_channel::{envelope, identity};

/// Longest long-poll a claim may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// Lease when the claim does not say.
const DEFAULT_LEASE: Duration = Duration::from_secs(60);
/// Longest lease a claim may ask for.
const MAX_LEASE: Duration = Duration::from_secs(3600);

pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message.into()}})),
    )
        .into_response()
}

/// A customer or conversation id as the store keeps it: ids are UUIDs, which may be written
/// in upper case (or without hyphens); anything else is kept as given, to answer 404.
fn canonical_id(id: String) -> String {
    uuid::Uuid::parse_str(&id).map_or(id, |uuid| uuid.to_string())
}

/// The largest request body `/api/v1` reads (axum's default, stated).
pub const API_BODY_LIMIT: usize = 2 * 1024 * 1024;

/// The answer to a JSON body that could not be read: `413 body_too_large` past the body
/// limit, `415 unsupported_media_type` without `Content-Type: application/json`, else
/// `400 invalid_body` saying what was `expected`.
fn body_rejection(rejection: &JsonRejection, expected: &str) -> Response {
    match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is larger than the API's limit of {API_BODY_LIMIT} bytes"),
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON, with Content-Type: application/json",
        ),
        _ => error(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("expected {expected}: {}", rejection.body_text()),
        ),
    }
}

/// A JSON object body read as `T`, or the answer to give: [`body_rejection`]'s, or
/// `400 invalid_body` for anything but an object (serde alone would also read a struct from an
/// array of its fields in order) or an object that is not `T`.
fn object_body<T: serde::de::DeserializeOwned>(
    body: Result<Json<Value>, JsonRejection>,
    expected: &str,
) -> Result<T, Box<Response>> {
    let invalid = |problem: String| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("expected {expected}: {problem}"),
        ))
    };
    let Json(value) = body.map_err(|rejection| Box::new(body_rejection(&rejection, expected)))?;
    if !value.is_object() {
        return Err(invalid("the body is not a JSON object".to_owned()));
    }
    serde_json::from_value(value).map_err(|e| invalid(e.to_string()))
}

/// Requires `Authorization: Bearer <[http] admin_token>`.
pub async fn require_token(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = state.admin_token.as_deref() else {
        return error(
            StatusCode::UNAUTHORIZED,
            "api_disabled",
            "the API needs a token: set [http] admin_token",
        );
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme's name is case-insensitive (RFC 9110 §11.1).
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim_start());
    match given {
        Some(given) if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) => {
            next.run(request).await
        }
        Some(_) => error(
            StatusCode::UNAUTHORIZED,
            "bad_token",
            "the bearer token is not valid",
        ),
        None => error(
            StatusCode::UNAUTHORIZED,
            "missing_token",
            "send Authorization: Bearer <token>",
        ),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimQuery {
    /// Seconds to wait for an assignment (long poll); 0 answers at once.
    #[serde(default)]
    wait: Option<f64>,
    /// Seconds the claim is leased for.
    #[serde(default)]
    lease: Option<f64>,
    /// The claiming agent's id: recorded as the conversation's agent, so that its next
    /// assignment names them as `context.previous_agent`.
    #[serde(default)]
    agent: Option<String>,
}

/// The longest agent id `claim` takes, in bytes.
const MAX_AGENT_ID_BYTES: usize = 128;

/// The shortest lease `claim` grants: a shorter one would end before its answer arrives.
const MIN_LEASE: Duration = Duration::from_millis(1);

/// A seconds parameter within `range`, or the message saying why not.
fn seconds(
    value: Option<f64>,
    default: Duration,
    range: std::ops::RangeInclusive<Duration>,
    name: &str,
) -> Result<Duration, String> {
    match value {
        None => Ok(default),
        Some(s)
            if s.is_finite()
                && s >= range.start().as_secs_f64()
                && s <= range.end().as_secs_f64() =>
        {
            Ok(Duration::from_secs_f64(s))
        }
        Some(_) => Err(format!(
            "`{name}` must be between {} and {} seconds",
            range.start().as_secs_f64(),
            range.end().as_secs_f64()
        )),
    }
}

/// `POST /api/v1/queues/{name}/claim?wait=S&lease=S`
pub async fn claim(
    State(state): State<Arc<AppState>>,
    Path(queue): Path<String>,
    query: Result<Query<ClaimQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let query = match query {
        Ok(Query(query)) => query,
        Err(rejection) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_parameter",
                format!(
                    "{}: claim takes `wait` and `lease`, in seconds, and `agent`",
                    rejection.body_text()
                ),
            );
        }
    };
    let agent = match query.agent.as_deref().map(str::trim) {
        None => None,
        Some(agent)
            if !agent.is_empty()
                && agent.len() <= MAX_AGENT_ID_BYTES
                && !agent.chars().any(char::is_control) =>
        {
            Some(agent.to_owned())
        }
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_parameter",
                format!(
                    "`agent` must be an id of 1 to {MAX_AGENT_ID_BYTES} bytes without control characters"
                ),
            );
        }
    };
    // A queue a reload removed can still be emptied: nothing is left stranded in it.
    if state.rules.load().queue(&queue).is_none()
        && !(crate::router::rules::valid_queue_name(&queue) && state.bus.holds(&queue).await)
    {
        return error(
            StatusCode::NOT_FOUND,
            "unknown_queue",
            format!("no queue `{queue}` in the routing rules"),
        );
    }
    let invalid = |message: String| error(StatusCode::BAD_REQUEST, "invalid_parameter", message);
    let wait = match seconds(
        query.wait,
        Duration::ZERO,
        Duration::ZERO..=MAX_WAIT,
        "wait",
    ) {
        Ok(wait) => wait,
        Err(message) => return invalid(message),
    };
    let lease = match seconds(query.lease, DEFAULT_LEASE, MIN_LEASE..=MAX_LEASE, "lease") {
        Ok(lease) => lease,
        Err(message) => return invalid(message),
    };
    match state.bus.claim(&queue, wait, lease, &state.shutdown).await {
        Ok(Some(claimed)) => {
            let assignment: Value =
                serde_json::from_str(&claimed.body).unwrap_or(Value::String(claimed.body));
            if let Some(agent) = &agent {
                record_agent(&state, &assignment, agent).await;
            }
            let expires = OffsetDateTime::from_unix_timestamp_nanos(
                i128::from(claimed.lease_expires_ms) * 1_000_000,
            )
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            });
            Json(json!({
                "assignment_id": claimed.assignment_id,
                "queue": queue,
                "priority": claimed.priority,
                "redelivered": claimed.redelivered,
                "lease_expires_at": expires,
                "agent": agent,
                "assignment": assignment,
            }))
            .into_response()
        }
        Ok(None) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "bus_unavailable",
            e.to_string(),
        ),
    }
}

/// Records `agent` as the agent of the claimed assignment's conversation. The claim stands
/// either way: the assignment is the agent's for its lease, and a store that cannot record it
/// now only costs the next assignment its `previous_agent`, which the log reports.
async fn record_agent(state: &AppState, assignment: &Value, agent: &str) {
    let Some(conversation) = assignment["data"]["conversation_id"].as_str() else {
        warn!(
            agent,
            "a claimed assignment has no conversation_id: its agent is not recorded"
        );
        return;
    };
    match state.store.assign_agent(conversation, agent).await {
        Ok(true) => {}
        Ok(false) => warn!(
            conversation,
            agent,
            "the claimed assignment's conversation is not in the store: its agent is not recorded"
        ),
        Err(error) => {
            warn!(conversation, agent, %error, "the store could not record the agent of a claimed assignment")
        }
    }
}

/// `POST /api/v1/assignments/{id}/ack`
pub async fn ack(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    if query.is_some_and(|query| !query.is_empty()) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            "ack takes no parameters",
        );
    }
    let id = canonical_id(id);
    match state.bus.ack(&id).await {
        Ok(true) => Json(json!({"assignment_id": id, "acked": true})).into_response(),
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            "unknown_assignment",
            "no claimed assignment with this id on this node: it was acknowledged already, its \
             lease expired and it went back to its queue, or it was claimed through another \
             node (acknowledge on the node that answered the claim)",
        ),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "bus_unavailable",
            e.to_string(),
        ),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    after: Option<i64>,
    limit: Option<u32>,
}

/// Events returned per page at most.
const MAX_EVENTS: u32 = 1000;

/// `GET /api/v1/events?after=ID&limit=N`: lifecycle events (`switchboard.conversation.
/// escalated`, …), oldest first, on the embedded bus. On RabbitMQ they are on `<p>.events`.
pub async fn events(
    State(state): State<Arc<AppState>>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            "events takes `after` (an event id) and `limit` (1–1000)",
        );
    };
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_EVENTS).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            format!("`limit` must be 1–{MAX_EVENTS}"),
        );
    }
    let crate::bus::Bus::Embedded(bus) = &state.bus else {
        return error(
            StatusCode::NOT_FOUND,
            "not_on_this_bus",
            format!(
                "on RabbitMQ, events are published to the `{}` exchange (routing key = event kind, e.g. conversation.escalated): bind a queue to it",
                state.bus.topology().events()
            ),
        );
    };
    match bus.events(query.after.unwrap_or(0), limit).await {
        Ok(events) => {
            let events: Vec<Value> = events
                .into_iter()
                .map(|event| {
                    json!({
                        "id": event.id,
                        "type": event.ty,
                        "routing_key": event.key,
                        "event": serde_json::from_str::<Value>(&event.body)
                            .unwrap_or(Value::String(event.body)),
                    })
                })
                .collect();
            Json(json!({ "events": events })).into_response()
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "bus_unavailable",
            e.to_string(),
        ),
    }
}

/// `GET /api/v1/customers/{id}`
pub async fn get_customer(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let id = canonical_id(id);
    customer_response(state.store.customer(&id).await, &id)
}

/// `GET /api/v1/customers?identity=<kind>:<address>`, e.g. `identity=email:dana@example.com`.
///
/// A `+` in the query is a plus sign, not a space: identities are full of them (E.164 numbers,
/// plus-addressed emails), and `?identity=phone:+15551234567` typed into curl as it reads must
/// find the customer. A space is written `%20`.
pub async fn find_customer(
    State(state): State<Arc<AppState>>,
    RawQuery(raw): RawQuery,
) -> Response {
    let literal_plus = raw.unwrap_or_default().replace('+', "%2B");
    let mut given = None;
    for (name, value) in form_urlencoded::parse(literal_plus.as_bytes()) {
        let problem = match (name.as_ref(), &given) {
            ("identity", None) => {
                given = Some(value.into_owned());
                continue;
            }
            ("identity", Some(_)) => "`identity` is given twice".to_owned(),
            (other, _) => format!("unknown parameter `{other}`"),
        };
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            format!("{problem}: the only parameter is `identity=<kind>:<address>`"),
        );
    }
    let Some(given) = given else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            "give `identity=<kind>:<address>`, e.g. identity=email:dana@example.com",
        );
    };
    let Some((kind, address)) = given.split_once(':') else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_identity",
            "give `identity=<kind>:<address>`, e.g. identity=email:dana@example.com",
        );
    };
    // Kinds are lower case; `EMAIL:` means `email:`.
    let kind = kind.to_ascii_lowercase();
    let address = match identity::normalize(&kind, address) {
        Ok(address) => address,
        Err(problem) => return invalid_identity(&kind, &problem),
    };
    customer_response(
        state.store.customer_by_identity(&kind, &address).await,
        &given,
    )
}

fn invalid_identity(kind: &str, problem: &identity::IdentityError) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_identity",
        format!("the `{kind}` identity {problem}"),
    )
}

fn now_ms() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn store_unavailable(e: &crate::store::StoreError) -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        e.to_string(),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewIdentity {
    kind: String,
    address: String,
}

/// `POST /api/v1/customers/{id}/identities` with `{"kind": "email", "address": "…"}`: links an
/// identity (normalized) to the customer, as a verified one (an agent or a CRM vouches for it).
/// `409 identity_taken` when another customer has it: merge them if they are one person.
pub async fn link_identity(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let id = canonical_id(id);
    let mut new: NewIdentity = match object_body(body, r#"{"kind": "email", "address": "…"}"#) {
        Ok(new) => new,
        Err(answer) => return *answer,
    };
    // Kinds are lower case; `EMAIL` means `email`.
    new.kind.make_ascii_lowercase();
    let address = match identity::normalize(&new.kind, &new.address) {
        Ok(address) => address,
        Err(problem) => return invalid_identity(&new.kind, &problem),
    };
    match state
        .store
        .link_identity(&id, &new.kind, &address, now_ms())
        .await
    {
        Ok(LinkOutcome::Linked(customer)) => Json(customer).into_response(),
        Ok(LinkOutcome::UnknownCustomer) => error(
            StatusCode::NOT_FOUND,
            "unknown_customer",
            format!("no customer `{id}`"),
        ),
        Ok(LinkOutcome::Taken { customer_id }) => (
            StatusCode::CONFLICT,
            Json(json!({"error": {
                "code": "identity_taken",
                "message": format!(
                    "{}:{address} belongs to customer {customer_id}; merge the two with \
                     POST /api/v1/customers/{id}/merge if they are one person",
                    new.kind
                ),
                "customer_id": customer_id,
            }})),
        )
            .into_response(),
        Err(e) => store_unavailable(&e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeRequest {
    from: String,
}

/// `POST /api/v1/customers/{id}/merge` with `{"from": "<customer id>"}`: merges that customer
/// into this one (identities, conversations, messages move; this one's attributes win), and
/// audits it. Answers the merged customer and the audit entry's id.
pub async fn merge_customers(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let id = canonical_id(id);
    let request: MergeRequest = match object_body(body, r#"{"from": "<customer id>"}"#) {
        Ok(request) => request,
        Err(answer) => return *answer,
    };
    if request.from.trim().is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "`from` must be the id of the customer to merge into this one",
        );
    }
    let from = canonical_id(request.from);
    match state.store.merge(&id, &from, now_ms()).await {
        Ok(MergeOutcome::Merged { customer, merge_id }) => {
            Json(json!({"customer": customer, "merge_id": merge_id})).into_response()
        }
        Ok(MergeOutcome::Unknown(missing)) => error(
            StatusCode::NOT_FOUND,
            "unknown_customer",
            format!("no customer `{missing}`"),
        ),
        Ok(MergeOutcome::Same) => error(
            StatusCode::BAD_REQUEST,
            "same_customer",
            "a customer cannot be merged into itself",
        ),
        Ok(MergeOutcome::AlreadyMerged { customer, into }) => error(
            StatusCode::CONFLICT,
            "already_merged",
            format!("customer `{customer}` was merged into `{into}` already"),
        ),
        Err(e) => store_unavailable(&e),
    }
}

/// `GET /api/v1/customers/{id}/merges`: the merges and open merge suggestions involving the
/// customer, oldest first (the audit trail).
pub async fn customer_merges(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Response {
    let id = canonical_id(id);
    match state.store.customer(&id).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return error(
                StatusCode::NOT_FOUND,
                "unknown_customer",
                format!("no customer `{id}`"),
            );
        }
        Err(e) => return store_unavailable(&e),
    }
    match state.store.merges(&id).await {
        Ok(merges) => Json(json!({"merges": merges})).into_response(),
        Err(e) => store_unavailable(&e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerPatch {
    attributes: serde_json::Map<String, Value>,
}

/// `PATCH /api/v1/customers/{id}` with `{"attributes": {...}}`: merges attributes (a CRM's
/// `tier`, `lifetime_value`, `churn_risk`, …); `null` removes one. Rules see them from the
/// next message on.
pub async fn patch_customer(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let id = canonical_id(id);
    let patch: CustomerPatch = match object_body(body, r#"{"attributes": {…}}"#) {
        Ok(patch) => patch,
        Err(answer) => return *answer,
    };
    if patch
        .attributes
        .iter()
        .any(|(key, value)| key.contains('\0') || envelope::value_has_nul(value))
    {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "`attributes` must not contain U+0000 (NUL), which the store cannot keep",
        );
    }
    match state.store.patch_attributes(&id, &patch.attributes).await {
        Err(too_large @ crate::store::StoreError::AttributesTooLarge { .. }) => error(
            StatusCode::BAD_REQUEST,
            "attributes_too_large",
            format!("{too_large}: remove some (a `null` removes one)"),
        ),
        patched => customer_response(patched, &id),
    }
}

/// `GET /api/v1/conversations/{id}`: the conversation, its messages and routing decisions.
pub async fn get_conversation(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Response {
    let id = canonical_id(id);
    conversation_response(state.store.conversation(&id).await, &id)
}

/// `POST /api/v1/conversations/{id}/close`: the customer's next message starts a new one.
pub async fn close_conversation(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Response {
    let id = canonical_id(id);
    conversation_response(state.store.close_conversation(&id, now_ms()).await, &id)
}

fn conversation_response(
    found: Result<Option<crate::store::ConversationRecord>, crate::store::StoreError>,
    id: &str,
) -> Response {
    match found {
        Ok(Some(conversation)) => Json(conversation).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "unknown_conversation",
            format!("no conversation `{id}`"),
        ),
        Err(e) => store_unavailable(&e),
    }
}

fn customer_response(
    found: Result<Option<crate::store::CustomerRecord>, crate::store::StoreError>,
    what: &str,
) -> Response {
    match found {
        Ok(Some(customer)) => Json(customer).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "unknown_customer",
            format!("no customer `{what}`"),
        ),
        Err(e) => store_unavailable(&e),
    }
}

/// `GET /api/v1/rules`: the active rule set.
pub async fn rules(State(state): State<Arc<AppState>>) -> Response {
    let rules = state.rules.load();
    let loaded_at = rules
        .loaded_at
        .format(&time::format_description::well_known::Rfc3339)
        .ok();
    Json(json!({
        "version": rules.version,
        "loaded_at": loaded_at,
        "source": rules.source.display().to_string(),
        "queues": rules.queue_names(),
        "rules": rules.rules.len(),
        "tests": rules.tests.len(),
        "last_error": state.reloader.last_failure(),
    }))
    .into_response()
}
