//! `paddock chart`: writes the operator's Helm chart and, beside it, the operator's `zarf.yaml`.
//!
//! Thin by design: [`paddock_deploy`] builds every file; this module only writes them. The chart
//! directory is replaced as a whole (built in a temporary sibling directory, then renamed over the old
//! one), so a reader never sees half a chart and files the generator no longer makes disappear;
//! `zarf.yaml` is written atomically next to it (`--zarf` chooses another place).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

/// `paddock chart` flags.
#[derive(Debug, Args)]
pub struct ChartArgs {
    /// The chart directory to (re)write; the committed copy is `deploy/chart`.
    #[arg(long, short = 'o', value_name = "DIRECTORY")]
    output: PathBuf,
    /// Where the operator's Zarf package definition goes (default: `zarf.yaml` beside the chart
    /// directory, which is where its `localPath: chart` points).
    #[arg(long, value_name = "FILE")]
    zarf: Option<PathBuf>,
}

/// Writes the chart and `zarf.yaml`.
pub fn run(arguments: &ChartArgs) -> anyhow::Result<()> {
    let files = paddock_deploy::chart_files().context("cannot build the chart")?;
    let zarf = paddock_deploy::zarf_yaml().context("cannot build zarf.yaml")?;
    let output = &arguments.output;
    let parent = parent_of(output);
    std::fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(".paddock-chart-")
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a temporary directory in {}", parent.display()))?;
    for file in &files {
        let path = staging.path().join(&file.path);
        if let Some(directory) = path.parent() {
            std::fs::create_dir_all(directory)
                .with_context(|| format!("cannot create {}", directory.display()))?;
        }
        std::fs::write(&path, &file.contents).with_context(|| format!("cannot write {}", path.display()))?;
    }
    // Swap: the old chart moves aside, the new one into place, then the old one is removed.
    let old = parent.join(format!(".paddock-chart-old-{}", std::process::id()));
    let had_old = output.exists();
    if had_old {
        std::fs::rename(output, &old)
            .with_context(|| format!("cannot move the old chart {} aside", output.display()))?;
    }
    let staged = staging.keep();
    std::fs::set_permissions(&staged, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .with_context(|| format!("cannot set the mode of {}", staged.display()))?;
    if let Err(error) = std::fs::rename(&staged, output) {
        if had_old {
            let _ = std::fs::rename(&old, output);
        }
        let _ = std::fs::remove_dir_all(&staged);
        return Err(error).with_context(|| format!("cannot move the new chart into {}", output.display()));
    }
    if had_old {
        std::fs::remove_dir_all(&old)
            .with_context(|| format!("cannot remove the old chart {}", old.display()))?;
    }
    let zarf_path = arguments.zarf.clone().unwrap_or_else(|| parent.join("zarf.yaml"));
    write_atomically(&zarf_path, zarf.as_bytes())?;
    eprintln!(
        "paddock chart: wrote {} files to {} and {}",
        files.len(),
        output.display(),
        zarf_path.display()
    );
    Ok(())
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn write_atomically(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let parent = parent_of(path);
    let mut file = tempfile::NamedTempFile::new_in(&parent)
        .with_context(|| format!("cannot create a temporary file in {}", parent.display()))?;
    file.write_all(contents)
        .with_context(|| format!("cannot write {}", path.display()))?;
    // A generated source file, readable like the rest of the tree (temporary files start at 0600).
    file.as_file()
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    file.persist(path)
        .with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use clap::Parser;

    /// The Deployment's arguments, with the chart's default values filled in, are flags
    /// `paddock operator` accepts, and they set what the chart means them to set.
    #[derive(Debug, Parser)]
    struct Operator {
        #[command(flatten)]
        arguments: crate::operator::OperatorArgs,
    }

    #[test]
    fn deployment_arguments_parse_as_paddock_operator_flags() {
        let deployment = paddock_deploy::chart::deployment().unwrap();
        let mut arguments = vec!["paddock".to_owned()];
        let mut in_args = false;
        for line in deployment.lines() {
            if line.trim().trim_start_matches("- ") == "args:" {
                in_args = true;
                continue;
            }
            if in_args {
                let Some(item) = line.trim().strip_prefix("- ") else {
                    if line.trim().starts_with("{{-") {
                        continue;
                    }
                    break;
                };
                // The chart's defaults, as Helm would render them.
                let rendered = item
                    .replace("{{ .Release.Name }}", "paddock")
                    .replace(
                        r#"{{ printf "--webhook-configuration-name=%s" .Values.webhook.configurationName | quote }}"#,
                        "--webhook-configuration-name=paddock",
                    )
                    .replace(
                        r#"{{ printf "--console-gateway-url=%s" (.Values.consoleGatewayUrl | default (ternary (printf "ws://%s-console.%s.svc" .Release.Name .Release.Namespace) "" .Values.console.enabled) | required "consoleGatewayUrl must be set when console.enabled is false") | quote }}"#,
                        "--console-gateway-url=ws://paddock-console.paddock-system.svc",
                    )
                    .replace(
                        r#"{{ printf "--namespace=%s" . | quote }}"#,
                        "--namespace=vms",
                    )
                    .replace(
                        r#"{{ printf "--backup-concurrency=%v" .Values.backup.concurrency | quote }}"#,
                        "--backup-concurrency=1",
                    );
                assert!(!rendered.contains("{{"), "unrendered argument {rendered}");
                arguments.push(rendered);
            }
        }
        assert_eq!(arguments.get(1).map(String::as_str), Some("operator"));
        arguments.remove(1);
        let parsed = Operator::try_parse_from(&arguments).unwrap();
        let shown = format!("{:?}", parsed.arguments);
        for expected in [
            "namespace: Some(\"vms\")",
            "webhook_service: Some(\"paddock-webhook\")",
            "webhook_listen: 0.0.0.0:8443",
            "listen: 0.0.0.0:8080",
            "lease_name: \"paddock-operator\"",
            // The chart owns the webhook configurations; the operator only injects the CA.
            "webhook_configurations: InjectCa",
            // Backups: one at a time, scratch space on the chart's emptyDir.
            "backup_concurrency: 1,",
            "backup_scratch_directory: Some(\"/var/lib/paddock/backup-scratch\")",
        ] {
            assert!(shown.contains(expected), "{expected} not in {shown}");
        }
    }

    #[test]
    fn writes_the_chart_and_replaces_an_old_one_whole() {
        let directory = tempfile::tempdir().unwrap();
        let output = directory.path().join("chart");
        std::fs::create_dir_all(output.join("templates")).unwrap();
        std::fs::write(output.join("templates/stale.yaml"), "stale").unwrap();
        super::run(&super::ChartArgs {
            output: output.clone(),
            zarf: None,
        })
        .unwrap();
        assert!(!output.join("templates/stale.yaml").exists());
        for file in paddock_deploy::chart_files().unwrap() {
            assert_eq!(
                std::fs::read_to_string(output.join(&file.path)).unwrap(),
                file.contents
            );
        }
        assert_eq!(
            std::fs::read_to_string(directory.path().join("zarf.yaml")).unwrap(),
            paddock_deploy::zarf_yaml().unwrap()
        );
        let leftovers: Vec<_> = std::fs::read_dir(directory.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .filter(|name| name.to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
