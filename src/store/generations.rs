//! Generations: a run's batch written as a NEW generation and `current`
//! switched to it in one transaction ([`Store::commit_run`]), with a
//! workspace-scoped run's batch merged into the data outside its scope,
//! the batch validated first and old generations pruned after; reading,
//! counting and comparing kept generations; and provisioning's in-place
//! [`Store::replace_resource_grants`]. Kept together because they share a
//! generation's invariants: rows of its kind only, entitlement and grant
//! links checked before writing, counts kept in its `generations` row.

use std::collections::{HashMap, HashSet};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::model::{Entitlement, Grant, Profile, Resource, SyncBatch, SyncKind};

use super::runs::{parse_workspaces, prune_runs, running_run};
use super::{
    Generation, RunId, Store, StoreError, collect_grants, collect_resources, grant_row, now_ms, resource_row, to_i64,
    to_u64,
};

/// Row counts of one generation (or one run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub resources: u64,
    pub entitlements: u64,
    pub grants: u64,
}

/// One kept generation of a `(connector, kind)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationInfo {
    pub generation: Generation,
    pub connector: String,
    pub kind: SyncKind,
    /// The run that wrote it.
    pub run_id: Option<RunId>,
    /// Unix epoch milliseconds.
    pub committed_at: i64,
    pub counts: Counts,
    /// Whether this is the generation readers see.
    pub current: bool,
}

/// Grants that differ between two generations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantDiff {
    pub from: Generation,
    pub to: Generation,
    /// In `to`, not in `from` (by grant id), sorted by id.
    pub added: Vec<Grant>,
    /// In `from`, not in `to`, sorted by id.
    pub removed: Vec<Grant>,
}

impl Store {
    /// Writes `batch` as a new generation of the run's `(connector, kind)`,
    /// makes it current, marks the run ok and prunes old generations: one
    /// transaction. On error nothing changes and the run stays running (the
    /// caller reports it with [`Store::fail_run`]).
    ///
    /// The batch must hold only resources of the kind's type, entitlements on
    /// those resources and grants of those entitlements. Rows repeating an
    /// id are stored once (the last wins).
    pub fn commit_run(&self, run: RunId, batch: &SyncBatch, requests: u64) -> Result<Generation, StoreError> {
        let keep = self.history();
        self.write(|tx| commit_tx(tx, run, batch, requests, keep))
    }

    /// The current generation of `(connector, kind)`, if any run committed.
    pub fn current_generation(&self, connector: &str, kind: SyncKind) -> Result<Option<Generation>, StoreError> {
        self.read(|c| current_of(c, connector, kind))
    }

    /// Kept generations of `(connector, kind)`, newest first.
    pub fn generations(&self, connector: &str, kind: SyncKind) -> Result<Vec<GenerationInfo>, StoreError> {
        self.read(|c| {
            let current = current_of(c, connector, kind)?;
            let mut stmt = c.prepare_cached(
                "SELECT id, run_id, committed_at, resources, entitlements, grants FROM generations
                 WHERE connector = ?1 AND kind = ?2 ORDER BY id DESC",
            )?;
            let rows = stmt.query_map(params![connector, kind.as_str()], |r| {
                Ok(GenerationInfo {
                    generation: r.get(0)?,
                    connector: connector.to_owned(),
                    kind,
                    run_id: r.get(1)?,
                    committed_at: r.get(2)?,
                    counts: Counts {
                        resources: to_u64(r.get(3)?),
                        entitlements: to_u64(r.get(4)?),
                        grants: to_u64(r.get(5)?),
                    },
                    current: false,
                })
            })?;
            let mut out = rows.collect::<Result<Vec<_>, _>>()?;
            for g in &mut out {
                g.current = Some(g.generation) == current;
            }
            Ok(out)
        })
    }

    /// Like [`Store::batch`] for any kept generation.
    pub fn generation_batch(
        &self,
        connector: &str,
        kind: SyncKind,
        generation: Generation,
    ) -> Result<SyncBatch, StoreError> {
        self.read(|c| {
            check_generation(c, connector, kind, generation)?;
            generation_batch(c, kind, generation)
        })
    }

    /// Row counts of the current generation (zeros if none).
    pub fn counts(&self, connector: &str, kind: SyncKind) -> Result<Counts, StoreError> {
        self.read(|c| {
            let row = c
                .query_row(
                    "SELECT g.resources, g.entitlements, g.grants FROM current c
                     JOIN generations g ON g.id = c.generation WHERE c.connector = ?1 AND c.kind = ?2",
                    params![connector, kind.as_str()],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)),
                )
                .optional()?;
            Ok(row
                .map(|(r, e, g)| Counts {
                    resources: to_u64(r),
                    entitlements: to_u64(e),
                    grants: to_u64(g),
                })
                .unwrap_or_default())
        })
    }

    /// Grants added and removed going from generation `from` to `to` (both
    /// kept generations of `(connector, kind)`).
    pub fn diff_grants(
        &self,
        connector: &str,
        kind: SyncKind,
        from: Generation,
        to: Generation,
    ) -> Result<GrantDiff, StoreError> {
        self.read(|c| {
            check_generation(c, connector, kind, from)?;
            check_generation(c, connector, kind, to)?;
            let mut stmt = c.prepare_cached(
                "SELECT g.id, g.entitlement_id, g.principal_type, g.principal_id, g.unknown_principal
                 FROM grants g WHERE g.generation = ?1
                   AND NOT EXISTS (SELECT 1 FROM grants h WHERE h.generation = ?2 AND h.id = g.id)
                 ORDER BY g.id",
            )?;
            let added = collect_grants(stmt.query_map(params![to, from], grant_row)?)?;
            let removed = collect_grants(stmt.query_map(params![from, to], grant_row)?)?;
            Ok(GrantDiff {
                from,
                to,
                added,
                removed,
            })
        })
    }

    /// Provisioning: replaces the grants on one resource in the CURRENT
    /// generation of `(connector, kind)`, in place and in one transaction,
    /// without a full sync. Every grant must be of an entitlement of that
    /// resource. The next sync's generation supersedes this.
    pub fn replace_resource_grants(
        &self,
        connector: &str,
        kind: SyncKind,
        resource_id: &str,
        grants: &[Grant],
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            let generation = current_of(tx, connector, kind)?.ok_or_else(|| StoreError::NoCurrentGeneration {
                connector: connector.to_owned(),
                kind,
            })?;
            let exists: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM resources WHERE generation = ?1 AND id = ?2)",
                params![generation, resource_id],
                |r| r.get(0),
            )?;
            if !exists {
                return Err(StoreError::UnknownResource {
                    connector: connector.to_owned(),
                    kind,
                    resource_id: resource_id.to_owned(),
                });
            }
            let mut stmt =
                tx.prepare_cached("SELECT id, slug FROM entitlements WHERE generation = ?1 AND resource_id = ?2")?;
            let ents = stmt
                .query_map(params![generation, resource_id], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let slugs: HashMap<&str, (&str, &str)> = ents
                .iter()
                .map(|(id, slug)| (id.as_str(), (resource_id, slug.as_str())))
                .collect();
            let grants = dedup(grants, |g| &g.id);
            for g in &grants {
                if !slugs.contains_key(g.entitlement_id.as_str()) {
                    return Err(StoreError::InvalidBatch {
                        kind,
                        reason: format!(
                            "grant {} is of entitlement {}, which is not an entitlement of resource {resource_id}",
                            g.id, g.entitlement_id
                        ),
                    });
                }
            }
            let removed = tx.execute(
                "DELETE FROM grants WHERE generation = ?1 AND resource_id = ?2",
                params![generation, resource_id],
            )?;
            insert_grants(tx, generation, &grants, &slugs)?;
            tx.execute(
                "UPDATE generations SET grants = grants - ?2 + ?3 WHERE id = ?1",
                params![generation, to_i64(removed), to_i64(grants.len())],
            )?;
            Ok(())
        })
    }
}

// Long: one transaction's steps (generation row, batch inserts, scope
// carry-over, switch, prune) must stay in this order.
/// The body of [`Store::commit_run`], inside its transaction.
fn commit_tx(
    tx: &Connection,
    run: RunId,
    batch: &SyncBatch,
    requests: u64,
    keep: usize,
) -> Result<Generation, StoreError> {
    let (connector, kind, started_at) = running_run(tx, run)?;
    let scope: Option<String> =
        tx.query_row("SELECT workspaces FROM runs WHERE id = ?1", params![run], |r| r.get(0))?;
    let merged;
    let batch = match parse_workspaces(scope.as_deref())? {
        Some(scope) => match current_of(tx, &connector, kind)? {
            Some(previous) => {
                let previous = generation_batch(tx, kind, previous)?;
                merged = keep_outside_scope(previous, batch, &scope.into_iter().collect());
                &merged
            }
            None => batch,
        },
        None => batch,
    };
    let valid = validate_batch(kind, batch)?;
    let now = now_ms();
    tx.execute(
        "INSERT INTO generations (connector, kind, run_id, committed_at) VALUES (?1, ?2, ?3, ?4)",
        params![connector, kind.as_str(), run, now],
    )?;
    let generation = tx.last_insert_rowid();
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO resources (generation, id, display_name, parent_id, profile) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for r in &valid.resources {
            let profile = serde_json::to_string(&r.profile)
                .map_err(|e| StoreError::Corrupt(format!("resource {}: profile: {e}", r.id)))?;
            stmt.execute(params![generation, r.id, r.display_name, r.parent_id, profile])?;
        }
        let mut stmt = tx.prepare_cached(
            "INSERT INTO entitlements (generation, id, resource_id, slug, display_name) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for e in &valid.entitlements {
            stmt.execute(params![generation, e.id, e.resource_id, e.slug, e.display_name])?;
        }
    }
    let slugs: HashMap<&str, (&str, &str)> = valid
        .entitlements
        .iter()
        .map(|e| (e.id.as_str(), (e.resource_id.as_str(), e.slug.as_str())))
        .collect();
    insert_grants(tx, generation, &valid.grants, &slugs)?;
    let counts = Counts {
        resources: valid.resources.len() as u64,
        entitlements: valid.entitlements.len() as u64,
        grants: valid.grants.len() as u64,
    };
    tx.execute(
        "UPDATE generations SET resources = ?2, entitlements = ?3, grants = ?4 WHERE id = ?1",
        params![
            generation,
            to_i64(valid.resources.len()),
            to_i64(valid.entitlements.len()),
            to_i64(valid.grants.len())
        ],
    )?;
    tx.execute(
        "INSERT INTO current (connector, kind, generation) VALUES (?1, ?2, ?3)
             ON CONFLICT (connector, kind) DO UPDATE SET generation = excluded.generation",
        params![connector, kind.as_str(), generation],
    )?;
    tx.execute(
        "UPDATE runs SET status = 'ok', finished_at = ?2, requests = ?3, resources = ?4,
               entitlements = ?5, grants = ?6, generation = ?7, error = NULL WHERE id = ?1",
        params![
            run,
            now.max(started_at),
            requests as i64,
            counts.resources as i64,
            counts.entitlements as i64,
            counts.grants as i64,
            generation
        ],
    )?;
    tx.execute("DELETE FROM checkpoints WHERE run_id = ?1", params![run])?;
    prune_generations(tx, &connector, kind, keep)?;
    prune_runs(tx, &connector, kind)?;
    tracing::debug!(run, connector, %kind, generation, ?counts, "generation committed");
    Ok(generation)
}

/// The workspaces a resource belongs to: itself for a workspace, its
/// parent for groups, projects and repositories, its memberships for users.
fn resource_workspaces(r: &Resource) -> Vec<&str> {
    match (&r.profile, &r.parent_id) {
        (Profile::Workspace(_), _) => vec![r.id.as_str()],
        (Profile::User(u), _) => u.workspaces.iter().map(String::as_str).collect(),
        (_, Some(parent)) => vec![parent.as_str()],
        (_, None) => Vec::new(),
    }
}

/// A scoped run's batch plus what of `previous` lies outside `scope`: the
/// run replaces only its workspaces' data. A user who is also a member of
/// workspaces outside the scope stays, with those memberships.
fn keep_outside_scope(previous: SyncBatch, batch: &SyncBatch, scope: &HashSet<String>) -> SyncBatch {
    let mut merged = batch.clone();
    let fresh: HashMap<&str, usize> = batch
        .resources
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.as_str(), i))
        .collect();
    let mut kept: HashSet<String> = HashSet::new();
    for mut r in previous.resources {
        let outside: Vec<String> = resource_workspaces(&r)
            .into_iter()
            .filter(|w| !scope.contains(*w))
            .map(str::to_owned)
            .collect();
        if outside.is_empty() {
            continue;
        }
        match (fresh.get(r.id.as_str()), &mut r.profile) {
            (Some(&i), Profile::User(_)) => {
                if let Profile::User(user) = &mut merged.resources[i].profile {
                    user.workspaces.extend(outside);
                    user.workspaces.sort();
                    user.workspaces.dedup();
                }
            }
            (Some(_), _) => {}
            (None, profile) => {
                if let Profile::User(user) = profile {
                    user.workspaces = outside;
                }
                kept.insert(r.id.clone());
                merged.resources.push(r);
            }
        }
    }
    merged.entitlements.extend(
        previous
            .entitlements
            .into_iter()
            .filter(|e| kept.contains(&e.resource_id)),
    );
    let kept_entitlements: HashSet<&str> = merged
        .entitlements
        .iter()
        .filter(|e| kept.contains(&e.resource_id))
        .map(|e| e.id.as_str())
        .collect();
    let carried: Vec<Grant> = previous
        .grants
        .into_iter()
        .filter(|g| kept_entitlements.contains(g.entitlement_id.as_str()))
        .collect();
    merged.grants.extend(carried);
    merged
}

pub(super) fn current_of(c: &Connection, connector: &str, kind: SyncKind) -> Result<Option<Generation>, StoreError> {
    Ok(
        c.prepare_cached("SELECT generation FROM current WHERE connector = ?1 AND kind = ?2")?
            .query_row(params![connector, kind.as_str()], |r| r.get(0))
            .optional()?,
    )
}

fn check_generation(c: &Connection, connector: &str, kind: SyncKind, generation: Generation) -> Result<(), StoreError> {
    let ok: bool = c.query_row(
        "SELECT EXISTS (SELECT 1 FROM generations WHERE id = ?1 AND connector = ?2 AND kind = ?3)",
        params![generation, connector, kind.as_str()],
        |r| r.get(0),
    )?;
    if ok {
        Ok(())
    } else {
        Err(StoreError::UnknownGeneration {
            connector: connector.to_owned(),
            kind,
            generation,
        })
    }
}

pub(super) fn generation_batch(
    c: &Connection,
    kind: SyncKind,
    generation: Generation,
) -> Result<SyncBatch, StoreError> {
    let t = kind.resource_type();
    let mut stmt = c.prepare_cached(
        "SELECT ?2, id, display_name, parent_id, profile FROM resources WHERE generation = ?1 ORDER BY id",
    )?;
    let resources = collect_resources(stmt.query_map(params![generation, kind.as_str()], resource_row)?)?;
    let mut stmt = c.prepare_cached(
        "SELECT id, resource_id, slug, display_name FROM entitlements WHERE generation = ?1 ORDER BY id",
    )?;
    let entitlements = stmt
        .query_map(params![generation], |r| {
            Ok(Entitlement {
                id: r.get(0)?,
                resource_type: t,
                resource_id: r.get(1)?,
                slug: r.get(2)?,
                display_name: r.get(3)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut stmt = c.prepare_cached(
        "SELECT id, entitlement_id, principal_type, principal_id, unknown_principal
         FROM grants WHERE generation = ?1 ORDER BY id",
    )?;
    let grants = collect_grants(stmt.query_map(params![generation], grant_row)?)?;
    Ok(SyncBatch {
        resources,
        entitlements,
        grants,
    })
}

fn insert_grants(
    tx: &Connection,
    generation: Generation,
    grants: &[&Grant],
    entitlements: &HashMap<&str, (&str, &str)>,
) -> Result<(), StoreError> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO grants (generation, id, entitlement_id, resource_id, slug, principal_type, principal_id, unknown_principal)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    for g in grants {
        let (resource_id, slug) = entitlements
            .get(g.entitlement_id.as_str())
            .copied()
            .ok_or_else(|| StoreError::Corrupt(format!("grant {} lost its entitlement", g.id)))?;
        stmt.execute(params![
            generation,
            g.id,
            g.entitlement_id,
            resource_id,
            slug,
            g.principal_type.as_str(),
            g.principal_id,
            g.unknown_principal
        ])?;
    }
    Ok(())
}

/// Keeps the last occurrence of each id, in first-seen order.
fn dedup<'a, T>(items: &'a [T], id: impl Fn(&'a T) -> &'a str) -> Vec<&'a T> {
    let mut last: HashMap<&str, usize> = HashMap::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        last.insert(id(item), i);
    }
    if last.len() == items.len() {
        return items.iter().collect();
    }
    let mut seen = HashSet::with_capacity(last.len());
    let mut out = Vec::with_capacity(last.len());
    for item in items {
        let key = id(item);
        if seen.insert(key) {
            out.push(&items[last[key]]);
        }
    }
    out
}

struct ValidBatch<'a> {
    resources: Vec<&'a Resource>,
    entitlements: Vec<&'a Entitlement>,
    grants: Vec<&'a Grant>,
}

fn validate_batch(kind: SyncKind, batch: &SyncBatch) -> Result<ValidBatch<'_>, StoreError> {
    let t = kind.resource_type();
    let invalid = |reason: String| StoreError::InvalidBatch { kind, reason };
    let resources = dedup(&batch.resources, |r| &r.id);
    let entitlements = dedup(&batch.entitlements, |e| &e.id);
    let grants = dedup(&batch.grants, |g| &g.id);
    let ids: HashSet<&str> = resources.iter().map(|r| r.id.as_str()).collect();
    for r in &resources {
        if r.resource_type != t || r.profile.resource_type() != t {
            return Err(invalid(format!(
                "resource {} is a {} with a {} profile, not a {t}",
                r.id,
                r.resource_type,
                r.profile.resource_type()
            )));
        }
    }
    for e in &entitlements {
        if e.resource_type != t {
            return Err(invalid(format!(
                "entitlement {} is on a {}, not a {t}",
                e.id, e.resource_type
            )));
        }
        if !ids.contains(e.resource_id.as_str()) {
            return Err(invalid(format!(
                "entitlement {} is on resource {}, which is not in the batch",
                e.id, e.resource_id
            )));
        }
    }
    let ents: HashSet<&str> = entitlements.iter().map(|e| e.id.as_str()).collect();
    for g in &grants {
        if !ents.contains(g.entitlement_id.as_str()) {
            return Err(invalid(format!(
                "grant {} is of entitlement {}, which is not in the batch",
                g.id, g.entitlement_id
            )));
        }
    }
    // Inserting in key order fills B-tree pages sequentially: much faster
    // for big batches than random order.
    let (mut resources, mut entitlements, mut grants) = (resources, entitlements, grants);
    resources.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    entitlements.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    grants.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    Ok(ValidBatch {
        resources,
        entitlements,
        grants,
    })
}

pub(super) fn delete_generation(tx: &Connection, generation: Generation) -> Result<(), StoreError> {
    for sql in [
        "DELETE FROM grants WHERE generation = ?1",
        "DELETE FROM entitlements WHERE generation = ?1",
        "DELETE FROM resources WHERE generation = ?1",
        "DELETE FROM generations WHERE id = ?1",
    ] {
        tx.prepare_cached(sql)?.execute(params![generation])?;
    }
    Ok(())
}

fn prune_generations(tx: &Connection, connector: &str, kind: SyncKind, keep: usize) -> Result<(), StoreError> {
    let old = tx
        .prepare_cached(
            "SELECT id FROM generations WHERE connector = ?1 AND kind = ?2
               AND id NOT IN (SELECT generation FROM current)
             ORDER BY id DESC LIMIT -1 OFFSET ?3",
        )?
        .query_map(params![connector, kind.as_str(), to_i64(keep.max(1) - 1)], |r| {
            r.get::<_, i64>(0)
        })?
        .collect::<Result<Vec<_>, _>>()?;
    for g in old {
        delete_generation(tx, g)?;
        tracing::debug!(connector, %kind, generation = g, "generation pruned");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RunStatus;
    use crate::store::tests::batch;

    #[test]
    fn a_commit_interrupted_after_writing_everything_leaves_no_trace() {
        let store = Store::open_in_memory().unwrap().with_history(1);
        let run = store.start_run("c", SyncKind::Repositories).unwrap();
        let first = batch("first", 3);
        let g1 = store.commit_run(run, &first, 1).unwrap();
        let run = store.start_run("c", SyncKind::Repositories).unwrap();
        // The whole commit (insert, switch, prune of g1) runs, then the
        // transaction dies before COMMIT.
        let err = store
            .write(|tx| {
                commit_tx(tx, run, &batch("second", 5), 2, 1)?;
                Err::<(), _>(StoreError::Corrupt("injected crash".into()))
            })
            .unwrap_err();
        assert!(err.to_string().contains("injected crash"));
        assert_eq!(store.current_generation("c", SyncKind::Repositories).unwrap(), Some(g1));
        assert_eq!(store.batch("c", SyncKind::Repositories).unwrap(), first);
        assert_eq!(store.generations("c", SyncKind::Repositories).unwrap().len(), 1);
        let runs = store.runs("c", 1).unwrap();
        assert_eq!((runs[0].id, runs[0].status), (run, RunStatus::Running));
        // The run can still commit.
        let g2 = store.commit_run(run, &batch("second", 5), 2).unwrap();
        assert!(g2 > g1);
        assert_eq!(store.generations("c", SyncKind::Repositories).unwrap().len(), 1);
    }

    #[test]
    fn repeated_ids_in_a_batch_are_stored_once_last_wins() {
        let store = Store::open_in_memory().unwrap();
        let mut b = batch("x", 2);
        let mut again = b.resources[0].clone();
        again.display_name = "renamed".into();
        b.resources.push(again);
        b.grants.push(b.grants[1].clone());
        let run = store.start_run("c", SyncKind::Repositories).unwrap();
        store.commit_run(run, &b, 0).unwrap();
        let stored = store.batch("c", SyncKind::Repositories).unwrap();
        assert_eq!(stored.resources.len(), 2);
        assert_eq!(stored.grants.len(), 2);
        assert!(stored.resources.iter().any(|r| r.display_name == "renamed"));
        let c = store.counts("c", SyncKind::Repositories).unwrap();
        assert_eq!((c.resources, c.entitlements, c.grants), (2, 2, 2));
    }
}
