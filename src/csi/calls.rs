//! A tower layer counting gRPC calls by method and status code, with latency. Used on the
//! CSI server, whose call rate is low (the kubelet), so boxing each future costs nothing
//! that matters.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tower::{Layer, Service};

use super::metrics::{CsiCallLabel, CsiMetrics, MethodLabel};

#[derive(Clone)]
pub struct CsiCallsLayer {
    metrics: Arc<CsiMetrics>,
}

impl CsiCallsLayer {
    pub fn new(metrics: Arc<CsiMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for CsiCallsLayer {
    type Service = CsiCalls<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CsiCalls {
            inner,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

#[derive(Clone)]
pub struct CsiCalls<S> {
    inner: S,
    metrics: Arc<CsiMetrics>,
}

impl<S, B, RB> Service<http::Request<B>> for CsiCalls<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // `/csi.v1.Node/NodePublishVolume` → `NodePublishVolume`; unknown paths are
        // answered UNIMPLEMENTED by tonic and counted under one label.
        let method = method_label(request.uri().path());
        let metrics = Arc::clone(&self.metrics);
        let started = Instant::now();
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await;
            if let Ok(response) = &response {
                // Errors come as trailers-only responses with grpc-status in the headers;
                // a success carries it in trailers, which the headers do not show.
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from);
                metrics
                    .calls
                    .get_or_create(&CsiCallLabel {
                        method: method.clone(),
                        code: code_name(code),
                    })
                    .inc();
                metrics
                    .duration
                    .get_or_create(&MethodLabel { method })
                    .observe(started.elapsed().as_secs_f64());
            }
            response
        })
    }
}

fn method_label(path: &str) -> String {
    const KNOWN: &[&str] = &[
        "GetPluginInfo",
        "GetPluginCapabilities",
        "Probe",
        "NodePublishVolume",
        "NodeUnpublishVolume",
        "NodeGetVolumeStats",
        "NodeGetCapabilities",
        "NodeGetInfo",
        "GetInfo",
        "NotifyRegistrationStatus",
    ];
    let method = path.rsplit('/').next().unwrap_or_default();
    if KNOWN.contains(&method) {
        method.to_owned()
    } else {
        "other".to_owned()
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_bounded() {
        assert_eq!(
            method_label("/csi.v1.Node/NodePublishVolume"),
            "NodePublishVolume"
        );
        assert_eq!(method_label("/csi.v1.Controller/CreateVolume"), "other");
        assert_eq!(method_label(&format!("/x/{}", "y".repeat(1000))), "other");
    }
}
