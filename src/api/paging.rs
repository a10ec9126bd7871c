//! `limit`/`continue` paging for the data API's listings, as Kubernetes lists
//! do it: a response holds at most `limit` items (default and maximum
//! bounded, so no response grows with the inventory), and
//! `metadata.continue` is an opaque token for the next page.
//!
//! The token carries the offset and a fingerprint of what was listed (the
//! listing, its filters and the store's current generations). When a sync
//! has replaced the data since the first page, offsets no longer line up,
//! so the token is refused with 410 (Kubernetes' `Expired`) and the client
//! starts again, instead of silently skipping or repeating items.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Items per page when the caller gives no `limit`.
pub const DEFAULT_LIMIT: usize = 1000;
/// The largest `limit` honoured; larger asks are clamped to it.
pub const MAX_LIMIT: usize = 5000;

/// The query parameters, shared by every paged listing.
#[derive(Debug, Default, Deserialize)]
pub struct PageQuery {
    pub limit: Option<usize>,
    #[serde(rename = "continue")]
    pub continue_token: Option<String>,
}

/// One page and the token for the next, if any.
#[derive(Debug, PartialEq, Eq)]
pub struct Paged<T> {
    pub items: Vec<T>,
    pub continue_token: Option<String>,
    /// Items after this page.
    pub remaining: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum PageError {
    /// 400: a limit of 0 or a token that does not parse.
    Invalid(String),
    /// 410: the data changed since the token was issued.
    Expired,
}

/// A fingerprint of what a listing shows: which listing, with which filters,
/// over which store generations.
pub fn snapshot(parts: &[&str]) -> [u8; 8] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    let digest = hasher.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

/// Cuts one page out of `items` (in a stable order).
pub fn page<T>(mut items: Vec<T>, query: &PageQuery, snapshot: [u8; 8]) -> Result<Paged<T>, PageError> {
    let limit = match query.limit {
        Some(0) => return Err(PageError::Invalid("limit must be at least 1".into())),
        Some(limit) => limit.min(MAX_LIMIT),
        None => DEFAULT_LIMIT,
    };
    let offset = match query.continue_token.as_deref().filter(|t| !t.is_empty()) {
        None => 0,
        Some(token) => {
            let (offset, issued_for) = decode(token)?;
            if issued_for != snapshot {
                return Err(PageError::Expired);
            }
            offset
        }
    };
    if offset > items.len() {
        return Err(PageError::Expired);
    }
    let end = offset.saturating_add(limit).min(items.len());
    let remaining = items.len() - end;
    items.truncate(end);
    let items = items.split_off(offset);
    let continue_token = (remaining > 0).then(|| encode(end, snapshot));
    Ok(Paged {
        items,
        continue_token,
        remaining,
    })
}

fn encode(offset: usize, snapshot: [u8; 8]) -> String {
    let mut raw = Vec::with_capacity(17);
    raw.push(1u8); // format version
    raw.extend_from_slice(&(offset as u64).to_be_bytes());
    raw.extend_from_slice(&snapshot);
    URL_SAFE_NO_PAD.encode(raw)
}

fn decode(token: &str) -> Result<(usize, [u8; 8]), PageError> {
    let invalid = || PageError::Invalid("the continue token is not one this API issued".into());
    if token.len() > 64 {
        return Err(invalid());
    }
    let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    if raw.len() != 17 || raw[0] != 1 {
        return Err(invalid());
    }
    let offset = u64::from_be_bytes(raw[1..9].try_into().map_err(|_| invalid())?);
    let offset = usize::try_from(offset).map_err(|_| invalid())?;
    let mut snapshot = [0u8; 8];
    snapshot.copy_from_slice(&raw[9..17]);
    Ok((offset, snapshot))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(limit: Option<usize>, token: Option<&str>) -> PageQuery {
        PageQuery {
            limit,
            continue_token: token.map(str::to_owned),
        }
    }

    #[test]
    fn walks_every_item_once_in_pages() {
        let items: Vec<u32> = (0..25).collect();
        let snap = snapshot(&["grants", "gen-1"]);
        let mut seen = Vec::new();
        let mut token: Option<String> = None;
        let mut pages = 0;
        loop {
            let page = page(items.clone(), &query(Some(10), token.as_deref()), snap).unwrap();
            pages += 1;
            seen.extend(page.items);
            assert_eq!(page.remaining, 25 - seen.len());
            match page.continue_token {
                Some(next) => token = Some(next),
                None => break,
            }
        }
        assert_eq!(seen, items);
        assert_eq!(pages, 3);
    }

    #[test]
    fn defaults_and_caps_the_limit() {
        let items: Vec<u32> = (0..(MAX_LIMIT as u32 + 10)).collect();
        let snap = snapshot(&["x"]);
        assert_eq!(
            page(items.clone(), &query(None, None), snap).unwrap().items.len(),
            DEFAULT_LIMIT
        );
        assert_eq!(
            page(items.clone(), &query(Some(usize::MAX), None), snap)
                .unwrap()
                .items
                .len(),
            MAX_LIMIT
        );
        assert!(matches!(
            page(items, &query(Some(0), None), snap),
            Err(PageError::Invalid(_))
        ));
    }

    #[test]
    fn a_token_for_other_data_or_junk_is_refused() {
        let items: Vec<u32> = (0..10).collect();
        let first = page(items.clone(), &query(Some(3), None), snapshot(&["gen-1"])).unwrap();
        let token = first.continue_token.unwrap();
        assert_eq!(
            page(items.clone(), &query(Some(3), Some(&token)), snapshot(&["gen-2"])),
            Err(PageError::Expired),
            "a new sync generation invalidates the token"
        );
        for junk in ["x", "AAAA", "%%%", &"A".repeat(100), &encode(1, [0; 8])[..10]] {
            assert!(
                matches!(
                    page(items.clone(), &query(None, Some(junk)), snapshot(&["gen-1"])),
                    Err(PageError::Invalid(_))
                ),
                "{junk}"
            );
        }
        let beyond = encode(11, snapshot(&["gen-1"]));
        assert_eq!(
            page(items, &query(None, Some(&beyond)), snapshot(&["gen-1"])),
            Err(PageError::Expired)
        );
    }

    #[test]
    fn an_empty_listing_is_one_empty_page() {
        let page = page(Vec::<u8>::new(), &query(None, None), snapshot(&[])).unwrap();
        assert!(page.items.is_empty() && page.continue_token.is_none() && page.remaining == 0);
    }
}
