//! The documentation against the code: every config key the parser
//! accepts, every metric family a real droved serves, every option and
//! verb `--help` shows, is in the reference pages under docs/reference/
//! and in the man pages, and those name nothing the code lacks. Also: the
//! documented defaults are the parser's, every TOML example parses, and
//! every relative link in README.md and docs/ leads to a file.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use drove::config::{Config, KEYS};

use super::harness::*;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const DROVECTL: &str = env!("CARGO_BIN_EXE_drovectl");

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(REPO).join(path))
        .unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// Whether `word` occurs in `text` with no identifier character (or `-`)
/// right before or after it: `drove_workers` is not found in
/// `drove_workers_max`, nor `--max` in `--max-x`.
fn has_word(text: &str, word: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    text.match_indices(word).any(|(i, _)| {
        !text[..i].chars().next_back().is_some_and(ident)
            && !text[i + word.len()..].chars().next().is_some_and(ident)
    })
}

/// The lines of a markdown section: from the heading line `heading` to the
/// next heading, of any level.
fn md_section<'a>(text: &'a str, heading: &str) -> &'a str {
    let start = text
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no heading {heading:?}"))
        + 1;
    let body = &text[start + heading.len()..];
    let end = body.find("\n#").map_or(body.len(), |i| i + 1);
    &body[..end]
}

/// The rows of the markdown tables in `text`: their cells, trimmed,
/// without the header and separator rows.
fn table_rows(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut header = true;
    for line in text.lines() {
        let Some(inner) = line.trim().strip_prefix('|') else {
            header = true;
            continue;
        };
        let cells: Vec<String> = inner
            .trim_end_matches('|')
            .split('|')
            .map(|c| c.trim().to_owned())
            .collect();
        if cells
            .iter()
            .all(|c| c.chars().all(|ch| ch == '-' || ch == ':'))
        {
            continue;
        }
        if !std::mem::replace(&mut header, false) {
            rows.push(cells);
        }
    }
    rows
}

/// The first cell of each row, when it is one `code span`.
fn first_cells(rows: &[Vec<String>]) -> BTreeSet<String> {
    rows.iter()
        .filter_map(|r| {
            let c = r.first()?.strip_prefix('`')?.strip_suffix('`')?;
            Some(c.to_owned())
        })
        .collect()
}

/// The `.Sh NAME` section of an mdoc page, up to the next `.Sh`.
fn man_section<'a>(page: &'a str, name: &str) -> &'a str {
    let start = page
        .find(&format!("\n.Sh {name}\n"))
        .unwrap_or_else(|| panic!("no .Sh {name}"));
    let body = &page[start + 1..];
    let end = body[1..].find("\n.Sh ").map_or(body.len(), |i| i + 1);
    &body[..end]
}

/// Keys of the `.It Cm a , b No (default …)` items in an mdoc section,
/// each with the default the item gives, if any.
fn man_items(section: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for line in section.lines() {
        let Some(rest) = line.strip_prefix(".It Cm ") else {
            continue;
        };
        let (names, tail) = rest.split_once(" No ").unwrap_or((rest, ""));
        let default = man_default(tail);
        for name in names.split(" , ") {
            out.push((name.trim().to_owned(), default.clone()));
        }
    }
    out
}

/// `(default Qq 30s )` -> `"30s"`; `(default 1024)`, `(default: false)`
/// -> `1024`, `false`; a default in words (`(default: none)`,
/// `(default: droved's own)`) -> None.
fn man_default(tail: &str) -> Option<String> {
    let rest = tail.split_once("(default")?.1;
    let rest = rest.strip_prefix(':').unwrap_or(rest).trim_start();
    if let Some(q) = rest.strip_prefix("Qq ") {
        let v = q.split_whitespace().next()?;
        return Some(format!("\"{v}\""));
    }
    let v = rest.trim_end_matches(')').trim();
    let literal = toml::from_str::<toml::Table>(&format!("v = {v}")).is_ok();
    literal.then(|| v.to_owned())
}

/// The keys set, or left commented out, in `[table]` of examples/drove.toml.
fn example_keys(example: &str, table: &str) -> BTreeSet<String> {
    let mut current = String::new();
    let mut keys = BTreeSet::new();
    for line in example.lines() {
        let line = line.trim_start_matches('#').trim();
        if let Some(t) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = t.to_owned();
        } else if current == table
            && let Some((key, _)) = line.split_once(" = ")
            && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        {
            keys.insert(key.to_owned());
        }
    }
    keys
}

fn parse(text: &str) -> Config {
    Config::from_toml_str(text, Path::new("docs-test.toml"))
        .unwrap_or_else(|e| panic!("{text:?} does not parse: {e}"))
}

fn diff(what: &str, documented: &BTreeSet<String>, code: &BTreeSet<String>) -> Vec<String> {
    let mut out = Vec::new();
    for k in code.difference(documented) {
        out.push(format!("{what}: {k} is not documented"));
    }
    for k in documented.difference(code) {
        out.push(format!("{what}: {k} is documented but the code has none"));
    }
    out
}

#[test]
fn every_config_key_is_documented_with_its_default() {
    let reference = read("docs/reference/config.md");
    let man = read("man/drove.toml.5");
    let example = read("examples/drove.toml");
    let mut problems = Vec::new();
    for (table, keys) in KEYS {
        let code: BTreeSet<String> = keys.iter().map(|k| k.to_string()).collect();
        let (heading, man_name) = match table.split_once('.') {
            None => (format!("## [{table}]"), table.to_uppercase()),
            Some((parent, _)) => (format!("### {table} entries"), parent.to_uppercase()),
        };
        let rows = table_rows(md_section(&reference, &heading));
        problems.extend(diff(
            &format!("docs/reference/config.md [{table}]"),
            &first_cells(&rows),
            &code,
        ));
        let section = man_section(&man, &man_name);
        if table.contains('.') {
            // An entry's keys are spelled out in the item of its array.
            for key in *keys {
                if !section.contains(&format!("{key} =")) {
                    problems.push(format!(
                        "man/drove.toml.5 {man_name}: no `{key} =` for {table}"
                    ));
                }
                if !example.contains(&format!("{key} =")) {
                    problems.push(format!("examples/drove.toml: no `{key} =` for {table}"));
                }
            }
            continue;
        }
        let items = man_items(section);
        let man_keys: BTreeSet<String> = items.iter().map(|(k, _)| k.clone()).collect();
        problems.extend(diff(
            &format!("man/drove.toml.5 {man_name}"),
            &man_keys,
            &code,
        ));
        problems.extend(diff(
            &format!("examples/drove.toml [{table}]"),
            &example_keys(&example, table),
            &code,
        ));

        // Defaults: a literal in the reference is what the parser fills in
        // when the key is left out, and the man page says the same.
        let base = format!("[{table}]\n");
        for row in &rows {
            let (Some(key), Some(default)) = (row.first(), row.get(1)) else {
                continue;
            };
            let key = key.trim_matches('`');
            let Some(literal) = default.strip_prefix('`').and_then(|d| d.strip_suffix('`')) else {
                continue;
            };
            if parse(&format!("{base}{key} = {literal}\n")) != parse(&base) {
                problems.push(format!(
                    "docs/reference/config.md: {table}.{key} defaults to {literal}, the parser to something else"
                ));
            }
            match items.iter().find(|(k, _)| k == key) {
                Some((_, Some(man_default))) if man_default != literal => problems.push(format!(
                    "{table}.{key}: docs/reference/config.md says {literal}, man/drove.toml.5 {man_default}"
                )),
                Some((_, None)) => problems.push(format!(
                    "{table}.{key}: man/drove.toml.5 gives no literal default, docs/reference/config.md {literal}"
                )),
                _ => {}
            }
        }
        for (key, man_default) in &items {
            let Some(man_default) = man_default else {
                continue;
            };
            let documented = rows
                .iter()
                .find(|r| r.first().map(|c| c.trim_matches('`')) == Some(key.as_str()))
                .and_then(|r| r.get(1));
            if documented.is_some_and(|d| !d.starts_with('`')) {
                problems.push(format!(
                    "{table}.{key}: man/drove.toml.5 says {man_default}, docs/reference/config.md gives no literal"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A pool whose scrape has every family: a TCP listener (queue, backlog,
/// demand), workers droved may read smaps_rollup of (pool memory).
const METRICS_CONFIG: &str = r#"
[listen]
addresses = ["127.0.0.1:{port}"]
[worker]
command = ["{worker}"]
ready = "notify"
[pool]
min = 2
max = 4
[metrics]
listen = "127.0.0.1:METRICS_PORT"
"#;

/// The family names of a scrape in the Prometheus text format.
fn families(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_metric_family_is_documented() {
    let reference = read("docs/reference/metrics.md");
    let man = read("man/droved.8");
    let documented = first_cells(&table_rows(&reference));
    assert!(
        documented.len() > 10,
        "no family table in docs/reference/metrics.md"
    );

    let (_reservation, mport) = reserve_port();
    let mut d = Droved::builder("docs")
        .config(&METRICS_CONFIG.replace("METRICS_PORT", &mport.to_string()))
        .start();
    d.wait_ready();
    // Families of events exist once one happened: a worker exits.
    let victim = d.workers()[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Some families appear only once their reading exists (the first
    // probe, the first smaps_rollup read): scrape until the scrape matches
    // the table, or a family served is missing from it, or time is up.
    let deadline = Instant::now() + 60 * SEC;
    let (served, problems) = loop {
        let scrape = http_get(("127.0.0.1", mport), "/metrics").expect("a scrape");
        let served = families(&scrape);
        let problems = diff("docs/reference/metrics.md", &documented, &served);
        let undocumented = problems.iter().any(|p| p.ends_with("is not documented"));
        if problems.is_empty() || undocumented || Instant::now() > deadline {
            break (served, problems);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let undocumented: Vec<&String> = served
        .iter()
        .filter(|f| !has_word(man_section(&man, "METRICS"), f))
        .collect();
    assert!(
        undocumented.is_empty(),
        "families served but not in man/droved.8 METRICS: {undocumented:?}"
    );
}

const SEC: Duration = Duration::from_secs(1);

/// Long options (`--name`) and, for a command list, the commands of a
/// clap `--help` text.
fn help_of(binary: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let out = Command::new(binary).arg("--help").output().unwrap();
    assert!(out.status.success(), "{binary} --help: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut options = BTreeSet::new();
    let mut commands = BTreeSet::new();
    let mut in_commands = false;
    for line in text.lines() {
        if !line.starts_with(' ') {
            in_commands = line == "Commands:";
            continue;
        }
        let trimmed = line.trim_start();
        if in_commands && line.starts_with("  ") && !line.starts_with("   ") {
            let name = trimmed.split_whitespace().next().unwrap_or("");
            if name != "help" {
                commands.insert(name.to_owned());
            }
        } else if trimmed.starts_with('-') {
            for word in trimmed.split([' ', ',']) {
                if let Some(long) = word.strip_prefix("--")
                    && !long.is_empty()
                {
                    options.insert(format!("--{long}"));
                }
            }
        }
    }
    (options, commands)
}

#[test]
fn every_option_and_verb_is_documented() {
    let reference = read("docs/reference/cli.md");
    let mut problems = Vec::new();
    for (binary, page, section) in [
        (DROVED, "man/droved.8", "## droved"),
        (DROVECTL, "man/drovectl.1", "## drovectl"),
    ] {
        let man = read(page);
        let doc = md_section(&reference, section);
        let (options, commands) = help_of(binary);
        assert!(!options.is_empty(), "no options found in {binary} --help");
        for option in &options {
            if !has_word(doc, &format!("`{option}")) && !has_word(doc, option) {
                problems.push(format!("docs/reference/cli.md {section}: no {option}"));
            }
            let item = |l: &&str| l.starts_with(".It Fl") && has_word(l, &option[1..]);
            if !man.lines().any(|l| item(&l)) {
                problems.push(format!("{page}: no {option}"));
            }
        }
        for command in &commands {
            if !doc.contains(&format!("| `{command}")) {
                problems.push(format!("docs/reference/cli.md {section}: no {command}"));
            }
            if !man.contains(&format!(".It Cm {command}")) {
                problems.push(format!("{page}: no {command}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// README.md and every markdown file under docs/.
fn doc_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "md") {
                out.push(path);
            }
        }
    }
    let mut files = vec![Path::new(REPO).join("README.md")];
    walk(&Path::new(REPO).join("docs"), &mut files);
    files
}

#[test]
fn toml_examples_in_the_docs_parse() {
    let mut checked = 0;
    for file in doc_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, block) in text.split("```toml\n").skip(1).enumerate() {
            let block = block.split("```").next().unwrap();
            if let Err(e) = Config::from_toml_str(block, &file) {
                panic!("{} toml block {}: {e}\n{block}", file.display(), i + 1);
            }
            checked += 1;
        }
    }
    assert!(checked >= 3, "only {checked} toml blocks found");
}

#[test]
fn relative_links_in_the_docs_lead_to_files() {
    let mut broken = Vec::new();
    for file in doc_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, _) in text.match_indices("](") {
            let target = &text[i + 2..];
            let Some(end) = target.find(')') else {
                continue;
            };
            let target = target[..end].split('#').next().unwrap();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            if !file.parent().unwrap().join(target).exists() {
                broken.push(format!("{}: {target}", file.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}
