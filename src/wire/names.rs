//! The names the API's enums go by where protobuf does not speak: the
//! operator CLI's flags and output, traces, logs and metrics. Modes are the
//! domain's words (`platform_managed`), sources the proto names without
//! their prefix (`DERIVED_PROVIDER`), origins the proto names in lower case
//! without their prefix (`workspace`). `None` is an unspecified or unknown
//! number; each caller says how it shows one.

use crate::{
    domain::{Mode, Origin},
    proto,
};

use super::convert;

/// `platform_managed`, `byok` or `disabled`.
pub fn mode_name(v: i32) -> Option<&'static str> {
    proto::Mode::try_from(v)
        .ok()
        .and_then(convert::mode_from_proto)
        .map(Mode::as_str)
}

/// `OVERRIDE`, `DERIVED_PROVIDER` or `DEFAULT`.
pub fn source_name(v: i32) -> Option<&'static str> {
    proto::Source::try_from(v)
        .ok()
        .and_then(convert::source_from_proto)
        .map(convert::source_name)
}

/// `workspace`, `global`, `platform` or `authority`.
pub fn origin_name(v: i32) -> Option<&'static str> {
    convert::origin_from_wire(v).map(|o| match o {
        Origin::Workspace => "workspace",
        Origin::Global => "global",
        Origin::Platform => "platform",
        Origin::Authority => "authority",
    })
}

/// A mode by its name, exactly as [`mode_name`] writes it.
pub fn parse_mode(s: &str) -> Option<proto::Mode> {
    s.parse::<Mode>().ok().map(convert::mode_to_wire)
}

/// A source by its name, in any case (`derived_provider`).
pub fn parse_source(s: &str) -> Option<proto::Source> {
    match proto::Source::from_str_name(&format!("SOURCE_{}", s.to_ascii_uppercase())) {
        Some(proto::Source::Unspecified) | None => None,
        Some(s) => Some(s),
    }
}

/// A candidate env entry's origin by its name, in any case, also as the
/// proto's enum value name (`ORIGIN_WORKSPACE`, as `--json` and grpcurl
/// write it); the authority's own origin is not one a caller may give.
pub fn parse_origin(s: &str) -> Option<proto::Origin> {
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("ORIGIN_").unwrap_or(&upper);
    match proto::Origin::from_str_name(&format!("ORIGIN_{name}")) {
        Some(proto::Origin::Unspecified | proto::Origin::Authority) | None => None,
        Some(o) => Some(o),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_parses_back_to_its_value() {
        for m in [
            proto::Mode::PlatformManaged,
            proto::Mode::Byok,
            proto::Mode::Disabled,
        ] {
            let name = mode_name(m.into()).expect("a mode has a name");
            assert_eq!(parse_mode(name), Some(m), "{name}");
        }
        assert_eq!(mode_name(proto::Mode::Unspecified.into()), None);
        assert_eq!(parse_mode("BYOK"), None, "modes are exact");
        for (s, name) in [
            (proto::Source::Override, "OVERRIDE"),
            (proto::Source::DerivedProvider, "DERIVED_PROVIDER"),
            (proto::Source::Default, "DEFAULT"),
        ] {
            assert_eq!(source_name(s.into()), Some(name));
            assert_eq!(parse_source(&name.to_ascii_lowercase()), Some(s));
        }
        assert_eq!(parse_source("unspecified"), None);
        for (o, name) in [
            (proto::Origin::Workspace, "workspace"),
            (proto::Origin::Global, "global"),
            (proto::Origin::Platform, "platform"),
        ] {
            assert_eq!(origin_name(o.into()), Some(name));
            assert_eq!(parse_origin(&name.to_ascii_uppercase()), Some(o));
        }
        assert_eq!(
            origin_name(proto::Origin::Authority.into()),
            Some("authority")
        );
        assert_eq!(parse_origin("authority"), None);
        assert_eq!(parse_origin("ORIGIN_AUTHORITY"), None);
        assert_eq!(parse_origin("ORIGIN_UNSPECIFIED"), None);
        assert_eq!(
            parse_origin("ORIGIN_WORKSPACE"),
            Some(proto::Origin::Workspace)
        );
        assert_eq!(
            parse_origin("origin_platform"),
            Some(proto::Origin::Platform)
        );
        assert_eq!(parse_origin("ORIGIN_ORIGIN_GLOBAL"), None);
        assert_eq!(origin_name(99), None);
    }
}
