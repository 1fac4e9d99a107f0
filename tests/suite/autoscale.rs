//! The cluster-autoscaler recipes of docs/autoscaling.md against a real
//! Prometheus (Debian's `prometheus`): three droved "pods" of one pool
//! (`pool.max = 4` each) under a load above their combined capacity, then
//! a light one. Each recipe's PromQL is read from its file under
//! docs/autoscaling/ (the files the docs tell users to copy, so the two
//! cannot drift), run through Prometheus' HTTP API, and turned into the
//! replicas its engine would ask for with the engine's documented formula.
//! No cluster runs here: the YAML is parsed (PyYAML, Debian's
//! python3-yaml) and the Nomad HCL by a small parser below, and checked for
//! the fields each engine needs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use super::harness::*;
use super::metrics::Prometheus;

const SEC: Duration = Duration::from_secs(1);
/// The pods of the deployment, and the workers each may have.
const PODS: u32 = 3;
const MAX: u32 = 4;
const MIN: u32 = 1;
/// The pool name (droved's instance name) on every series.
const POOL: &str = "web";
/// The namespace a Kubernetes scrape config would add (the recipes select
/// on it, as prometheus-adapter does).
const NAMESPACE: &str = "shop";

fn recipe_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs/autoscaling")
        .join(name)
}

/// The documents of a YAML file, as JSON, parsed by PyYAML.
fn yaml(name: &str) -> Vec<Value> {
    let path = recipe_path(name);
    // Debian's python3, where python3-yaml installs (not a venv's).
    let out = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)",
        ])
        .arg(&path)
        .output()
        .expect("/usr/bin/python3 must be installed");
    assert!(
        out.status.success(),
        "parsing {} (needs Debian's python3-yaml): {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `v` at the dotted `path` (numbers index lists), which must exist.
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for key in path.split('.') {
        cur = match key.parse::<usize>() {
            Ok(i) => &cur[i],
            Err(_) => &cur[key],
        };
        assert!(!cur.is_null(), "no {path} (at {key}) in {v}");
    }
    cur
}

fn text<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string in {v}"))
}

/// A number, also when written as a string (`averageValue: "3"`).
fn num(v: &Value, path: &str) -> f64 {
    let x = at(v, path);
    x.as_f64()
        .or_else(|| x.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("{path} is not a number in {v}"))
}

/// How an engine turns a metric into replicas.
#[derive(Debug, Clone, Copy)]
enum Formula {
    /// Kubernetes HPA, external metric with an `AverageValue` target (KEDA's
    /// prometheus trigger makes the same): the value per pod is `value /
    /// current`, and `desired = ceil(current × per_pod / target)` unless
    /// `per_pod / target` is within the tolerance (0.1) of 1.
    HpaAverageValue { target: f64 },
    /// The Nomad autoscaler's target-value strategy: `factor = value /
    /// target`, `desired = ceil(current × factor)` unless the factor is
    /// within `threshold` (default 0.01) of 1.
    NomadTargetValue { target: f64 },
}

/// kube-controller-manager's --horizontal-pod-autoscaler-tolerance default.
const HPA_TOLERANCE: f64 = 0.1;
/// The target-value strategy's default threshold.
const NOMAD_THRESHOLD: f64 = 0.01;

impl Formula {
    /// The target value, and the change in the metric the engine ignores.
    fn target(self) -> (f64, f64) {
        match self {
            Formula::HpaAverageValue { target } => (target, HPA_TOLERANCE),
            Formula::NomadTargetValue { target } => (target, NOMAD_THRESHOLD),
        }
    }

    /// Replicas the engine asks for, before its min/max bounds.
    fn desired(self, current: u32, value: f64) -> u32 {
        let current_f = f64::from(current);
        match self {
            // As kube-controller-manager computes it for AverageValue:
            // ceil(value / target), the same as ceil(current × (value /
            // current) / target).
            Formula::HpaAverageValue { target } => {
                let ratio = value / (target * current_f);
                if (ratio - 1.0).abs() <= HPA_TOLERANCE {
                    current
                } else {
                    (value / target).ceil() as u32
                }
            }
            Formula::NomadTargetValue { target } => {
                let factor = value / target;
                if (factor - 1.0).abs() <= NOMAD_THRESHOLD {
                    current
                } else {
                    (current_f * factor).ceil() as u32
                }
            }
        }
    }
}

#[derive(Debug)]
struct Recipe {
    engine: &'static str,
    query: String,
    formula: Formula,
    min: u32,
    max: u32,
}

/// prometheus-adapter.yaml and hpa.yaml: the adapter's external rule
/// rendered for the HPA's metric and selector, as the adapter does
/// (`<<.Series>>`, `<<.LabelMatchers>>` with the HPA's namespace).
fn hpa_recipe() -> Recipe {
    let adapter = yaml("prometheus-adapter.yaml");
    let hpa = yaml("hpa.yaml");
    let (adapter, hpa) = (&adapter[0], &hpa[0]);
    assert_eq!(text(hpa, "apiVersion"), "autoscaling/v2");
    assert_eq!(text(hpa, "kind"), "HorizontalPodAutoscaler");
    assert_eq!(text(hpa, "spec.scaleTargetRef.kind"), "Deployment");
    text(hpa, "spec.scaleTargetRef.name");
    let metric = at(hpa, "spec.metrics.0");
    assert_eq!(text(metric, "type"), "External");
    assert_eq!(text(metric, "external.target.type"), "AverageValue");
    let name = text(metric, "external.metric.name");
    let selector = at(metric, "external.metric.selector.matchLabels")
        .as_object()
        .unwrap();
    assert_eq!(selector["pool"], POOL, "the HPA selects the pool");

    // The adapter's rule that serves this metric.
    let rule = at(adapter, "externalRules")
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"]["as"] == name)
        .unwrap_or_else(|| panic!("no external rule names {name} in {adapter}"));
    let series = text(rule, "seriesQuery");
    assert!(series.contains(&format!("__name__=\"{name}\"")), "{series}");
    assert_eq!(
        text(rule, "resources.overrides.namespace.resource"),
        "namespace"
    );
    let mut matchers: Vec<String> = selector
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.as_str().unwrap()))
        .collect();
    matchers.push(format!("namespace=\"{}\"", text(hpa, "metadata.namespace")));
    let query = text(rule, "metricsQuery")
        .replace("<<.Series>>", name)
        .replace("<<.LabelMatchers>>", &matchers.join(","));
    assert!(!query.contains("<<"), "unrendered template in {query}");
    Recipe {
        engine: "Kubernetes HPA + prometheus-adapter",
        query,
        formula: Formula::HpaAverageValue {
            target: num(metric, "external.target.averageValue"),
        },
        min: num(hpa, "spec.minReplicas") as u32,
        max: num(hpa, "spec.maxReplicas") as u32,
    }
}

/// keda-scaledobject.yaml: KEDA's prometheus trigger; `threshold` is the
/// AverageValue target of the HPA KEDA makes.
fn keda_recipe() -> Recipe {
    let keda = yaml("keda-scaledobject.yaml");
    let keda = &keda[0];
    assert_eq!(text(keda, "apiVersion"), "keda.sh/v1alpha1");
    assert_eq!(text(keda, "kind"), "ScaledObject");
    text(keda, "spec.scaleTargetRef.name");
    let trigger = at(keda, "spec.triggers.0");
    assert_eq!(text(trigger, "type"), "prometheus");
    assert!(text(trigger, "metadata.serverAddress").starts_with("http"));
    // KEDA reads trigger metadata as strings.
    assert!(at(trigger, "metadata.threshold").is_string(), "{trigger}");
    Recipe {
        engine: "KEDA ScaledObject",
        query: text(trigger, "metadata.query").to_owned(),
        formula: Formula::HpaAverageValue {
            target: num(trigger, "metadata.threshold"),
        },
        min: num(keda, "spec.minReplicaCount") as u32,
        max: num(keda, "spec.maxReplicaCount") as u32,
    }
}

fn hcl_file(name: &str) -> hcl::Body {
    let path = recipe_path(name);
    let text = std::fs::read_to_string(&path).unwrap();
    hcl::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// nomad-policy.hcl (a job's group scaling block) and nomad-autoscaler.hcl
/// (the agent's prometheus APM plugin).
fn nomad_recipe() -> Recipe {
    let agent = hcl_file("nomad-autoscaler.hcl");
    let apm = agent
        .block("apm", &["prometheus"])
        .expect("an apm \"prometheus\" block");
    assert_eq!(apm.string("driver"), Some("prometheus"));
    let config = apm.object("config").expect("apm config = { ... }");
    assert!(config.string("address").unwrap().starts_with("http"));

    let job = hcl_file("nomad-policy.hcl");
    let scaling = job
        .block("job", &["web"])
        .and_then(|j| j.block("group", &["web"]))
        .and_then(|g| g.block("scaling", &[]))
        .expect("job \"web\" { group \"web\" { scaling { ... } } }");
    assert_eq!(scaling.attr("enabled"), Some(&hcl::Value::Bool(true)));
    let policy = scaling.block("policy", &[]).expect("scaling { policy }");
    let checks: Vec<_> = policy.blocks.iter().filter(|b| b.ty == "check").collect();
    assert_eq!(checks.len(), 1, "one check in {policy:?}");
    let check = checks[0];
    assert_eq!(check.labels.len(), 1, "a check has a name: {check:?}");
    assert_eq!(check.string("source"), Some("prometheus"));
    let strategy = check
        .block("strategy", &["target-value"])
        .expect("strategy \"target-value\"");
    Recipe {
        engine: "Nomad autoscaler",
        query: check.string("query").expect("check query").to_owned(),
        formula: Formula::NomadTargetValue {
            target: strategy.number("target").expect("strategy target"),
        },
        min: scaling.number("min").expect("scaling min") as u32,
        max: scaling.number("max").expect("scaling max") as u32,
    }
}

/// The few HCL forms Nomad's scaling policies use: blocks with labels,
/// attributes whose values are strings, numbers, booleans or `{ k = v }`
/// objects; `#` and `//` comments. Anything else is an error, so a recipe
/// that strays from these forms fails the test instead of passing unread.
mod hcl {
    #[derive(Debug, Clone, PartialEq)]
    pub enum Value {
        Str(String),
        Num(f64),
        Bool(bool),
        Object(Body),
    }

    #[derive(Debug, Clone, PartialEq, Default)]
    pub struct Body {
        pub attrs: Vec<(String, Value)>,
        pub blocks: Vec<Block>,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub struct Block {
        pub ty: String,
        pub labels: Vec<String>,
        pub body: Body,
    }

    impl std::ops::Deref for Block {
        type Target = Body;
        fn deref(&self) -> &Body {
            &self.body
        }
    }

    impl Body {
        pub fn attr(&self, key: &str) -> Option<&Value> {
            let mut found = self.attrs.iter().filter(|(k, _)| k == key);
            let v = found.next().map(|(_, v)| v);
            assert!(found.next().is_none(), "{key} set twice");
            v
        }
        pub fn string(&self, key: &str) -> Option<&str> {
            match self.attr(key)? {
                Value::Str(s) => Some(s),
                other => panic!("{key} = {other:?} is not a string"),
            }
        }
        pub fn number(&self, key: &str) -> Option<f64> {
            match self.attr(key)? {
                Value::Num(n) => Some(*n),
                other => panic!("{key} = {other:?} is not a number"),
            }
        }
        pub fn object(&self, key: &str) -> Option<&Body> {
            match self.attr(key)? {
                Value::Object(b) => Some(b),
                other => panic!("{key} = {other:?} is not an object"),
            }
        }
        pub fn block(&self, ty: &str, labels: &[&str]) -> Option<&Block> {
            self.blocks.iter().find(|b| {
                b.ty == ty
                    && b.labels
                        .iter()
                        .map(String::as_str)
                        .eq(labels.iter().copied())
            })
        }
    }

    #[derive(Debug, Clone, PartialEq)]
    enum Tok {
        Ident(String),
        Str(String),
        Num(f64),
        Open,
        Close,
        Eq,
        Comma,
    }

    fn lex(src: &str) -> Result<Vec<Tok>, String> {
        let mut toks = Vec::new();
        let mut it = src.chars().peekable();
        while let Some(c) = it.next() {
            match c {
                c if c.is_whitespace() => {}
                '#' => while it.next_if(|&c| c != '\n').is_some() {},
                '/' if it.peek() == Some(&'/') => while it.next_if(|&c| c != '\n').is_some() {},
                '{' => toks.push(Tok::Open),
                '}' => toks.push(Tok::Close),
                '=' => toks.push(Tok::Eq),
                ',' => toks.push(Tok::Comma),
                '"' => {
                    let mut s = String::new();
                    loop {
                        match it.next().ok_or("unterminated string")? {
                            '"' => break,
                            '\\' => match it.next().ok_or("unterminated escape")? {
                                'n' => s.push('\n'),
                                c @ ('"' | '\\') => s.push(c),
                                c => return Err(format!("escape \\{c} not supported")),
                            },
                            '$' | '%' if it.peek() == Some(&'{') => {
                                return Err("HCL templates (${ }, %{ }) not supported".into());
                            }
                            c => s.push(c),
                        }
                    }
                    toks.push(Tok::Str(s));
                }
                c if c.is_ascii_digit() => {
                    let mut s = c.to_string();
                    while let Some(d) = it.next_if(|c| c.is_ascii_digit() || *c == '.') {
                        s.push(d);
                    }
                    toks.push(Tok::Num(s.parse().map_err(|e| format!("{s}: {e}"))?));
                }
                c if c.is_alphabetic() || c == '_' => {
                    let mut s = c.to_string();
                    while let Some(d) =
                        it.next_if(|c| c.is_alphanumeric() || *c == '_' || *c == '-')
                    {
                        s.push(d);
                    }
                    toks.push(Tok::Ident(s));
                }
                c => return Err(format!("unexpected {c:?}")),
            }
        }
        Ok(toks)
    }

    /// The file's items, or what in it is outside the supported forms.
    pub fn parse(src: &str) -> Result<Body, String> {
        let toks = lex(src)?;
        let mut pos = 0;
        let body = parse_body(&toks, &mut pos, false)?;
        match toks.get(pos) {
            None => Ok(body),
            Some(t) => Err(format!("unexpected {t:?} at token {pos}")),
        }
    }

    /// Items up to the end (top level) or the closing brace (consumed).
    fn parse_body(toks: &[Tok], pos: &mut usize, nested: bool) -> Result<Body, String> {
        let mut body = Body::default();
        loop {
            let name = match toks.get(*pos) {
                None if !nested => return Ok(body),
                Some(Tok::Close) if nested => {
                    *pos += 1;
                    return Ok(body);
                }
                Some(Tok::Comma) if nested => {
                    *pos += 1; // between object items
                    continue;
                }
                Some(Tok::Ident(name)) => name.clone(),
                other => return Err(format!("unexpected {other:?} at token {pos}")),
            };
            *pos += 1;
            if toks.get(*pos) == Some(&Tok::Eq) {
                *pos += 1;
                let v = match toks.get(*pos) {
                    Some(Tok::Str(s)) => Value::Str(s.clone()),
                    Some(Tok::Num(n)) => Value::Num(*n),
                    Some(Tok::Ident(b)) if b == "true" || b == "false" => Value::Bool(b == "true"),
                    Some(Tok::Open) => {
                        *pos += 1;
                        let o = parse_body(toks, pos, true)?;
                        if !o.blocks.is_empty() {
                            return Err(format!("blocks inside the object {name}"));
                        }
                        body.attrs.push((name, Value::Object(o)));
                        continue;
                    }
                    other => return Err(format!("{name} = {other:?}: value not supported")),
                };
                *pos += 1;
                body.attrs.push((name, v));
            } else {
                let mut labels = Vec::new();
                while let Some(Tok::Str(l)) = toks.get(*pos) {
                    labels.push(l.clone());
                    *pos += 1;
                }
                if toks.get(*pos) != Some(&Tok::Open) {
                    return Err(format!("block {name} {labels:?} without a body"));
                }
                *pos += 1;
                let inner = parse_body(toks, pos, true)?;
                body.blocks.push(Block {
                    ty: name,
                    labels,
                    body: inner,
                });
            }
        }
    }

    #[test]
    fn parses_the_forms_nomad_policies_use() {
        let b = parse(
            "# c\na \"x\" \"y\" {\n  n = 3 // c\n  s = \"q{l=\\\"v\\\"}\"\n  o = { k = \"v\", m = 1 }\n  t = true\n  inner { }\n}\n",
        )
        .unwrap();
        let a = b.block("a", &["x", "y"]).unwrap();
        assert_eq!(a.number("n"), Some(3.0));
        assert_eq!(a.string("s"), Some("q{l=\"v\"}"));
        assert_eq!(a.object("o").unwrap().number("m"), Some(1.0));
        assert_eq!(a.attr("t"), Some(&Value::Bool(true)));
        assert!(a.block("inner", &[]).is_some());
        for bad in ["a = [1]", "a {", "a = \"${x}\"", "a = b", "}", "a \"x\""] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }
}

#[test]
fn the_formulas_match_the_engines_documentation() {
    let hpa = Formula::HpaAverageValue { target: 3.0 };
    // 3 pods wanting 36 workers: 12 pods of 3.
    assert_eq!(hpa.desired(3, 36.0), 12);
    // Within the tolerance (9.5 / 9 = 1.06): no change.
    assert_eq!(hpa.desired(3, 9.5), 3);
    assert_eq!(hpa.desired(3, 8.2), 3);
    assert_eq!(hpa.desired(3, 8.0), 3); // 8 / 3 = 2.67 -> ceil 3
    assert_eq!(hpa.desired(3, 3.0), 1);
    let nomad = Formula::NomadTargetValue { target: 3.0 };
    assert_eq!(nomad.desired(3, 12.0), 12);
    assert_eq!(nomad.desired(3, 3.02), 3);
    assert_eq!(nomad.desired(3, 1.0), 1);
}

/// A pod: droved with the example worker, named `web`, metrics on its own
/// port. A short cooldown so that the test sees demand fall in seconds.
fn pod(metrics_port: u16) -> Droved {
    let config = example_config(
        MIN,
        MAX,
        "",
        &format!("[scale]\ncooldown = \"1s\"\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\""),
    );
    let mut d = Droved::builder("autoscale")
        .config(&config)
        .args(&["--instance", POOL])
        .start();
    d.wait_ready();
    d
}

/// Waits until the replicas each recipe asks for now, with `PODS`
/// current, satisfy `good`; returns them.
fn wait_asks(
    prometheus: &Prometheus,
    recipes: &[Recipe],
    what: &str,
    good: impl Fn(u32) -> bool,
) -> Vec<u32> {
    let deadline = Instant::now() + 40 * SEC;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let values: Vec<Option<f64>> = recipes.iter().map(|r| prometheus.query(&r.query)).collect();
        let asks: Option<Vec<u32>> = recipes
            .iter()
            .zip(&values)
            .map(|(r, v)| v.map(|v| r.formula.desired(PODS, v)))
            .collect();
        if let Some(asks) = asks.filter(|a| a.iter().all(|&n| good(n))) {
            return asks;
        }
        if seen.last() != Some(&values) {
            seen.push(values);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "timed out: {what}; the recipes' queries answered, in turn: {seen:?}\nPrometheus' log:\n{}",
        prometheus.log()
    );
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn recipes_ask_for_more_pods_under_overload_and_fewer_after() {
    let begun = Instant::now();
    let recipes = [hpa_recipe(), keda_recipe(), nomad_recipe()];
    for r in &recipes {
        assert!(r.min >= 1 && r.max > PODS, "{r:?}");
        // docs/autoscaling.md's rule: idle pods (demand pool.min) must ask
        // for fewer pods, and pods at max with no queue may ask for more.
        let (target, tolerance) = r.formula.target();
        assert!(
            f64::from(MIN) / target < 1.0 - tolerance && target <= f64::from(MAX),
            "{}: target {target} for pool.min {MIN}, pool.max {MAX}",
            r.engine
        );
        assert!(
            r.query.contains(&format!("pool=\"{POOL}\"")),
            "{} selects the pool: {}",
            r.engine,
            r.query
        );
    }

    let mut reservations = Vec::new();
    let mut pods = Vec::new();
    let mut targets = String::new();
    for i in 0..PODS {
        let (reservation, mport) = reserve_port();
        reservations.push(reservation);
        pods.push(pod(mport));
        // What Kubernetes service discovery and relabeling would add.
        targets.push_str(&format!(
            "      - targets: ['127.0.0.1:{mport}']\n        labels: {{namespace: {NAMESPACE}, pod: web-{i}}}\n"
        ));
    }
    let prometheus = Prometheus::with_scrape_configs(&format!(
        "  - job_name: drove\n    static_configs:\n{targets}"
    ));
    let all_pods = format!("count(drove_workers_demand{{pool=\"{POOL}\"}})");
    prometheus.wait_for(&all_pods, f64::from(PODS));
    let start = unix_now();

    // Overload: 12 clients per pod on requests of 200 ms, where each pod
    // serves at most 4 at a time: 36 wanted, 12 possible.
    let overload: Vec<Load> = pods
        .iter()
        .map(|p| Load::start(Target::Tcp(p.port), "/sleep?ms=200", 12, 90 * SEC))
        .collect();
    let under_overload = wait_asks(
        &prometheus,
        &recipes,
        "every recipe asks for more pods",
        |n| n > PODS,
    );
    // All pods at max: utilization 1, demand above max on each.
    prometheus.wait_for(
        &format!("avg(drove_workers_utilization_ratio{{pool=\"{POOL}\"}})"),
        1.0,
    );
    prometheus.wait_for(
        &format!(
            "count(drove_workers_demand{{pool=\"{POOL}\"}} > drove_workers_max{{pool=\"{POOL}\"}})"
        ),
        f64::from(PODS),
    );

    // Light load: one client per pod, so traffic never stops; then the
    // overload ends.
    let light: Vec<Load> = pods
        .iter()
        .map(|p| Load::start(Target::Tcp(p.port), "/sleep?ms=20", 1, 90 * SEC))
        .collect();
    for l in overload {
        assert!(l.finish_clean() > 0);
    }
    let after = wait_asks(
        &prometheus,
        &recipes,
        "every recipe asks for fewer pods",
        |n| (1..PODS).contains(&n),
    );
    let end = unix_now();
    for l in light {
        assert!(l.finish_clean() > 0);
    }

    // Over the whole run, at every second Prometheus can answer for:
    // never fewer than 1 pod while traffic flowed.
    for r in &recipes {
        let data = prometheus
            .api(
                "query_range",
                &r.query,
                &format!("&start={start:.3}&end={end:.3}&step=1"),
            )
            .unwrap_or_else(|| panic!("query_range {}: {}", r.query, prometheus.log()));
        let values = data["result"][0]["values"]
            .as_array()
            .unwrap_or_else(|| panic!("no range for {}: {data}", r.query));
        let asks: Vec<u32> = values
            .iter()
            .map(|p| {
                r.formula
                    .desired(PODS, p[1].as_str().unwrap().parse().unwrap())
            })
            .collect();
        assert!(values.len() >= 3, "{} points: {data}", values.len());
        assert!(
            asks.iter().all(|&n| n >= 1),
            "{} asked for 0 pods while traffic flowed: {asks:?}",
            r.engine
        );
        assert!(asks.iter().any(|&n| n > PODS), "{}: {asks:?}", r.engine);
        println!(
            "{}: {} -> asks {:?} (bounded to {}..={})",
            r.engine, r.query, asks, r.min, r.max
        );
    }
    println!(
        "under overload {under_overload:?}, after {after:?} (HPA, KEDA, Nomad), in {:.1}s",
        begun.elapsed().as_secs_f64()
    );
}
