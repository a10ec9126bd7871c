//! ConductorOne metrics, registered into the operator's registry by
//! [`C1Metrics::register`] (one call from `crate::metrics`). Labels have
//! bounded values (task types and results), never ids or secrets.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::status::{TaskResult, TaskType};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub task_type: &'static str,
    pub result: &'static str,
}

/// One connector (bounded: the connectors of the cluster).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectorKey {
    pub namespace: String,
    pub name: String,
}

/// A rotation's result: `succeeded`, `failed`, `not_authorized`, `rolled_back`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RotationLabels {
    pub result: &'static str,
}

/// Counters a service session updates. Cheap to clone (shared handles).
#[derive(Clone, Debug, Default)]
pub struct C1Metrics {
    /// `conductorone_tasks_total{task_type, result}`
    pub tasks: Family<TaskLabels, Counter>,
    /// `conductorone_upload_bytes_total`
    pub upload_bytes: Counter,
    /// `conductorone_token_refreshes_total`: access tokens fetched.
    pub token_refreshes: Counter,
    /// `credential_expiry_timestamp_seconds{namespace, name}`: when the
    /// connector's ConductorOne credential expires (absent if it does not).
    pub credential_expiry: Family<ConnectorKey, Gauge>,
    /// `credential_rotations_total{result}`.
    pub rotations: Family<RotationLabels, Counter>,
}

impl C1Metrics {
    /// Registers the counters under `conductorone_*` (inside the registry's prefix).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = C1Metrics::default();
        registry.register(
            "conductorone_tasks",
            "ConductorOne tasks handled, by task type and result",
            metrics.tasks.clone(),
        );
        registry.register(
            "conductorone_upload_bytes",
            "Bytes of c1z files uploaded to ConductorOne",
            metrics.upload_bytes.clone(),
        );
        registry.register(
            "conductorone_token_refreshes",
            "ConductorOne access tokens fetched",
            metrics.token_refreshes.clone(),
        );
        registry.register(
            "credential_expiry_timestamp_seconds",
            "When the connector's ConductorOne client credential expires (Unix seconds)",
            metrics.credential_expiry.clone(),
        );
        registry.register(
            "credential_rotations",
            "ConductorOne credential rotations, by result",
            metrics.rotations.clone(),
        );
        metrics
    }

    pub fn rotation(&self, result: &'static str) {
        self.rotations.get_or_create(&RotationLabels { result }).inc();
    }

    pub fn task(&self, task_type: TaskType, result: TaskResult) {
        self.tasks
            .get_or_create(&TaskLabels {
                task_type: task_type.as_str(),
                result: result.as_str(),
            })
            .inc();
    }
}
