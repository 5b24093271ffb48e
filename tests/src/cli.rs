//! Checks of a binary's command line (clap), shared by both binaries' tests.

/// Every option of `cmd` and its subcommands that has no help line, as
/// `"sub sub --option"`.
pub fn options_without_help(cmd: &clap::Command) -> Vec<String> {
    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if matches!(id, "help" | "version") || a.is_positional() {
                continue;
            }
            if a.get_help().is_none() && a.get_long_help().is_none() {
                missing.push(format!("{path} --{id}").trim().to_string());
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }
    let mut missing = Vec::new();
    walk(cmd, "", &mut missing);
    missing
}

/// The long help of subcommand `name`, as printed by `NAME --help`.
pub fn help_of(cmd: &mut clap::Command, name: &str) -> String {
    cmd.find_subcommand_mut(name)
        .map(|c| c.render_long_help().to_string())
        .unwrap_or_default()
}
