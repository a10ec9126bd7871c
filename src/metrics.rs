//! Prometheus metrics, served on `/metrics`. Every label has a bounded set of
//! values (reasons, endpoint classes, resource types, connectors), so series
//! cannot grow with Bitbucket data.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::bitbucket::{EndpointClass, RequestObserver};
use crate::model::SyncKind;

/// Which controller a reconcile series belongs to (`connector`, `grant`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub controller: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub controller: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    pub resource_type: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    pub resource_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: &'static str,
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    pub namespace: String,
    pub name: String,
    pub resource_type: &'static str,
}

/// Which HTTP listener a connection series belongs to (`http`, `probes`,
/// `data_api`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectorLabels {
    pub namespace: String,
    pub name: String,
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ResultLabels, Counter>,
    pub reconcile_errors: Family<ReasonLabels, Counter>,
    pub reconcile_duration: Family<ControllerLabels, Histogram>,
    pub sync_runs: Family<SyncLabels, Counter>,
    pub sync_duration: Family<TypeLabels, Histogram>,
    pub bitbucket_requests: Family<RequestLabels, Counter>,
    pub objects: Family<ObjectLabels, Gauge>,
    pub connector_ready: Family<ConnectorLabels, Gauge>,
    /// How long after its expiry time each grant's access actually ended.
    pub grant_expiry_lateness: Histogram,
    /// ConductorOne sessions' tasks, uploads and token refreshes.
    pub c1: crate::conductorone::C1Metrics,
    /// HTTP connections open, by listener.
    pub http_connections: Family<ListenerLabels, Gauge>,
    /// Times a listener stopped accepting with every connection slot taken.
    pub http_connections_deferred: Family<ListenerLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("bitbucket_operator");
        let reconciles = Family::<ResultLabels, Counter>::default();
        registry.register("reconciles", "Reconciles by controller and result", reconciles.clone());
        let reconcile_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconcile errors by controller and reason",
            reconcile_errors.clone(),
        );
        let reconcile_duration = Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 12))
        });
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration by controller",
            reconcile_duration.clone(),
        );
        let sync_runs = Family::<SyncLabels, Counter>::default();
        registry.register("sync_runs", "Sync runs by resource type and outcome", sync_runs.clone());
        let sync_duration = Family::<TypeLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.05, 2.0, 14))
        });
        registry.register(
            "sync_duration_seconds",
            "Sync run duration by resource type",
            sync_duration.clone(),
        );
        let bitbucket_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "bitbucket_requests",
            "Bitbucket API requests by endpoint class and status class",
            bitbucket_requests.clone(),
        );
        let objects = Family::<ObjectLabels, Gauge>::default();
        registry.register(
            "objects",
            "Resources in the current snapshot by connector and type",
            objects.clone(),
        );
        let connector_ready = Family::<ConnectorLabels, Gauge>::default();
        registry.register(
            "connector_ready",
            "1 when the connector is Ready, else 0",
            connector_ready.clone(),
        );
        // From a quarter second to over two hours: an expiry that slips
        // behind an hour's budget or a long Retry-After must still land in
        // a bucket of its own.
        let grant_expiry_lateness = Histogram::new(exponential_buckets(0.25, 2.0, 16));
        registry.register(
            "grant_expiry_lateness_seconds",
            "Time from a grant's expiresAt to the end of its access in Bitbucket",
            grant_expiry_lateness.clone(),
        );
        let c1 = crate::conductorone::C1Metrics::register(&mut registry);
        let http_connections = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "http_connections",
            "HTTP connections open, by listener",
            http_connections.clone(),
        );
        let http_connections_deferred = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "http_connections_deferred",
            "Times a listener stopped accepting because all its connection slots were taken (clients wait in the backlog)",
            http_connections_deferred.clone(),
        );
        Metrics {
            c1,
            http_connections,
            http_connections_deferred,
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            sync_runs,
            sync_duration,
            bitbucket_requests,
            objects,
            connector_ready,
            grant_expiry_lateness,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String never fails");
        out
    }

    /// A client hook that counts Bitbucket requests.
    pub fn request_observer(self: &Arc<Self>) -> RequestObserver {
        let metrics = Arc::clone(self);
        Arc::new(move |class: EndpointClass, status: Option<u16>| {
            let status_class = match status {
                None => "error",
                Some(200..=299) => "2xx",
                Some(429) => "429",
                Some(400..=499) => "4xx",
                Some(500..=599) => "5xx",
                Some(_) => "other",
            };
            metrics
                .bitbucket_requests
                .get_or_create(&RequestLabels {
                    endpoint: class.as_str(),
                    status_class,
                })
                .inc();
        })
    }

    /// One finished reconcile of `controller`: its duration and result.
    pub fn record_reconcile(&self, controller: &'static str, ok: bool, seconds: f64) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles
            .get_or_create(&ResultLabels { controller, result })
            .inc();
        self.reconcile_duration
            .get_or_create(&ControllerLabels { controller })
            .observe(seconds);
    }

    /// One failed reconcile of `controller`, by a bounded reason label.
    pub fn record_reconcile_error(&self, controller: &'static str, reason: &'static str) {
        self.reconcile_errors
            .get_or_create(&ReasonLabels { controller, reason })
            .inc();
    }

    pub fn record_sync(&self, kind: SyncKind, ok: bool, seconds: f64) {
        let outcome = if ok { "success" } else { "failure" };
        self.sync_runs
            .get_or_create(&SyncLabels {
                resource_type: kind.as_str(),
                outcome,
            })
            .inc();
        self.sync_duration
            .get_or_create(&TypeLabels {
                resource_type: kind.as_str(),
            })
            .observe(seconds);
    }

    /// One expiry completed `lateness` after the grant's `expiresAt` (an
    /// expiry handled early counts as zero).
    pub fn observe_grant_expiry_lateness(&self, lateness: Duration) {
        self.grant_expiry_lateness.observe(lateness.as_secs_f64());
    }

    /// Seconds from `expires_at` to `ended_at`, zero when not late.
    pub fn expiry_lateness(expires_at: jiff::Timestamp, ended_at: jiff::Timestamp) -> Duration {
        Duration::try_from(ended_at.duration_since(expires_at)).unwrap_or(Duration::ZERO)
    }

    /// The connection figures of one HTTP listener, for
    /// [`crate::http::conn::serve_connections`].
    pub fn connection_metrics(&self, listener: &'static str) -> crate::http::conn::ConnectionMetrics {
        let labels = ListenerLabels { listener };
        crate::http::conn::ConnectionMetrics {
            open: self.http_connections.get_or_create(&labels).clone(),
            deferred: self.http_connections_deferred.get_or_create(&labels).clone(),
        }
    }

    /// Drops the series of a deleted connector.
    pub fn forget_connector(&self, namespace: &str, name: &str) {
        self.connector_ready.remove(&ConnectorLabels {
            namespace: namespace.into(),
            name: name.into(),
        });
        for kind in SyncKind::ALL {
            self.objects.remove(&ObjectLabels {
                namespace: namespace.into(),
                name: name.into(),
                resource_type: kind.as_str(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_family() {
        let metrics = Arc::new(Metrics::default());
        metrics.record_reconcile("grant", true, 0.01);
        metrics.record_reconcile_error("connector", "kubernetes");
        (metrics.request_observer())(EndpointClass::Members, Some(429));
        metrics.record_sync(SyncKind::Groups, true, 0.2);
        let text = metrics.encode();
        assert!(
            text.contains("bitbucket_operator_reconciles_total{controller=\"grant\",result=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.contains("bitbucket_operator_reconcile_duration_seconds_count{controller=\"grant\"} 1"));
        assert!(
            text.contains(
                "bitbucket_operator_reconcile_errors_total{controller=\"connector\",reason=\"kubernetes\"} 1"
            )
        );
        assert!(
            text.contains("bitbucket_operator_bitbucket_requests_total{endpoint=\"members\",status_class=\"429\"} 1")
        );
        assert!(text.contains("bitbucket_operator_sync_runs_total{resource_type=\"groups\",outcome=\"success\"} 1"));
        assert!(text.contains("bitbucket_operator_sync_duration_seconds_bucket"));
    }

    #[test]
    fn expiry_lateness_is_observed_in_seconds_and_never_negative() {
        let metrics = Metrics::default();
        let expires: jiff::Timestamp = "2026-12-01T10:00:00Z".parse().unwrap();
        let late = Metrics::expiry_lateness(expires, "2026-12-01T10:00:03.5Z".parse().unwrap());
        assert_eq!(late, Duration::from_millis(3500));
        let early = Metrics::expiry_lateness(expires, "2026-12-01T09:59:59Z".parse().unwrap());
        assert_eq!(early, Duration::ZERO);
        metrics.observe_grant_expiry_lateness(late);
        metrics.observe_grant_expiry_lateness(early);
        let text = metrics.encode();
        assert!(
            text.contains("bitbucket_operator_grant_expiry_lateness_seconds_count 2"),
            "{text}"
        );
        assert!(
            text.contains("bitbucket_operator_grant_expiry_lateness_seconds_sum 3.5"),
            "{text}"
        );
        assert!(
            text.contains("bitbucket_operator_grant_expiry_lateness_seconds_bucket{le=\"4.0\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("bitbucket_operator_grant_expiry_lateness_seconds_bucket{le=\"2.0\"} 1"),
            "{text}"
        );
    }
}
