//! SDS responses that share their secrets instead of copying them.
//!
//! A secret is encoded once for every stream that serves it (`secrets::Encoded`, memoised
//! node-wide for bundles). `DiscoveryResponse` owns its `Any`s, so building one per stream
//! meant cloning each encoded secret into it, only for the codec to copy it again into the
//! frame. These types hold the shared `Arc<Encoded>` and write it straight into the frame.
//! On the wire they are byte for byte `DiscoveryResponse` / `DeltaDiscoveryResponse` (the
//! tests below compare); the bridge only ever sends them, never decodes them.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use prost::bytes::{Buf, BufMut};
use prost::encoding::{self, DecodeContext, WireType};

use super::secrets::Encoded;

/// One encoded secret as a response carries it; reads as its `Any`.
#[derive(Clone)]
pub struct SharedAny(pub Arc<Encoded>);

impl Deref for SharedAny {
    type Target = Any;

    fn deref(&self) -> &Any {
        &self.0.any
    }
}

impl fmt::Debug for SharedAny {
    /// Name and version only: the value may hold a private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedAny")
            .field("name", &self.0.name)
            .field("version", &self.0.version)
            .finish()
    }
}

/// `envoy.service.discovery.v3.DiscoveryResponse`, as the bridge fills it.
#[derive(Clone, Debug, Default)]
pub struct SotwResponse {
    pub version_info: String,
    pub resources: Vec<SharedAny>,
    pub type_url: String,
    pub nonce: String,
}

/// `envoy.service.discovery.v3.Resource`, as the bridge fills it.
#[derive(Clone, Debug, Default)]
pub struct DeltaResource {
    pub name: String,
    pub version: String,
    pub resource: Option<SharedAny>,
}

/// `envoy.service.discovery.v3.DeltaDiscoveryResponse`, as the bridge fills it.
#[derive(Clone, Debug, Default)]
pub struct DeltaResponse {
    pub resources: Vec<DeltaResource>,
    pub type_url: String,
    pub nonce: String,
}

fn encode_string(tag: u32, value: &String, buf: &mut impl BufMut) {
    if !value.is_empty() {
        encoding::string::encode(tag, value, buf);
    }
}

fn string_len(tag: u32, value: &String) -> usize {
    if value.is_empty() {
        0
    } else {
        encoding::string::encoded_len(tag, value)
    }
}

/// Fields are written in tag order with defaults left out, as prost writes the generated
/// types. Reading one back is not something the bridge does: every field is skipped.
macro_rules! send_only {
    () => {
        fn merge_field(
            &mut self,
            tag: u32,
            wire_type: WireType,
            buf: &mut impl Buf,
            ctx: DecodeContext,
        ) -> Result<(), prost::DecodeError> {
            encoding::skip_field(wire_type, tag, buf, ctx)
        }

        fn clear(&mut self) {
            *self = Self::default();
        }
    };
}

impl Message for SotwResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_string(1, &self.version_info, buf);
        for any in &self.resources {
            encoding::message::encode(2, &**any, buf);
        }
        encode_string(4, &self.type_url, buf);
        encode_string(5, &self.nonce, buf);
    }

    fn encoded_len(&self) -> usize {
        string_len(1, &self.version_info)
            + self
                .resources
                .iter()
                .map(|any| encoding::message::encoded_len(2, &**any))
                .sum::<usize>()
            + string_len(4, &self.type_url)
            + string_len(5, &self.nonce)
    }

    send_only!();
}

impl Message for DeltaResource {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_string(1, &self.version, buf);
        if let Some(any) = &self.resource {
            encoding::message::encode(2, &**any, buf);
        }
        encode_string(3, &self.name, buf);
    }

    fn encoded_len(&self) -> usize {
        string_len(1, &self.version)
            + self
                .resource
                .as_ref()
                .map_or(0, |any| encoding::message::encoded_len(2, &**any))
            + string_len(3, &self.name)
    }

    send_only!();
}

impl Message for DeltaResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for resource in &self.resources {
            encoding::message::encode(2, resource, buf);
        }
        encode_string(4, &self.type_url, buf);
        encode_string(5, &self.nonce, buf);
    }

    fn encoded_len(&self) -> usize {
        self.resources
            .iter()
            .map(|resource| encoding::message::encoded_len(2, resource))
            .sum::<usize>()
            + string_len(4, &self.type_url)
            + string_len(5, &self.nonce)
    }

    send_only!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sds::secrets::SECRET_TYPE_URL;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
    use envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryResponse, DiscoveryResponse, Resource,
    };

    fn encoded(name: &str) -> SharedAny {
        SharedAny(Arc::new(Encoded::new(Secret {
            name: name.into(),
            ..Default::default()
        })))
    }

    #[test]
    fn sotw_is_byte_for_byte_a_discovery_response() {
        let shared = SotwResponse {
            version_info: "0123456789abcdef".into(),
            resources: vec![encoded("default"), encoded("ROOTCA")],
            type_url: SECRET_TYPE_URL.into(),
            nonce: "n1".into(),
        };
        let generated = DiscoveryResponse {
            version_info: shared.version_info.clone(),
            resources: shared.resources.iter().map(|a| (**a).clone()).collect(),
            type_url: shared.type_url.clone(),
            nonce: shared.nonce.clone(),
            ..Default::default()
        };
        assert_eq!(shared.encode_to_vec(), generated.encode_to_vec());
        assert_eq!(shared.encoded_len(), generated.encoded_len());
        assert_eq!(
            SotwResponse::default().encode_to_vec(),
            DiscoveryResponse::default().encode_to_vec()
        );
    }

    #[test]
    fn delta_is_byte_for_byte_a_delta_discovery_response() {
        let any = encoded("spiffe://example.org");
        let shared = DeltaResponse {
            resources: vec![
                DeltaResource {
                    name: "spiffe://example.org".into(),
                    version: "v1".into(),
                    resource: Some(any.clone()),
                },
                DeltaResource::default(),
            ],
            type_url: SECRET_TYPE_URL.into(),
            nonce: "n2".into(),
        };
        let generated = DeltaDiscoveryResponse {
            resources: vec![
                Resource {
                    name: "spiffe://example.org".into(),
                    version: "v1".into(),
                    resource: Some((*any).clone()),
                    ..Default::default()
                },
                Resource::default(),
            ],
            type_url: SECRET_TYPE_URL.into(),
            nonce: "n2".into(),
            ..Default::default()
        };
        assert_eq!(shared.encode_to_vec(), generated.encode_to_vec());
        assert_eq!(shared.encoded_len(), generated.encoded_len());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let text = format!("{:?}", encoded("default"));
        assert!(
            text.contains("default") && !text.contains("value"),
            "{text}"
        );
    }
}
