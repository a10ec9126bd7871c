//! Watch streams: the initial state or a replay from a resourceVersion, then live events from
//! the shared history, selector enter/leave as ADDED/DELETED, BOOKMARKs, 410 after compaction.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

use super::selectors::Filter;
use super::{ApiErr, BOOKMARK_INTERVAL, KindInfo, Shared};

struct WatchCtx {
    shared: Arc<Shared>,
    resource: String,
    ki: KindInfo,
    filter: Filter,
    last_rv: u64,
    deadline: tokio::time::Instant,
    bookmarks: bool,
    pending: VecDeque<Bytes>,
    done: bool,
    rx: tokio::sync::watch::Receiver<u64>,
}

fn line(typ: &str, object: &Value) -> Bytes {
    let mut s = json!({"type": typ, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn bookmark(ki: &KindInfo, rv: u64, initial_end: bool) -> Value {
    let mut m = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        m["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"kind": ki.kind, "apiVersion": ki.api_version(), "metadata": m})
}

pub(super) fn watch(shared: Arc<Shared>, ki: KindInfo, ns: Option<String>, q: &BTreeMap<String, String>) -> Response {
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(1800);
    let bookmarks = matches!(q.get("allowWatchBookmarks").map(String::as_str), Some("true" | "1"));
    let send_initial = matches!(q.get("sendInitialEvents").map(String::as_str), Some("true" | "1"));
    let rv_param = q.get("resourceVersion").cloned().unwrap_or_default();
    let mut rx = shared.notify.subscribe();
    rx.borrow_and_update();
    let mut ctx = WatchCtx {
        shared: shared.clone(),
        resource: ki.resource_key(),
        filter: Filter::from_query(ns, q),
        ki: ki.clone(),
        last_rv: 0,
        deadline: tokio::time::Instant::now() + Duration::from_secs(timeout),
        bookmarks,
        pending: VecDeque::new(),
        done: false,
        rx,
    };
    {
        let st = shared.lock();
        if send_initial || rv_param.is_empty() || rv_param == "0" {
            for ((r, n, _), s) in st.objects.iter() {
                if *r == ctx.resource && ctx.filter.matches(n, &s.obj) {
                    ctx.pending.push_back(line("ADDED", &s.obj));
                }
            }
            ctx.last_rv = st.rv;
            if send_initial && bookmarks {
                ctx.pending.push_back(line("BOOKMARK", &bookmark(&ki, st.rv, true)));
            }
        } else {
            match rv_param.parse::<u64>() {
                Ok(rv) if rv >= st.history_floor => ctx.last_rv = rv,
                _ => {
                    let status = ApiErr::new(410, "Expired", format!("too old resource version: {rv_param}"));
                    ctx.pending.push_back(line("ERROR", &status.status_json()));
                    ctx.done = true;
                }
            }
        }
    }
    let stream = futures::stream::unfold(ctx, |mut ctx| async move {
        loop {
            if let Some(b) = ctx.pending.pop_front() {
                return Some((Ok::<Bytes, std::convert::Infallible>(b), ctx));
            }
            if ctx.done {
                return None;
            }
            ctx.rx.borrow_and_update();
            {
                let st = ctx.shared.lock();
                if st.closed {
                    return None;
                }
                for ev in st.history.iter().filter(|e| e.rv > ctx.last_rv) {
                    if ev.resource != ctx.resource {
                        continue;
                    }
                    let now = ctx.filter.matches(&ev.ns, &ev.object);
                    let before = ev.previous.as_ref().map(|p| ctx.filter.matches(&ev.ns, p));
                    // like the watch cache: objects entering/leaving a selector are ADDED/DELETED
                    let typ = match (ev.typ, before, now) {
                        ("MODIFIED", Some(false), true) => "ADDED",
                        ("MODIFIED", Some(true), false) => "DELETED",
                        (t, _, true) => t,
                        _ => continue,
                    };
                    ctx.pending.push_back(line(typ, &ev.object));
                }
                ctx.last_rv = ctx.last_rv.max(st.rv);
            }
            if !ctx.pending.is_empty() {
                continue;
            }
            let bookmark_sleep = if ctx.bookmarks {
                BOOKMARK_INTERVAL
            } else {
                Duration::from_secs(3600)
            };
            tokio::select! {
                r = ctx.rx.changed() => {
                    if r.is_err() {
                        return None;
                    }
                }
                _ = tokio::time::sleep_until(ctx.deadline) => return None,
                _ = tokio::time::sleep(bookmark_sleep) => {
                    if ctx.bookmarks {
                        ctx.pending.push_back(line("BOOKMARK", &bookmark(&ctx.ki, ctx.last_rv, false)));
                    }
                }
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .expect("watch response")
}
