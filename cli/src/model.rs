//! `courier stats --model`: a route's queueing model measured on live traffic, from a
//! running worker's Prometheus endpoint, beside what M/M/1 and M/M/c predict.
//!
//! Two scrapes `window` apart give, per source: λ (messages received per second), the
//! mean handler time t (so μ = 1/t per slot), c (the route's fetch loops), ρ = λ/(c·μ),
//! the mean wait Wq (send to receive, from the wait histogram) and Lq = λ·Wq (Little's law).

use std::time::Duration;

use courier::queueing::Queue;
use courier::{Error, Source};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of a metrics page read.
const MAX_PAGE: u64 = 16 * 1024 * 1024;

pub async fn stats(sources: &[String], url: &str, window: f64) -> Result<(), Error> {
    let sources: Vec<Source> = sources.iter().map(|s| Source::parse(s)).collect::<Result<_, _>>()?;
    if !(window.is_finite() && window > 0.0 && window <= 86_400.0) {
        return Err(Error::config(
            "window",
            format!("{window} is not a window: give seconds, more than 0 and at most a day"),
        ));
    }
    let window = Duration::from_secs_f64(window);
    let before = scrape(url).await?;
    let started = tokio::time::Instant::now();
    eprintln!("sampling {url} for {window:?}…");
    tokio::time::sleep(window).await;
    let after = scrape(url).await?;
    let elapsed = started.elapsed().as_secs_f64();
    for source in &sources {
        let label = source.to_string();
        let delta = |name: &str| -> Option<f64> {
            Some(value(&after, name, &label)? - value(&before, name, &label).unwrap_or(0.0))
        };
        let Some(received) = delta("courier_messages_received_total") else {
            println!("{label}: the worker at {url} serves no route for it");
            continue;
        };
        let lambda = received / elapsed;
        let handled = delta("courier_message_processing_seconds_count").unwrap_or(0.0);
        let busy = delta("courier_message_processing_seconds_sum").unwrap_or(0.0);
        let waited = delta("courier_message_queue_wait_seconds_count").unwrap_or(0.0);
        let wait = delta("courier_message_queue_wait_seconds_sum").unwrap_or(0.0);
        let slots = value(&after, "courier_fetch_loops_alive", &label).unwrap_or(0.0);
        println!("{label} (over {elapsed:.1} s, from {url})");
        if handled == 0.0 || slots < 1.0 {
            println!("  no messages handled in the window: nothing to measure (λ = {lambda:.2} msg/s)");
            continue;
        }
        let service = busy / handled;
        let c = slots as u32;
        let mu = 1.0 / service;
        let rho = lambda / (f64::from(c) * mu);
        let wq = if waited > 0.0 { Some(wait / waited) } else { None };
        println!(
            "  measured  λ = {lambda:.2} msg/s, t = {:.2} ms (μ = {mu:.2} msg/s per slot), c = {c}, ρ = {rho:.3}{}",
            service * 1e3,
            match wq {
                Some(wq) => format!(", Wq = {:.2} ms, Lq = λ·Wq = {:.3}", wq * 1e3, lambda * wq),
                None => String::new(),
            }
        );
        let service = Duration::from_secs_f64(service);
        for (name, servers) in [("M/M/c", c), ("M/M/1", 1)] {
            if name == "M/M/1" && c == 1 {
                continue;
            }
            match Queue::new(lambda, service, servers).predict() {
                Some(p) => println!(
                    "  {name:<8}  c = {servers}: ρ = {:.3}, Lq = {:.3}, Wq = {:.2} ms",
                    p.utilisation,
                    p.queue_length,
                    p.queue_wait.as_secs_f64() * 1e3
                ),
                None => println!("  {name:<8}  c = {servers}: unstable (ρ ≥ 1): the backlog grows without bound"),
            }
        }
    }
    Ok(())
}

/// The sample `name{…source="label"…}` of a Prometheus text page.
fn value(page: &str, name: &str, label: &str) -> Option<f64> {
    let wanted = format!("source=\"{label}\"");
    page.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, labels) = series.split_once('{').unwrap_or((series, ""));
        (metric == name && labels.contains(&wanted)).then(|| value.parse().ok()).flatten()
    })
}

/// GETs an `http://host:port/path` page: plain HTTP/1.0, bounded in time and size.
async fn scrape(url: &str) -> Result<String, Error> {
    let bad = |why: &str| Error::config("metrics", format!("{url}: {why}; give the worker's http://HOST:PORT/metrics"));
    let rest = url.strip_prefix("http://").ok_or_else(|| bad("only http:// is supported"))?;
    let (authority, path) =
        rest.split_once('/').map(|(a, p)| (a, format!("/{p}"))).unwrap_or((rest, "/metrics".into()));
    if authority.is_empty() || authority.contains('@') {
        return Err(bad("no host:port"));
    }
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(authority).await?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").as_bytes()).await?;
        let mut page = Vec::new();
        stream.take(MAX_PAGE).read_to_end(&mut page).await?;
        Ok::<_, std::io::Error>(page)
    };
    let page = tokio::time::timeout(SCRAPE_TIMEOUT, fetch)
        .await
        .map_err(|_| {
            Error::transient(
                "metrics",
                format!("{url} did not answer within {SCRAPE_TIMEOUT:?}"),
                std::io::Error::other("timeout"),
            )
        })?
        .map_err(|e| {
            Error::transient("metrics", format!("cannot read {url}: {e}; is the worker running with App::observe?"), e)
        })?;
    let page = String::from_utf8_lossy(&page);
    let (head, body) = page.split_once("\r\n\r\n").ok_or_else(|| bad("not an HTTP answer"))?;
    if head.split_whitespace().nth(1) != Some("200") {
        return Err(bad(&format!("answered {}", head.lines().next().unwrap_or_default())));
    }
    Ok(body.to_owned())
}
