//! Hostile input: the loader refuses it with a clear message, in bounded
//! time, memory and stack, and never quotes an env file back.

use std::path::Path;

use super::super::budget::{MAX_DEPTH, MAX_TEXT_BYTES};
use super::super::envfile;
use super::super::interpolate::{MAX_NESTING, MAX_SUBSTITUTED_BYTES};
use super::{FILE, assert_contains, err, err_vars, load_in, load_vars, ok, vars};
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

// ---------------------------------------------------------------------------
// env_file
// ---------------------------------------------------------------------------

fn env_file_yaml(path: &str) -> String {
    format!("services:\n  web:\n    image: nginx\n    env_file: {path}\n")
}

fn env_file_err(path: &str, base_dir: &Path) -> String {
    match load_in(&env_file_yaml(path), &[], base_dir) {
        Ok(_) => panic!("{path}: expected an error"),
        Err(e) => {
            assert!(matches!(e, ComposeError::EnvFile { .. }), "{e:?}");
            let msg = e.to_string();
            assert_contains(&msg, &[FILE, "`services.web.env_file`", path]);
            msg
        }
    }
}

#[test]
fn env_file_must_be_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    // /dev/zero was read until memory ran out.
    assert_contains(
        &env_file_err("/dev/zero", dir.path()),
        &["is a device", "regular file"],
    );
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    assert_contains(&env_file_err("sub", dir.path()), &["is a directory"]);
    // A FIFO blocked the load until someone wrote to it.
    nix::unistd::mkfifo(
        &dir.path().join("fifo.env"),
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .unwrap();
    assert_contains(&env_file_err("fifo.env", dir.path()), &["is a FIFO"]);
    // A symlink to a regular file is that file.
    std::fs::write(dir.path().join("real.env"), "A=1\n").unwrap();
    std::os::unix::fs::symlink(dir.path().join("real.env"), dir.path().join("link.env")).unwrap();
    let spec = load_in(&env_file_yaml("link.env"), &[], dir.path()).unwrap();
    assert_eq!(spec.services[0].environment, vars(&[("A", "1")]));
}

#[test]
fn env_file_size_is_limited() {
    let dir = tempfile::tempdir().unwrap();
    let limit = usize::try_from(envfile::MAX_BYTES).unwrap();
    let at_limit = format!("A={}\n", "v".repeat(limit - 3));
    assert_eq!(at_limit.len(), limit);
    std::fs::write(dir.path().join("max.env"), &at_limit).unwrap();
    let spec = load_in(&env_file_yaml("max.env"), &[], dir.path()).unwrap();
    assert_eq!(spec.services[0].environment["A"].len(), limit - 3);

    std::fs::write(dir.path().join("big.env"), format!("{at_limit}B")).unwrap();
    assert_contains(
        &env_file_err("big.env", dir.path()),
        &["larger than 1 MiB", "the limit for an env file"],
    );
}

#[test]
fn env_file_errors_never_quote_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // A file that is not an env file, such as /etc/shadow: its first line
    // was quoted back in the error, which also goes to the audit log.
    std::fs::write(
        dir.path().join("shadow"),
        "root:$y$j9T$SECRETHASH:20228:0:99999:7:::\ndaemon:*:20228:0:99999:7:::\n",
    )
    .unwrap();
    let msg = env_file_err("shadow", dir.path());
    assert_contains(&msg, &["line 1", "has no `=`"]);
    for secret in ["root", "SECRETHASH", "20228", "daemon"] {
        assert!(!msg.contains(secret), "{secret:?} quoted in: {msg}");
    }

    for (text, line) in [
        ("A=1\nSECRET VALUE=2\n", 2),
        ("A=1\nB=\"SECRET\n", 2),
        ("A='x' SECRET\n", 1),
        ("A=1\n\nB=SECRET\0\n", 3),
    ] {
        std::fs::write(dir.path().join("bad.env"), text).unwrap();
        let msg = env_file_err("bad.env", dir.path());
        assert_contains(&msg, &[&format!("line {line}:")]);
        assert!(!msg.contains("SECRET"), "{text:?} quoted in: {msg}");
    }

    std::fs::write(dir.path().join("latin1.env"), b"A=SECRET\nB=caf\xe9\n").unwrap();
    let msg = env_file_err("latin1.env", dir.path());
    assert_contains(&msg, &["not UTF-8 text (line 2)"]);
    assert!(!msg.contains("SECRET"), "{msg}");
}

#[test]
fn env_file_values_are_not_variables_and_stay_out_of_messages() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("app.env"),
        "TAG=SECRET-TAG\nPASSWORD=SECRET\n",
    )
    .unwrap();
    // `${TAG}` is not taken from the env file, and the message about it
    // says nothing of what the env file holds.
    let e = load_in(
        "services:\n  web:\n    image: \"app:${TAG}\"\n    env_file: app.env\n",
        &[],
        dir.path(),
    )
    .unwrap_err();
    assert!(matches!(e, ComposeError::UnsetVariable { .. }), "{e:?}");
    assert!(!e.to_string().contains("SECRET"), "{e}");
    // An error later in the same service does not quote it either.
    let e = load_in(
        "services:\n  web:\n    image: nginx\n    env_file: app.env\n    environment: [PASSWORD]\n",
        &[],
        dir.path(),
    )
    .unwrap_err();
    assert_contains(&e.to_string(), &["`PASSWORD` has no value"]);
    assert!(!e.to_string().contains("SECRET"), "{e}");
}

#[test]
fn env_file_may_be_outside_the_compose_directory() {
    // As in compose: a deployer can bind-mount any host path anyway.
    let shared = tempfile::tempdir().unwrap();
    std::fs::write(shared.path().join("shared.env"), "SHARED=1\n").unwrap();
    let project = tempfile::tempdir_in(shared.path()).unwrap();
    let absolute = shared.path().join("shared.env");
    for path in ["../shared.env".to_string(), absolute.display().to_string()] {
        let spec = load_in(&env_file_yaml(&path), &[], project.path()).unwrap();
        assert_eq!(spec.services[0].environment, vars(&[("SHARED", "1")]));
    }
}
