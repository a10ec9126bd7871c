//! The generated organisation: the simulator's ground truth.
//!
//! Everything the HTTP API serves is derived from an [`Organisation`]; writes
//! (permissions-config PUT/DELETE, 1.0 group membership) mutate it. Generation
//! is deterministic for a seed and the sizes in [`SimConfig`].

#[cfg(test)]
use std::collections::HashMap;
use std::collections::{BTreeSet, HashSet};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::SimConfig;

/// The whole simulated Bitbucket Cloud estate.
#[derive(Debug, Clone, Serialize)]
pub struct Organisation {
    pub users: Vec<User>,
    pub workspaces: Vec<Workspace>,
}

/// An Atlassian account.
#[derive(Debug, Clone, Serialize)]
pub struct User {
    /// `{8-4-4-4-12}` with braces.
    pub uuid: String,
    /// `557058:xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    pub account_id: String,
    pub nickname: String,
    pub display_name: String,
    pub email: String,
    pub active: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Workspace {
    pub uuid: String,
    pub slug: String,
    pub name: String,
    pub is_private: bool,
    pub members: Vec<Member>,
    pub groups: Vec<Group>,
    pub projects: Vec<Project>,
    pub repositories: Vec<Repository>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub user_uuid: String,
    pub owner: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Group {
    pub slug: String,
    pub name: String,
    /// The 1.0 default permission: `read`, `write`, `admin` or `None`.
    pub permission: Option<String>,
    /// User UUIDs.
    pub members: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Project {
    pub uuid: String,
    pub key: String,
    pub name: String,
    pub user_permissions: Vec<Permission>,
    pub group_permissions: Vec<Permission>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Repository {
    pub uuid: String,
    pub slug: String,
    pub name: String,
    pub project_key: String,
    pub is_private: bool,
    pub user_permissions: Vec<Permission>,
    pub group_permissions: Vec<Permission>,
}

/// An explicit grant from a permissions-config listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Permission {
    /// A user UUID (user permissions) or a group slug (group permissions).
    pub principal: String,
    /// `read`, `write`, `create-repo` (projects only), `admin` or `none`.
    pub permission: String,
}

const FIRST: &[&str] = &[
    "Ada",
    "Alan",
    "Grace",
    "Linus",
    "Margaret",
    "Dennis",
    "Ken",
    "Barbara",
    "Edsger",
    "Frances",
    "John",
    "Radia",
    "Tim",
    "Katherine",
    "Donald",
    "Leslie",
    "Niklaus",
    "Hedy",
    "Guido",
    "Sophie",
    "Anita",
    "Bjarne",
    "Carol",
    "Dorothy",
    "Evelyn",
    "Fran",
    "Gordon",
    "Hal",
    "Ivan",
    "Jean",
];
const LAST: &[&str] = &[
    "Lovelace",
    "Turing",
    "Hopper",
    "Torvalds",
    "Hamilton",
    "Ritchie",
    "Thompson",
    "Liskov",
    "Dijkstra",
    "Allen",
    "McCarthy",
    "Perlman",
    "Berners-Lee",
    "Johnson",
    "Knuth",
    "Lamport",
    "Wirth",
    "Lamarr",
    "van Rossum",
    "Wilson",
    "Borg",
    "Stroustrup",
    "Shaw",
    "Vaughan",
    "Boole",
    "Moore",
    "Abelson",
    "Sutherland",
    "Sammet",
    "Bartik",
];
const WORKSPACES: &[&str] = &[
    "acme",
    "globex",
    "initech",
    "umbrella",
    "hooli",
    "stark",
    "wayne",
    "tyrell",
    "cyberdyne",
    "soylent",
    "wonka",
    "aperture",
];
const GROUPS: &[&str] = &[
    "Developers",
    "Administrators",
    "QA",
    "Release Managers",
    "Security",
    "Contractors",
    "SRE",
    "Data Science",
    "Designers",
    "Support",
    "Auditors",
    "Interns",
];
const PROJECTS: &[&str] = &[
    "Platform",
    "Mobile",
    "Web",
    "Data",
    "Infrastructure",
    "Security",
    "Payments",
    "Search",
    "Identity",
    "Analytics",
    "Tooling",
    "Documentation",
];
const REPOS: &[&str] = &[
    "api-gateway",
    "billing-service",
    "web-frontend",
    "ios-app",
    "android-app",
    "terraform",
    "helm-charts",
    "auth-service",
    "search-indexer",
    "data-pipeline",
    "design-system",
    "docs",
    "cli",
    "notifications",
    "ledger",
    "scheduler",
];
const PROJECT_PERMS: &[&str] = &["read", "write", "create-repo", "admin"];
const REPO_PERMS: &[&str] = &["read", "write", "admin"];
const GROUP_DEFAULTS: &[Option<&str>] = &[Some("read"), Some("write"), Some("admin"), None];

/// Formats 16 random bytes as a braced UUID (version 4 layout).
pub(crate) fn random_uuid(rng: &mut impl Rng) -> String {
    let mut b: [u8; 16] = rng.random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{{{}-{}-{}-{}-{}}}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn slugify(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// The name and a numeric suffix for the `i`-th item drawn from `words`.
fn nth_name(words: &[&str], i: usize) -> (String, String) {
    let word = words[i % words.len()];
    let round = i / words.len();
    if round == 0 {
        (word.to_string(), String::new())
    } else {
        (format!("{word} {}", round + 1), format!("{}", round + 1))
    }
}

impl Organisation {
    /// Generates an organisation. Deterministic for `config.seed` and the
    /// sizes; latency, limits and faults do not affect it. Each step draws
    /// from the one generator in a fixed order, so reordering steps changes
    /// every organisation.
    pub fn generate(config: &SimConfig) -> Organisation {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let n_ws = config.workspaces.max(1);
        let users = generate_users(&mut rng, config.users.max(1));
        let n_users = users.len();

        // About 2% of the non-admin users are former members: they belong to
        // no workspace but still hold a few explicit permissions.
        let n_former = if n_users > 10 { (n_users / 50).max(1) } else { 0 };
        let former: Vec<usize> = (n_users - n_former..n_users).collect();
        let regular: Vec<usize> = (1..n_users - n_former).collect();

        let mut workspaces = empty_workspaces(&mut rng, n_ws, &users[0].uuid);
        let members = add_members(&mut rng, &mut workspaces, &users, &regular);
        add_groups(&mut rng, &mut workspaces, &users, &members.all, config.groups);
        let people = People {
            users: &users,
            former: &former,
            grantable: &members.grantable,
        };
        add_projects(&mut rng, &mut workspaces, &people, config.projects);
        add_default_projects(&mut rng, &mut workspaces, config.repositories);
        add_repositories(&mut rng, &mut workspaces, &people, config.repositories);

        let mut org = Organisation { users, workspaces };
        org.ensure_edge_cases(&former);
        org
    }

    /// Small organisations still get one of each edge case a sync must
    /// handle: an inactive account, a grant held by a former member, an
    /// explicit `none` grant and a repository without explicit grants.
    fn ensure_edge_cases(&mut self, former: &[usize]) {
        let owners: HashSet<String> = self
            .workspaces
            .iter()
            .flat_map(|w| w.members.iter().filter(|m| m.owner))
            .map(|m| m.user_uuid.clone())
            .collect();
        if self.users.len() >= 10
            && self.users.iter().all(|u| u.active)
            && let Some(u) = self.users.iter_mut().skip(1).rev().find(|u| !owners.contains(&u.uuid))
        {
            u.active = false;
        }
        let Some(ws) = self.workspaces.first_mut() else {
            return;
        };
        let grants = |ws: &Workspace| -> Vec<String> {
            ws.projects
                .iter()
                .flat_map(|p| p.user_permissions.iter())
                .chain(ws.repositories.iter().flat_map(|r| r.user_permissions.iter()))
                .map(|g| g.principal.clone())
                .collect()
        };
        let n = ws.repositories.len();
        if n >= 3
            && !ws
                .repositories
                .iter()
                .any(|r| r.user_permissions.is_empty() && r.group_permissions.is_empty())
        {
            let last = &mut ws.repositories[n - 1];
            last.user_permissions.clear();
            last.group_permissions.clear();
        }
        if let Some(&f) = former.first() {
            let uuid = self.users[f].uuid.clone();
            let held: HashSet<String> = grants(ws).into_iter().collect();
            let any_former = former.iter().any(|&i| held.contains(&self.users[i].uuid));
            let target = ws
                .repositories
                .iter()
                .position(|r| !r.user_permissions.is_empty() || !r.group_permissions.is_empty())
                .unwrap_or(0);
            if !any_former && let Some(repo) = ws.repositories.get_mut(target) {
                repo.user_permissions.push(Permission {
                    principal: uuid,
                    permission: "read".into(),
                });
            }
        }
        let has_none = self.workspaces.iter().any(|w| {
            w.projects
                .iter()
                .flat_map(|p| p.user_permissions.iter().chain(&p.group_permissions))
                .chain(
                    w.repositories
                        .iter()
                        .flat_map(|r| r.user_permissions.iter().chain(&r.group_permissions)),
                )
                .any(|g| g.permission == "none")
        });
        let ws = &mut self.workspaces[0];
        if !has_none
            && let Some(g) = ws
                .projects
                .iter_mut()
                .flat_map(|p| p.user_permissions.iter_mut())
                .nth(1)
        {
            g.permission = "none".into();
        }
    }

    /// Index of a user by UUID (linear; the server keeps its own maps).
    pub fn user(&self, uuid: &str) -> Option<&User> {
        self.users.iter().find(|u| u.uuid == uuid)
    }

    /// The workspace with this slug.
    pub fn workspace(&self, slug: &str) -> Option<&Workspace> {
        self.workspaces.iter().find(|w| w.slug == slug)
    }
}

/// Users; index 0 is the admin whose API token the simulator accepts.
fn generate_users(rng: &mut ChaCha8Rng, n_users: usize) -> Vec<User> {
    let mut users = Vec::with_capacity(n_users);
    for i in 0..n_users {
        let uuid = random_uuid(rng);
        let account_id = format!("557058:{}", uuid.trim_matches(|c| c == '{' || c == '}'));
        let (display_name, nickname, email, active) = if i == 0 {
            (
                "Sim Admin".to_string(),
                "sim-admin".to_string(),
                "admin@sim.example.com".to_string(),
                true,
            )
        } else {
            let f = FIRST[rng.random_range(0..FIRST.len())];
            let l = LAST[rng.random_range(0..LAST.len())];
            let nick = format!("{}{}{}", f.to_lowercase(), slugify(l).replace('-', ""), i);
            (
                format!("{f} {l}"),
                nick.clone(),
                format!("{nick}@example.com"),
                rng.random_bool(0.95),
            )
        };
        users.push(User {
            uuid,
            account_id,
            nickname,
            display_name,
            email,
            active,
        });
    }
    users
}

/// Workspaces owned by the admin, without members, groups or projects yet.
fn empty_workspaces(rng: &mut ChaCha8Rng, n_ws: usize, admin_uuid: &str) -> Vec<Workspace> {
    (0..n_ws)
        .map(|w| {
            let (name, suffix) = nth_name(WORKSPACES, w);
            let base = WORKSPACES[w % WORKSPACES.len()];
            let slug = if suffix.is_empty() {
                base.to_string()
            } else {
                format!("{base}-{suffix}")
            };
            let mut title = name.clone();
            title.replace_range(0..1, &name[0..1].to_uppercase());
            Workspace {
                uuid: random_uuid(rng),
                slug,
                name: format!("{title} Inc"),
                is_private: w % 4 != 3,
                members: vec![Member {
                    user_uuid: admin_uuid.to_string(),
                    owner: true,
                }],
                groups: Vec::new(),
                projects: Vec::new(),
                repositories: Vec::new(),
            }
        })
        .collect()
}

/// Workspace membership as user indices, per workspace.
struct Members {
    /// Every member, sorted (the admin first).
    all: Vec<Vec<usize>>,
    /// Members who are not owners: owners never hold explicit grants (they
    /// cannot be given any).
    grantable: Vec<Vec<usize>>,
}

/// Every regular user gets a home workspace; 20% are also members of a
/// second one. One or two other owners per workspace: its first active
/// members.
fn add_members(rng: &mut ChaCha8Rng, workspaces: &mut [Workspace], users: &[User], regular: &[usize]) -> Members {
    let n_ws = workspaces.len();
    let mut all: Vec<Vec<usize>> = vec![vec![0]; n_ws];
    for (k, &u) in regular.iter().enumerate() {
        let home = k % n_ws;
        all[home].push(u);
        if n_ws > 1 && rng.random_bool(0.2) {
            let other = (home + rng.random_range(1..n_ws)) % n_ws;
            all[other].push(u);
        }
    }
    let mut grantable: Vec<Vec<usize>> = Vec::with_capacity(n_ws);
    for (w, ws) in workspaces.iter_mut().enumerate() {
        all[w].sort_unstable();
        all[w].dedup();
        let mut owners_left = (1 + all[w].len() / 200).min(2);
        for &u in all[w].iter().skip(1) {
            let owner = owners_left > 0 && users[u].active;
            if owner {
                owners_left -= 1;
            }
            ws.members.push(Member {
                user_uuid: users[u].uuid.clone(),
                owner,
            });
        }
        grantable.push(
            ws.members
                .iter()
                .zip(&all[w])
                .filter(|(m, _)| !m.owner)
                .map(|(_, &u)| u)
                .collect(),
        );
    }
    Members { all, grantable }
}

/// Groups of 2 to 30 members, dealt round-robin over the workspaces.
fn add_groups(
    rng: &mut ChaCha8Rng,
    workspaces: &mut [Workspace],
    users: &[User],
    members: &[Vec<usize>],
    n_groups: usize,
) {
    let n_ws = workspaces.len();
    for g in 0..n_groups {
        let w = g % n_ws;
        let k = g / n_ws;
        let (name, _) = nth_name(GROUPS, k);
        let slug = slugify(&name);
        let members_pool = &members[w];
        let want = rng.random_range(2..=30usize).min(members_pool.len());
        let mut set = BTreeSet::new();
        for _ in 0..want {
            set.insert(members_pool[rng.random_range(0..members_pool.len())]);
        }
        let mut picked: Vec<usize> = set.into_iter().collect();
        picked.shuffle(rng);
        workspaces[w].groups.push(Group {
            slug,
            name,
            permission: GROUP_DEFAULTS[rng.random_range(0..GROUP_DEFAULTS.len())].map(str::to_string),
            members: picked.iter().map(|&u| users[u].uuid.clone()).collect(),
        });
    }
}

/// Who explicit grants can go to, across workspaces.
struct People<'a> {
    users: &'a [User],
    /// Former members (user indices).
    former: &'a [usize],
    /// Non-owner members per workspace (user indices).
    grantable: &'a [Vec<usize>],
}

impl People<'_> {
    fn pool<'a>(&'a self, w: usize, workspaces: &'a [Workspace]) -> Pool<'a> {
        Pool {
            members: &self.grantable[w],
            former: self.former,
            users: self.users,
            groups: &workspaces[w].groups,
        }
    }
}

/// Projects, dealt round-robin, each with at least one group grant.
fn add_projects(rng: &mut ChaCha8Rng, workspaces: &mut [Workspace], people: &People, n_projects: usize) {
    let n_ws = workspaces.len();
    let shape = Shape {
        levels: PROJECT_PERMS,
        p_empty: 0.0,
        min_groups: 1,
    };
    let mut turns = [0usize; 2];
    for p in 0..n_projects {
        let w = p % n_ws;
        let k = p / n_ws;
        let (name, suffix) = nth_name(PROJECTS, k);
        let base = PROJECTS[k % PROJECTS.len()];
        let key = format!("{}{}", base.chars().take(4).collect::<String>().to_uppercase(), suffix);
        let uuid = random_uuid(rng);
        let (user_permissions, group_permissions) = grants(rng, &people.pool(w, workspaces), &shape, &mut turns);
        workspaces[w].projects.push(Project {
            uuid,
            key,
            name,
            user_permissions,
            group_permissions,
        });
    }
}

/// Bitbucket gives every workspace a default project; the simulator adds
/// one only where repositories would otherwise have no project.
fn add_default_projects(rng: &mut ChaCha8Rng, workspaces: &mut [Workspace], n_repositories: usize) {
    for (w, ws) in workspaces.iter_mut().enumerate() {
        let has_repos = w < n_repositories;
        if has_repos && ws.projects.is_empty() {
            let uuid = random_uuid(rng);
            ws.projects.push(Project {
                uuid,
                key: "DEFAULT".into(),
                name: "Default Project".into(),
                user_permissions: Vec::new(),
                group_permissions: Vec::new(),
            });
        }
    }
}

/// Repositories, dealt round-robin, each in a random project of its
/// workspace; ~15% without explicit grants.
fn add_repositories(rng: &mut ChaCha8Rng, workspaces: &mut [Workspace], people: &People, n_repositories: usize) {
    let n_ws = workspaces.len();
    let shape = Shape {
        levels: REPO_PERMS,
        p_empty: 0.15,
        min_groups: 0,
    };
    let mut turns = [0usize; 2];
    for r in 0..n_repositories {
        let w = r % n_ws;
        let k = r / n_ws;
        let base = REPOS[k % REPOS.len()];
        let round = k / REPOS.len();
        let slug = if round == 0 {
            base.to_string()
        } else {
            format!("{base}-{}", round + 1)
        };
        let n_proj = workspaces[w].projects.len();
        let project_key = workspaces[w].projects[rng.random_range(0..n_proj)].key.clone();
        let (user_permissions, group_permissions) = grants(rng, &people.pool(w, workspaces), &shape, &mut turns);
        workspaces[w].repositories.push(Repository {
            uuid: random_uuid(rng),
            name: slug.clone(),
            slug,
            project_key,
            is_private: !rng.random_bool(0.1),
            user_permissions,
            group_permissions,
        });
    }
}

/// Who can receive grants in one workspace.
struct Pool<'a> {
    /// Non-owner members (user indices).
    members: &'a [usize],
    /// Former members (user indices).
    former: &'a [usize],
    users: &'a [User],
    groups: &'a [Group],
}

/// What kind of grants to draw.
struct Shape<'a> {
    levels: &'a [&'a str],
    /// Probability of no explicit grants at all.
    p_empty: f64,
    min_groups: usize,
}

/// Random explicit grants for a project or repository. `turns` cycles the
/// levels for user and group grants.
fn grants(
    rng: &mut ChaCha8Rng,
    pool: &Pool,
    shape: &Shape,
    turns: &mut [usize; 2],
) -> (Vec<Permission>, Vec<Permission>) {
    let Pool {
        members,
        former,
        users,
        groups,
    } = *pool;
    let Shape {
        levels,
        p_empty,
        min_groups,
    } = *shape;
    let mut user_perms = Vec::new();
    let mut group_perms = Vec::new();
    if rng.random_bool(p_empty) {
        return (user_perms, group_perms);
    }
    let mut seen = HashSet::new();
    let pool = members;
    for _ in 0..rng.random_range(0..=3) {
        if pool.is_empty() {
            break;
        }
        let u = pool[rng.random_range(0..pool.len())];
        if seen.insert(u) {
            user_perms.push(Permission {
                principal: users[u].uuid.clone(),
                permission: pick_level(rng, levels, &mut turns[0]),
            });
        }
    }
    if !former.is_empty() && rng.random_bool(0.05) {
        let u = former[rng.random_range(0..former.len())];
        if seen.insert(u) {
            user_perms.push(Permission {
                principal: users[u].uuid.clone(),
                permission: pick_level(rng, levels, &mut turns[0]),
            });
        }
    }
    let mut seen_groups = HashSet::new();
    for _ in 0..rng.random_range(min_groups..=2) {
        if groups.is_empty() {
            break;
        }
        let g = rng.random_range(0..groups.len());
        if seen_groups.insert(g) {
            group_perms.push(Permission {
                principal: groups[g].slug.clone(),
                permission: pick_level(rng, levels, &mut turns[1]),
            });
        }
    }
    (user_perms, group_perms)
}

/// ~4% `none`, otherwise the levels in turn (so that every level occurs even
/// in small organisations).
fn pick_level(rng: &mut ChaCha8Rng, levels: &[&str], turn: &mut usize) -> String {
    if rng.random_bool(0.04) {
        "none".into()
    } else {
        *turn += 1;
        levels[*turn % levels.len()].into()
    }
}

/// Rank of a permission for the effective-permission maximum. Project
/// `create-repo` counts as `write` on repositories; `none` is nothing.
pub(crate) fn rank(permission: &str) -> u8 {
    match permission {
        "read" => 1,
        "write" | "create-repo" => 2,
        "admin" => 3,
        _ => 0,
    }
}

pub(crate) fn rank_name(rank: u8) -> &'static str {
    match rank {
        1 => "read",
        2 => "write",
        3 => "admin",
        _ => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_per_seed() {
        let c = SimConfig::default();
        let a = serde_json::to_string(&Organisation::generate(&c)).unwrap();
        let b = serde_json::to_string(&Organisation::generate(&c)).unwrap();
        assert_eq!(a, b);
        let other = SimConfig {
            seed: 2,
            ..SimConfig::default()
        };
        let d = serde_json::to_string(&Organisation::generate(&other)).unwrap();
        assert_ne!(a, d);
    }

    #[test]
    fn sizes_are_totals_and_shape_is_realistic() {
        let c = SimConfig::default();
        let org = Organisation::generate(&c);
        assert_eq!(org.users.len(), c.users);
        assert_eq!(org.workspaces.len(), c.workspaces);
        let groups: usize = org.workspaces.iter().map(|w| w.groups.len()).sum();
        let projects: usize = org.workspaces.iter().map(|w| w.projects.len()).sum();
        let repos: usize = org.workspaces.iter().map(|w| w.repositories.len()).sum();
        assert_eq!((groups, projects, repos), (c.groups, c.projects, c.repositories));
        let admin = &org.users[0].uuid;
        for ws in &org.workspaces {
            assert!(ws.members.iter().any(|m| &m.user_uuid == admin && m.owner));
            // Slugs and keys are unique within a workspace.
            let slugs: HashSet<_> = ws.repositories.iter().map(|r| &r.slug).collect();
            assert_eq!(slugs.len(), ws.repositories.len());
            let keys: HashSet<_> = ws.projects.iter().map(|p| &p.key).collect();
            assert_eq!(keys.len(), ws.projects.len());
            for r in &ws.repositories {
                assert!(ws.projects.iter().any(|p| p.key == r.project_key));
            }
        }
        let uuids: HashSet<_> = org.users.iter().map(|u| &u.uuid).collect();
        assert_eq!(uuids.len(), org.users.len());
        assert!(uuids.iter().all(|u| u.starts_with('{') && u.len() == 38));
    }

    #[test]
    fn small_default_organisation_covers_every_case() {
        for seed in 1..=20 {
            small_organisation_covers_every_case(seed);
        }
    }

    fn small_organisation_covers_every_case(seed: u64) {
        let org = Organisation::generate(&SimConfig {
            seed,
            ..SimConfig::default()
        });
        let ws = &org.workspaces;
        let levels = |it: Box<dyn Iterator<Item = &Permission> + '_>| -> BTreeSet<String> {
            it.map(|g| g.permission.clone()).collect()
        };
        let pu = levels(Box::new(
            ws.iter().flat_map(|w| &w.projects).flat_map(|p| &p.user_permissions),
        ));
        let pg = levels(Box::new(
            ws.iter().flat_map(|w| &w.projects).flat_map(|p| &p.group_permissions),
        ));
        let ru = levels(Box::new(
            ws.iter()
                .flat_map(|w| &w.repositories)
                .flat_map(|r| &r.user_permissions),
        ));
        let rg = levels(Box::new(
            ws.iter()
                .flat_map(|w| &w.repositories)
                .flat_map(|r| &r.group_permissions),
        ));
        for l in PROJECT_PERMS {
            assert!(pu.contains(*l) && pg.contains(*l), "project level {l}: {pu:?} {pg:?}");
        }
        for l in REPO_PERMS {
            assert!(
                ru.contains(*l) && rg.contains(*l),
                "repository level {l}: {ru:?} {rg:?}"
            );
        }
        assert!(!ru.contains("create-repo") && !rg.contains("create-repo"));
        covers_edge_cases(&org);
    }

    /// `none` grants, inactive accounts, owners without grants, a former
    /// member's grant, a repository without grants, users in several groups.
    fn covers_edge_cases(org: &Organisation) {
        let ws = &org.workspaces;
        let all: Vec<&Permission> = ws
            .iter()
            .flat_map(|w| {
                w.projects
                    .iter()
                    .flat_map(|p| p.user_permissions.iter().chain(&p.group_permissions))
                    .chain(
                        w.repositories
                            .iter()
                            .flat_map(|r| r.user_permissions.iter().chain(&r.group_permissions)),
                    )
            })
            .collect();
        assert!(all.iter().any(|g| g.permission == "none"));
        assert!(org.users.iter().any(|u| !u.active));
        for w in ws {
            let owners: HashSet<&str> = w
                .members
                .iter()
                .filter(|m| m.owner)
                .map(|m| m.user_uuid.as_str())
                .collect();
            assert!(
                w.members.iter().filter(|m| m.owner).count() >= 2,
                "admin plus another owner"
            );
            for p in w
                .projects
                .iter()
                .map(|p| &p.user_permissions)
                .chain(w.repositories.iter().map(|r| &r.user_permissions))
            {
                assert!(
                    p.iter().all(|g| !owners.contains(g.principal.as_str())),
                    "owners hold no explicit grants"
                );
            }
        }
        let w0 = &ws[0];
        let m0: HashSet<&str> = w0.members.iter().map(|m| m.user_uuid.as_str()).collect();
        assert!(
            w0.repositories
                .iter()
                .flat_map(|r| &r.user_permissions)
                .chain(w0.projects.iter().flat_map(|p| &p.user_permissions))
                .any(|g| !m0.contains(g.principal.as_str())),
            "a former member keeps a grant"
        );
        assert!(
            w0.repositories
                .iter()
                .any(|r| r.user_permissions.is_empty() && r.group_permissions.is_empty())
        );
        // Users belong to several groups.
        let mut count: HashMap<&str, usize> = HashMap::new();
        for g in ws.iter().flat_map(|w| &w.groups) {
            for m in &g.members {
                *count.entry(m.as_str()).or_default() += 1;
            }
        }
        assert!(count.values().any(|&c| c >= 2));
    }

    #[test]
    fn scales_fast_with_inactive_former_and_none_grants() {
        let c = SimConfig {
            users: 10_000,
            groups: 300,
            projects: 500,
            repositories: 5_000,
            workspaces: 3,
            ..SimConfig::default()
        };
        let t = std::time::Instant::now();
        let org = Organisation::generate(&c);
        assert!(t.elapsed() < std::time::Duration::from_secs(2), "{:?}", t.elapsed());
        let inactive = org.users.iter().filter(|u| !u.active).count();
        assert!(inactive > 300 && inactive < 800, "{inactive}");
        let members: HashSet<&str> = org
            .workspaces
            .iter()
            .flat_map(|w| w.members.iter().map(|m| m.user_uuid.as_str()))
            .collect();
        let all_grants = || {
            org.workspaces.iter().flat_map(|w| {
                w.projects
                    .iter()
                    .flat_map(|p| p.user_permissions.iter())
                    .chain(w.repositories.iter().flat_map(|r| r.user_permissions.iter()))
            })
        };
        assert!(all_grants().any(|p| !members.contains(p.principal.as_str())));
        assert!(all_grants().any(|p| p.permission == "none"));
        assert!(
            org.workspaces
                .iter()
                .flat_map(|w| &w.repositories)
                .any(|r| r.user_permissions.is_empty() && r.group_permissions.is_empty())
        );
    }
}
