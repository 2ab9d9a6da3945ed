//! Request signatures.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;
use sha2::Sha256;

/// Lowercase hex HMAC-SHA1 of `bytes` under `secret` (the `X-Signature` value).
pub fn hmac_sha1_hex(secret: &[u8], bytes: &[u8]) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(bytes);
    hex::encode(mac.finalize().into_bytes())
}

/// Whether `signature` (hex, any case) is the HMAC-SHA1 of `bytes`, compared
/// in constant time.
pub fn verify_hmac_sha1(secret: &[u8], bytes: &[u8], signature: &str) -> bool {
    let Ok(expected) = hex::decode(signature.trim()) else { return false };
    let mut mac = Hmac::<Sha1>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(bytes);
    mac.verify_slice(&expected).is_ok()
}

/// The key bytes of a Standard Webhooks secret (`whsec_` + base64; the
/// prefix is optional).
pub fn standard_webhooks_key(secret: &str) -> Result<Vec<u8>, String> {
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    STANDARD.decode(encoded).map_err(|_| {
        "a Standard Webhooks secret is `whsec_` followed by base64 (e.g. whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw)".into()
    })
}

/// The `webhook-signature` value: `v1,` + base64 HMAC-SHA256 of
/// `id.timestamp.body` under the decoded key.
pub fn standard_webhooks_signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_rfc_2202_test_case_2() {
        let sig = hmac_sha1_hex(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(sig, "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79");
        assert!(verify_hmac_sha1(b"Jefe", b"what do ya want for nothing?", &sig.to_uppercase()));
        assert!(!verify_hmac_sha1(b"Jefe", b"what do ya want for nothing!", &sig));
    }

    #[test]
    fn matches_the_standard_webhooks_published_test_vector() {
        let key = standard_webhooks_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig =
            standard_webhooks_signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(standard_webhooks_key("whsec_not base64!").is_err());
    }
}
