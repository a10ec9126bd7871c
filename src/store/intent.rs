//! Intents: the store's half of "intent before write". Before the grant
//! controller changes a level in Bitbucket it records what it is about to do
//! (grant uid, connector, workspace, target, the principal as resolved, the
//! level before and after, the operation and when it started) as a
//! `pending` row; after the write and the status update it closes the row
//! with how it ended. A process that stops in between leaves the row
//! pending, and the next reconcile of that grant resolves it by reading the
//! level in Bitbucket (see `controller::grant`). At most one intent per grant
//! is pending: recording a new one supersedes an older one.
//!
//! Schema version 3 adds this table and the audit log ([`super::audit`]).

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::{Store, StoreError, now_ms};

/// Version 3: grant intents and the append-only audit log.
pub(super) const SCHEMA_V3: &str = r#"
CREATE TABLE grant_intents (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    grant_uid       TEXT NOT NULL,
    grant_namespace TEXT NOT NULL,
    grant_name      TEXT NOT NULL,
    connector       TEXT NOT NULL,
    workspace       TEXT NOT NULL,
    target          TEXT NOT NULL,
    principal_kind  TEXT NOT NULL,
    principal       TEXT NOT NULL,
    operation       TEXT NOT NULL CHECK (operation IN ('grant', 'revoke', 'restore')),
    trigger         TEXT NOT NULL,
    level_before    TEXT,
    level_after     TEXT,
    started_at      INTEGER NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'done', 'not_written', 'changed_externally', 'failed', 'superseded')),
    finished_at     INTEGER,
    message         TEXT
);
CREATE INDEX grant_intents_by_grant ON grant_intents (grant_uid, state);

CREATE TABLE audit (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    at              INTEGER NOT NULL,
    action          TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    requester       TEXT NOT NULL,
    grant_namespace TEXT NOT NULL,
    grant_name      TEXT NOT NULL,
    grant_uid       TEXT NOT NULL,
    connector       TEXT NOT NULL,
    workspace       TEXT NOT NULL,
    target          TEXT NOT NULL,
    principal       TEXT NOT NULL,
    level_before    TEXT,
    level_after     TEXT,
    message         TEXT NOT NULL
);
CREATE INDEX audit_by_time ON audit (at);
CREATE INDEX audit_by_connector ON audit (connector, at);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
-- The sync interval a run was started with: readers judge staleness by it.
ALTER TABLE runs ADD COLUMN interval_ms INTEGER;
"#;

/// The Bitbucket write an intent announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeOperation {
    /// Put a level in place (PUT, or add a group member).
    Grant,
    /// Remove the level (DELETE, or remove a group member).
    Revoke,
    /// Put the level held before back (PUT of a lower level).
    Restore,
}

impl ChangeOperation {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeOperation::Grant => "grant",
            ChangeOperation::Revoke => "revoke",
            ChangeOperation::Restore => "restore",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "grant" => Some(ChangeOperation::Grant),
            "revoke" => Some(ChangeOperation::Revoke),
            "restore" => Some(ChangeOperation::Restore),
            _ => None,
        }
    }
}

impl std::fmt::Display for ChangeOperation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an intent ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntentState {
    /// Recorded; the write may or may not have happened.
    Pending,
    /// The write happened and its result is recorded.
    Done,
    /// The write did not happen (refused, failed before it, or found not
    /// made after a restart).
    NotWritten,
    /// Neither the level before nor after was found: someone else changed it.
    ChangedExternally,
    /// Bitbucket refused the write.
    Failed,
    /// A newer intent of the same grant replaced it.
    Superseded,
}

impl IntentState {
    pub fn as_str(self) -> &'static str {
        match self {
            IntentState::Pending => "pending",
            IntentState::Done => "done",
            IntentState::NotWritten => "not_written",
            IntentState::ChangedExternally => "changed_externally",
            IntentState::Failed => "failed",
            IntentState::Superseded => "superseded",
        }
    }

    fn parse(text: &str) -> Result<Self, StoreError> {
        Ok(match text {
            "pending" => IntentState::Pending,
            "done" => IntentState::Done,
            "not_written" => IntentState::NotWritten,
            "changed_externally" => IntentState::ChangedExternally,
            "failed" => IntentState::Failed,
            "superseded" => IntentState::Superseded,
            other => return Err(StoreError::Corrupt(format!("unknown intent state {other:?}"))),
        })
    }
}

/// What an intent records (levels as Bitbucket slugs; `None`: nothing held).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewIntent {
    pub grant_uid: String,
    pub grant_namespace: String,
    pub grant_name: String,
    /// `namespace/name` of the connector that writes.
    pub connector: String,
    pub workspace: String,
    /// `repository/<slug>`, `project/<KEY>` or `group/<slug>`.
    pub target: String,
    /// `user` or `group`.
    pub principal_kind: String,
    /// The principal as resolved: user UUID or group slug.
    pub principal: String,
    pub operation: ChangeOperation,
    /// Why: `grant`, `expiry`, `deletion`, `spec-change`.
    pub trigger: String,
    pub level_before: Option<String>,
    pub level_after: Option<String>,
}

/// A recorded intent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub id: i64,
    #[serde(flatten)]
    pub change: NewIntent,
    /// Unix epoch milliseconds.
    pub started_at: i64,
    pub state: IntentState,
    pub finished_at: Option<i64>,
    pub message: Option<String>,
}

const COLUMNS: &str = "id, grant_uid, grant_namespace, grant_name, connector, workspace, target, principal_kind, \
                       principal, operation, trigger, level_before, level_after, started_at, state, finished_at, message";

fn intent_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Intent, String, String)> {
    let operation: String = r.get(9)?;
    let state: String = r.get(14)?;
    Ok((
        Intent {
            id: r.get(0)?,
            change: NewIntent {
                grant_uid: r.get(1)?,
                grant_namespace: r.get(2)?,
                grant_name: r.get(3)?,
                connector: r.get(4)?,
                workspace: r.get(5)?,
                target: r.get(6)?,
                principal_kind: r.get(7)?,
                principal: r.get(8)?,
                // Filled in below from the raw text.
                operation: ChangeOperation::Grant,
                trigger: r.get(10)?,
                level_before: r.get(11)?,
                level_after: r.get(12)?,
            },
            started_at: r.get(13)?,
            state: IntentState::Pending,
            finished_at: r.get(15)?,
            message: r.get(16)?,
        },
        operation,
        state,
    ))
}

fn typed((mut intent, operation, state): (Intent, String, String)) -> Result<Intent, StoreError> {
    intent.change.operation = ChangeOperation::parse(&operation)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown intent operation {operation:?}")))?;
    intent.state = IntentState::parse(&state)?;
    Ok(intent)
}

impl Store {
    /// Records `change` as pending (durably, before the Bitbucket write it
    /// announces); an older pending intent of the same grant is superseded.
    pub fn record_intent(&self, change: &NewIntent) -> Result<Intent, StoreError> {
        self.write(|tx| {
            let now = now_ms();
            tx.execute(
                "UPDATE grant_intents SET state = 'superseded', finished_at = ?2
                 WHERE grant_uid = ?1 AND state = 'pending'",
                params![change.grant_uid, now],
            )?;
            tx.execute(
                "INSERT INTO grant_intents (grant_uid, grant_namespace, grant_name, connector, workspace, target,
                     principal_kind, principal, operation, trigger, level_before, level_after, started_at, state)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, 'pending')",
                params![
                    change.grant_uid,
                    change.grant_namespace,
                    change.grant_name,
                    change.connector,
                    change.workspace,
                    change.target,
                    change.principal_kind,
                    change.principal,
                    change.operation.as_str(),
                    change.trigger,
                    change.level_before,
                    change.level_after,
                    now,
                ],
            )?;
            Ok(Intent {
                id: tx.last_insert_rowid(),
                change: change.clone(),
                started_at: now,
                state: IntentState::Pending,
                finished_at: None,
                message: None,
            })
        })
    }

    /// The pending intent of a grant, if any.
    pub fn pending_intent(&self, grant_uid: &str) -> Result<Option<Intent>, StoreError> {
        self.read(|c| {
            let sql = format!(
                "SELECT {COLUMNS} FROM grant_intents WHERE grant_uid = ?1 AND state = 'pending' ORDER BY id DESC LIMIT 1"
            );
            c.query_row(&sql, params![grant_uid], intent_row)
                .optional()?
                .map(typed)
                .transpose()
        })
    }

    /// Every intent of a grant, oldest first.
    pub fn intents_of(&self, grant_uid: &str) -> Result<Vec<Intent>, StoreError> {
        self.read(|c| {
            let sql = format!("SELECT {COLUMNS} FROM grant_intents WHERE grant_uid = ?1 ORDER BY id");
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt.query_map(params![grant_uid], intent_row)?;
            rows.map(|r| typed(r?)).collect()
        })
    }

    /// Closes a pending intent with how it ended, and appends `audit` in
    /// the same transaction. Closing an intent that is no longer pending
    /// changes nothing (the audit entry is still appended).
    pub fn finish_intent(
        &self,
        id: i64,
        state: IntentState,
        message: &str,
        audit: Option<&super::audit::AuditEntry>,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE grant_intents SET state = ?2, finished_at = ?3, message = ?4 WHERE id = ?1 AND state = 'pending'",
                params![id, state.as_str(), now_ms(), message],
            )?;
            if let Some(entry) = audit {
                super::audit::insert(tx, entry)?;
            }
            Ok(())
        })
    }

    /// Closes every pending intent of a grant (it is gone, or its status
    /// already records the outcome).
    pub fn close_intents_of(&self, grant_uid: &str, state: IntentState, message: &str) -> Result<usize, StoreError> {
        self.write(|tx| {
            Ok(tx.execute(
                "UPDATE grant_intents SET state = ?2, finished_at = ?3, message = ?4
                 WHERE grant_uid = ?1 AND state = 'pending'",
                params![grant_uid, state.as_str(), now_ms(), message],
            )?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(uid: &str, operation: ChangeOperation) -> NewIntent {
        NewIntent {
            grant_uid: uid.into(),
            grant_namespace: "team-a".into(),
            grant_name: "jdoe-write".into(),
            connector: "team-a/bb".into(),
            workspace: "acme".into(),
            target: "repository/api".into(),
            principal_kind: "user".into(),
            principal: "{u1}".into(),
            operation,
            trigger: "grant".into(),
            level_before: Some("read".into()),
            level_after: Some("write".into()),
        }
    }

    #[test]
    fn an_intent_stays_pending_until_closed_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let id = {
            let store = Store::open(&path).unwrap();
            store
                .record_intent(&change("uid-1", ChangeOperation::Grant))
                .unwrap()
                .id
        };
        let store = Store::open(&path).unwrap();
        let pending = store.pending_intent("uid-1").unwrap().expect("pending after reopening");
        assert_eq!(pending.id, id);
        assert_eq!(pending.change, change("uid-1", ChangeOperation::Grant));
        assert_eq!(pending.state, IntentState::Pending);
        assert!(store.pending_intent("uid-2").unwrap().is_none());
        store.finish_intent(id, IntentState::Done, "granted", None).unwrap();
        assert!(store.pending_intent("uid-1").unwrap().is_none());
        // Closing twice keeps the first outcome.
        store.finish_intent(id, IntentState::NotWritten, "again", None).unwrap();
        let all = store.intents_of("uid-1").unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].state, IntentState::Done);
        assert_eq!(all[0].message.as_deref(), Some("granted"));
    }

    #[test]
    fn a_version_2_file_migrates_to_3_keeping_its_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v2.db");
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch(super::super::schema::MIGRATIONS[0]).unwrap();
            conn.execute_batch(super::super::schema::MIGRATIONS[1]).unwrap();
            conn.pragma_update(None, "application_id", super::super::APPLICATION_ID)
                .unwrap();
            conn.pragma_update(None, "user_version", 2).unwrap();
            conn.execute(
                "INSERT INTO runs (connector, kind, status, started_at, finished_at, requests, data_from)
                 VALUES ('ns/c', 'groups', 'failed', 1, 2, 7, 1)",
                [],
            )
            .unwrap();
        }
        // A reader refuses the old file until a writer migrated it.
        assert!(matches!(
            Store::open_read_only(&path),
            Err(StoreError::NeedsMigration { found: 2, .. })
        ));
        let store = Store::open(&path).unwrap();
        let runs = store.runs("ns/c", 10).unwrap();
        assert_eq!((runs.len(), runs[0].requests), (1, 7));
        store.record_intent(&change("uid-1", ChangeOperation::Grant)).unwrap();
        let version: i64 = store
            .read(|c| Ok(c.pragma_query_value(None, "user_version", |r| r.get(0))?))
            .unwrap();
        assert_eq!(version, 3);
    }

    #[test]
    fn a_new_intent_supersedes_an_older_pending_one() {
        let store = Store::open_in_memory().unwrap();
        let first = store.record_intent(&change("uid-1", ChangeOperation::Grant)).unwrap();
        let second = store.record_intent(&change("uid-1", ChangeOperation::Revoke)).unwrap();
        let pending = store.pending_intent("uid-1").unwrap().unwrap();
        assert_eq!(pending.id, second.id);
        assert_eq!(pending.change.operation, ChangeOperation::Revoke);
        let states: Vec<_> = store.intents_of("uid-1").unwrap().iter().map(|i| i.state).collect();
        assert_eq!(states, [IntentState::Superseded, IntentState::Pending]);
        assert_ne!(first.id, second.id);
        assert_eq!(
            store
                .close_intents_of("uid-1", IntentState::NotWritten, "gone")
                .unwrap(),
            1
        );
        assert!(store.pending_intent("uid-1").unwrap().is_none());
    }
}
