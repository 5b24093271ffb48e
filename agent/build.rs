// Embeds the git commit the binary was built from (`--version`).
// (Also included by controller/build.rs.)
fn main() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=DEPLOY_GIT_COMMIT={commit}");
    // Rebuild when the commit changes: HEAD and the refs, wherever git keeps
    // them (a worktree has its own HEAD). A path that does not exist would
    // make cargo rebuild every time, so only existing ones are named.
    let mut watched = false;
    for what in ["HEAD", "refs", "packed-refs"] {
        if let Some(p) = git(&["rev-parse", "--path-format=absolute", "--git-path", what])
            && std::path::Path::new(&p).exists()
        {
            println!("cargo:rerun-if-changed={p}");
            watched = true;
        }
    }
    if !watched {
        // Not a git checkout (a source tarball): nothing to watch but this.
        println!("cargo:rerun-if-changed=build.rs");
    }
}
