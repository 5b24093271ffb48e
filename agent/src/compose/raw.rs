//! The compose file as written (after interpolation), in strict serde types.
//!
//! Every struct denies unknown fields: a key we do not support must be an
//! error naming it, never silently ignored, because an ignored `privileged`
//! or `mem_limit` would deploy something other than what the user reviewed.
//! Extension keys (`x-...`) other than our `x-deploy` are removed from the
//! tree before these types see it (see [`super::tree`]).
//!
//! These types only check shape. Meaning (port syntax, ranges, references
//! between sections) is checked when converting to the spec, where the error
//! can say more than serde's generic "invalid value".

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::duration::{DURATION_FORMS, duration_from_float_seconds, parse_duration};
use crate::spec::ProxyMode;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with `services`")]
pub(crate) struct RawFile {
    /// Obsolete in compose; accepted and ignored.
    #[serde(rename = "version", default)]
    pub _version: Option<IgnoredAny>,
    /// The project name comes from the request, not the file.
    #[serde(rename = "name", default)]
    pub _name: Option<IgnoredAny>,
    #[serde(default)]
    pub services: Option<OrderedMap<RawService>>,
    #[serde(default)]
    pub networks: Option<OrderedMap<Option<RawNetwork>>>,
    #[serde(default)]
    pub volumes: Option<OrderedMap<Option<RawVolume>>>,
    #[serde(rename = "x-deploy", default)]
    pub x_deploy: Option<RawXDeploy>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a service: a mapping with at least `image`"
)]
pub(crate) struct RawService {
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub command: Option<OneOrMany>,
    #[serde(default)]
    pub entrypoint: Option<OneOrMany>,
    #[serde(default)]
    pub environment: Option<ListOrMap<Option<Scalar>>>,
    #[serde(default)]
    pub env_file: Option<OneOrMany>,
    #[serde(default)]
    pub ports: Option<Vec<StrOrMap<RawPort>>>,
    #[serde(default)]
    pub volumes: Option<Vec<StrOrMap<RawMount>>>,
    #[serde(default)]
    pub networks: Option<ListOrMap<Option<RawServiceNetwork>>>,
    #[serde(default)]
    pub labels: Option<ListOrMap<Option<Scalar>>>,
    #[serde(default)]
    pub healthcheck: Option<RawHealthcheck>,
    #[serde(default)]
    pub depends_on: Option<ListOrMap<Option<RawDependsOn>>>,
    #[serde(default)]
    pub restart: Option<String>,
    #[serde(default)]
    pub user: Option<Scalar>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub deploy: Option<RawDeploy>,
    #[serde(default)]
    pub stop_grace_period: Option<Dur>,
    #[serde(rename = "x-deploy", default)]
    pub x_deploy: Option<RawXDeploy>,
}

/// Long port syntax.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a port: `\"8080:80\"` or a mapping with `target` and `published`"
)]
pub(crate) struct RawPort {
    #[serde(default)]
    pub target: Option<Int>,
    #[serde(default)]
    pub published: Option<Scalar>,
    #[serde(default)]
    pub host_ip: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
}

/// Long volume syntax.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a volume: `\"name:/path\"` or a mapping with `type`, `source` and `target`"
)]
pub(crate) struct RawMount {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub read_only: Option<Flag>,
}

/// `networks: {front: {}}` under a service: no per-network options
/// (aliases, addresses) are supported, so the mapping must be empty.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an empty mapping or null")]
pub(crate) struct RawServiceNetwork {}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a healthcheck mapping (test, interval, timeout, retries, start_period, disable)"
)]
pub(crate) struct RawHealthcheck {
    #[serde(default)]
    pub test: Option<OneOrMany>,
    #[serde(default)]
    pub interval: Option<Dur>,
    #[serde(default)]
    pub timeout: Option<Dur>,
    #[serde(default)]
    pub retries: Option<Int>,
    #[serde(default)]
    pub start_period: Option<Dur>,
    #[serde(default)]
    pub disable: Option<Flag>,
}

/// Long `depends_on` syntax. The condition does not change what we do
/// (services are started in dependency order and each is health-gated
/// anyway) but a misspelt condition is still an error.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a dependency mapping (condition, required)"
)]
pub(crate) struct RawDependsOn {
    #[serde(rename = "condition", default)]
    pub _condition: Option<Condition>,
    #[serde(rename = "required", default)]
    pub _required: Option<Flag>,
}

#[derive(Debug, Deserialize)]
pub(crate) enum Condition {
    #[serde(rename = "service_started")]
    Started,
    #[serde(rename = "service_healthy")]
    Healthy,
    #[serde(rename = "service_completed_successfully")]
    CompletedSuccessfully,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with `replicas`")]
pub(crate) struct RawDeploy {
    #[serde(default)]
    pub replicas: Option<Int>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a network: null or a mapping with `external` (and `name`)"
)]
pub(crate) struct RawNetwork {
    #[serde(default)]
    pub external: Option<Flag>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a volume: null or a mapping with `external`"
)]
pub(crate) struct RawVolume {
    #[serde(default)]
    pub external: Option<Flag>,
}

/// `x-deploy`, at the top level (defaults) or under a service.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an `x-deploy` mapping (health, drain_timeout, proxy, parallel)"
)]
pub(crate) struct RawXDeploy {
    #[serde(default)]
    pub health: Option<RawHealth>,
    #[serde(default)]
    pub drain_timeout: Option<Dur>,
    #[serde(default)]
    pub proxy: Option<ProxyMode>,
    #[serde(default)]
    pub parallel: Option<Int>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an `x-deploy.health` mapping (http, tcp, exec or docker, and timings)"
)]
pub(crate) struct RawHealth {
    #[serde(default)]
    pub http: Option<String>,
    #[serde(default)]
    pub tcp: Option<Int>,
    #[serde(default)]
    pub exec: Option<OneOrMany>,
    #[serde(default)]
    pub docker: Option<Flag>,
    #[serde(default)]
    pub port: Option<Int>,
    #[serde(default)]
    pub interval: Option<Dur>,
    #[serde(default)]
    pub timeout: Option<Dur>,
    #[serde(default)]
    pub healthy_after: Option<Int>,
    #[serde(default)]
    pub unhealthy_after: Option<Int>,
    #[serde(default)]
    pub start_period: Option<Dur>,
    #[serde(default)]
    pub deadline: Option<Dur>,
}

// ---------------------------------------------------------------------------
// Scalar helpers. Interpolation turns `published: ${PORT}` into a string, so
// every number and boolean also accepts its string spelling, as compose does.
// ---------------------------------------------------------------------------

/// A scalar written back as text: strings as is, numbers and booleans in
/// their YAML spelling (`environment: {DEBUG: true}` gives `DEBUG=true`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A non-negative whole number, or a string holding one. Ranges are checked
/// by the caller, which knows what the number is for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Int(pub u64);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Int;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Int, E> {
                Ok(Int(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Int, E> {
                u64::try_from(v).map(Int).map_err(|_| {
                    E::custom(format!(
                        "`{v}` is negative: give a whole number of at least 0"
                    ))
                })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Int, E> {
                v.trim().parse().map(Int).map_err(|_| {
                    E::custom(format!(
                        "`{v}` is not a whole number: give digits only, like `3`"
                    ))
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// A boolean, or the string `true` / `false`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Flag(pub bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Flag;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`true` or `false`")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Flag, E> {
                Ok(Flag(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Flag, E> {
                match v.trim() {
                    "true" | "True" | "TRUE" => Ok(Flag(true)),
                    "false" | "False" | "FALSE" => Ok(Flag(false)),
                    _ => Err(E::custom(format!(
                        "`{v}` is not a boolean: write `true` or `false`"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration: a Go-style string (`1m30s`) or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration like `10s` or `1m30s`, or a number of seconds")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                Ok(Dur(Duration::from_secs(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                u64::try_from(v)
                    .map(|s| Dur(Duration::from_secs(s)))
                    .map_err(|_| {
                        E::custom(format!(
                            "invalid duration: `{v}` is negative; {DURATION_FORMS}"
                        ))
                    })
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Dur, E> {
                duration_from_float_seconds(v)
                    .map(Dur)
                    .map_err(|r| E::custom(format!("invalid duration: {r}; {DURATION_FORMS}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v)
                    .map(Dur)
                    .map_err(|r| E::custom(format!("invalid duration: {r}; {DURATION_FORMS}")))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------
// Shape helpers for compose's "this or that" syntaxes. Hand-written visitors
// rather than `#[serde(untagged)]`: untagged enums replace every inner error
// with "did not match any variant" and lose the key path, so an unknown key
// inside a long-syntax port would no longer be named.
// ---------------------------------------------------------------------------

/// A string, or a list of scalars (`command`, `entrypoint`, `env_file`,
/// `healthcheck.test`, `x-deploy.health.exec`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany::One(v.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut items = Vec::new();
                while let Some(Scalar(s)) = seq.next_element()? {
                    items.push(s);
                }
                Ok(OneOrMany::Many(items))
            }
        }
        d.deserialize_any(V)
    }
}

/// A list of strings, or a mapping from name to `T`, in file order
/// (`environment`, `labels`, service `networks`, `depends_on`).
#[derive(Debug)]
pub(crate) enum ListOrMap<T> {
    List(Vec<String>),
    Map(Vec<(String, T)>),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ListOrMap<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = ListOrMap<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list or a mapping")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(Scalar(s)) = seq.next_element()? {
                    items.push(s);
                }
                Ok(ListOrMap::List(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                Ok(ListOrMap::Map(read_map(map)?))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// A short-syntax string (or number), or a long-syntax mapping
/// (`ports` and `volumes` entries).
#[derive(Debug)]
pub(crate) enum StrOrMap<T> {
    Str(String),
    Map(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for StrOrMap<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = StrOrMap<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a mapping")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(StrOrMap::Str(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(StrOrMap::Str(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(StrOrMap::Str(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(StrOrMap::Map)
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// A mapping from name to `T` that keeps file order, which matters: services
/// independent of each other start in the order written.
#[derive(Debug)]
pub(crate) struct OrderedMap<T>(pub Vec<(String, T)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OrderedMap<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = OrderedMap<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping from names to definitions")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                read_map(map).map(OrderedMap)
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

fn read_map<'de, A: MapAccess<'de>, T: Deserialize<'de>>(
    mut map: A,
) -> Result<Vec<(String, T)>, A::Error> {
    let mut entries = Vec::new();
    while let Some(key) = map.next_key::<String>()? {
        let value = map.next_value::<T>()?;
        entries.push((key, value));
    }
    Ok(entries)
}
