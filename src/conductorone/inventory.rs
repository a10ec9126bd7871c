//! One connector's stored inventory as ConductorOne objects: resource types,
//! resources, entitlements and grants shaped exactly like baton-bitbucket's
//! (PROTOCOL.md §3), plus what this connector knows better (user emails,
//! logins and status, the workspace `owner` entitlement).
//!
//! The store keeps what Bitbucket said; this module decides how it looks to
//! ConductorOne:
//! - users are listed once, under the first workspace (by UUID) they are a
//!   member of, because a c1z holds each resource id once per sync;
//! - repositories sit under their project (the store files them under the
//!   workspace);
//! - the project `repository` entitlement is derived from the repositories'
//!   projects (baton-bitbucket's "repositories in this project");
//! - a grant to a user who is in no synced workspace (a former member who kept
//!   an explicit permission) gets a user resource of its own, so the grant has
//!   a principal and an access review sees it; a grant to a group that is not
//!   in the store is left out and counted, since nothing can be said about it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use prost_types::{Struct, Value, value::Kind};

use super::proto::connector as pb;
use super::proto::to_any;
use crate::model::{self, ResourceType, SyncKind};
use crate::store::{Store, StoreError};

/// Every resource type, in the order baton-bitbucket registers them.
pub const RESOURCE_TYPES: [ResourceType; 5] = [
    ResourceType::Workspace,
    ResourceType::User,
    ResourceType::UserGroup,
    ResourceType::Project,
    ResourceType::Repository,
];

/// A row of one of the c1z object tables, with the columns the readers index.
#[derive(Debug, Clone)]
pub struct ResourceRow {
    pub resource: pb::Resource,
    /// Unix ms when the data was read from Bitbucket.
    pub observed_at: i64,
}

#[derive(Debug, Clone)]
pub struct EntitlementRow {
    pub entitlement: pb::Entitlement,
    pub observed_at: i64,
}

#[derive(Debug, Clone)]
pub struct GrantRow {
    pub grant: pb::Grant,
    pub observed_at: i64,
}

/// How old one resource type's data is, for the run's stats and the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeAge {
    pub kind: SyncKind,
    /// Unix ms of the generation's commit.
    pub committed_at: i64,
}

/// Everything one c1z holds, ready to write.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub resource_types: Vec<pb::ResourceType>,
    pub resources: Vec<ResourceRow>,
    pub entitlements: Vec<EntitlementRow>,
    pub grants: Vec<GrantRow>,
    pub ages: Vec<TypeAge>,
    /// Users synthesised for grants to non-members.
    pub non_member_users: usize,
    /// Grants left out because their group principal is not in the store.
    pub dropped_grants: usize,
}

/// Why an inventory cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("connector {connector:?} has no {kind} data in the store yet; run a sync of every resource type first")]
    Incomplete { connector: String, kind: SyncKind },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The ConductorOne resource type of a model type, as baton-bitbucket declares it.
pub fn resource_type(t: ResourceType) -> pb::ResourceType {
    use pb::resource_type::Trait;
    let (display, traits): (&str, &[Trait]) = match t {
        ResourceType::Workspace => ("Workspace", &[]),
        ResourceType::User => ("User", &[Trait::User]),
        ResourceType::UserGroup => ("UserGroup", &[Trait::Group]),
        ResourceType::Project => ("Project", &[Trait::Group]),
        ResourceType::Repository => ("Repository", &[]),
    };
    pb::ResourceType {
        id: t.as_str().to_owned(),
        display_name: display.to_owned(),
        traits: traits.iter().map(|&t| t as i32).collect(),
        ..Default::default()
    }
}

/// The child types listed under a resource of type `t`.
fn children(t: ResourceType) -> &'static [ResourceType] {
    match t {
        ResourceType::Workspace => &[ResourceType::UserGroup, ResourceType::User, ResourceType::Project],
        ResourceType::Project => &[ResourceType::Repository],
        _ => &[],
    }
}

/// Reads the current data of every resource type of `connector` and shapes it.
/// Fails when a type has never been synced: a c1z is a complete snapshot.
pub fn build(store: &Store, connector: &str) -> Result<Inventory, InventoryError> {
    let mut batches = BTreeMap::new();
    let mut ages = Vec::new();
    for kind in SyncKind::ALL {
        let current = store
            .generations(connector, kind)?
            .into_iter()
            .find(|g| g.current)
            .ok_or_else(|| InventoryError::Incomplete {
                connector: connector.to_owned(),
                kind,
            })?;
        ages.push(TypeAge {
            kind,
            committed_at: current.committed_at,
        });
        batches.insert(
            kind.resource_type(),
            (store.batch(connector, kind)?, current.committed_at),
        );
    }
    Ok(shape(&batches, ages))
}

type Batches = BTreeMap<ResourceType, (model::SyncBatch, i64)>;

/// Turns the store's batches into ConductorOne objects (see the module doc).
fn shape(batches: &Batches, ages: Vec<TypeAge>) -> Inventory {
    let mut out = Inventory {
        resource_types: RESOURCE_TYPES.iter().map(|&t| resource_type(t)).collect(),
        ages,
        ..Inventory::default()
    };
    let first_workspace = user_home_workspaces(batches);
    // Every resource, keyed by (type, id), so grants can carry the full principal.
    let mut known: HashMap<(ResourceType, String), pb::Resource> = HashMap::new();
    for &t in &RESOURCE_TYPES {
        let Some((batch, observed_at)) = batches.get(&t) else {
            continue;
        };
        for r in &batch.resources {
            let parent = parent_of(r, &first_workspace, batches);
            let resource = to_resource(r, parent);
            known.insert((t, r.id.clone()), resource.clone());
            out.resources.push(ResourceRow {
                resource,
                observed_at: *observed_at,
            });
        }
    }
    add_entitlements_and_grants(&mut out, batches, &mut known);
    out
}

/// Entitlements of every type, the derived project `repository` entitlement,
/// and the grants, with principals made whole (see the module doc).
fn add_entitlements_and_grants(
    out: &mut Inventory,
    batches: &Batches,
    known: &mut HashMap<(ResourceType, String), pb::Resource>,
) {
    let mut entitlements: HashMap<String, pb::Entitlement> = HashMap::new();
    for &t in &RESOURCE_TYPES {
        let Some((batch, observed_at)) = batches.get(&t) else {
            continue;
        };
        for e in &batch.entitlements {
            let Some(resource) = known.get(&(t, e.resource_id.clone())) else {
                continue;
            };
            let entitlement = to_entitlement(t, resource, &e.slug, &e.display_name);
            entitlements.insert(e.id.clone(), entitlement.clone());
            out.entitlements.push(EntitlementRow {
                entitlement,
                observed_at: *observed_at,
            });
        }
        for g in &batch.grants {
            let Some(entitlement) = entitlements.get(&g.entitlement_id) else {
                continue;
            };
            let key = (g.principal_type, g.principal_id.clone());
            if !known.contains_key(&key) {
                if g.principal_type != ResourceType::User {
                    out.dropped_grants += 1;
                    continue;
                }
                let user = non_member_user(&g.principal_id);
                known.insert(key.clone(), user.clone());
                out.non_member_users += 1;
                let observed_at = *observed_at;
                out.resources.push(ResourceRow {
                    resource: user,
                    observed_at,
                });
            }
            let principal = slim(&known[&key]);
            out.grants.push(GrantRow {
                grant: grant(entitlement, principal, &g.id),
                observed_at: *observed_at,
            });
        }
    }
    add_project_repositories(out, batches, known);
}

/// baton-bitbucket's project `repository` entitlement (assignment, granted to
/// the project's repositories), derived from where each repository lives.
fn add_project_repositories(
    out: &mut Inventory,
    batches: &Batches,
    known: &HashMap<(ResourceType, String), pb::Resource>,
) {
    let Some((projects, observed_at)) = batches.get(&ResourceType::Project) else {
        return;
    };
    let mut by_project: BTreeMap<&str, Vec<&model::Resource>> = BTreeMap::new();
    if let Some((repositories, _)) = batches.get(&ResourceType::Repository) {
        for r in &repositories.resources {
            if let Some(project) = repository_project(r) {
                by_project.entry(project).or_default().push(r);
            }
        }
    }
    for p in &projects.resources {
        let resource = &known[&(ResourceType::Project, p.id.clone())];
        let display = format!("{} repository", p.display_name);
        let entitlement = to_entitlement(ResourceType::Project, resource, "repository", &display);
        for r in by_project.get(p.id.as_str()).into_iter().flatten() {
            let principal = slim(&known[&(ResourceType::Repository, r.id.clone())]);
            let id = model::grant_id(&entitlement.id, ResourceType::Repository, &r.id);
            out.grants.push(GrantRow {
                grant: grant(&entitlement, principal, &id),
                observed_at: *observed_at,
            });
        }
        out.entitlements.push(EntitlementRow {
            entitlement,
            observed_at: *observed_at,
        });
    }
}

/// For each user, the first workspace (by UUID) whose `member` entitlement they hold.
fn user_home_workspaces(batches: &Batches) -> HashMap<String, String> {
    let mut homes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    if let Some((workspaces, _)) = batches.get(&ResourceType::Workspace) {
        for g in &workspaces.grants {
            let Some(workspace) = g
                .entitlement_id
                .strip_prefix("workspace:")
                .and_then(|s| s.strip_suffix(":member"))
            else {
                continue;
            };
            if g.principal_type == ResourceType::User {
                homes
                    .entry(g.principal_id.clone())
                    .or_default()
                    .insert(workspace.to_owned());
            }
        }
    }
    homes
        .into_iter()
        .filter_map(|(user, set)| set.into_iter().next().map(|ws| (user, ws)))
        .collect()
}

/// The parent ConductorOne expects: workspace for users, groups and projects;
/// the project for repositories (falling back to the workspace when the
/// project is not in the store).
fn parent_of(r: &model::Resource, homes: &HashMap<String, String>, batches: &Batches) -> Option<pb::ResourceId> {
    let workspace = |id: &str| id_of(ResourceType::Workspace, id);
    match r.resource_type {
        ResourceType::Workspace => None,
        ResourceType::User => homes.get(&r.id).map(|ws| workspace(ws)),
        ResourceType::UserGroup | ResourceType::Project => r.parent_id.as_deref().map(workspace),
        ResourceType::Repository => {
            let project = repository_project(r).filter(|p| {
                batches
                    .get(&ResourceType::Project)
                    .is_some_and(|(b, _)| b.resources.iter().any(|x| x.id == *p))
            });
            match project {
                Some(p) => Some(id_of(ResourceType::Project, p)),
                None => r.parent_id.as_deref().map(workspace),
            }
        }
    }
}

fn id_of(t: ResourceType, id: &str) -> pb::ResourceId {
    pb::ResourceId {
        resource_type: t.as_str().to_owned(),
        resource: id.to_owned(),
    }
}

/// The project resource id a repository belongs to, when known.
fn repository_project(r: &model::Resource) -> Option<&str> {
    r.profile
        .repository()
        .map(|p| p.project_id.as_str())
        .filter(|s| !s.is_empty())
}

fn non_empty(value: Option<&str>) -> Option<&str> {
    value.filter(|s| !s.is_empty())
}

fn to_resource(r: &model::Resource, parent: Option<pb::ResourceId>) -> pb::Resource {
    let display_name = match r.resource_type {
        // baton-bitbucket names workspaces by slug.
        ResourceType::Workspace => non_empty(r.profile.slug()).unwrap_or(&r.display_name).to_owned(),
        _ => r.display_name.clone(),
    };
    let mut annotations: Vec<prost_types::Any> = children(r.resource_type)
        .iter()
        .map(|child| {
            to_any(
                "c1.connector.v2.ChildResourceType",
                &pb::ChildResourceType {
                    resource_type_id: child.as_str().to_owned(),
                },
            )
        })
        .collect();
    match r.resource_type {
        ResourceType::User => annotations.push(to_any("c1.connector.v2.UserTrait", &user_trait(r))),
        ResourceType::UserGroup | ResourceType::Project | ResourceType::Repository => {
            let profile = profile_struct(r, &["slug", "key", "name", "full_name", "workspace_slug"]);
            annotations.push(to_any("c1.connector.v2.GroupTrait", &pb::GroupTrait { profile }));
        }
        ResourceType::Workspace => {}
    }
    pb::Resource {
        id: Some(id_of(r.resource_type, &r.id)),
        parent_resource_id: parent,
        display_name,
        annotations,
        description: String::new(),
    }
}

/// baton-bitbucket's UserTrait (ENABLED iff `active`, profile with login and
/// user id) plus the email and login when Bitbucket told us.
fn user_trait(r: &model::Resource) -> pb::UserTrait {
    use pb::user_trait::{AccountType, Email, Status, status};
    let user = r.profile.user();
    let account_status = non_empty(user.map(|u| u.status.as_str())).unwrap_or("active");
    let status = Status {
        status: if account_status == "active" {
            status::Status::Enabled
        } else {
            status::Status::Disabled
        } as i32,
        details: account_status.to_owned(),
    };
    let nickname = non_empty(user.and_then(|u| u.nickname.as_deref()));
    let emails = non_empty(user.and_then(|u| u.email.as_deref()))
        .map(|address| {
            vec![Email {
                address: address.to_owned(),
                is_primary: true,
            }]
        })
        .unwrap_or_default();
    let mut profile = profile_struct(r, &["account_id"]).unwrap_or_default();
    if let Some(login) = nickname {
        profile.fields.insert("login".into(), string_value(login));
    }
    profile.fields.insert("user_id".into(), string_value(&r.id));
    pb::UserTrait {
        emails,
        status: Some(status),
        profile: Some(profile),
        account_type: AccountType::Human as i32,
        login: nickname.unwrap_or_default().to_owned(),
    }
}

/// A user known only from a grant: not a member of any synced workspace.
fn non_member_user(uuid: &str) -> pb::Resource {
    use pb::user_trait::{AccountType, Status, status};
    let trait_ = pb::UserTrait {
        status: Some(Status {
            status: status::Status::Unspecified as i32,
            details: "not a member of any synced workspace".into(),
        }),
        account_type: AccountType::Human as i32,
        profile: Some(Struct {
            fields: [("user_id".to_owned(), string_value(uuid))].into_iter().collect(),
        }),
        ..Default::default()
    };
    pb::Resource {
        id: Some(id_of(ResourceType::User, uuid)),
        parent_resource_id: None,
        display_name: uuid.to_owned(),
        annotations: vec![to_any("c1.connector.v2.UserTrait", &trait_)],
        description: "Holds an explicit permission but is not a member of any synced workspace".into(),
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

/// The named text fields of a resource's typed profile, as a protobuf
/// Struct (the profile's JSON form is its one spelling of field names).
fn profile_struct(r: &model::Resource, keys: &[&str]) -> Option<Struct> {
    let json = serde_json::to_value(&r.profile).unwrap_or_default();
    let fields: BTreeMap<String, Value> = keys
        .iter()
        .filter_map(|k| {
            let text = non_empty(json.get(*k).and_then(|v| v.as_str()))?;
            Some(((*k).to_owned(), string_value(text)))
        })
        .collect();
    (!fields.is_empty()).then_some(Struct { fields })
}

/// An entitlement as baton-bitbucket declares it: purpose and who may hold it
/// by slug (PROTOCOL.md §3; `owner` is ours).
pub fn to_entitlement(t: ResourceType, resource: &pb::Resource, slug: &str, display_name: &str) -> pb::Entitlement {
    use pb::entitlement::PurposeValue;
    let principals = [ResourceType::User, ResourceType::UserGroup];
    let (purpose, grantable_to): (PurposeValue, &[ResourceType]) = match (t, slug) {
        (ResourceType::Workspace | ResourceType::UserGroup, "member") => (PurposeValue::Assignment, &principals[..1]),
        (ResourceType::Workspace, _) => (PurposeValue::Permission, &principals[..1]),
        (ResourceType::Project, "repository") => (PurposeValue::Assignment, &[ResourceType::Repository]),
        _ => (PurposeValue::Permission, &principals),
    };
    let resource_id = resource.id.as_ref().map(|id| id.resource.as_str()).unwrap_or_default();
    pb::Entitlement {
        resource: Some(resource.clone()),
        id: model::entitlement_id(t, resource_id, slug),
        display_name: if display_name.is_empty() {
            slug.to_owned()
        } else {
            display_name.to_owned()
        },
        description: String::new(),
        grantable_to: grantable_to.iter().map(|&t| resource_type(t)).collect(),
        annotations: Vec::new(),
        purpose: purpose as i32,
        slug: slug.to_owned(),
    }
}

/// A resource reduced to what a grant's principal needs (id, parent, name, traits).
fn slim(r: &pb::Resource) -> pb::Resource {
    pb::Resource {
        annotations: r
            .annotations
            .iter()
            .filter(|a| !a.type_url.ends_with("ChildResourceType"))
            .cloned()
            .collect(),
        ..r.clone()
    }
}

/// A grant as the SDK builds it: the entitlement carries its id and resource.
fn grant(entitlement: &pb::Entitlement, principal: pb::Resource, id: &str) -> pb::Grant {
    pb::Grant {
        entitlement: Some(pb::Entitlement {
            id: entitlement.id.clone(),
            resource: entitlement.resource.as_ref().map(|r| pb::Resource {
                id: r.id.clone(),
                display_name: r.display_name.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        principal: Some(principal),
        id: id.to_owned(),
        annotations: Vec::new(),
    }
}
