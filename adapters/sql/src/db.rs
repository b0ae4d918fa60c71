//! The tables and the statements on them, for both databases.
//!
//! One connection type per database, and a macro that runs the same statement text on
//! either: the code is written once and compiled for each driver's concrete types, with
//! no generic bounds and no `Any` driver in between.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use courier_core::{DeadLetter, Destination, Error, Headers, Message, MessageId, Source, Stats};
use sqlx::Row as _;

/// The schema version this build writes and reads.
pub(crate) const SCHEMA_VERSION: i64 = 1;

/// Rows per multi-row statement: far below both databases' limits on bound values.
const CHUNK: usize = 200;

/// An open connection to one of the two databases.
pub(crate) enum Conn {
    #[cfg(feature = "sqlite")]
    Sqlite(sqlx::SqliteConnection),
    #[cfg(feature = "postgres")]
    Postgres(sqlx::PgConnection),
}

/// Runs `$body` with `$c` bound to the concrete connection, whichever database it is.
macro_rules! on {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            #[cfg(feature = "sqlite")]
            Conn::Sqlite($c) => $body,
            #[cfg(feature = "postgres")]
            Conn::Postgres($c) => $body,
        }
    };
}

/// A database failure: the statement or the connection, not the message.
pub(crate) type DbResult<T> = std::result::Result<T, sqlx::Error>;

/// Milliseconds since the Unix epoch: the clock leases and delays are kept in. Every
/// process sharing a database reads its own clock, so clocks must agree to well within
/// a lease (NTP keeps them within milliseconds).
pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub(crate) fn after(now: i64, by: Duration) -> i64 {
    now.saturating_add(by.as_millis().min(i64::MAX as u128) as i64)
}

fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_micros().min(i64::MAX as u128) as i64).unwrap_or(0)
}

/// A source as it is stored: its `Display` form, `queue:NAME` or `topic:NAME/SUB`.
pub(crate) fn source_key(source: &Source) -> String {
    source.to_string()
}

/// One message as it comes out of the table.
pub(crate) struct Stored {
    pub seq: i64,
    pub message: Message,
    pub attempts: i64,
}

fn encode_headers(headers: &Headers) -> String {
    if headers.is_empty() {
        String::new()
    } else {
        serde_json::to_string(headers).expect("string map serialises")
    }
}

fn decode_headers(text: &str) -> Headers {
    if text.is_empty() {
        return Headers::new();
    }
    // Written by this crate; a row edited by hand into something else keeps its
    // payload and loses only what cannot be read.
    serde_json::from_str::<BTreeMap<String, String>>(text).unwrap_or_default()
}

/// A message's state and body, joined (`m` the state row, `b` the body row).
const COLUMNS: &str =
    "m.seq, b.id, b.payload, b.headers, m.ordering_key, b.content_type, b.dedup_id, b.created_us, m.attempts";

macro_rules! stored_from_row {
    ($row:expr) => {{
        let row = $row;
        let payload: Vec<u8> = row.try_get(2)?;
        let headers: String = row.try_get(3)?;
        let created: i64 = row.try_get(7)?;
        let id: String = row.try_get(1)?;
        Stored {
            seq: row.try_get(0)?,
            message: Message {
                id: MessageId::from(id),
                payload: Bytes::from(payload),
                headers: decode_headers(&headers),
                ordering_key: row.try_get(4)?,
                content_type: row.try_get(5)?,
                timestamp: UNIX_EPOCH + Duration::from_micros(created.max(0) as u64),
                dedup_id: row.try_get(6)?,
                delay: None,
            },
            attempts: row.try_get(8)?,
        }
    }};
}

/// Which database, for the few statements that differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

impl Conn {
    pub fn dialect(&self) -> Dialect {
        match self {
            #[cfg(feature = "sqlite")]
            Conn::Sqlite(_) => Dialect::Sqlite,
            #[cfg(feature = "postgres")]
            Conn::Postgres(_) => Dialect::Postgres,
        }
    }

    pub async fn execute(&mut self, sql: &str) -> DbResult<u64> {
        on!(self, c => sqlx::query(sql).execute(&mut *c).await.map(|r| r.rows_affected()))
    }

    /// Starts a transaction. SQLite takes the write lock at once (`IMMEDIATE`), so two
    /// processes never both read and then both try to write.
    pub async fn begin(&mut self) -> DbResult<()> {
        let sql = match self.dialect() {
            Dialect::Sqlite => "BEGIN IMMEDIATE",
            Dialect::Postgres => "BEGIN",
        };
        self.execute(sql).await.map(drop)
    }

    pub async fn commit(&mut self) -> DbResult<()> {
        self.execute("COMMIT").await.map(drop)
    }

    pub async fn rollback(&mut self) -> DbResult<()> {
        self.execute("ROLLBACK").await.map(drop)
    }

    /// Creates the tables if missing and checks the schema version; in one transaction,
    /// so processes starting together do not trip over each other.
    pub async fn migrate(&mut self, what: &str) -> courier_core::Result<()> {
        let backend = self.backend();
        // The tables are there at this version (every start but the first): no DDL. Even
        // a `CREATE INDEX IF NOT EXISTS` of an index that exists takes a SHARE lock on its
        // table in PostgreSQL, in an order opposite to a send's, so a process starting
        // beside running ones made PostgreSQL abort their sends as deadlocks.
        let current: DbResult<Option<String>> = on!(self, c => sqlx::query_scalar(
            "SELECT value FROM courier_meta WHERE key = 'schema_version'"
        ).fetch_optional(&mut *c).await);
        if current.is_ok_and(|v| v.as_deref() == Some(SCHEMA_VERSION.to_string().as_str())) {
            return Ok(());
        }
        let ddl = schema(self.dialect());
        let result: DbResult<Option<String>> = async {
            self.begin().await?;
            if self.dialect() == Dialect::Postgres {
                // CREATE TABLE IF NOT EXISTS races with itself across sessions.
                self.execute("SELECT pg_advisory_xact_lock(7450305110243)").await?;
            }
            // Statements end a line with `;` (a trigger's body has `;` inside a line).
            for statement in ddl.split(";\n").map(str::trim).filter(|s| !s.is_empty()) {
                self.execute(statement).await?;
            }
            let version: Option<String> = on!(self, c => sqlx::query_scalar(
                "SELECT value FROM courier_meta WHERE key = 'schema_version'"
            ).fetch_optional(&mut *c).await?);
            if version.is_none() {
                on!(self, c => sqlx::query("INSERT INTO courier_meta (key, value) VALUES ('schema_version', $1)")
                    .bind(SCHEMA_VERSION.to_string()).execute(&mut *c).await.map(|r| r.rows_affected())?);
            }
            self.commit().await?;
            Ok(version)
        }
        .await;
        let version = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = self.rollback().await;
                return Err(open_error(backend, what, e));
            }
        };
        match version.as_deref().map(str::parse::<i64>) {
            None => Ok(()),
            Some(Ok(v)) if v <= SCHEMA_VERSION => Ok(()),
            Some(found) => Err(Error::permanent(
                backend,
                format!(
                    "{what} holds Courier schema {} and this build of Courier reads schema {SCHEMA_VERSION}; \
                     upgrade Courier, or point it at another database",
                    found.map(|v| v.to_string()).unwrap_or_else(|_| "(unreadable)".into())
                ),
                "schema too new",
            )),
        }
    }

    pub fn backend(&self) -> &'static str {
        match self.dialect() {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgres",
        }
    }

    /// Registers a source (a queue, or a subscription of a topic) so sends to its topic
    /// reach it and stats can name it.
    pub async fn declare(&mut self, source: &Source) -> DbResult<()> {
        let topic = match source {
            Source::Queue(_) => None,
            Source::Subscription { topic, .. } => Some(topic.to_string()),
        };
        on!(self, c => sqlx::query(
            "INSERT INTO courier_sources (source, topic, dead_lettered) VALUES ($1, $2, 0) ON CONFLICT (source) DO NOTHING"
        ).bind(source_key(source)).bind(topic).execute(&mut *c).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    pub async fn source_exists(&mut self, source: &Source) -> DbResult<bool> {
        let found: Option<i64> = on!(self, c => sqlx::query_scalar("SELECT dead_lettered FROM courier_sources WHERE source = $1")
            .bind(source_key(source)).fetch_optional(&mut *c).await?);
        Ok(found.is_some())
    }

    /// The sources a send to `destination` lands in, registering a queue on first use.
    pub async fn targets(&mut self, destination: &Destination) -> DbResult<Vec<String>> {
        match destination {
            Destination::Queue(name) => {
                self.declare(&Source::Queue(name.clone())).await?;
                Ok(vec![source_key(&Source::Queue(name.clone()))])
            }
            Destination::Topic(topic) => {
                on!(self, c => sqlx::query_scalar("SELECT source FROM courier_sources WHERE topic = $1 ORDER BY source")
                    .bind(topic.to_string()).fetch_all(&mut *c).await)
            }
        }
    }

    /// Records a dedup id for `destination`; `Some(first id)` when it was seen within
    /// the window (the message is a repeat), `None` when this message is the first.
    pub async fn dedup(
        &mut self,
        destination: &str,
        dedup_id: &str,
        id: &MessageId,
        now: i64,
        window: Duration,
    ) -> DbResult<Option<MessageId>> {
        let inserted: Option<String> = on!(self, c => sqlx::query_scalar(
            "INSERT INTO courier_dedup (destination, dedup_id, id, expires_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (destination, dedup_id) DO UPDATE SET id = excluded.id, expires_ms = excluded.expires_ms \
             WHERE courier_dedup.expires_ms <= $5 RETURNING id"
        ).bind(destination).bind(dedup_id).bind(id.as_str()).bind(after(now, window)).bind(now)
            .fetch_optional(&mut *c).await?);
        if inserted.is_some() {
            return Ok(None);
        }
        let first: Option<String> = on!(self, c => sqlx::query_scalar(
            "SELECT id FROM courier_dedup WHERE destination = $1 AND dedup_id = $2"
        ).bind(destination).bind(dedup_id).fetch_optional(&mut *c).await?);
        Ok(Some(first.map(MessageId::from).unwrap_or_else(|| id.clone())))
    }

    pub async fn sweep_dedup(&mut self, now: i64) -> DbResult<u64> {
        on!(self, c => sqlx::query("DELETE FROM courier_dedup WHERE expires_ms <= $1").bind(now).execute(&mut *c).await.map(|r| r.rows_affected()))
    }

    /// Sequence numbers for `n` new rows, ascending: the order they are delivered in.
    async fn next_seqs(&mut self, n: usize) -> DbResult<Vec<i64>> {
        match self.dialect() {
            // The transaction holds SQLite's write lock, so no other process adds rows meanwhile.
            Dialect::Sqlite => {
                let max: i64 = on!(self, c => sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM courier_messages")
                    .fetch_one(&mut *c).await?);
                Ok((1..=n as i64).map(|i| max + i).collect())
            }
            Dialect::Postgres => {
                let mut seqs: Vec<i64> = on!(self, c => sqlx::query_scalar("SELECT nextval('courier_seq') FROM generate_series(1, $1)")
                    .bind(n as i64).fetch_all(&mut *c).await?);
                seqs.sort_unstable();
                Ok(seqs)
            }
        }
    }

    /// Inserts messages, each into its source, visible from its time. A message's body
    /// lives in a row of its own, so leasing and settling it never rewrites its payload
    /// (SQLite rewrites a whole row on update, overflow pages and all).
    pub async fn insert(&mut self, rows: &[(&str, &Message, i64)]) -> DbResult<()> {
        let seqs = self.next_seqs(rows.len()).await?;
        for (chunk, seqs) in rows.chunks(CHUNK).zip(seqs.chunks(CHUNK)) {
            let sql = format!(
                "INSERT INTO courier_messages (seq, source, ordering_key, visible_ms, attempts) VALUES {}",
                placeholders(self.dialect(), chunk.len(), 4, ", 0")
            );
            on!(self, c => {
                let mut q = sqlx::query(&sql);
                for ((source, m, visible), seq) in chunk.iter().zip(seqs) {
                    q = q.bind(*seq).bind(*source).bind(m.ordering_key.as_deref()).bind(*visible);
                }
                q.execute(&mut *c).await.map(|r| r.rows_affected())
            })?;
            let sql = format!(
                "INSERT INTO courier_bodies (seq, id, payload, headers, content_type, dedup_id, created_us) VALUES {}",
                placeholders(self.dialect(), chunk.len(), 7, "")
            );
            on!(self, c => {
                let mut q = sqlx::query(&sql);
                for ((_, m, _), seq) in chunk.iter().zip(seqs) {
                    q = q
                        .bind(*seq)
                        .bind(m.id.as_str())
                        .bind(&m.payload[..])
                        .bind(encode_headers(&m.headers))
                        .bind(m.content_type.as_deref())
                        .bind(m.dedup_id.as_deref())
                        .bind(micros(m.timestamp));
                }
                q.execute(&mut *c).await.map(|r| r.rows_affected())
            })?;
        }
        Ok(())
    }

    async fn delete_bodies(&mut self, seqs: &[i64]) -> DbResult<()> {
        self.delete_seqs("courier_bodies", seqs).await
    }

    /// Deletes the rows of `table` whose `seq` is one of `seqs`.
    async fn delete_seqs(&mut self, table: &'static str, seqs: &[i64]) -> DbResult<()> {
        for chunk in seqs.chunks(CHUNK) {
            let list = params(self.dialect(), 1, chunk.len());
            let sql = format!("DELETE FROM {table} WHERE seq IN ({list})");
            on!(self, c => {
                let mut q = sqlx::query(&sql);
                for seq in chunk {
                    q = q.bind(*seq);
                }
                q.execute(&mut *c).await.map(|r| r.rows_affected())
            })?;
        }
        Ok(())
    }

    /// The messages a consumer may take now, oldest first: visible (never leased, or
    /// their lease ran out), and each the first of its ordering key. Returns
    /// `(seq, lease held before, attempts)`; PostgreSQL locks them and skips rows
    /// another session holds, so competing consumers on other machines take others.
    pub async fn candidates(&mut self, source: &str, now: i64, max: usize) -> DbResult<Vec<(i64, Option<i64>, i64)>> {
        let lock = match self.dialect() {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
        };
        let sql = format!(
            "SELECT seq, lease, attempts FROM courier_messages m WHERE source = $1 AND visible_ms <= $2 \
             AND (ordering_key IS NULL OR NOT EXISTS (SELECT 1 FROM courier_messages o \
             WHERE o.source = m.source AND o.ordering_key = m.ordering_key AND o.seq < m.seq)) \
             ORDER BY seq LIMIT $3{lock}"
        );
        if self.dialect() == Dialect::Sqlite {
            // One row, not one per candidate: sqlx hands each SQLite row over from its
            // worker thread on its own, and on two cores those hand-overs cost more than
            // the query. Rows whose lease ran out (rare) come with their attempts.
            let sql = format!(
                "SELECT group_concat(seq), group_concat(CASE WHEN lease IS NOT NULL THEN seq || ':' || lease || ':' || attempts END) \
                 FROM ({sql})"
            );
            let (all, expired): (Option<String>, Option<String>) = on!(self, c => {
                let row = sqlx::query(&sql).bind(source).bind(now).bind(max as i64).fetch_one(&mut *c).await?;
                (row.try_get(0)?, row.try_get(1)?)
            });
            let mut expired_rows = std::collections::HashMap::new();
            for item in expired.as_deref().unwrap_or("").split(',').filter(|s| !s.is_empty()) {
                let mut parts = item.split(':').map(|p| p.parse::<i64>().unwrap_or(0));
                let (seq, lease, attempts) = (parts.next(), parts.next(), parts.next());
                expired_rows.insert(seq.unwrap_or(0), (lease.unwrap_or(0), attempts.unwrap_or(0)));
            }
            return Ok(all
                .as_deref()
                .unwrap_or("")
                .split(',')
                .filter_map(|s| s.parse::<i64>().ok())
                .map(|seq| match expired_rows.get(&seq) {
                    Some((lease, attempts)) => (seq, Some(*lease), *attempts),
                    None => (seq, None, 0),
                })
                .collect());
        }
        on!(self, c => {
            let rows = sqlx::query(&sql).bind(source).bind(now).bind(max as i64).fetch_all(&mut *c).await?;
            rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?))).collect()
        })
    }

    /// Leases rows for several receivers at once, each `(seqs, lease token, until)`,
    /// counting the delivery: one update and one read for all of them. Returns the rows
    /// oldest first.
    pub async fn lease_many(&mut self, grants: &[(Vec<i64>, i64, i64)]) -> DbResult<Vec<Stored>> {
        let grants: Vec<&(Vec<i64>, i64, i64)> = grants.iter().filter(|g| !g.0.is_empty()).collect();
        if grants.is_empty() {
            return Ok(Vec::new());
        }
        let dialect = self.dialect();
        let mut n = 0;
        let mut next = |count: usize| {
            let list = params(dialect, n + 1, count);
            n += count;
            list
        };
        let mut lease_case = String::from("CASE");
        for (seqs, _, _) in &grants {
            lease_case.push_str(&format!(" WHEN seq IN ({}) THEN {}", next(seqs.len()), next(1)));
        }
        let mut until_case = String::from("CASE");
        for (seqs, _, _) in &grants {
            until_case.push_str(&format!(" WHEN seq IN ({}) THEN {}", next(seqs.len()), next(1)));
        }
        let all: Vec<i64> = grants.iter().flat_map(|g| g.0.iter().copied()).collect();
        let update = format!(
            "UPDATE courier_messages SET lease = {lease_case} ELSE lease END, visible_ms = {until_case} ELSE visible_ms END, \
             attempts = attempts + 1 WHERE seq IN ({})",
            next(all.len())
        );
        let select = format!(
            "SELECT {COLUMNS} FROM courier_messages m JOIN courier_bodies b ON b.seq = m.seq WHERE m.seq IN ({})",
            params(dialect, 1, all.len())
        );
        let mut out = Vec::with_capacity(all.len());
        on!(self, c => {
            let mut q = sqlx::query(&update);
            for (seqs, lease, _) in &grants {
                for seq in seqs {
                    q = q.bind(*seq);
                }
                q = q.bind(*lease);
            }
            for (seqs, _, until) in &grants {
                for seq in seqs {
                    q = q.bind(*seq);
                }
                q = q.bind(*until);
            }
            for seq in &all {
                q = q.bind(*seq);
            }
            q.execute(&mut *c).await?;
            let mut q = sqlx::query(&select);
            for seq in &all {
                q = q.bind(*seq);
            }
            for row in q.fetch_all(&mut *c).await? {
                out.push(stored_from_row!(&row));
            }
        });
        out.sort_unstable_by_key(|s| s.seq);
        Ok(out)
    }

    /// When the next message of `source` becomes visible, if any waits.
    pub async fn next_visible(&mut self, source: &str, now: i64) -> DbResult<Option<i64>> {
        on!(self, c => sqlx::query_scalar("SELECT MIN(visible_ms) FROM courier_messages WHERE source = $1 AND visible_ms > $2")
            .bind(source).bind(now).fetch_one(&mut *c).await)
    }

    /// Deletes leased rows; returns the seqs that were still held by their lease. One
    /// statement per lease token (a receive's deliveries share one), each naming its rows.
    pub async fn delete_leased(&mut self, held: &[(i64, i64)]) -> DbResult<Vec<i64>> {
        let mut by_lease: std::collections::BTreeMap<i64, Vec<i64>> = std::collections::BTreeMap::new();
        for (seq, lease) in held {
            by_lease.entry(*lease).or_default().push(*seq);
        }
        let mut done = Vec::with_capacity(held.len());
        if self.dialect() == Dialect::Sqlite {
            // One read naming the rows still held and one delete, for every lease token
            // at once (sqlx hands each statement and each row to SQLite's thread and back;
            // those hand-overs, not SQLite, are what a transaction costs). A trigger
            // deletes the bodies.
            let groups: Vec<(i64, Vec<i64>)> = by_lease.into_iter().collect();
            for round in groups.chunks(8) {
                let cond = round
                    .iter()
                    .map(|(_, seqs)| format!("(lease = ? AND seq IN ({}))", params(Dialect::Sqlite, 1, seqs.len())))
                    .collect::<Vec<_>>()
                    .join(" OR ");
                let held_sql = format!("SELECT group_concat(seq) FROM courier_messages WHERE {cond}");
                let delete_sql = format!("DELETE FROM courier_messages WHERE {cond}");
                let held_now: Option<String> = on!(self, c => {
                    let mut q = sqlx::query_scalar(&held_sql);
                    for (lease, seqs) in round {
                        q = q.bind(*lease);
                        for seq in seqs {
                            q = q.bind(*seq);
                        }
                    }
                    q.fetch_one(&mut *c).await?
                });
                on!(self, c => {
                    let mut q = sqlx::query(&delete_sql);
                    for (lease, seqs) in round {
                        q = q.bind(*lease);
                        for seq in seqs {
                            q = q.bind(*seq);
                        }
                    }
                    q.execute(&mut *c).await.map(|r| r.rows_affected())
                })?;
                done.extend(held_now.as_deref().unwrap_or("").split(',').filter_map(|s| s.parse::<i64>().ok()));
            }
            return Ok(done);
        }
        for (lease, seqs) in by_lease {
            for chunk in seqs.chunks(CHUNK) {
                let sql = format!(
                    "DELETE FROM courier_messages WHERE lease = $1 AND seq IN ({}) RETURNING seq",
                    params(Dialect::Postgres, 2, chunk.len())
                );
                on!(self, c => {
                    let mut q = sqlx::query_scalar::<_, i64>(&sql).bind(lease);
                    for seq in chunk {
                        q = q.bind(*seq);
                    }
                    done.extend(q.fetch_all(&mut *c).await?);
                });
            }
        }
        self.delete_bodies(&done).await?;
        Ok(done)
    }

    /// Ends a lease and makes the row visible at `visible`, taking back the attempt the
    /// receive counted when `uncount`; false when the lease was lost.
    pub async fn unlease(&mut self, seq: i64, lease: i64, visible: i64, uncount: bool) -> DbResult<bool> {
        let sql = if uncount {
            "UPDATE courier_messages SET lease = NULL, visible_ms = $3, attempts = attempts - 1 WHERE seq = $1 AND lease = $2"
        } else {
            "UPDATE courier_messages SET lease = NULL, visible_ms = $3 WHERE seq = $1 AND lease = $2"
        };
        on!(self, c => sqlx::query(sql).bind(seq).bind(lease).bind(visible).execute(&mut *c).await.map(|r| r.rows_affected()))
            .map(|n| n == 1)
    }

    /// Moves a lease's deadline; false when the lease was lost.
    pub async fn extend(&mut self, seq: i64, lease: i64, until: i64) -> DbResult<bool> {
        on!(self, c => sqlx::query("UPDATE courier_messages SET visible_ms = $3 WHERE seq = $1 AND lease = $2")
            .bind(seq).bind(lease).bind(until).execute(&mut *c).await.map(|r| r.rows_affected()))
        .map(|n| n == 1)
    }

    /// Hands every delivery a consumer holds (leases `lo..=hi`) back, visible now.
    pub async fn hand_back(&mut self, source: &str, lo: i64, hi: i64, now: i64) -> DbResult<u64> {
        on!(self, c => sqlx::query(
            "UPDATE courier_messages SET lease = NULL, visible_ms = $4 WHERE source = $1 AND lease >= $2 AND lease <= $3"
        ).bind(source).bind(lo).bind(hi).bind(now).execute(&mut *c).await.map(|r| r.rows_affected()))
    }

    /// Moves one row to its dead-letter destination, with the letter's headers, and
    /// counts it against its source. `lease`: only while that lease holds it. False when
    /// the row was not there (settled or its lease lost).
    pub async fn dead_letter(&mut self, seq: i64, lease: Option<i64>, letter: &DeadLetter, now: i64) -> DbResult<bool> {
        let sql = format!(
            "SELECT {COLUMNS} FROM courier_messages m JOIN courier_bodies b ON b.seq = m.seq WHERE m.seq = $1 AND (m.lease = $2 OR $3)"
        );
        let row = on!(self, c => {
            let row = sqlx::query(&sql).bind(seq).bind(lease.unwrap_or(0)).bind(lease.is_none())
                .fetch_optional(&mut *c).await?;
            match row {
                Some(row) => Some(stored_from_row!(&row)),
                None => None,
            }
        });
        let Some(stored) = row else { return Ok(false) };
        let dead = letter.apply(stored.message);
        let targets = self.targets(letter.destination()).await?;
        let rows: Vec<(&str, &Message, i64)> = targets.iter().map(|t| (t.as_str(), &dead, now)).collect();
        self.insert(&rows).await?;
        on!(self, c => sqlx::query("DELETE FROM courier_messages WHERE seq = $1").bind(seq).execute(&mut *c).await.map(|r| r.rows_affected()))?;
        self.delete_bodies(&[seq]).await?;
        on!(self, c => sqlx::query("UPDATE courier_sources SET dead_lettered = dead_lettered + 1 WHERE source = $1")
            .bind(source_key(letter.origin())).execute(&mut *c).await.map(|r| r.rows_affected()))?;
        Ok(true)
    }

    pub async fn stats(&mut self, source: &Source, now: i64) -> DbResult<Option<Stats>> {
        let key = source_key(source);
        let dead: Option<i64> = on!(self, c => sqlx::query_scalar("SELECT dead_lettered FROM courier_sources WHERE source = $1")
            .bind(&key).fetch_optional(&mut *c).await?);
        let Some(dead_lettered) = dead else { return Ok(None) };
        let (depth, in_flight, delayed, oldest): (i64, i64, i64, Option<i64>) = on!(self, c => {
            let row = sqlx::query(
                "SELECT COUNT(*) FILTER (WHERE visible_ms <= $2), \
                        COUNT(*) FILTER (WHERE lease IS NOT NULL AND visible_ms > $2), \
                        COUNT(*) FILTER (WHERE lease IS NULL AND visible_ms > $2), \
                        MIN(b.created_us) FILTER (WHERE visible_ms <= $2) \
                 FROM courier_messages m JOIN courier_bodies b ON b.seq = m.seq WHERE m.source = $1",
            ).bind(&key).bind(now).fetch_one(&mut *c).await?;
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?, row.try_get(3)?)
        });
        let now_us = now.saturating_mul(1000);
        Ok(Some(Stats {
            depth: depth as u64,
            in_flight: in_flight as u64,
            delayed: delayed as u64,
            dead_lettered: dead_lettered as u64,
            oldest_age: oldest.map(|t| Duration::from_micros(now_us.saturating_sub(t).max(0) as u64)),
        }))
    }

    /// Deletes what waits in a source (ready and delayed); leased rows stay.
    pub async fn purge(&mut self, source: &Source, now: i64) -> DbResult<u64> {
        const WAITING: &str = "source = $1 AND NOT (lease IS NOT NULL AND visible_ms > $2)";
        let key = source_key(source);
        let bodies =
            format!("DELETE FROM courier_bodies WHERE seq IN (SELECT seq FROM courier_messages WHERE {WAITING})");
        on!(self, c => sqlx::query(&bodies).bind(&key).bind(now).execute(&mut *c).await.map(|r| r.rows_affected()))?;
        let rows = format!("DELETE FROM courier_messages WHERE {WAITING}");
        on!(self, c => sqlx::query(&rows).bind(&key).bind(now).execute(&mut *c).await.map(|r| r.rows_affected()))
    }

    /// Takes or renews the outbox relay lease for `holder`; while another holds it, who
    /// and until when.
    pub async fn relay_lease(&mut self, holder: &str, lease: Duration) -> DbResult<Option<(String, i64)>> {
        let now = now_ms();
        on!(self, c => sqlx::query("INSERT INTO courier_meta (key, value) VALUES ('outbox_relay', '') ON CONFLICT (key) DO NOTHING")
            .execute(&mut *c).await.map(|r| r.rows_affected()))?;
        let lock = if self.dialect() == Dialect::Postgres { " FOR UPDATE" } else { "" };
        let sql = format!("SELECT value FROM courier_meta WHERE key = 'outbox_relay'{lock}");
        let value: String = on!(self, c => sqlx::query_scalar(&sql).fetch_one(&mut *c).await?);
        // "HOLDER UNTIL_MS"
        let (current, until) = value.split_once(' ').unwrap_or(("", "0"));
        let until = until.parse::<i64>().unwrap_or(0);
        if !current.is_empty() && current != holder && until > now {
            return Ok(Some((current.to_owned(), until)));
        }
        let value = format!("{holder} {}", after(now, lease));
        on!(self, c => sqlx::query("UPDATE courier_meta SET value = $1 WHERE key = 'outbox_relay'").bind(value)
            .execute(&mut *c).await.map(|r| r.rows_affected()))?;
        Ok(None)
    }

    /// The oldest rows of the outbox.
    pub async fn outbox_rows(&mut self, max: usize) -> DbResult<Vec<crate::outbox::OutboxRow>> {
        on!(self, c => {
            let rows = sqlx::query(
                "SELECT seq, destination, id, payload, headers, ordering_key, content_type, dedup_id, created_us, delay_ms \
                 FROM courier_outbox ORDER BY seq LIMIT $1",
            ).bind(max as i64).fetch_all(&mut *c).await?;
            rows.iter().map(|r| {
                let (payload, headers, created, delay): (Vec<u8>, String, i64, i64) =
                    (r.try_get(3)?, r.try_get(4)?, r.try_get(8)?, r.try_get(9)?);
                let id: String = r.try_get(2)?;
                let message = Message {
                    id: MessageId::from(id),
                    payload: Bytes::from(payload),
                    headers: decode_headers(&headers),
                    ordering_key: r.try_get(5)?,
                    content_type: r.try_get(6)?,
                    timestamp: UNIX_EPOCH + Duration::from_micros(created.max(0) as u64),
                    dedup_id: r.try_get(7)?,
                    delay: (delay > 0).then(|| Duration::from_millis(delay as u64)),
                };
                Ok((r.try_get(0)?, r.try_get(1)?, message))
            }).collect()
        })
    }

    pub async fn outbox_delete(&mut self, seqs: &[i64]) -> DbResult<()> {
        self.delete_seqs("courier_outbox", seqs).await
    }

    /// Wakes consumers in other sessions (PostgreSQL `NOTIFY`, sent at commit).
    pub async fn notify(&mut self) -> DbResult<()> {
        if self.dialect() == Dialect::Postgres {
            self.execute("SELECT pg_notify('courier', '')").await?;
        }
        Ok(())
    }
}

/// `n` bind parameters from number `first`: `$first, …` for PostgreSQL, `?, …` for
/// SQLite, whose driver looks each numbered parameter's name up in a list, which made a
/// 1,400-parameter insert spend half its time there.
fn params(dialect: Dialect, first: usize, n: usize) -> String {
    let mut s = String::with_capacity(n * 6);
    for i in 0..n {
        if i > 0 {
            s.push_str(", ");
        }
        match dialect {
            Dialect::Sqlite => s.push('?'),
            Dialect::Postgres => {
                s.push('$');
                s.push_str(&(first + i).to_string());
            }
        }
    }
    s
}

/// `(p1, …, p_cols extra), (…)` for `rows` rows, numbered from 1.
fn placeholders(dialect: Dialect, rows: usize, cols: usize, extra: &str) -> String {
    let mut s = String::with_capacity(rows * (cols * 6 + 4));
    for r in 0..rows {
        if r > 0 {
            s.push_str(", ");
        }
        s.push('(');
        s.push_str(&params(dialect, r * cols + 1, cols));
        s.push_str(extra);
        s.push(')');
    }
    s
}

/// An error opening or preparing a database, naming it and what to do.
pub(crate) fn open_error(backend: &'static str, what: &str, e: sqlx::Error) -> Error {
    let text = e.to_string();
    let hint = if text.contains("file is not a database") || text.contains("malformed") {
        "it is not a SQLite database; point sqlite:// at a new file or at a Courier database"
    } else if text.contains("unable to open") || text.contains("readonly") || text.contains("read-only") {
        "check that the directory exists and this process may write there (SQLite also writes -wal and -shm files beside it)"
    } else if text.contains("disk is full") || text.contains("database or disk is full") {
        "free some space on its disk, then try again"
    } else if text.contains("no such table") || text.contains("no such column") || text.contains("does not exist") {
        "its Courier tables are not as this build expects; point Courier at another database"
    } else if backend == "postgres" {
        "check the URL, that PostgreSQL runs there and accepts this user"
    } else {
        "see the cause below"
    };
    let retryable = matches!(e, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut) || text.contains("disk is full");
    let message = format!("cannot use {what}: {text}; {hint}");
    if retryable {
        Error::transient(backend, message, e)
    } else {
        Error::permanent(backend, message, e)
    }
}

/// A failure of a statement after the database was opened: retryable, since what fails
/// here (a full disk, another process's lock, a dropped connection) passes.
pub(crate) fn db_error(backend: &'static str, what: &str, e: &sqlx::Error) -> Error {
    let text = match e {
        sqlx::Error::Database(db) => db.message().to_owned(),
        other => other.to_string(),
    };
    let hint = if text.contains("disk is full") {
        "free some space on its disk, then try again"
    } else if text.contains("locked") || text.contains("busy") {
        "another process held the database too long; try again, or raise busy_timeout_ms"
    } else {
        "try again; the connection is reopened if it broke"
    };
    Error::Broker {
        backend,
        message: format!("cannot write to {what}: {text}; {hint} (nothing of this call was written)"),
        retryable: true,
        source: None,
    }
}

/// Courier's tables for either database: `{int}`, `{blob}` and `{serial}` stand for the
/// database's 64-bit integer, byte string and auto-numbered key.
const TABLES: &str = "
CREATE TABLE IF NOT EXISTS courier_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS courier_messages (
    seq {int} PRIMARY KEY,
    source TEXT NOT NULL,
    ordering_key TEXT,
    visible_ms {int} NOT NULL,
    attempts {int} NOT NULL,
    lease {int}
);
CREATE TABLE IF NOT EXISTS courier_bodies (
    seq {int} PRIMARY KEY,
    id TEXT NOT NULL,
    payload {blob} NOT NULL,
    headers TEXT NOT NULL,
    content_type TEXT,
    dedup_id TEXT,
    created_us {int} NOT NULL
);
CREATE INDEX IF NOT EXISTS courier_messages_by_source ON courier_messages (source, seq);
CREATE INDEX IF NOT EXISTS courier_messages_by_key ON courier_messages (source, ordering_key, seq) WHERE ordering_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS courier_sources (source TEXT PRIMARY KEY, topic TEXT, dead_lettered {int} NOT NULL);
CREATE INDEX IF NOT EXISTS courier_sources_by_topic ON courier_sources (topic);
CREATE TABLE IF NOT EXISTS courier_dedup (
    destination TEXT NOT NULL,
    dedup_id TEXT NOT NULL,
    id TEXT NOT NULL,
    expires_ms {int} NOT NULL,
    PRIMARY KEY (destination, dedup_id)
);
CREATE TABLE IF NOT EXISTS courier_outbox (
    seq {serial},
    destination TEXT NOT NULL,
    id TEXT NOT NULL,
    payload {blob} NOT NULL,
    headers TEXT NOT NULL,
    ordering_key TEXT,
    content_type TEXT,
    dedup_id TEXT,
    created_us {int} NOT NULL,
    delay_ms {int} NOT NULL
);
CREATE TABLE IF NOT EXISTS courier_processed (consumer TEXT NOT NULL, id TEXT NOT NULL, processed_us {int} NOT NULL, PRIMARY KEY (consumer, id));
";

/// SQLite deletes a body with its row (PostgreSQL's statements delete both).
const SQLITE_TRIGGER: &str =
    "CREATE TRIGGER IF NOT EXISTS courier_bodies_follow AFTER DELETE ON courier_messages BEGIN DELETE FROM courier_bodies WHERE seq = old.seq; END\n";

/// The schema statements for `dialect`, each ending its line with `;`.
fn schema(dialect: Dialect) -> String {
    let typed = |int: &str, blob: &str, serial: &str| {
        TABLES.replace("{serial}", serial).replace("{int}", int).replace("{blob}", blob)
    };
    match dialect {
        // INTEGER PRIMARY KEY is SQLite's row id: the fastest key it has.
        Dialect::Sqlite => typed("INTEGER", "BLOB", "INTEGER PRIMARY KEY") + SQLITE_TRIGGER,
        Dialect::Postgres => {
            "CREATE SEQUENCE IF NOT EXISTS courier_seq;\n".to_owned()
                + &typed("BIGINT", "BYTEA", "BIGSERIAL PRIMARY KEY")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_number_every_value_once() {
        assert_eq!(placeholders(Dialect::Postgres, 2, 2, ", 0"), "($1, $2, 0), ($3, $4, 0)");
        assert_eq!(placeholders(Dialect::Sqlite, 2, 2, ""), "(?, ?), (?, ?)");
    }
}
