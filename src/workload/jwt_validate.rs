//! ValidateJWTSVID: checks a JWT-SVID with the JWKS of its subject's trust domain (PI-54)
//! and returns its SPIFFE ID and claims.
//!
//! Errors name what failed, never the token or a key.

use std::collections::BTreeMap;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::identity::types::trust_domain_of;

/// Signature algorithms a JWT-SVID may use (JWT-SVID spec §3: RSA, ECDSA, RSA-PSS); SPIRE
/// signs ES256 by default. Never HMAC or `none`.
const ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtValidationError {
    #[error("malformed JWT: {0}")]
    Malformed(String),
    #[error("JWT algorithm {0:?} is not allowed for JWT-SVIDs")]
    Algorithm(Algorithm),
    #[error("the JWT header has no key ID (kid)")]
    NoKeyId,
    #[error("the JWT subject (sub) is missing or not a SPIFFE ID")]
    BadSubject,
    #[error("no JWT bundle for trust domain {0:?} is available to this workload")]
    NoBundle(String),
    #[error("the JWT bundle of trust domain {trust_domain:?} is malformed: {reason}")]
    BadBundle {
        trust_domain: String,
        reason: String,
    },
    #[error("key {kid:?} is not in the JWT bundle of trust domain {trust_domain:?}")]
    KeyNotFound { kid: String, trust_domain: String },
    #[error("invalid JWT-SVID: {0}")]
    Invalid(String),
}

/// A JWT-SVID that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedJwtSvid {
    /// The `sub` claim.
    pub spiffe_id: String,
    /// Every claim of the payload.
    pub claims: Map<String, Value>,
}

/// Validates `token` for `audience` with `bundles` (trust domain name → JWKS JSON): the ones
/// this workload may trust. The signature must verify with the key its header names (`kid`)
/// in the JWKS of the trust domain of its `sub` (JWT-SVID spec, PI-54/PI-55); `aud` must
/// contain `audience`; `exp` must be in the future (60 s leeway, jsonwebtoken's default, for
/// clock skew between nodes).
pub fn validate_jwt_svid(
    token: &str,
    audience: &str,
    bundles: &BTreeMap<String, Vec<u8>>,
) -> Result<ValidatedJwtSvid, JwtValidationError> {
    let header = jsonwebtoken::decode_header(token)
        .map_err(|e| JwtValidationError::Malformed(e.to_string()))?;
    if !ALGORITHMS.contains(&header.alg) {
        return Err(JwtValidationError::Algorithm(header.alg));
    }
    let kid = header.kid.ok_or(JwtValidationError::NoKeyId)?;
    // Only to pick the trust domain whose keys must verify the signature.
    let unverified: Map<String, Value> = jsonwebtoken::dangerous::insecure_decode_claims(token)
        .map_err(|e| JwtValidationError::Malformed(e.to_string()))?;
    let subject = unverified
        .get("sub")
        .and_then(Value::as_str)
        .ok_or(JwtValidationError::BadSubject)?;
    let trust_domain = trust_domain_of(subject)
        .map_err(|_| JwtValidationError::BadSubject)?
        .to_owned();
    let jwks = bundles
        .get(&trust_domain)
        .ok_or_else(|| JwtValidationError::NoBundle(trust_domain.clone()))?;
    let bad_bundle = |reason: String| JwtValidationError::BadBundle {
        trust_domain: trust_domain.clone(),
        reason,
    };
    let set: JwkSet = serde_json::from_slice(jwks).map_err(|e| bad_bundle(e.to_string()))?;
    let jwk = set
        .find(&kid)
        .ok_or_else(|| JwtValidationError::KeyNotFound {
            kid: kid.clone(),
            trust_domain: trust_domain.clone(),
        })?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| bad_bundle(e.to_string()))?;

    let mut validation = Validation::new(header.alg);
    validation.set_audience(&[audience]);
    validation.set_required_spec_claims(&["exp", "aud", "sub"]);
    let verified = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
        .map_err(|e| JwtValidationError::Invalid(e.to_string()))?;
    let spiffe_id = verified
        .claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or(JwtValidationError::BadSubject)?
        .to_owned();
    Ok(ValidatedJwtSvid {
        spiffe_id,
        claims: verified.claims,
    })
}

/// JSON claims as a `google.protobuf.Struct` (numbers become doubles, as in protobuf JSON).
pub fn claims_to_struct(claims: Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: claims
            .into_iter()
            .map(|(name, value)| (name, json_to_value(value)))
            .collect(),
    }
}

fn json_to_value(value: Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        Value::Null => Kind::NullValue(prost_types::NullValue::NullValue.into()),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(json_to_value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(claims_to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::workload::{JwtSigner, unix_now};

    fn bundles(signer: &JwtSigner) -> BTreeMap<String, Vec<u8>> {
        BTreeMap::from([("example.org".to_owned(), signer.jwks())])
    }

    #[test]
    fn a_good_token_yields_its_subject_and_every_claim() {
        let signer = JwtSigner::new("k1");
        let token = signer.sign_claims(serde_json::json!({
            "sub": "spiffe://example.org/db",
            "aud": "db",
            "exp": unix_now() + 60,
            "custom": {"n": 1, "list": [true, null]},
        }));
        let ok = validate_jwt_svid(&token, "db", &bundles(&signer)).unwrap();
        assert_eq!(ok.spiffe_id, "spiffe://example.org/db");
        let claims = claims_to_struct(ok.claims);
        let custom = &claims.fields["custom"];
        let Some(prost_types::value::Kind::StructValue(custom)) = &custom.kind else {
            panic!("{custom:?}");
        };
        assert_eq!(
            custom.fields["n"].kind,
            Some(prost_types::value::Kind::NumberValue(1.0))
        );
    }

    #[test]
    fn hmac_none_and_keyless_tokens_are_refused() {
        let signer = JwtSigner::new("k1");
        let claims = serde_json::json!({
            "sub": "spiffe://example.org/db", "aud": "db", "exp": unix_now() + 60,
        });
        // Algorithm confusion: HS256 "signed" with the public JWKS as the secret.
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let hmac = jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&signer.jwks()).unwrap(),
        )
        .unwrap();
        assert_eq!(
            validate_jwt_svid(&hmac, "db", &bundles(&signer)),
            Err(JwtValidationError::Algorithm(Algorithm::HS256))
        );
        // No key ID.
        let token = signer.sign_claims(claims);
        let (_, rest) = token.split_once('.').unwrap();
        let no_kid_header = "eyJhbGciOiJFUzI1NiJ9"; // {"alg":"ES256"}
        let no_kid = format!("{no_kid_header}.{rest}");
        assert_eq!(
            validate_jwt_svid(&no_kid, "db", &bundles(&signer)),
            Err(JwtValidationError::NoKeyId)
        );
        // `alg: none` does not even parse as a JWS header here.
        let none = format!("eyJhbGciOiJub25lIn0.{rest}");
        assert!(validate_jwt_svid(&none, "db", &bundles(&signer)).is_err());
    }
}
