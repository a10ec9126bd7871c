//! Property tests for the parsers of user- and server-supplied text that
//! live outside the Bitbucket client (whose decoders are fuzzed in its unit
//! tests): durations (`interval`, `duration`), permission levels and
//! resource types, the egress allow-list. Arbitrary input never panics,
//! and what parses means what it says.

use bitbucket_operator::crd::parse_duration;
use bitbucket_operator::egress::{AllowList, EgressPolicy};
use bitbucket_operator::model::{Permission, ResourceType};
use bitbucket_operator::provision::parse_level;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn durations_never_panic(text in ".{0,32}") {
        let _ = parse_duration(&text);
    }

    #[test]
    fn go_durations_parse_to_their_value(h in 0u64..1000, m in 0u64..60, s in 0u64..60) {
        let text = format!("{h}h{m}m{s}s");
        prop_assert_eq!(parse_duration(&text).unwrap().as_secs(), h * 3600 + m * 60 + s);
    }

    #[test]
    fn duration_like_junk_never_panics(text in "[-+0-9.hmsuµn ]{0,24}") {
        if let Ok(d) = parse_duration(&text) {
            prop_assert!(d.as_secs_f64().is_finite());
        }
    }

    #[test]
    fn permission_levels_never_panic_and_round_trip(text in ".{0,24}") {
        match parse_level(&text) {
            Ok(Some(level)) => prop_assert_eq!(parse_level(level.as_str()), Ok(Some(level))),
            Ok(None) => prop_assert!(matches!(text.trim().to_ascii_lowercase().as_str(), "" | "none")),
            Err(message) => prop_assert!(message.contains("unknown permission")),
        }
        if let Some(p) = Permission::parse(&text) {
            prop_assert_eq!(p.as_str(), text.as_str());
        }
        if let Some(t) = ResourceType::parse(&text) {
            prop_assert_eq!(ResourceType::parse(t.as_str()), Some(t));
        }
    }

    #[test]
    fn egress_never_panics_and_refuses_what_it_cannot_name(text in ".{0,64}") {
        let policy = EgressPolicy::default();
        let _ = policy.check_conductorone_host(&text);
        if policy.check_bitbucket_url(&text).is_ok() {
            let url = url::Url::parse(text.trim()).unwrap();
            prop_assert_eq!(url.host_str(), Some("api.bitbucket.org"));
            prop_assert_eq!(url.scheme(), "https");
        }
        let _ = AllowList::parse(&[text.as_str()]);
    }

    #[test]
    fn egress_url_like_inputs(
        scheme in prop::sample::select(vec!["http", "https", "HTTPS", "ftp", ""]),
        user in prop::sample::select(vec!["", "u@", "u:p@", "api.bitbucket.org@"]),
        host in prop::sample::select(vec![
            "api.bitbucket.org", "api.bitbucket.org.", "API.BITBUCKET.ORG", "127.0.0.1", "[::1]",
            "127.0.0.1.evil.com", "evil.com", "0x7f.1", "[::ffff:127.0.0.1]", "localhost",
        ]),
        port in prop::sample::select(vec!["", ":443", ":80", ":7990", ":0", ":99999"]),
        path in prop::sample::select(vec!["", "/", "/2.0", "/../x", "/%2e%2e/", "?q", "#f", "\\@evil.com"]),
    ) {
        let text = format!("{scheme}://{user}{host}{port}{path}");
        let allowed = AllowList::parse(&["https://api.bitbucket.org", "http://127.0.0.1:7990"]).unwrap();
        if let Ok(url) = allowed.check(&text) {
            prop_assert!(user.is_empty(), "{} allowed with user info", text);
            prop_assert!(url.query().is_none() && url.fragment().is_none(), "{}", text);
            match url.scheme() {
                "https" => prop_assert_eq!(url.host_str(), Some("api.bitbucket.org")),
                "http" => {
                    prop_assert_eq!(url.host_str(), Some("127.0.0.1"));
                    prop_assert_eq!(url.port(), Some(7990));
                }
                other => prop_assert!(false, "scheme {} allowed", other),
            }
        }
    }
}
