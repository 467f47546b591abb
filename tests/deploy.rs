//! What ships in deploy/: the Helm chart lints, the plain manifests are the chart rendered and a
//! real apiserver accepts them, the Deployment is hardened, and the alert rules pass promtool's
//! checks and their unit tests, and the Grafana dashboard is well formed, its queries pass promtool
//! and it ships as a sidecar ConfigMap when enabled.

mod dashboard_queries;
mod support;

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use wgtwo_testenv::{ControlPlane, binaries, repo_root};

fn run(program: &Path, args: &[&str], dir: &Path) -> String {
    let out = Command::new(program).args(args).current_dir(dir).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{} {}:\n{text}", program.display(), args.join(" "));
    text
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let promtool = binaries::path("promtool");
    let deploy = repo_root().join("deploy");
    let checked = run(&promtool, &["check", "rules", "chart/wgtwo-operator/files/alerts.yaml"], &deploy);
    assert!(checked.contains("SUCCESS: 6 rules found"), "{checked}");
    let tested = run(&promtool, &["test", "rules", "alerts_test.yaml"], &deploy);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn chart_lints_with_defaults_and_with_every_optional_part() {
    let helm = binaries::path("helm");
    let chart = repo_root().join("deploy/chart/wgtwo-operator");
    let chart = chart.to_str().unwrap();
    run(&helm, &["lint", "--strict", chart], &repo_root());
    let all = "watchNamespace=team-a,serviceMonitor.enabled=true,prometheusRule.enabled=true,operator.caBundle.configMapName=ca,dashboard.enabled=true";
    run(&helm, &["lint", "--strict", chart, "--set", all], &repo_root());
    // The PrometheusRule carries the promtool-tested rules unchanged.
    let rendered = support::helm_template(&["prometheusRule.enabled=true"]);
    let rule = docs(&rendered).into_iter().find(|d| d["kind"] == "PrometheusRule").unwrap();
    let file: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo_root().join("deploy/chart/wgtwo-operator/files/alerts.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(rule["spec"], file);
}

#[test]
fn the_query_reader_finds_every_metric_and_label_name() {
    let (metrics, labels) = dashboard_queries::names(
        r#"60 * sum by (result) (rate(a_total{job="x", ns=~"a|b,c"}[5m])) or vector(0) unless on (name) b:rec offset 5m"#,
    );
    assert_eq!(metrics.iter().map(String::as_str).collect::<Vec<_>>(), ["a_total", "b:rec"]);
    assert_eq!(labels.iter().map(String::as_str).collect::<Vec<_>>(), ["job", "name", "ns", "result"]);
    let scrape = dashboard_queries::scraped("# HELP a_total x\na_total{ns=\"q\",result=\"ok\"} 1\nb:rec 2\n");
    assert_eq!(
        dashboard_queries::missing_from(&scrape, r#"sum by (name, pod) (a_total{ns="q"}) + c"#),
        ["metric c", "label name"],
    );
}

#[test]
fn the_dashboard_is_well_formed_and_its_queries_pass_promtool() {
    let dashboard = dashboard_queries::dashboard();
    assert_eq!(dashboard["uid"], "wgtwo-operator");
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables.iter().any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus")
    );
    let mut ids = std::collections::HashSet::new();
    for panel in dashboard_queries::panels(&dashboard) {
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "two panels with id {}", panel["id"]);
        let grid = &panel["gridPos"];
        assert!(
            grid["x"].as_u64().unwrap() + grid["w"].as_u64().unwrap() <= 24,
            "panel {} is wider than the grid",
            panel["id"]
        );
        assert!(grid["h"].as_u64().unwrap() > 0);
        if panel["type"] == "row" {
            continue;
        }
        assert!(!panel["title"].as_str().unwrap().is_empty());
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "panel {} names a fixed data source", panel["id"]);
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", panel["id"]);
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}");
        }
    }
    // promtool parses each query as the expression of a recording rule.
    let queries = dashboard_queries::dashboard_queries(&dashboard);
    let rules: Vec<Value> = queries
        .iter()
        .map(|(place, expr)| serde_json::json!({"record": format!("dashboard:{place}"), "expr": expr}))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    // JSON is YAML.
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(dir.path().join("queries.yaml"), file.to_string()).unwrap();
    let checked = run(&binaries::path("promtool"), &["check", "rules", "queries.yaml"], dir.path());
    assert!(checked.contains(&format!("SUCCESS: {} rules found", queries.len())), "{checked}");
}

#[test]
fn the_dashboard_ships_as_a_sidecar_configmap_only_when_enabled() {
    assert!(!docs(&support::helm_template(&[])).iter().any(|d| d["kind"] == "ConfigMap"));
    let rendered = support::helm_template(&["dashboard.enabled=true", "dashboard.annotations.grafana_folder=wgtwo"]);
    let map = docs(&rendered).into_iter().find(|d| d["kind"] == "ConfigMap").expect("a dashboard ConfigMap");
    assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(map["metadata"]["annotations"]["grafana_folder"], "wgtwo");
    assert_eq!(map["metadata"]["namespace"], support::OPERATOR_NS);
    let shipped: Value = serde_json::from_str(map["data"]["wgtwo-operator.json"].as_str().unwrap()).unwrap();
    assert_eq!(shipped, dashboard_queries::dashboard());
    let elsewhere = support::helm_template(&["dashboard.enabled=true", "dashboard.namespace=monitoring"]);
    let map = docs(&elsewhere).into_iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    assert_eq!(map["metadata"]["namespace"], "monitoring");
    // The dashboard and alerts group by the grant's namespace label: Prometheus must keep it.
    let monitored = support::helm_template(&["serviceMonitor.enabled=true"]);
    let monitor = docs(&monitored).into_iter().find(|d| d["kind"] == "ServiceMonitor").unwrap();
    assert_eq!(monitor["spec"]["endpoints"][0]["honorLabels"], true);
}

#[test]
fn a_second_replica_without_leader_election_is_refused_by_the_chart() {
    let out = Command::new(binaries::path("helm"))
        .args(["template", "x"])
        .arg(repo_root().join("deploy/chart/wgtwo-operator"))
        .args(["--set", "leaderElection.enabled=false"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("replicaCount > 1 needs leaderElection.enabled"));
}

#[test]
fn the_chart_passes_each_allowed_issuer_and_refuses_an_empty_list() {
    let render = |set: &str| {
        Command::new(binaries::path("helm"))
            .args(["template", "x"])
            .arg(repo_root().join("deploy/chart/wgtwo-operator"))
            .args(["--set", set])
            .output()
            .unwrap()
    };
    let out = render("operator.allowedIssuers={https://id.wgtwo.com,https://id.example.com}");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(yaml.contains("- --allowed-issuer=https://id.wgtwo.com\n"), "{yaml}");
    assert!(yaml.contains("- --allowed-issuer=https://id.example.com\n"), "{yaml}");
    let out = render("operator.allowedIssuers=null");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("operator.allowedIssuers must list at least one"));
}

#[test]
fn plain_manifests_are_the_chart_rendered() {
    let out = Command::new("bash").arg(repo_root().join("deploy/render.sh")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let committed = std::fs::read_to_string(repo_root().join("deploy/manifests/wgtwo-operator.yaml")).unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout) == committed,
        "deploy/manifests/wgtwo-operator.yaml is stale: run deploy/render.sh --write"
    );
    // The chart's CRD is the generated one.
    let crd = std::fs::read_to_string(repo_root().join("crds/wgtwogrants.auth.wgtwo.com.yaml")).unwrap();
    let chart_crd =
        std::fs::read_to_string(repo_root().join("deploy/chart/wgtwo-operator/crds/wgtwogrants.auth.wgtwo.com.yaml"))
            .unwrap();
    assert!(crd == chart_crd, "the chart's CRD is stale: cp crds/*.yaml deploy/chart/wgtwo-operator/crds/");
}

#[test]
fn the_deployment_runs_two_hardened_replicas_with_probes_and_limits() {
    let manifests = std::fs::read_to_string(repo_root().join("deploy/manifests/wgtwo-operator.yaml")).unwrap();
    let all = docs(&manifests);
    let deployment = all.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 2);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]));
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(c["resources"][kind][resource].is_string(), "resources.{kind}.{resource} missing");
        }
    }
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let args: Vec<&str> = c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(args.contains(&"--leader-elect=true"), "{args:?}");
    // The grace period covers an in-flight refresh: request timeout + persisting.
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() >= 10 + 5);
    let kinds: Vec<&str> = all.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for kind in
        ["Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole", "Service", "PodDisruptionBudget"]
    {
        assert!(kinds.contains(&kind), "no {kind} in {kinds:?}");
    }
}

#[test]
fn the_journal_is_a_memory_backed_volume_mounted_where_the_flag_points_and_can_be_turned_off() {
    let render = |set: &str| {
        let out = Command::new(binaries::path("helm"))
            .args(["template", "x"])
            .arg(repo_root().join("deploy/chart/wgtwo-operator"))
            .args(["--set", set])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let all = docs(&String::from_utf8_lossy(&out.stdout));
        all.into_iter().find(|d| d["kind"] == "Deployment").unwrap()["spec"]["template"]["spec"].clone()
    };
    let pod = render("journal.enabled=true");
    let c = &pod["containers"][0];
    let args: Vec<&str> = c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let dir = args.iter().find_map(|a| a.strip_prefix("--journal-dir=")).expect("--journal-dir");
    let mounts = c["volumeMounts"].as_array().unwrap();
    let mount = mounts.iter().find(|m| m["mountPath"] == dir).expect("a volume mounted at --journal-dir");
    assert_ne!(mount["readOnly"], true);
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
    // Refresh tokens never reach a disk; the size is bounded.
    assert_eq!(volume["emptyDir"]["medium"], "Memory", "{volume}");
    assert!(volume["emptyDir"]["sizeLimit"].is_string(), "{volume}");

    let pod = render("journal.enabled=false");
    let args = pod["containers"][0]["args"].to_string();
    assert!(!args.contains("--journal-dir"), "{args}");
    assert!(pod["volumes"].is_null(), "{}", pod["volumes"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_manifests_pass_a_server_side_dry_run_apply() {
    let cp = ControlPlane::start_bare().await.unwrap();
    // A dry run creates nothing, so namespaced objects need their namespace to exist.
    cp.create_namespace("wgtwo-system").await.unwrap();
    let path = repo_root().join("deploy/manifests/wgtwo-operator.yaml");
    let out = cp.kubectl(&["apply", "--server-side", "--dry-run=server", "-f", path.to_str().unwrap()]).unwrap();
    for object in [
        "customresourcedefinition.apiextensions.k8s.io/wgtwogrants.auth.wgtwo.com",
        "deployment.apps/wgtwo-operator",
        "clusterrole.rbac.authorization.k8s.io/wgtwo-operator",
    ] {
        assert!(out.contains(&format!("{object} serverside-applied (server dry run)")), "{out}");
    }
}
