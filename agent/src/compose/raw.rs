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
use serde_norway::Value;

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
///
/// `observe`, `canary`, `canary_hold` and `hooks` are project-wide. They are
/// kept as YAML here and typed by [`super::rollout`] at the top level
/// ([`RawObserve`], [`RawHooks`], ...); under a service they are refused
/// whatever their value, with a message saying to move them to the top level.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an `x-deploy` mapping (health, drain_timeout, proxy, parallel; at the top level also observe, canary, canary_hold, hooks)"
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
    #[serde(default)]
    pub observe: Option<Value>,
    #[serde(default)]
    pub canary: Option<Value>,
    #[serde(default)]
    pub canary_hold: Option<Value>,
    #[serde(default)]
    pub hooks: Option<Value>,
}

/// The keys of [`RawXDeploy`] that only the top-level `x-deploy` takes.
pub(crate) const TOP_LEVEL_ONLY_KEYS: &[&str] = &["observe", "canary", "canary_hold", "hooks"];

/// `x-deploy.observe`: the observation window after the switch.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an `x-deploy.observe` mapping (window, unhealthy_after, max_error_rate, error_rate_for, min_requests)"
)]
pub(crate) struct RawObserve {
    #[serde(default)]
    pub window: Option<Dur>,
    #[serde(default)]
    pub unhealthy_after: Option<Int>,
    #[serde(default)]
    pub max_error_rate: Option<Rate>,
    #[serde(default)]
    pub error_rate_for: Option<Dur>,
    #[serde(default)]
    pub min_requests: Option<Int>,
}

/// `x-deploy.hooks`.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an `x-deploy.hooks` mapping (pre_deploy, backup, migrate, smoke, post_deploy, pre_rollback, post_rollback)"
)]
pub(crate) struct RawHooks {
    #[serde(default)]
    pub pre_deploy: Option<RawHook>,
    #[serde(default)]
    pub backup: Option<RawHook>,
    #[serde(default)]
    pub migrate: Option<RawHook>,
    #[serde(default)]
    pub smoke: Option<RawSmoke>,
    #[serde(default)]
    pub post_deploy: Option<RawHook>,
    #[serde(default)]
    pub pre_rollback: Option<RawHook>,
    #[serde(default)]
    pub post_rollback: Option<RawHook>,
}

/// One hook: `service` + `command` (a one-off container) or `host` (a host
/// command). Which combinations are valid, and `down` being for `migrate`
/// only, is checked on conversion, where the message can say what to do.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a hook mapping (service and command, or host; timeout, warn_after)"
)]
pub(crate) struct RawHook {
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub command: Option<OneOrMany>,
    #[serde(default)]
    pub host: Option<OneOrMany>,
    #[serde(default)]
    pub down: Option<OneOrMany>,
    #[serde(default)]
    pub timeout: Option<Dur>,
    #[serde(default)]
    pub warn_after: Option<Dur>,
}

/// `x-deploy.hooks.smoke`.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an `x-deploy.hooks.smoke` mapping (service, checks, command)"
)]
pub(crate) struct RawSmoke {
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub checks: Option<Vec<RawSmokeCheck>>,
    #[serde(default)]
    pub command: Option<RawHook>,
}

/// One HTTP smoke check.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a smoke check mapping (path, method, status, body_contains, max_latency)"
)]
pub(crate) struct RawSmokeCheck {
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub status: Option<Int>,
    #[serde(default)]
    pub body_contains: Option<Scalar>,
    #[serde(default)]
    pub max_latency: Option<Dur>,
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

/// A share between 0 and 1, written as a fraction (`0.05`) or a percentage
/// (`"5%"`, `0.5%`), or a string holding either. The range is checked by the
/// caller; `text` is what was written, for messages.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rate {
    pub value: f64,
    pub text: String,
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Rate;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a percentage like `5%` or a fraction like `0.05`")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Rate, E> {
                Ok(Rate {
                    value: v,
                    text: v.to_string(),
                })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Rate, E> {
                // Exact for every rate that can pass the range check (0 or 1).
                let value = v as f64;
                Ok(Rate {
                    value,
                    text: v.to_string(),
                })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Rate, E> {
                let value = v as f64;
                Ok(Rate {
                    value,
                    text: v.to_string(),
                })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Rate, E> {
                parse_rate(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// `5%`, `0.5 %`, `0.05`: a rate as text.
fn parse_rate(text: &str) -> Result<Rate, String> {
    let s = text.trim();
    let (number, scale) = match s.strip_suffix('%') {
        Some(n) => (n.trim_end(), 100.0),
        None => (s, 1.0),
    };
    let is_decimal = !number.is_empty()
        && number.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && number.bytes().filter(|b| *b == b'.').count() <= 1
        && number != ".";
    match number.parse::<f64>() {
        Ok(n) if is_decimal => Ok(Rate {
            value: n / scale,
            text: text.to_string(),
        }),
        _ => Err(format!(
            "`{text}` is not an error rate: write a percentage like `5%` or a fraction like `0.05`"
        )),
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
