//! The adoption commands: `list` (every workspace's decision) and `import`
//! (register a platform's existing workspaces from JSON Lines; the logic is
//! in `billing_mode::import`).

use std::process::ExitCode;

use anyhow::bail;
use billing_mode::{import, proto};
use clap::Args;
use serde_json::json;

use crate::client::{self, ClientArgs};

#[derive(Args)]
pub struct ListArgs {
    /// Only workspaces decided with this mode: platform_managed, byok or disabled.
    #[arg(long)]
    mode: Option<String>,
    /// Only workspaces decided by this source: override, derived_provider or default.
    #[arg(long)]
    source: Option<String>,
    /// Entries per request (1-500); the command pages through all of them.
    #[arg(long, default_value_t = 500)]
    page_size: u32,
    #[command(flatten)]
    client: ClientArgs,
}

fn mode_filter(s: &str) -> anyhow::Result<proto::Mode> {
    match s {
        "platform_managed" => Ok(proto::Mode::PlatformManaged),
        "byok" => Ok(proto::Mode::Byok),
        "disabled" => Ok(proto::Mode::Disabled),
        other => bail!("--mode {other:?}: use platform_managed, byok or disabled"),
    }
}

fn source_filter(s: &str) -> anyhow::Result<proto::Source> {
    match s.to_ascii_lowercase().as_str() {
        "override" => Ok(proto::Source::Override),
        "derived_provider" => Ok(proto::Source::DerivedProvider),
        "default" => Ok(proto::Source::Default),
        other => bail!("--source {other:?}: use override, derived_provider or default"),
    }
}

pub async fn list(a: ListArgs) -> ExitCode {
    client::run(a.client.json, async {
        let mode = a.mode.as_deref().map(mode_filter).transpose()?;
        let source = a.source.as_deref().map(source_filter).transpose()?;
        let mut c = client::connect(&a.client).await?;
        let mut all = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = c
                .list_workspaces(proto::ListWorkspacesRequest {
                    page_size: a.page_size,
                    page_token: page_token.clone(),
                    mode: mode.map_or(0, Into::into),
                    source: source.map_or(0, Into::into),
                })
                .await?
                .into_inner();
            all.extend(page.resolutions);
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        let mut text = String::new();
        for r in &all {
            let or_dash = |s: &str| {
                if s.is_empty() {
                    "-".to_owned()
                } else {
                    s.to_owned()
                }
            };
            text += &format!(
                "{}  {:<16}  {:<16}  {:<22}  {:<12}  {}  rev {}\n",
                r.workspace_id,
                import::mode_name(r.mode),
                import::source_name(r.source),
                or_dash(&r.provider),
                or_dash(&r.runtime),
                or_dash(&r.model),
                r.revision
            );
        }
        text += &format!("{} workspaces\n", all.len());
        let workspaces: Vec<_> = all.iter().map(client::resolution_json).collect();
        Ok((json!({"workspaces": workspaces, "count": all.len()}), text))
    })
    .await
}
