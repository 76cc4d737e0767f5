//! The web chat body → normalized message.

use serde_json::{Map, Value};
use switchboard_channel::envelope::MAX_ATTRIBUTES_BYTES;
use switchboard_channel::{ChannelRef, NormalizedMessage, Sender};
use time::OffsetDateTime;
use uuid::Uuid;

/// Longest accepted `message_id`.
const MAX_ID_LEN: usize = 200;

/// A body that cannot become a message, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("the body is not valid JSON: {0}")]
    Json(String),
    #[error("the body must be a JSON object")]
    NotObject,
    #[error("`{field}` {problem}")]
    Field { field: String, problem: String },
}

impl ConvertError {
    /// The field the sender must fix (`body` when it is the whole document).
    pub fn field(&self) -> &str {
        match self {
            ConvertError::Json(_) | ConvertError::NotObject => "body",
            ConvertError::Field { field, .. } => field,
        }
    }

    fn invalid(field: &str, problem: impl Into<String>) -> Self {
        ConvertError::Field {
            field: field.to_owned(),
            problem: problem.into(),
        }
    }
}

const TOP_LEVEL_FIELDS: &[&str] = &[
    "message_id",
    "customer",
    "text",
    "subject",
    "thread_key",
    "attributes",
    "metadata",
];
const CUSTOMER_FIELDS: &[&str] = &["id", "email", "phone", "name"];

/// Parses and validates a web chat body.
pub fn convert(
    channel: &ChannelRef,
    body: &[u8],
    options: &crate::Options,
) -> Result<NormalizedMessage, ConvertError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|error| ConvertError::Json(error.to_string()))?;
    let Value::Object(object) = value else {
        return Err(ConvertError::NotObject);
    };
    reject_unknown(&object, TOP_LEVEL_FIELDS, "")?;

    let external_id = match object.get("message_id") {
        None | Some(Value::Null) => Uuid::new_v4().to_string(),
        Some(Value::String(id)) if id.trim().is_empty() => {
            return Err(ConvertError::invalid("message_id", "must not be empty"));
        }
        Some(Value::String(id)) if id.len() > MAX_ID_LEN => {
            return Err(ConvertError::invalid(
                "message_id",
                format!("is longer than {MAX_ID_LEN} characters"),
            ));
        }
        Some(Value::String(id)) => id.clone(),
        Some(_) => return Err(ConvertError::invalid("message_id", "must be a string")),
    };

    let text = match object.get("text") {
        None | Some(Value::Null) => return Err(ConvertError::invalid("text", "is required")),
        Some(Value::String(text)) if text.trim().is_empty() => {
            return Err(ConvertError::invalid("text", "must not be empty"));
        }
        Some(Value::String(text)) => text.clone(),
        Some(_) => return Err(ConvertError::invalid("text", "must be a string")),
    };
    let subject = optional_string(&object, "subject")?;
    let thread_key = optional_string(&object, "thread_key")?;

    let customer = match object.get("customer") {
        Some(Value::Object(customer)) => customer,
        None | Some(Value::Null) => return Err(ConvertError::invalid("customer", "is required")),
        Some(_) => return Err(ConvertError::invalid("customer", "must be an object")),
    };
    reject_unknown(customer, CUSTOMER_FIELDS, "customer.")?;
    let visitor_id = optional_string(customer, "id")
        .map_err(|_| ConvertError::invalid("customer.id", "must be a string"))?;
    let email = optional_string(customer, "email")
        .map_err(|_| ConvertError::invalid("customer.email", "must be a string"))?
        .map(|email| normalize_email(&email, options.fold_plus_addresses))
        .transpose()?;
    let phone = optional_string(customer, "phone")
        .map_err(|_| ConvertError::invalid("customer.phone", "must be a string"))?
        .map(|phone| normalize_phone(&phone))
        .transpose()?;
    let name = optional_string(customer, "name")
        .map_err(|_| ConvertError::invalid("customer.name", "must be a string"))?;

    // `(kind, address, verified)`: the channel's configuration says which kinds its callers
    // have verified.
    let mut identities = Vec::new();
    if let Some(id) = visitor_id.as_ref().filter(|id| !id.trim().is_empty()) {
        let id = switchboard_channel::identity::normalize("webchat", id)
            .map_err(|e| ConvertError::invalid("customer.id", e.0))?;
        identities.push(("webchat", id, false));
    }
    if let Some(email) = email {
        identities.push(("email", email, options.verified_email));
    }
    if let Some(phone) = phone {
        identities.push(("phone", phone, options.verified_phone));
    }
    let Some((kind, address, _)) = identities.first().cloned() else {
        return Err(ConvertError::invalid(
            "customer",
            "needs at least one of `id`, `email`, `phone`",
        ));
    };

    let mut metadata = match object.get("metadata") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(metadata)) => metadata.clone(),
        Some(_) => return Err(ConvertError::invalid("metadata", "must be an object")),
    };
    match object.get("attributes") {
        None | Some(Value::Null) => {}
        Some(Value::Object(attributes)) => {
            let bytes = serde_json::to_string(attributes).map_or(usize::MAX, |json| json.len());
            if bytes > MAX_ATTRIBUTES_BYTES {
                return Err(ConvertError::invalid(
                    "attributes",
                    format!(
                        "takes {bytes} bytes as JSON, more than the {MAX_ATTRIBUTES_BYTES} allowed"
                    ),
                ));
            }
            metadata.insert("attributes".into(), Value::Object(attributes.clone()));
        }
        Some(_) => return Err(ConvertError::invalid("attributes", "must be an object")),
    }
    metadata.insert(
        "identities".into(),
        Value::Array(
            identities
                .iter()
                .map(|(kind, address, verified)| {
                    serde_json::json!({"kind": kind, "address": address, "verified": verified})
                })
                .collect(),
        ),
    );

    let message = NormalizedMessage {
        message_id: NormalizedMessage::stable_id(&channel.id, &external_id),
        channel: channel.clone(),
        external_id,
        thread_key,
        sender: Sender {
            kind: kind.to_owned(),
            address,
            name,
        },
        subject,
        text,
        attachments: Vec::new(),
        received_at: OffsetDateTime::now_utc(),
        auto_submitted: false,
        metadata,
    };
    // The body's own names for the normalized fields.
    let field = match message.nul_field() {
        None => return Ok(message),
        Some("external_id") => "message_id",
        Some("sender") => "customer",
        Some("metadata") if object.contains_key("attributes") => "attributes",
        Some(field) => field,
    };
    Err(ConvertError::invalid(
        field,
        "must not contain U+0000 (NUL)",
    ))
}

fn reject_unknown(
    object: &Map<String, Value>,
    known: &[&str],
    prefix: &str,
) -> Result<(), ConvertError> {
    match object.keys().find(|key| !known.contains(&key.as_str())) {
        Some(key) => Err(ConvertError::invalid(
            &format!("{prefix}{key}"),
            format!(
                "is not a known field (expected one of {})",
                known.join(", ")
            ),
        )),
        None => Ok(()),
    }
}

fn optional_string(
    object: &Map<String, Value>,
    field: &str,
) -> Result<Option<String>, ConvertError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(value)) => Ok(Some(value.clone())),
        Some(_) => Err(ConvertError::invalid(field, "must be a string")),
    }
}

fn normalize_email(email: &str, fold_plus: bool) -> Result<String, ConvertError> {
    switchboard_channel::identity::email(email, fold_plus)
        .map_err(|e| ConvertError::invalid("customer.email", e.0))
}

fn normalize_phone(phone: &str) -> Result<String, ConvertError> {
    switchboard_channel::identity::phone(phone)
        .map_err(|e| ConvertError::invalid("customer.phone", e.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Options;

    fn channel() -> ChannelRef {
        ChannelRef {
            id: "chat".into(),
            kind: "webchat".into(),
        }
    }

    fn field_of(body: &str) -> String {
        convert(&channel(), body.as_bytes(), &Options::default())
            .expect_err("should be refused")
            .field()
            .to_owned()
    }

    #[test]
    fn converts_the_design_example() {
        let body = include_str!("../tests/fixtures/design-example.json");
        let message = convert(&channel(), body.as_bytes(), &Options::default()).unwrap();
        assert_eq!(message.external_id, "m-1");
        assert_eq!(
            message.message_id,
            NormalizedMessage::stable_id("chat", "m-1")
        );
        assert_eq!(message.sender.kind, "webchat");
        assert_eq!(message.sender.address, "visitor-123");
        assert_eq!(message.sender.name.as_deref(), Some("Dana"));
        assert_eq!(message.text, "Hi, where is my invoice?");
        assert_eq!(message.metadata["attributes"]["plan"], "pro");
        assert_eq!(
            message.metadata["identities"],
            serde_json::json!([
                {"kind": "webchat", "address": "visitor-123", "verified": false},
                {"kind": "email", "address": "dana@example.com", "verified": false},
                {"kind": "phone", "address": "+15551234567", "verified": false}
            ])
        );
    }

    #[test]
    fn the_channels_verified_kinds_and_plus_folding_apply() {
        let options = Options {
            verified_email: true,
            verified_phone: false,
            fold_plus_addresses: true,
        };
        let body = br#"{"customer": {"id": "v-1", "email": "Dana+Shop@Example.com",
                        "phone": "+15551234567"}, "text": "hi",
                        "metadata": {"identities": [{"kind": "email", "address": "x@y.z",
                                                     "verified": true}]}}"#;
        let m = convert(&channel(), body, &options).unwrap();
        assert_eq!(
            m.metadata["identities"],
            serde_json::json!([
                {"kind": "webchat", "address": "v-1", "verified": false},
                {"kind": "email", "address": "dana@example.com", "verified": true},
                {"kind": "phone", "address": "+15551234567", "verified": false}
            ]),
            "the body cannot list or verify identities itself"
        );
    }

    #[test]
    fn sender_falls_back_to_email_then_phone() {
        let m = convert(
            &channel(),
            br#"{"customer": {"email": " Dana@Example.COM "}, "text": "hi"}"#,
            &Options::default(),
        )
        .unwrap();
        assert_eq!(
            (m.sender.kind.as_str(), m.sender.address.as_str()),
            ("email", "dana@example.com")
        );
        let m = convert(
            &channel(),
            br#"{"customer": {"phone": "+1 (555) 123-4567"}, "text": "hi"}"#,
            &Options::default(),
        )
        .unwrap();
        assert_eq!(
            (m.sender.kind.as_str(), m.sender.address.as_str()),
            ("phone", "+15551234567")
        );
    }

    #[test]
    fn refuses_nul_characters() {
        assert_eq!(
            field_of(r#"{"customer": {"id": "v"}, "text": "a\u0000b"}"#),
            "text"
        );
        assert_eq!(
            field_of(r#"{"customer": {"id": "v\u0000"}, "text": "hi"}"#),
            "customer.id"
        );
        assert_eq!(
            field_of(r#"{"customer": {"id": "v\nw"}, "text": "hi"}"#),
            "customer.id"
        );
        assert_eq!(
            field_of(r#"{"customer": {"id": "v", "name": "N\u0000"}, "text": "hi"}"#),
            "customer"
        );
        assert_eq!(
            field_of(r#"{"customer": {"id": "v"}, "text": "hi", "attributes": {"k": "\u0000"}}"#),
            "attributes"
        );
    }

    #[test]
    fn refuses_attributes_over_the_limit() {
        let note = "x".repeat(MAX_ATTRIBUTES_BYTES);
        let body = format!(
            r#"{{"customer": {{"id": "v"}}, "text": "hi", "attributes": {{"note": "{note}"}}}}"#
        );
        let error = convert(&channel(), body.as_bytes(), &Options::default()).unwrap_err();
        assert_eq!(error.field(), "attributes");
        let fits = "x".repeat(MAX_ATTRIBUTES_BYTES - 20);
        let body = format!(
            r#"{{"customer": {{"id": "v"}}, "text": "hi", "attributes": {{"note": "{fits}"}}}}"#
        );
        assert!(convert(&channel(), body.as_bytes(), &Options::default()).is_ok());
    }

    #[test]
    fn refuses_bad_bodies_naming_the_field() {
        assert_eq!(field_of("{"), "body");
        assert_eq!(field_of("[]"), "body");
        assert_eq!(field_of(r#"{"customer": {"id": "v"}}"#), "text");
        assert_eq!(
            field_of(r#"{"customer": {"id": "v"}, "text": "  "}"#),
            "text"
        );
        assert_eq!(field_of(r#"{"customer": {"id": "v"}, "text": 3}"#), "text");
        assert_eq!(field_of(r#"{"text": "hi"}"#), "customer");
        assert_eq!(field_of(r#"{"customer": {}, "text": "hi"}"#), "customer");
        assert_eq!(
            field_of(r#"{"customer": {"email": "nope"}, "text": "hi"}"#),
            "customer.email"
        );
        assert_eq!(
            field_of(r#"{"customer": {"phone": "555"}, "text": "hi"}"#),
            "customer.phone"
        );
        assert_eq!(
            field_of(r#"{"customer": {"id": "v", "mail": "x"}, "text": "hi"}"#),
            "customer.mail"
        );
        assert_eq!(
            field_of(r#"{"customer": {"id": "v"}, "text": "hi", "txt": 1}"#),
            "txt"
        );
        assert_eq!(
            field_of(r#"{"customer": {"id": "v"}, "text": "hi", "message_id": ""}"#),
            "message_id"
        );
        assert_eq!(
            field_of(r#"{"customer": {"id": "v"}, "text": "hi", "attributes": []}"#),
            "attributes"
        );
    }

    #[test]
    fn without_message_id_each_post_is_a_new_message() {
        let body = br#"{"customer": {"id": "v"}, "text": "hi"}"#;
        let a = convert(&channel(), body, &Options::default()).unwrap();
        let b = convert(&channel(), body, &Options::default()).unwrap();
        assert_ne!(a.message_id, b.message_id);
    }
}
