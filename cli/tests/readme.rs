//! Runs every `courier` line of the README's command block, in order, against each
//! backend, and checks what each prints: the README cannot drift from the tool.
//!
//! Brokers come from the contract tests' fixtures (`scripts/brokers up`, or the
//! `COURIER_TEST_*` variables). A backend whose feature is off has no test here, rather
//! than a test that passes without running. Queue and topic names get a unique suffix
//! per run, so earlier runs' messages cannot answer for this one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `courier …` lines of the fenced block under "## The `courier` command".
fn readme_examples() -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let section = &readme[readme.find("## The `courier` command").expect("the README has the command section")..];
    let block = &section[section.find("```sh\n").expect("a sh block") + 6..];
    let block = &block[..block.find("```").unwrap()];
    let lines: Vec<String> = block.lines().filter(|l| l.starts_with("courier ")).map(str::to_owned).collect();
    assert!(lines.len() >= 8, "the README's command block lost its examples: {lines:?}");
    lines
}

/// What a backend cannot do, and so which lines fail there naming the feature.
struct Backend {
    url: String,
    /// Separate commands share the broker (not so for the in-process one).
    shared: bool,
    /// Text of the unsupported-feature error for lines that use it: (line part, error part).
    lacks: Vec<(&'static str, &'static str)>,
    /// Set: no backend configured, the default file lives under this `XDG_DATA_HOME`.
    data_home: Option<PathBuf>,
}

fn run(line: &str, backend: &Backend, suffix: &str) -> Output {
    let line = line
        .replace("queue:orders", &format!("queue:orders-{suffix}"))
        .replace("topic:events", &format!("topic:events-{suffix}"));
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_courier"));
    let path = format!("{}:{}", bin.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    eprintln!("$ {line}");
    let mut command = Command::new("sh");
    command.arg("-c").arg(&line).env("PATH", path).env_remove("COURIER_CONFIG");
    match &backend.data_home {
        // No backend configured: the command's default SQLite file, under this directory.
        Some(dir) => command.env_remove("COURIER_BACKEND").env("XDG_DATA_HOME", dir),
        None => command.env("COURIER_BACKEND", &backend.url),
    };
    let output = command.output().expect("run sh");
    eprintln!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    output
}

fn check_readme_on(backend: Backend) {
    let suffix = format!("{}-{}", std::process::id(), rand_suffix());
    let mut ran = 0;
    for line in readme_examples() {
        let separate_process_state =
            ["consume", "stats", "dlq"].iter().any(|c| line.starts_with(&format!("courier {c} ")));
        if !backend.shared && separate_process_state {
            continue; // an in-process queue ends with the command that filled it
        }
        ran += 1;
        let out = run(&line, &backend, &suffix);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if let Some((_, error)) = backend.lacks.iter().find(|(part, _)| line.contains(part)) {
            assert!(!out.status.success(), "`{line}` should fail on this backend");
            assert!(stderr.contains("does not support") && stderr.contains(error), "`{line}`: {stderr}");
            continue;
        }
        assert!(out.status.success(), "`{line}` failed: {stderr}");
        // What each example claims to do, it does.
        if line.starts_with("courier declare") {
            assert!(stdout.contains(&format!("declared queue:orders-{suffix}")), "{stdout}");
        }
        if line.starts_with("courier consume --from queue:orders") {
            assert!(stdout.contains("hello") && stdout.contains("tenant=acme"), "the sent message: {stdout}");
        }
        if line.starts_with("courier consume --from topic:events") {
            assert!(stdout.contains("order shipped"), "the subscription's copy: {stdout}");
        }
        if line.starts_with("courier stats") {
            assert!(stdout.contains(&format!("queue:orders-{suffix}")), "{stdout}");
        }
        if line.starts_with("courier dlq") {
            assert!(stderr.contains(&format!("orders-{suffix}")), "{stderr}");
        }
        if line.starts_with("courier top") {
            assert!(stdout.contains("courier top:") && stdout.contains(&format!("queue:orders-{suffix}")), "{stdout}");
        }
        if line.starts_with("courier plan") {
            assert!(stdout.contains("40.0 ms") && stdout.contains("enough: c = 2"), "{stdout}");
        }
        if line == "courier demo" {
            let dead_lettered = stdout.lines().find(|l| l.trim_start().starts_with("dead-lettered"));
            assert_eq!(dead_lettered.map(|l| l.split_whitespace().last()), Some(Some("2")), "{stdout}");
        }
    }
    assert!(ran >= 3, "only {ran} examples ran");
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos()
}

fn fixture<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

#[test]
fn readme_examples_on_the_in_process_backend() {
    check_readme_on(Backend { url: "memory://".into(), shared: false, lacks: vec![], data_home: None });
}

/// As the README's first line says: nothing configured, and separate commands share a
/// SQLite file with no broker running.
#[cfg(feature = "sqlite")]
#[test]
fn readme_examples_with_no_backend_configured_share_a_sqlite_file() {
    let home = std::env::temp_dir().join(format!("courier-readme-home-{}", std::process::id()));
    check_readme_on(Backend { url: String::new(), shared: true, lacks: vec![], data_home: Some(home.clone()) });
    assert!(home.join("courier/queues.db").exists(), "the default file is where the README says");
    std::fs::remove_dir_all(&home).ok();
}

#[cfg(feature = "postgres")]
#[test]
fn readme_examples_on_postgres() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let url = runtime.block_on(courier_contract_tests::postgres_url());
    check_readme_on(Backend { url, shared: true, lacks: vec![], data_home: None });
}

#[cfg(feature = "amqp")]
#[test]
fn readme_examples_on_rabbitmq() {
    let url = fixture(courier_contract_tests::amqp_url());
    check_readme_on(Backend { url, shared: true, lacks: vec![("courier stats", "statistics")], data_home: None });
}

#[cfg(feature = "kafka")]
#[test]
fn readme_examples_on_kafka() {
    let url = fixture(courier_contract_tests::kafka_url());
    check_readme_on(Backend { url, shared: true, lacks: vec![("courier stats", "statistics")], data_home: None });
}

#[cfg(feature = "sqs")]
#[test]
fn readme_examples_on_sqs() {
    let url = fixture(courier_contract_tests::sqs_url());
    check_readme_on(Backend { url, shared: true, lacks: vec![("topic:", "fan-out")], data_home: None });
}

/// Names no backend can hold are refused before any broker is asked, naming the name.
#[test]
fn declaring_a_name_courier_cannot_hold_fails_naming_it() {
    for target in ["queue:has space", "topic:", "queue:", "nonsense", "topic:a/b/c", "queue:\u{1b}[31mred"] {
        let out = Command::new(env!("CARGO_BIN_EXE_courier"))
            .args(["declare", target])
            .env("COURIER_BACKEND", "memory://")
            .env_remove("COURIER_CONFIG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{target:?} was declared");
        assert!(stderr.starts_with("error: "), "{target:?}: {stderr}");
    }
}
