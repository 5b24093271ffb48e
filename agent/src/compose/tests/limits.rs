//! Hostile input: the loader refuses it with a clear message, in bounded
//! time, memory and stack.

use super::super::interpolate::{MAX_NESTING, MAX_SUBSTITUTED_BYTES};
use super::{assert_contains, err, err_vars, load_vars, ok};

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
