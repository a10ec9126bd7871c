//! The organisation being served and its lookup indices: the one piece of
//! state every API family reads, and the permission families write.
//!
//! Lookups that fail answer the error Bitbucket gives for that resource, so
//! handlers can use `?` and stay short.

use std::collections::{BTreeMap, HashMap};

use super::org::{Organisation, Permission, rank};
use super::reply::ApiError;

/// Ground truth plus lookup maps. Writes only touch permissions and group
/// membership, so the maps never go stale.
pub struct OrgState {
    pub org: Organisation,
    pub(super) user_by_uuid: HashMap<String, usize>,
    user_by_account: HashMap<String, usize>,
    user_by_nick: HashMap<String, usize>,
    ws_by_slug: HashMap<String, usize>,
    ws_by_uuid: HashMap<String, usize>,
    pub(super) ws: Vec<WsIndex>,
    /// Bumped on every write; caches keyed by it never go stale.
    pub(super) generation: u64,
}

pub(super) struct WsIndex {
    /// user idx -> owner
    pub(super) members: HashMap<usize, bool>,
    /// member user indices in listing order
    pub(super) member_order: Vec<usize>,
    pub(super) groups: HashMap<String, usize>,
    pub(super) projects: HashMap<String, usize>,
    repos: HashMap<String, usize>,
    repos_by_uuid: HashMap<String, usize>,
}

impl OrgState {
    pub fn new(org: Organisation) -> OrgState {
        let mut user_by_uuid = HashMap::new();
        let mut user_by_account = HashMap::new();
        let mut user_by_nick = HashMap::new();
        for (i, u) in org.users.iter().enumerate() {
            user_by_uuid.insert(u.uuid.clone(), i);
            user_by_account.insert(u.account_id.clone(), i);
            user_by_nick.insert(u.nickname.clone(), i);
        }
        let mut ws_by_slug = HashMap::new();
        let mut ws_by_uuid = HashMap::new();
        let mut ws = Vec::new();
        for (w, wsp) in org.workspaces.iter().enumerate() {
            ws_by_slug.insert(wsp.slug.clone(), w);
            ws_by_uuid.insert(wsp.uuid.clone(), w);
            let mut members = HashMap::new();
            let mut member_order = Vec::new();
            for m in &wsp.members {
                if let Some(&u) = user_by_uuid.get(&m.user_uuid) {
                    members.insert(u, m.owner);
                    member_order.push(u);
                }
            }
            ws.push(WsIndex {
                members,
                member_order,
                groups: wsp
                    .groups
                    .iter()
                    .enumerate()
                    .map(|(i, g)| (g.slug.clone(), i))
                    .collect(),
                projects: wsp
                    .projects
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (p.key.clone(), i))
                    .collect(),
                repos: wsp
                    .repositories
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (r.slug.clone(), i))
                    .collect(),
                repos_by_uuid: wsp
                    .repositories
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (r.uuid.clone(), i))
                    .collect(),
            });
        }
        OrgState {
            org,
            user_by_uuid,
            user_by_account,
            user_by_nick,
            ws_by_slug,
            ws_by_uuid,
            ws,
            generation: 0,
        }
    }

    pub(super) fn workspace(&self, id: &str) -> Option<usize> {
        if id.starts_with('{') {
            self.ws_by_uuid.get(id).copied()
        } else {
            self.ws_by_slug.get(id).copied()
        }
    }

    /// A user by UUID or account id (and nickname when `by_nick`).
    pub(super) fn user(&self, id: &str, by_nick: bool) -> Option<usize> {
        self.user_by_uuid
            .get(id)
            .or_else(|| self.user_by_account.get(id))
            .or_else(|| by_nick.then(|| self.user_by_nick.get(id)).flatten())
            .copied()
    }

    pub(super) fn repo(&self, w: usize, id: &str) -> Option<usize> {
        if id.starts_with('{') {
            self.ws[w].repos_by_uuid.get(id).copied()
        } else {
            self.ws[w].repos.get(id).copied()
        }
    }

    /// Effective repository permissions of a workspace: `(repo, user, rank)`
    /// sorted by repository order then user order. See the module docs.
    pub(super) fn effective(&self, w: usize) -> Vec<(usize, usize, u8)> {
        let wsp = &self.org.workspaces[w];
        let idx = &self.ws[w];
        let mut out = Vec::new();
        for (ri, repo) in wsp.repositories.iter().enumerate() {
            let mut m: BTreeMap<usize, u8> = BTreeMap::new();
            let mut add_users = |perms: &[Permission]| {
                for p in perms {
                    let r = rank(&p.permission);
                    if let (true, Some(&u)) = (r > 0, self.user_by_uuid.get(&p.principal)) {
                        let e = m.entry(u).or_insert(0);
                        *e = (*e).max(r);
                    }
                }
            };
            add_users(&repo.user_permissions);
            let project = idx.projects.get(&repo.project_key).map(|&p| &wsp.projects[p]);
            if let Some(p) = project {
                add_users(&p.user_permissions);
            }
            let group_perms = repo
                .group_permissions
                .iter()
                .chain(project.into_iter().flat_map(|p| p.group_permissions.iter()));
            for gp in group_perms {
                let r = rank(&gp.permission);
                let Some(&g) = idx.groups.get(&gp.principal) else {
                    continue;
                };
                if r == 0 {
                    continue;
                }
                for uu in &wsp.groups[g].members {
                    if let Some(&u) = self.user_by_uuid.get(uu) {
                        let e = m.entry(u).or_insert(0);
                        *e = (*e).max(r);
                    }
                }
            }
            out.extend(m.into_iter().map(|(u, r)| (ri, u, r)));
        }
        out
    }

    /// A workspace by slug or `{uuid}`, else Bitbucket's 404.
    pub(super) fn workspace_or_404(&self, ws: &str) -> Result<usize, ApiError> {
        self.workspace(ws)
            .ok_or_else(|| ApiError::not_found(&format!("No workspace with identifier '{ws}'.")))
    }

    /// A project by key or `{uuid}`.
    pub(super) fn project_or_404(&self, w: usize, key: &str) -> Result<usize, ApiError> {
        let by_key = self.ws[w].projects.get(key).copied();
        by_key
            .or_else(|| self.org.workspaces[w].projects.iter().position(|p| p.uuid == key))
            .ok_or_else(|| ApiError::not_found(&format!("Project {key} not found")))
    }

    /// A repository by slug or `{uuid}`; `ws` is named as the client sent it.
    pub(super) fn repo_or_404(&self, w: usize, ws: &str, slug: &str) -> Result<usize, ApiError> {
        self.repo(w, slug)
            .ok_or_else(|| ApiError::not_found(&format!("Repository {ws}/{slug} not found")))
    }

    /// A group by slug.
    pub(super) fn group_or_404(&self, w: usize, g: &str) -> Result<usize, ApiError> {
        self.ws[w]
            .groups
            .get(g)
            .copied()
            .ok_or_else(|| ApiError::not_found(&format!("Group {g} not found")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulator::org::rank_name;

    #[test]
    fn effective_permission_rule() {
        use super::super::org::{Group, Member, Project, Repository, User, Workspace};
        let user = |n: usize| User {
            uuid: format!("{{u{n}}}"),
            account_id: format!("557058:u{n}"),
            nickname: format!("u{n}"),
            display_name: format!("U {n}"),
            email: format!("u{n}@x"),
            active: true,
        };
        let grant = |p: &str, perm: &str| Permission {
            principal: p.to_string(),
            permission: perm.to_string(),
        };
        let org = Organisation {
            users: (0..6).map(user).collect(),
            workspaces: vec![Workspace {
                uuid: "{w}".into(),
                slug: "w".into(),
                name: "W".into(),
                is_private: true,
                members: (0..5)
                    .map(|n| Member {
                        user_uuid: format!("{{u{n}}}"),
                        owner: n == 0,
                    })
                    .collect(),
                groups: vec![Group {
                    slug: "devs".into(),
                    name: "Devs".into(),
                    permission: None,
                    members: vec!["{u1}".into(), "{u2}".into()],
                }],
                projects: vec![Project {
                    uuid: "{p}".into(),
                    key: "P".into(),
                    name: "P".into(),
                    // create-repo counts as write on repositories.
                    user_permissions: vec![grant("{u3}", "create-repo"), grant("{u4}", "none")],
                    group_permissions: vec![grant("devs", "read")],
                }],
                repositories: vec![Repository {
                    uuid: "{r}".into(),
                    slug: "r".into(),
                    name: "r".into(),
                    project_key: "P".into(),
                    is_private: true,
                    // `none` on the repository does not cancel the group grant;
                    // u5 is not a workspace member but keeps the grant.
                    user_permissions: vec![grant("{u1}", "none"), grant("{u2}", "admin"), grant("{u5}", "read")],
                    group_permissions: vec![grant("devs", "write")],
                }],
            }],
        };
        let st = OrgState::new(org);
        let got: Vec<(usize, usize, &str)> = st
            .effective(0)
            .into_iter()
            .map(|(r, u, rk)| (r, u, rank_name(rk)))
            .collect();
        // u0 (owner, no grants) and u4 (`none` only) are absent.
        assert_eq!(
            got,
            vec![(0, 1, "write"), (0, 2, "admin"), (0, 3, "write"), (0, 5, "read")]
        );
    }
}
