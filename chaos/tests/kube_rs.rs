//! A kube-rs client (the `kube` crate on rustls, as an agent written in Rust would use it)
//! through the Kubernetes gateway, configured from nothing but the kubeconfig a Vigil user
//! gets: the gateway's URL with the cluster prefix, its listener certificate as the cluster's
//! CA, and a static Vigil token.
//!
//! - t10: get, list, watch, create, patch and delete answer as the API server does; the watch
//!   delivers each change while it is open (its response record comes only when the client
//!   drops it). Every request the API server's own audit log (the ground truth) shows from the
//!   gateway's sessions is impersonated as the agent, and each of them has a Vigil record with
//!   the same verb, resource, namespace and name, and the same status. A Deployment delete
//!   blocked by a rule reaches kube-rs as a 403 `Status` with Vigil's reason, and never
//!   reaches the API server.
//!
//! exec, attach, logs and port-forward through kube-rs are in kube_websocket.rs.

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{
    Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use std::collections::HashSet;
use std::time::{Duration, Instant};
use vigil_chaos::kube::{
    admin, audit_events, audit_len, client, end_of, event_key, gateway_events, grant_dba,
    namespace_with_web, record_key, requests, Gateway, RequestKey,
};
use vigil_chaos::{of_kind, response_to, token_for};
use vigil_proto::record::{Kind, Record, Response};

const POLICY: &str = r#"
[[policy.rules]]
id = "no-deployment-deletes"
protocol = "kubernetes"
action = "block"
verbs = ["delete", "deletecollection"]
resources = ["apps/deployments"]
reason = "deployments are removed by their owners, not by agents"
"#;

fn key(verb: &str, resource: &str, namespace: &str, name: &str) -> RequestKey {
    (verb.into(), resource.into(), namespace.into(), name.into())
}

/// The next event of the watch for the ConfigMap `name` (others, such as the namespace's own
/// `kube-root-ca.crt` and bookmarks, are skipped): (event type, the object's `data`).
async fn next_change(
    events: &mut (impl Stream<Item = kube::Result<WatchEvent<ConfigMap>>> + Unpin),
    name: &str,
) -> (
    &'static str,
    Option<std::collections::BTreeMap<String, String>>,
) {
    let wait = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let event = events
                .next()
                .await
                .expect("the watch is still open")
                .expect("a watch event kube-rs can read");
            let (kind, object) = match event {
                WatchEvent::Added(o) => ("ADDED", o),
                WatchEvent::Modified(o) => ("MODIFIED", o),
                WatchEvent::Deleted(o) => ("DELETED", o),
                WatchEvent::Bookmark(_) => continue,
                WatchEvent::Error(e) => panic!("the watch failed: {e:?}"),
            };
            if object.metadata.name.as_deref() == Some(name) {
                return (kind, object.data);
            }
        }
    });
    wait.await
        .unwrap_or_else(|_| panic!("no event for {name} within 10 s of the change"))
}

/// Records once the watch `stmt` of `session` has its response record (written when the
/// watch ends), or `None` after `timeout`.
async fn until_response(
    g: &Gateway,
    session: &str,
    stmt: u64,
    timeout: Duration,
) -> Option<Vec<Record>> {
    let deadline = Instant::now() + timeout;
    loop {
        let records = g.node.records().await;
        let done = records.iter().any(|r| {
            r.body.kind == Kind::Response
                && r.body.session.as_deref() == Some(session)
                && r.body.stmt == Some(stmt)
        });
        if done {
            return Some(records);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_kube_rs_through_the_gateway_is_impersonated_decided_and_recorded() {
    grant_dba().await;
    let g = Gateway::start(POLICY).await;
    let dir = tempfile::tempdir().unwrap();
    let ops = token_for("agent-ops", "agent-ops-secret").await;
    let client = client(&g.kubeconfig(dir.path(), &ops)).await;
    let ns = namespace_with_web().await;
    let offset = audit_len();
    println!("phase: list, then watch from the list's resourceVersion");

    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let listed = configmaps.list(&ListParams::default()).await.expect("list");
    assert!(
        listed
            .items
            .iter()
            .all(|c| c.metadata.name.as_deref() != Some("settings")),
        "a fresh namespace"
    );
    let version = listed.metadata.resource_version.expect("a list version");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let listed = pods.list(&ListParams::default()).await.expect("list pods");
    assert!(
        listed
            .items
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some("shell")),
        "the dev cluster's pod is listed"
    );
    let watch = WatchParams::default().timeout(120);
    let mut events = configmaps
        .watch(&watch, &version)
        .await
        .expect("watch")
        .boxed();

    println!("phase: create, get, patch, delete, each seen by the open watch");
    let mut data = std::collections::BTreeMap::new();
    data.insert("mode".to_string(), "fast".to_string());
    let settings = ConfigMap {
        metadata: ObjectMeta {
            name: Some("settings".into()),
            ..ObjectMeta::default()
        },
        data: Some(data.clone()),
        ..ConfigMap::default()
    };
    let created = configmaps
        .create(&PostParams::default(), &settings)
        .await
        .expect("create");
    assert_eq!(created.data.as_ref(), Some(&data));
    let seen = Instant::now();
    assert_eq!(
        next_change(&mut events, "settings").await,
        ("ADDED", Some(data.clone()))
    );
    assert!(seen.elapsed() < Duration::from_secs(5), "as it happens");
    let got = configmaps.get("settings").await.expect("get");
    assert_eq!(got.data.as_ref(), Some(&data));
    let patch = serde_json::json!({"data": {"patched": "yes"}});
    let patched = configmaps
        .patch("settings", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch");
    data.insert("patched".to_string(), "yes".to_string());
    assert_eq!(patched.data.as_ref(), Some(&data));
    assert_eq!(
        next_change(&mut events, "settings").await,
        ("MODIFIED", Some(data.clone()))
    );
    let deleted = configmaps
        .delete("settings", &DeleteParams::default())
        .await
        .expect("delete");
    // The dev API server (1.20) answers a delete with a `Status`; newer ones with the object.
    match (deleted.as_ref().left(), deleted.as_ref().right()) {
        (Some(object), _) => assert_eq!(object.metadata.name.as_deref(), Some("settings")),
        (_, Some(status)) => assert!(status.is_success(), "{status:?}"),
        _ => unreachable!("either one or the other"),
    }
    assert_eq!(next_change(&mut events, "settings").await.0, "DELETED");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let web = deployments.get("web").await.expect("get a deployment");
    assert_eq!(web.metadata.name.as_deref(), Some("web"));

    println!("phase: a delete blocked by rule");
    let err = deployments
        .delete("web", &DeleteParams::default())
        .await
        .expect_err("the rule blocks it");
    let kube::Error::Api(status) = err else {
        panic!("kube-rs reads the refusal as an API Status: {err:?}")
    };
    assert_eq!(status.code, 403, "{status:?}");
    assert_eq!(status.reason, "Forbidden", "{status:?}");
    assert!(
        status
            .message
            .contains("vigil: blocked by rule no-deployment-deletes")
            && status.message.contains("removed by their owners"),
        "{status:?}"
    );
    let out = admin(&["-n", &ns, "get", "deployment", "web", "-o", "name"]).await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "deployment.apps/web"
    );

    println!("phase: the watch is still open, and its end is recorded when kube-rs drops it");
    let records = g.node.records().await;
    let watch_record = records
        .iter()
        .find(|r| record_key(r).is_some_and(|k| k.0 == "watch"))
        .expect("the watch's request record");
    let session = watch_record.body.session.clone().expect("a session");
    let stmt = watch_record.body.stmt.expect("a statement number");
    assert!(
        until_response(&g, &session, stmt, Duration::ZERO)
            .await
            .is_none(),
        "no response record while the watch is open"
    );
    drop(events);
    let records = until_response(&g, &session, stmt, Duration::from_secs(10))
        .await
        .expect("the watch's end is recorded once the client leaves");

    println!("phase: the API server's audit log against Vigil's records");
    let expected = [
        key("list", "configmaps", &ns, ""),
        key("list", "pods", "default", ""),
        key("watch", "configmaps", &ns, ""),
        key("create", "configmaps", &ns, "settings"),
        key("get", "configmaps", &ns, "settings"),
        key("patch", "configmaps", &ns, "settings"),
        key("delete", "configmaps", &ns, "settings"),
        key("get", "deployments", &ns, "web"),
    ];
    // The watch's ResponseComplete event is written when the API server sees it end.
    let deadline = Instant::now() + Duration::from_secs(10);
    let events = loop {
        let events = gateway_events(offset, &records);
        let complete = |k: &RequestKey| {
            events
                .iter()
                .any(|e| e["stage"] == "ResponseComplete" && event_key(e) == *k)
        };
        if expected.iter().all(complete) || Instant::now() >= deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let vigil: Vec<(RequestKey, &Record)> = records
        .iter()
        .filter_map(|r| record_key(r).map(|k| (k, r)))
        .collect();
    assert!(!events.is_empty());
    for e in &events {
        assert_eq!(e["impersonatedUser"]["username"], "agent-ops", "{e}");
        let groups = e["impersonatedUser"]["groups"].to_string();
        assert!(groups.contains("vigil:dba"), "{e}");
        let k = event_key(e);
        assert!(
            vigil.iter().any(|(v, _)| *v == k),
            "the API server saw {k:?} without a Vigil record"
        );
    }
    for k in &expected {
        let event = events
            .iter()
            .find(|e| e["stage"] == "ResponseComplete" && event_key(e) == *k)
            .unwrap_or_else(|| panic!("{k:?} is not in the API server's audit log"));
        let (_, request) = vigil
            .iter()
            .find(|(v, _)| v == k)
            .unwrap_or_else(|| panic!("{k:?} has no Vigil request record"));
        let response = response_to(&records, request)
            .unwrap_or_else(|| panic!("{k:?} has no Vigil response record"));
        let Some(Response::Kubernetes(answer)) = &response.body.response else {
            panic!("{k:?}: not a Kubernetes response: {:?}", response.body)
        };
        assert_eq!(
            u64::from(answer.status),
            event["responseStatus"]["code"].as_u64().unwrap_or_default(),
            "{k:?}: Vigil recorded another status than the API server answered"
        );
        assert_eq!(
            request.body.principal.as_ref().map(|p| p.subject.as_str()),
            Some("agent-ops")
        );
    }
    // The blocked delete: on Vigil's record, nowhere in the API server's log (from anyone).
    let blocked = of_kind(&records, Kind::Blocked);
    assert!(
        blocked.iter().any(|r| r
            .body
            .policy
            .as_ref()
            .is_some_and(|p| p.rule == "no-deployment-deletes")),
        "the blocked delete is on record"
    );
    let refused = key("delete", "deployments", &ns, "web");
    assert!(
        !audit_events(offset).iter().any(|e| event_key(e) == refused),
        "the blocked delete reached the API server"
    );

    let _ = admin(&["delete", "namespace", &ns, "--wait=false"]).await;
}

/// One connection serves many requests of its principal, whose declared intent
/// (`X-Vigil-Intent`) may change from one request to the next: each request's records name the
/// intent it declared, and none where it declared none. (The gateway serialises a session's
/// principal once and shares it between records while it stays the same.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_of_a_connection_records_its_own_intent() {
    grant_dba().await;
    let g = Gateway::start("").await;
    let dir = tempfile::tempdir().unwrap();
    let ops = token_for("agent-ops", "agent-ops-secret").await;
    let client = client(&g.kubeconfig(dir.path(), &ops)).await;
    let intents = [
        Some("check the config"),
        Some("check the config"),
        Some("rotate a key"),
        None,
        Some("check the config"),
    ];
    for (i, intent) in intents.iter().enumerate() {
        let mut req = http::Request::get(format!(
            "/api/v1/namespaces/default/configmaps?limit={}",
            i + 1
        ));
        if let Some(intent) = intent {
            req = req.header("x-vigil-intent", *intent);
        }
        client
            .request_text(req.body(Vec::new()).unwrap())
            .await
            .expect("the gateway answers");
    }
    let records = g.node.records().await;
    let asked = requests(&records, |k| {
        k.resource.as_deref() == Some("configmaps")
            && k.query.as_deref().is_some_and(|q| q.starts_with("limit="))
    });
    assert_eq!(asked.len(), intents.len(), "a record per request");
    // kube-rs reuses its connection (its pool may open a second one when the first is not yet
    // back from the previous answer): some connection carries requests of different intents.
    let mut by_session: std::collections::HashMap<_, HashSet<_>> = Default::default();
    for r in &asked {
        let intent = r.body.principal.as_ref().and_then(|p| p.intent.clone());
        by_session
            .entry(&r.body.session)
            .or_default()
            .insert(intent);
    }
    assert!(
        by_session.values().any(|intents| intents.len() > 1),
        "one connection carried requests of different intents: {by_session:?}"
    );
    for (i, intent) in intents.iter().enumerate() {
        let limit = format!("limit={}", i + 1);
        let request = asked
            .iter()
            .find(|r| {
                matches!(&r.body.request, Some(vigil_proto::record::Request::Kubernetes(k))
                    if k.query.as_deref() == Some(limit.as_str()))
            })
            .unwrap_or_else(|| panic!("the record of request {}", i + 1));
        let (response, _) = end_of(&records, request).expect("its response record");
        for r in [request, response] {
            let p = r.body.principal.as_ref().expect("a principal");
            assert_eq!(
                p.intent.as_deref(),
                *intent,
                "request {} ({:?})",
                i + 1,
                r.body.kind
            );
            assert_eq!(p.subject, "agent-ops");
        }
    }
}
