//! The HTTP/2 → gRPC routing of the three SDS methods, written out instead of using the
//! server envoy-types generates: that one hard-wires tonic's default codec (8 KiB + 8 KiB
//! of buffers per stream); ours is `uds::SmallBufferCodec` (BENCHMARKS.md §4.1).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::{Grpc, NamedService, StreamingService, UnaryService};
use tonic::{Request, Response, Status, Streaming};

use super::service::{ResponseStream, SdsService};
use crate::uds::SmallBufferCodec;

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
        let method = Method(Arc::clone(&self.service));
        match request.uri().path() {
            STREAM_SECRETS => {
                let mut grpc = self.grpc::<DiscoveryResponse, DiscoveryRequest>();
                Box::pin(async move { Ok(grpc.streaming(Sotw(method), request).await) })
            }
            DELTA_SECRETS => {
                let mut grpc = self.grpc::<DeltaDiscoveryResponse, DeltaDiscoveryRequest>();
                Box::pin(async move { Ok(grpc.streaming(Delta(method), request).await) })
            }
            FETCH_SECRETS => {
                let mut grpc = self.grpc::<DiscoveryResponse, DiscoveryRequest>();
                Box::pin(async move { Ok(grpc.unary(Fetch(method), request).await) })
            }
            _ => Box::pin(async { Ok(Status::unimplemented("").into_http()) }),
        }
    }
}

struct Method(Arc<SdsService>);
struct Sotw(Method);
struct Delta(Method);
struct Fetch(Method);

impl StreamingService<DiscoveryRequest> for Sotw {
    type Response = DiscoveryResponse;
    type ResponseStream = ResponseStream<DiscoveryResponse>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<DiscoveryRequest>>) -> Self::Future {
        let service = Arc::clone(&self.0.0);
        Box::pin(async move { service.stream_secrets(request) })
    }
}

impl StreamingService<DeltaDiscoveryRequest> for Delta {
    type Response = DeltaDiscoveryResponse;
    type ResponseStream = ResponseStream<DeltaDiscoveryResponse>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<DeltaDiscoveryRequest>>) -> Self::Future {
        let service = Arc::clone(&self.0.0);
        Box::pin(async move { service.delta_secrets(request) })
    }
}

impl UnaryService<DiscoveryRequest> for Fetch {
    type Response = DiscoveryResponse;
    type Future = BoxFuture<Response<DiscoveryResponse>, Status>;

    fn call(&mut self, request: Request<DiscoveryRequest>) -> Self::Future {
        let service = Arc::clone(&self.0.0);
        Box::pin(async move { service.fetch_secrets(request).await })
    }
}
