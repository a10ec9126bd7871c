//! Reading a custom resource's status as the tests see it: plain JSON from the fake API.

use serde_json::Value;

/// The condition of `type_` in `status.conditions`, if present.
pub fn condition<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}
