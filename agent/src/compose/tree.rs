//! Checks and clean-up on the raw YAML tree before typed deserialization.

use serde_norway::Value;

use super::interpolate::key_text;
use super::path::KeyPath;

/// What is wrong with the tree, and where.
#[derive(Debug)]
pub(crate) enum TreeError {
    /// A YAML tag (`!reset`, `!override`, ...) that we do not interpret.
    Tag { path: KeyPath, tag: String },
    /// A mapping key that is not a string (`80: ...`, `true: ...`).
    NonStringKey { path: KeyPath, key: String },
}

/// Rejects tags and non-string keys anywhere, and removes extension keys
/// (`x-...`, except our own `x-deploy`) from the mappings whose keys are
/// compose keywords.
///
/// Extensions are removed only where compose defines keywords (the top level,
/// a service, a network, a long-syntax port, ...), not from mappings of user
/// data such as `environment` or `labels`, where `x-request-id: 1` is a real
/// entry that must be kept.
pub(crate) fn prepare(value: &mut Value, path: &mut KeyPath) -> Result<(), TreeError> {
    match value {
        Value::Tagged(tagged) => Err(TreeError::Tag {
            path: path.clone(),
            tag: tagged.tag.to_string(),
        }),
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.push_index(i);
                let r = prepare(item, path);
                path.pop();
                r?;
            }
            Ok(())
        }
        Value::Mapping(map) => {
            if let Some(bad) = map.keys().find(|k| !k.is_string()) {
                return Err(TreeError::NonStringKey {
                    path: path.clone(),
                    key: key_text(bad),
                });
            }
            if is_keyword_mapping(&path.keys()) {
                map.retain(|k, _| !k.as_str().is_some_and(is_ignored_extension));
            }
            for (k, v) in map.iter_mut() {
                path.push_key(&key_text(k));
                let r = prepare(v, path);
                path.pop();
                r?;
            }
            Ok(())
        }
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => Ok(()),
    }
}

fn is_ignored_extension(key: &str) -> bool {
    key.starts_with("x-") && key != "x-deploy"
}

/// Whether the mapping at this position (names and indexes generalized to
/// `_`) has compose keywords as keys.
fn is_keyword_mapping(keys: &[&str]) -> bool {
    matches!(
        keys,
        [] | ["x-deploy"]
            | ["x-deploy", "health" | "observe" | "hooks"]
            | ["x-deploy", "hooks", _]
            | ["x-deploy", "hooks", "smoke", "command"]
            | ["x-deploy", "hooks", "smoke", "checks", "[]"]
            | ["services", _]
            | ["services", _, "deploy" | "healthcheck" | "x-deploy"]
            | ["services", _, "x-deploy", "health"]
            | ["services", _, "ports" | "volumes", "[]"]
            | ["services", _, "networks" | "depends_on", _]
            | ["networks" | "volumes", _]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(yaml: &str) -> Result<Value, TreeError> {
        let mut v: Value = serde_norway::from_str(yaml).unwrap();
        prepare(&mut v, &mut KeyPath::root())?;
        Ok(v)
    }

    #[test]
    fn strips_extensions_in_keyword_mappings_only() {
        let v = prepared(
            "x-common: &c {a: 1}\nx-deploy: {}\nservices:\n  web:\n    x-note: hi\n    x-deploy: {x-mine: 1}\n    labels: {x-keep: v}\n    environment: {x-keep: v}\n",
        )
        .unwrap();
        let expected: Value = serde_norway::from_str(
            "x-deploy: {}\nservices:\n  web:\n    x-deploy: {}\n    labels: {x-keep: v}\n    environment: {x-keep: v}\n",
        )
        .unwrap();
        assert_eq!(v, expected);
    }

    #[test]
    fn rejects_tags() {
        let err = prepared("services:\n  web:\n    ports: !reset []\n").unwrap_err();
        assert!(
            matches!(&err, TreeError::Tag { path, tag } if path.to_string() == "services.web.ports" && tag == "!reset"),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_non_string_keys() {
        let err = prepared("services:\n  web:\n    labels: {1: a}\n").unwrap_err();
        assert!(
            matches!(&err, TreeError::NonStringKey { path, key } if path.to_string() == "services.web.labels" && key == "1"),
            "{err:?}"
        );
    }
}
