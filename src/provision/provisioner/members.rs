//! Workspace membership of one user, without listing every member.
//!
//! A grant needs its principal to be a workspace member, and the store
//! refresh after a change flags grants to non-members. Listing the members
//! costs one request per 100 members (100 for a 10,000-member workspace),
//! on the provisioning lane, for every grant and revoke. The contract's
//! single-member endpoint (`GET /2.0/workspaces/{ws}/members/{member}`, UUID
//! or account id; 404 = not a member) costs one. So a principal given as a
//! UUID or account id is looked up directly; a nickname or email is first
//! turned into a UUID through the stored inventory, when there is one and it
//! knows exactly one such user; only a name nothing else identifies falls
//! back to the listing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::TryStreamExt;

use super::{Inventory, Purpose, braced_uuid, find_member};
use crate::bitbucket::models::User;
use crate::bitbucket::{Client, Error as ApiError, ErrorKind};
use crate::provision::{PrincipalKind, ProvisionError, ResolvedPrincipal};

/// Above this many holders of unknown membership, one listing is the
/// cheaper way to learn theirs (a page holds 100 members).
const MAX_SINGLE_LOOKUPS: usize = 8;

/// What resolving the principal learnt about workspace membership, reused by
/// the store refresh.
#[derive(Debug, Clone, Default)]
pub(super) enum Members {
    /// Nothing (a group principal).
    #[default]
    Unknown,
    /// The whole member listing.
    Listed(Vec<User>),
    /// Users looked up one by one: UUID to "is a member".
    Looked(HashMap<String, bool>),
}

impl Members {
    /// The members among `holders` (user UUIDs), reading Bitbucket only for
    /// holders not known yet: one request each, or one listing when there
    /// are many.
    pub(super) async fn among(
        &self,
        client: &Client,
        ws: &str,
        holders: &[String],
    ) -> Result<HashSet<String>, ApiError> {
        let known = match self {
            Members::Listed(listing) => return Ok(listing.iter().map(|u| u.uuid.clone()).collect()),
            Members::Looked(known) => known.clone(),
            Members::Unknown => HashMap::new(),
        };
        let unknown: Vec<&String> = holders
            .iter()
            .filter(|uuid| !uuid.is_empty() && !known.contains_key(uuid.as_str()))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if unknown.len() > MAX_SINGLE_LOOKUPS {
            return list(client, ws)
                .await
                .map(|listing| listing.into_iter().map(|u| u.uuid).collect());
        }
        let looked = futures::future::try_join_all(unknown.into_iter().map(|uuid| async move {
            let member = lookup(client, ws, uuid).await?.is_some();
            Ok::<_, ApiError>((uuid.clone(), member))
        }))
        .await?;
        Ok(known
            .into_iter()
            .chain(looked)
            .filter_map(|(uuid, member)| member.then_some(uuid))
            .collect())
    }
}

/// How a principal is named, as far as a direct lookup goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Direct {
    /// A UUID: a 404 settles it (not a member).
    Uuid(String),
    /// An account id, or the inventory's UUID for a nickname or email: a
    /// 404 may also mean the name was not what it seemed, so the listing
    /// decides then.
    Probable(String),
}

/// The user named by `needle` among the workspace's members; for a revoke,
/// also a former member named by UUID (or known to the inventory by UUID).
pub(super) async fn resolve_user(
    client: &Client,
    inventory: Option<&Arc<dyn Inventory>>,
    ws: &str,
    needle: &str,
    purpose: Purpose,
) -> Result<(ResolvedPrincipal, Members), ProvisionError> {
    let direct = match braced_uuid(needle) {
        Some(uuid) => Some(Direct::Uuid(uuid)),
        None if looks_like_account_id(needle) => Some(Direct::Probable(needle.trim().to_owned())),
        None => from_inventory(inventory, needle).await.map(Direct::Probable),
    };
    let mut former: Option<String> = None;
    if let Some(direct) = direct {
        let id = match &direct {
            Direct::Uuid(id) | Direct::Probable(id) => id.clone(),
        };
        match lookup(client, ws, &id).await? {
            Some(user) if names(&user, needle, &id) => {
                let known = HashMap::from([(user.uuid.clone(), true)]);
                return Ok((principal(&user), Members::Looked(known)));
            }
            // The inventory's name has moved on: the listing decides.
            Some(_) => {}
            None => {
                if id.starts_with('{') {
                    former = Some(id.clone());
                }
                if let Direct::Uuid(uuid) = direct {
                    let known = HashMap::from([(uuid.clone(), false)]);
                    return former_member(uuid, ws, needle, purpose).map(|p| (p, Members::Looked(known)));
                }
            }
        }
    }
    let listing = list(client, ws).await?;
    let found = find_member(&listing, needle).map(principal);
    match found {
        Some(principal) => Ok((principal, Members::Listed(listing))),
        // Not a member under that name either: the inventory's UUID names
        // the former member a revoke may still clean up.
        None => former_member(former.unwrap_or_default(), ws, needle, purpose).map(|p| (p, Members::Listed(listing))),
    }
}

/// Former members keep explicit permissions (Bitbucket does not remove
/// them): revoking those, named by UUID, is exactly what an access review
/// needs. A grant needs a member.
fn former_member(uuid: String, ws: &str, needle: &str, purpose: Purpose) -> Result<ResolvedPrincipal, ProvisionError> {
    if purpose == Purpose::Revoke && !uuid.is_empty() {
        return Ok(ResolvedPrincipal {
            kind: PrincipalKind::User,
            key: uuid.clone(),
            id: uuid.clone(),
            name: uuid,
        });
    }
    Err(ProvisionError::NotWorkspaceMember {
        user: needle.to_owned(),
        workspace: ws.to_owned(),
    })
}

fn principal(user: &User) -> ResolvedPrincipal {
    ResolvedPrincipal {
        kind: PrincipalKind::User,
        key: user.uuid.clone(),
        id: user.uuid.clone(),
        name: user
            .nickname
            .clone()
            .or_else(|| user.display_name.clone())
            .unwrap_or_else(|| user.uuid.clone()),
    }
}

/// Whether the looked-up `user` is the one `needle` names (by UUID, account
/// id, nickname or email). An email Bitbucket did not show cannot be
/// checked: the inventory's UUID for it is taken as is.
fn names(user: &User, needle: &str, id: &str) -> bool {
    if user.uuid.is_empty() {
        return false;
    }
    let needle = needle.trim();
    let one = std::slice::from_ref(user);
    find_member(one, needle).is_some()
        || user.email.as_deref().is_some_and(|e| e.eq_ignore_ascii_case(needle))
        || (needle.contains('@') && user.email.is_none() && user.uuid.eq_ignore_ascii_case(id))
}

/// One membership, `None` on 404 (not a member).
async fn lookup(client: &Client, ws: &str, member: &str) -> Result<Option<User>, ApiError> {
    match client.workspace_member(ws, member).await {
        Ok(membership) => Ok(Some(membership.user)),
        Err(err) if err.kind == ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

async fn list(client: &Client, ws: &str) -> Result<Vec<User>, ApiError> {
    Ok(client
        .workspace_members(ws)
        .try_concat()
        .await?
        .into_iter()
        .map(|m| m.user)
        .collect())
}

/// The inventory's UUID for a nickname or email, off the async threads.
async fn from_inventory(inventory: Option<&Arc<dyn Inventory>>, needle: &str) -> Option<String> {
    let inventory = Arc::clone(inventory?);
    let needle = needle.trim().to_owned();
    if needle.is_empty() {
        return None;
    }
    tokio::task::spawn_blocking(move || inventory.find_user(&needle))
        .await
        .ok()
        .flatten()
        .filter(|uuid| braced_uuid(uuid).is_some())
}

/// Atlassian account ids: `557058:` followed by a UUID, or 24 hex digits.
/// Nicknames never contain `:`; a 24-hex nickname is checked by the lookup.
fn looks_like_account_id(text: &str) -> bool {
    let text = text.trim();
    let hex24 = text.len() == 24 && text.chars().all(|c| c.is_ascii_hexdigit());
    let prefixed = text.split_once(':').is_some_and(|(prefix, rest)| {
        !prefix.is_empty()
            && prefix.chars().all(|c| c.is_ascii_digit())
            && !rest.is_empty()
            && rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    });
    hex24 || prefixed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_ids_are_told_from_nicknames() {
        assert!(looks_like_account_id("557058:0a1b2c3d-0000-4000-8000-000000000001"));
        assert!(looks_like_account_id("5b10ac8d82e05b22cc7d4ef5"));
        for not in ["jdoe", "", "a:b", ":x", "557058:", "jdoe@example.com", "{0a1b2c3d}"] {
            assert!(!looks_like_account_id(not), "{not}");
        }
    }

    #[test]
    fn a_looked_up_user_must_carry_the_name_asked_for() {
        let user = User {
            uuid: "{0a1b2c3d-0000-4000-8000-000000000001}".into(),
            account_id: Some("557058:abc".into()),
            nickname: Some("JDoe".into()),
            email: Some("jdoe@example.com".into()),
            ..User::default()
        };
        let id = user.uuid.clone();
        assert!(names(&user, "jdoe", &id));
        assert!(names(&user, "557058:abc", "557058:abc"));
        assert!(names(&user, "JDOE@example.com", &id));
        assert!(
            !names(&user, "someone-else", &id),
            "a renamed nickname goes to the listing"
        );
        let hidden = User { email: None, ..user };
        assert!(
            names(&hidden, "jdoe@example.com", &id),
            "an email Bitbucket hides cannot be checked"
        );
        assert!(!names(
            &hidden,
            "other@example.com",
            "{ffffffff-0000-4000-8000-000000000001}"
        ));
    }
}
