//! What a service session publishes for the operator's status and the CLI's
//! logs: whether ConductorOne accepted us, why not, and what the last task
//! and upload were. Never contains a token or the client secret.

use std::collections::BTreeMap;

use serde::Serialize;

/// Why the session is (not) connected. The names are the
/// `ConductorOneConnected` condition reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ConnectionReason {
    /// Starting: no Hello answered yet.
    Connecting,
    /// Hello was accepted and polling works.
    Connected,
    /// The client id or secret is malformed, or the tenant refused it.
    InvalidClientCredentials,
    /// The TLS handshake failed (unknown CA, wrong name).
    #[serde(rename = "TLSError")]
    TlsError,
    /// ConductorOne cannot be reached (DNS, refused, timeouts, 5xx).
    Unreachable,
    /// ConductorOne refused Hello for another reason (invalid argument,
    /// unimplemented, not found, failed precondition).
    HelloRejected,
    /// The session was stopped.
    Stopped,
}

impl ConnectionReason {
    /// The CamelCase reason for a condition.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionReason::Connecting => "Connecting",
            ConnectionReason::Connected => "Connected",
            ConnectionReason::InvalidClientCredentials => "InvalidClientCredentials",
            ConnectionReason::TlsError => "TLSError",
            ConnectionReason::Unreachable => "Unreachable",
            ConnectionReason::HelloRejected => "HelloRejected",
            ConnectionReason::Stopped => "Stopped",
        }
    }
}

/// A task type as counted and reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskType {
    Hello,
    SyncFull,
    Grant,
    Revoke,
    /// Any other task type: failed as unsupported.
    Unsupported,
}

impl TaskType {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskType::Hello => "hello",
            TaskType::SyncFull => "sync_full",
            TaskType::Grant => "grant",
            TaskType::Revoke => "revoke",
            TaskType::Unsupported => "unsupported",
        }
    }
}

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskResult {
    Succeeded,
    Failed,
    Cancelled,
    /// The first heartbeat failed: the task was left for ConductorOne to reassign.
    Dropped,
}

impl TaskResult {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskResult::Succeeded => "succeeded",
            TaskResult::Failed => "failed",
            TaskResult::Cancelled => "cancelled",
            TaskResult::Dropped => "dropped",
        }
    }
}

/// The last task handled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRecord {
    pub task_type: TaskType,
    pub id: String,
    pub result: TaskResult,
    /// One line: what was done, or why it failed.
    pub message: String,
    /// Unix ms.
    pub finished_at: i64,
}

/// The last c1z uploaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UploadRecord {
    /// Unix ms.
    pub at: i64,
    pub bytes: u64,
    pub resources: u64,
}

/// Tasks handled per type, by result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TaskCounts {
    pub succeeded: u64,
    pub failed: u64,
}

/// The session's published state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionStatus {
    pub connected: bool,
    pub reason: ConnectionReason,
    /// For people: what happened last (never a secret).
    pub message: String,
    pub host_id: String,
    /// Unix ms of the last change of `connected` or `reason`.
    pub last_transition: i64,
    pub last_task: Option<TaskRecord>,
    pub last_upload: Option<UploadRecord>,
    /// Keyed by task type (`sync_full`, `grant`, ...).
    pub task_counts: BTreeMap<String, TaskCounts>,
}

impl SessionStatus {
    pub fn new(host_id: &str) -> Self {
        SessionStatus {
            connected: false,
            reason: ConnectionReason::Connecting,
            message: "connecting to ConductorOne".into(),
            host_id: host_id.to_owned(),
            last_transition: now_ms(),
            last_task: None,
            last_upload: None,
            task_counts: BTreeMap::new(),
        }
    }

    /// Sets the connection state; the transition time moves only on a change.
    pub fn set_connection(&mut self, reason: ConnectionReason, message: impl Into<String>) {
        let connected = reason == ConnectionReason::Connected;
        if connected != self.connected || reason != self.reason {
            self.last_transition = now_ms();
        }
        self.connected = connected;
        self.reason = reason;
        self.message = message.into();
    }

    pub fn record_task(&mut self, record: TaskRecord) {
        let counts = self
            .task_counts
            .entry(record.task_type.as_str().to_owned())
            .or_default();
        match record.result {
            TaskResult::Succeeded => counts.succeeded += 1,
            _ => counts.failed += 1,
        }
        self.last_task = Some(record);
    }
}

/// The `ConductorOneConnected` condition a status stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConditionView {
    /// `True`, `False` or `Unknown` (still connecting).
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

impl SessionStatus {
    /// `True` once Hello is accepted and polling works; `Unknown` while
    /// connecting; `False` with the reason otherwise.
    pub fn condition(&self) -> ConditionView {
        let status = match self.reason {
            ConnectionReason::Connected => "True",
            ConnectionReason::Connecting => "Unknown",
            _ => "False",
        };
        ConditionView {
            status,
            reason: self.reason.as_str(),
            message: self.message.clone(),
        }
    }
}

pub fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_follows_the_reason_and_transitions_only_on_change() {
        let mut s = SessionStatus::new("h");
        assert_eq!(s.condition().status, "Unknown");
        s.set_connection(ConnectionReason::TlsError, "bad CA");
        assert_eq!((s.condition().status, s.condition().reason), ("False", "TLSError"));
        let at = s.last_transition;
        std::thread::sleep(std::time::Duration::from_millis(2));
        s.set_connection(ConnectionReason::TlsError, "still bad");
        assert_eq!(s.last_transition, at, "same reason: no transition");
        s.set_connection(ConnectionReason::Connected, "ok");
        assert_eq!(s.condition().status, "True");
        assert!(s.last_transition > at);
        s.record_task(TaskRecord {
            task_type: TaskType::Grant,
            id: "x".into(),
            result: TaskResult::Failed,
            message: String::new(),
            finished_at: 0,
        });
        assert_eq!(
            s.task_counts["grant"],
            TaskCounts {
                succeeded: 0,
                failed: 1
            }
        );
    }
}
