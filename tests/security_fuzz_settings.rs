//! Property tests for the Secret decoder (`settings`): arbitrary manifests
//! and arbitrary key/value maps never panic, and the decoder's errors never
//! carry a value it was given (only key names and rules).

use std::collections::BTreeMap;

use bitbucket_operator::settings::{ConnectorSettings, SecretKeys, parse_workspaces, secret_manifest_data};
use proptest::prelude::*;

const KEYS: [&str; 9] = [
    "BATON_USERNAME",
    "BATON_APP_PASSWORD",
    "BATON_TOKEN",
    "BATON_CONSUMER_KEY",
    "BATON_CONSUMER_SECRET",
    "BATON_WORKSPACES",
    "BATON_PROVISIONING",
    "BATON_CLIENT_ID",
    "BATON_CLIENT_SECRET",
];

fn secret_maps() -> impl Strategy<Value = BTreeMap<String, String>> {
    let key = prop_oneof![prop::sample::select(KEYS.to_vec()).prop_map(str::to_owned), ".{0,12}"];
    prop::collection::btree_map(key, ".{0,40}", 0..10)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_manifest_text_never_panics(text in ".{0,300}") {
        let _ = secret_manifest_data(&text);
    }

    #[test]
    fn arbitrary_manifest_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = secret_manifest_data(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn shaped_manifests_never_panic(data in secret_maps(), string_data in secret_maps(), kind in ".{0,8}") {
        let manifest = serde_json::json!({"kind": kind, "data": data, "stringData": string_data});
        let _ = secret_manifest_data(&manifest.to_string());
    }

    #[test]
    fn arbitrary_secret_maps_never_panic(data in secret_maps()) {
        let _ = ConnectorSettings::from_map(&data, &SecretKeys::default());
    }

    #[test]
    fn workspace_lists_never_panic(text in ".{0,80}") {
        if let Ok(slugs) = parse_workspaces(&text) {
            prop_assert!(slugs.iter().all(|s| !s.is_empty() && !s.contains(',')));
        }
    }
}

/// A YAML alias bomb (each level doubles the one before) must end quickly
/// in an error or a bounded result, not in gigabytes of expansion.
#[test]
fn a_yaml_alias_bomb_is_refused_quickly() {
    let mut doc =
        String::from("kind: Secret\na: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    let mut previous = 'a';
    for name in 'b'..='j' {
        let refs = vec![format!("*{previous}"); 9].join(",");
        doc.push_str(&format!("{name}: &{name} [{refs}]\n"));
        previous = name;
    }
    doc.push_str("stringData: {BATON_TOKEN: *j}\n");
    let clock = std::time::Instant::now();
    let result = secret_manifest_data(&doc);
    assert!(result.is_err(), "an alias bomb is not a Secret");
    assert!(
        clock.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        clock.elapsed()
    );
}
