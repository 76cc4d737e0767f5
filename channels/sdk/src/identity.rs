//! Identity normalization, shared by every adapter so that the same person is the same key:
//! an email typed as ` Dana@Example.COM ` and `dana@example.com`; a phone number from a web
//! form, WhatsApp (`wa_id`, digits only), Twilio (`whatsapp:+1…` or `+1…`) and SMS all become
//! the same E.164 `phone` identity.

use std::fmt;

/// Why an address is not an identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityError(pub &'static str);

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for IdentityError {}

/// Sender kinds (DESIGN §3): the kinds an identity may have.
pub const KINDS: &[&str] = &[
    "email",
    "phone",
    "telegram",
    "messenger",
    "instagram",
    "slack",
    "x",
    "webchat",
];

/// The longest address kept, in bytes (an email address has at most 254 characters; platform
/// ids far fewer).
pub const MAX_ADDRESS_BYTES: usize = 256;

/// The normalized address of an identity of `kind`: [`email`] (no plus-folding) and [`phone`]
/// rules for those kinds; other kinds' platform ids are only trimmed. An unknown kind, an
/// empty address, one with control characters (U+0000 included) or one longer than
/// [`MAX_ADDRESS_BYTES`] is an error.
pub fn normalize(kind: &str, raw: &str) -> Result<String, IdentityError> {
    match kind {
        "email" => email(raw, false),
        "phone" => phone(raw),
        _ if !KINDS.contains(&kind) => Err(IdentityError(
            "has an unknown kind: use email, phone, telegram, messenger, instagram, slack, x or webchat",
        )),
        _ => {
            let address = plain(raw)?;
            if address.is_empty() {
                return Err(IdentityError("is empty"));
            }
            Ok(address.to_owned())
        }
    }
}

/// `raw` trimmed, if it has no control characters and fits [`MAX_ADDRESS_BYTES`].
fn plain(raw: &str) -> Result<&str, IdentityError> {
    let address = raw.trim();
    if address.chars().any(char::is_control) {
        return Err(IdentityError(
            "must not contain control characters (U+0000 to U+001F, U+007F to U+009F)",
        ));
    }
    if address.len() > MAX_ADDRESS_BYTES {
        return Err(IdentityError("is longer than 256 bytes"));
    }
    Ok(address)
}

/// Lowercased and trimmed; with `fold_plus`, `dana+shop@example.com` becomes
/// `dana@example.com` (off by default: not every mail system treats `+` as a tag).
pub fn email(raw: &str, fold_plus: bool) -> Result<String, IdentityError> {
    let email = plain(raw)?.to_lowercase();
    let Some((local, domain)) = email.split_once('@') else {
        return Err(IdentityError("is not an email address"));
    };
    if local.is_empty() || !domain.contains('.') || domain.contains('@') || email.contains(' ') {
        return Err(IdentityError("is not an email address"));
    }
    let local = match local.split_once('+') {
        Some((base, _)) if fold_plus && !base.is_empty() => base,
        _ => local,
    };
    Ok(format!("{local}@{domain}"))
}

/// E.164 (`+` and 7–15 digits, no leading zero). Accepts separators (spaces, dashes, dots,
/// parentheses), an international `00` prefix, and `whatsapp:`, `tel:` or `sms:` schemes.
/// A number without `+` or `00` is national and cannot be placed: refused.
pub fn phone(raw: &str) -> Result<String, IdentityError> {
    let mut text = plain(raw)?;
    for scheme in ["whatsapp:", "tel:", "sms:"] {
        if let Some(rest) = text.strip_prefix(scheme) {
            text = rest;
        }
    }
    let compact: String = text
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
        .collect();
    let digits = if let Some(digits) = compact.strip_prefix('+') {
        digits
    } else if let Some(digits) = compact.strip_prefix("00") {
        digits
    } else {
        return Err(IdentityError(
            "must be an international number such as +15551234567",
        ));
    };
    e164(digits)
}

/// A number given as bare digits with its country code (WhatsApp's `wa_id`).
pub fn phone_from_digits(raw: &str) -> Result<String, IdentityError> {
    e164(plain(raw)?)
}

fn e164(digits: &str) -> Result<String, IdentityError> {
    if (7..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
    {
        Ok(format!("+{digits}"))
    } else {
        Err(IdentityError(
            "must be an E.164 number such as +15551234567",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_applies_each_kinds_rules() {
        assert_eq!(
            normalize("email", " Dana@Example.COM ").unwrap(),
            "dana@example.com"
        );
        assert_eq!(
            normalize("phone", "whatsapp:+1 555 123 4567").unwrap(),
            "+15551234567"
        );
        assert_eq!(normalize("telegram", " 12345 ").unwrap(), "12345");
        assert!(normalize("fax", "123").is_err());
        assert!(normalize("slack", "  ").is_err());
        assert!(normalize("email", "not-an-address").is_err());
    }

    #[test]
    fn control_characters_and_overlong_addresses_are_refused() {
        for (kind, raw) in [
            ("webchat", "a\0b"),
            ("webchat", "a\nb"),
            ("slack", "U1\u{7f}"),
            ("email", "da\0na@example.com"),
            ("phone", "+1555\t1234567"),
        ] {
            let error = normalize(kind, raw).unwrap_err();
            assert!(
                error.0.contains("control characters"),
                "{kind} {raw:?}: {error}"
            );
        }
        let longest = "v".repeat(MAX_ADDRESS_BYTES);
        assert_eq!(normalize("webchat", &longest).unwrap(), longest);
        let error = normalize("webchat", &format!("{longest}v")).unwrap_err();
        assert_eq!(error.0, format!("is longer than {MAX_ADDRESS_BYTES} bytes"));
        assert_eq!(normalize("webchat", " visitor 9 ").unwrap(), "visitor 9");
    }

    #[test]
    fn emails_are_trimmed_and_lowercased_and_plus_folding_is_optional() {
        assert_eq!(
            email(" Dana@Example.COM ", false).unwrap(),
            "dana@example.com"
        );
        assert_eq!(
            email("Dana+Shop@example.com", false).unwrap(),
            "dana+shop@example.com"
        );
        assert_eq!(
            email("Dana+Shop@example.com", true).unwrap(),
            "dana@example.com"
        );
        assert_eq!(email("+x@example.com", true).unwrap(), "+x@example.com");
        for bad in [
            "",
            "dana",
            "@example.com",
            "dana@localhost",
            "a@b@c.com",
            "da na@x.com",
        ] {
            assert!(email(bad, false).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_shape_of_a_number_is_the_same_phone_identity() {
        for shape in [
            "+15551234567",
            "+1 (555) 123-4567",
            "+1.555.123.4567",
            "0015551234567",
            "whatsapp:+15551234567",
            "tel:+1-555-123-4567",
            " sms:+15551234567 ",
        ] {
            assert_eq!(phone(shape).unwrap(), "+15551234567", "{shape:?}");
        }
        assert_eq!(phone_from_digits("15551234567").unwrap(), "+15551234567");
        for bad in [
            "5551234567",
            "+0123456789",
            "+12",
            "+1555123456789012",
            "+1555abc4567",
            "",
        ] {
            assert!(phone(bad).is_err(), "{bad:?}");
        }
        assert!(phone_from_digits("+15551234567").is_err(), "digits only");
    }
}
