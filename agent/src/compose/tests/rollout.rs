//! `observe`, `canary`, `canary_hold` and `hooks` under the top-level
//! `x-deploy` → `ProjectSpec.rollout`.

use std::time::Duration;

use super::{FILE, assert_contains, err, err_vars, load_vars, ok, secs, unsupported};
use crate::spec::{
    Hook, HookRun, Hooks, ObserveSettings, ProjectSpec, RolloutSettings, Smoke, SmokeCheck,
};

fn mins(n: u64) -> Duration {
    Duration::from_secs(n * 60)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Two services, `web` with ports and `worker` without, after `x_deploy`
/// (the lines of a top-level `x-deploy`, indented by two spaces).
fn with_x_deploy(x_deploy: &str) -> String {
    format!(
        "x-deploy:\n{x_deploy}\nservices:\n  web:\n    image: web\n    ports: ['8080:80']\n  worker:\n    image: worker\n"
    )
}

fn rollout(x_deploy: &str) -> RolloutSettings {
    ok(&with_x_deploy(x_deploy)).rollout
}

fn rollout_err(x_deploy: &str) -> String {
    err(&with_x_deploy(x_deploy))
}

fn hooks(x_deploy: &str) -> Hooks {
    rollout(x_deploy).hooks
}

fn default_observe() -> ObserveSettings {
    ObserveSettings {
        window: mins(5),
        unhealthy_after: 3,
        max_error_rate: 0.05,
        error_rate_for: mins(2),
        min_requests: 20,
    }
}

fn container(service: &str, command: &[&str]) -> HookRun {
    HookRun::Container {
        service: service.to_string(),
        command: strings(command),
    }
}

// ---------------------------------------------------------------------------
// Every key
// ---------------------------------------------------------------------------

const FULL: &str = r#"
x-deploy:
  drain_timeout: 10s
  observe:
    window: 10m
    unhealthy_after: 5
    max_error_rate: 2.5%
    error_rate_for: 90s
    min_requests: 50
  canary: [5, 25, 100]
  canary_hold: 1m
  hooks:
    pre_deploy:
      service: web
      command: ["sh", "-c", "echo pre"]
      timeout: 2m
      warn_after: 30s
    backup:
      host: /usr/local/bin/backup.sh --db "shop main"
      timeout: 30m
    migrate:
      service: worker
      command: ./manage migrate
      down: ["./manage", "migrate", "--down"]
      timeout: 20m
      warn_after: 10m
    smoke:
      service: api
      checks:
        - path: /health
        - path: /api/items
          method: post
          status: 201
          body_contains: ok
          max_latency: 500ms
      command:
        service: worker
        command: ["./smoke"]
        timeout: 2m
    post_deploy:
      host: ["/usr/local/bin/notify", "deployed ${RELEASE}"]
    pre_rollback:
      service: worker
      command: ./manage freeze
    post_rollback:
      host: /usr/local/bin/notify rolled-back
      warn_after: 1m
services:
  web:
    image: web
    ports: ["8080:80"]
  api:
    image: api
    ports: ["8081:80"]
    depends_on: [worker]
  worker:
    image: worker
"#;

fn full_expected() -> RolloutSettings {
    RolloutSettings {
        observe: Some(ObserveSettings {
            window: mins(10),
            unhealthy_after: 5,
            max_error_rate: 0.025,
            error_rate_for: secs(90),
            min_requests: 50,
        }),
        canary: vec![5, 25, 100],
        canary_hold: mins(1),
        hooks: Hooks {
            pre_deploy: Some(Hook {
                run: container("web", &["sh", "-c", "echo pre"]),
                timeout: mins(2),
                warn_after: Some(secs(30)),
                down: None,
            }),
            backup: Some(Hook {
                run: HookRun::Host {
                    command: strings(&["/usr/local/bin/backup.sh", "--db", "shop main"]),
                },
                timeout: mins(30),
                warn_after: None,
                down: None,
            }),
            migrate: Some(Hook {
                run: container("worker", &["./manage", "migrate"]),
                timeout: mins(20),
                warn_after: Some(mins(10)),
                down: Some(strings(&["./manage", "migrate", "--down"])),
            }),
            smoke: Some(Smoke {
                service: "api".to_string(),
                checks: vec![
                    SmokeCheck {
                        method: "GET".to_string(),
                        path: "/health".to_string(),
                        status: 200,
                        body_contains: None,
                        max_latency: None,
                    },
                    SmokeCheck {
                        method: "POST".to_string(),
                        path: "/api/items".to_string(),
                        status: 201,
                        body_contains: Some("ok".to_string()),
                        max_latency: Some(ms(500)),
                    },
                ],
                command: Some(Hook {
                    run: container("worker", &["./smoke"]),
                    timeout: mins(2),
                    warn_after: None,
                    down: None,
                }),
            }),
            post_deploy: Some(Hook {
                run: HookRun::Host {
                    command: strings(&["/usr/local/bin/notify", "deployed 3f2a9c1"]),
                },
                timeout: mins(10),
                warn_after: None,
                down: None,
            }),
            pre_rollback: Some(Hook {
                run: container("worker", &["./manage", "freeze"]),
                timeout: mins(10),
                warn_after: None,
                down: None,
            }),
            post_rollback: Some(Hook {
                run: HookRun::Host {
                    command: strings(&["/usr/local/bin/notify", "rolled-back"]),
                },
                timeout: mins(10),
                warn_after: Some(mins(1)),
                down: None,
            }),
        },
    }
}

#[test]
fn every_rollout_key() {
    let spec = ok(FULL);
    assert_eq!(spec.rollout, full_expected());
    // The service-level defaults of the same `x-deploy` still apply.
    assert!(
        spec.services
            .iter()
            .all(|s| s.deploy.drain_timeout == secs(10))
    );
}

#[test]
fn spec_with_rollout_round_trips_through_json() {
    let spec = ok(FULL);
    let json = serde_json::to_string(&spec).unwrap();
    let back: ProjectSpec = serde_json::from_str(&json).unwrap();
    assert_eq!(back, spec);

    // A snapshot written before these settings existed still reads, with
    // the defaults.
    let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
    value.as_object_mut().unwrap().remove("rollout");
    let old: ProjectSpec = serde_json::from_value(value).unwrap();
    assert_eq!(old.rollout.observe, None);
    assert!(old.rollout.canary.is_empty());
    assert_eq!(old.rollout.hooks, Hooks::default());
}

// ---------------------------------------------------------------------------
// Defaults
// ---------------------------------------------------------------------------

#[test]
fn no_rollout_keys_gives_the_defaults() {
    let expected = RolloutSettings {
        observe: None,
        canary: Vec::new(),
        canary_hold: secs(30),
        hooks: Hooks::default(),
    };
    let without = ok("services:\n  web:\n    image: web\n");
    assert_eq!(without.rollout, expected);
    let with_other_keys = ok("x-deploy: {drain_timeout: 5s}\nservices:\n  web:\n    image: web\n");
    assert_eq!(with_other_keys.rollout, expected);
    let with_nulls = ok("x-deploy:\n  observe:\n  hooks:\nservices:\n  web:\n    image: web\n");
    assert_eq!(with_nulls.rollout, expected);
}

#[test]
fn observe_defaults() {
    assert_eq!(rollout("  observe: {}").observe, Some(default_observe()));
    assert_eq!(
        rollout("  observe: {window: 0s}").observe,
        Some(ObserveSettings {
            window: Duration::ZERO,
            ..default_observe()
        })
    );
    assert_eq!(
        rollout("  observe: {min_requests: 1, unhealthy_after: 1}").observe,
        Some(ObserveSettings {
            min_requests: 1,
            unhealthy_after: 1,
            ..default_observe()
        })
    );
}

#[test]
fn error_rate_forms() {
    let rate = |written: &str| {
        rollout(&format!("  observe: {{max_error_rate: {written}}}"))
            .observe
            .unwrap()
            .max_error_rate
    };
    assert_eq!(rate("5%"), 0.05);
    assert_eq!(rate("0.5%"), 0.005);
    assert_eq!(rate("'5 %'"), 0.05);
    assert_eq!(rate("100%"), 1.0);
    assert_eq!(rate("0.05"), 0.05);
    assert_eq!(rate("'0.05'"), 0.05);
    assert_eq!(rate("1"), 1.0);
    assert_eq!(rate(".25"), 0.25);
}

#[test]
fn bad_error_rates() {
    for (written, needle) in [
        ("0", "out of range"),
        ("0%", "out of range"),
        ("0.0", "out of range"),
        ("5", "out of range"),
        ("150%", "out of range"),
        ("1.5", "out of range"),
        ("-0.1", "out of range"),
        ("five", "not an error rate"),
        ("'5 percent'", "not an error rate"),
        ("'%'", "not an error rate"),
        ("'-5%'", "not an error rate"),
        ("'5%%'", "not an error rate"),
        ("'1e-2'", "not an error rate"),
        ("[5]", "invalid type"),
    ] {
        let msg = rollout_err(&format!("  observe: {{max_error_rate: {written}}}"));
        assert_contains(
            &msg,
            &[
                "`x-deploy.observe.max_error_rate`",
                needle,
                "`5%`",
                "`0.05`",
            ],
        );
    }
}

#[test]
fn observe_errors() {
    for (line, path, needle) in [
        (
            "  observe: {unhealthy_after: 0}",
            "x-deploy.observe.unhealthy_after",
            "from 1",
        ),
        (
            "  observe: {min_requests: 0}",
            "x-deploy.observe.min_requests",
            "at least 1",
        ),
        (
            "  observe: {error_rate_for: 0s}",
            "x-deploy.observe.error_rate_for",
            "more than zero",
        ),
        (
            "  observe: {window: soon}",
            "x-deploy.observe.window",
            "invalid duration",
        ),
        ("  observe: 5m", "x-deploy.observe", "invalid type"),
    ] {
        assert_contains(&rollout_err(line), &[&format!("`{path}`"), needle]);
    }
}

// ---------------------------------------------------------------------------
// Canary
// ---------------------------------------------------------------------------

#[test]
fn canary_steps() {
    assert_eq!(rollout("  canary: [5, 25, 100]").canary, [5, 25, 100]);
    assert_eq!(rollout("  canary: [10, 50]").canary, [10, 50, 100]);
    assert_eq!(rollout("  canary: [1]").canary, [1, 100]);
    assert_eq!(rollout("  canary: ['10', 100]").canary, [10, 100]);
    assert!(rollout("  canary: [100]").canary.is_empty());
    assert!(rollout("  canary: []").canary.is_empty());
    assert_eq!(rollout("  canary: [5]").canary_hold, secs(30));
    assert_eq!(
        rollout("  canary: [5]\n  canary_hold: 2m").canary_hold,
        mins(2)
    );
}

#[test]
fn bad_canary_steps() {
    for (steps, path, needle) in [
        ("[25, 5]", "x-deploy.canary[1]", "comes after `25`"),
        ("[5, 5, 100]", "x-deploy.canary[1]", "comes after `5`"),
        ("[5, 100, 100]", "x-deploy.canary[2]", "comes after `100`"),
        ("[0, 100]", "x-deploy.canary[0]", "from 1 to 100"),
        ("[5, 101]", "x-deploy.canary[1]", "from 1 to 100"),
        ("[5, 300]", "x-deploy.canary[1]", "from 1 to 100"),
        ("[5, -1]", "x-deploy.canary[1]", "negative"),
        ("[half]", "x-deploy.canary[0]", "not a whole number"),
        ("5", "x-deploy.canary", "invalid type"),
    ] {
        assert_contains(
            &rollout_err(&format!("  canary: {steps}")),
            &[&format!("`{path}`"), needle],
        );
    }
    assert_contains(
        &rollout_err("  canary: [5]\n  canary_hold: 0s"),
        &["`x-deploy.canary_hold`", "more than zero"],
    );
}

// ---------------------------------------------------------------------------
// Project-wide keys under a service
// ---------------------------------------------------------------------------

#[test]
fn rollout_keys_under_a_service_are_refused() {
    for (line, key) in [
        ("observe: {window: 5m}", "observe"),
        ("canary: [5, 100]", "canary"),
        ("canary_hold: 30s", "canary_hold"),
        ("hooks: {migrate: {service: web, command: x}}", "hooks"),
        // Whatever the value: where it goes matters first.
        ("canary: true", "canary"),
        ("hooks: {retries: 3}", "hooks"),
    ] {
        let msg = err(&format!(
            "services:\n  web:\n    image: web\n    x-deploy:\n      {line}\n"
        ));
        assert_contains(
            &msg,
            &[
                &format!("`services.web.x-deploy.{key}`"),
                "belongs to the top-level `x-deploy`",
                "move it there",
            ],
        );
    }
}

// ---------------------------------------------------------------------------
// Hooks
// ---------------------------------------------------------------------------

#[test]
fn hook_defaults() {
    let h = hooks(
        "  hooks:\n    pre_deploy: {service: web, command: [true]}\n    migrate: {service: web, command: migrate}\n    post_rollback: {host: notify}",
    );
    assert_eq!(
        h.pre_deploy,
        Some(Hook {
            run: container("web", &["true"]),
            timeout: mins(10),
            warn_after: None,
            down: None,
        })
    );
    // migrate warns after 5m unless told otherwise.
    assert_eq!(
        h.migrate,
        Some(Hook {
            run: container("web", &["migrate"]),
            timeout: mins(10),
            warn_after: Some(mins(5)),
            down: None,
        })
    );
    assert_eq!(
        h.post_rollback,
        Some(Hook {
            run: HookRun::Host {
                command: strings(&["notify"]),
            },
            timeout: mins(10),
            warn_after: None,
            down: None,
        })
    );
    assert_eq!(h.backup, None);
    assert_eq!(h.smoke, None);

    // The migrate default does not outlast a shorter timeout: it is dropped.
    let h = hooks("  hooks:\n    migrate: {service: web, command: migrate, timeout: 5m}");
    assert_eq!(h.migrate.unwrap().warn_after, None);
    let h = hooks(
        "  hooks:\n    migrate: {service: web, command: migrate, timeout: 2m, warn_after: 1m}",
    );
    assert_eq!(h.migrate.unwrap().warn_after, Some(mins(1)));
}

#[test]
fn hook_values_are_interpolated() {
    let spec = load_vars(
        &with_x_deploy(
            "  hooks:\n    migrate:\n      service: ${MIGRATE_SERVICE}\n      command: ./migrate --to ${RELEASE}\n      timeout: ${MIGRATE_TIMEOUT}\n  observe: {max_error_rate: '${RATE}'}\n  canary: ['${FIRST_STEP}']",
        ),
        &[
            ("MIGRATE_SERVICE", "worker"),
            ("MIGRATE_TIMEOUT", "15m"),
            ("RATE", "1%"),
            ("FIRST_STEP", "20"),
        ],
    )
    .unwrap();
    let migrate = spec.rollout.hooks.migrate.unwrap();
    assert_eq!(
        migrate.run,
        container("worker", &["./migrate", "--to", "3f2a9c1"])
    );
    assert_eq!(migrate.timeout, mins(15));
    assert_eq!(spec.rollout.observe.unwrap().max_error_rate, 0.01);
    assert_eq!(spec.rollout.canary, [20, 100]);

    let msg = err_vars(
        &with_x_deploy("  hooks:\n    backup: {host: '${BACKUP_CMD}'}"),
        &[],
    );
    assert_contains(&msg, &["`x-deploy.hooks.backup.host`", "BACKUP_CMD"]);
}

#[test]
fn hook_errors() {
    for (hook, path, needles) in [
        (
            "pre_deploy: {service: web, command: x, host: y}",
            "x-deploy.hooks.pre_deploy",
            &["not both", "remove `host`"][..],
        ),
        (
            "backup: {command: x, host: y}",
            "x-deploy.hooks.backup",
            &["not both"][..],
        ),
        (
            "backup: {service: web, host: y}",
            "x-deploy.hooks.backup",
            &["not both"][..],
        ),
        (
            "migrate: {service: web}",
            "x-deploy.hooks.migrate",
            &["`command` is missing", "service `web`"][..],
        ),
        (
            "migrate: {command: ./migrate}",
            "x-deploy.hooks.migrate",
            &["`service` is missing", "(web, worker)", "`host:`"][..],
        ),
        (
            "post_deploy: {timeout: 1m}",
            "x-deploy.hooks.post_deploy",
            &["runs nothing", "`service` and `command`", "`host`"][..],
        ),
        (
            "post_deploy: {}",
            "x-deploy.hooks.post_deploy",
            &["runs nothing"][..],
        ),
        (
            "migrate: {service: db, command: x}",
            "x-deploy.hooks.migrate.service",
            &["service `db` does not exist", "(web, worker)"][..],
        ),
        (
            "migrate: {service: web, command: []}",
            "x-deploy.hooks.migrate.command",
            &["the command is empty"][..],
        ),
        (
            "backup: {host: ''}",
            "x-deploy.hooks.backup.host",
            &["the command is empty"][..],
        ),
        (
            "backup: {host: \"echo 'unclosed\"}",
            "x-deploy.hooks.backup.host",
            &["cannot split", "fix the quoting"][..],
        ),
        (
            "migrate: {service: web, command: x, down: []}",
            "x-deploy.hooks.migrate.down",
            &["the command is empty"][..],
        ),
        (
            "pre_deploy: {service: web, command: x, down: y}",
            "x-deploy.hooks.pre_deploy.down",
            &["only for the `migrate` hook", "remove it"][..],
        ),
        (
            "post_rollback: {host: x, down: y}",
            "x-deploy.hooks.post_rollback.down",
            &["only for the `migrate` hook"][..],
        ),
        (
            "smoke: {command: {service: web, command: x, down: y}}",
            "x-deploy.hooks.smoke.command.down",
            &["only for the `migrate` hook"][..],
        ),
        (
            "migrate: {service: web, command: x, timeout: 0s}",
            "x-deploy.hooks.migrate.timeout",
            &["more than zero"][..],
        ),
        (
            "migrate: {service: web, command: x, warn_after: 0s}",
            "x-deploy.hooks.migrate.warn_after",
            &["more than zero"][..],
        ),
        (
            "migrate: {service: web, command: x, timeout: 1m, warn_after: 1m}",
            "x-deploy.hooks.migrate.warn_after",
            &["shorter than the hook's `timeout` (1m)", "raise `timeout`"][..],
        ),
        (
            "pre_deploy: {service: web, command: x, warn_after: 11m}",
            "x-deploy.hooks.pre_deploy.warn_after",
            &["shorter than the hook's `timeout` (10m)"][..],
        ),
        (
            "migrate: ./migrate",
            "x-deploy.hooks.migrate",
            &["invalid type", "a hook mapping"][..],
        ),
    ] {
        let msg = rollout_err(&format!("  hooks:\n    {hook}"));
        assert_contains(&msg, &[&format!("`{path}`:")]);
        assert_contains(&msg, needles);
    }
}

// ---------------------------------------------------------------------------
// Smoke
// ---------------------------------------------------------------------------

#[test]
fn smoke_defaults() {
    // The default service is the first one written that publishes ports,
    // not the first in `depends_on` order.
    let spec = ok(
        "x-deploy:\n  hooks:\n    smoke:\n      checks: [{path: /}]\nservices:\n  worker:\n    image: w\n  web:\n    image: web\n    ports: ['8080:80']\n    depends_on: [api]\n  api:\n    image: api\n    ports: ['8081:80']\n",
    );
    assert_eq!(spec.services[1].name, "api");
    assert_eq!(
        spec.rollout.hooks.smoke,
        Some(Smoke {
            service: "web".to_string(),
            checks: vec![SmokeCheck {
                method: "GET".to_string(),
                path: "/".to_string(),
                status: 200,
                body_contains: None,
                max_latency: None,
            }],
            command: None,
        })
    );

    // A command alone is enough; its timeout defaults to 1m.
    let smoke = hooks("  hooks:\n    smoke:\n      command: {host: ./smoke.sh}")
        .smoke
        .unwrap();
    assert_eq!(smoke.service, "web");
    assert!(smoke.checks.is_empty());
    assert_eq!(
        smoke.command,
        Some(Hook {
            run: HookRun::Host {
                command: strings(&["./smoke.sh"]),
            },
            timeout: mins(1),
            warn_after: None,
            down: None,
        })
    );
}

#[test]
fn smoke_check_methods_and_statuses() {
    let check = |fields: &str| {
        hooks(&format!(
            "  hooks:\n    smoke:\n      checks: [{{path: /x, {fields}}}]"
        ))
        .smoke
        .unwrap()
        .checks
        .remove(0)
    };
    for method in ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"] {
        assert_eq!(check(&format!("method: {method}")).method, method);
    }
    assert_eq!(check("method: head").method, "HEAD");
    assert_eq!(check("status: 100").status, 100);
    assert_eq!(check("status: '599'").status, 599);
    assert_eq!(
        check("body_contains: 42").body_contains.as_deref(),
        Some("42")
    );
    assert_eq!(check("max_latency: 2").max_latency, Some(secs(2)));
}

#[test]
fn smoke_errors() {
    for (smoke, path, needles) in [
        (
            "{service: worker, checks: [{path: /}]}",
            "x-deploy.hooks.smoke.service",
            &["`worker` publishes no ports", "(web)"][..],
        ),
        (
            "{service: db, checks: [{path: /}]}",
            "x-deploy.hooks.smoke.service",
            &["service `db` does not exist"][..],
        ),
        (
            "{service: web}",
            "x-deploy.hooks.smoke",
            &["nothing to run", "`checks`", "`command`"][..],
        ),
        (
            "{checks: []}",
            "x-deploy.hooks.smoke",
            &["nothing to run"][..],
        ),
        (
            "{checks: [{method: GET}]}",
            "x-deploy.hooks.smoke.checks[0]",
            &["`path` is missing"][..],
        ),
        (
            "{checks: [{path: /}, {path: health}]}",
            "x-deploy.hooks.smoke.checks[1].path",
            &["not an HTTP path", "`/`"][..],
        ),
        (
            "{checks: [{path: /, method: TRACE}]}",
            "x-deploy.hooks.smoke.checks[0].method",
            &["`TRACE`", "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH"][..],
        ),
        (
            "{checks: [{path: /, status: 99}]}",
            "x-deploy.hooks.smoke.checks[0].status",
            &["100 to 599"][..],
        ),
        (
            "{checks: [{path: /, status: 600}]}",
            "x-deploy.hooks.smoke.checks[0].status",
            &["100 to 599"][..],
        ),
        (
            "{checks: [{path: /, max_latency: 0s}]}",
            "x-deploy.hooks.smoke.checks[0].max_latency",
            &["more than zero"][..],
        ),
        (
            "{command: {command: ./smoke}}",
            "x-deploy.hooks.smoke.command",
            &["`service` is missing"][..],
        ),
        (
            "{command: {host: ./smoke, timeout: 0s}}",
            "x-deploy.hooks.smoke.command.timeout",
            &["more than zero"][..],
        ),
        (
            "{checks: {path: /}}",
            "x-deploy.hooks.smoke.checks",
            &["invalid type"][..],
        ),
    ] {
        let msg = rollout_err(&format!("  hooks:\n    smoke: {smoke}"));
        assert_contains(&msg, &[&format!("`{path}`:")]);
        assert_contains(&msg, needles);
    }

    // No service publishes ports at all.
    let msg = err(
        "x-deploy:\n  hooks:\n    smoke: {checks: [{path: /}]}\nservices:\n  worker:\n    image: w\n",
    );
    assert_contains(
        &msg,
        &["`x-deploy.hooks.smoke`:", "no service publishes ports"],
    );
}

// ---------------------------------------------------------------------------
// Unknown keys
// ---------------------------------------------------------------------------

#[test]
fn unknown_rollout_keys_are_named() {
    let cases = [
        (
            "  observe: {window: 1m, error_budget: 3}",
            "x-deploy.observe.error_budget",
            "`x-deploy.observe`: window, unhealthy_after, max_error_rate, error_rate_for, min_requests)",
        ),
        (
            "  hooks:\n    deploy: {host: x}",
            "x-deploy.hooks.deploy",
            "`x-deploy.hooks`: pre_deploy, backup, migrate, smoke, post_deploy, pre_rollback, post_rollback)",
        ),
        (
            "  hooks:\n    migrate: {service: web, command: x, retries: 3}",
            "x-deploy.hooks.migrate.retries",
            "a hook: service, command, host, down, timeout, warn_after)",
        ),
        (
            "  hooks:\n    smoke: {checks: [{path: /}], url: /x}",
            "x-deploy.hooks.smoke.url",
            "`x-deploy.hooks.smoke`: service, checks, command)",
        ),
        (
            "  hooks:\n    smoke: {checks: [{path: /, headers: {a: b}}]}",
            "x-deploy.hooks.smoke.checks[0].headers",
            "a smoke check: path, method, status, body_contains, max_latency)",
        ),
        (
            "  hooks:\n    smoke: {command: {host: x, retries: 1}}",
            "x-deploy.hooks.smoke.command.retries",
            "a hook: service, command",
        ),
    ];
    for (x_deploy, want_path, want_supported) in cases {
        let (path, msg) = unsupported(&with_x_deploy(x_deploy));
        assert_eq!(path, want_path, "{msg}");
        assert_contains(
            &msg,
            &[
                &format!("{FILE}: unsupported key `{want_path}`"),
                want_supported,
            ],
        );
    }
}

#[test]
fn unknown_rollout_keys_with_hints() {
    let (path, msg) = unsupported(&with_x_deploy("  hooks:\n    pre-deploy: {host: x}"));
    assert_eq!(path, "x-deploy.hooks.pre-deploy");
    assert_contains(&msg, &["written with `_`", "pre_deploy"]);

    let (_, msg) = unsupported(&with_x_deploy(
        "  hooks:\n    smoke: {checks: [{path: /}], timeout: 1m}",
    ));
    assert_contains(&msg, &["`x-deploy.hooks.smoke.timeout`", "`max_latency`"]);

    let (_, msg) = unsupported(&with_x_deploy(
        "  hooks:\n    migrate: {service: web, command: x, environment: {A: b}}",
    ));
    assert_contains(&msg, &["environment and networks of its `service`"]);
}

#[test]
fn extension_keys_in_rollout_mappings_are_ignored() {
    let h = hooks(
        "  hooks:\n    x-note: free text\n    migrate: {service: web, command: x, x-why: because}\n    smoke:\n      x-owner: qa\n      checks: [{path: /, x-ticket: 12}]\n      command: {host: y, x-a: 1}\n  observe: {x-comment: hi}",
    );
    assert!(h.migrate.is_some());
    assert_eq!(h.smoke.unwrap().checks.len(), 1);
}
