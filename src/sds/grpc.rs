//! The HTTP/2 → gRPC routing of the three SDS methods, written out instead of using the
//! server envoy-types generates: that one hard-wires tonic's default codec (8 KiB + 8 KiB
//! of buffers per stream); ours is `uds::SmallBufferCodec` (BENCHMARKS.md §4.1). The two
//! streaming methods read their requests with `uds::InboundMessages` rather than tonic's
//! `Streaming`, which would keep each stream's buffer at the size of Envoy's 61 KB first
//! request for the stream's lifetime (BENCHMARKS.md §6).

use std::convert::Infallible;
use std::future::ready;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use tonic::codec::{Codec, EncodeBody, SingleMessageCompressionOverride};
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::metadata::MetadataValue;
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};

use super::response::SotwResponse;
use super::service::{ResponseStream, SdsService};
use crate::uds::{InboundMessages, SmallBufferCodec};

const SERVICE_NAME: &str = "envoy.service.secret.v3.SecretDiscoveryService";
const STREAM_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
const DELTA_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets";
const FETCH_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets";

/// The SDS gRPC service, ready for `tonic::transport::Server::add_service`.
#[derive(Clone)]
pub struct SdsGrpc {
    service: Arc<SdsService>,
    max_request_bytes: usize,
}

impl SdsGrpc {
    pub fn new(service: SdsService, max_request_bytes: usize) -> Self {
        Self {
            service: Arc::new(service),
            max_request_bytes,
        }
    }

    fn grpc<T, U>(&self) -> Grpc<SmallBufferCodec<T, U>>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        Grpc::new(SmallBufferCodec::new())
            .apply_max_message_size_config(Some(self.max_request_bytes), None)
    }
}

impl NamedService for SdsGrpc {
    const NAME: &'static str = SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for SdsGrpc
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match request.uri().path() {
            STREAM_SECRETS => Box::pin(ready(Ok(self.open_stream(
                request,
                |service, requests: Request<InboundMessages<DiscoveryRequest>>| {
                    service.stream_secrets(requests)
                },
            )))),
            DELTA_SECRETS => Box::pin(ready(Ok(self.open_stream(
                request,
                |service, requests: Request<InboundMessages<DeltaDiscoveryRequest>>| {
                    service.delta_secrets(requests)
                },
            )))),
            FETCH_SECRETS => {
                let service = Arc::clone(&self.service);
                let mut grpc = self.grpc::<SotwResponse, DiscoveryRequest>();
                Box::pin(async move { Ok(grpc.unary(Fetch(service), request).await) })
            }
            _ => Box::pin(async { Ok(Status::unimplemented("").into_http()) }),
        }
    }
}

impl SdsGrpc {
    /// What tonic's `Grpc::streaming` does, with our request decoder: refuse compressed
    /// requests (none are agreed), open the stream, encode its responses. Opening does not
    /// wait: the response stream does the waiting.
    fn open_stream<B, Req, Resp>(
        &self,
        request: http::Request<B>,
        open: impl FnOnce(
            &SdsService,
            Request<InboundMessages<Req>>,
        ) -> Result<ResponseStream<Resp>, Status>,
    ) -> http::Response<tonic::body::Body>
    where
        B: Body + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
        Req: prost::Message + Default + Send + 'static,
        Resp: prost::Message + Send + 'static,
    {
        if let Err(status) = refuse_compressed_requests(request.headers()) {
            return status.into_http();
        }
        let max_request_bytes = self.max_request_bytes;
        let requests =
            Request::from_http(request.map(|body| InboundMessages::new(body, max_request_bytes)));
        match open(&self.service, requests) {
            Ok(responses) => grpc_response(responses),
            Err(status) => status.into_http(),
        }
    }
}

/// A `grpc-encoding` other than `identity` names a compression this server does not accept
/// (tonic's own answer: UNIMPLEMENTED, listing what it accepts).
fn refuse_compressed_requests(headers: &http::HeaderMap) -> Result<(), Status> {
    match headers.get("grpc-encoding") {
        None => Ok(()),
        Some(encoding) if encoding.as_bytes() == b"identity" => Ok(()),
        Some(encoding) => {
            let mut status = Status::unimplemented(format!(
                "requests compressed with {encoding:?} are not supported; send them uncompressed"
            ));
            status.metadata_mut().insert(
                "grpc-accept-encoding",
                MetadataValue::from_static("identity"),
            );
            Err(status)
        }
    }
}

fn grpc_response<Resp>(responses: ResponseStream<Resp>) -> http::Response<tonic::body::Body>
where
    Resp: prost::Message + Send + 'static,
{
    let encoder = SmallBufferCodec::<Resp, ()>::new().encoder();
    let body = EncodeBody::new_server(
        encoder,
        responses,
        None,
        SingleMessageCompressionOverride::default(),
        None,
    );
    let mut response = http::Response::new(tonic::body::Body::new(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

struct Fetch(Arc<SdsService>);

impl UnaryService<DiscoveryRequest> for Fetch {
    type Response = SotwResponse;
    type Future = BoxFuture<Response<SotwResponse>, Status>;

    fn call(&mut self, request: Request<DiscoveryRequest>) -> Self::Future {
        let service = Arc::clone(&self.0);
        Box::pin(async move { service.fetch_secrets(request).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(encoding: Option<&'static str>) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        if let Some(encoding) = encoding {
            headers.insert("grpc-encoding", http::HeaderValue::from_static(encoding));
        }
        headers
    }

    #[test]
    fn uncompressed_requests_are_accepted_and_compressed_ones_refused_saying_why() {
        assert!(refuse_compressed_requests(&headers(None)).is_ok());
        assert!(refuse_compressed_requests(&headers(Some("identity"))).is_ok());

        let status = refuse_compressed_requests(&headers(Some("gzip"))).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert!(
            status.message().contains("\"gzip\""),
            "{}",
            status.message()
        );
        assert!(status.message().contains("send them uncompressed"));
        assert_eq!(
            status
                .metadata()
                .get("grpc-accept-encoding")
                .map(|v| v.to_str().ok()),
            Some(Some("identity"))
        );
    }
}
