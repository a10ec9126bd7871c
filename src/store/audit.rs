//! The audit log: one row per grant, revoke, restore, expiry, denial and
//! recovery of an interrupted change, kept in the store file so it outlives
//! Events (which the API server drops after an hour) and operator restarts.
//! Append-only: SQLite triggers refuse every UPDATE and DELETE of a row, so
//! not even a bug in this program can rewrite history through the store API.
//! Read with `bitbucket-operator access audit` or the data API's `audit`.

use rusqlite::{Transaction, params};
use serde::{Deserialize, Serialize};

use super::{Store, StoreError, now_ms};

/// What happened to the access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditAction {
    /// A grant put (or found) the permission in place.
    Grant,
    /// The access ended (deletion, spec change) by removing the level.
    Revoke,
    /// The access ended (deletion, spec change) by putting the level held before back.
    Restore,
    /// The access ended at its expiry.
    Expire,
    /// The request was refused by policy: nothing was written.
    Deny,
    /// A change interrupted by a stop (crash, lost lease) was resolved after restart.
    Recover,
}

impl AuditAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Grant => "grant",
            AuditAction::Revoke => "revoke",
            AuditAction::Restore => "restore",
            AuditAction::Expire => "expire",
            AuditAction::Deny => "deny",
            AuditAction::Recover => "recover",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "grant" => AuditAction::Grant,
            "revoke" => AuditAction::Revoke,
            "restore" => AuditAction::Restore,
            "expire" => AuditAction::Expire,
            "deny" => AuditAction::Deny,
            "recover" => AuditAction::Recover,
            _ => return None,
        })
    }
}

impl std::fmt::Display for AuditAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One audit row. `at` is Unix epoch milliseconds (set on append when 0);
/// levels are Bitbucket slugs, `None` for nothing held.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Assigned on append (0 before).
    pub id: i64,
    pub at: i64,
    pub action: String,
    /// `succeeded`, `unchanged`, `failed`, `denied`, `changed_externally`,
    /// `not_written`, `skipped`.
    pub outcome: String,
    /// The annotation `connectors.dev/requested-by` of the grant (empty when absent).
    pub requester: String,
    pub grant_namespace: String,
    pub grant_name: String,
    pub grant_uid: String,
    /// `namespace/name` of the connector.
    pub connector: String,
    pub workspace: String,
    /// `repository/<slug>`, `project/<KEY>` or `group/<slug>`.
    pub target: String,
    /// The principal as resolved (user UUID, group slug), else as requested.
    pub principal: String,
    pub level_before: Option<String>,
    pub level_after: Option<String>,
    pub message: String,
}

impl AuditEntry {
    /// The action, typed (`None` for a value written by a newer version).
    pub fn action(&self) -> Option<AuditAction> {
        AuditAction::parse(&self.action)
    }
}

/// Appends one row inside an open write transaction.
pub(super) fn insert(tx: &Transaction<'_>, entry: &AuditEntry) -> Result<i64, StoreError> {
    let at = if entry.at > 0 { entry.at } else { now_ms() };
    tx.execute(
        "INSERT INTO audit (at, action, outcome, requester, grant_namespace, grant_name, grant_uid, connector,
             workspace, target, principal, level_before, level_after, message)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
        params![
            at,
            entry.action,
            entry.outcome,
            entry.requester,
            entry.grant_namespace,
            entry.grant_name,
            entry.grant_uid,
            entry.connector,
            entry.workspace,
            entry.target,
            entry.principal,
            entry.level_before,
            entry.level_after,
            entry.message,
        ],
    )?;
    Ok(tx.last_insert_rowid())
}

impl Store {
    /// Appends one entry; returns its id.
    pub fn append_audit(&self, entry: &AuditEntry) -> Result<i64, StoreError> {
        self.write(|tx| insert(tx, entry))
    }

    /// Entries at or after `since_ms` (all when `None`), of one connector
    /// (`namespace/name`) or all, oldest first.
    pub fn audit(&self, since_ms: Option<i64>, connector: Option<&str>) -> Result<Vec<AuditEntry>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT id, at, action, outcome, requester, grant_namespace, grant_name, grant_uid, connector,
                        workspace, target, principal, level_before, level_after, message
                 FROM audit WHERE at >= ?1 AND (?2 IS NULL OR connector = ?2) ORDER BY at, id",
            )?;
            let rows = stmt.query_map(params![since_ms.unwrap_or(i64::MIN), connector], |r| {
                Ok(AuditEntry {
                    id: r.get(0)?,
                    at: r.get(1)?,
                    action: r.get(2)?,
                    outcome: r.get(3)?,
                    requester: r.get(4)?,
                    grant_namespace: r.get(5)?,
                    grant_name: r.get(6)?,
                    grant_uid: r.get(7)?,
                    connector: r.get(8)?,
                    workspace: r.get(9)?,
                    target: r.get(10)?,
                    principal: r.get(11)?,
                    level_before: r.get(12)?,
                    level_after: r.get(13)?,
                    message: r.get(14)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(at: i64, connector: &str, action: AuditAction) -> AuditEntry {
        AuditEntry {
            at,
            action: action.as_str().into(),
            outcome: "succeeded".into(),
            requester: "alice@example.com".into(),
            grant_namespace: "team-a".into(),
            grant_name: "g".into(),
            grant_uid: "uid".into(),
            connector: connector.into(),
            workspace: "acme".into(),
            target: "repository/api".into(),
            principal: "{u1}".into(),
            level_before: Some("read".into()),
            level_after: Some("write".into()),
            message: "granted write".into(),
            ..AuditEntry::default()
        }
    }

    #[test]
    fn entries_survive_reopening_and_filter_by_time_and_connector() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        {
            let store = Store::open(&path).unwrap();
            store
                .append_audit(&entry(1_000, "team-a/bb", AuditAction::Grant))
                .unwrap();
            store
                .append_audit(&entry(2_000, "team-b/bb", AuditAction::Deny))
                .unwrap();
            store
                .append_audit(&entry(3_000, "team-a/bb", AuditAction::Expire))
                .unwrap();
        }
        let store = Store::open_read_only(&path).unwrap();
        let all = store.audit(None, None).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].action(), Some(AuditAction::Grant));
        assert_eq!(all[0].level_before.as_deref(), Some("read"));
        let recent: Vec<_> = store.audit(Some(2_000), None).unwrap().iter().map(|e| e.at).collect();
        assert_eq!(recent, [2_000, 3_000]);
        let team_a: Vec<_> = store
            .audit(None, Some("team-a/bb"))
            .unwrap()
            .iter()
            .map(|e| e.action.clone())
            .collect();
        assert_eq!(team_a, ["grant", "expire"]);
    }

    #[test]
    fn the_log_is_append_only() {
        let store = Store::open_in_memory().unwrap();
        store.append_audit(&entry(1_000, "c", AuditAction::Grant)).unwrap();
        let err = store
            .write(|tx| Ok(tx.execute("UPDATE audit SET outcome = 'x'", [])?))
            .unwrap_err();
        assert!(err.to_string().contains("append-only"), "{err}");
        let err = store.write(|tx| Ok(tx.execute("DELETE FROM audit", [])?)).unwrap_err();
        assert!(err.to_string().contains("append-only"), "{err}");
        assert_eq!(store.audit(None, None).unwrap().len(), 1);
    }
}
