//! Watching the watch streams: kube-rs ends a watch stream that breaks mid-chunk (the
//! server or a proxy dropped the connection) as if it had ended normally, and resumes
//! from the last resourceVersion. That is right, but then nobody knows it happened. This
//! client layer sees the body error of every watch response first and reports it as a
//! failure of that resource, which the source logs once per incident.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use ::kube::client::{Body, DynBody};
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::mpsc::UnboundedSender;

use super::incidents::{Failure, Signal, chain};
use super::settings::Watched;

/// Wraps the client's service stack.
pub(super) struct WatchStreamLayer {
    pub(super) signals: UnboundedSender<Signal>,
}

impl<S> tower::Layer<S> for WatchStreamLayer {
    type Service = WatchStreamService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        WatchStreamService {
            inner,
            signals: self.signals.clone(),
        }
    }
}

pub(super) struct WatchStreamService<S> {
    inner: S,
    signals: UnboundedSender<Signal>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower::Service<Request<Body>> for WatchStreamService<S>
where
    S: tower::Service<Request<Body>, Response = Response<Box<DynBody>>>,
    S::Future: Send + 'static,
{
    type Response = Response<WatchBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let watched = watch_target(request.uri());
        let signals = self.signals.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|inner| WatchBody {
                inner,
                report: watched.map(|watched| (watched, signals)),
            }))
        })
    }
}

/// The watched resource a request streams, if it is a watch of one.
fn watch_target(uri: &http::Uri) -> Option<Watched> {
    let watching = uri.query().is_some_and(|query| {
        query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1")
    });
    if !watching {
        return None;
    }
    let resource = uri.path().rsplit('/').next()?;
    Watched::ALL.into_iter().find(|w| w.resource() == resource)
}

/// A response body that reports its first error when it streams a watch.
pub(super) struct WatchBody {
    inner: Box<DynBody>,
    report: Option<(Watched, UnboundedSender<Signal>)>,
}

impl HttpBody for WatchBody {
    type Data = Bytes;
    type Error = tower::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(error))) = &poll
            && let Some((watched, signals)) = this.report.take()
        {
            let _ = signals.send(Signal::Failed(watched, Failure::Stream(chain(&**error))));
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_watches_of_watched_resources_are_observed() {
        let target = |uri: &str| watch_target(&uri.parse().unwrap());
        assert_eq!(
            target("/api/v1/pods?&watch=true&resourceVersion=5"),
            Some(Watched::Pods)
        );
        assert_eq!(
            target("/apis/networking.k8s.io/v1/networkpolicies?watch=true"),
            Some(Watched::NetworkPolicies)
        );
        assert_eq!(
            target("/api/v1/services?watch=true"),
            Some(Watched::Services)
        );
        assert_eq!(target("/api/v1/pods?limit=500"), None);
        assert_eq!(target("/api/v1/configmaps?watch=true"), None);
    }
}
