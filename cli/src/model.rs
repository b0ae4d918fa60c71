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

/// What two scrapes say of one route.
struct Measured {
    /// λ: received per second.
    lambda: f64,
    /// Mean handler time, when messages were handled in the window.
    service: Option<Duration>,
    /// c: the route's fetch loops.
    slots: u32,
    /// Mean wait from send to receive, when messages were received.
    wait: Option<Duration>,
}

impl Measured {
    /// `None` when the worker serves no route for `label`.
    fn between(before: &str, after: &str, elapsed: f64, label: &str) -> Option<Measured> {
        let delta = |name: &str| -> Option<f64> {
            Some(value(after, name, label)? - value(before, name, label).unwrap_or(0.0))
        };
        let received = delta("courier_messages_received_total")?;
        let mean = |sum: &str, count: &str| {
            let (sum, count) = (delta(sum).unwrap_or(0.0), delta(count).unwrap_or(0.0));
            (count > 0.0 && sum >= 0.0).then(|| Duration::from_secs_f64(sum / count))
        };
        Some(Measured {
            lambda: received / elapsed,
            service: mean("courier_message_processing_seconds_sum", "courier_message_processing_seconds_count"),
            slots: value(after, "courier_fetch_loops_alive", label).unwrap_or(0.0) as u32,
            wait: mean("courier_message_queue_wait_seconds_sum", "courier_message_queue_wait_seconds_count"),
        })
    }

    /// ρ = λ/(c·μ), when there is a service time and a slot.
    fn utilisation(&self) -> Option<f64> {
        let t = self.service?.as_secs_f64();
        (self.slots > 0).then(|| self.lambda * t / f64::from(self.slots))
    }
}

fn window_arg(name: &str, seconds: f64) -> Result<Duration, Error> {
    if seconds.is_finite() && seconds > 0.0 && seconds <= 86_400.0 {
        Ok(Duration::from_secs_f64(seconds))
    } else {
        Err(Error::config(name, format!("{seconds} is not a time: give seconds, more than 0 and at most a day")))
    }
}

pub async fn stats(sources: &[String], url: &str, window: f64) -> Result<(), Error> {
    let sources: Vec<Source> = sources.iter().map(|s| Source::parse(s)).collect::<Result<_, _>>()?;
    let window = window_arg("window", window)?;
    let before = scrape(url).await?;
    let started = tokio::time::Instant::now();
    eprintln!("sampling {url} for {window:?}…");
    tokio::time::sleep(window).await;
    let after = scrape(url).await?;
    let elapsed = started.elapsed().as_secs_f64();
    for source in &sources {
        let label = source.to_string();
        let Some(m) = Measured::between(&before, &after, elapsed, &label) else {
            println!("{label}: the worker at {url} serves no route for it");
            continue;
        };
        println!("{label} (over {elapsed:.1} s, from {url})");
        let (Some(service), Some(rho)) = (m.service, m.utilisation()) else {
            println!("  no messages handled in the window: nothing to measure (λ = {:.2} msg/s)", m.lambda);
            continue;
        };
        let (lambda, c) = (m.lambda, m.slots);
        println!(
            "  measured  λ = {lambda:.2} msg/s, t = {:.2} ms (μ = {:.2} msg/s per slot), c = {c}, ρ = {rho:.3}{}",
            service.as_secs_f64() * 1e3,
            1.0 / service.as_secs_f64(),
            match m.wait {
                Some(wq) =>
                    format!(", Wq = {:.2} ms, Lq = λ·Wq = {:.3}", wq.as_secs_f64() * 1e3, lambda * wq.as_secs_f64()),
                None => String::new(),
            }
        );
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

/// `courier top`: the table, redrawn in place every `interval`.
pub async fn top(
    broker: courier::DynBroker,
    backend: &str,
    sources: &[String],
    metrics: Option<&str>,
    interval: f64,
    iterations: Option<u64>,
) -> Result<(), Error> {
    use std::fmt::Write as _;
    let sources: Vec<Source> = sources.iter().map(|s| Source::parse(s)).collect::<Result<_, _>>()?;
    let interval = window_arg("interval", interval)?;
    let ms = |d: Option<Duration>| d.map_or_else(|| "-".to_owned(), |d| format!("{:.1}", d.as_secs_f64() * 1e3));
    let mut last: Option<(String, tokio::time::Instant)> = None;
    let mut frame = 0u64;
    loop {
        let scraped = match metrics {
            Some(url) => Some(scrape(url).await.map(|page| (page, tokio::time::Instant::now()))),
            None => None,
        };
        let mut screen = String::new();
        let now = utc_clock();
        let _ = writeln!(
            screen,
            "courier top: {} every {:.1} s, {now}; Ctrl-C quits",
            courier::redact_url(backend),
            interval.as_secs_f64()
        );
        if let Some(url) = metrics {
            let _ = writeln!(
                screen,
                "model from {url}: Lq = λ·Wq measured; M/M/c and M/M/1 waits for the measured λ and t"
            );
        }
        let _ = writeln!(
            screen,
            "{:<36} {:>7} {:>9} {:>6} {:>8} {:>8} {:>3} {:>6} {:>9} {:>7} {:>11} {:>11}",
            "source", "depth", "in flight", "dead", "λ/s", "t ms", "c", "ρ", "Wq ms", "Lq", "M/M/c Wq", "M/M/1 Wq"
        );
        for source in &sources {
            let label = source.to_string();
            let (depth, in_flight, dead) = match broker.stats(source).await {
                Ok(s) => (s.depth.to_string(), s.in_flight.to_string(), s.dead_lettered.to_string()),
                Err(_) => ("-".to_owned(), "-".to_owned(), "-".to_owned()),
            };
            let measured = match (&last, &scraped) {
                (Some((before, then)), Some(Ok((after, at)))) => {
                    Measured::between(before, after, (*at - *then).as_secs_f64().max(1e-3), &label)
                }
                _ => None,
            };
            let dash = || "-".to_owned();
            let (lambda, t, c, rho, wq, lq, mmc, mm1) = match &measured {
                Some(m) => {
                    // A wait predicted for `servers` slots; "inf" while they cannot keep up.
                    let predicted = |servers: u32| {
                        m.service.map_or_else(dash, |t| match Queue::new(m.lambda, t, servers).predict() {
                            Some(p) => ms(Some(p.queue_wait)),
                            None => "inf".to_owned(),
                        })
                    };
                    (
                        format!("{:.1}", m.lambda),
                        ms(m.service),
                        m.slots.to_string(),
                        m.utilisation().map_or_else(dash, |r| format!("{r:.3}")),
                        ms(m.wait),
                        m.wait.map_or_else(dash, |w| format!("{:.3}", m.lambda * w.as_secs_f64())),
                        predicted(m.slots),
                        predicted(1),
                    )
                }
                None => (dash(), dash(), dash(), dash(), dash(), dash(), dash(), dash()),
            };
            let _ = writeln!(
                screen,
                "{label:<36} {depth:>7} {in_flight:>9} {dead:>6} {lambda:>8} {t:>8} {c:>3} {rho:>6} {wq:>9} {lq:>7} {mmc:>11} {mm1:>11}"
            );
        }
        if let Some(Err(e)) = &scraped {
            let _ = writeln!(screen, "metrics: {e}");
        }
        // Home, clear, draw: the whole frame at once, as `watch` does.
        print!("\x1b[H\x1b[2J{screen}");
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        if let Some(Ok(page)) = scraped {
            last = Some(page);
        }
        frame += 1;
        if iterations.is_some_and(|n| frame >= n) {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// The wall-clock time of day, UTC, as HH:MM:SS (no date crate needed for a clock).
fn utc_clock() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("{:02}:{:02}:{:02} UTC", secs / 3600 % 24, secs / 60 % 60, secs % 60)
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
