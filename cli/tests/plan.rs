//! `courier plan`: the M/M/c table for a rate and a service time, needing no backend.

use std::process::{Command, Output};

fn plan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_courier"))
        .arg("plan")
        .args(args)
        // No backend is needed or touched: a URL that cannot connect proves it.
        .env("COURIER_BACKEND", "amqp://127.0.0.1:1/%2f")
        .output()
        .expect("run courier")
}

fn row(text: &str, c: u32) -> Vec<String> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&c.to_string()))
        .unwrap_or_else(|| panic!("no row for c = {c} in:\n{text}"));
    line.split_whitespace().map(str::to_owned).collect()
}

#[test]
fn the_seed_figures_for_one_slot_and_the_smallest_c_for_a_wait() {
    let out = plan(&["--rate", "80", "--service-ms", "10", "--max-wait-ms", "5"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    // c = 1 is M/M/1: ρ = 0.8, Lq = 3.2, Wq = 40 ms.
    assert_eq!(row(&text, 1), ["1", "0.800", "0.800", "3.200", "40.0", "ms"], "{text}");
    // c = 2: ρ = 0.4, C = 0.229, Lq = 0.152, Wq = 1.9 ms: meets 5 ms.
    assert_eq!(row(&text, 2), ["2", "0.400", "0.229", "0.152", "1.9", "ms"], "{text}");
    assert!(text.contains("enough: c = 2"), "{text}");
    assert!(text.contains("1 concurrent instance(s)"), "{text}");
}

#[test]
fn an_overloaded_slot_is_called_unstable() {
    let out = plan(&["--rate", "250", "--service-ms", "10", "--invocation-ms", "120"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    assert!(row(&text, 1).join(" ").contains("unstable"), "{text}");
    assert!(row(&text, 2).join(" ").contains("unstable"), "{text}");
    assert!(text.contains("enough: c = 3"), "{text}");
    assert!(text.contains("30 concurrent instance(s)"), "λ·t = 250 × 0.12 = 30: {text}");
}

#[test]
fn nonsense_figures_are_refused_by_name() {
    for (args, named) in [
        (&["--rate", "0", "--service-ms", "10"][..], "rate"),
        (&["--rate", "-5", "--service-ms", "10"], "rate"),
        (&["--rate", "NaN", "--service-ms", "10"], "rate"),
        (&["--rate", "inf", "--service-ms", "10"], "rate"),
        (&["--rate", "80", "--service-ms", "0"], "service-ms"),
        (&["--rate", "80", "--service-ms", "10", "--max-wait-ms", "-1"], "max-wait-ms"),
        (&["--rate", "80", "--service-ms", "1e300"], "service-ms"),
    ] {
        let out = plan(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(err.contains(named), "{args:?}: {err}");
    }
}
