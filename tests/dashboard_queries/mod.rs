//! The PromQL the chart ships (the Grafana dashboard and the alert rules) and the metric and label
//! names it uses, so tests can hold it against promtool and against a live scrape.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use wgtwo_testenv::repo_root;

/// Labels Prometheus adds to every scraped series (the ServiceMonitor's target labels); a scrape
/// of the operator itself does not have them.
pub const TARGET_LABELS: [&str; 3] = ["job", "pod", "instance"];

pub fn dashboard() -> Value {
    let path = repo_root().join("deploy/chart/wgtwo-operator/files/dashboard.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("the dashboard is JSON")
}

/// Every panel, rows' nested panels included.
pub fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        out.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

/// Each query of the dashboard, named after where it is, with Grafana's variables filled in:
/// panel targets, and the selector of each `label_values(selector, label)` variable.
pub fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr =
                target["expr"].as_str().unwrap_or_else(|| panic!("panel {} has a target without expr", panel["id"]));
            out.push((format!("panel_{}_{}", panel["id"], target["refId"].as_str().unwrap()), fill(expr)));
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"]["query"].as_str().unwrap();
        let inner = query.strip_prefix("label_values(").and_then(|q| q.strip_suffix(')')).expect("label_values(...)");
        let (selector, label) = inner.rsplit_once(',').unwrap();
        // As PromQL: the selector, grouped by the label the variable lists.
        out.push((
            format!("variable_{}", var["name"].as_str().unwrap()),
            fill(&format!("count by ({label}) ({selector})")),
        ));
    }
    out
}

/// The alert rules' expressions.
pub fn alert_queries() -> Vec<(String, String)> {
    let path = repo_root().join("deploy/chart/wgtwo-operator/files/alerts.yaml");
    let rules: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = Vec::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            out.push((rule["alert"].as_str().unwrap().to_owned(), rule["expr"].as_str().unwrap().to_owned()));
        }
    }
    out
}

/// Grafana's variables as a dashboard would send them.
fn fill(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m").replace("$namespace", ".*").replace("$job", "wgtwo-operator")
}

const AGGREGATIONS: [&str; 14] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
const GROUPING: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];
const KEYWORDS: [&str; 7] = ["and", "or", "unless", "bool", "offset", "inf", "nan"];

/// The metric names and the label names (in matchers and grouping lists) of a PromQL expression.
/// Hand-written because no maintained Rust crate parses PromQL 3; enough for the queries we write
/// (promtool checks their syntax separately).
pub fn names(expr: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut metrics, mut labels) = (BTreeSet::new(), BTreeSet::new());
    let chars: Vec<char> = expr.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let next_non_space = |mut i: usize| {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        i
    };
    let (mut i, mut in_braces, mut in_list) = (0, false, false);
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '{' {
            in_braces = true;
            i += 1;
        } else if c == '}' {
            in_braces = false;
            i += 1;
        } else if c == ')' && in_list {
            in_list = false;
            i += 1;
        } else if c.is_ascii_digit() {
            // Numbers and durations (5m, 1h).
            while i < chars.len() && (ident(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if ident(c) {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let after = next_non_space(i);
            if in_braces || in_list {
                labels.insert(word);
            } else if GROUPING.contains(&word.as_str()) {
                if chars.get(after) == Some(&'(') {
                    in_list = true;
                    i = after + 1;
                }
            } else if AGGREGATIONS.contains(&word.as_str())
                || KEYWORDS.contains(&word.as_str())
                || chars.get(after) == Some(&'(')
            {
                // An aggregation, a keyword or a function call.
            } else {
                metrics.insert(word);
            }
        } else {
            i += 1;
        }
    }
    (metrics, labels)
}

/// Metric name -> label names, from the samples of a text-format scrape.
pub fn scraped(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let entry = out.entry(line[..end].to_owned()).or_default();
        if line[end..].starts_with('{') {
            let body = &line[end + 1..line.rfind('}').unwrap()];
            for pair in body.split("\",").filter(|p| !p.is_empty()) {
                entry.insert(pair.split('=').next().unwrap().trim_start_matches(',').to_owned());
            }
        }
    }
    out
}

/// What a query uses that the scrape lacks: metric names not exported, and labels neither on its
/// metrics nor added by Prometheus.
pub fn missing_from(scrape: &BTreeMap<String, BTreeSet<String>>, expr: &str) -> Vec<String> {
    let (metrics, labels) = names(expr);
    let mut missing: Vec<String> =
        metrics.iter().filter(|m| !scrape.contains_key(*m)).map(|m| format!("metric {m}")).collect();
    let known: BTreeSet<&String> = metrics.iter().filter_map(|m| scrape.get(m)).flatten().collect();
    for label in &labels {
        if !known.contains(label) && !TARGET_LABELS.contains(&label.as_str()) {
            missing.push(format!("label {label}"));
        }
    }
    missing
}
