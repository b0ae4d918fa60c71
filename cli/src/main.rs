//! The `courier` command: send, consume, inspect and redrive messages on any backend,
//! and run the demo.
#![forbid(unsafe_code)]

mod demo;
mod model;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use courier::{headers, Config, Destination, DynBroker, Error, Message, Source};
use tokio::io::AsyncBufReadExt;

#[derive(Parser)]
#[command(name = "courier", version, about = "Send, consume, inspect and redrive messages on any Courier backend")]
struct Cli {
    /// Backend URL (memory://, amqp://, kafka://, sqs://); overrides the config file.
    #[arg(long, global = true, env = "COURIER_BACKEND", hide_env_values = true)]
    backend: Option<String>,
    /// TOML config file.
    #[arg(long, global = true, env = "COURIER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the order-pipeline demo (on memory:// unless a backend is configured).
    Demo {
        /// Orders to send (at least 10).
        #[arg(long, default_value_t = 20)]
        orders: u64,
    },
    /// Create queues, topics and subscriptions (idempotent; what exists is kept as it is).
    Declare {
        /// What to create: queue:NAME, topic:NAME or topic:NAME/SUBSCRIPTION.
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// Send messages: the given texts, or one per line from a file or stdin. Creates the
    /// queue or topic sent to when it is missing, unless --no-create.
    Send(SendArgs),
    /// Receive messages and print them.
    Consume(ConsumeArgs),
    /// Show counts for sources; with --model, the queueing model of the routes a running
    /// worker serves, measured from its metrics beside the M/M/1 and M/M/c predictions.
    Stats {
        /// Sources: queue:NAME or topic:NAME/SUBSCRIPTION.
        #[arg(required = true)]
        sources: Vec<String>,
        /// Measure λ, μ, c, ρ, Wq and Lq of these sources' routes from a worker's
        /// Prometheus endpoint (`App::observe`), sampled twice --window apart.
        #[arg(long, requires = "metrics")]
        model: bool,
        /// The worker's metrics URL, e.g. http://127.0.0.1:9090/metrics.
        #[arg(long)]
        metrics: Option<String>,
        /// Seconds between the two samples.
        #[arg(long, default_value_t = 10.0)]
        window: f64,
    },
    /// Play a Lambda event source mapping locally: pull batches, build SQS, Kafka or
    /// RabbitMQ events, run an I/O-bound stand-in handler through the trigger code, settle.
    Faas(FaasArgs),
    /// A live view, refreshed in place: per source its depth, in flight and dead letters
    /// (where the backend counts them) and, with --metrics, the route's measured λ, t, c,
    /// ρ, Wq and Lq beside the M/M/c and M/M/1 waits. Ctrl-C quits.
    Top {
        /// Sources: queue:NAME or topic:NAME/SUBSCRIPTION.
        #[arg(required = true)]
        sources: Vec<String>,
        /// A worker's metrics URL (`App::observe`), e.g. http://127.0.0.1:9090/metrics.
        #[arg(long)]
        metrics: Option<String>,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
        /// Stop after this many refreshes (default: until Ctrl-C).
        #[arg(long)]
        iterations: Option<u64>,
    },
    /// List or redrive dead-lettered messages.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Work with a database's transactional outbox.
    Outbox {
        #[command(subcommand)]
        action: OutboxAction,
    },
    /// How many handler slots a rate of traffic needs: the M/M/c model (c = 1 is M/M/1)
    /// for c = 1, 2, … with utilisation ρ, mean queue length Lq and mean wait Wq, the
    /// smallest c meeting --max-wait-ms, and the FaaS instances n from P = n/t.
    Plan {
        /// Arrivals per second (λ).
        #[arg(long, allow_negative_numbers = true)]
        rate: f64,
        /// Mean handler time per message, in milliseconds (t; μ = 1000/t per slot).
        #[arg(long)]
        service_ms: f64,
        /// The mean wait to meet, in milliseconds.
        #[arg(long, allow_negative_numbers = true)]
        max_wait_ms: Option<f64>,
        /// Mean time per message of one FaaS invocation (default: --service-ms), for
        /// example as `courier faas` measured it, cold starts included.
        #[arg(long)]
        invocation_ms: Option<f64>,
    },
}

#[derive(Subcommand)]
enum OutboxAction {
    /// Forward the messages committed to a database's outbox to the backend (--backend,
    /// COURIER_BACKEND or the config file), deleting each only once the backend confirmed it.
    Relay {
        /// The database holding the outbox: sqlite://PATH or postgres://….
        #[arg(long)]
        from: String,
        /// Stop once the outbox is empty, instead of running until Ctrl-C.
        #[arg(long)]
        once: bool,
    },
}

#[derive(Args)]
struct SendArgs {
    /// Destination: queue:NAME or topic:NAME.
    #[arg(long)]
    to: String,
    /// Header NAME=VALUE (repeatable).
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Ordering key.
    #[arg(long)]
    key: Option<String>,
    /// Content type.
    #[arg(long)]
    content_type: Option<String>,
    /// Delay in seconds.
    #[arg(long)]
    delay_secs: Option<u64>,
    /// Do not create the destination when it is missing (the send then fails, naming it).
    #[arg(long)]
    no_create: bool,
    /// Read one message per line from this file ("-" for stdin).
    #[arg(long, conflicts_with = "messages")]
    file: Option<PathBuf>,
    /// Message texts.
    messages: Vec<String>,
}

#[derive(Args)]
struct ConsumeArgs {
    /// Source: queue:NAME or topic:NAME/SUBSCRIPTION.
    #[arg(long)]
    from: String,
    /// Stop after this many messages (default: once none arrive for --wait seconds).
    #[arg(long)]
    count: Option<usize>,
    /// Keep waiting for new messages until Ctrl-C.
    #[arg(long)]
    follow: bool,
    /// Seconds to wait for the next message before stopping (without --follow).
    #[arg(long, visible_alias = "wait-secs", value_name = "SECONDS", default_value_t = 5)]
    wait: u64,
    /// Leave messages unsettled (they come back after their lease) instead of acking.
    #[arg(long)]
    peek: bool,
}

#[derive(Args)]
struct FaasArgs {
    /// Source: queue:NAME or topic:NAME/SUBSCRIPTION.
    #[arg(long, default_value = "queue:faas-demo")]
    from: String,
    /// Event form: sqs, kafka or rabbitmq.
    #[arg(long, default_value = "sqs")]
    event: String,
    /// Records per invocation at most.
    #[arg(long, default_value_t = 10)]
    batch_size: usize,
    /// Milliseconds an instance waits to fill a batch.
    #[arg(long, default_value_t = 100)]
    window_ms: u64,
    /// Function instances at once (n).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Simulated cold start of each instance, in milliseconds.
    #[arg(long, default_value_t = 0)]
    cold_start_ms: u64,
    /// How long the stand-in handler waits per record (an I/O call), in milliseconds.
    #[arg(long, default_value_t = 20)]
    handler_ms: u64,
    /// Send this many messages to the source first (handy on memory://).
    #[arg(long, default_value_t = 0)]
    fill: usize,
    /// Stop once the source has been empty this many seconds.
    #[arg(long, default_value_t = 2)]
    idle_secs: u64,
}

#[derive(Subcommand)]
enum DlqAction {
    /// Print the dead letters of a source (they stay in the dead-letter queue).
    List {
        /// The source whose dead letters to show.
        #[arg(long)]
        from: String,
        /// Show at most this many (they are held unsettled while listed).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Send dead letters back to the source they came from, and to it alone (a
    /// subscription's go to that subscription, not to every subscription of its topic).
    Redrive {
        /// The source whose dead letters to redrive.
        #[arg(long)]
        from: String,
        /// Redrive at most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// For a subscription on a backend that cannot send to one subscription alone
        /// (Kafka): send to its topic, so that every subscription gets a copy.
        #[arg(long)]
        to_topic: bool,
    },
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // The demo narrates itself; elsewhere warnings (retries, dead letters) are worth seeing.
    let default_filter = if matches!(cli.command, Command::Demo { .. }) { "error" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COURIER_LOG").unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e}");
        if let Some(next) = next_step(&e) {
            eprintln!("hint: {next}");
        }
        std::process::exit(1);
    }
}

/// The command to run next, for errors one command can cure.
fn next_step(e: &Error) -> Option<String> {
    match e {
        Error::NotFound { kind: "queue" | "dead-letter queue", name } => {
            Some(format!("create it with `courier declare queue:{name}`"))
        }
        Error::NotFound { kind: "topic", name } => {
            Some(format!("create it with a subscription: `courier declare topic:{name}/SUBSCRIPTION`"))
        }
        Error::NotFound { kind: "subscription", name } => {
            Some(format!("create it with `courier declare topic:TOPIC/SUBSCRIPTION` (here {name})"))
        }
        _ => None,
    }
}

async fn run(cli: Cli) -> Result<(), Error> {
    if let Command::Plan { rate, service_ms, max_wait_ms, invocation_ms } = cli.command {
        return plan(rate, service_ms, max_wait_ms, invocation_ms);
    }
    if let Command::Stats { sources, model: true, metrics: Some(url), window } = &cli.command {
        return model::stats(sources, url, *window).await;
    }
    let mut config = match &cli.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    config = config.with_env(std::env::vars().filter(|(k, _)| k.starts_with("COURIER_") && k != "COURIER_LOG"))?;
    let configured = cli.backend.is_some()
        || std::env::var("COURIER_BACKEND").is_ok_and(|b| !b.is_empty())
        || config.backend != Config::default().backend;
    if let Some(url) = cli.backend {
        config.backend = url;
    } else if !configured && !matches!(cli.command, Command::Demo { .. } | Command::Faas(_)) {
        // Separate commands must meet somewhere: with no backend configured, a SQLite file
        // every `courier` command of this user shares (the demo stays in memory).
        config.backend = default_backend()?;
    }
    let broker = config.connect().await?;
    match cli.command {
        Command::Demo { orders } => demo(broker, &config, orders).await,
        Command::Declare { targets } => declare(broker, targets).await,
        Command::Send(args) => send(broker, args).await,
        Command::Consume(args) => consume(broker, args).await,
        Command::Stats { sources, .. } => stats(broker, sources).await,
        Command::Faas(args) => faas(broker, args).await,
        Command::Top { sources, metrics, interval, iterations } => {
            model::top(broker, &config.backend, &sources, metrics.as_deref(), interval, iterations).await
        }
        Command::Dlq { action: DlqAction::List { from, limit } } => dlq_list(broker, &from, limit).await,
        Command::Dlq { action: DlqAction::Redrive { from, limit, to_topic } } => {
            dlq_redrive(broker, &from, limit, to_topic).await
        }
        Command::Outbox { action: OutboxAction::Relay { from, once } } => {
            outbox_relay(broker, &config, &from, once).await
        }
        Command::Plan { .. } => unreachable!("answered before connecting"),
    }
}

/// A duration in milliseconds from the command line: positive and finite.
fn millis_arg(name: &str, ms: f64) -> Result<Duration, Error> {
    if ms.is_finite() && ms > 0.0 && ms < 1e12 {
        Ok(Duration::from_secs_f64(ms / 1000.0))
    } else {
        Err(Error::config(name, format!("{ms} is not a time: give a positive number of milliseconds")))
    }
}

fn plan(rate: f64, service_ms: f64, max_wait_ms: Option<f64>, invocation_ms: Option<f64>) -> Result<(), Error> {
    use courier::queueing;
    if !(rate.is_finite() && rate > 0.0) {
        return Err(Error::config(
            "rate",
            format!("{rate} is not a rate: give a positive number of messages a second"),
        ));
    }
    let service = millis_arg("service-ms", service_ms)?;
    let max_wait = max_wait_ms.map(|ms| millis_arg("max-wait-ms", ms)).transpose()?;
    let invocation = invocation_ms.map(|ms| millis_arg("invocation-ms", ms)).transpose()?.unwrap_or(service);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "M/M/c model: λ = {rate} msg/s, t = {} ms per message (μ = {:.3} msg/s per slot)",
        ms(service),
        1.0 / service.as_secs_f64()
    );
    println!("{:>7} {:>8} {:>9} {:>10} {:>12}", "slots c", "ρ", "P(wait)", "Lq", "Wq");
    let plan = queueing::plan(rate, service, max_wait);
    for (c, prediction) in &plan.rows {
        match prediction {
            Some(p) => println!(
                "{c:>7} {:>8.3} {:>9.3} {:>10.3} {:>9.1} ms",
                p.utilisation,
                p.wait_probability,
                p.queue_length,
                ms(p.queue_wait)
            ),
            None => println!(
                "{c:>7} {:>8.3}  unstable: ρ ≥ 1, the backlog grows without bound",
                queueing::Queue::new(rate, service, *c).utilisation()
            ),
        }
    }
    match (plan.enough, max_wait) {
        (Some(c), Some(w)) => println!("enough: c = {c}, the smallest with a mean wait of at most {} ms", ms(w)),
        (Some(c), None) => println!("enough: c = {c}, the smallest stable (give --max-wait-ms to bound the wait)"),
        (None, _) => println!("enough: none up to 10,000 slots"),
    }
    if let Some(n) = queueing::faas_instances(rate, invocation) {
        println!(
            "FaaS: P = n/t, so λ = {rate} msg/s at t = {} ms per invocation needs n ≥ λ·t = {:.2}: {n} concurrent instance(s)",
            ms(invocation),
            rate * invocation.as_secs_f64()
        );
    }
    Ok(())
}

/// `sqlite://` at `$XDG_DATA_HOME/courier/queues.db` (else `~/.local/share/…`, else the
/// working directory), its directory created.
fn default_backend() -> Result<String, Error> {
    let dir = std::env::var_os("XDG_DATA_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .map(|d| d.join("courier"))
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&dir).map_err(|e| {
        Error::config(
            "backend",
            format!(
                "cannot create {} for the default SQLite file: {e}; set --backend or COURIER_BACKEND",
                dir.display()
            ),
        )
    })?;
    Ok(format!("sqlite://{}", dir.join("queues.db").display()))
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
async fn outbox_relay(broker: DynBroker, config: &Config, from: &str, once: bool) -> Result<(), Error> {
    let relay = courier::sql::outbox::Relay::connect(from, broker).await?;
    eprintln!("relaying the outbox of {} to {}", courier::redact_url(from), courier::redact_url(&config.backend));
    let report = if once {
        let spinner = indicatif::ProgressBar::new_spinner().with_message("relaying");
        spinner.enable_steady_tick(std::time::Duration::from_millis(200));
        let report = relay.drain().await?;
        spinner.finish_and_clear();
        report
    } else {
        relay.run(std::time::Duration::from_millis(200), courier::shutdown_signal()).await
    };
    println!(
        "relayed {} messages; {} refused by the backend for good and dropped (see the log)",
        report.relayed, report.dead_lettered
    );
    Ok(())
}

#[cfg(not(any(feature = "sqlite", feature = "postgres")))]
async fn outbox_relay(_: DynBroker, _: &Config, _: &str, _: bool) -> Result<(), Error> {
    Err(Error::config("outbox", "this build of courier has neither the sqlite nor the postgres feature"))
}

async fn demo(broker: DynBroker, config: &Config, orders: u64) -> Result<(), Error> {
    println!(
        "Courier demo: order pipeline on {} ({} backend)",
        courier::redact_url(&config.backend),
        broker.capabilities().backend
    );
    let summary = demo::run(broker, demo::DemoOptions { orders, quiet: false }).await?;
    println!("\n{summary}");
    Ok(())
}

async fn faas(broker: DynBroker, args: FaasArgs) -> Result<(), Error> {
    use courier::trigger::{emulator::Emulator, EventKind, Trigger};
    let kind = match args.event.as_str() {
        "sqs" => EventKind::Sqs,
        "kafka" => EventKind::Kafka,
        "rabbitmq" => EventKind::RabbitMq,
        other => return Err(Error::config("--event", format!("{other:?} is not sqs, kafka or rabbitmq"))),
    };
    let source = Source::parse(&args.from)?;
    broker.declare(&source).await?;
    if args.fill > 0 {
        let progress = indicatif::ProgressBar::new(args.fill as u64).with_message("filling");
        for chunk in (0..args.fill).collect::<Vec<_>>().chunks(100) {
            let batch = chunk.iter().map(|i| Message::new(format!("record {i}"))).collect();
            broker.send_batch(&source.destination(), batch).await?;
            progress.inc(chunk.len() as u64);
        }
        progress.finish_and_clear();
    }
    let pause = Duration::from_millis(args.handler_ms);
    // One record at a time per instance, as a simple Lambda handler does: n instances, n records in flight.
    let trigger = Trigger::new(move || async move { tokio::time::sleep(pause).await }).concurrency(1);
    println!(
        "faas: {} {} events from {source}, batch {} / window {} ms, n = {}, cold start {} ms, handler {} ms",
        broker.capabilities().backend,
        args.event,
        args.batch_size,
        args.window_ms,
        args.concurrency,
        args.cold_start_ms,
        args.handler_ms
    );
    let report = Emulator::new(broker, source, trigger, kind)
        .batch_size(args.batch_size)
        .window(Duration::from_millis(args.window_ms))
        .concurrency(args.concurrency)
        .cold_start(Duration::from_millis(args.cold_start_ms))
        .run_until_idle(Duration::from_secs(args.idle_secs))
        .await?;
    println!("faas: {report}");
    Ok(())
}

async fn declare(broker: DynBroker, targets: Vec<String>) -> Result<(), Error> {
    for target in targets {
        // topic:NAME/SUBSCRIPTION and queue:NAME are sources; topic:NAME is a destination.
        match Source::parse(&target) {
            Ok(source) => broker.declare(&source).await?,
            Err(_) => broker.declare_destination(&Destination::parse(&target)?).await?,
        }
        println!("declared {target}");
    }
    Ok(())
}

async fn send(broker: DynBroker, args: SendArgs) -> Result<(), Error> {
    let to = Destination::parse(&args.to)?;
    if !args.no_create {
        broker.declare_destination(&to).await?;
    }
    let build = |body: String| {
        let mut m = Message::new(body);
        m.headers.extend(args.headers.iter().cloned());
        m.ordering_key = args.key.clone();
        m.content_type = args.content_type.clone();
        m.delay = args.delay_secs.map(Duration::from_secs);
        m
    };
    let Some(file) = &args.file else {
        for text in &args.messages {
            let id = broker.send(&to, build(text.clone())).await?;
            println!("{id}");
        }
        return Ok(());
    };
    // Bulk: batches, with a progress bar on stderr.
    let reader: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if file.as_os_str() == "-" {
        Box::new(tokio::io::stdin())
    } else {
        Box::new(
            tokio::fs::File::open(file)
                .await
                .map_err(|e| Error::config("--file", format!("cannot open {}: {e}", file.display())))?,
        )
    };
    let total = if file.as_os_str() == "-" {
        None
    } else {
        std::fs::read_to_string(file).ok().map(|t| t.lines().count() as u64)
    };
    let bar = match total {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {pos}/{len} sent [{elapsed_precise}] {per_sec}")
            .expect("valid template"),
    );
    let mut lines = tokio::io::BufReader::new(reader).lines();
    let batch_size = broker.capabilities().max_batch.clamp(1, 100);
    let mut batch = Vec::with_capacity(batch_size);
    let mut sent = 0u64;
    loop {
        let line = lines.next_line().await.map_err(|e| Error::config("--file", format!("read failed: {e}")))?;
        if let Some(line) = &line {
            batch.push(build(line.clone()));
        }
        if batch.len() == batch_size || (line.is_none() && !batch.is_empty()) {
            let n = batch.len() as u64;
            broker.send_batch(&to, std::mem::take(&mut batch)).await?;
            sent += n;
            bar.inc(n);
        }
        if line.is_none() {
            break;
        }
    }
    bar.finish_and_clear();
    eprintln!("sent {sent} messages to {to}");
    Ok(())
}

fn print_message(out: &mut impl Write, m: &Message, attempt: u32) {
    let body = match std::str::from_utf8(&m.payload) {
        Ok(text) => text.to_owned(),
        Err(_) => format!("<{} bytes, not UTF-8>", m.payload.len()),
    };
    let headers: Vec<String> = m.headers.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(out, "{}\tattempt={}\t{}\t{}", m.id, attempt, headers.join(","), body);
}

async fn consume(broker: DynBroker, args: ConsumeArgs) -> Result<(), Error> {
    let source = Source::parse(&args.from)?;
    let consumer = broker.consumer(&source, Default::default()).await?;
    let mut seen = 0usize;
    // Peeked deliveries are held to the end: one dropped unsettled goes back at once, and
    // would come round again.
    let mut peeked = Vec::new();
    let stdout = std::io::stdout();
    let wait = Duration::from_secs(args.wait);
    loop {
        let want = args.count.map_or(100, |c| (c - seen).min(100));
        let batch = tokio::select! {
            r = consumer.receive(want, wait) => r?,
            _ = courier::shutdown_signal() => break,
        };
        if batch.is_empty() && !args.follow {
            break;
        }
        for d in batch {
            print_message(&mut stdout.lock(), d.message(), d.attempt());
            if args.peek {
                peeked.push(d);
            } else {
                d.ack().await?;
            }
            seen += 1;
        }
        if args.count.is_some_and(|c| seen >= c) {
            break;
        }
    }
    consumer.close().await?;
    drop(peeked);
    eprintln!("{seen} message(s) from {source}");
    Ok(())
}

async fn stats(broker: DynBroker, sources: Vec<String>) -> Result<(), Error> {
    // Every count first, so that an error is not preceded by half a table.
    let mut rows = Vec::with_capacity(sources.len());
    for s in sources {
        let source = Source::parse(&s)?;
        let st = broker.stats(&source).await?;
        rows.push((source, st));
    }
    println!(
        "{:<40} {:>8} {:>9} {:>8} {:>13} {:>10}",
        "source", "depth", "in flight", "delayed", "dead-lettered", "oldest"
    );
    for (source, st) in rows {
        let oldest = st.oldest_age.map(|a| format!("{:.1}s", a.as_secs_f64())).unwrap_or_else(|| "-".into());
        println!(
            "{:<40} {:>8} {:>9} {:>8} {:>13} {:>10}",
            source.to_string(),
            st.depth,
            st.in_flight,
            st.delayed,
            st.dead_lettered,
            oldest
        );
    }
    Ok(())
}

fn dead_letter_source(from: &str) -> Result<Source, Error> {
    Ok(Source::Queue(Source::parse(from)?.default_dead_letter().name().clone()))
}

async fn dlq_list(broker: DynBroker, from: &str, limit: usize) -> Result<(), Error> {
    let dlq = dead_letter_source(from)?;
    // Every listed message is held unsettled until the end, so the prefetch must cover
    // them all, or the listing would stop at the first prefetch's worth.
    let options = courier::ConsumerOptions::default().prefetch(limit.max(1));
    let consumer = broker.consumer(&dlq, options).await?;
    let mut held = Vec::new();
    while held.len() < limit {
        let batch = consumer.receive((limit - held.len()).min(100), Duration::from_secs(1)).await?;
        if batch.is_empty() {
            break;
        }
        held.extend(batch);
    }
    let stdout = std::io::stdout();
    for d in &held {
        let reason = d.header(headers::DEAD_LETTER_REASON).unwrap_or("?");
        let _ = writeln!(stdout.lock(), "{}\t{}\t{}", d.id, reason, String::from_utf8_lossy(&d.payload));
    }
    // Closing hands the listed messages back to the dead-letter queue untouched.
    consumer.close().await?;
    if held.len() == limit {
        eprintln!("{} dead letter(s) shown from {dlq}; there may be more: raise --limit", held.len());
    } else {
        eprintln!("{} dead letter(s) in {dlq}", held.len());
    }
    Ok(())
}

async fn dlq_redrive(broker: DynBroker, from: &str, limit: Option<usize>, to_topic: bool) -> Result<(), Error> {
    let dlq = dead_letter_source(from)?;
    // Dead letters go back to the source the operator named, whose dead-letter queue this
    // is: never to where a header says, which anyone able to write here could set.
    let origin = Source::parse(from)?;
    let caps = broker.capabilities();
    if matches!(origin, Source::Subscription { .. }) && !to_topic && !caps.supports(courier::Feature::SubscriptionSend)
    {
        return Err(Error::config(
            "dlq redrive",
            format!(
                "{} cannot send to one subscription alone, so redriving {origin} would give every subscription of topic {} a copy; pass --to-topic to do that",
                caps.backend,
                origin.destination().name()
            ),
        ));
    }
    let consumer = broker.consumer(&dlq, Default::default()).await?;
    let mut moved = 0usize;
    while limit.is_none_or(|l| moved < l) {
        let want = limit.map_or(100, |l| (l - moved).min(100));
        let batch = consumer.receive(want, Duration::from_secs(1)).await?;
        if batch.is_empty() {
            break;
        }
        for d in batch {
            if let Some(named) = d.header(headers::DEAD_LETTER_ORIGIN).filter(|o| *o != origin.to_string()) {
                eprintln!("note: {} names {named} as its origin; it goes back to {origin}", d.id);
            }
            let mut message = d.message().clone();
            for h in [headers::DEAD_LETTER_REASON, headers::DEAD_LETTER_ATTEMPTS, headers::DEAD_LETTER_ORIGIN] {
                message.headers.remove(h);
            }
            // Send first, then ack: a crash in between duplicates rather than loses.
            if to_topic {
                broker.send(&origin.destination(), message).await?;
            } else {
                broker.send_to_source(&origin, message).await?;
            }
            d.ack().await?;
            moved += 1;
        }
    }
    consumer.close().await?;
    eprintln!("redrove {moved} message(s) from {dlq}");
    Ok(())
}
