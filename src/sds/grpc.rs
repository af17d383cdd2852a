//! The HTTP/2 → gRPC routing of the three SDS methods, written out instead of using the
//! server envoy-types generates: that one hard-wires tonic's default codec (8 KiB + 8 KiB
//! of buffers per stream); ours is `uds::SmallBufferCodec` (BENCHMARKS.md §4.1).

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::{Grpc, NamedService, StreamingService, UnaryService};
use tonic::{Request, Response, Status, Streaming};

use super::response::{DeltaResponse, SotwResponse};
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
        let service = Arc::clone(&self.service);
        match request.uri().path() {
            STREAM_SECRETS => {
                let mut grpc = self.grpc::<SotwResponse, DiscoveryRequest>();
                Box::pin(async move { Ok(grpc.streaming(Sotw(service), request).await) })
            }
            DELTA_SECRETS => {
                let mut grpc = self.grpc::<DeltaResponse, DeltaDiscoveryRequest>();
                Box::pin(async move { Ok(grpc.streaming(Delta(service), request).await) })
            }
            FETCH_SECRETS => {
                let mut grpc = self.grpc::<SotwResponse, DiscoveryRequest>();
                Box::pin(async move { Ok(grpc.unary(Fetch(service), request).await) })
            }
            _ => Box::pin(async { Ok(Status::unimplemented("").into_http()) }),
        }
    }
}

struct Sotw(Arc<SdsService>);
struct Delta(Arc<SdsService>);
struct Fetch(Arc<SdsService>);

impl StreamingService<DiscoveryRequest> for Sotw {
    type Response = SotwResponse;
    type ResponseStream = ResponseStream<SotwResponse>;
    // Opening a stream does not wait: the response stream does the waiting.
    type Future = Ready<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<DiscoveryRequest>>) -> Self::Future {
        ready(self.0.stream_secrets(request))
    }
}

impl StreamingService<DeltaDiscoveryRequest> for Delta {
    type Response = DeltaResponse;
    type ResponseStream = ResponseStream<DeltaResponse>;
    type Future = Ready<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<DeltaDiscoveryRequest>>) -> Self::Future {
        ready(self.0.delta_secrets(request))
    }
}

impl UnaryService<DiscoveryRequest> for Fetch {
    type Response = SotwResponse;
    type Future = BoxFuture<Response<SotwResponse>, Status>;

    fn call(&mut self, request: Request<DiscoveryRequest>) -> Self::Future {
        let service = Arc::clone(&self.0);
        Box::pin(async move { service.fetch_secrets(request).await })
    }
}
