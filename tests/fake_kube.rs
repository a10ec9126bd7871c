//! Self-tests of the in-process fake Kubernetes API server, through a real `kube::Client`.

pub mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::controller::Action;
use kube::runtime::{Controller, reflector, watcher};
use serde_json::{Value, json};
use support::fake_kube::FakeKube;

const CR_API: &str = "connectors.dev/v1alpha1";
const CONNECTOR: &str = "BitbucketConnector";
const WAIT: Duration = Duration::from_secs(10);

fn connector_ar() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("connectors.dev", "v1alpha1", CONNECTOR),
        "bitbucketconnectors",
    )
}

fn connectors(client: kube::Client) -> Api<DynamicObject> {
    Api::namespaced_with(client, "default", &connector_ar())
}

fn connector(name: &str) -> Value {
    json!({
        "apiVersion": CR_API,
        "kind": CONNECTOR,
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"workspace": "acme"},
    })
}

fn secret(name: &str, labels: Value) -> Secret {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "labels": labels},
        "stringData": {"token": "s3cret"},
    }))
    .unwrap()
}

fn api_code(err: kube::Error) -> u16 {
    match err {
        kube::Error::Api(s) => s.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn secrets_crud() {
    let fake = FakeKube::start().await;
    let api: Api<Secret> = Api::default_namespaced(fake.client());

    let created = api
        .create(&PostParams::default(), &secret("a", json!({"app": "x"})))
        .await
        .unwrap();
    assert_eq!(created.metadata.namespace.as_deref(), Some("default"));
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    // stringData is folded into data like the real API server does
    assert_eq!(created.data.as_ref().unwrap()["token"].0, b"s3cret");
    assert_eq!(
        api_code(
            api.create(&PostParams::default(), &secret("a", json!({})))
                .await
                .unwrap_err()
        ),
        409
    );
    api.create(&PostParams::default(), &secret("b", json!({"app": "y"})))
        .await
        .unwrap();

    let got = api.get("a").await.unwrap();
    assert_eq!(got.metadata.resource_version, created.metadata.resource_version);
    assert_eq!(api_code(api.get("missing").await.unwrap_err()), 404);
    assert!(api.get_opt("missing").await.unwrap().is_none());

    let all = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(all.items.len(), 2);
    let xs = api.list(&ListParams::default().labels("app=x")).await.unwrap();
    assert_eq!(xs.items.len(), 1);
    let in_set = api
        .list(&ListParams::default().labels("app in (x,y),app!=y"))
        .await
        .unwrap();
    assert_eq!(in_set.items.len(), 1);
    let by_name = api
        .list(&ListParams::default().fields("metadata.name=b"))
        .await
        .unwrap();
    assert_eq!(by_name.items[0].metadata.name.as_deref(), Some("b"));

    // replace with a stale resourceVersion conflicts, with the current one succeeds
    let mut stale = got.clone();
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"v": "2"}}})),
    )
    .await
    .unwrap();
    stale
        .metadata
        .labels
        .get_or_insert_default()
        .insert("v".into(), "3".into());
    assert_eq!(
        api_code(api.replace("a", &PostParams::default(), &stale).await.unwrap_err()),
        409
    );
    let mut fresh = api.get("a").await.unwrap();
    fresh
        .metadata
        .labels
        .get_or_insert_default()
        .insert("v".into(), "3".into());
    let replaced = api.replace("a", &PostParams::default(), &fresh).await.unwrap();
    assert_eq!(replaced.metadata.labels.unwrap()["v"], "3");

    // JSON patch with a failing test op is rejected
    let bad: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/labels/v", "value": "nope"},
        {"op": "replace", "path": "/metadata/labels/v", "value": "4"},
    ]))
    .unwrap();
    assert_eq!(
        api_code(
            api.patch("a", &PatchParams::default(), &Patch::Json::<()>(bad))
                .await
                .unwrap_err()
        ),
        422
    );

    // metadata-only requests (metadata_watcher) get full objects, which deserialize fine
    assert_eq!(api.get_metadata("b").await.unwrap().metadata.name.as_deref(), Some("b"));
    assert_eq!(api.list_metadata(&ListParams::default()).await.unwrap().items.len(), 2);

    api.delete("a", &DeleteParams::default()).await.unwrap();
    assert!(api.get_opt("a").await.unwrap().is_none());
    assert!(fake.get("v1", "Secret", Some("default"), "b").is_some());
    assert_eq!(fake.list("v1", "Secret", Some("default")).len(), 1);
}

#[tokio::test]
async fn watcher_sees_added_modified_deleted() {
    let fake = FakeKube::start().await;
    let api: Api<Secret> = Api::default_namespaced(fake.client());
    api.create(&PostParams::default(), &secret("pre", json!({})))
        .await
        .unwrap();

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stream = watcher(api.clone(), watcher::Config::default());
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            let ev = ev.expect("watch event");
            let desc = match ev {
                watcher::Event::Init => "init".to_string(),
                watcher::Event::InitApply(s) => format!("init-apply {}", s.metadata.name.unwrap()),
                watcher::Event::InitDone => "init-done".to_string(),
                watcher::Event::Apply(s) => format!(
                    "apply {} {}",
                    s.metadata.name.unwrap(),
                    s.metadata
                        .labels
                        .unwrap_or_default()
                        .get("v")
                        .cloned()
                        .unwrap_or_default()
                ),
                watcher::Event::Delete(s) => format!("delete {}", s.metadata.name.unwrap()),
            };
            if tx.send(desc).is_err() {
                break;
            }
        }
    });
    let mut next = async || tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(next().await, "init");
    assert_eq!(next().await, "init-apply pre");
    assert_eq!(next().await, "init-done");

    api.create(&PostParams::default(), &secret("w", json!({})))
        .await
        .unwrap();
    assert_eq!(next().await, "apply w ");
    // test helper writes emit events too
    let mut obj = fake.get("v1", "Secret", Some("default"), "w").unwrap();
    obj["metadata"]["labels"] = json!({"v": "1"});
    fake.put(obj);
    assert_eq!(next().await, "apply w 1");
    api.delete("w", &DeleteParams::default()).await.unwrap();
    assert_eq!(next().await, "delete w");
    task.abort();

    let watches: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.param("watch").is_some())
        .collect();
    assert!(!watches.is_empty());
    assert!(watches[0].param("resourceVersion").is_some());
    assert!(watches[0].param("timeoutSeconds").is_some());
}

#[tokio::test]
async fn watch_resumes_from_resource_version_and_expires_old_ones() {
    use kube::api::{WatchEvent, WatchParams};
    let fake = FakeKube::start().await;
    let api: Api<Secret> = Api::default_namespaced(fake.client());
    let s = api
        .create(&PostParams::default(), &secret("r", json!({})))
        .await
        .unwrap();
    let rv = s.metadata.resource_version.unwrap();
    api.patch(
        "r",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"v": "9"}}})),
    )
    .await
    .unwrap();
    // resuming from an RV replays later events; an idle bookmark watch gets BOOKMARKs
    let stream = api.watch(&WatchParams::default().timeout(5), &rv).await.unwrap();
    let events: Vec<_> = stream.take(2).try_collect().await.unwrap();
    match &events[0] {
        WatchEvent::Modified(s) => assert_eq!(s.metadata.labels.as_ref().unwrap()["v"], "9"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(events[1], WatchEvent::Bookmark(_)), "{:?}", events[1]);
    // the stream ends at timeoutSeconds
    let started = std::time::Instant::now();
    let stream = api
        .watch(&WatchParams::default().timeout(1).disable_bookmarks(), "0")
        .await
        .unwrap();
    let events: Vec<_> = stream.try_collect().await.unwrap();
    assert_eq!(events.len(), 1, "synthetic ADDED for rv=0: {events:?}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // compacted history: resuming from an old RV yields a 410 ERROR event
    api.patch(
        "r",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"v": "10"}}})),
    )
    .await
    .unwrap();
    fake.set_history_limit(1);
    let stream = api.watch(&WatchParams::default().timeout(2), &rv).await.unwrap();
    let events: Vec<_> = stream.take(1).try_collect().await.unwrap();
    match &events[0] {
        WatchEvent::Error(e) => assert_eq!(e.code, 410),
        other => panic!("unexpected {other:?}"),
    }
    // a fresh watcher lists at the current RV and is unaffected by the compaction
    let (reader, writer) = reflector::store();
    let task = tokio::spawn(reflector(writer, watcher(api.clone(), watcher::Config::default())).for_each(|_| async {}));
    tokio::time::timeout(WAIT, reader.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reader.state().len(), 1);
    task.abort();
}

#[tokio::test]
async fn delete_collection_and_registered_kinds() {
    use kube::core::params::DeleteParams as Dp;
    let fake = FakeKube::start().await;
    fake.register(support::fake_kube::KindInfo::new(
        "example.dev",
        "v1",
        "Widget",
        "widgets",
        false,
        true,
    ));
    let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("example.dev", "v1", "Widget"), "widgets");
    let widgets: Api<DynamicObject> = Api::all_with(fake.client(), &ar);
    let w: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {"size": 1},
    }))
    .unwrap();
    let created = widgets.create(&PostParams::default(), &w).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.namespace.is_none());
    assert_eq!(widgets.list(&ListParams::default()).await.unwrap().items.len(), 1);

    let secrets: Api<Secret> = Api::default_namespaced(fake.client());
    for (n, app) in [("a", "x"), ("b", "x"), ("c", "y")] {
        secrets
            .create(&PostParams::default(), &secret(n, json!({"app": app})))
            .await
            .unwrap();
    }
    secrets
        .delete_collection(&Dp::default(), &ListParams::default().labels("app=x"))
        .await
        .unwrap();
    let left: Vec<_> = fake
        .list("v1", "Secret", Some("default"))
        .into_iter()
        .map(|s| s["metadata"]["name"].clone())
        .collect();
    assert_eq!(left, vec![json!("c")]);
}

#[tokio::test]
async fn selector_watch_sees_objects_enter_and_leave() {
    use kube::api::{WatchEvent, WatchParams};
    let fake = FakeKube::start().await;
    let api: Api<Secret> = Api::default_namespaced(fake.client());
    api.create(&PostParams::default(), &secret("s", json!({"app": "x"})))
        .await
        .unwrap();
    let rv = fake.resource_version().to_string();
    let mut stream = std::pin::pin!(
        api.watch(
            &WatchParams::default().labels("app=y").timeout(5).disable_bookmarks(),
            &rv
        )
        .await
        .unwrap()
    );
    let set = |v: &str| Patch::Merge(json!({"metadata": {"labels": {"app": v}}}));
    api.patch("s", &PatchParams::default(), &set("y")).await.unwrap();
    api.patch("s", &PatchParams::default(), &set("x")).await.unwrap();
    let mut next = async || {
        tokio::time::timeout(WAIT, stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    };
    assert!(matches!(next().await, WatchEvent::Added(_)));
    assert!(matches!(next().await, WatchEvent::Deleted(_)));
}

#[tokio::test]
async fn real_crd_types_are_served() {
    use bitbucket_operator::crd::{BitbucketAccessGrant, BitbucketConnector};
    let fake = FakeKube::start().await;
    let connectors: Api<BitbucketConnector> = Api::default_namespaced(fake.client());
    let grants: Api<BitbucketAccessGrant> = Api::all(fake.client());
    assert!(connectors.list(&ListParams::default()).await.unwrap().items.is_empty());
    assert!(grants.list(&ListParams::default()).await.unwrap().items.is_empty());
    fake.put(json!({
        "apiVersion": CR_API, "kind": "BitbucketAccessGrant",
        "metadata": {"name": "g", "namespace": "team"}, "spec": {},
    }));
    let listed = fake.list(CR_API, "BitbucketAccessGrant", None);
    assert_eq!(listed[0]["metadata"]["generation"], 1);
}

#[tokio::test]
async fn reflector_store_syncs() {
    let fake = FakeKube::start().await;
    let api: Api<Secret> = Api::default_namespaced(fake.client());
    api.create(&PostParams::default(), &secret("one", json!({})))
        .await
        .unwrap();
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api.clone(), watcher::Config::default()));
    let task = tokio::spawn(stream.for_each(|_| async {}));
    tokio::time::timeout(WAIT, reader.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reader.state().len(), 1);
    api.create(&PostParams::default(), &secret("two", json!({})))
        .await
        .unwrap();
    api.delete("one", &DeleteParams::default()).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let names: Vec<String> = reader
            .state()
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        if names == ["two"] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "store never synced: {names:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
}

#[tokio::test]
async fn ssa_status_keeps_generation_and_spec_patch_bumps_it() {
    let fake = FakeKube::start().await;
    let api = connectors(fake.client());
    let obj: DynamicObject = serde_json::from_value(connector("c1")).unwrap();
    let created = api.create(&PostParams::default(), &obj).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));

    let status =
        json!({"apiVersion": CR_API, "kind": CONNECTOR, "status": {"phase": "Ready", "observedGeneration": 1}});
    let patched = api
        .patch_status("c1", &PatchParams::apply("mgr").force(), &Patch::Apply(&status))
        .await
        .unwrap();
    assert_eq!(patched.data["status"]["phase"], "Ready");
    assert_eq!(patched.metadata.generation, Some(1));
    assert_ne!(patched.metadata.resource_version, created.metadata.resource_version);

    let req = fake.requests().into_iter().rfind(|r| r.method == "PATCH").unwrap();
    assert_eq!(
        req.path,
        "/apis/connectors.dev/v1alpha1/namespaces/default/bitbucketconnectors/c1/status"
    );
    assert_eq!(req.param("fieldManager").as_deref(), Some("mgr"));
    assert_eq!(req.param("force").as_deref(), Some("true"));
    assert_eq!(req.content_type.as_deref(), Some("application/apply-patch+yaml"));

    // status writes through the main resource are ignored, spec changes bump generation
    let patched = api
        .patch(
            "c1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"workspace": "other"}, "status": {"phase": "Hacked"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.metadata.generation, Some(2));
    assert_eq!(patched.data["status"]["phase"], "Ready");
    // spec changes through /status are ignored
    let patched = api
        .patch_status(
            "c1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"workspace": "zzz"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.data["spec"]["workspace"], "other");
    assert_eq!(patched.metadata.generation, Some(2));

    // a no-op apply does not bump the resourceVersion
    let again = api
        .patch_status("c1", &PatchParams::apply("mgr").force(), &Patch::Apply(&status))
        .await
        .unwrap();
    assert_eq!(again.metadata.resource_version, patched.metadata.resource_version);

    // SSA without force conflicts on fields owned by another manager with a different value
    let other = json!({"apiVersion": CR_API, "kind": CONNECTOR, "status": {"phase": "Broken"}});
    let err = api
        .patch_status("c1", &PatchParams::apply("other"), &Patch::Apply(&other))
        .await
        .unwrap_err();
    assert_eq!(api_code(err), 409);

    // apply creates missing objects on the main resource
    let applied = api
        .patch("c2", &PatchParams::apply("mgr"), &Patch::Apply(connector("c2")))
        .await
        .unwrap();
    assert_eq!(applied.metadata.generation, Some(1));
    assert_eq!(fake.list(CR_API, CONNECTOR, Some("default")).len(), 2);
}

#[tokio::test]
async fn finalizer_round_trip() {
    use kube::runtime::finalizer::{Event, finalizer};
    const FIN: &str = "connectors.dev/cleanup";
    let fake = FakeKube::start().await;
    let api = connectors(fake.client());
    fake.put(connector("f1"));
    let cleanups = Arc::new(AtomicUsize::new(0));

    let run = |obj: DynamicObject| {
        let api = api.clone();
        let cleanups = cleanups.clone();
        async move {
            finalizer(&api, FIN, Arc::new(obj), |ev| async move {
                if let Event::Cleanup(_) = ev {
                    cleanups.fetch_add(1, Ordering::SeqCst);
                }
                Ok::<_, std::convert::Infallible>(Action::await_change())
            })
            .await
            .unwrap()
        }
    };
    // first pass adds the finalizer (JSON patch with test ops)
    run(api.get("f1").await.unwrap()).await;
    let obj = api.get("f1").await.unwrap();
    assert_eq!(obj.metadata.finalizers.as_deref(), Some(&[FIN.to_string()][..]));
    let json_patches = fake
        .requests()
        .into_iter()
        .filter(|r| r.content_type.as_deref() == Some("application/json-patch+json"))
        .count();
    assert_eq!(json_patches, 1);
    run(obj).await;
    assert_eq!(cleanups.load(Ordering::SeqCst), 0);

    // deletion with a finalizer only marks the object
    api.delete("f1", &DeleteParams::default()).await.unwrap();
    let obj = api.get("f1").await.unwrap();
    assert!(obj.metadata.deletion_timestamp.is_some());
    assert_eq!(obj.metadata.generation, Some(2));
    run(obj).await;
    assert_eq!(cleanups.load(Ordering::SeqCst), 1);
    assert!(api.get_opt("f1").await.unwrap().is_none());

    // helper delete behaves the same
    fake.put(connector("f2"));
    run(api.get("f2").await.unwrap()).await;
    fake.delete(CR_API, CONNECTOR, Some("default"), "f2");
    let obj = fake.get(CR_API, CONNECTOR, Some("default"), "f2").unwrap();
    assert!(obj["metadata"]["deletionTimestamp"].is_string());
    run(serde_json::from_value(obj).unwrap()).await;
    fake.wait_for_absent(CR_API, CONNECTOR, Some("default"), "f2", WAIT)
        .await;
}

#[tokio::test]
async fn recorder_publishes_event() {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let fake = FakeKube::start().await;
    let api = connectors(fake.client());
    fake.put(connector("e1"));
    let obj = api.get("e1").await.unwrap();
    let recorder = Recorder::new(
        fake.client(),
        Reporter {
            controller: "bitbucket-operator".into(),
            instance: None,
        },
    );
    let ev = Event {
        type_: EventType::Normal,
        reason: "Synced".into(),
        note: Some("all good".into()),
        action: "Sync".into(),
        secondary: None,
    };
    let reference = kube::Resource::object_ref(&obj, &connector_ar());
    recorder.publish(&ev, &reference).await.unwrap();
    let events = fake.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["reason"], "Synced");
    assert_eq!(events[0]["note"], "all good");
    assert_eq!(events[0]["regarding"]["name"], "e1");
    // a repeat goes out as a merge patch bumping the series
    recorder.publish(&ev, &reference).await.unwrap();
    let events = fake.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["series"]["count"], 2);
}

#[tokio::test]
async fn controller_reconciles_object_created_after_start() {
    let fake = FakeKube::start().await;
    let api = connectors(fake.client());
    struct Ctx {
        api: Api<DynamicObject>,
    }
    async fn reconcile(obj: Arc<DynamicObject>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
        let name = obj.metadata.name.clone().unwrap();
        let status = json!({
            "apiVersion": CR_API, "kind": CONNECTOR,
            "status": {"phase": "Ready", "observedGeneration": obj.metadata.generation},
        });
        ctx.api
            .patch_status(
                &name,
                &PatchParams::apply("bitbucket-operator").force(),
                &Patch::Apply(&status),
            )
            .await?;
        Ok(Action::requeue(Duration::from_secs(300)))
    }
    fn error_policy(_: Arc<DynamicObject>, _: &kube::Error, _: Arc<Ctx>) -> Action {
        Action::requeue(Duration::from_millis(100))
    }
    let controller = Controller::new_with(api.clone(), watcher::Config::default(), connector_ar())
        .run(reconcile, error_policy, Arc::new(Ctx { api: api.clone() }))
        .for_each(|_| async {});
    let task = tokio::spawn(controller);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let obj: DynamicObject = serde_json::from_value(connector("late")).unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap();
    fake.wait_for(CR_API, CONNECTOR, Some("default"), "late", WAIT, |o| {
        o["status"]["phase"] == "Ready"
    })
    .await;
    // a spec change is reconciled again (observedGeneration follows)
    api.patch(
        "late",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"workspace": "b"}})),
    )
    .await
    .unwrap();
    fake.wait_for(CR_API, CONNECTOR, Some("default"), "late", WAIT, |o| {
        o["status"]["observedGeneration"] == 2
    })
    .await;
    task.abort();
}

#[tokio::test]
async fn lease_manager_single_leader_and_failover() {
    use kube_lease_manager::LeaseManagerBuilder;
    let fake = FakeKube::start().await;
    let build = |id: &str| {
        LeaseManagerBuilder::new(fake.client(), "bitbucket-operator-leader")
            .with_namespace("default")
            .with_identity(id)
            .with_duration(3)
            .with_grace(1)
            .build()
    };
    let a = build("a").await.unwrap();
    let b = build("b").await.unwrap();
    let (mut rx_a, handle_a) = a.watch().await;
    let (mut rx_b, handle_b) = b.watch().await;

    // wait until someone leads, then make sure the other does not
    let deadline = tokio::time::Instant::now() + WAIT;
    while !*rx_a.borrow_and_update() && !*rx_b.borrow_and_update() {
        assert!(tokio::time::Instant::now() < deadline, "nobody became leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (a_leads, b_leads) = (*rx_a.borrow(), *rx_b.borrow());
    assert!(
        a_leads != b_leads,
        "exactly one leader expected: a={a_leads} b={b_leads}"
    );
    let lease = fake
        .get(
            "coordination.k8s.io/v1",
            "Lease",
            Some("default"),
            "bitbucket-operator-leader",
        )
        .unwrap();
    let (leader_id, mut follower_rx, leader_rx, leader_handle, follower_handle) = if a_leads {
        ("a", rx_b, rx_a, handle_a, handle_b)
    } else {
        ("b", rx_a, rx_b, handle_b, handle_a)
    };
    assert_eq!(lease["spec"]["holderIdentity"], leader_id);

    // dropping the leader's receiver releases the lease; the follower takes over
    drop(leader_rx);
    leader_handle.await.unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(15), follower_rx.wait_for(|l| *l))
        .await
        .expect("follower never took over")
        .unwrap();
    let lease = fake
        .get(
            "coordination.k8s.io/v1",
            "Lease",
            Some("default"),
            "bitbucket-operator-leader",
        )
        .unwrap();
    assert_ne!(lease["spec"]["holderIdentity"], leader_id);
    drop(follower_rx);
    follower_handle.await.unwrap().unwrap();
}

// ---------- fidelity: what a real kube-apiserver does and tests depend on ----------

fn secret_data(s: &Secret) -> Vec<(String, String)> {
    s.data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
        .collect()
}

/// Field paths (`f:a.f:b`, list entries as `k:…`) a manager owns, from the object's `managedFields`.
fn owned(obj: &kube::api::ObjectMeta, manager: &str) -> Vec<String> {
    fn walk(v: &Value, prefix: &str, out: &mut Vec<String>) {
        let Some(m) = v.as_object().filter(|m| !m.is_empty()) else {
            out.push(prefix.to_owned());
            return;
        };
        for (k, child) in m {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            walk(child, &path, out);
        }
    }
    let mut out = Vec::new();
    for entry in obj
        .managed_fields
        .iter()
        .flatten()
        .filter(|e| e.manager.as_deref() == Some(manager))
    {
        walk(&entry.fields_v1.as_ref().unwrap().0, "", &mut out);
    }
    out.sort();
    out
}

fn apply_secret(body: Value) -> Patch<Value> {
    let mut obj = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}});
    obj.as_object_mut().unwrap().extend(body.as_object().unwrap().clone());
    Patch::Apply(obj)
}

/// The bug `tests/cluster.rs` hit on a real API server: `stringData` is write-only, merged into
/// `data`, so an applier owns only `stringData` keys and dropping one removes nothing.
#[tokio::test]
async fn ssa_of_string_data_with_only_new_keys_keeps_the_old_data_key() {
    let fake = FakeKube::start().await;
    let api: Api<Secret> = Api::default_namespaced(fake.client());
    let ssa = PatchParams::apply("rotator").force();
    api.patch(
        "creds",
        &ssa,
        &apply_secret(json!({"stringData": {"BATON_USERNAME": "ops", "BATON_APP_PASSWORD": "token"}})),
    )
    .await
    .unwrap();
    let rotated = api
        .patch(
            "creds",
            &ssa,
            &apply_secret(json!({"stringData": {"BATON_CONSUMER_KEY": "key", "BATON_CONSUMER_SECRET": "secret"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        secret_data(&rotated),
        [
            ("BATON_APP_PASSWORD".to_owned(), "token".to_owned()),
            ("BATON_CONSUMER_KEY".to_owned(), "key".to_owned()),
            ("BATON_CONSUMER_SECRET".to_owned(), "secret".to_owned()),
            ("BATON_USERNAME".to_owned(), "ops".to_owned()),
        ],
        "the old keys stay in data"
    );
    assert!(rotated.string_data.is_none(), "stringData is never returned");
    assert_eq!(
        owned(&rotated.metadata, "rotator"),
        [
            "f:stringData.f:BATON_CONSUMER_KEY",
            "f:stringData.f:BATON_CONSUMER_SECRET"
        ],
        "the applier owns stringData keys, never the data keys they became"
    );
    let stored = fake.get("v1", "Secret", Some("default"), "creds").unwrap();
    assert!(stored.get("stringData").is_none(), "stringData is never stored");
}

/// The two ways a rotation really removes the old keys: applying `data` (the applier owns each
/// key) or a merge patch setting them to null.
#[tokio::test]
async fn rotation_removes_old_keys_by_applying_data_or_patching_them_to_null() {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let fake = FakeKube::start().await;
    let api: Api<Secret> = Api::default_namespaced(fake.client());
    let ssa = PatchParams::apply("rotator").force();
    api.patch(
        "creds",
        &ssa,
        &apply_secret(json!({"data": {"BATON_USERNAME": b64("ops"), "BATON_APP_PASSWORD": b64("token")}})),
    )
    .await
    .unwrap();
    let rotated = api
        .patch(
            "creds",
            &ssa,
            &apply_secret(json!({"data": {"BATON_CONSUMER_KEY": b64("key")}})),
        )
        .await
        .unwrap();
    assert_eq!(
        secret_data(&rotated),
        [("BATON_CONSUMER_KEY".to_owned(), "key".to_owned())]
    );

    let patched = api
        .patch(
            "creds",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"BATON_CONSUMER_KEY": null}, "stringData": {"BATON_TOKEN": "t"}})),
        )
        .await
        .unwrap();
    assert_eq!(secret_data(&patched), [("BATON_TOKEN".to_owned(), "t".to_owned())]);
    assert!(
        owned(&patched.metadata, "rotator").is_empty(),
        "a removed key is nobody's"
    );
}

#[tokio::test]
async fn string_data_is_merged_into_data_on_every_write() {
    let fake = FakeKube::start().await;
    let api: Api<Secret> = Api::default_namespaced(fake.client());
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": "s"},
        "data": {"a": "YQ==", "b": "Yg=="},
        "stringData": {"b": "B"},
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &s).await.unwrap();
    assert_eq!(
        secret_data(&created),
        [("a".to_owned(), "a".to_owned()), ("b".to_owned(), "B".to_owned())],
        "stringData wins over data"
    );
    assert!(created.string_data.is_none());
    assert_eq!(created.type_.as_deref(), Some("Opaque"));

    // An update replaces data: keys it leaves out are gone, stringData is merged into the new data.
    let mut update = created.clone();
    update.data = Some([("a".to_owned(), k8s_openapi::ByteString(b"A".to_vec()))].into());
    update.string_data = Some([("c".to_owned(), "C".to_owned())].into());
    let replaced = api.replace("s", &PostParams::default(), &update).await.unwrap();
    assert_eq!(
        secret_data(&replaced),
        [("a".to_owned(), "A".to_owned()), ("c".to_owned(), "C".to_owned())]
    );
    let patched = api
        .patch(
            "s",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"d": "D"}})),
        )
        .await
        .unwrap();
    assert_eq!(secret_data(&patched).len(), 3);
    assert!(patched.string_data.is_none());

    // Not base64: rejected, and nothing is lost.
    let err = api
        .patch(
            "s",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"a": "not base64!"}})),
        )
        .await
        .unwrap_err();
    assert_eq!(api_code(err), 422);
    assert_eq!(secret_data(&api.get("s").await.unwrap()), secret_data(&patched));
    let raw: Api<DynamicObject> = Api::default_namespaced_with(fake.client(), &ApiResource::erase::<Secret>(&()));
    let bad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bad"}, "data": {"a": "not base64!"},
    }))
    .unwrap();
    assert_eq!(
        api_code(raw.create(&PostParams::default(), &bad).await.unwrap_err()),
        400
    );
    assert!(api.get_opt("bad").await.unwrap().is_none());
}

#[tokio::test]
async fn apply_removes_a_dropped_field_only_when_no_other_manager_owns_it() {
    let fake = FakeKube::start().await;
    let api = connectors(fake.client());
    let config = |spec: Value, labels: Value| {
        Patch::Apply(json!({
            "apiVersion": CR_API, "kind": CONNECTOR,
            "metadata": {"name": "c", "labels": labels}, "spec": spec,
        }))
    };
    api.patch(
        "c",
        &PatchParams::apply("gitops"),
        &config(
            json!({"workspace": "acme", "interval": "1h", "suspend": true}),
            json!({"team": "a", "tier": "1"}),
        ),
    )
    .await
    .unwrap();
    // Another writer sets a field of its own; leaving `suspend` as it was does not take it over.
    api.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"metadata": {"labels": {"owner": "ops"}}, "spec": {"apiUrl": "http://x", "suspend": true}}),
        ),
    )
    .await
    .unwrap();
    let tuner = Patch::Apply(json!({"apiVersion": CR_API, "kind": CONNECTOR, "spec": {"interval": "1h"}}));
    api.patch("c", &PatchParams::apply("tuner"), &tuner).await.unwrap();

    let obj = api
        .patch(
            "c",
            &PatchParams::apply("gitops"),
            &config(json!({"workspace": "acme"}), json!({"team": "a"})),
        )
        .await
        .unwrap();
    assert_eq!(
        obj.data["spec"],
        json!({"workspace": "acme", "interval": "1h", "apiUrl": "http://x"})
    );
    let labels = obj.metadata.labels.clone().unwrap();
    assert_eq!(labels.get("tier"), None, "dropped and owned by gitops alone");
    assert_eq!(labels["team"], "a");
    assert_eq!(labels["owner"], "ops", "set by another writer");
    assert_eq!(
        owned(&obj.metadata, "gitops"),
        ["f:metadata.f:labels.f:team", "f:spec.f:workspace"]
    );
    assert_eq!(owned(&obj.metadata, "tuner"), ["f:spec.f:interval"]);
    assert_eq!(obj.metadata.generation, Some(3), "apiUrl added, then suspend removed");
}

#[tokio::test]
async fn apply_conflicts_with_another_managers_field_unless_forced() {
    let fake = FakeKube::start().await;
    let api = connectors(fake.client());
    let config = |workspace: &str| {
        Patch::Apply(json!({
            "apiVersion": CR_API, "kind": CONNECTOR, "metadata": {"name": "c"},
            "spec": {"workspace": workspace},
        }))
    };
    api.patch("c", &PatchParams::apply("gitops"), &config("acme"))
        .await
        .unwrap();
    // Same value: no conflict, shared ownership.
    api.patch("c", &PatchParams::apply("tuner"), &config("acme"))
        .await
        .unwrap();
    let err = api
        .patch("c", &PatchParams::apply("tuner"), &config("other"))
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("expected an API error")
    };
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert!(
        status.message.contains("conflict with \"gitops\": .spec.workspace"),
        "{}",
        status.message
    );
    assert_eq!(
        api.get("c").await.unwrap().data["spec"]["workspace"],
        "acme",
        "nothing changed"
    );

    // Forced: the value changes and the field changes hands.
    let obj = api
        .patch("c", &PatchParams::apply("tuner").force(), &config("other"))
        .await
        .unwrap();
    assert_eq!(obj.data["spec"]["workspace"], "other");
    assert!(owned(&obj.metadata, "gitops").is_empty());
    assert_eq!(owned(&obj.metadata, "tuner"), ["f:spec.f:workspace"]);

    // A plain update owns what it changes too: applying over it conflicts.
    api.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"workspace": "edited"}})),
    )
    .await
    .unwrap();
    let err = api
        .patch("c", &PatchParams::apply("tuner"), &config("other"))
        .await
        .unwrap_err();
    assert_eq!(api_code(err), 409);

    // An applied configuration must not carry managedFields (e.g. an object read back).
    let mut read_back = serde_json::to_value(api.get("c").await.unwrap()).unwrap();
    read_back["apiVersion"] = json!(CR_API);
    read_back["kind"] = json!(CONNECTOR);
    let err = api
        .patch("c", &PatchParams::apply("tuner").force(), &Patch::Apply(read_back))
        .await
        .unwrap_err();
    assert_eq!(api_code(err), 400);
}

#[tokio::test]
async fn status_conditions_are_applied_entry_by_entry() {
    let fake = FakeKube::start().await;
    let api = connectors(fake.client());
    fake.put(connector("c"));
    let status = |conditions: Value| {
        Patch::Apply(json!({"apiVersion": CR_API, "kind": CONNECTOR, "status": {"conditions": conditions}}))
    };
    let cond = |t: &str, s: &str| json!({"type": t, "status": s, "reason": "R", "message": "m"});
    let ctl = PatchParams::apply("controller").force();
    api.patch_status(
        "c",
        &ctl,
        &status(json!([cond("Ready", "False"), cond("Reconciling", "True")])),
    )
    .await
    .unwrap();
    api.patch_status(
        "c",
        &PatchParams::apply("auditor"),
        &status(json!([cond("Audited", "True")])),
    )
    .await
    .unwrap();
    let obj = api
        .patch_status(
            "c",
            &ctl,
            &status(json!([{"type": "Ready", "status": "True", "reason": "R"}])),
        )
        .await
        .unwrap();
    let conditions = obj.data["status"]["conditions"].as_array().unwrap();
    let types: Vec<&str> = conditions.iter().map(|c| c["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["Ready", "Audited"], "Reconciling dropped by its only owner");
    assert_eq!(
        conditions[0],
        json!({"type": "Ready", "status": "True", "reason": "R"}),
        "message dropped"
    );
    assert!(
        owned(&obj.metadata, "controller")
            .contains(&"f:status.f:conditions.k:{\"type\":\"Ready\"}.f:status".to_owned())
    );
    let entry = obj
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .find(|e| e.manager.as_deref() == Some("controller"));
    assert_eq!(entry.unwrap().subresource.as_deref(), Some("status"));
    assert_eq!(obj.metadata.generation, Some(1));
}

#[tokio::test]
async fn a_stale_resource_version_is_a_conflict_on_every_write() {
    let fake = FakeKube::start().await;
    let api = connectors(fake.client());
    fake.put(connector("c"));
    let stale = api.get("c").await.unwrap();
    let rv = stale.metadata.resource_version.clone().unwrap();
    api.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"workspace": "b"}})),
    )
    .await
    .unwrap();

    let merge = Patch::Merge(json!({"metadata": {"resourceVersion": rv}, "spec": {"workspace": "c"}}));
    assert_eq!(
        api_code(api.patch("c", &PatchParams::default(), &merge).await.unwrap_err()),
        409
    );
    let json_patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "replace", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "replace", "path": "/spec/workspace", "value": "c"},
    ]))
    .unwrap();
    let err = api
        .patch("c", &PatchParams::default(), &Patch::Json::<()>(json_patch))
        .await
        .unwrap_err();
    assert_eq!(api_code(err), 409);
    let apply = Patch::Apply(json!({
        "apiVersion": CR_API, "kind": CONNECTOR, "metadata": {"name": "c", "resourceVersion": rv},
        "spec": {"workspace": "c"},
    }));
    assert_eq!(
        api_code(
            api.patch("c", &PatchParams::apply("m").force(), &apply)
                .await
                .unwrap_err()
        ),
        409
    );
    assert_eq!(
        api_code(api.replace("c", &PostParams::default(), &stale).await.unwrap_err()),
        409
    );
    assert_eq!(
        api_code(
            api.replace_status("c", &PostParams::default(), &stale)
                .await
                .unwrap_err()
        ),
        409
    );
    assert_eq!(
        api.get("c").await.unwrap().data["spec"]["workspace"],
        "b",
        "nothing written"
    );

    // Without a resourceVersion an update is unconditional.
    let mut unconditional = stale;
    unconditional.metadata.resource_version = None;
    let replaced = api.replace("c", &PostParams::default(), &unconditional).await.unwrap();
    assert_eq!(replaced.data["spec"]["workspace"], "acme");
}

#[tokio::test]
async fn main_resource_and_status_subresource_change_only_their_own_part() {
    let fake = FakeKube::start().await;
    let api = connectors(fake.client());
    let created = api
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": CR_API, "kind": CONNECTOR, "metadata": {"name": "c"},
                "spec": {"workspace": "acme"}, "status": {"state": "Forged"},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    assert!(created.data.get("status").is_none(), "status dropped on create");

    // PUT /status: status only; spec, labels and annotations are ignored.
    let mut obj = created.clone();
    obj.data["status"] = json!({"state": "Connected"});
    obj.data["spec"]["workspace"] = json!("other");
    obj.metadata.labels = Some([("l".to_owned(), "v".to_owned())].into());
    let after = api.replace_status("c", &PostParams::default(), &obj).await.unwrap();
    assert_eq!(after.data["status"]["state"], "Connected");
    assert_eq!(after.data["spec"]["workspace"], "acme");
    assert!(after.metadata.labels.is_none());
    assert_eq!(after.metadata.generation, Some(1), "status does not move generation");

    // PUT on the main resource: everything but status; metadata alone keeps the generation.
    let mut obj = after.clone();
    obj.data["status"] = json!({"state": "Forged"});
    obj.metadata.labels = Some([("l".to_owned(), "v".to_owned())].into());
    let after = api.replace("c", &PostParams::default(), &obj).await.unwrap();
    assert_eq!(after.data["status"]["state"], "Connected");
    assert_eq!(after.metadata.labels.as_ref().unwrap()["l"], "v");
    assert_eq!(after.metadata.generation, Some(1));

    // Applying status through the main resource neither writes nor owns it.
    let applied = api
        .patch(
            "c",
            &PatchParams::apply("m").force(),
            &Patch::Apply(json!({"apiVersion": CR_API, "kind": CONNECTOR, "spec": {"workspace": "b"}, "status": {"state": "Forged"}})),
        )
        .await
        .unwrap();
    assert_eq!(applied.data["status"]["state"], "Connected");
    assert_eq!(owned(&applied.metadata, "m"), ["f:spec.f:workspace"]);
    assert_eq!(applied.metadata.generation, Some(2), "spec changed");
}
