//! Retention: the last N releases keep their images and snapshots; older
//! ones are pruned, never the current or previous one, never an image the
//! agent did not pull itself. Real Docker Engine, real registry.

use std::process::Command;
use std::time::Duration;

use deploy_testkit::{Harness, docker};

const BIN: &str = env!("CARGO_BIN_EXE_deploy-agent");
const PROJECT: &str = "web";

/// An image only this test has: demo:v1 plus a file with a unique id, pushed
/// to the registry and then removed locally, so the agent has to pull it.
fn unique_image(h: &Harness, repo: &str, tag: &str) -> String {
    let dir = h.dir().join(format!("build-{tag}"));
    std::fs::create_dir_all(&dir).expect("build dir");
    std::fs::write(dir.join("id.txt"), format!("{repo}:{tag}\n")).expect("id file");
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM 127.0.0.1:5000/demo:v1\nCOPY id.txt /etc/unique-id\n",
    )
    .expect("Dockerfile");
    let reference = format!("127.0.0.1:5000/{repo}:{tag}");
    let status = Command::new("docker")
        .args(["build", "-q", "-t", &reference])
        .arg(&dir)
        .env("DOCKER_BUILDKIT", "0")
        .status()
        .expect("docker build runs");
    assert!(status.success(), "docker build of {reference} failed");
    docker(&["push", "--quiet", &reference]);
    docker(&["rmi", &reference]);
    reference
}

fn image_present(reference: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", reference])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn compose(h: &Harness, port: u16, image: &str, name: &str) -> std::path::PathBuf {
    h.write_file(
        name,
        &format!(
            "x-deploy:\n  observe: {{window: 0s}}\nservices:\n  web:\n    image: {image}\n    ports: [\"127.0.0.1:{port}:80\"]\n    x-deploy:\n      health: {{http: /health, interval: 200ms, deadline: 15s}}\n      drain_timeout: 2s\n"
        ),
    )
}

#[test]
fn old_releases_are_pruned_but_not_current_previous_or_foreign_images() {
    let h = Harness::builder(BIN).config_line("retain = 2").start();
    let port = h.free_port();
    let repo = format!("prune-{}", h.instance);
    let images: Vec<String> = ["p1", "p2", "p3"]
        .iter()
        .map(|t| unique_image(&h, &repo, t))
        .collect();
    for (i, image) in images.iter().enumerate() {
        let file = compose(&h, port, image, &format!("compose-{i}.yml"));
        h.deploy_ok(PROJECT, &file, &format!("r{}", i + 1));
    }
    h.wait_serving(port, "v1", Duration::from_secs(10));

    // r1 is beyond the last 2: its containers and its image are gone.
    assert!(
        !h.containers().iter().any(|c| c.name.contains("-r1-")),
        "r1's containers must be removed: {:?}",
        h.containers()
    );
    assert!(
        !image_present(&images[0]),
        "r1's image (pulled by the agent) must be pruned"
    );
    // r2 (previous) and r3 (current) keep theirs.
    assert!(
        image_present(&images[1]),
        "the previous release's image must stay"
    );
    assert!(
        image_present(&images[2]),
        "the current release's image must stay"
    );
    let audit = h.audit_export(Some(PROJECT));
    assert!(
        audit
            .iter()
            .any(|r| r["action"] == "release.pruned" && r["release"] == "r1"),
        "pruning is audited"
    );
    // A pruned release cannot be restored; the previous one can.
    let out = h.rollback(PROJECT, Some("r1"));
    out.expect_code(2);
    assert!(out.text().contains("pruned"), "{out}");
    h.rollback(PROJECT, None).expect_code(0);
    h.assert_current(PROJECT, "r2");

    // demo:v1 was on this host before the agent pulled it: never pruned.
    let foreign = "127.0.0.1:5000/demo:v1";
    let file = compose(&h, port, foreign, "compose-foreign.yml");
    h.deploy_ok(PROJECT, &file, "f1");
    for (i, image) in images.iter().enumerate().skip(1) {
        let file = compose(&h, port, image, &format!("compose-again-{i}.yml"));
        h.deploy_ok(PROJECT, &file, &format!("again{i}"));
    }
    let releases: Vec<String> = h
        .history(PROJECT)
        .iter()
        .filter_map(|e| e["release"].as_str().map(str::to_string))
        .collect();
    assert!(releases.contains(&"f1".to_string()), "{releases:?}");
    assert!(
        audit_has_pruned(&h, "f1"),
        "f1 is beyond the last 2 releases and is pruned"
    );
    assert!(
        image_present(foreign),
        "an image the agent did not pull is never removed"
    );
}

fn audit_has_pruned(h: &Harness, release: &str) -> bool {
    h.audit_export(Some(PROJECT))
        .iter()
        .any(|r| r["action"] == "release.pruned" && r["release"] == release)
}
