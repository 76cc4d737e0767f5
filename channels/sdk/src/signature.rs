//! Signature checks shared by adapters. Comparisons are constant-time.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature header is missing")]
    Missing,
    #[error("the signature header is malformed: {0}")]
    Malformed(&'static str),
    #[error("the signature does not match the body")]
    Mismatch,
}

/// HMAC-SHA256 of `body` under `secret`.
pub fn hmac_sha256(secret: &[u8], body: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// Verifies a header of the form `sha256=<hex>` (GitHub, Meta, Switchboard webchat).
pub fn verify_sha256_header(
    secret: &[u8],
    body: &[u8],
    header: Option<&str>,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let hex_digest = header
        .trim()
        .strip_prefix("sha256=")
        .ok_or(SignatureError::Malformed("expected `sha256=<hex>`"))?;
    let given = hex::decode(hex_digest).map_err(|_| SignatureError::Malformed("not hex"))?;
    let expected = hmac_sha256(secret, body);
    if given.len() == expected.len() && bool::from(given.ct_eq(&expected)) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// The header value a sender computes: `sha256=<hex>`.
pub fn sign_sha256_header(secret: &[u8], body: &[u8]) -> String {
    format!("sha256={}", hex::encode(hmac_sha256(secret, body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_own_signature_and_rejects_others() {
        let header = sign_sha256_header(b"s3cret", b"{}");
        assert_eq!(
            verify_sha256_header(b"s3cret", b"{}", Some(&header)),
            Ok(())
        );
        assert_eq!(
            verify_sha256_header(b"other", b"{}", Some(&header)),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_sha256_header(b"s3cret", b"{ }", Some(&header)),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_sha256_header(b"s3cret", b"{}", None),
            Err(SignatureError::Missing)
        );
        assert!(matches!(
            verify_sha256_header(b"s3cret", b"{}", Some("md5=00")),
            Err(SignatureError::Malformed(_))
        ));
        assert!(matches!(
            verify_sha256_header(b"s3cret", b"{}", Some("sha256=zz")),
            Err(SignatureError::Malformed(_))
        ));
    }

    #[test]
    fn matches_a_known_vector() {
        // RFC 4231 test case 2.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
