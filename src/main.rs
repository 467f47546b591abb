use clap::{Parser, Subcommand};

/// Keeps wgtwo OAuth 2.0 access tokens alive in Kubernetes Secrets.
#[derive(Parser)]
#[command(name = "wgtwo-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the WgtwoGrant CustomResourceDefinition as YAML (pipe it to `kubectl apply -f -`).
    Crd,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", wgtwo_operator::api::crd_yaml()),
    }
    Ok(())
}
