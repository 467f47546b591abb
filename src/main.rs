use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use url::Url;
use wgtwo_operator::authorize::{AuthorizeOptions, authorize};
use wgtwo_operator::commands;
use wgtwo_operator::commands::status::Scope;
use wgtwo_operator::controller::issuers::AllowedIssuer;
use wgtwo_operator::oauth::Prompt;
use wgtwo_operator::operator::{Election, RunConfig};

/// jemalloc: under the controller's allocation pattern (many short-lived JSON buffers across
/// threads) glibc's malloc kept 216 MiB RSS at 10,000 grants where jemalloc keeps 95-114 MiB, and
/// mimalloc 120-146 MiB (docs/benchmarks.md, `tools/bench.sh --grants 10000`).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Keeps wgtwo OAuth 2.0 access tokens alive in Kubernetes Secrets.
#[derive(Parser)]
// The last of a repeated flag wins, so `operator.extraArgs` in the chart can override a default.
#[command(name = "wgtwo-operator", version, about, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the WgtwoGrant CustomResourceDefinition as YAML (pipe it to `kubectl apply -f -`).
    Crd,
    /// Authorize a subscriber (browser login with SMS PIN) and write the refresh-token Secret and
    /// the WgtwoGrant that keeps their access token alive.
    Authorize(Box<AuthorizeArgs>),
    /// Run the controller: keep every WgtwoGrant's access token refreshed in its target Secret.
    Run(Box<RunArgs>),
    /// Sidecar: keep one Secret (a grant's target) as files in a volume shared with the
    /// application, updated within a second of every change (kubelet takes a minute or more).
    Agent(Box<AgentArgs>),
    /// One line per grant: type, Ready, reason, expiry and next refresh (with NAME: also its
    /// Ready message).
    Status(StatusArgs),
    /// Refresh a grant's token now, wait until the operator has, and print the new expiry or why
    /// it failed.
    Refresh(RefreshArgs),
    /// Offboard a subscriber: revoke the grant's authorization at the identity service (RFC 7009),
    /// then delete the grant and its Secrets. Nothing is deleted if the revocation fails.
    Revoke(Box<RevokeArgs>),
}

#[derive(Args)]
struct StatusArgs {
    /// One grant (default: every grant of the namespace).
    name: Option<String>,
    /// Namespace [default: the kubeconfig's].
    #[arg(short, long)]
    namespace: Option<String>,
    /// Every namespace.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    all_namespaces: bool,
}

#[derive(Args)]
struct RefreshArgs {
    /// The grant.
    name: String,
    /// Namespace [default: the kubeconfig's].
    #[arg(short, long)]
    namespace: Option<String>,
    /// How long to wait for the operator.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Args)]
struct RevokeArgs {
    /// The grant.
    name: String,
    /// Namespace [default: the kubeconfig's].
    #[arg(short, long)]
    namespace: Option<String>,
    /// Delete the grant even when the revocation fails (the authorization then stays valid at the
    /// identity service until its refresh token expires).
    #[arg(long)]
    force: bool,
    /// An identity service the grant's refresh token and client secret may be sent to (repeat for
    /// several), as the operator's flag: a grant naming any other issuer is refused.
    #[arg(long = "allowed-issuer", default_value = wgtwo_operator::api::DEFAULT_ISSUER_URL, value_parser = AllowedIssuer::parse)]
    allowed_issuers: Vec<AllowedIssuer>,
    /// Extra CA certificates (PEM) to trust for the identity service.
    #[arg(long)]
    ca_bundle: Option<PathBuf>,
    /// Timeout of each request to the identity service.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Args)]
struct AgentArgs {
    /// The Secret to keep as files: the grant's target.secretName.
    #[arg(long, env = "WGTWO_AGENT_SECRET")]
    secret: String,
    /// The Secret's namespace [default: the pod's namespace, else the kubeconfig's].
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,
    /// The directory to write into: an emptyDir (medium: Memory) shared with the application.
    #[arg(long, env = "WGTWO_AGENT_DIR")]
    dir: PathBuf,
    /// Mode of the files, in octal.
    #[arg(long, default_value = "0440", value_parser = parse_mode)]
    file_mode: u32,
    /// Address of /healthz and /readyz (ready once the files are written).
    #[arg(long, default_value = "0.0.0.0:8081")]
    probe_bind_address: std::net::SocketAddr,
    /// Also serve `GET /token` (JSON: access_token, token_type, expires_at) on this loopback
    /// address, e.g. 127.0.0.1:8090, for an application that re-fetches the token after a 401.
    #[arg(long)]
    serve_token: Option<std::net::SocketAddr>,
    /// How long one watch of the Secret lasts before it is renewed; a connection silent for 10 s
    /// longer is dropped and made again.
    #[arg(long, default_value = "50s", value_parser = parse_duration)]
    watch_timeout: Duration,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("{s:?} is not an octal mode such as 0440"))?;
    if mode > 0o777 {
        return Err(format!("{s:?}: only permission bits (at most 0777)"));
    }
    if mode & 0o444 == 0 {
        return Err(format!("{s:?}: nobody could read the files"));
    }
    Ok(mode)
}

#[derive(Args)]
struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WGTWO_NAMESPACE")]
    namespace: Option<String>,
    /// Extra CA certificates (PEM) to trust for identity services.
    #[arg(long, env = "WGTWO_CA_BUNDLE")]
    ca_bundle: Option<PathBuf>,
    /// Timeout of each request to the identity service.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// First delay after a failed refresh; doubles (with jitter) up to --max-backoff.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    min_backoff: Duration,
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    max_backoff: Duration,
    /// An identity service the operator may send credentials to (repeat for several). A grant whose
    /// issuerUrl is not listed is refused (IssuerNotAllowed) before any of its Secrets is read, so a
    /// grant cannot make the operator send a Secret to a server of the grant author's choosing.
    #[arg(long = "allowed-issuer", default_value = wgtwo_operator::api::DEFAULT_ISSUER_URL, value_parser = AllowedIssuer::parse)]
    allowed_issuers: Vec<AllowedIssuer>,
    /// A label or annotation prefix (the part before '/') that a grant's target.template may set
    /// (repeat for several; keys without a prefix are always allowed). Others are refused
    /// (TemplateInvalid): a replicator's annotation could copy the token into a namespace the
    /// grant's author can read.
    #[arg(long = "template-metadata-prefix", default_values = wgtwo_operator::controller::template::DEFAULT_METADATA_PREFIXES)]
    template_metadata_prefixes: Vec<String>,
    /// Reconciles running at once (0: unbounded). Each holds at most one refresh answer that is not
    /// yet written, so this also bounds what a crash can lose.
    #[arg(long, default_value_t = wgtwo_operator::controller::DEFAULT_CONCURRENCY)]
    concurrency: u16,
    /// Requests per second the reconciler may send to the Kubernetes API (0: unlimited); watches
    /// and leader election are not counted. Reconciles wait when it is reached.
    #[arg(long, default_value_t = wgtwo_operator::controller::DEFAULT_KUBE_API_QPS)]
    kube_api_qps: u32,
    /// Timeout of each Kubernetes API request other than watches.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    kube_api_timeout: Duration,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_bind_address: std::net::SocketAddr,
    /// Elect a leader on a Lease so several replicas can run; only the leader refreshes. Set to
    /// false only when exactly one replica runs.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the Lease [default: the pod's namespace].
    #[arg(long, env = "POD_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(long, default_value = "wgtwo-operator")]
    leader_election_id: String,
    /// How long a leader that stops renewing keeps the Lease. A leader sends a token request only
    /// with more than --request-timeout + 5s of it left.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// How often the leader renews the Lease (and a standby checks it).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    lease_renew_period: Duration,
    /// On SIGTERM, how long a rotated refresh token whose state Secret write failed is retried
    /// before the process gives up and exits (keep it under the pod's termination grace period).
    /// While one is unwritten, the Lease is not released: the standby waits for it to expire.
    #[arg(long, default_value = "25s", value_parser = parse_duration)]
    shutdown_timeout: Duration,
    /// Begin each watch with a streaming list (the WatchList feature, on by default in Kubernetes
    /// 1.32 and since 1.34) instead of a LIST in pages of 500. The apiserver refuses it where the
    /// feature is off, and the watches then never sync (the readiness probe stays failed).
    #[arg(long)]
    streaming_lists: bool,
    /// Write each refresh answer to a journal in this directory before anything else, and replay
    /// it on start: a container killed after a token answer arrived and before the state Secret
    /// held its rotated refresh token keeps that grant when it restarts in the same pod. Use a
    /// memory-backed emptyDir (the chart does): the journal holds refresh tokens.
    #[arg(long, env = "WGTWO_JOURNAL_DIR")]
    journal_dir: Option<PathBuf>,
}

#[derive(Args)]
struct AuthorizeArgs {
    /// Name of the WgtwoGrant to create or update.
    grant: String,
    /// Namespace of the grant and of every Secret it uses.
    #[arg(short, long, default_value = "default")]
    namespace: String,
    /// Secret holding the OAuth client (keys client_id and client_secret).
    #[arg(long, default_value = "wgtwo-client")]
    client_secret: String,
    /// Scopes to request, space separated; offline_access is needed for a refresh token.
    #[arg(long, default_value = "phone offline_access openid")]
    scope: String,
    /// The wgtwo identity service.
    #[arg(long, default_value = wgtwo_operator::api::DEFAULT_ISSUER_URL)]
    issuer_url: String,
    /// Redirect URI registered for the client. Without --paste it must be http on loopback with a
    /// port, and authorize listens there for the browser.
    #[arg(long, default_value = "http://127.0.0.1:8085/callback")]
    redirect_uri: Url,
    /// Read the URL the browser was redirected to from stdin (for a redirect URI served elsewhere,
    /// such as https://example.com/callback).
    #[arg(long)]
    paste: bool,
    /// How long to wait for the subscriber, e.g. 5m or 90s.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    timeout: Duration,
    /// Secret to write the refresh token to [default: GRANT-authorization].
    #[arg(long)]
    refresh_token_secret: Option<String>,
    /// Secret the operator will keep the access token in [default: GRANT-token].
    #[arg(long)]
    target_secret: Option<String>,
    /// OpenID Connect prompt: login, consent, "login consent", none or default.
    #[arg(long, default_value = "default", value_parser = |s: &str| s.parse::<Prompt>())]
    prompt: Prompt,
    /// Do not try to open a browser; only print the URL.
    #[arg(long)]
    no_browser: bool,
    /// Extra CA certificates (PEM) to trust for the identity service.
    #[arg(long)]
    ca_bundle: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d: jiff::SignedDuration = s.parse().map_err(|_| format!("{s:?} is not a duration such as 90s, 5m or 1h30m"))?;
    Duration::try_from(d).map_err(|_| format!("{s:?} must not be negative"))
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: log collectors and files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    // The agent watches one Secret: one thread is plenty, and keeps a sidecar's memory small.
    let mut runtime = match cli.command {
        Command::Agent(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = runtime.enable_all().build().expect("the tokio runtime starts");
    if let Err(err) = runtime.block_on(run(cli)) {
        // One line: the error and its causes.
        eprintln!("wgtwo-operator: {err:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crd => print!("{}", wgtwo_operator::api::crd_yaml()),
        Command::Run(a) => {
            let a = *a;
            let ca_bundle_pem = match &a.ca_bundle {
                Some(path) => {
                    Some(std::fs::read(path).map_err(|e| anyhow::anyhow!("--ca-bundle {}: {e}", path.display()))?)
                }
                None => None,
            };
            let controller = wgtwo_operator::controller::Options {
                namespace: a.namespace,
                ca_bundle_pem,
                request_timeout: a.request_timeout,
                min_backoff: a.min_backoff,
                max_backoff: a.max_backoff,
                allowed_issuers: a.allowed_issuers,
                concurrency: a.concurrency,
                template_metadata_prefixes: a.template_metadata_prefixes,
                shutdown_timeout: a.shutdown_timeout,
                streaming_lists: a.streaming_lists,
            };
            let election = a.leader_elect.then_some(Election {
                namespace: a.leader_election_namespace,
                lease_name: a.leader_election_id,
                lease_duration: a.lease_duration,
                renew_period: a.lease_renew_period,
            });
            if let Some(e) = &election {
                e.validate(&controller)?;
            }
            let config = RunConfig {
                controller,
                kube_api_timeout: a.kube_api_timeout,
                kube_api_qps: a.kube_api_qps,
                metrics_address: a.metrics_bind_address,
                election,
                journal_dir: a.journal_dir,
            };
            wgtwo_operator::operator::run(kube::Config::infer().await?, config).await?;
        }
        Command::Agent(a) => {
            let a = *a;
            let kube_config = kube::Config::infer().await?;
            let namespace = a.namespace.unwrap_or_else(|| kube_config.default_namespace.clone());
            let config = wgtwo_operator::agent::AgentConfig {
                namespace,
                secret: a.secret,
                dir: a.dir,
                file_mode: a.file_mode,
                probe_address: a.probe_bind_address,
                token_address: a.serve_token,
                watch_timeout: a.watch_timeout,
            };
            anyhow::ensure!(config.watch_timeout >= Duration::from_secs(1), "--watch-timeout: at least 1s");
            let client = wgtwo_operator::agent::client(kube_config, config.watch_timeout)?;
            wgtwo_operator::agent::run(client, config).await?;
        }
        Command::Status(a) => {
            let (client, default_ns) = kube_client().await?;
            let scope = match (a.all_namespaces, a.namespace) {
                (true, _) => Scope::AllNamespaces,
                (false, ns) => Scope::Namespace(ns.unwrap_or(default_ns)),
            };
            commands::status::run(client, scope, a.name.as_deref(), &mut std::io::stdout()).await?;
        }
        Command::Refresh(a) => {
            let (client, default_ns) = kube_client().await?;
            let ns = a.namespace.unwrap_or(default_ns);
            commands::refresh::run(client, &ns, &a.name, a.timeout, &mut std::io::stdout()).await?;
        }
        Command::Revoke(a) => {
            let a = *a;
            let (client, default_ns) = kube_client().await?;
            let opts = commands::revoke::Options {
                namespace: a.namespace.unwrap_or(default_ns),
                name: a.name,
                force: a.force,
                allowed_issuers: a.allowed_issuers,
                ca_bundle: a.ca_bundle,
                timeout: a.timeout,
            };
            commands::revoke::run(client, opts, &mut std::io::stdout()).await?;
        }
        Command::Authorize(a) => {
            let a = *a;
            let kube = kube::Client::try_default().await?;
            let opts = AuthorizeOptions {
                namespace: a.namespace,
                grant: a.grant,
                client_secret_name: a.client_secret,
                scope: a.scope,
                issuer_url: a.issuer_url,
                redirect_uri: a.redirect_uri,
                paste: a.paste,
                timeout: a.timeout,
                refresh_token_secret: a.refresh_token_secret,
                target_secret: a.target_secret,
                prompt: a.prompt,
                open_browser: !a.no_browser,
                ca_bundle: a.ca_bundle,
            };
            authorize(kube, opts, &mut std::io::stdout()).await.map_err(|e| e.context("authorize"))?;
        }
    }
    Ok(())
}

/// A client with the caller's own credentials, and the kubeconfig's namespace (as kubectl uses).
async fn kube_client() -> anyhow::Result<(kube::Client, String)> {
    let config = kube::Config::infer().await?;
    let namespace = config.default_namespace.clone();
    Ok((kube::Client::try_from(config)?, namespace))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> RunArgs {
        let cli = Cli::try_parse_from(["wgtwo-operator", "run"].iter().chain(args)).unwrap();
        match cli.command {
            Command::Run(a) => *a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_agent_takes_an_octal_file_mode_that_someone_can_read() {
        assert_eq!(parse_mode("0440"), Ok(0o440));
        assert_eq!(parse_mode("0o400"), Ok(0o400));
        assert!(parse_mode("0200").unwrap_err().contains("nobody could read"));
        assert!(parse_mode("1777").is_err());
        assert!(parse_mode("rw").is_err());
    }

    #[test]
    fn allowed_issuers_default_to_wgtwo_and_repeat_while_a_repeated_plain_flag_takes_the_last_value() {
        let a = run_args(&[]);
        let issuers: Vec<&str> = a.allowed_issuers.iter().map(AllowedIssuer::as_str).collect();
        assert_eq!(issuers, ["https://id.wgtwo.com"]);
        let a = run_args(&[
            "--allowed-issuer",
            "https://id.wgtwo.com",
            "--allowed-issuer",
            "http://127.0.0.1:4444",
            "--request-timeout",
            "3s",
            "--request-timeout",
            "8s",
        ]);
        let issuers: Vec<&str> = a.allowed_issuers.iter().map(AllowedIssuer::as_str).collect();
        assert_eq!(issuers, ["https://id.wgtwo.com", "http://127.0.0.1:4444"]);
        assert_eq!(a.request_timeout, Duration::from_secs(8));
    }
}
