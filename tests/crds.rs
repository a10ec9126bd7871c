//! The checked-in CRDs (`crds/` and the Helm chart's copy) must equal what
//! `bitbucket-operator crd` generates from the Rust types, and the generated
//! schemas must carry what users and GitOps tools rely on.

use std::path::{Path, PathBuf};

use bitbucket_operator::crd::{self, BitbucketAccessGrant, BitbucketConnector};
use kube::CustomResourceExt;
use serde_json::Value;

const REGENERATE: &str = "regenerate with: cargo run -- crd --write";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}; {REGENERATE}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

fn check_dir(dir: &Path) {
    let expected: Vec<String> = crd::crds().iter().map(crd::crd_file_name).collect();
    let files = yaml_files(dir);
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        expected,
        "{}: unexpected set of CRD files; {REGENERATE}",
        dir.display()
    );
    for c in crd::crds() {
        let path = dir.join(crd::crd_file_name(&c));
        let on_disk = std::fs::read_to_string(&path).unwrap();
        assert!(
            on_disk == crd::crd_yaml(&c).unwrap(),
            "{} is stale (the Rust types changed); {REGENERATE}",
            path.display()
        );
    }
    // `cat dir/*.yaml` (glob order) is exactly the `crd` subcommand's output.
    let concatenated: String = files.iter().map(|p| std::fs::read_to_string(p).unwrap()).collect();
    assert_eq!(
        concatenated,
        crd::all_crds_yaml().unwrap(),
        "{}: {REGENERATE}",
        dir.display()
    );
}

#[test]
fn crds_dir_is_current() {
    check_dir(&root().join("crds"));
}

#[test]
fn chart_copy_is_current() {
    check_dir(&root().join(crd::cli::CHART_CRDS_DIR));
}

#[test]
fn crd_subcommand_prints_the_checked_in_files() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bitbucket-operator"))
        .arg("crd")
        .output()
        .expect("run bitbucket-operator crd");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let files: String = yaml_files(&root().join("crds"))
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert_eq!(
        stdout, files,
        "`cat crds/*.yaml` must equal `bitbucket-operator crd`; {REGENERATE}"
    );
    assert_eq!(stdout.matches("---\n").count(), 2);
    // Every document parses as a CRD.
    for doc in stdout.split("---\n").filter(|d| !d.trim().is_empty()) {
        let v: Value = serde_yaml::from_str(doc).unwrap();
        assert_eq!(v["kind"], "CustomResourceDefinition");
    }
}

fn crd_json<K: CustomResourceExt>() -> Value {
    serde_json::to_value(K::crd()).unwrap()
}

fn version(crd: &Value) -> &Value {
    let versions = crd["spec"]["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0]["name"], "v1alpha1");
    assert_eq!(versions[0]["served"], true);
    assert_eq!(versions[0]["storage"], true);
    &versions[0]
}

fn schema(crd: &Value) -> &Value {
    &version(crd)["schema"]["openAPIV3Schema"]
}

fn rules(v: &Value) -> Vec<String> {
    v["x-kubernetes-validations"]
        .as_array()
        .map(|a| a.iter().map(|r| r["rule"].as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

fn columns(crd: &Value) -> Vec<(String, String, String)> {
    version(crd)["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["type"].as_str().unwrap().to_owned(),
                c["jsonPath"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn assert_list_map_conditions(status: &Value) {
    let conds = &status["properties"]["conditions"];
    assert_eq!(conds["type"], "array");
    assert_eq!(
        conds["x-kubernetes-list-type"], "map",
        "conditions must be a list-map (server-side apply)"
    );
    assert_eq!(conds["x-kubernetes-list-map-keys"], serde_json::json!(["type"]));
    let required = conds["items"]["required"].as_array().unwrap();
    assert!(required.contains(&Value::from("type")), "list-map key must be required");
    assert!(conds["items"]["properties"]["observedGeneration"].is_object());
}

/// Every property (recursively) has a description, for `kubectl explain`.
fn assert_described(path: &str, v: &Value) {
    if let Some(props) = v["properties"].as_object() {
        for (name, p) in props {
            let here = format!("{path}.{name}");
            if path.is_empty() && (name == "apiVersion" || name == "kind" || name == "metadata") {
                continue;
            }
            assert!(
                p["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{here} has no description"
            );
            assert_described(&here, p);
            assert_described(&format!("{here}[]"), &p["items"]);
        }
    }
}

#[test]
fn connector_crd_schema() {
    let crd = crd_json::<BitbucketConnector>();
    assert_eq!(crd["metadata"]["name"], "bitbucketconnectors.connectors.dev");
    assert_eq!(crd["spec"]["group"], "connectors.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["shortNames"], serde_json::json!(["bbc"]));
    assert_eq!(version(&crd)["subresources"]["status"], serde_json::json!({}));

    let cols = columns(&crd);
    let expect = [
        ("State", "string", ".status.state"),
        ("Ready", "string", ".status.conditions[?(@.type==\"Ready\")].status"),
        ("Last Sync", "date", ".status.lastSyncTime"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ];
    for (n, t, p) in expect {
        assert!(
            cols.contains(&(n.into(), t.into(), p.into())),
            "missing column {n}: {cols:?}"
        );
    }

    let s = schema(&crd);
    assert_described("", s);
    let spec = &s["properties"]["spec"];
    assert_eq!(spec["required"], serde_json::json!(["secretRef"]));
    let sp = &spec["properties"];
    assert_eq!(sp["secretRef"]["properties"]["name"]["minLength"], 1);
    let doc = sp["secretRef"]["description"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        doc.contains("same namespace"),
        "secretRef must document the same-namespace rule: {doc}"
    );
    assert_eq!(sp["suspend"]["default"], false);
    assert_eq!(sp["interval"]["default"], "1h");
    assert!(rules(&sp["interval"]).contains(&"duration(self) >= duration('1m')".to_owned()));
    assert_eq!(sp["workspaces"]["maxItems"], 100);
    assert_eq!(sp["workspaces"]["items"]["pattern"], "^[a-z0-9][a-z0-9_.-]*$");
    assert_eq!(sp["apiUrl"]["pattern"], "^https?://");
    let keys = sp["secretKeys"]["properties"].as_object().unwrap();
    for k in [
        "username",
        "appPassword",
        "token",
        "consumerKey",
        "consumerSecret",
        "workspaces",
        "provisioning",
        "clientId",
        "clientSecret",
    ] {
        assert!(keys.contains_key(k), "secretKeys.{k}");
        // A rename is a Secret key name, nothing else.
        assert_eq!(keys[k]["pattern"], "^[-._a-zA-Z0-9]*$", "secretKeys.{k}");
        assert_eq!(keys[k]["maxLength"], 253, "secretKeys.{k}");
    }
    // The API server refuses a rename that reads another field's key (the
    // operator checks again, with reason InvalidSecretKeys).
    let key_rules = rules(&sp["secretKeys"]);
    assert_eq!(
        key_rules,
        [bitbucket_operator::settings::distinct_secret_keys_rule().rule],
        "secretKeys carries the distinct-keys rule"
    );
    let res = &sp["resources"];
    assert!(res.get("additionalProperties").is_none() && res.get("x-kubernetes-preserve-unknown-fields").is_none());
    let names: Vec<&String> = res["properties"].as_object().unwrap().keys().collect();
    assert_eq!(names, ["accounts", "groups", "projects", "repositories", "workspaces"]);
    for n in names {
        let l = &res["properties"][n]["properties"];
        assert_eq!(l["enabled"]["default"], true);
        assert!(rules(&l["interval"]).contains(&"duration(self) >= duration('1m')".to_owned()));
    }
    let rl = &sp["rateLimit"]["properties"];
    assert_eq!(
        (
            rl["requestsPerHour"]["minimum"].as_f64(),
            rl["requestsPerHour"]["maximum"].as_f64()
        ),
        (Some(1.0), Some(100000.0))
    );
    assert_eq!(rl["requestsPerHour"]["default"], 1000);
    assert_eq!(
        (
            rl["maxInFlight"]["minimum"].as_f64(),
            rl["maxInFlight"]["maximum"].as_f64()
        ),
        (Some(1.0), Some(64.0))
    );
    assert_eq!(rl["maxInFlight"]["default"], 4);
    // spec.provisioning is the grant policy, an object with safe defaults
    // (the boolean of earlier versions is refused by its type).
    let prov = &sp["provisioning"];
    assert_eq!(prov["type"], "object");
    let pp = &prov["properties"];
    assert_eq!(pp["maxDuration"]["default"], "168h");
    assert!(rules(&pp["maxDuration"]).contains(&"duration(self) >= duration('1m')".to_owned()));
    assert_eq!(pp["requireDuration"]["default"], true);
    assert_eq!(
        pp["allowedPermissions"]["default"],
        serde_json::json!(["read", "write"])
    );
    assert_eq!(pp["enabled"]["type"], "boolean");
    assert!(pp["enabled"].get("default").is_none(), "absent: the Secret decides");
    for kind in ["repositories", "projects", "groups"] {
        assert_eq!(
            pp["allowedTargets"]["properties"][kind]["items"]["pattern"], "^[A-Za-z0-9_.*-]+/[A-Za-z0-9_.*-]+$",
            "allowedTargets.{kind}"
        );
    }
    assert_eq!(
        pp["grantNamespaces"]["items"]["pattern"],
        "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
    );
    let rot = &sp["credentialRotation"]["properties"];
    assert!(rules(&rot["schedule"]).contains(&"duration(self) >= duration('1h')".to_owned()));
    assert_eq!(
        sp["credentialRotation"]["required"],
        serde_json::json!(["appId", "connectorId"])
    );

    let status = &s["properties"]["status"];
    assert_list_map_conditions(status);
    for f in [
        "observedGeneration",
        "state",
        "lastSyncTime",
        "resources",
        "credentials",
        "lastHandledReconcileAt",
        "credentialRotation",
    ] {
        assert!(status["properties"][f].is_object(), "status.{f}");
    }
    assert_eq!(status["properties"]["lastSyncTime"]["format"], "date-time");
    let repo = &status["properties"]["resources"]["properties"]["repositories"]["properties"];
    for f in [
        "count",
        "lastSyncStart",
        "lastSyncEnd",
        "durationSeconds",
        "requests",
        "lastError",
        "lastSuccess",
    ] {
        assert!(repo[f].is_object(), "status.resources.repositories.{f}");
    }
    let creds = &status["properties"]["credentials"]["properties"];
    for f in ["fingerprint", "lastChanged"] {
        assert!(creds[f].is_object(), "status.credentials.{f}");
    }
    let rotation = &status["properties"]["credentialRotation"]["properties"];
    for f in [
        "credentialId",
        "expiresTime",
        "lastRotationTime",
        "nextRotationTime",
        "fingerprint",
        "lastHandledRotateAt",
    ] {
        assert!(rotation[f].is_object(), "status.credentialRotation.{f}");
    }
}

#[test]
fn access_grant_crd_schema() {
    let crd = crd_json::<BitbucketAccessGrant>();
    assert_eq!(crd["metadata"]["name"], "bitbucketaccessgrants.connectors.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["shortNames"], serde_json::json!(["bbag"]));
    assert_eq!(version(&crd)["subresources"]["status"], serde_json::json!({}));
    let col_names: Vec<String> = columns(&crd).into_iter().map(|c| c.0).collect();
    for n in ["Principal", "Target", "Permission", "State", "Expires"] {
        assert!(col_names.contains(&n.to_owned()), "missing column {n}");
    }

    let s = schema(&crd);
    assert_described("", s);
    let spec = &s["properties"]["spec"];
    let mut required: Vec<&str> = spec["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    required.sort();
    assert_eq!(required, ["connectorRef", "permission", "principal", "target"]);
    let sp = &spec["properties"];
    assert_eq!(
        sp["permission"]["enum"],
        serde_json::json!(["member", "read", "write", "create-repo", "admin"])
    );
    assert_eq!(rules(&sp["principal"]), ["has(self.user) != has(self.group)"]);
    assert!(rules(&sp["target"])[0].contains("has(self.repository)"));
    assert_eq!(sp["target"]["required"], serde_json::json!(["workspace"]));
    assert!(rules(&sp["duration"]).contains(&"duration(self) >= duration('1m')".to_owned()));
    let spec_rules = rules(spec).join("\n");
    for needle in [
        "self.permission == 'member'",
        "'create-repo'",
        "has(self.target.repository)",
        "has(self.expiresAt)",
    ] {
        assert!(
            spec_rules.contains(needle),
            "spec CEL rules miss {needle}: {spec_rules}"
        );
    }
    // The request is immutable; its end can only come sooner (transition rules).
    let immutable = [
        ("self.principal == oldSelf.principal", "spec.principal is immutable"),
        ("self.target == oldSelf.target", "spec.target is immutable"),
        ("self.permission == oldSelf.permission", "spec.permission is immutable"),
        (
            "self.connectorRef == oldSelf.connectorRef",
            "spec.connectorRef is immutable",
        ),
    ];
    let spec_rules: Vec<(String, String)> = spec["x-kubernetes-validations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["rule"].as_str().unwrap().to_owned(),
                r["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for (rule, message) in immutable {
        assert!(
            spec_rules.iter().any(|(r, m)| r == rule && m.starts_with(message)),
            "missing {rule}: {spec_rules:?}"
        );
    }
    for (field, needle) in [
        ("duration", "duration(self.duration) <= duration(oldSelf.duration)"),
        ("expiresAt", "self.expiresAt <= oldSelf.expiresAt"),
    ] {
        assert!(
            spec_rules
                .iter()
                .any(|(r, _)| r.contains(needle)
                    && r.starts_with(&format!("!has(oldSelf.{field}) || (has(self.{field})"))),
            "{field} may only shrink, and not be removed: {spec_rules:?}"
        );
    }
    assert_eq!(sp["expiresAt"]["format"], "date-time", "compared as a timestamp by CEL");
    let cref = &sp["connectorRef"]["properties"];
    assert_eq!(cref["namespace"]["pattern"], "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$");
    assert_eq!(sp["connectorRef"]["required"], serde_json::json!(["name"]));
    let status = &s["properties"]["status"];
    assert_list_map_conditions(status);
    assert!(
        status["properties"]["applied"]["properties"]["connectorNamespace"].is_object(),
        "status.applied records the connector's namespace"
    );
    for f in [
        "observedGeneration",
        "state",
        "previousPermission",
        "grantedAt",
        "expiresAt",
        "principalId",
    ] {
        assert!(status["properties"][f].is_object(), "status.{f}");
    }
}

/// Formats the API server recognises; others (schemars' `uint32`) draw
/// "unrecognized format" warnings on every install.
fn assert_known_formats(path: &str, v: &Value) {
    match v {
        Value::Object(map) => {
            if let Some(Value::String(f)) = map.get("format") {
                assert!(
                    ["int32", "int64", "double", "float", "date-time", "date", "byte"].contains(&f.as_str()),
                    "{path}: unsupported format {f}"
                );
            }
            for (k, child) in map {
                assert_known_formats(&format!("{path}.{k}"), child);
            }
        }
        Value::Array(items) => items.iter().for_each(|i| assert_known_formats(path, i)),
        _ => {}
    }
}

#[test]
fn schemas_use_only_formats_kubernetes_knows() {
    assert_known_formats("BitbucketConnector", schema(&crd_json::<BitbucketConnector>()));
    assert_known_formats("BitbucketAccessGrant", schema(&crd_json::<BitbucketAccessGrant>()));
}
