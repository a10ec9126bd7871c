//! `bitbucket-operator crd`: prints the CustomResourceDefinitions, or writes
//! them into `crds/` and the Helm chart's copy.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

/// Where the chart keeps its copy of the CRDs (rendered by templates/crds.yaml).
pub const CHART_CRDS_DIR: &str = "charts/bitbucket-connector-operator/files/crds";

#[derive(Debug, clap::Args)]
pub struct CrdArgs {
    /// Write each CRD into `crds/<name>.yaml` and the chart's
    /// `files/crds/<name>.yaml` under this repository root (default: the
    /// current directory) instead of printing them.
    #[arg(long)]
    pub write: bool,
    /// Repository root used by --write.
    #[arg(long, default_value = ".", requires = "write")]
    pub root: PathBuf,
}

/// Runs `crd`.
pub fn run(args: CrdArgs) -> anyhow::Result<ExitCode> {
    if !args.write {
        print!("{}", super::all_crds_yaml()?);
        return Ok(ExitCode::SUCCESS);
    }
    for dir in [args.root.join("crds"), args.root.join(CHART_CRDS_DIR)] {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for crd in super::crds() {
            let path = dir.join(super::crd_file_name(&crd));
            std::fs::write(&path, super::crd_yaml(&crd)?).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
