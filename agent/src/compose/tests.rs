//! Tests of the whole loader, from YAML text to `ProjectSpec` or error.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::Duration;

use super::{ComposeError, LoadInput, load};
use crate::spec::{
    DeploySettings, DockerHealthcheck, HealthSettings, MountSpec, NetworkSpec, PortSpec, Probe,
    ProjectSpec, ProxyMode, RestartPolicy, VolumeSpec,
};

/// The top-level `x-deploy` rollout keys: observe, canary, hooks.
mod rollout;

/// Hostile input and the limits that refuse it.
mod limits;

const FILE: &str = "deploy/compose.yaml";

fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn load_in(
    yaml: &str,
    pairs: &[(&str, &str)],
    base_dir: &Path,
) -> Result<ProjectSpec, ComposeError> {
    let vars = vars(pairs);
    load(&LoadInput {
        compose_path: FILE,
        compose_text: yaml,
        base_dir,
        project: "shop",
        release: "3f2a9c1",
        vars: &vars,
    })
}

fn load_vars(yaml: &str, pairs: &[(&str, &str)]) -> Result<ProjectSpec, ComposeError> {
    load_in(yaml, pairs, Path::new("/srv/shop"))
}

fn ok(yaml: &str) -> ProjectSpec {
    match load_vars(yaml, &[]) {
        Ok(spec) => spec,
        Err(e) => panic!("expected success, got: {e}"),
    }
}

/// The error message, checked to name the file.
fn err(yaml: &str) -> String {
    err_vars(yaml, &[])
}

fn err_vars(yaml: &str, pairs: &[(&str, &str)]) -> String {
    match load_vars(yaml, pairs) {
        Ok(spec) => panic!("expected an error, got: {spec:#?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("{FILE}: ")),
                "message does not name the file: {msg}"
            );
            msg
        }
    }
}

#[track_caller]
fn assert_contains(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "expected {n:?} in:\n{msg}");
    }
}

fn service<'a>(spec: &'a ProjectSpec, name: &str) -> &'a crate::spec::ServiceSpec {
    spec.services
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no service {name}"))
}

const ANY: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

// ---------------------------------------------------------------------------
// A full file
// ---------------------------------------------------------------------------

#[test]
fn full_example_with_every_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("common.env"),
        "# shared\nLOG=info\nexport REGION=eu\nMODE=file\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("web.env"), "MODE=web-file\nEXTRA=\"a b\"\n").unwrap();
    let yaml = r#"
version: "3.9"
name: ignored-name
x-common: &common
  restart: unless-stopped
  labels:
    team: shop
x-deploy:
  drain_timeout: 45s
  health:
    interval: 500ms
    deadline: 2m
services:
  web:
    <<: *common
    image: "${REGISTRY:-registry.example.com}/shop/web:${RELEASE}"
    command: ["serve", "--port", "8080"]
    entrypoint: /bin/tini -- "/app/start"
    environment:
      MODE: compose
      WORKERS: 4
      DEBUG: false
      PRICE: 1.5
      DOLLAR: "$$HOME"
    env_file: [common.env, ./web.env]
    ports:
      - "8080:8080"
      - "127.0.0.1:9090:9090/tcp"
      - target: 8443
        published: "${TLS_PORT}"
        host_ip: "::1"
        protocol: tcp
    volumes:
      - data:/var/lib/shop
      - ./config:/etc/shop:ro
      - type: bind
        source: /var/log/shop
        target: /logs
      - type: volume
        source: cache
        target: /cache
        read_only: true
    networks: [front, back]
    labels:
      team: web
      tier: frontend
    healthcheck:
      test: ["CMD", "curl", "-fsS", "http://localhost:8080/health"]
      interval: 1m30s
      timeout: 5s
      retries: 3
      start_period: 10s
    depends_on:
      db:
        condition: service_healthy
        required: true
    user: "1000:1000"
    working_dir: /app
    deploy:
      replicas: 3
    stop_grace_period: 20s
    x-deploy:
      health:
        http: /health
        healthy_after: 2
        unhealthy_after: 5
        timeout: 1s
        start_period: 3s
      proxy: http
      parallel: 2
  db:
    image: postgres:16
    environment:
      - POSTGRES_PASSWORD=${DB_PASSWORD:?give the database password}
      - EMPTY=
    volumes:
      - "pg:/var/lib/postgresql/data"
    networks:
      back: {}
    healthcheck:
      test: pg_isready -U postgres
    restart: always
    x-deploy:
      health:
        tcp: 5432
      proxy: tcp
      drain_timeout: 5
networks:
  front:
  back:
    external: true
    name: shared-back
volumes:
  data:
  pg: {}
  cache:
    external: true
"#;
    let spec = load_in(
        yaml,
        &[
            ("TLS_PORT", "8443"),
            ("DB_PASSWORD", "s3cret"),
            ("UNUSED", "x"),
        ],
        dir.path(),
    )
    .unwrap();
    let base = dir.path().to_str().unwrap();

    assert_eq!(spec.project, "shop");
    assert_eq!(spec.release, "3f2a9c1");
    let names: Vec<&str> = spec.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["db", "web"], "db first: web depends on it");

    let web = service(&spec, "web");
    assert_eq!(web.image, "registry.example.com/shop/web:3f2a9c1");
    assert_eq!(
        web.command,
        Some(vec!["serve".into(), "--port".into(), "8080".into()])
    );
    assert_eq!(
        web.entrypoint,
        Some(vec!["/bin/tini".into(), "--".into(), "/app/start".into()])
    );
    let env: BTreeMap<&str, &str> = web
        .environment
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        env,
        BTreeMap::from([
            ("DEBUG", "false"),
            ("DOLLAR", "$HOME"),
            ("EXTRA", "a b"),
            ("LOG", "info"),
            ("MODE", "compose"),
            ("PRICE", "1.5"),
            ("REGION", "eu"),
            ("WORKERS", "4"),
        ])
    );
    assert_eq!(
        web.ports,
        [
            PortSpec {
                host_ip: ANY,
                host_port: 8080,
                target: 8080
            },
            PortSpec {
                host_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                host_port: 9090,
                target: 9090
            },
            PortSpec {
                host_ip: IpAddr::V6(Ipv6Addr::LOCALHOST),
                host_port: 8443,
                target: 8443
            },
        ]
    );
    assert_eq!(
        web.mounts,
        [
            MountSpec::Volume {
                source: "data".into(),
                target: "/var/lib/shop".into(),
                read_only: false
            },
            MountSpec::Bind {
                source: format!("{base}/config"),
                target: "/etc/shop".into(),
                read_only: true
            },
            MountSpec::Bind {
                source: "/var/log/shop".into(),
                target: "/logs".into(),
                read_only: false
            },
            MountSpec::Volume {
                source: "cache".into(),
                target: "/cache".into(),
                read_only: true
            },
        ]
    );
    assert_eq!(web.networks, ["front", "shared-back"]);
    assert_eq!(
        web.labels,
        BTreeMap::from([
            ("team".to_string(), "web".to_string()),
            ("tier".to_string(), "frontend".to_string())
        ]),
        "the service's labels replace the merged ones, as YAML merge keys do"
    );
    assert_eq!(
        web.healthcheck,
        Some(DockerHealthcheck {
            test: vec![
                "CMD".into(),
                "curl".into(),
                "-fsS".into(),
                "http://localhost:8080/health".into()
            ],
            interval: Some(secs(90)),
            timeout: Some(secs(5)),
            retries: Some(3),
            start_period: Some(secs(10)),
        })
    );
    assert_eq!(web.depends_on, ["db"]);
    assert_eq!(web.restart, RestartPolicy::UnlessStopped);
    assert_eq!(web.user.as_deref(), Some("1000:1000"));
    assert_eq!(web.working_dir.as_deref(), Some("/app"));
    assert_eq!(web.replicas, 3);
    assert_eq!(web.stop_grace_period, secs(20));
    assert_eq!(
        web.deploy,
        DeploySettings {
            health: HealthSettings {
                probe: Probe::Http {
                    path: "/health".into(),
                    port: 8080
                },
                interval: Duration::from_millis(500),
                timeout: secs(1),
                healthy_after: 2,
                unhealthy_after: 5,
                start_period: secs(3),
                deadline: secs(120),
            },
            drain_timeout: secs(45),
            proxy: ProxyMode::Http,
            parallel: 2,
        }
    );

    let db = service(&spec, "db");
    assert_eq!(
        db.environment.get("POSTGRES_PASSWORD").map(String::as_str),
        Some("s3cret")
    );
    assert_eq!(db.environment.get("EMPTY").map(String::as_str), Some(""));
    assert_eq!(db.networks, ["shared-back"]);
    assert_eq!(
        db.healthcheck.as_ref().map(|h| h.test.clone()),
        Some(vec![
            "CMD-SHELL".to_string(),
            "pg_isready -U postgres".to_string()
        ])
    );
    assert_eq!(db.restart, RestartPolicy::Always);
    assert_eq!(db.replicas, 1);
    assert_eq!(db.stop_grace_period, secs(10));
    assert_eq!(db.deploy.health.probe, Probe::Tcp { port: 5432 });
    assert_eq!(db.deploy.health.interval, Duration::from_millis(500));
    assert_eq!(db.deploy.health.start_period, Duration::ZERO);
    assert_eq!(db.deploy.drain_timeout, secs(5));
    assert_eq!(db.deploy.proxy, ProxyMode::Tcp);
    assert_eq!(db.deploy.parallel, 1);
    assert!(db.labels.is_empty() && db.ports.is_empty());

    assert_eq!(
        spec.networks,
        [
            NetworkSpec {
                name: "front".into(),
                external: false
            },
            NetworkSpec {
                name: "shared-back".into(),
                external: true
            },
        ]
    );
    assert_eq!(
        spec.volumes,
        [
            VolumeSpec {
                name: "data".into(),
                external: false
            },
            VolumeSpec {
                name: "pg".into(),
                external: false
            },
            VolumeSpec {
                name: "cache".into(),
                external: true
            },
        ]
    );

    assert_eq!(spec.source.compose_path, FILE);
    assert_eq!(spec.source.compose_text, yaml);
    assert_eq!(
        spec.source.interpolated,
        vars(&[
            ("DB_PASSWORD", "s3cret"),
            ("RELEASE", "3f2a9c1"),
            ("TLS_PORT", "8443")
        ]),
        "used variables only; REGISTRY was unset and took its default"
    );
    assert_eq!(spec.source.env_files.len(), 2);
    assert!(spec.source.env_files["common.env"].starts_with("# shared\n"));
    assert!(spec.source.env_files["./web.env"].contains("web-file"));

    // The spec is what a release snapshot stores: it must round-trip.
    let json = serde_json::to_string(&spec).unwrap();
    let back: ProjectSpec = serde_json::from_str(&json).unwrap();
    assert_eq!(back, spec);
}

#[test]
fn minimal_file_gets_defaults() {
    let spec = ok("services:\n  web:\n    image: nginx\n    ports: ['80:80']\n");
    let web = &spec.services[0];
    assert_eq!(web.command, None);
    assert_eq!(web.entrypoint, None);
    assert!(web.environment.is_empty() && web.labels.is_empty() && web.mounts.is_empty());
    assert_eq!(web.networks, ["default"]);
    assert_eq!(web.restart, RestartPolicy::No);
    assert_eq!(web.replicas, 1);
    assert_eq!(web.stop_grace_period, secs(10));
    assert_eq!(web.healthcheck, None);
    assert_eq!(
        web.deploy,
        DeploySettings {
            health: HealthSettings {
                probe: Probe::Running { port: Some(80) },
                interval: secs(1),
                timeout: secs(2),
                healthy_after: 1,
                unhealthy_after: 3,
                start_period: secs(2),
                deadline: secs(60),
            },
            drain_timeout: secs(30),
            proxy: ProxyMode::Http,
            parallel: 1,
        }
    );
    assert_eq!(
        spec.networks,
        [NetworkSpec {
            name: "default".into(),
            external: false
        }]
    );
    assert!(spec.volumes.is_empty());
    assert!(spec.source.interpolated.is_empty());
    assert!(spec.source.env_files.is_empty());
}

#[test]
fn version_and_name_are_ignored() {
    let spec = ok("version: '2'\nname: other\nservices:\n  web:\n    image: nginx\n");
    assert_eq!(spec.project, "shop");
}

// ---------------------------------------------------------------------------
// Names and variables
// ---------------------------------------------------------------------------

fn load_named(
    project: &str,
    release: &str,
    pairs: &[(&str, &str)],
) -> Result<ProjectSpec, ComposeError> {
    let vars = vars(pairs);
    load(&LoadInput {
        compose_path: FILE,
        compose_text: "services:\n  web:\n    image: nginx\n",
        base_dir: Path::new("/srv"),
        project,
        release,
        vars: &vars,
    })
}

#[test]
fn project_and_release_names() {
    for good in ["shop", "a", "shop-2_x", &"a".repeat(63)] {
        assert!(load_named(good, "r1", &[]).is_ok(), "{good}");
    }
    for bad in [
        "",
        "Shop",
        "-shop",
        "_shop",
        "sh op",
        "shop.x",
        &"a".repeat(64),
    ] {
        let e = load_named(bad, "r1", &[]).unwrap_err();
        assert!(
            matches!(e, ComposeError::InvalidProject { .. }),
            "{bad}: {e}"
        );
        assert_contains(&e.to_string(), &[FILE, "project name", "lowercase letters"]);
    }
    for good in ["3f2a9c1", "v1.2.3", "Release_1-rc.2", &"a".repeat(64)] {
        assert!(load_named("shop", good, &[]).is_ok(), "{good}");
    }
    for bad in ["", ".v1", "v1/2", "v 1", "v1:2", &"a".repeat(65)] {
        let e = load_named("shop", bad, &[]).unwrap_err();
        assert!(
            matches!(e, ComposeError::InvalidRelease { .. }),
            "{bad}: {e}"
        );
        assert_contains(&e.to_string(), &[FILE, "release"]);
    }
}

#[test]
fn release_cannot_be_overridden() {
    let e = load_named("shop", "r1", &[("RELEASE", "other")]).unwrap_err();
    assert!(matches!(e, ComposeError::InvalidVar { .. }), "{e}");
    assert_contains(
        &e.to_string(),
        &[FILE, "--var RELEASE", "cannot be overridden"],
    );
}

#[test]
fn var_names_are_checked() {
    let e = load_named("shop", "r1", &[("1BAD", "x")]).unwrap_err();
    assert_contains(&e.to_string(), &["--var 1BAD", "not a variable name"]);
}

#[test]
fn interpolation_forms() {
    let yaml = r#"
services:
  web:
    image: "reg/${APP}:$RELEASE"
    labels:
      braced: "${APP}"
      bare: "$APP-x"
      default_unset: "${UNSET:-fallback}"
      default_empty: "${EMPTY:-fallback}"
      dash_unset: "${UNSET-fallback}"
      dash_empty: "${EMPTY-fallback}"
      required: "${APP:?needed}"
      required_dash: "${EMPTY?needed}"
      nested: "${UNSET:-${APP}}"
      escaped: "$$APP and $${APP}"
      number_untouched: 5
    environment:
      "${NOT_A_KEY}": "keys are not interpolated"
"#;
    let spec = load_vars(yaml, &[("APP", "shop"), ("EMPTY", "")]).unwrap();
    let web = &spec.services[0];
    assert_eq!(web.image, "reg/shop:3f2a9c1");
    let label = |k: &str| web.labels.get(k).cloned().unwrap_or_default();
    assert_eq!(label("braced"), "shop");
    assert_eq!(label("bare"), "shop-x");
    assert_eq!(label("default_unset"), "fallback");
    assert_eq!(label("default_empty"), "fallback");
    assert_eq!(label("dash_unset"), "fallback");
    assert_eq!(label("dash_empty"), "");
    assert_eq!(label("required"), "shop");
    assert_eq!(label("required_dash"), "");
    assert_eq!(label("nested"), "shop");
    assert_eq!(label("escaped"), "$APP and ${APP}");
    assert_eq!(label("number_untouched"), "5");
    assert_eq!(
        web.environment.get("${NOT_A_KEY}").map(String::as_str),
        Some("keys are not interpolated")
    );
    assert_eq!(
        spec.source.interpolated,
        vars(&[("APP", "shop"), ("EMPTY", ""), ("RELEASE", "3f2a9c1")])
    );
}

#[test]
fn numbers_and_booleans_from_interpolation() {
    let yaml = r#"
services:
  web:
    image: nginx
    ports:
      - target: ${TARGET}
        published: ${PORT}
    deploy:
      replicas: ${REPLICAS}
    x-deploy:
      health:
        tcp: "${TARGET}"
        interval: ${INTERVAL}
networks:
  ext:
    external: ${EXT}
"#;
    let spec = load_vars(
        yaml,
        &[
            ("TARGET", "80"),
            ("PORT", "8080"),
            ("REPLICAS", "2"),
            ("INTERVAL", "3"),
            ("EXT", "true"),
        ],
    )
    .unwrap();
    let web = &spec.services[0];
    assert_eq!(
        web.ports,
        [PortSpec {
            host_ip: ANY,
            host_port: 8080,
            target: 80
        }]
    );
    assert_eq!(web.replicas, 2);
    assert_eq!(web.deploy.health.probe, Probe::Tcp { port: 80 });
    assert_eq!(web.deploy.health.interval, secs(3));
    assert!(spec.networks.iter().any(|n| n.name == "ext" && n.external));
}

#[test]
fn unset_variable_is_an_error() {
    let e = load_vars("services:\n  web:\n    image: \"app:${TAG}\"\n", &[]).unwrap_err();
    assert!(
        matches!(&e, ComposeError::UnsetVariable { var, path, .. } if var == "TAG" && path == "services.web.image"),
        "{e:?}"
    );
    assert_contains(
        &e.to_string(),
        &[
            FILE,
            "`services.web.image`",
            "`TAG`",
            "--var TAG=value",
            "${TAG:-value}",
        ],
    );

    let msg = err("services:\n  web:\n    image: nginx\n    command: [echo, $NAME]\n");
    assert_contains(
        &msg,
        &["`services.web.command[1]`", "`NAME`", "--var NAME=value"],
    );
}

#[test]
fn required_variable_error() {
    let msg = err("services:\n  web:\n    image: \"app:${TAG:?set TAG to the image tag}\"\n");
    assert_contains(
        &msg,
        &[
            "`services.web.image`",
            "`TAG`",
            "set TAG to the image tag",
            "--var TAG=value",
        ],
    );
    let msg = err_vars(
        "services:\n  web:\n    image: \"app:${TAG:?}\"\n",
        &[("TAG", "")],
    );
    assert_contains(&msg, &["`TAG`", "must be set and not empty"]);
    let msg = err("services:\n  web:\n    image: \"app:${TAG?no tag}\"\n");
    assert_contains(&msg, &["`TAG`", "no tag"]);
}

#[test]
fn interpolation_syntax_errors() {
    for (yaml, needle) in [
        ("image: \"app:${TAG\"", "no closing"),
        ("image: \"price $5\"", "write `$$`"),
        ("image: \"${TAG:x}\"", "not a supported form"),
    ] {
        let msg = err(&format!("services:\n  web:\n    {yaml}\n"));
        assert_contains(&msg, &["`services.web.image`", needle]);
    }
}

#[test]
fn variables_in_ignored_extensions_are_not_needed() {
    ok("x-unused:\n  image: \"${NEVER_SET}\"\nservices:\n  web:\n    image: nginx\n");
}

// ---------------------------------------------------------------------------
// Unsupported keys and YAML errors
// ---------------------------------------------------------------------------

fn unsupported(yaml: &str) -> (String, String) {
    match load_vars(yaml, &[]) {
        Err(e @ ComposeError::UnsupportedKey { .. }) => {
            let ComposeError::UnsupportedKey { path, .. } = &e else {
                unreachable!()
            };
            (path.clone(), e.to_string())
        }
        other => panic!("expected an unsupported key error, got {other:?}"),
    }
}

#[test]
fn unknown_service_key() {
    let (path, msg) = unsupported("services:\n  web:\n    image: nginx\n    privileged: true\n");
    assert_eq!(path, "services.web.privileged");
    assert!(
        msg.starts_with(&format!(
            "{FILE}: unsupported key `services.web.privileged`: deploy-agent does not support it (supported keys under a service: image, command, entrypoint, environment, env_file, ports, volumes, networks, labels, healthcheck, depends_on, restart, user, working_dir, deploy, stop_grace_period, x-deploy)"
        )),
        "{msg}"
    );
}

#[test]
fn a_mistyped_key_suggests_the_nearest_one() {
    let (path, msg) = unsupported("services:\n  web:\n    image: nginx\n    portz: [\"80\"]\n");
    assert_eq!(path, "services.web.portz");
    assert_contains(
        &msg,
        &["did you mean `ports`?", "supported keys under a service"],
    );
    let (_, msg) = unsupported(
        "services:\n  web:\n    image: nginx\n    x-deploy:\n      health: {htpp: /}\n",
    );
    assert_contains(&msg, &["did you mean `http`?"]);
    // Nothing close: no guess.
    let (_, msg) = unsupported("services:\n  web:\n    image: nginx\n    privileged: true\n");
    assert!(!msg.contains("did you mean"), "{msg}");
}

#[test]
fn container_name_has_its_own_reason() {
    let (path, msg) = unsupported("services:\n  web:\n    image: nginx\n    container_name: web\n");
    assert_eq!(path, "services.web.container_name");
    assert_contains(
        &msg,
        &[
            "replicas and releases need generated names",
            "supported keys under a service",
        ],
    );
    let (_, msg) = unsupported("services:\n  web:\n    build: .\n");
    assert_contains(
        &msg,
        &["`services.web.build`", "build and push the image in CI"],
    );
}

#[test]
fn unknown_keys_everywhere_are_named() {
    let cases = [
        (
            "configs: {}\nservices:\n  web:\n    image: nginx\n",
            "configs",
            "the top level: version, name, services, networks, volumes, x-deploy",
        ),
        (
            "services:\n  web:\n    image: nginx\n    deploy:\n      resources: {}\n",
            "services.web.deploy.resources",
            "`deploy`: replicas",
        ),
        (
            "services:\n  web:\n    image: nginx\n    x-deploy:\n      retries: 3\n",
            "services.web.x-deploy.retries",
            // The project-wide keys are not offered under a service.
            "`x-deploy`: health, drain_timeout, proxy, parallel)",
        ),
        (
            "x-deploy:\n  retries: 3\nservices:\n  web:\n    image: nginx\n",
            "x-deploy.retries",
            "`x-deploy`: health, drain_timeout, proxy, parallel, observe, canary, canary_hold, hooks)",
        ),
        (
            "services:\n  web:\n    image: nginx\n    x-deploy:\n      health:\n        path: /x\n",
            "services.web.x-deploy.health.path",
            "`x-deploy.health`: http, tcp, exec, docker, port, interval",
        ),
        (
            "services:\n  web:\n    image: nginx\n    healthcheck:\n      test: \"true\"\n      start_interval: 1s\n",
            "services.web.healthcheck.start_interval",
            "`healthcheck`: test, interval, timeout, retries, start_period, disable",
        ),
        (
            "services:\n  web:\n    image: nginx\n    ports:\n      - target: 80\n        published: 8080\n        mode: host\n",
            "services.web.ports[0].mode",
            "a long-syntax port: target, published, host_ip, protocol",
        ),
        (
            "volumes: {d: }\nservices:\n  web:\n    image: nginx\n    volumes:\n      - type: volume\n        source: d\n        target: /d\n        volume: {nocopy: true}\n",
            "services.web.volumes[0].volume",
            "a long-syntax volume: type, source, target, read_only",
        ),
        (
            "networks: {front: }\nservices:\n  web:\n    image: nginx\n    networks:\n      front:\n        aliases: [w]\n",
            "services.web.networks.front.aliases",
            "a service's network entry: none",
        ),
        (
            "services:\n  web:\n    image: nginx\n    depends_on:\n      db: {condition: service_started, restart: true}\n  db:\n    image: pg\n",
            "services.web.depends_on.db.restart",
            "a `depends_on` entry: condition, required",
        ),
        (
            "networks:\n  front:\n    driver: overlay\nservices:\n  web:\n    image: nginx\n",
            "networks.front.driver",
            "a network: external, name",
        ),
        (
            "volumes:\n  data:\n    driver: local\nservices:\n  web:\n    image: nginx\n",
            "volumes.data.driver",
            "a volume: external",
        ),
    ];
    for (yaml, want_path, want_supported) in cases {
        let (path, msg) = unsupported(yaml);
        assert_eq!(path, want_path, "{msg}");
        assert_contains(
            &msg,
            &[&format!("unsupported key `{want_path}`"), want_supported],
        );
    }
}

#[test]
fn extension_keys_are_ignored_except_x_deploy() {
    let yaml = r#"
x-defaults: &defaults
  image: nginx
  x-anything: 1
services:
  web:
    <<: *defaults
    x-note: "free text"
    labels:
      x-kept: "yes"
    healthcheck:
      test: "true"
      x-why: because
    x-deploy:
      x-comment: ignored too
      health:
        x-more: 1
networks:
  front:
    x-owner: ops
"#;
    let spec = ok(yaml);
    let web = &spec.services[0];
    assert_eq!(web.image, "nginx");
    assert_eq!(web.labels.get("x-kept").map(String::as_str), Some("yes"));
    assert_eq!(web.deploy.health.probe, Probe::Docker);
}

#[test]
fn malformed_yaml_names_the_line() {
    let e = load_vars("services:\n  web:\n    image: nginx\n   ports: [\n", &[]).unwrap_err();
    assert!(matches!(e, ComposeError::Yaml { .. }), "{e:?}");
    let msg = e.to_string();
    assert_contains(&msg, &[FILE, "invalid YAML", "line 4"]);

    let msg = err("services:\n  web:\n    image: nginx\n    image: other\n");
    assert_contains(&msg, &["invalid YAML", "duplicate"]);
}

#[test]
fn odd_documents() {
    assert_contains(&err(""), &["empty", "services"]);
    assert_contains(&err("- a\n- b\n"), &["mapping", "services"]);
    assert_contains(&err("name: x\n"), &["`services`", "no services"]);
    assert_contains(&err("services: {}\n"), &["`services`", "no services"]);
    assert_contains(
        &err("services:\n  web:\n    ports: !reset []\n"),
        &["`services.web.ports`", "tag `!reset`"],
    );
    assert_contains(
        &err("services:\n  web:\n    image: nginx\n    labels: {1: a}\n"),
        &["`services.web.labels`", "quote it"],
    );
}

#[test]
fn type_errors_name_the_path() {
    let msg = err("services:\n  web:\n    image: [nginx]\n");
    assert_contains(&msg, &["`services.web.image`", "invalid type"]);
    let msg = err("services:\n  web:\n    image: nginx\n    deploy:\n      replicas: many\n");
    assert_contains(
        &msg,
        &["`services.web.deploy.replicas`", "not a whole number"],
    );
    let msg = err("services:\n  web:\n    image: nginx\n    stop_grace_period: soon\n");
    assert_contains(
        &msg,
        &[
            "`services.web.stop_grace_period`",
            "invalid duration",
            "1m30s",
        ],
    );
    let msg = err("services:\n  web:\n    image: nginx\n    x-deploy:\n      proxy: udp\n");
    assert_contains(
        &msg,
        &["`services.web.x-deploy.proxy`", "udp", "http", "tcp"],
    );
    let msg = err("services:\n  web:\n\n");
    assert_contains(&msg, &["`services.web`", "`image` is missing"]);
    let msg = err("services:\n  web: nginx\n");
    assert_contains(
        &msg,
        &[
            "`services.web`",
            "a service: a mapping with at least `image`",
        ],
    );
}

// ---------------------------------------------------------------------------
// Services
// ---------------------------------------------------------------------------

#[test]
fn image_is_required() {
    assert_contains(
        &err("services:\n  web:\n    command: x\n"),
        &["`services.web`", "`image` is missing"],
    );
    assert_contains(
        &err("services:\n  web:\n    image: \"\"\n"),
        &["`services.web.image`", "empty"],
    );
}

#[test]
fn service_names_are_checked() {
    assert_contains(
        &err("services:\n  \"web app\":\n    image: nginx\n"),
        &["not a valid service name"],
    );
}

#[test]
fn command_and_entrypoint() {
    let spec = ok(
        "services:\n  web:\n    image: x\n    command: sh -c 'echo \"hi there\"'\n    entrypoint: [\"/init\"]\n",
    );
    assert_eq!(
        spec.services[0].command,
        Some(vec!["sh".into(), "-c".into(), "echo \"hi there\"".into()])
    );
    assert_eq!(spec.services[0].entrypoint, Some(vec!["/init".into()]));
    let msg = err("services:\n  web:\n    image: x\n    command: echo 'unclosed\n");
    assert_contains(&msg, &["`services.web.command`", "quoting"]);
}

#[test]
fn environment_forms() {
    let spec = ok("services:\n  web:\n    image: x\n    environment: [A=1, B=x=y, C=]\n");
    assert_eq!(
        spec.services[0].environment,
        vars(&[("A", "1"), ("B", "x=y"), ("C", "")])
    );

    let msg = err("services:\n  web:\n    image: x\n    environment: [A=1, TOKEN]\n");
    assert_contains(
        &msg,
        &[
            "`services.web.environment[1]`",
            "`TOKEN` has no value",
            "give it one",
        ],
    );
    let msg = err("services:\n  web:\n    image: x\n    environment:\n      TOKEN:\n");
    assert_contains(&msg, &["`services.web.environment.TOKEN`", "has no value"]);
    let msg = err("services:\n  web:\n    image: x\n    environment: [A=1, A=2]\n");
    assert_contains(&msg, &["`services.web.environment[1]`", "set twice"]);
}

#[test]
fn labels_forms() {
    let spec = ok("services:\n  web:\n    image: x\n    labels: [a=1, flag]\n");
    assert_eq!(spec.services[0].labels, vars(&[("a", "1"), ("flag", "")]));
    let spec = ok("services:\n  web:\n    image: x\n    labels: {a: 1, b: true, c: }\n");
    assert_eq!(
        spec.services[0].labels,
        vars(&[("a", "1"), ("b", "true"), ("c", "")])
    );
}

#[test]
fn env_file_merge() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("env")).unwrap();
    std::fs::write(
        dir.path().join("env/a.env"),
        "A=from-a\nB=from-a\nC=from-a\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("b.env"), "B=from-b\nC=from-b\n").unwrap();
    let yaml = "services:\n  web:\n    image: x\n    env_file:\n      - env/a.env\n      - b.env\n    environment:\n      C: from-compose\n";
    let spec = load_in(yaml, &[], dir.path()).unwrap();
    assert_eq!(
        spec.services[0].environment,
        vars(&[("A", "from-a"), ("B", "from-b"), ("C", "from-compose")])
    );
    assert_eq!(
        spec.source.env_files.keys().collect::<Vec<_>>(),
        ["b.env", "env/a.env"]
    );

    // A single string, with interpolation in the path.
    let spec = load_in(
        "services:\n  web:\n    image: x\n    env_file: \"${WHICH}.env\"\n",
        &[("WHICH", "b")],
        dir.path(),
    )
    .unwrap();
    assert_eq!(
        spec.services[0].environment,
        vars(&[("B", "from-b"), ("C", "from-b")])
    );
}

#[test]
fn env_file_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_in(
        "services:\n  web:\n    image: x\n    env_file: missing.env\n",
        &[],
        dir.path(),
    )
    .unwrap_err();
    assert!(matches!(e, ComposeError::EnvFile { .. }), "{e:?}");
    assert_contains(
        &e.to_string(),
        &[
            FILE,
            "`services.web.env_file`",
            "`missing.env` does not exist",
            "create it",
        ],
    );

    std::fs::write(dir.path().join("bad.env"), "A=1\nJUSTAKEY\n").unwrap();
    let e = load_in(
        "services:\n  web:\n    image: x\n    env_file: [bad.env]\n",
        &[],
        dir.path(),
    )
    .unwrap_err();
    let msg = e.to_string();
    assert_contains(
        &msg,
        &[
            "`services.web.env_file[0]`",
            "`bad.env`",
            "line 2",
            "has no `=`",
            "NAME=value",
        ],
    );
    // The line itself is not quoted: env files hold secrets.
    assert!(!msg.contains("JUSTAKEY"), "{msg}");
}

#[test]
fn ports_in_a_file() {
    let spec = ok(r#"
services:
  web:
    image: x
    ports:
      - "8080:80"
      - 127.0.0.1:8081:81
      - "[::1]:8082:82"
      - 8083:83/tcp
      - {target: 84, published: 8084}
      - 8085:85
"#);
    let got: Vec<(IpAddr, u16, u16)> = spec.services[0]
        .ports
        .iter()
        .map(|p| (p.host_ip, p.host_port, p.target))
        .collect();
    assert_eq!(
        got,
        [
            (ANY, 8080, 80),
            (IpAddr::V4(Ipv4Addr::LOCALHOST), 8081, 81),
            (IpAddr::V6(Ipv6Addr::LOCALHOST), 8082, 82),
            (ANY, 8083, 83),
            (ANY, 8084, 84),
            (ANY, 8085, 85),
        ]
    );
}

#[test]
fn port_errors_in_a_file() {
    let cases = [
        (
            "- \"80\"",
            "the agent's proxy publishes ports; give host:container",
        ),
        (
            "- 80",
            "the agent's proxy publishes ports; give host:container",
        ),
        (
            "- {target: 80}",
            "the agent's proxy publishes ports; give host:container",
        ),
        ("- \"53:53/udp\"", "only TCP"),
        ("- {target: 53, published: 53, protocol: udp}", "only TCP"),
        ("- \"8000-8002:8000-8002\"", "ranges are not supported"),
        ("- \"99999:80\"", "not a port number"),
    ];
    for (entry, needle) in cases {
        let yaml = format!(
            "services:\n  web:\n    image: x\n    ports:\n      - \"1:1\"\n      {entry}\n"
        );
        let msg = err(&yaml);
        assert_contains(&msg, &["`services.web.ports[1]`", needle]);
    }
}

#[test]
fn duplicate_host_ports() {
    let msg = err(
        "services:\n  web:\n    image: x\n    ports: ['8080:80']\n  api:\n    image: y\n    ports: ['127.0.0.1:8080:81']\n",
    );
    assert_contains(
        &msg,
        &[
            "`services.api.ports[0]`",
            "host port 8080",
            "already published by `services.web.ports[0]`",
        ],
    );
    let msg = err("services:\n  web:\n    image: x\n    ports: ['8080:80', '8080:81']\n");
    assert_contains(&msg, &["`services.web.ports[1]`", "already published"]);
    // Different addresses of the same family do not clash.
    ok(
        "services:\n  web:\n    image: x\n    ports: ['127.0.0.1:8080:80']\n  api:\n    image: y\n    ports: ['127.0.0.2:8080:80']\n",
    );
}

#[test]
fn volumes_in_a_file() {
    let spec = load_in(
        "volumes: {data: }\nservices:\n  web:\n    image: x\n    volumes:\n      - data:/d\n      - ./conf/../etc:/etc/app:ro\n",
        &[],
        Path::new("/srv/shop"),
    )
    .unwrap();
    assert_eq!(
        spec.services[0].mounts,
        [
            MountSpec::Volume {
                source: "data".into(),
                target: "/d".into(),
                read_only: false
            },
            MountSpec::Bind {
                source: "/srv/shop/etc".into(),
                target: "/etc/app".into(),
                read_only: true
            },
        ]
    );
    let msg = err("services:\n  web:\n    image: x\n    volumes: ['data:/d']\n");
    assert_contains(
        &msg,
        &[
            "`services.web.volumes[0]`",
            "`data` is not declared",
            "top-level `volumes`",
        ],
    );
    let msg = err("services:\n  web:\n    image: x\n    volumes: ['~/data:/d']\n");
    assert_contains(&msg, &["`services.web.volumes[0]`", "`~` is not supported"]);
    let msg = err("services:\n  web:\n    image: x\n    volumes: ['/data']\n");
    assert_contains(&msg, &["anonymous volume"]);
    let msg = err("services:\n  web:\n    image: x\n    volumes: ['./a:/d', './b:/d']\n");
    assert_contains(&msg, &["`services.web.volumes[1]`", "mounted twice"]);
}

#[test]
fn networks_rules() {
    let msg = err("services:\n  web:\n    image: x\n    networks: [front]\n");
    assert_contains(
        &msg,
        &["`services.web.networks[0]`", "`front` is not declared"],
    );
    let msg = err("networks:\n  front:\n    name: other\nservices:\n  web:\n    image: x\n");
    assert_contains(
        &msg,
        &[
            "`networks.front.name`",
            "only supported with `external: true`",
        ],
    );
    let msg = err("networks: {front: }\nservices:\n  web:\n    image: x\n    networks: []\n");
    assert_contains(&msg, &["`services.web.networks`", "at least one network"]);

    // `default` needs no declaration; declared networks that no service
    // uses are still project networks.
    let spec =
        ok("networks: {spare: }\nservices:\n  web:\n    image: x\n    networks: [default]\n");
    assert_eq!(spec.services[0].networks, ["default"]);
    assert_eq!(
        spec.networks,
        [
            NetworkSpec {
                name: "default".into(),
                external: false
            },
            NetworkSpec {
                name: "spare".into(),
                external: false
            },
        ]
    );
    // No service on `default`: no default network.
    let spec =
        ok("networks: {front: }\nservices:\n  web:\n    image: x\n    networks: {front: }\n");
    assert_eq!(
        spec.networks,
        [NetworkSpec {
            name: "front".into(),
            external: false
        }]
    );
    // An external `default`.
    let spec = ok(
        "networks:\n  default:\n    external: true\n    name: edge\nservices:\n  web:\n    image: x\n",
    );
    assert_eq!(spec.services[0].networks, ["edge"]);
    assert_eq!(
        spec.networks,
        [NetworkSpec {
            name: "edge".into(),
            external: true
        }]
    );
}

#[test]
fn healthcheck_forms() {
    let hc = |body: &str| {
        let spec = ok(&format!(
            "services:\n  web:\n    image: x\n    healthcheck:\n{body}"
        ));
        spec.services[0].healthcheck.clone()
    };
    assert_eq!(
        hc("      test: curl -f http://localhost/\n").map(|h| h.test),
        Some(vec![
            "CMD-SHELL".to_string(),
            "curl -f http://localhost/".to_string()
        ])
    );
    assert_eq!(
        hc("      test: [CMD-SHELL, \"exit 0\"]\n").map(|h| h.test),
        Some(vec!["CMD-SHELL".to_string(), "exit 0".to_string()])
    );
    assert_eq!(hc("      test: [NONE]\n"), None);
    assert_eq!(
        hc("      test: [CMD, \"true\"]\n      disable: true\n"),
        None
    );
    assert_eq!(
        hc(
            "      test: [CMD, \"true\"]\n      interval: 500ms\n      timeout: 1m\n      start_period: 0s\n"
        ),
        Some(DockerHealthcheck {
            test: vec!["CMD".into(), "true".into()],
            interval: Some(Duration::from_millis(500)),
            timeout: Some(secs(60)),
            retries: None,
            start_period: Some(Duration::ZERO),
        })
    );

    for (body, needle) in [
        ("      test: [curl, x]\n", "`curl` cannot start a test"),
        ("      test: [CMD]\n", "needs a program"),
        (
            "      test: [CMD-SHELL, a, b]\n",
            "exactly one shell command",
        ),
        ("      test: []\n", "empty"),
        ("      interval: 5s\n", "`test` is missing"),
        ("      test: \"true\"\n      interval: 0s\n", "at least 1ms"),
    ] {
        let msg = err(&format!(
            "services:\n  web:\n    image: x\n    healthcheck:\n{body}"
        ));
        assert_contains(&msg, &["`services.web.healthcheck", needle]);
    }
}

#[test]
fn restart_policies() {
    for (value, want) in [
        ("\"no\"", RestartPolicy::No),
        ("no", RestartPolicy::No),
        ("always", RestartPolicy::Always),
        ("on-failure", RestartPolicy::OnFailure),
        ("unless-stopped", RestartPolicy::UnlessStopped),
    ] {
        let spec = ok(&format!(
            "services:\n  web:\n    image: x\n    restart: {value}\n"
        ));
        assert_eq!(spec.services[0].restart, want, "{value}");
    }
    assert_contains(
        &err("services:\n  web:\n    image: x\n    restart: on-failure:3\n"),
        &["`services.web.restart`", "retry count"],
    );
    assert_contains(
        &err("services:\n  web:\n    image: x\n    restart: sometimes\n"),
        &["`services.web.restart`", "unless-stopped"],
    );
}

#[test]
fn deploy_replicas() {
    assert_eq!(
        ok("services:\n  web:\n    image: x\n    deploy: {replicas: 100}\n").services[0].replicas,
        100
    );
    for bad in ["0", "101"] {
        let msg = err(&format!(
            "services:\n  web:\n    image: x\n    deploy: {{replicas: {bad}}}\n"
        ));
        assert_contains(&msg, &["`services.web.deploy.replicas`", "1 to 100"]);
    }
    let (path, _) =
        unsupported("services:\n  web:\n    image: x\n    deploy: {replicas: 2, mode: global}\n");
    assert_eq!(path, "services.web.deploy.mode");
}

#[test]
fn user_and_working_dir() {
    let spec = ok("services:\n  web:\n    image: x\n    user: 1000\n    working_dir: /srv\n");
    assert_eq!(spec.services[0].user.as_deref(), Some("1000"));
    assert_contains(
        &err("services:\n  web:\n    image: x\n    working_dir: srv\n"),
        &["`services.web.working_dir`", "absolute"],
    );
}

#[test]
fn stop_grace_period_forms() {
    let g = |v: &str| {
        ok(&format!(
            "services:\n  web:\n    image: x\n    stop_grace_period: {v}\n"
        ))
        .services[0]
            .stop_grace_period
    };
    assert_eq!(g("1m30s"), secs(90));
    assert_eq!(g("500ms"), Duration::from_millis(500));
    assert_eq!(g("5"), secs(5));
}

// ---------------------------------------------------------------------------
// depends_on
// ---------------------------------------------------------------------------

#[test]
fn depends_on_order_is_stable() {
    let spec = ok(r#"
services:
  web:
    image: x
    depends_on: [api, cache]
  worker:
    image: x
    depends_on:
      db:
        condition: service_healthy
  api:
    image: x
    depends_on:
      db:
  cache:
    image: x
  db:
    image: x
"#);
    let names: Vec<&str> = spec.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["cache", "db", "worker", "api", "web"]);
    assert_eq!(service(&spec, "worker").depends_on, ["db"]);
}

#[test]
fn depends_on_errors() {
    let e = load_vars(
        "services:\n  a:\n    image: x\n    depends_on: [b]\n  b:\n    image: x\n    depends_on: [c]\n  c:\n    image: x\n    depends_on: [a]\n",
        &[],
    )
    .unwrap_err();
    assert!(
        matches!(&e, ComposeError::DependencyCycle { cycle, .. } if cycle == &["a", "b", "c", "a"]),
        "{e:?}"
    );
    assert_contains(
        &e.to_string(),
        &[
            FILE,
            "`services.a.depends_on`",
            "cycle",
            "a → b → c → a",
            "remove one",
        ],
    );

    assert_contains(
        &err("services:\n  a:\n    image: x\n    depends_on: [a]\n"),
        &["a → a"],
    );
    assert_contains(
        &err("services:\n  a:\n    image: x\n    depends_on: [nope]\n"),
        &["`services.a.depends_on`", "service `nope` does not exist"],
    );
    assert_contains(
        &err(
            "services:\n  a:\n    image: x\n    depends_on: {b: {condition: service_ready}}\n  b:\n    image: x\n",
        ),
        &[
            "`services.a.depends_on.b.condition`",
            "service_ready",
            "service_healthy",
        ],
    );
}

// ---------------------------------------------------------------------------
// x-deploy and the health gate
// ---------------------------------------------------------------------------

fn probe_of(yaml: &str) -> Probe {
    ok(yaml).services[0].deploy.health.probe.clone()
}

#[test]
fn probe_choice() {
    // x-deploy wins over the compose healthcheck.
    assert_eq!(
        probe_of(
            "services:\n  web:\n    image: x\n    ports: ['80:8080']\n    healthcheck: {test: \"true\"}\n    x-deploy: {health: {http: /ready}}\n"
        ),
        Probe::Http {
            path: "/ready".into(),
            port: 8080
        }
    );
    assert_eq!(
        probe_of(
            "services:\n  web:\n    image: x\n    x-deploy: {health: {http: /ready, port: 9000}}\n"
        ),
        Probe::Http {
            path: "/ready".into(),
            port: 9000
        }
    );
    assert_eq!(
        probe_of(
            "services:\n  web:\n    image: x\n    x-deploy: {health: {exec: \"pg_isready -q\"}}\n"
        ),
        Probe::Exec {
            command: vec!["pg_isready".into(), "-q".into()]
        }
    );
    assert_eq!(
        probe_of(
            "services:\n  web:\n    image: x\n    x-deploy: {health: {exec: [check, \"a b\"]}}\n"
        ),
        Probe::Exec {
            command: vec!["check".into(), "a b".into()]
        }
    );
    assert_eq!(
        probe_of(
            "services:\n  web:\n    image: x\n    healthcheck: {test: \"true\"}\n    x-deploy: {health: {docker: true}}\n"
        ),
        Probe::Docker
    );
    // The compose healthcheck, then the fallback.
    assert_eq!(
        probe_of("services:\n  web:\n    image: x\n    healthcheck: {test: \"true\"}\n"),
        Probe::Docker
    );
    assert_eq!(
        probe_of("services:\n  web:\n    image: x\n    ports: ['80:8080', '81:8081']\n"),
        Probe::Running { port: Some(8080) }
    );
    assert_eq!(
        probe_of("services:\n  web:\n    image: x\n"),
        Probe::Running { port: None }
    );
    // A disabled healthcheck is no healthcheck.
    assert_eq!(
        probe_of("services:\n  web:\n    image: x\n    healthcheck: {disable: true}\n"),
        Probe::Running { port: None }
    );
}

#[test]
fn start_period_defaults_depend_on_probe() {
    let h = |yaml: &str| ok(yaml).services[0].deploy.health.start_period;
    assert_eq!(h("services:\n  web:\n    image: x\n"), secs(2));
    assert_eq!(
        h("services:\n  web:\n    image: x\n    x-deploy: {health: {start_period: 7}}\n"),
        secs(7)
    );
    assert_eq!(
        h("services:\n  web:\n    image: x\n    x-deploy: {health: {tcp: 80}}\n"),
        Duration::ZERO
    );
}

#[test]
fn top_level_defaults_merge_field_by_field() {
    let spec = ok(r#"
x-deploy:
  health:
    http: /health
    interval: 2s
    unhealthy_after: 4
  proxy: tcp
  parallel: 3
  drain_timeout: 1m
services:
  web:
    image: x
    ports: ["80:8080"]
    deploy: {replicas: 4}
    x-deploy:
      health:
        interval: 3s
  single:
    image: x
    ports: ["81:9000"]
  db:
    image: x
    x-deploy:
      health:
        tcp: 5432
      proxy: http
"#);
    let web = service(&spec, "web");
    assert_eq!(
        web.deploy.health.probe,
        Probe::Http {
            path: "/health".into(),
            port: 8080
        }
    );
    assert_eq!(web.deploy.health.interval, secs(3));
    assert_eq!(web.deploy.health.unhealthy_after, 4);
    assert_eq!(web.deploy.proxy, ProxyMode::Tcp);
    assert_eq!(web.deploy.parallel, 3);
    assert_eq!(web.deploy.drain_timeout, secs(60));
    // A default `parallel` above the replica count is capped.
    assert_eq!(service(&spec, "single").deploy.parallel, 1);
    // The service's probe kind replaces the default's.
    let db = service(&spec, "db");
    assert_eq!(db.deploy.health.probe, Probe::Tcp { port: 5432 });
    assert_eq!(db.deploy.health.interval, secs(2));
    assert_eq!(db.deploy.proxy, ProxyMode::Http);
}

#[test]
fn http_probe_without_port_is_an_error() {
    let msg = err("services:\n  worker:\n    image: x\n    x-deploy: {health: {http: /health}}\n");
    assert_contains(
        &msg,
        &[
            "`services.worker.x-deploy.health.http`",
            "needs a container port",
            "add `port:",
        ],
    );
    // From the defaults, the message says which service it applies to.
    let msg = err("x-deploy: {health: {http: /health}}\nservices:\n  worker:\n    image: x\n");
    assert_contains(
        &msg,
        &["`x-deploy.health.http`", "applies to service `worker`"],
    );
}

#[test]
fn x_deploy_errors() {
    let cases = [
        (
            "x-deploy: {health: {http: /a, tcp: 80}}",
            "`services.web.x-deploy.health`",
            "exactly one probe",
        ),
        (
            "x-deploy: {health: {docker: true}}",
            "`services.web.x-deploy.health.docker`",
            "has none",
        ),
        (
            "x-deploy: {health: {docker: false}}",
            "`services.web.x-deploy.health.docker`",
            "does not choose a probe",
        ),
        (
            "x-deploy: {health: {tcp: 80, port: 81}}",
            "`services.web.x-deploy.health.port`",
            "port of the http probe",
        ),
        (
            "x-deploy: {health: {http: health}}",
            "`services.web.x-deploy.health.http`",
            "starting with `/`",
        ),
        (
            "x-deploy: {health: {tcp: 0}}",
            "`services.web.x-deploy.health.tcp`",
            "not a port number",
        ),
        (
            "x-deploy: {health: {exec: []}}",
            "`services.web.x-deploy.health.exec`",
            "needs a command",
        ),
        (
            "x-deploy: {health: {interval: 0s}}",
            "`services.web.x-deploy.health.interval`",
            "more than zero",
        ),
        (
            "x-deploy: {health: {healthy_after: 0}}",
            "`services.web.x-deploy.health.healthy_after`",
            "from 1",
        ),
        (
            "x-deploy: {parallel: 2}",
            "`services.web.x-deploy.parallel`",
            "more than the service's 1 replica",
        ),
        (
            "x-deploy: {parallel: 0}",
            "`services.web.x-deploy.parallel`",
            "at least 1",
        ),
        (
            "x-deploy: {drain_timeout: -1}",
            "`services.web.x-deploy.drain_timeout`",
            "negative",
        ),
    ];
    for (xd, path, needle) in cases {
        let msg = err(&format!("services:\n  web:\n    image: x\n    {xd}\n"));
        assert_contains(&msg, &[path, needle]);
    }
}

#[test]
fn probe_describe_is_usable() {
    // The probe chosen for the fallback reads well in output.
    assert_eq!(
        probe_of("services:\n  web:\n    image: x\n    ports: ['80:8080']\n").describe(),
        "running through start period, then tcp connect to port 8080"
    );
}

#[test]
fn labels_in_the_agents_namespace_are_refused() {
    let e =
        err("services:\n  web:\n    image: a\n    labels:\n      io.deploy-agent.release: v9\n");
    assert!(e.contains("io.deploy-agent.release"), "{e}");
    assert!(e.contains("reserves"), "{e}");
}
