//! The observability stack of `deploy/observability/`: an OpenTelemetry Collector, Tempo,
//! Prometheus and Grafana with the codebolt dashboards.
//!
//! Every PromQL query of the dashboards is read for the metric names and labels it uses, and
//! each must be one the control plane exports, taken from its own metric catalog
//! (`actors::metrics::CATALOG`): a renamed metric or attribute fails here, naming the dashboard
//! and the panel. The Compose file, the collector, Tempo, Prometheus and the Grafana
//! provisioning are parsed and checked against each other (ports, mounts, datasource uids).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use actors::metrics::{attr, MetricDef, MetricKind, QueueKind, CATALOG};
use actors::model::RunState;
use regex::Regex;
use serde::Deserialize;
use serde_json::{json, Value as Json};
use serde_yaml::Value as Yaml;

/// The dashboards `grafana/dashboards/` must hold, no more.
const DASHBOARDS: [&str; 3] = [
    "control-plane-health.json",
    "run-drilldown.json",
    "run-overview.json",
];
const DRILLDOWN: &str = "run-drilldown.json";

/// Labels a series carries besides the metric's own attributes: histogram buckets, the resource
/// attributes the collector turns into labels, and what a scrape adds.
const OTHER_LABELS: [&str; 5] = [
    "le",
    "service_instance_id",
    "service_name",
    "job",
    "instance",
];

/// The attribute keys metrics are recorded with.
const ATTRIBUTE_KEYS: [&str; 10] = [
    attr::PROVIDER,
    attr::PROVIDER_KIND,
    attr::RUN_STATE,
    attr::ERROR_TYPE,
    attr::TOOL_NAME,
    attr::DB_SYSTEM,
    attr::DB_OPERATION,
    attr::QUEUE,
    attr::RECONCILER_ACTION,
    attr::OPERATION,
];

const COMPOSE: &str = "compose.yaml";
const COLLECTOR: &str = "otel-collector.yaml";
const TEMPO: &str = "tempo.yaml";
const PROMETHEUS: &str = "prometheus.yml";
const DATASOURCES: &str = "grafana/provisioning/datasources/datasources.yaml";
const DASHBOARD_PROVIDERS: &str = "grafana/provisioning/dashboards/dashboards.yaml";
const CLUSTER_OVERRIDE: &str = "cluster-override.yaml";

fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the repository")
        .to_path_buf()
}

fn observability_dir() -> PathBuf {
    repo_dir().join("deploy/observability")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// YAML

/// The one YAML document of a file under `deploy/observability/`, `<<` merge keys applied.
fn yaml(file: &str) -> Yaml {
    yaml_at(&observability_dir().join(file))
}

fn yaml_at(path: &Path) -> Yaml {
    let text = read(path);
    let mut documents: Vec<Yaml> = serde_yaml::Deserializer::from_str(&text)
        .map(|document| {
            let mut value = Yaml::deserialize(document)
                .unwrap_or_else(|err| panic!("{} is not valid YAML: {err}", path.display()));
            value
                .apply_merge()
                .unwrap_or_else(|err| panic!("{}: bad merge key: {err}", path.display()));
            value
        })
        .filter(|value| !value.is_null())
        .collect();
    assert_eq!(
        documents.len(),
        1,
        "{}: expected one YAML document",
        path.display()
    );
    documents.remove(0)
}

/// The value at a dotted path, or a failure naming the file and the path.
fn at<'a>(value: &'a Yaml, path: &str, file: &str) -> &'a Yaml {
    path.split('.')
        .fold(value, |node, key| match node.get(key) {
            Some(next) => next,
            None => panic!("{file}: `{path}` is missing (no `{key}`)"),
        })
}

fn text<'a>(value: &'a Yaml, path: &str, file: &str) -> &'a str {
    at(value, path, file)
        .as_str()
        .unwrap_or_else(|| panic!("{file}: `{path}` is not a string"))
}

fn scalar(value: &Yaml, what: &str) -> String {
    match value {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Bool(b) => b.to_string(),
        other => panic!("{what}: expected a string, found {other:?}"),
    }
}

fn strings(value: &Yaml, path: &str, file: &str) -> Vec<String> {
    at(value, path, file)
        .as_sequence()
        .unwrap_or_else(|| panic!("{file}: `{path}` is not a list"))
        .iter()
        .map(|v| scalar(v, &format!("{file}: `{path}`")))
        .collect()
}

fn keys(value: &Yaml, path: &str, file: &str) -> BTreeSet<String> {
    at(value, path, file)
        .as_mapping()
        .unwrap_or_else(|| panic!("{file}: `{path}` is not a mapping"))
        .keys()
        .map(|k| scalar(k, file))
        .collect()
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("`{addr}` does not end in a port"))
}

/// `host:port` of a URL such as `http://prometheus:9090`.
fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest)
}

fn service<'a>(compose: &'a Yaml, name: &str) -> &'a Yaml {
    at(compose, "services", COMPOSE)
        .get(name)
        .unwrap_or_else(|| panic!("{COMPOSE}: no service `{name}`"))
}

fn service_names(compose: &Yaml, file: &str) -> BTreeSet<String> {
    keys(compose, "services", file)
}

/// A service's environment, whether written as a mapping or as `KEY=VALUE` items.
fn service_env(service: &Yaml, what: &str) -> BTreeMap<String, String> {
    match service.get("environment") {
        None => BTreeMap::new(),
        Some(Yaml::Mapping(map)) => map
            .iter()
            .map(|(k, v)| (scalar(k, what), scalar(v, what)))
            .collect(),
        Some(Yaml::Sequence(items)) => items
            .iter()
            .map(|item| {
                let item = scalar(item, what);
                match item.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (item, String::new()),
                }
            })
            .collect(),
        Some(other) => panic!("{what}: `environment` is neither a mapping nor a list: {other:?}"),
    }
}

/// A service's short-syntax volumes as (source, target).
fn volumes(service: &Yaml, what: &str) -> Vec<(String, String)> {
    let Some(items) = service.get("volumes").and_then(Yaml::as_sequence) else {
        return Vec::new();
    };
    items
        .iter()
        .map(|item| {
            let volume = scalar(item, what);
            let parts: Vec<&str> = volume.split(':').collect();
            match parts.as_slice() {
                [source, target] | [source, target, _] => (source.to_string(), target.to_string()),
                _ => panic!("{what}: volume `{volume}` is not source:target[:mode]"),
            }
        })
        .collect()
}

/// The source mounted at `target`.
fn mounted_at(service: &Yaml, target: &str, what: &str) -> String {
    let mounts = volumes(service, what);
    mounts
        .iter()
        .find(|(_, t)| t == target)
        .map(|(source, _)| source.clone())
        .unwrap_or_else(|| panic!("{what}: nothing is mounted at {target} ({mounts:?})"))
}

/// Published ports as (host ip, host port, container port).
fn published(service: &Yaml, what: &str) -> Vec<(String, u16, u16)> {
    let Some(items) = service.get("ports").and_then(Yaml::as_sequence) else {
        return Vec::new();
    };
    items
        .iter()
        .map(|item| {
            let port = scalar(item, what);
            let parts: Vec<&str> = port.split(':').collect();
            let number = |p: &str| -> u16 {
                p.parse()
                    .unwrap_or_else(|_| panic!("{what}: `{port}`: `{p}` is not a port"))
            };
            match parts.as_slice() {
                [ip, host, container] => (ip.to_string(), number(host), number(container)),
                _ => panic!(
                    "{what}: port `{port}` does not name the host address (ip:host:container)"
                ),
            }
        })
        .collect()
}

/// The value of `--flag=value` (or `-flag=value`) in a command line.
fn flag(args: &[String], name: &str, what: &str) -> String {
    let prefix = format!("{name}=");
    args.iter()
        .find_map(|a| a.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{what}: no `{name}=` in {args:?}"))
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// PromQL

/// What a PromQL expression refers to.
#[derive(Debug, Default)]
struct PromRefs {
    metrics: BTreeSet<String>,
    labels: BTreeSet<String>,
    /// `label="value"` matchers.
    equals: Vec<(String, String)>,
}

/// Aggregation operators, binary and modifier keywords, and the number words.
const PROMQL_KEYWORDS: &[&str] = &[
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
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "atan2",
    "offset",
    "inf",
    "nan",
];

/// Keywords followed by a list of label names in parentheses.
const PROMQL_GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

const PROMQL_FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atanh",
    "avg_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "cos",
    "cosh",
    "count_over_time",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "deg",
    "delta",
    "deriv",
    "double_exponential_smoothing",
    "end",
    "exp",
    "floor",
    "histogram_avg",
    "histogram_count",
    "histogram_fraction",
    "histogram_quantile",
    "histogram_stddev",
    "histogram_stdvar",
    "histogram_sum",
    "holt_winters",
    "hour",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "mad_over_time",
    "max_over_time",
    "min_over_time",
    "minute",
    "month",
    "pi",
    "predict_linear",
    "present_over_time",
    "quantile_over_time",
    "rad",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sin",
    "sinh",
    "sort",
    "sort_by_label",
    "sort_by_label_desc",
    "sort_desc",
    "sqrt",
    "start",
    "stddev_over_time",
    "stdvar_over_time",
    "sum_over_time",
    "tan",
    "tanh",
    "time",
    "timestamp",
    "vector",
    "year",
];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn ident_at(chars: &[char], start: usize) -> (String, usize) {
    let end = (start..chars.len())
        .find(|&i| !is_ident_char(chars[i]))
        .unwrap_or(chars.len());
    (chars[start..end].iter().collect(), end)
}

/// The contents of the string literal opening at `start` and the index past it.
fn string_at(chars: &[char], start: usize) -> (String, usize) {
    let quote = chars[start];
    let mut out = String::new();
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if quote != '`' && i + 1 < chars.len() => {
                out.push(chars[i + 1]);
                i += 2;
            }
            c if c == quote => return (out, i + 1),
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    (out, i)
}

/// Past a Grafana variable: `$name`, `${name}`, `${name:format}`.
fn skip_variable(chars: &[char], start: usize) -> usize {
    match chars.get(start + 1) {
        Some('{') => skip_past(chars, start + 1, '}'),
        _ => (start + 1..chars.len())
            .find(|&i| !(chars[i].is_ascii_alphanumeric() || chars[i] == '_'))
            .unwrap_or(chars.len()),
    }
}

fn skip_past(chars: &[char], start: usize, close: char) -> usize {
    (start..chars.len())
        .find(|&i| chars[i] == close)
        .map_or(chars.len(), |i| i + 1)
}

/// Past a number or a duration (`0.99`, `1e-3`, `0x1f`, `5m30s`).
fn skip_number(chars: &[char], start: usize) -> usize {
    let mut i = start;
    while i < chars.len() {
        let c = chars[i];
        let exponent_sign = (c == '+' || c == '-')
            && i > start
            && matches!(chars[i - 1], 'e' | 'E')
            && !matches!(chars.get(start + 1), Some('x' | 'X'));
        if c.is_ascii_alphanumeric() || c == '.' || c == '_' || exponent_sign {
            i += 1;
        } else {
            break;
        }
    }
    i
}

fn next_non_space(chars: &[char], start: usize) -> Option<usize> {
    (start..chars.len()).find(|&i| !chars[i].is_whitespace())
}

/// Label matchers `{a="x", b=~"y"}` opening at `start`; returns the index past `}`.
fn matchers_at(chars: &[char], start: usize, refs: &mut PromRefs) -> usize {
    let mut i = start + 1;
    while i < chars.len() {
        let c = chars[i];
        if c == '}' {
            return i + 1;
        } else if c == '"' || c == '\'' || c == '`' {
            i = string_at(chars, i).1;
        } else if c == '$' {
            i = skip_variable(chars, i);
        } else if is_ident_start(c) {
            let (label, end) = ident_at(chars, i);
            i = end;
            let mut op = String::new();
            while let Some(j) = next_non_space(chars, i).filter(|&j| "=!~".contains(chars[j])) {
                op.push(chars[j]);
                i = j + 1;
            }
            if let Some(j) = next_non_space(chars, i).filter(|&j| "\"'`".contains(chars[j])) {
                let (value, end) = string_at(chars, j);
                i = end;
                if op == "=" {
                    refs.equals.push((label.clone(), value));
                }
            }
            refs.labels.insert(label);
        } else {
            i += 1;
        }
    }
    i
}

/// A list of label names in parentheses opening at `start`; returns the index past `)`.
fn label_list_at(chars: &[char], start: usize, refs: &mut PromRefs) -> usize {
    let mut i = start + 1;
    while i < chars.len() {
        let c = chars[i];
        if c == ')' {
            return i + 1;
        } else if c == '"' || c == '\'' || c == '`' {
            i = string_at(chars, i).1;
        } else if is_ident_start(c) {
            let (label, end) = ident_at(chars, i);
            refs.labels.insert(label);
            i = end;
        } else {
            i += 1;
        }
    }
    i
}

/// The metric names and label names a PromQL expression uses. Not metric names: functions,
/// keywords and aggregation operators, label names (in `{...}`, `by (...)`, `on (...)`, ...),
/// numbers and durations, string contents, Grafana variables (`$instance`, `${x}`).
fn promql_refs(expr: &str) -> PromRefs {
    let chars: Vec<char> = expr.chars().collect();
    let mut refs = PromRefs::default();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = string_at(&chars, i).1;
        } else if c == '#' {
            i = skip_past(&chars, i, '\n');
        } else if c == '$' {
            i = skip_variable(&chars, i);
        } else if c == '[' {
            i = skip_past(&chars, i, ']');
        } else if c == '{' {
            i = matchers_at(&chars, i, &mut refs);
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            i = skip_number(&chars, i);
        } else if is_ident_start(c) {
            let (word, end) = ident_at(&chars, i);
            i = end;
            let paren = next_non_space(&chars, i).filter(|&j| chars[j] == '(');
            if PROMQL_GROUPING.contains(&word.as_str()) {
                if let Some(j) = paren {
                    i = label_list_at(&chars, j, &mut refs);
                }
            } else if PROMQL_KEYWORDS.contains(&word.as_str())
                || (paren.is_some() && PROMQL_FUNCTIONS.contains(&word.as_str()))
            {
                // Not a metric.
            } else {
                refs.metrics.insert(word);
            }
        } else {
            i += 1;
        }
    }
    refs
}

// ---------------------------------------------------------------------------------------------
// Dashboards

/// What dashboards may refer to.
struct Known {
    series: BTreeSet<String>,
    labels: BTreeSet<String>,
    /// Provisioned datasources: uid → type.
    datasources: BTreeMap<String, String>,
}

fn exported_series() -> BTreeSet<String> {
    CATALOG
        .iter()
        .flat_map(MetricDef::prometheus_series)
        .collect()
}

fn exported_labels() -> BTreeSet<String> {
    ATTRIBUTE_KEYS
        .iter()
        .map(|key| actors::metrics::prometheus_label(key))
        .chain(OTHER_LABELS.iter().map(|l| l.to_string()))
        .collect()
}

fn provisioned_datasources() -> BTreeMap<String, String> {
    let datasources = yaml(DATASOURCES);
    at(&datasources, "datasources", DATASOURCES)
        .as_sequence()
        .unwrap_or_else(|| panic!("{DATASOURCES}: `datasources` is not a list"))
        .iter()
        .map(|ds| {
            (
                text(ds, "uid", DATASOURCES).to_string(),
                text(ds, "type", DATASOURCES).to_string(),
            )
        })
        .collect()
}

fn known() -> Known {
    Known {
        series: exported_series(),
        labels: exported_labels(),
        datasources: provisioned_datasources(),
    }
}

fn dashboards_dir() -> PathBuf {
    observability_dir().join("grafana/dashboards")
}

/// Every `*.json` of the dashboards directory, by file name.
fn dashboards() -> BTreeMap<String, Json> {
    let dir = dashboards_dir();
    std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("cannot list {}: {err}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .map(|path| {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .expect("file names are UTF-8")
                .to_string();
            let dashboard = serde_json::from_str(&read(&path))
                .unwrap_or_else(|err| panic!("{name} is not valid JSON: {err}"));
            (name, dashboard)
        })
        .collect()
}

/// Every panel, those nested in rows included.
fn panels(dashboard: &Json) -> Vec<&Json> {
    fn walk<'a>(list: Option<&'a Json>, out: &mut Vec<&'a Json>) {
        for panel in list.and_then(Json::as_array).into_iter().flatten() {
            out.push(panel);
            walk(panel.get("panels"), out);
        }
    }
    let mut out = Vec::new();
    walk(dashboard.get("panels"), &mut out);
    out
}

fn title(panel: &Json) -> &str {
    panel
        .get("title")
        .and_then(Json::as_str)
        .unwrap_or("(untitled)")
}

/// The template variables of a dashboard, by name.
fn variables(dashboard: &Json) -> BTreeMap<String, &Json> {
    dashboard
        .pointer("/templating/list")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| Some((v.get("name")?.as_str()?.to_string(), v)))
        .collect()
}

/// Grafana variables referred to as `$name`, `${name}`, `${name:format}` or `[[name]]`.
fn variable_refs(text: &str) -> BTreeSet<String> {
    let pattern = Regex::new(r"\$\{([A-Za-z0-9_]+)|\$([A-Za-z0-9_]+)|\[\[([A-Za-z0-9_]+)")
        .expect("valid pattern");
    pattern
        .captures_iter(text)
        .filter_map(|c| c.get(1).or(c.get(2)).or(c.get(3)))
        .map(|m| m.as_str().to_string())
        .collect()
}

/// A datasource reference `{type, uid}` checked against the provisioned ones; its type.
fn datasource_type(
    datasource: Option<&Json>,
    known: &Known,
    what: &str,
    problems: &mut Vec<String>,
) -> Option<String> {
    let Some(datasource) = datasource else {
        problems.push(format!("{what}: no datasource"));
        return None;
    };
    let uid = datasource.get("uid").and_then(Json::as_str);
    let kind = datasource.get("type").and_then(Json::as_str);
    let (Some(uid), Some(kind)) = (uid, kind) else {
        problems.push(format!(
            "{what}: the datasource {datasource} is not {{type, uid}}"
        ));
        return None;
    };
    match known.datasources.get(uid) {
        None => problems.push(format!(
            "{what}: datasource uid `{uid}` is not provisioned ({DATASOURCES} has {:?})",
            known.datasources.keys().collect::<Vec<_>>()
        )),
        Some(provisioned) if provisioned != kind => problems.push(format!(
            "{what}: datasource `{uid}` is provisioned as `{provisioned}`, used as `{kind}`"
        )),
        Some(_) => {}
    }
    Some(kind.to_string())
}

/// Metric and label names of a PromQL expression that the control plane does not export, and
/// matcher values it never records.
fn check_promql(expr: &str, known: &Known, what: &str, problems: &mut Vec<String>) {
    let refs = promql_refs(expr);
    if refs.metrics.is_empty() {
        problems.push(format!("{what}: `{expr}` names no metric"));
    }
    for metric in &refs.metrics {
        if !known.series.contains(metric) {
            problems.push(format!(
                "{what}: unknown metric `{metric}` (not a series of actors::metrics::CATALOG) in `{expr}`"
            ));
        }
    }
    for label in &refs.labels {
        if !known.labels.contains(label) {
            problems.push(format!(
                "{what}: unknown label `{label}` (not an actors::metrics::attr key nor one of {OTHER_LABELS:?}) in `{expr}`"
            ));
        }
    }
    let state = actors::metrics::prometheus_label(attr::RUN_STATE);
    let queue = actors::metrics::prometheus_label(attr::QUEUE);
    for (label, value) in &refs.equals {
        let allowed: Vec<&str> = if *label == state {
            RunState::ALL.iter().map(|s| s.as_str()).collect()
        } else if *label == queue {
            QueueKind::ALL.iter().map(|q| q.as_str()).collect()
        } else {
            continue;
        };
        if !allowed.contains(&value.as_str()) {
            problems.push(format!(
                "{what}: `{label}=\"{value}\"` matches nothing (values: {allowed:?}) in `{expr}`"
            ));
        }
    }
}

/// Everything wrong with one dashboard, each problem naming the file and the panel.
fn dashboard_problems(file: &str, dashboard: &Json, known: &Known) -> Vec<String> {
    let mut problems = Vec::new();
    for key in ["uid", "title"] {
        if dashboard
            .get(key)
            .and_then(Json::as_str)
            .is_none_or(str::is_empty)
        {
            problems.push(format!("{file}: no `{key}`"));
        }
    }
    if dashboard.get("schemaVersion").and_then(Json::as_u64) != Some(39) {
        problems.push(format!("{file}: `schemaVersion` is not 39"));
    }

    let variables = variables(dashboard);
    let check_variables_of = |text: &str, what: &str, problems: &mut Vec<String>| {
        for name in variable_refs(text) {
            if !name.starts_with("__") && !variables.contains_key(&name) {
                problems.push(format!(
                    "{what}: `${name}` is not a variable of the dashboard"
                ));
            }
        }
    };

    for (name, variable) in &variables {
        let what = format!("{file}: variable `{name}`");
        if variable.get("type").and_then(Json::as_str) != Some("query") {
            continue;
        }
        let kind = datasource_type(variable.get("datasource"), known, &what, &mut problems);
        let query = match variable.get("query") {
            Some(Json::String(q)) => q.as_str(),
            Some(q) => q.get("query").and_then(Json::as_str).unwrap_or_default(),
            None => "",
        };
        if kind.as_deref() != Some("prometheus") {
            continue;
        }
        check_variables_of(query, &what, &mut problems);
        // label_values(selector, label), or a PromQL query.
        match query
            .trim()
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
        {
            Some(args) => {
                let (selector, label) = args.rsplit_once(',').unwrap_or(("", args));
                if !known.labels.contains(label.trim()) {
                    problems.push(format!(
                        "{what}: unknown label `{}` in `{query}`",
                        label.trim()
                    ));
                }
                if !selector.trim().is_empty() {
                    check_promql(selector, known, &what, &mut problems);
                }
            }
            None => check_promql(query, known, &what, &mut problems),
        }
    }

    for link in dashboard
        .get("links")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        let url = link.get("url").and_then(Json::as_str).unwrap_or_default();
        check_variables_of(url, &format!("{file}: link `{url}`"), &mut problems);
    }

    let mut ids = BTreeSet::new();
    for panel in panels(dashboard) {
        let what = format!("{file}: panel \"{}\"", title(panel));
        if let Some(id) = panel.get("id").and_then(Json::as_u64) {
            if !ids.insert(id) {
                problems.push(format!("{what}: id {id} is used twice"));
            }
        }
        let grid = panel.get("gridPos");
        if !["h", "w", "x", "y"]
            .iter()
            .all(|k| grid.and_then(|g| g.get(k)).is_some_and(Json::is_u64))
        {
            problems.push(format!("{what}: no gridPos {{h, w, x, y}}"));
        }
        for link in panel
            .get("links")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
        {
            let url = link.get("url").and_then(Json::as_str).unwrap_or_default();
            check_variables_of(url, &format!("{what}: link"), &mut problems);
        }
        let kind = panel.get("type").and_then(Json::as_str).unwrap_or_default();
        if kind == "row" || kind == "text" {
            continue;
        }
        let targets = panel
            .get("targets")
            .and_then(Json::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("{what}: no targets"));
        }
        for target in targets {
            let refid = target.get("refId").and_then(Json::as_str).unwrap_or("?");
            let what = format!("{what}, target {refid}");
            let datasource = target.get("datasource").or(panel.get("datasource"));
            match datasource_type(datasource, known, &what, &mut problems).as_deref() {
                Some("prometheus") => match target.get("expr").and_then(Json::as_str) {
                    Some(expr) if !expr.trim().is_empty() => {
                        check_variables_of(expr, &what, &mut problems);
                        check_promql(expr, known, &what, &mut problems);
                    }
                    _ => problems.push(format!("{what}: no `expr`")),
                },
                Some("tempo") => {
                    if target.get("queryType").and_then(Json::as_str) != Some("traceql") {
                        problems.push(format!("{what}: `queryType` is not `traceql`"));
                    }
                    if target.get("expr").is_some() {
                        problems.push(format!("{what}: a Tempo target has `query`, not `expr`"));
                    }
                    match target.get("query").and_then(Json::as_str) {
                        Some(query) if !query.trim().is_empty() => {
                            check_variables_of(query, &what, &mut problems);
                        }
                        _ => problems.push(format!("{what}: no TraceQL `query`")),
                    }
                }
                Some(other) => problems.push(format!("{what}: unexpected datasource `{other}`")),
                None => {}
            }
        }
    }
    problems
}

#[test]
fn the_extractor_finds_metric_and_label_names() {
    let refs = promql_refs(
        r#"histogram_quantile(0.95, sum by (le, codebolt_provider) (rate(codebolt_sandbox_spawn_duration_seconds_bucket{service_instance_id=~"$instance"}[$__rate_interval])))"#,
    );
    assert_eq!(
        refs.metrics,
        BTreeSet::from(["codebolt_sandbox_spawn_duration_seconds_bucket".to_string()])
    );
    assert_eq!(
        refs.labels,
        BTreeSet::from(["codebolt_provider", "le", "service_instance_id"].map(String::from))
    );

    let refs = promql_refs(
        r#"sum(rate(a_total{x="y{z} rate(b)", q!~'w', r = "s"}[5m] offset 1h)) without (inst) / on(job) group_left(foo) b_metric
           > bool 1.5e-3 and time() - 3 unless ${var:csv} * $__interval_ms # c_comment
           or count_values("d_label", e_metric) or label_replace(f_metric, "dst", "$1", "src", "(.*)")"#,
    );
    assert_eq!(
        refs.metrics,
        BTreeSet::from(["a_total", "b_metric", "e_metric", "f_metric"].map(String::from))
    );
    assert_eq!(
        refs.labels,
        BTreeSet::from(["foo", "inst", "job", "q", "r", "x"].map(String::from))
    );
    assert_eq!(
        refs.equals,
        [
            ("x".to_string(), "y{z} rate(b)".to_string()),
            ("r".to_string(), "s".to_string())
        ]
    );

    // A function name without its parentheses is a metric; a keyword never is.
    let refs = promql_refs("time + sum without(le) (rate(x[1m:10s]))");
    assert_eq!(
        refs.metrics,
        BTreeSet::from(["time".to_string(), "x".to_string()])
    );
    assert!(promql_refs("vector(1) + 0x1f").metrics.is_empty());
}

#[test]
fn an_unknown_metric_or_label_fails_naming_the_dashboard_and_panel() {
    let known = known();
    let dashboard = json!({
        "uid": "synthetic",
        "title": "Synthetic",
        "schemaVersion": 39,
        "templating": {"list": []},
        "panels": [{
            "id": 1, "type": "row", "title": "A row",
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": 0},
            "panels": [{
                "id": 2, "type": "timeseries", "title": "Runs created",
                "gridPos": {"h": 8, "w": 12, "x": 0, "y": 1},
                "datasource": {"type": "prometheus", "uid": "prometheus"},
                "targets": [{
                    "refId": "A",
                    "expr": "sum by (bogus_label) (rate(codebolt_runs_created{codebolt_run_state=\"done\"}[5m])) + $undefined",
                }],
            }],
        }, {
            "id": 3, "type": "timeseries", "title": "Tool calls",
            "gridPos": {"h": 8, "w": 12, "x": 12, "y": 1},
            "targets": [{
                "refId": "A",
                "datasource": {"type": "prometheus", "uid": "no-such-uid"},
                "expr": "sum(rate(codebolt_tool_call_duration_seconds_count[5m]))",
            }],
        }],
    });
    let problems = dashboard_problems("synthetic.json", &dashboard, &known).join("\n");
    for expected in [
        "synthetic.json: panel \"Runs created\", target A: unknown metric `codebolt_runs_created`",
        "synthetic.json: panel \"Runs created\", target A: unknown label `bogus_label`",
        "`codebolt_run_state=\"done\"` matches nothing",
        "`$undefined` is not a variable",
        "synthetic.json: panel \"Tool calls\", target A: datasource uid `no-such-uid` is not provisioned",
    ] {
        assert!(
            problems.contains(expected),
            "expected `{expected}` among:\n{problems}"
        );
    }
    assert!(
        !problems.contains("codebolt_tool_call_duration_seconds_count`"),
        "an exported series was reported:\n{problems}"
    );
}

#[test]
fn the_dashboards_query_only_metrics_and_labels_the_control_plane_exports() {
    let known = known();
    let dashboards = dashboards();
    assert_eq!(
        dashboards.keys().map(String::as_str).collect::<Vec<_>>(),
        DASHBOARDS,
        "the dashboards in {}",
        dashboards_dir().display()
    );
    let problems: Vec<String> = dashboards
        .iter()
        .flat_map(|(file, dashboard)| dashboard_problems(file, dashboard, &known))
        .collect();
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));

    // Every metric of the catalog is on some dashboard.
    let used: BTreeSet<String> = dashboards
        .values()
        .flat_map(panels)
        .flat_map(|panel| {
            panel
                .get("targets")
                .and_then(Json::as_array)
                .into_iter()
                .flatten()
        })
        .filter_map(|target| target.get("expr").and_then(Json::as_str))
        .flat_map(|expr| promql_refs(expr).metrics)
        .collect();
    let unused: Vec<&str> = CATALOG
        .iter()
        .filter(|def| !def.prometheus_series().iter().any(|s| used.contains(s)))
        .map(|def| def.name)
        .collect();
    assert!(unused.is_empty(), "no dashboard shows {unused:?}");
}

#[test]
fn every_dashboard_has_its_own_uid() {
    let dashboards = dashboards();
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (file, dashboard) in &dashboards {
        let uid = dashboard
            .get("uid")
            .and_then(Json::as_str)
            .unwrap_or_else(|| panic!("{file}: no uid"));
        if let Some(other) = seen.insert(uid, file) {
            panic!("{file} and {other} have the same uid `{uid}`");
        }
    }
}

#[test]
fn the_drilldown_finds_a_run_trace_by_its_run_id() {
    let dashboards = dashboards();
    let dashboard = &dashboards[DRILLDOWN];
    let variables = variables(dashboard);
    let run_id = variables
        .get("run_id")
        .unwrap_or_else(|| panic!("{DRILLDOWN}: no variable `run_id`"));
    assert_eq!(
        run_id.get("type").and_then(Json::as_str),
        Some("textbox"),
        "{DRILLDOWN}: `run_id` is typed in"
    );

    let uses_run_id = |text: &str| variable_refs(text).contains("run_id");
    let tempo_queries: Vec<&str> = panels(dashboard)
        .into_iter()
        .flat_map(|panel| {
            let panel_datasource = panel.get("datasource");
            panel
                .get("targets")
                .and_then(Json::as_array)
                .into_iter()
                .flatten()
                .filter(move |t| {
                    t.get("datasource")
                        .or(panel_datasource)
                        .and_then(|d| d.get("type"))
                        .and_then(Json::as_str)
                        == Some("tempo")
                })
        })
        .filter_map(|t| t.get("query").and_then(Json::as_str))
        .collect();
    // The root span `codebolt.run` carries `run.id`.
    let root = Regex::new(r#"name\s*=\s*"codebolt\.run""#).expect("valid pattern");
    let run_attribute =
        Regex::new(r#"(span)?\."run\.id"\s*=\s*"\$\{?run_id\}?""#).expect("valid pattern");
    assert!(
        tempo_queries
            .iter()
            .any(|q| uses_run_id(q) && root.is_match(q) && run_attribute.is_match(q)),
        "{DRILLDOWN}: no TraceQL query selects the span `codebolt.run` with `run.id` = $run_id \
         ({tempo_queries:?})"
    );

    // A link to the run's record in the control plane API, which holds the trace id.
    let links: Vec<&str> = dashboard
        .get("links")
        .into_iter()
        .chain(panels(dashboard).into_iter().filter_map(|p| p.get("links")))
        .filter_map(Json::as_array)
        .flatten()
        .filter_map(|link| link.get("url").and_then(Json::as_str))
        .collect();
    assert!(
        links
            .iter()
            .any(|url| url.contains("/v1/runs/${run_id}") || url.ends_with("/v1/runs/$run_id")),
        "{DRILLDOWN}: no link to /v1/runs/${{run_id}} ({links:?})"
    );
}

/// The name the collector's Prometheus exporter gives a metric (its default translation:
/// `UnderscoreEscapingWithSuffixes`), for the units the catalog uses.
fn collector_name(def: &MetricDef) -> String {
    let mut tokens: Vec<String> = def
        .name
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == ':'))
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect();
    let unit = def.unit.split('/').next().unwrap_or_default().trim();
    let suffix = if unit.is_empty() || unit.contains(['{', '}']) {
        ""
    } else {
        match unit {
            "s" => "seconds",
            "ms" => "milliseconds",
            "us" => "microseconds",
            "ns" => "nanoseconds",
            "By" => "bytes",
            "1" => "",
            "%" => "percent",
            other => other,
        }
    };
    if !suffix.is_empty() && !tokens.iter().any(|t| t == suffix) {
        tokens.push(suffix.to_string());
    }
    if def.kind == MetricKind::Counter {
        tokens.retain(|t| t != "total");
        tokens.push("total".into());
    }
    if def.unit == "1" && def.kind == MetricKind::Gauge {
        tokens.retain(|t| t != "ratio");
        tokens.push("ratio".into());
    }
    tokens.join("_")
}

#[test]
fn the_catalog_names_are_those_the_collector_exports() {
    // The dashboards query `prometheus_name`; through the collector a metric must arrive under it.
    let differing: Vec<String> = CATALOG
        .iter()
        .filter(|def| collector_name(def) != def.prometheus_name())
        .map(|def| {
            format!(
                "{} (unit `{}`): the catalog says `{}`, the collector exports `{}`",
                def.name,
                def.unit,
                def.prometheus_name(),
                collector_name(def)
            )
        })
        .collect();
    assert!(differing.is_empty(), "\n{}", differing.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Collector, Tempo, Prometheus, Grafana, Compose

/// The collector's OTLP gRPC port, as its receiver listens.
fn collector_grpc_port(collector: &Yaml) -> u16 {
    port_of(text(
        collector,
        "receivers.otlp.protocols.grpc.endpoint",
        COLLECTOR,
    ))
}

#[test]
fn the_collector_sends_traces_to_tempo_and_metrics_to_prometheus() {
    let collector = yaml(COLLECTOR);
    assert_eq!(
        collector_grpc_port(&collector),
        4317,
        "{COLLECTOR}: OTLP gRPC"
    );
    assert_eq!(
        port_of(text(
            &collector,
            "receivers.otlp.protocols.http.endpoint",
            COLLECTOR
        )),
        4318,
        "{COLLECTOR}: OTLP HTTP"
    );

    // Every component a pipeline names is defined.
    let pipelines = keys(&collector, "service.pipelines", COLLECTOR);
    for signal in ["traces", "metrics"] {
        assert!(
            pipelines.contains(signal),
            "{COLLECTOR}: no {signal} pipeline"
        );
    }
    for pipeline in &pipelines {
        for section in ["receivers", "processors", "exporters"] {
            let path = format!("service.pipelines.{pipeline}.{section}");
            let defined = keys(&collector, section, COLLECTOR);
            for component in strings(&collector, &path, COLLECTOR) {
                assert!(
                    defined.contains(&component),
                    "{COLLECTOR}: `{path}` names `{component}`, which `{section}` does not define"
                );
            }
        }
        let path = format!("service.pipelines.{pipeline}");
        assert!(
            strings(&collector, &format!("{path}.receivers"), COLLECTOR).contains(&"otlp".into()),
            "{COLLECTOR}: `{path}` does not receive OTLP"
        );
        assert!(
            strings(&collector, &format!("{path}.processors"), COLLECTOR).contains(&"batch".into()),
            "{COLLECTOR}: `{path}` does not batch"
        );
    }
    if let Some(extensions) = collector.get("service").and_then(|s| s.get("extensions")) {
        let defined = keys(&collector, "extensions", COLLECTOR);
        for extension in extensions.as_sequence().into_iter().flatten() {
            let extension = scalar(extension, COLLECTOR);
            assert!(
                defined.contains(&extension),
                "{COLLECTOR}: extension `{extension}` is not defined"
            );
        }
    }

    // Metrics: the `prometheus` exporter, default name translation, resource attributes as labels.
    assert!(
        strings(&collector, "service.pipelines.metrics.exporters", COLLECTOR)
            .contains(&"prometheus".into()),
        "{COLLECTOR}: the metrics pipeline does not export through `prometheus`"
    );
    let prometheus = at(&collector, "exporters.prometheus", COLLECTOR);
    assert_eq!(
        at(
            prometheus,
            "resource_to_telemetry_conversion.enabled",
            COLLECTOR
        )
        .as_bool(),
        Some(true),
        "{COLLECTOR}: service.instance.id must become the label service_instance_id"
    );
    assert_ne!(
        prometheus
            .get("add_metric_suffixes")
            .and_then(Yaml::as_bool),
        Some(false),
        "{COLLECTOR}: the dashboards expect unit and `_total` suffixes"
    );
    if let Some(strategy) = prometheus.get("translation_strategy") {
        assert_eq!(
            strategy.as_str(),
            Some("UnderscoreEscapingWithSuffixes"),
            "{COLLECTOR}: the dashboards expect the default name translation"
        );
    }

    // Traces: OTLP gRPC to Tempo's receiver.
    let tempo = yaml(TEMPO);
    let tempo_grpc = port_of(text(
        &tempo,
        "distributor.receivers.otlp.protocols.grpc.endpoint",
        TEMPO,
    ));
    let exporters = strings(&collector, "service.pipelines.traces.exporters", COLLECTOR);
    let to_tempo: Vec<&String> = exporters
        .iter()
        .filter(|name| name.as_str() == "otlp" || name.starts_with("otlp/"))
        .filter(|name| {
            let endpoint = text(&collector, &format!("exporters.{name}.endpoint"), COLLECTOR);
            authority(endpoint) == format!("tempo:{tempo_grpc}")
        })
        .collect();
    assert!(
        !to_tempo.is_empty(),
        "{COLLECTOR}: no OTLP exporter of the traces pipeline sends to tempo:{tempo_grpc}"
    );
    let compose = yaml(COMPOSE);
    assert!(
        service_names(&compose, COMPOSE).contains("tempo"),
        "{COMPOSE}: no service `tempo` for the collector's exporter"
    );
}

#[test]
fn compose_publishes_the_stack_on_loopback_only() {
    let compose = yaml(COMPOSE);
    let names = service_names(&compose, COMPOSE);
    for (name, image) in [
        ("otel-collector", "otel/opentelemetry-collector-contrib"),
        ("tempo", "grafana/tempo"),
        ("prometheus", "prom/prometheus"),
        ("grafana", "grafana/grafana"),
    ] {
        assert!(names.contains(name), "{COMPOSE}: no service `{name}`");
        let found = text(service(&compose, name), "image", COMPOSE);
        assert!(
            found == image || found.starts_with(&format!("{image}:")),
            "{COMPOSE}: {name} runs `{found}`, not {image}"
        );
    }

    let collector = yaml(COLLECTOR);
    let tempo = yaml(TEMPO);
    let expected: BTreeMap<&str, Vec<u16>> = BTreeMap::from([
        (
            "otel-collector",
            vec![
                collector_grpc_port(&collector),
                port_of(text(
                    &collector,
                    "receivers.otlp.protocols.http.endpoint",
                    COLLECTOR,
                )),
            ],
        ),
        ("grafana", vec![3000]),
        ("prometheus", vec![9090]),
        (
            "tempo",
            vec![at(&tempo, "server.http_listen_port", TEMPO)
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .expect("tempo.yaml: server.http_listen_port is a port")],
        ),
    ]);
    for name in &names {
        let what = format!("{COMPOSE}: service {name}");
        let ports = published(service(&compose, name), &what);
        for (ip, host, container) in &ports {
            assert_eq!(
                ip, "127.0.0.1",
                "{what} publishes {container} beyond loopback"
            );
            assert_eq!(
                host, container,
                "{what}: {container} is published as {host}"
            );
        }
        let mut containers: Vec<u16> = ports.iter().map(|p| p.2).collect();
        containers.sort_unstable();
        let mut wanted = expected.get(name.as_str()).cloned().unwrap_or_default();
        wanted.sort_unstable();
        assert_eq!(containers, wanted, "{what}: published ports");
    }
    assert_eq!(
        [3000, 3200, 4317, 4318, 9090],
        [
            expected["grafana"][0],
            expected["tempo"][0],
            expected["otel-collector"][0],
            expected["otel-collector"][1],
            expected["prometheus"][0]
        ],
        "the documented ports"
    );

    // What the header tells operators matches the published OTLP port.
    let header = read(&observability_dir().join(COMPOSE));
    let endpoint = format!(
        "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:{}",
        collector_grpc_port(&collector)
    );
    assert!(
        header.contains(&endpoint),
        "{COMPOSE}: the header does not say {endpoint}"
    );
    assert!(
        header.contains("OTEL_SERVICE_NAME"),
        "{COMPOSE}: the header does not name OTEL_SERVICE_NAME"
    );
}

#[test]
fn every_service_loads_its_config_from_a_file_in_the_repository() {
    let compose = yaml(COMPOSE);
    let dir = observability_dir();
    for name in service_names(&compose, COMPOSE) {
        let what = format!("{COMPOSE}: service {name}");
        for (source, target) in volumes(service(&compose, &name), &what) {
            if source.starts_with('.') || source.starts_with('/') {
                assert!(
                    dir.join(&source).exists(),
                    "{what}: {source} (mounted at {target}) is not in {}",
                    dir.display()
                );
            }
        }
    }
    for (name, flag_name, file) in [
        ("otel-collector", "--config", COLLECTOR),
        ("tempo", "-config.file", TEMPO),
        ("prometheus", "--config.file", PROMETHEUS),
    ] {
        let what = format!("{COMPOSE}: service {name}");
        let svc = service(&compose, name);
        let config = flag(&strings(svc, "command", &what), flag_name, &what);
        let source = mounted_at(svc, &config, &what);
        assert_eq!(
            Path::new(&source),
            Path::new(".").join(file).as_path(),
            "{what}: {flag_name}={config} is not ./{file}"
        );
    }
}

#[test]
fn prometheus_scrapes_the_collectors_prometheus_exporter() {
    let collector = yaml(COLLECTOR);
    let port = port_of(text(&collector, "exporters.prometheus.endpoint", COLLECTOR));
    let target = format!("otel-collector:{port}");
    let prometheus = yaml(PROMETHEUS);
    let jobs = at(&prometheus, "scrape_configs", PROMETHEUS)
        .as_sequence()
        .unwrap_or_else(|| panic!("{PROMETHEUS}: `scrape_configs` is not a list"));
    let job = jobs
        .iter()
        .find(|job| {
            job.get("static_configs")
                .and_then(Yaml::as_sequence)
                .into_iter()
                .flatten()
                .any(|sc| strings(sc, "targets", PROMETHEUS).contains(&target))
        })
        .unwrap_or_else(|| panic!("{PROMETHEUS}: no job scrapes {target}"));
    let interval = job
        .get("scrape_interval")
        .or_else(|| {
            prometheus
                .get("global")
                .and_then(|g| g.get("scrape_interval"))
        })
        .and_then(Yaml::as_str)
        .unwrap_or_else(|| panic!("{PROMETHEUS}: no scrape_interval for {target}"));
    assert_eq!(interval, "5s", "{PROMETHEUS}: scrape interval of {target}");
    assert_eq!(
        job.get("honor_labels").and_then(Yaml::as_bool),
        Some(true),
        "{PROMETHEUS}: without honor_labels the collector's job/instance become exported_*"
    );
    let compose = yaml(COMPOSE);
    assert!(
        service_names(&compose, COMPOSE).contains("otel-collector"),
        "{COMPOSE}: {target} is not a service"
    );

    // Grafana's Prometheus datasource: that Prometheus, with the scrape interval as its step.
    let datasources = yaml(DATASOURCES);
    let prometheus_ds = at(&datasources, "datasources", DATASOURCES)
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|ds| ds.get("uid").and_then(Yaml::as_str) == Some("prometheus"))
        .unwrap_or_else(|| panic!("{DATASOURCES}: no datasource with uid prometheus"));
    assert_eq!(
        text(prometheus_ds, "jsonData.timeInterval", DATASOURCES),
        interval,
        "{DATASOURCES}: timeInterval should be the scrape interval"
    );
}

#[test]
fn grafana_mounts_the_provisioning_and_the_dashboards_and_the_datasources_resolve() {
    let compose = yaml(COMPOSE);
    let what = format!("{COMPOSE}: service grafana");
    let grafana = service(&compose, "grafana");
    let env = service_env(grafana, &what);
    assert_eq!(
        env.get("GF_AUTH_ANONYMOUS_ENABLED").map(String::as_str),
        Some("true"),
        "{what}: anonymous access"
    );
    assert_eq!(
        env.get("GF_AUTH_ANONYMOUS_ORG_ROLE").map(String::as_str),
        Some("Admin"),
        "{what}: anonymous role"
    );

    let dir = observability_dir();
    let provisioning = mounted_at(grafana, "/etc/grafana/provisioning", &what);
    assert_eq!(
        dir.join(&provisioning),
        dir.join("grafana/provisioning"),
        "{what}: provisioning"
    );
    for file in [DATASOURCES, DASHBOARD_PROVIDERS] {
        assert!(dir.join(file).is_file(), "{file} is missing");
    }

    // The dashboards directory: where the provider reads, mounted from grafana/dashboards.
    let providers = yaml(DASHBOARD_PROVIDERS);
    let paths: Vec<String> = at(&providers, "providers", DASHBOARD_PROVIDERS)
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|p| text(p, "options.path", DASHBOARD_PROVIDERS).to_string())
        .collect();
    assert_eq!(
        paths,
        ["/var/lib/grafana/dashboards"],
        "{DASHBOARD_PROVIDERS}: provider paths"
    );
    let dashboards = mounted_at(grafana, &paths[0], &what);
    assert_eq!(
        dir.join(&dashboards),
        dashboards_dir(),
        "{what}: {} is not grafana/dashboards",
        paths[0]
    );

    // Each datasource points at its service, on the port that service listens on.
    let tempo = yaml(TEMPO);
    let tempo_port = at(&tempo, "server.http_listen_port", TEMPO)
        .as_u64()
        .expect("tempo.yaml: server.http_listen_port");
    let datasources = yaml(DATASOURCES);
    let names = service_names(&compose, COMPOSE);
    for ds in at(&datasources, "datasources", DATASOURCES)
        .as_sequence()
        .into_iter()
        .flatten()
    {
        let uid = text(ds, "uid", DATASOURCES);
        let url = text(ds, "url", DATASOURCES);
        let expected = match text(ds, "type", DATASOURCES) {
            "prometheus" => "prometheus:9090".to_string(),
            "tempo" => format!("tempo:{tempo_port}"),
            other => panic!("{DATASOURCES}: unexpected datasource type `{other}`"),
        };
        assert_eq!(authority(url), expected, "{DATASOURCES}: datasource {uid}");
        let host = expected.split(':').next().unwrap_or_default();
        assert!(
            names.contains(host),
            "{COMPOSE}: no service `{host}` for {uid}"
        );
    }
    let provisioned = provisioned_datasources();
    for (uid, kind) in [("prometheus", "prometheus"), ("tempo", "tempo")] {
        assert_eq!(
            provisioned.get(uid).map(String::as_str),
            Some(kind),
            "{DATASOURCES}: uid {uid}"
        );
    }
}

#[test]
fn the_cluster_override_points_every_replica_at_the_collector() {
    let cluster_file = repo_dir().join("deploy/cluster/compose.yaml");
    let cluster = yaml_at(&cluster_file);
    let replicas: BTreeSet<String> = at(&cluster, "services", "deploy/cluster/compose.yaml")
        .as_mapping()
        .into_iter()
        .flatten()
        .filter(|(_, s)| {
            s.get("image")
                .and_then(Yaml::as_str)
                .is_some_and(|i| i.starts_with("codebolt/control-plane"))
        })
        .map(|(name, _)| scalar(name, "deploy/cluster/compose.yaml"))
        .collect();
    assert!(
        !replicas.is_empty(),
        "{}: no replicas",
        cluster_file.display()
    );

    let over = yaml(CLUSTER_OVERRIDE);
    assert_eq!(
        service_names(&over, CLUSTER_OVERRIDE),
        replicas,
        "{CLUSTER_OVERRIDE}: the services it changes are the cluster's replicas"
    );

    let compose = yaml(COMPOSE);
    let network = text(&compose, "networks.default.name", COMPOSE);
    let (key, declared) = at(&over, "networks", CLUSTER_OVERRIDE)
        .as_mapping()
        .into_iter()
        .flatten()
        .find(|(_, n)| n.get("name").and_then(Yaml::as_str) == Some(network))
        .unwrap_or_else(|| panic!("{CLUSTER_OVERRIDE}: no network named {network}"));
    let key = scalar(key, CLUSTER_OVERRIDE);
    assert_eq!(
        declared.get("external").and_then(Yaml::as_bool),
        Some(true),
        "{CLUSTER_OVERRIDE}: {network} is created by {COMPOSE}, so it is external here"
    );

    let collector = yaml(COLLECTOR);
    let endpoint = format!("http://otel-collector:{}", collector_grpc_port(&collector));
    for name in &replicas {
        let what = format!("{CLUSTER_OVERRIDE}: service {name}");
        let replica = at(&over, "services", CLUSTER_OVERRIDE)
            .get(name.as_str())
            .expect("listed above");
        let env = service_env(replica, &what);
        assert_eq!(
            env.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
            Some(&endpoint),
            "{what}"
        );
        assert_eq!(
            env.get("OTEL_EXPORTER_OTLP_PROTOCOL").map(String::as_str),
            Some("grpc"),
            "{what}: the collector's port {} speaks gRPC",
            collector_grpc_port(&collector)
        );
        assert!(
            env.get("OTEL_SERVICE_NAME").is_some_and(|s| !s.is_empty()),
            "{what}: no OTEL_SERVICE_NAME"
        );
        assert!(
            env.get("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a
                .split(',')
                .any(|kv| kv == format!("service.instance.id={name}"))),
            "{what}: service.instance.id is not {name}"
        );
        let networks = strings(replica, "networks", &what);
        assert!(
            networks.contains(&"default".to_string()) && networks.contains(&key),
            "{what}: must stay on the cluster's network and join {network} ({networks:?})"
        );
        assert!(
            replica.get("volumes").is_none(),
            "{what}: relative paths here would resolve against deploy/cluster/"
        );
    }
}
