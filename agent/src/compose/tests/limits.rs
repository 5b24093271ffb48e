//! Hostile input: the loader refuses it with a clear message, in bounded
//! time, memory and stack.

use super::super::budget::{MAX_DEPTH, MAX_TEXT_BYTES};
use super::super::interpolate::{MAX_NESTING, MAX_SUBSTITUTED_BYTES};
use super::{FILE, assert_contains, err, err_vars, load_vars, ok};
use crate::compose::ComposeError;

/// `image: "${A:-${A:-...x...}}"`, `depth` levels deep.
fn nested_image(depth: usize) -> String {
    format!(
        "services:\n  web:\n    image: \"{}x{}\"\n",
        "${A:-".repeat(depth),
        "}".repeat(depth)
    )
}

#[test]
fn deeply_nested_interpolation_is_refused() {
    // 5000 levels overflowed the stack; each level is a recursion.
    let msg = err(&nested_image(5000));
    assert_contains(
        &msg,
        &[
            "`services.web.image`",
            "nested 5000 levels deep",
            &format!("limit of {MAX_NESTING} levels"),
        ],
    );
    // Refused even where the nested default would not be used.
    let msg = err_vars(&nested_image(5000), &[("A", "set")]);
    assert_contains(&msg, &["`services.web.image`", "nested 5000 levels deep"]);
    // Inside a `:?` message and an alternative as well.
    for yaml in [
        format!(
            "services:\n  web:\n    image: \"${{B:?{}x{}}}\"\n",
            "${A:-".repeat(MAX_NESTING),
            "}".repeat(MAX_NESTING)
        ),
        format!(
            "services:\n  web:\n    image: \"${{B:+{}x{}}}\"\n",
            "${A:-".repeat(MAX_NESTING),
            "}".repeat(MAX_NESTING)
        ),
    ] {
        let msg = err_vars(&yaml, &[("B", "b")]);
        assert_contains(
            &msg,
            &[
                "`services.web.image`",
                &format!("nested {} levels deep", MAX_NESTING + 1),
            ],
        );
    }
}

#[test]
fn interpolation_nested_up_to_the_limit_works() {
    let spec = ok(&nested_image(MAX_NESTING));
    assert_eq!(spec.services[0].image, "x");
    let msg = err(&nested_image(MAX_NESTING + 1));
    assert_contains(&msg, &[&format!("nested {} levels deep", MAX_NESTING + 1)]);
}

#[test]
fn substituted_values_are_bounded() {
    // 17 uses of a 1 MiB `--var`: 17 MiB from 34 bytes of compose text.
    let value = "v".repeat(1 << 20);
    let yaml = format!(
        "services:\n  web:\n    image: nginx\n    labels:\n      big: \"{}\"\n",
        "$A".repeat(17)
    );
    let msg = err_vars(&yaml, &[("A", &value)]);
    assert_contains(
        &msg,
        &[
            "`services.web.labels.big`",
            &format!("more than {} MiB", MAX_SUBSTITUTED_BYTES >> 20),
            "--var",
        ],
    );
    assert!(msg.len() < 1000, "the message quotes too much: {msg}");
    // Below the budget it is substituted as usual.
    let yaml = format!(
        "services:\n  web:\n    image: nginx\n    labels:\n      big: \"{}\"\n",
        "${A}".repeat(15)
    );
    let spec = load_vars(&yaml, &[("A", &value)]).unwrap();
    assert_eq!(spec.services[0].labels["big"].len(), 15 << 20);
}

#[test]
fn long_interpolation_errors_quote_an_excerpt() {
    let long = "y".repeat(100_000);
    let msg = err(&format!("services:\n  web:\n    image: \"${{A:-{long}\"\n"));
    assert_contains(&msg, &["`services.web.image`", "no closing", "…"]);
    assert!(msg.len() < 1000, "{} bytes", msg.len());
}

/// The nested-sequence `command` of a service, `levels` sequences deep
/// (the top-level mapping, `services` and `web` are 3 more levels).
fn nested_command(levels: usize) -> String {
    format!(
        "services:\n  web:\n    image: nginx\n    command: {}\"$$x\"{}\n",
        "[".repeat(levels),
        "]".repeat(levels)
    )
}

#[test]
fn deeply_nested_yaml_is_refused() {
    // serde_norway stops at 128 levels by itself; the loader's own limit
    // is lower, says so, and is met before any tree is built.
    for levels in [MAX_DEPTH, 200, 100_000] {
        let e = load_vars(&nested_command(levels), &[]).unwrap_err();
        assert!(
            matches!(e, ComposeError::TooDeep { line: 4, .. }),
            "{levels}: {e:?}"
        );
        assert_contains(
            &e.to_string(),
            &[
                FILE,
                "line 4",
                &format!("nested more than {MAX_DEPTH} levels deep"),
            ],
        );
    }
    // Block style, by indentation.
    let mut yaml = "services:\n  web:\n    image: nginx\n    labels:\n".to_string();
    for level in 0..MAX_DEPTH {
        yaml.push_str(&format!("{}a:\n", " ".repeat(6 + level)));
    }
    let e = load_vars(&yaml, &[]).unwrap_err();
    assert!(matches!(e, ComposeError::TooDeep { .. }), "{e:?}");
}

#[test]
fn yaml_nested_up_to_the_limit_is_walked_safely() {
    // At the limit, every walk over the tree (tags, interpolation, typed
    // deserialization) goes all the way down; `command` then has the
    // wrong type, which is the only error.
    let msg = err(&nested_command(MAX_DEPTH - 3));
    assert_contains(&msg, &["`services.web.command[0]`", "invalid type"]);
    let e = load_vars(&nested_command(MAX_DEPTH - 2), &[]).unwrap_err();
    assert!(matches!(e, ComposeError::TooDeep { .. }), "{e:?}");
}

/// A 6.6 KB file: an anchor of 1,000 strings aliased 9 times, that 9
/// times, that 9 times, then 100 times: 72.9 million strings once
/// expanded, well over 4 GB as a tree.
fn amplification_file() -> String {
    let strings: Vec<String> = (0..1000).map(|i| format!("s{i}")).collect();
    let mut yaml = format!("x-a: &a [{}]\n", strings.join(","));
    for (name, from, times) in [("b", "a", 9), ("c", "b", 9), ("d", "c", 9)] {
        yaml.push_str(&format!(
            "x-{name}: &{name} [{}]\n",
            vec![format!("*{from}"); times].join(",")
        ));
    }
    yaml.push_str(&format!("x-e: [{}]\n", vec!["*d"; 100].join(",")));
    yaml.push_str("services:\n  web:\n    image: nginx\n");
    yaml
}

#[test]
fn alias_amplification_is_refused_before_expanding() {
    let yaml = amplification_file();
    assert!(yaml.len() < 7_000, "{} bytes", yaml.len());
    let e = load_vars(&yaml, &[]).unwrap_err();
    assert!(matches!(e, ComposeError::AliasExpansion { .. }), "{e:?}");
    assert_contains(
        &e.to_string(),
        &[
            FILE,
            "expands to more than 1000000 nodes",
            "YAML aliases (anchors `&x` used as `*x`)",
        ],
    );
}

#[test]
fn aliased_long_strings_are_refused() {
    let long = "x".repeat(1 << 20);
    let mut yaml = format!("x-a: &a \"{long}\"\nx-b: [");
    yaml.push_str(&vec!["*a"; 20].join(","));
    yaml.push_str("]\nservices:\n  web:\n    image: nginx\n");
    let e = load_vars(&yaml, &[]).unwrap_err();
    assert!(matches!(e, ComposeError::AliasExpansion { .. }), "{e:?}");
    assert_contains(&e.to_string(), &["more than 16 MiB of text", "aliases"]);
}

#[test]
fn billion_laughs_is_refused() {
    let mut yaml =
        "x-a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n"
            .to_string();
    let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
    for pair in names.windows(2) {
        let (from, name) = (pair[0], pair[1]);
        yaml.push_str(&format!(
            "x-{name}: &{name} [{}]\n",
            vec![format!("*{from}"); 9].join(",")
        ));
    }
    yaml.push_str("services:\n  web:\n    image: nginx\n");
    let e = load_vars(&yaml, &[]).unwrap_err();
    assert!(matches!(e, ComposeError::AliasExpansion { .. }), "{e:?}");
    assert_contains(&e.to_string(), &[FILE, "YAML aliases"]);
}

#[test]
fn recursive_alias_is_refused() {
    let e = load_vars(
        "x-loop: &loop [a, *loop]\nservices:\n  web:\n    image: nginx\n",
        &[],
    )
    .unwrap_err();
    assert!(matches!(e, ComposeError::RecursiveAlias { .. }), "{e:?}");
    assert_contains(&e.to_string(), &[FILE, "line 1", "`*loop`", "`&loop`"]);
}

#[test]
fn ordinary_anchors_and_merge_keys_still_work() {
    let yaml = "x-common: &common\n  image: nginx\n  labels: &labels {team: web}\n  restart: always\nservices:\n  web:\n    <<: *common\n  api:\n    <<: *common\n    labels: *labels\n  worker:\n    <<: *common\n    image: worker\n";
    let spec = ok(yaml);
    assert_eq!(spec.services.len(), 3);
    for s in &spec.services {
        assert_eq!(s.labels["team"], "web", "{}", s.name);
    }
}

#[test]
fn compose_text_size_is_limited() {
    let head = "services:\n  web:\n    image: nginx\n";
    let pad = |total: usize| {
        let mut text = head.to_string();
        while text.len() + 8 <= total {
            text.push_str("#######\n");
        }
        text.push_str(&"\n".repeat(total - text.len()));
        text
    };
    let at_limit = pad(MAX_TEXT_BYTES);
    assert_eq!(at_limit.len(), MAX_TEXT_BYTES);
    ok(&at_limit);
    let over = pad(MAX_TEXT_BYTES + 1);
    let e = load_vars(&over, &[]).unwrap_err();
    assert!(matches!(e, ComposeError::TooLarge { .. }), "{e:?}");
    assert_contains(
        &e.to_string(),
        &[FILE, &format!("{} bytes", MAX_TEXT_BYTES + 1), "4 MiB"],
    );
}
