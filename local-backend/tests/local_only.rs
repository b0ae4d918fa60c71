//! Behaviour the in-process backend has beyond the shared contract: capacity with
//! backpressure, configuration from URLs, and timers driven by tokio's clock.

use std::time::Duration;

use courier_core::{Broker, ConsumerOptions, Destination, Error, Message, Source};
use courier_local::{LocalBroker, LocalConfig, WhenFull};

fn orders() -> (Source, Destination) {
    let source = Source::queue("orders").unwrap();
    let dest = source.destination();
    (source, dest)
}

#[tokio::test]
async fn a_full_queue_refuses_with_a_retryable_error_when_configured_to() {
    let broker =
        LocalBroker::with_config(LocalConfig { capacity: Some(2), when_full: WhenFull::Error, ..Default::default() });
    let (source, dest) = orders();
    broker.declare(&source).await.unwrap();
    broker.send(&dest, Message::new("1")).await.unwrap();
    broker.send(&dest, Message::new("2")).await.unwrap();
    let err = broker.send(&dest, Message::new("3")).await.unwrap_err();
    assert!(matches!(err, Error::Full { capacity: 2, .. }), "{err}");
    assert!(err.is_retryable());
    // A batch that does not fit is refused whole.
    let consumer = broker.consumer(&source, ConsumerOptions::default()).await.unwrap();
    let d = consumer.receive_one(Duration::from_secs(1)).await.unwrap().unwrap();
    d.ack().await.unwrap();
    let err = broker.send_batch(&dest, vec![Message::new("a"), Message::new("b")]).await.unwrap_err();
    assert!(matches!(err, Error::Full { .. }));
    assert_eq!(broker.stats(&source).await.unwrap().depth, 1, "nothing of the refused batch was added");
}

#[tokio::test]
async fn a_full_queue_makes_producers_wait_until_a_consumer_makes_room() {
    let broker = LocalBroker::with_config(LocalConfig { capacity: Some(1), ..Default::default() });
    let (source, dest) = orders();
    let consumer = broker.consumer(&source, ConsumerOptions::default()).await.unwrap();
    broker.send(&dest, Message::new("first")).await.unwrap();
    let producer = {
        let broker = broker.clone();
        let dest = dest.clone();
        tokio::spawn(async move { broker.send(&dest, Message::new("second")).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!producer.is_finished(), "the producer waits while the queue is full");
    let d = consumer.receive_one(Duration::from_secs(1)).await.unwrap().unwrap();
    assert!(!producer.is_finished(), "an in-flight message still takes room");
    d.ack().await.unwrap();
    producer.await.unwrap().unwrap();
    let d = consumer.receive_one(Duration::from_secs(1)).await.unwrap().unwrap();
    assert_eq!(&d.payload[..], b"second");
}

#[tokio::test]
async fn dead_letters_get_in_even_when_the_dead_letter_queue_is_full() {
    let broker =
        LocalBroker::with_config(LocalConfig { capacity: Some(1), when_full: WhenFull::Error, ..Default::default() });
    let (source, dest) = orders();
    let consumer = broker.consumer(&source, ConsumerOptions::default()).await.unwrap();
    let dlq = source.default_dead_letter();
    broker.send(&dlq, Message::new("already there")).await.unwrap();
    broker.send(&dest, Message::new("poison")).await.unwrap();
    let d = consumer.receive_one(Duration::from_secs(1)).await.unwrap().unwrap();
    d.reject("bad").await.unwrap();
    let dlq_source = Source::Queue(dlq.name().clone());
    assert_eq!(broker.stats(&dlq_source).await.unwrap().depth, 2);
}

#[tokio::test(start_paused = true)]
async fn delays_and_leases_follow_the_clock_without_polling() {
    let broker = LocalBroker::new();
    let (source, dest) = orders();
    let consumer = broker.consumer(&source, ConsumerOptions::default().lease(Duration::from_secs(30))).await.unwrap();
    broker.send(&dest, Message::new("in an hour").with_delay(Duration::from_secs(3600))).await.unwrap();
    assert_eq!(broker.stats(&source).await.unwrap().delayed, 1);
    // With tokio's clock paused, an hour passes instantly once every task is idle.
    let d = consumer.receive_one(Duration::from_secs(3601)).await.unwrap().expect("due after an hour");
    assert_eq!(d.attempt(), 1);
    drop(d); // unsettled: back after the 30 s lease
    let again = consumer.receive_one(Duration::from_secs(31)).await.unwrap().expect("lease expired");
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn dedup_ids_are_forgotten_after_the_window() {
    let broker = LocalBroker::with_config(LocalConfig { dedup_window: Duration::from_secs(60), ..Default::default() });
    let (source, dest) = orders();
    broker.declare(&source).await.unwrap();
    broker.send(&dest, Message::new("1").with_dedup_id("x")).await.unwrap();
    broker.send(&dest, Message::new("2").with_dedup_id("x")).await.unwrap();
    tokio::time::advance(Duration::from_secs(61)).await;
    broker.send(&dest, Message::new("3").with_dedup_id("x")).await.unwrap();
    assert_eq!(broker.stats(&source).await.unwrap().depth, 2);
}

#[test]
fn url_options_are_checked_with_the_key_named() {
    let err = LocalConfig::from_url("memory://?capacity=lots").unwrap_err();
    assert_eq!(
        err.to_string(),
        "configuration memory URL option capacity: \"lots\" is not valid; expected a whole number"
    );
    let err = LocalConfig::from_url("memory://?when_full=drop").unwrap_err();
    assert!(err.to_string().contains("expected wait or error"), "{err}");
    let err = LocalConfig::from_url("memory://?colour=blue").unwrap_err();
    assert!(err.to_string().contains("memory URL option colour: is not an option"), "{err}");
    assert!(err.to_string().contains("capacity=N, when_full=wait|error"), "{err}");
    let err = LocalConfig::from_url("amqp://localhost").unwrap_err();
    assert!(err.to_string().contains("memory:// URLs"), "{err}");
    let err = LocalConfig::from_url("memory://?capacity=1&capacity=2").unwrap_err();
    assert!(err.to_string().contains("memory URL option capacity: is given twice"), "{err}");
    let err = LocalConfig::from_url("memory://somewhere").unwrap_err();
    assert!(err.to_string().contains("names a host"), "{err}");
    let ok = LocalConfig::from_url("memory://?capacity=10&when_full=wait&dedup_window_secs=5&max_payload=100").unwrap();
    assert_eq!((ok.capacity, ok.dedup_window, ok.max_payload), (Some(10), Duration::from_secs(5), 100));
}

#[tokio::test]
async fn stats_and_purge_of_an_unknown_source_say_it_does_not_exist() {
    let broker = LocalBroker::new();
    let err = broker.stats(&Source::queue("nope").unwrap()).await.unwrap_err();
    assert_eq!(err.to_string(), "queue \"nope\" does not exist; declare it first or enable creation");
}

#[tokio::test]
async fn a_send_refused_as_full_is_not_remembered_as_a_duplicate() {
    let broker = LocalBroker::from_url("memory://?capacity=1&when_full=error").unwrap();
    let (source, dest) = orders();
    let consumer = broker.consumer(&source, ConsumerOptions::default()).await.unwrap();
    broker.send(&dest, Message::new("filler")).await.unwrap();
    let err = broker.send(&dest, Message::new("important").with_dedup_id("X")).await.unwrap_err();
    assert!(matches!(err, Error::Full { .. }), "{err}");
    let filler = consumer.receive_one(Duration::from_secs(1)).await.unwrap().expect("the filler");
    filler.ack().await.unwrap();
    // The producer retries the retryable Full: the message was never stored, so it is no duplicate.
    broker.send(&dest, Message::new("important").with_dedup_id("X")).await.unwrap();
    let d = consumer.receive_one(Duration::from_secs(1)).await.unwrap().expect("the resent message is delivered");
    assert_eq!(&d.payload[..], b"important");
    d.ack().await.unwrap();
    // Once stored, the dedup id is remembered: a true duplicate is still dropped.
    broker.send(&dest, Message::new("important").with_dedup_id("X")).await.unwrap();
    assert!(consumer.receive_one(Duration::from_millis(50)).await.unwrap().is_none());
}

#[tokio::test]
async fn a_send_cancelled_while_waiting_for_room_is_not_remembered_as_a_duplicate() {
    let broker = LocalBroker::from_url("memory://?capacity=1&when_full=wait").unwrap();
    let (source, dest) = orders();
    let consumer = broker.consumer(&source, ConsumerOptions::default()).await.unwrap();
    broker.send(&dest, Message::new("filler")).await.unwrap();
    let waited = tokio::time::timeout(
        Duration::from_millis(50),
        broker.send(&dest, Message::new("important").with_dedup_id("X")),
    )
    .await;
    assert!(waited.is_err(), "the queue is full, so the send waits until the timeout cancels it");
    let filler = consumer.receive_one(Duration::from_secs(1)).await.unwrap().expect("the filler");
    filler.ack().await.unwrap();
    broker.send(&dest, Message::new("important").with_dedup_id("X")).await.unwrap();
    let d = consumer.receive_one(Duration::from_secs(1)).await.unwrap().expect("the resent message is delivered");
    assert_eq!(&d.payload[..], b"important");
}

#[tokio::test]
async fn huge_delays_and_leases_neither_panic_nor_lose_the_message() {
    let broker = LocalBroker::new();
    let (source, dest) = orders();
    // A delayed send longer than the backend holds is refused before anything changes.
    let err = broker.send(&dest, Message::new("never").with_delay(Duration::MAX)).await.unwrap_err();
    assert!(matches!(err, Error::DelayTooLong { .. }), "{err}");
    broker.declare(&source).await.unwrap();
    let stats = broker.stats(&source).await.unwrap();
    assert_eq!((stats.depth, stats.delayed), (0, 0));

    // A retry after an unbounded delay keeps the message, held back.
    let consumer = broker.consumer(&source, ConsumerOptions::default()).await.unwrap();
    broker.send(&dest, Message::new("x")).await.unwrap();
    let d = consumer.receive_one(Duration::from_secs(1)).await.unwrap().unwrap();
    d.extend_lease(Duration::MAX).await.unwrap();
    d.retry_after(Duration::MAX).await.unwrap();
    let stats = broker.stats(&source).await.unwrap();
    assert_eq!((stats.in_flight, stats.delayed), (0, 1), "the message is held, not lost");

    // A consumer with an unbounded lease and an unbounded wait still receives.
    let other = Source::queue("other").unwrap();
    let consumer = broker.consumer(&other, ConsumerOptions::default().lease(Duration::MAX)).await.unwrap();
    broker.send(&other.destination(), Message::new("y")).await.unwrap();
    let d = consumer.receive_one(Duration::MAX).await.unwrap().expect("delivered");
    assert_eq!(broker.stats(&other).await.unwrap().in_flight, 1);
    d.ack().await.unwrap();
}

/// Messages the queue stores in its compact form (a generated id whose millisecond is the
/// time, a payload of their own) sent in one batch with every kind that is not: producer
/// ids that read as a time and are not, times before 1970 or finer than a millisecond,
/// shared and empty payloads. Each arrives as it was sent, in order, and after a
/// redelivery still whole.
#[tokio::test]
async fn odd_ids_times_and_payloads_arrive_whole_beside_plain_messages() {
    use std::time::{SystemTime, UNIX_EPOCH};
    let broker = LocalBroker::new();
    let (source, dest) = orders();
    let consumer = broker.consumer(&source, ConsumerOptions::default()).await.unwrap();
    let at = |time: SystemTime, m: Message| Message { timestamp: time, ..m };
    let shared = bytes::Bytes::from(vec![9u8; 64]);
    let sent = vec![
        Message::new(vec![1u8; 100]),
        Message::new("static").with_id("AAAAAAAA"),
        at(UNIX_EPOCH, Message::new(vec![2u8; 3]).with_id("AAAAAAAA")),
        at(UNIX_EPOCH - Duration::from_nanos(1), Message::new(vec![3u8; 3])),
        at(SystemTime::now(), Message::new(vec![4u8; 3])),
        Message::new(Vec::<u8>::new()).with_id("\u{1F600}"),
        Message::new(shared.clone()).with_id(""),
        Message::new(vec![5u8; 100]),
    ];
    broker.send_batch(&dest, sent.clone()).await.unwrap();
    let first = consumer.receive(sent.len(), Duration::from_secs(1)).await.unwrap();
    assert_eq!(first.iter().map(|d| d.message().clone()).collect::<Vec<_>>(), sent);
    for d in &first {
        d.retry().await.unwrap();
    }
    let again = consumer.receive(sent.len(), Duration::from_secs(1)).await.unwrap();
    assert_eq!(again.iter().map(|d| d.message().clone()).collect::<Vec<_>>(), sent);
    assert!(again.iter().all(|d| d.attempt() == 2));
}

/// A consumer dropped without closing, while one of its deliveries is still held: the
/// queue still expires that lease, and another consumer gets the message.
#[tokio::test(start_paused = true)]
async fn a_consumer_dropped_unclosed_loses_what_it_held_when_the_lease_ends() {
    let broker = LocalBroker::new();
    let (source, dest) = orders();
    let lease = ConsumerOptions::default().lease(Duration::from_secs(5));
    let first = broker.consumer(&source, lease.clone()).await.unwrap();
    broker.send(&dest, Message::new("x")).await.unwrap();
    let held = first.receive_one(Duration::from_secs(1)).await.unwrap().expect("delivered");
    drop(first);
    let second = broker.consumer(&source, lease).await.unwrap();
    let again = second.receive_one(Duration::from_secs(10)).await.unwrap().expect("back after the lease");
    assert_eq!((&again.payload[..], again.attempt()), (&b"x"[..], 2));
    let err = held.ack().await.unwrap_err();
    assert!(matches!(err, Error::LeaseLost { .. }), "{err}");
    again.ack().await.unwrap();
    assert_eq!(broker.stats(&source).await.unwrap().in_flight, 0);
}

/// A small deterministic generator, so a failure replays.
fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

/// What the consumers of the test below have done, checked as they go.
#[derive(Default)]
struct Book {
    acks: Vec<u32>,
    /// The message of each key now out with a consumer.
    out: std::collections::HashMap<String, usize>,
    last_acked: std::collections::HashMap<String, usize>,
}

impl Book {
    fn delivered(&mut self, index: usize, key: Option<&str>) {
        if let Some(key) = key {
            let other = self.out.insert(key.to_owned(), index);
            assert!(other.is_none(), "key {key}: message {index} delivered while {other:?} was out");
        }
    }

    /// Called before the delivery leaves: from then on the key's next may arrive.
    fn leaves(&mut self, key: Option<&str>) {
        if let Some(key) = key {
            self.out.remove(key);
        }
    }

    /// Called before the ack, for the same reason.
    fn acked(&mut self, index: usize, key: Option<&str>) {
        self.leaves(key);
        self.acks[index] += 1;
        if let Some(key) = key {
            let before = self.last_acked.insert(key.to_owned(), index);
            assert!(before < Some(index), "key {key}: message {index} acked after {before:?}");
        }
    }
}

/// Four consumers on two threads, each doing all a consumer can (ack one or a batch,
/// retry, extend a lease, drop a delivery unsettled, close and open again, drop itself
/// unclosed) on a bounded queue of messages with and without keys, while a producer
/// waits for room and stats are read throughout. Every message is acked exactly once,
/// no two messages of a key are out at once, a key's messages are acked in the order
/// sent, and the queue gives back all its room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_consumers_doing_everything_at_once_lose_nothing_and_keep_each_keys_order() {
    use std::sync::{Arc, Mutex};
    const MESSAGES: usize = 4000;
    const CAPACITY: usize = 300;
    let broker = LocalBroker::with_config(LocalConfig { capacity: Some(CAPACITY), ..LocalConfig::default() });
    let (source, dest) = orders();
    broker.declare(&source).await.unwrap();
    let book = Arc::new(Mutex::new(Book { acks: vec![0; MESSAGES], ..Book::default() }));
    let key_of = |index: usize| (index % 3 != 0).then(|| format!("k{}", index % 7));

    let producer = {
        let (broker, dest) = (broker.clone(), dest.clone());
        tokio::spawn(async move {
            for start in (0..MESSAGES).step_by(10) {
                let batch = (start..start + 10).map(|i| {
                    let message = Message::new(i.to_string());
                    match key_of(i) {
                        Some(key) => message.with_ordering_key(key),
                        None => message,
                    }
                });
                broker.send_batch(&dest, batch.collect()).await.unwrap();
            }
        })
    };
    let done = |book: &Mutex<Book>| book.lock().unwrap().acks.iter().sum::<u32>() as usize >= MESSAGES;
    let mut consumers = Vec::new();
    for seed in 1..=4u64 {
        let (broker, source, book) = (broker.clone(), source.clone(), book.clone());
        consumers.push(tokio::spawn(async move {
            let mut random = xorshift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let options = ConsumerOptions::default().max_attempts(u32::MAX);
            while !done(&book) {
                let consumer = broker.consumer(&source, options.clone()).await.unwrap();
                for _ in 0..random() % 20 {
                    let batch = consumer.receive(1 + random() as usize % 10, Duration::from_millis(5)).await.unwrap();
                    let mut to_ack = Vec::new();
                    for d in batch {
                        let index: usize = std::str::from_utf8(&d.payload).unwrap().parse().unwrap();
                        let key = d.ordering_key.clone();
                        book.lock().unwrap().delivered(index, key.as_deref());
                        match random() % 12 {
                            0 => {
                                book.lock().unwrap().leaves(key.as_deref());
                                d.retry().await.unwrap();
                            }
                            1 => {
                                book.lock().unwrap().leaves(key.as_deref());
                                drop(d);
                            }
                            2 => {
                                d.extend_lease(Duration::from_secs(60)).await.unwrap();
                                book.lock().unwrap().acked(index, key.as_deref());
                                d.ack().await.unwrap();
                            }
                            3 => {
                                book.lock().unwrap().acked(index, key.as_deref());
                                d.ack().await.unwrap();
                            }
                            _ => {
                                book.lock().unwrap().acked(index, key.as_deref());
                                to_ack.push(d);
                            }
                        }
                    }
                    for result in courier_core::Delivery::ack_all(&to_ack).await {
                        result.unwrap();
                    }
                    if random() % 50 == 0 {
                        let stats = broker.stats(&source).await.unwrap();
                        assert!(stats.depth + stats.in_flight <= CAPACITY as u64, "{stats:?}");
                    }
                }
                if random() % 3 != 0 {
                    consumer.close().await.unwrap();
                }
            }
        }));
    }
    tokio::time::timeout(Duration::from_secs(30), async {
        producer.await.unwrap();
        for consumer in consumers {
            consumer.await.unwrap();
        }
    })
    .await
    .expect("every message handled within 30 s");

    let acks = std::mem::take(&mut book.lock().unwrap().acks);
    let twice: Vec<usize> = (0..MESSAGES).filter(|&i| acks[i] != 1).collect();
    assert!(twice.is_empty(), "not acked exactly once: {twice:?}");
    let stats = broker.stats(&source).await.unwrap();
    assert_eq!((stats.depth, stats.in_flight, stats.delayed), (0, 0, 0));
    // All the room is back: a full queue's worth goes in without waiting.
    let refill = (0..CAPACITY).map(|i| Message::new(i.to_string())).collect();
    tokio::time::timeout(Duration::from_secs(5), broker.send_batch(&dest, refill))
        .await
        .expect("room for a full queue")
        .unwrap();
}

/// A purge drops what waits, but a key whose message is still out with a consumer (in
/// any consumer's hands) stays busy: the next message of that key waits for the ack.
#[tokio::test]
async fn a_purge_keeps_a_key_busy_while_its_message_is_out() {
    let broker = LocalBroker::new();
    let (source, dest) = orders();
    let (first, second) = (
        broker.consumer(&source, ConsumerOptions::default()).await.unwrap(),
        broker.consumer(&source, ConsumerOptions::default()).await.unwrap(),
    );
    broker.send(&dest, Message::new("k-1").with_ordering_key("k")).await.unwrap();
    broker.send(&dest, Message::new("k-2").with_ordering_key("k")).await.unwrap();
    broker.send(&dest, Message::new("free").with_ordering_key("f")).await.unwrap();
    let out = first.receive_one(Duration::from_secs(1)).await.unwrap().expect("k-1");
    assert_eq!(&out.payload[..], b"k-1");
    assert_eq!(broker.purge(&source).await.unwrap(), 2, "k-2, waiting behind k-1, and f");

    broker.send(&dest, Message::new("k-3").with_ordering_key("k")).await.unwrap();
    broker.send(&dest, Message::new("f-2").with_ordering_key("f")).await.unwrap();
    let f = second.receive_one(Duration::from_millis(100)).await.unwrap().expect("f is free again");
    assert_eq!(&f.payload[..], b"f-2");
    assert!(second.receive_one(Duration::from_millis(100)).await.unwrap().is_none(), "k-3 waits for k-1");
    out.ack().await.unwrap();
    let next = second.receive_one(Duration::from_secs(1)).await.unwrap().expect("k-3 after the ack");
    assert_eq!(&next.payload[..], b"k-3");
}
