//! The main job, locally: a real kube-apiserver and Ory Hydra on loopback, a subscriber authorized
//! with `wgtwo-operator authorize`, a product grant (client credentials) next to it, the operator
//! running, and both target Secrets being renewed. Tokens are never printed, only a fingerprint of
//! each.
//!
//!   wgtwo-demo --operator target/debug/wgtwo-operator [--rotations N] [--keep]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use wgtwo_testenv::process::ChildGuard;
use wgtwo_testenv::{ControlPlane, Hydra, HydraOptions, Subscriber};

const NS: &str = "demo";
const REDIRECT: &str = "https://example.com/callback";
const TTL: Duration = Duration::from_secs(20);
/// The scope of the demo product's own token.
const PRODUCT_SCOPE: &str = "subscription.read";
/// A product grant as a platform team writes it.
const PRODUCT_GRANT: &str = r#"apiVersion: auth.wgtwo.com/v1alpha1
kind: WgtwoGrant
metadata:
  name: product
  namespace: demo
spec:
  issuerUrl: ISSUER
  clientSecretRef:
    name: product-client
  clientCredentials: {}
  scope: subscription.read
  target:
    secretName: product-token
"#;

struct Args {
    operator: String,
    rotations: usize,
    keep: bool,
}

fn args() -> anyhow::Result<Args> {
    let mut args = Args { operator: String::new(), rotations: 3, keep: false };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--operator" => args.operator = it.next().context("--operator PATH")?,
            "--rotations" => args.rotations = it.next().context("--rotations N")?.parse()?,
            "--keep" => args.keep = true,
            other => bail!("unknown argument {other}; usage: wgtwo-demo --operator PATH [--rotations N] [--keep]"),
        }
    }
    anyhow::ensure!(!args.operator.is_empty(), "usage: wgtwo-demo --operator PATH [--rotations N] [--keep]");
    Ok(args)
}

fn step(text: &str) {
    println!("\n==> {text}");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    step(&format!("starting kube-apiserver + etcd and Ory Hydra on loopback (access tokens live {}s)", TTL.as_secs()));
    let (cp, hydra) =
        tokio::join!(ControlPlane::start(), Hydra::start(HydraOptions { access_token_ttl: TTL, ..Default::default() }));
    let (cp, hydra) = (cp?, hydra?);
    println!("    apiserver {}   hydra {}", cp.url(), hydra.base_url());
    let dir = tempfile::tempdir()?;
    let ca_file = dir.path().join("hydra-ca.pem");
    std::fs::write(&ca_file, hydra.ca_pem())?;

    step("registering an OAuth client in Hydra and storing it in Secret demo/wgtwo-client");
    let client = hydra.create_client(&[REDIRECT]).await?;
    cp.create_namespace(NS).await?;
    let kube = cp.admin_client().await?;
    let secrets: Api<Secret> = Api::namespaced(kube.clone(), NS);
    let client_secret = client.kube_secret("wgtwo-client");
    secrets.create(&PostParams::default(), &client_secret).await?;

    step("wgtwo-operator authorize alice -n demo --paste   (a simulated subscriber logs in and consents)");
    let mut authorize = Command::new(&args.operator)
        .args(["authorize", "alice", "-n", NS, "--paste", "--no-browser", "--redirect-uri", REDIRECT])
        .args(["--issuer-url", &hydra.base_url()])
        .arg("--ca-bundle")
        .arg(&ca_file)
        .env("KUBECONFIG", cp.admin_kubeconfig())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("start wgtwo-operator authorize")?;
    let mut stdout = BufReader::new(authorize.stdout.take().unwrap());
    let url = loop {
        let mut line = String::new();
        anyhow::ensure!(stdout.read_line(&mut line)? > 0, "authorize printed no URL");
        print!("    | {line}");
        if let Some(rest) = line.trim().strip_prefix("https://") {
            break format!("https://{rest}");
        }
    };
    let callback = hydra.authorize(&url, &Subscriber::new("alice", "+4799999999")).await?;
    println!("    (the browser ends on {}?code=…&state=…; pasting it)", REDIRECT);
    writeln!(authorize.stdin.as_mut().unwrap(), "{}", callback.url)?;
    for line in stdout.lines() {
        println!("    | {}", line?);
    }
    anyhow::ensure!(authorize.wait()?.success(), "authorize failed");

    step(&format!(
        "registering a product's OAuth client in Hydra (client credentials, scope {PRODUCT_SCOPE}) and storing it in Secret demo/product-client"
    ));
    let product = hydra.create_client_with(&[], &["client_credentials"], PRODUCT_SCOPE).await?;
    secrets.create(&PostParams::default(), &product.kube_secret("product-client")).await?;

    step("kubectl apply --server-side -f deploy/manifests/wgtwo-operator.yaml   (CRD, ServiceAccount, RBAC, ...)");
    let manifests = wgtwo_testenv::repo_root().join("deploy/manifests/wgtwo-operator.yaml");
    print!(
        "{}",
        indent(&cp.kubectl(&["apply", "--server-side", "--force-conflicts", "-f", manifests.to_str().unwrap()])?)
    );
    let (_, operator_kubeconfig) = cp.service_account_client("wgtwo-system", "wgtwo-operator").await?;

    step("kubectl apply -f product-grant.yaml   (the product's own token, next to alice's)");
    let product_grant = PRODUCT_GRANT.replace("ISSUER", &hydra.base_url());
    print!("{}", indent(&product_grant));
    let grant_file = dir.path().join("product-grant.yaml");
    std::fs::write(&grant_file, &product_grant)?;
    print!("{}", indent(&cp.kubectl(&["apply", "-f", grant_file.to_str().unwrap()])?));

    let port = wgtwo_testenv::free_port();
    step(&format!(
        "wgtwo-operator run --namespace demo --allowed-issuer {} --metrics-bind-address 127.0.0.1:{port}   (as ServiceAccount wgtwo-system/wgtwo-operator)",
        hydra.base_url()
    ));
    let mut cmd = Command::new(&args.operator);
    cmd.args(["run", "--namespace", NS, "--leader-election-namespace", "wgtwo-system"])
        // Credentials go only to allowed identity services; here the local Hydra.
        .args(["--allowed-issuer", &hydra.base_url()])
        .args(["--metrics-bind-address", &format!("127.0.0.1:{port}")])
        .arg("--ca-bundle")
        .arg(&ca_file)
        .env("KUBECONFIG", &operator_kubeconfig)
        .env("RUST_LOG", "info");
    let log = dir.path().join("operator.log");
    let mut operator = ChildGuard::spawn("wgtwo-operator", cmd, &log)?;
    println!("    (operator log: {})", log.display());

    step(&format!(
        "watching Secrets demo/alice-token and demo/product-token for {} renewals each (fingerprints, never tokens)",
        args.rotations
    ));
    let started = Instant::now();
    // Per target Secret: the last token seen and how many were seen.
    let mut seen = [("alice-token", None, 0), ("product-token", None, 0)];
    while seen.iter().any(|(_, _, n)| *n <= args.rotations) {
        operator.check_running()?;
        anyhow::ensure!(started.elapsed() < TTL * (args.rotations as u32 + 3), "no renewal seen in time");
        for (name, last, count) in &mut seen {
            let Some(secret) = secrets.get_opt(name).await? else { continue };
            let data = secret.data.unwrap_or_default();
            let get = |k: &str| data.get(k).map(|v| String::from_utf8_lossy(&v.0).into_owned());
            let token = get("access_token").unwrap_or_default();
            if Some(&token) != last.as_ref() {
                let introspected = hydra.introspect(&token).await?;
                let who = match get("phone_number") {
                    Some(phone) => format!("phone_number {phone}"),
                    None => format!("scope {}", get("scope").unwrap_or_default()),
                };
                println!(
                    "    {:>5.1}s  {name:<13}  access_token sha256 {}…  expires_at {}  {who}  active at Hydra: {}",
                    started.elapsed().as_secs_f64(),
                    &wgtwo_testenv::sha256_hex(&token)[..12],
                    get("expires_at").unwrap_or_default(),
                    introspected["active"]
                );
                *last = Some(token);
                *count += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    step("kubectl get wgtwogrants -n demo");
    print!("{}", indent(&cp.kubectl(&["get", "wgtwogrants", "-n", NS])?));
    step("wgtwo-operator status -n demo   (also as kubectl wgtwo status)");
    let status = Command::new(&args.operator)
        .args(["status", "-n", NS])
        .env("KUBECONFIG", cp.admin_kubeconfig())
        .output()
        .context("wgtwo-operator status")?;
    anyhow::ensure!(status.status.success(), "status: {}", String::from_utf8_lossy(&status.stderr));
    print!("{}", indent(&String::from_utf8_lossy(&status.stdout)));
    step("kubectl get secrets -n demo");
    print!("{}", indent(&cp.kubectl(&["get", "secrets", "-n", NS])?));
    step(&format!("curl -s 127.0.0.1:{port}/metrics | grep -v '^#'   (histogram buckets left out)"));
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await?.text().await?;
    for line in metrics.lines().filter(|l| !l.starts_with('#') && !l.contains("_bucket")) {
        println!("    {line}");
    }

    if args.keep {
        step("keeping everything running; press Ctrl-C to stop and clean up");
        println!("    export KUBECONFIG={}", cp.admin_kubeconfig().display());
        tokio::signal::ctrl_c().await?;
    }
    step("done: stopping the operator, Hydra and the control plane");
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}
