//! Property tests for the Secret decoder (`settings`): arbitrary manifests,
//! entries and key/value maps never panic, and the decoder's errors never
//! carry a value it was given (only key names and rules).

use std::collections::BTreeMap;

use bitbucket_operator::settings::{
    ConnectorSettings, SecretKeys, decode_entries, parse_workspaces, settings_from_manifest,
};
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

/// Marks every value, so that an error repeating one is caught.
const MARK: &str = "SECRETMARK";

fn key() -> impl Strategy<Value = String> {
    prop_oneof![prop::sample::select(KEYS.to_vec()).prop_map(str::to_owned), ".{0,12}"]
}

fn secret_maps() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(key(), ".{0,30}".prop_map(|v| format!("{MARK}{v}")), 0..10)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_manifest_text_never_panics(text in ".{0,300}") {
        let _ = settings_from_manifest(&text);
    }

    #[test]
    fn arbitrary_manifest_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = settings_from_manifest(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn shaped_manifests_never_panic_nor_echo(
        data in prop::collection::btree_map(key(), ".{0,30}", 0..10),
        string_data in secret_maps(),
        kind in prop::sample::select(vec!["Secret", "ConfigMap", ""]),
    ) {
        let manifest = serde_json::json!({"kind": kind, "data": data, "stringData": string_data});
        if let Err(message) = settings_from_manifest(&manifest.to_string()) {
            prop_assert!(!message.contains(MARK), "{}", message);
        }
    }

    #[test]
    fn arbitrary_entries_never_panic(
        data in prop::collection::vec((key(), prop::collection::vec(any::<u8>(), 0..24)), 0..10),
        string_data in secret_maps(),
    ) {
        let _ = decode_entries(data, string_data, &SecretKeys::default());
    }

    #[test]
    fn arbitrary_secret_maps_never_panic(data in secret_maps()) {
        let _ = ConnectorSettings::from_map(&data, &SecretKeys::default());
    }

    /// The issue-12 leak: an invalid `BATON_WORKSPACES` value used to be
    /// quoted in the error (and so in status and Events).
    #[test]
    fn secret_decoder_errors_never_echo_values(data in secret_maps()) {
        if let Err(err) = ConnectorSettings::from_map(&data, &SecretKeys::default()) {
            let text = format!("{err} {err:?}");
            prop_assert!(!text.contains(MARK), "{}", text);
        }
    }

    #[test]
    fn workspace_lists_never_panic(text in ".{0,80}") {
        if let Ok(slugs) = parse_workspaces(&text) {
            prop_assert!(slugs.iter().all(|s| !s.is_empty() && !s.contains(',')));
        }
    }
}

/// A YAML alias bomb (each level refers nine times to the one before) must
/// end quickly in an error, not in gigabytes of expansion.
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
    assert!(settings_from_manifest(&doc).is_err(), "an alias bomb is not a Secret");
    assert!(
        clock.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        clock.elapsed()
    );
}
