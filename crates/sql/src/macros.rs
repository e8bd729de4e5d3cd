//! The Rust around the shared statements, expanded once per backend.
//!
//! Each macro names what differs between backends as an argument (the pool
//! type, the `map_err` adapter that classifies the backend's errors, value
//! conversions, a statement whose SQL differs) and expands to the same body
//! for each. The expanding crate provides the items the bodies call through
//! `crate::` (listed per macro).

/// The read-only checks: `check_schema`, `topic_seen`, `consumer_seen`,
/// `topics`, `consumers`, over `pool`'s database.
///
/// - `err`: `fn(&'static str) -> impl FnOnce(sqlx::Error) -> custody_core::Error`;
/// - `tables`: a statement giving `(bool, bool, bool)`: `custody_migrations`,
///   sqlx's `_sqlx_migrations` and custody's outbox table exist (the catalog
///   differs), as for [`crate::migrate_impl!`];
/// - `migrator`: the backend's `sqlx::migrate::Migrator`;
/// - `names`: how an operator names the database and how they pass it, for
///   the schema error.
#[macro_export]
macro_rules! checks_impl {
    (
        pool: $pool:ty,
        err: $err:path,
        tables: $tables:expr,
        migrator: $migrator:expr,
        names: ($what:literal, $how:literal) $(,)?
    ) => {
        /// Check that `pool`'s database holds custody's tables with every
        /// migration of this build applied, without applying any.
        ///
        /// Errors ([`custody_core::Error::Config`]) say which case it is and
        /// what to do: no custody tables at all (a wrong database, or one
        /// never set up with `custody migrate`), an older schema (also one
        /// whose migrations an earlier custody recorded in
        /// `_sqlx_migrations`), or a recorded migration whose checksum is not
        /// this build's. Recorded migrations this build does not know (a
        /// newer custody's) are tolerated, as [`crate::migrate`] tolerates them.
        pub async fn check_schema(pool: &$pool) -> $crate::custody_core::Result<()> {
            const OP: &str = "check schema";
            let (own, legacy, outbox): (bool, bool, bool) = $crate::sqlx::query_as($tables)
                .fetch_one(pool)
                .await
                .map_err($err(OP))?;
            let recorded: Vec<(i64, Vec<u8>)> = if own {
                $crate::sqlx::query_as($crate::migrate::RECORDED)
                    .fetch_all(pool)
                    .await
                    .map_err($err(OP))?
            } else {
                Vec::new()
            };
            let legacy: Vec<i64> = if legacy {
                let rows: Vec<(i64, Vec<u8>)> = $crate::sqlx::query_as($crate::migrate::LEGACY)
                    .fetch_all(pool)
                    .await
                    .map_err($err(OP))?;
                $crate::migrate::custody_rows(&$migrator, &rows)
            } else {
                Vec::new()
            };
            $crate::migrate::verify(&$migrator, &recorded)?;
            let recorded: Vec<i64> = recorded.into_iter().map(|(v, _)| v).collect();
            $crate::custody_core::admin::schema_verdict(
                outbox,
                &recorded,
                &legacy,
                $crate::migrate::ups(&$migrator).map(|m| m.version),
                $what,
                $how,
            )
        }

        /// Whether `topic` appears anywhere in this database: outbox rows,
        /// numbers given, dead letters, inbox rows, floors or redrives.
        pub async fn topic_seen(pool: &$pool, topic: &str) -> $crate::custody_core::Result<bool> {
            $crate::sqlx::query_scalar($crate::check::TOPIC_SEEN)
                .bind(topic)
                .fetch_one(pool)
                .await
                .map_err($err("look up topic"))
        }

        /// Whether consumer `name` has recorded anything in this database:
        /// inbox rows, floors, redrives or dead letters of its own.
        pub async fn consumer_seen(pool: &$pool, name: &str) -> $crate::custody_core::Result<bool> {
            $crate::sqlx::query_scalar($crate::check::CONSUMER_SEEN)
                .bind(name)
                .fetch_one(pool)
                .await
                .map_err($err("look up consumer"))
        }

        /// Up to `limit` topics this database holds outbox rows, numbers or
        /// floors of, sorted (for "topics known here" in error messages).
        pub async fn topics(pool: &$pool, limit: u32) -> $crate::custody_core::Result<Vec<String>> {
            $crate::sqlx::query_scalar($crate::check::TOPICS)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
                .map_err($err("list topics"))
        }

        /// Up to `limit` consumer names with inbox rows or floors in this
        /// database, sorted.
        pub async fn consumers(
            pool: &$pool,
            limit: u32,
        ) -> $crate::custody_core::Result<Vec<String>> {
            $crate::sqlx::query_scalar($crate::check::CONSUMERS)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
                .map_err($err("list consumers"))
        }
    };
}

/// `migrate(&pool)`: custody's migration runner ([`crate::migrate`]) over a
/// backend's pool and connection types.
///
/// - `backend`: the name in errors; `err` as in [`checks_impl!`];
///   `retryable`: `fn(&sqlx::Error) -> bool`, the backend's classification;
/// - `migrator`: the backend's embedded `sqlx::migrate::Migrator`;
/// - `tables`: as in [`checks_impl!`];
/// - `create`: the `CREATE TABLE custody_migrations` statement (the types
///   differ); run only when the table is missing, so a second run makes no
///   "already exists" notice;
/// - `adopt`: `INSERT INTO custody_migrations … SELECT … FROM
///   _sqlx_migrations WHERE version = $1 AND checksum = $2` (the
///   `installed_on` conversion differs);
/// - `begin`: the statement opening each transaction; on SQLite
///   `BEGIN IMMEDIATE`, which takes the one write lock first, so concurrent
///   migrators take turns;
/// - `lock`: `Some((try_lock, unlock))`, statements taking (a `bool`: taken
///   or not, polled until taken) and releasing a session lock held for the
///   whole run (PostgreSQL's advisory lock, as sqlx's migrator takes), or
///   `None`.
///
/// Either way each step re-reads what is recorded inside its own
/// transaction, so a migration another migrator applied meanwhile is
/// counted, not applied again.
#[macro_export]
macro_rules! migrate_impl {
    (
        pool: $pool:ty,
        conn: $conn:ty,
        backend: $backend:literal,
        err: $err:path,
        retryable: $retryable:path,
        migrator: $migrator:expr,
        tables: $tables:expr,
        create: $create:expr,
        adopt: $adopt:expr,
        begin: $begin:expr,
        lock: $lock:expr $(,)?
    ) => {
        /// Create or upgrade custody's tables (docs/SCHEMA.md), recording
        /// each migration in `custody_migrations`, custody's own table (the
        /// application's sqlx migrations keep `_sqlx_migrations` to
        /// themselves). Safe to run at every start and from several
        /// processes at once: each migration runs once, in its own
        /// transaction with its record.
        ///
        /// A database migrated by an earlier custody, which recorded in
        /// `_sqlx_migrations`, is upgraded first: the rows there whose
        /// version and checksum are custody's move to `custody_migrations`
        /// in one transaction; the application's rows stay. A recorded
        /// migration whose checksum is not this build's is an error naming
        /// it, and nothing is applied.
        pub async fn migrate(
            pool: &$pool,
        ) -> $crate::custody_core::Result<$crate::custody_core::admin::MigrationReport> {
            let conn = pool.acquire().await.map_err($err("migrate"))?;
            let lock: Option<(&'static str, &'static str)> = $lock;
            let Some((lock, unlock)) = lock else {
                let mut conn = conn;
                return run_migrations(&mut conn).await;
            };
            // A session lock lives as long as its connection: a connection of
            // its own, never handed back to the pool, so neither an error nor
            // a dropped future leaves the lock held by a pooled connection.
            let mut conn = conn.detach();
            // Polled, not waited for inside one statement: a session blocked
            // in `pg_advisory_lock` has a transaction open, and a migration
            // running `CREATE INDEX CONCURRENTLY` under the lock waits for
            // every open transaction to end: a deadlock (seen with 4 migrators).
            let mut waited = false;
            loop {
                let got: bool = $crate::sqlx::query_scalar(lock)
                    .fetch_one(&mut conn)
                    .await
                    .map_err($err("take the migration lock"))?;
                if got {
                    break;
                }
                if !waited {
                    $crate::tracing::info!("waiting for another custody migrate on this database");
                    waited = true;
                }
                $crate::tokio::time::sleep(::std::time::Duration::from_millis(100)).await;
            }
            let result = run_migrations(&mut conn).await;
            if result.is_ok() {
                $crate::sqlx::query(unlock)
                    .execute(&mut conn)
                    .await
                    .map_err($err("release the migration lock"))?;
            }
            // closing ends the session, and with it the lock in any case
            let _ = $crate::sqlx::Connection::close(conn).await;
            result
        }

        async fn run_migrations(
            conn: &mut $conn,
        ) -> $crate::custody_core::Result<$crate::custody_core::admin::MigrationReport> {
            use $crate::sqlx::Connection as _;
            const OP: &str = "migrate";
            let migrator: &'static $crate::sqlx::migrate::Migrator = &$migrator;
            let mut report = $crate::custody_core::admin::MigrationReport::default();

            // custody's table, and the upgrade from `_sqlx_migrations`, in one transaction
            let mut tx = conn.begin_with($begin).await.map_err($err(OP))?;
            let (own, legacy, _outbox): (bool, bool, bool) = $crate::sqlx::query_as($tables)
                .fetch_one(&mut *tx)
                .await
                .map_err($err(OP))?;
            let recorded: Vec<(i64, Vec<u8>)> = if own {
                $crate::sqlx::query_as($crate::migrate::RECORDED)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err($err(OP))?
            } else {
                $crate::sqlx::Executor::execute(&mut *tx, $crate::sqlx::raw_sql($create))
                    .await
                    .map_err($err("create custody_migrations"))?;
                Vec::new()
            };
            $crate::migrate::verify(migrator, &recorded)?;
            if legacy {
                let rows: Vec<(i64, Vec<u8>)> = $crate::sqlx::query_as($crate::migrate::LEGACY)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err($err("read _sqlx_migrations"))?;
                for version in $crate::migrate::custody_rows(migrator, &rows) {
                    let sum = rows
                        .iter()
                        .find(|(v, _)| *v == version)
                        .map(|(_, sum)| sum.as_slice())
                        .unwrap_or_default();
                    if !recorded.iter().any(|(v, _)| *v == version) {
                        $crate::sqlx::query($adopt)
                            .bind(version)
                            .bind(sum)
                            .execute(&mut *tx)
                            .await
                            .map_err($err("adopt custody's rows of _sqlx_migrations"))?;
                        report.adopted += 1;
                    }
                    $crate::sqlx::query($crate::migrate::FORGET_LEGACY)
                        .bind(version)
                        .bind(sum)
                        .execute(&mut *tx)
                        .await
                        .map_err($err("adopt custody's rows of _sqlx_migrations"))?;
                }
            }
            tx.commit().await.map_err($err(OP))?;

            let ups: Vec<&$crate::sqlx::migrate::Migration> =
                $crate::migrate::ups(migrator).collect();
            for m in ups {
                let done = if m.no_tx {
                    apply_migration(conn, m, false).await?
                } else {
                    let mut tx = conn.begin_with($begin).await.map_err($err(OP))?;
                    let done = apply_migration(&mut tx, m, true).await?;
                    tx.commit().await.map_err($err(OP))?;
                    done
                };
                if done {
                    report.applied.push($crate::migrate::applied(m));
                } else {
                    report.already += 1;
                }
            }
            Ok(report)
        }

        /// Apply `m` unless it is recorded; whether it was applied.
        async fn apply_migration(
            conn: &mut $conn,
            m: &$crate::sqlx::migrate::Migration,
            in_transaction: bool,
        ) -> $crate::custody_core::Result<bool> {
            const OP: &str = "migrate";
            let recorded: Option<Vec<u8>> =
                $crate::sqlx::query_scalar($crate::migrate::RECORDED_ONE)
                    .bind(m.version)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err($err(OP))?;
            if $crate::migrate::already(m, recorded.as_deref())? {
                return Ok(false);
            }
            let started = ::std::time::Instant::now();
            // through `Executor::execute`: `RawSql::execute`'s own future
            // trips the same inference
            $crate::sqlx::Executor::execute(&mut *conn, $crate::sqlx::raw_sql(&m.sql))
                .await
                .map_err(|source| {
                    $crate::custody_core::Error::store(
                        $backend,
                        OP,
                        $retryable(&source),
                        $crate::migrate::Failed {
                            version: m.version,
                            description: m.description.to_string(),
                            in_transaction,
                            source,
                        },
                    )
                })?;
            let took = i64::try_from(started.elapsed().as_nanos()).unwrap_or(i64::MAX);
            $crate::sqlx::query($crate::migrate::RECORD)
                .bind(m.version)
                .bind(m.description.as_ref())
                .bind(m.checksum.as_ref())
                .bind(took)
                .execute(&mut *conn)
                .await
                .map_err($err("record migration"))?;
            Ok(true)
        }
    };
}

/// [`custody_core::ConsumerLeaseStore`] for an inbox type with a `pool()`
/// and a transaction `Tx` that derefs to a connection.
///
/// - `backend`: the name in [`custody_core::LeaseLost`] errors;
/// - `err`: as in [`checks_impl!`];
/// - `check`: the fence statement (`$1` consumer → `(holder, epoch)`), whose
///   locking is the backend's;
/// - `at`: a time as the backend stores it;
/// - `expiry`: `fn(now, ttl)`, the end of a lease as the backend stores it.
#[macro_export]
macro_rules! lease_impl {
    (
        inbox: $inbox:ty,
        backend: $backend:literal,
        err: $err:path,
        check: $check:expr,
        at: $at:path,
        expiry: $expiry:path $(,)?
    ) => {
        impl $crate::custody_core::ConsumerLeaseStore for $inbox {
            async fn acquire_consumer_lease(
                &self,
                consumer: &str,
                holder: &str,
                ttl: ::std::time::Duration,
                now: $crate::chrono::DateTime<$crate::chrono::Utc>,
            ) -> $crate::custody_core::Result<Option<$crate::custody_core::ConsumerLease>> {
                let epoch: Option<i64> = $crate::sqlx::query_scalar($crate::lease::ACQUIRE)
                    .bind(consumer)
                    .bind(holder)
                    .bind($expiry(now, ttl))
                    .bind($at(now))
                    .fetch_optional(self.pool())
                    .await
                    .map_err($err("acquire consumer lease"))?;
                Ok(epoch.map(|epoch| $crate::custody_core::ConsumerLease {
                    consumer: consumer.to_owned(),
                    holder: holder.to_owned(),
                    epoch,
                }))
            }

            async fn renew_consumer_lease(
                &self,
                lease: &$crate::custody_core::ConsumerLease,
                ttl: ::std::time::Duration,
                now: $crate::chrono::DateTime<$crate::chrono::Utc>,
            ) -> $crate::custody_core::Result<bool> {
                let done = $crate::sqlx::query($crate::lease::RENEW)
                    .bind(&lease.consumer)
                    .bind(&lease.holder)
                    .bind(lease.epoch)
                    .bind($expiry(now, ttl))
                    .execute(self.pool())
                    .await
                    .map_err($err("renew consumer lease"))?;
                Ok(done.rows_affected() == 1)
            }

            async fn release_consumer_lease(
                &self,
                lease: &$crate::custody_core::ConsumerLease,
            ) -> $crate::custody_core::Result<()> {
                $crate::sqlx::query($crate::lease::RELEASE)
                    .bind(&lease.consumer)
                    .bind(&lease.holder)
                    .bind(lease.epoch)
                    .execute(self.pool())
                    .await
                    .map_err($err("release consumer lease"))?;
                Ok(())
            }

            async fn check_consumer_lease(
                &self,
                tx: &mut Self::Tx,
                lease: &$crate::custody_core::ConsumerLease,
            ) -> $crate::custody_core::Result<()> {
                let row: Option<(Option<String>, i64)> = $crate::sqlx::query_as($check)
                    .bind(&lease.consumer)
                    .fetch_optional(&mut **tx)
                    .await
                    .map_err($err("check consumer lease"))?;
                $crate::custody_core::LeaseLost::check($backend, lease, row)
            }
        }
    };
}

/// The operations port: struct `admin` (over a pool, with the backend's
/// outbox and inbox for the history reads), its `new`, its
/// [`custody_core::Admin`] impl, the driver's `open` and `migrate_url`, and
/// `dead_letters`.
///
/// The expanding crate provides at its root: `connect`, `open_existing`,
/// `migrate` ([`crate::migrate_impl!`]), `dead_letter_rows`, `redrive`, `purge`, `status`,
/// `checkpoint`, `rewind_checkpoint` and the [`checks_impl!`] functions.
// `crate::` on purpose: the expanding backend's functions, not custody-sql's.
#[allow(clippy::crate_in_macro_def)]
#[macro_export]
macro_rules! admin_impl {
    (
        $(#[$meta:meta])*
        pub struct $admin:ident;
        pool: $pool:ty,
        outbox: $outbox:ident,
        inbox: $inbox:ident,
        driver: $driver:path $(,)?
    ) => {
        fn open(
            url: &str,
            access: $crate::custody_core::admin::Access,
        ) -> $crate::custody_core::admin::BoxFuture<
            '_,
            $crate::custody_core::Result<Box<dyn $crate::custody_core::admin::Admin>>,
        > {
            Box::pin(async move {
                let pool = match access {
                    $crate::custody_core::admin::Access::Existing => {
                        crate::open_existing(url).await?
                    }
                    $crate::custody_core::admin::Access::Migrate => {
                        let pool = crate::connect(url).await?;
                        crate::migrate(&pool).await?;
                        pool
                    }
                };
                Ok(Box::new($admin::new(pool)) as Box<dyn $crate::custody_core::admin::Admin>)
            })
        }

        /// The driver's `migrate`: connect to `url` and apply custody's
        /// migrations ([`crate::migrate`]).
        fn migrate_url(
            url: &str,
        ) -> $crate::custody_core::admin::BoxFuture<
            '_,
            $crate::custody_core::Result<$crate::custody_core::admin::MigrationReport>,
        > {
            Box::pin(async move {
                let pool = crate::connect(url).await?;
                let report = crate::migrate(&pool).await;
                pool.close().await;
                report
            })
        }

        /// Every dead letter in this database (relay's and consumers'),
        /// oldest first. [`crate::dead_letter_rows`] without the sequence
        /// numbers.
        pub async fn dead_letters(
            pool: &$pool,
        ) -> $crate::custody_core::Result<Vec<$crate::custody_core::DeadLetter>> {
            let rows = crate::dead_letter_rows(pool).await?;
            Ok(rows.into_iter().map(|(_, dead)| dead).collect())
        }

        $(#[$meta])*
        pub struct $admin {
            pool: $pool,
            outbox: $outbox,
            inbox: $inbox,
        }

        impl $admin {
            /// Operations over the custody tables in `pool`'s database.
            pub fn new(pool: $pool) -> Self {
                $admin {
                    outbox: $outbox::new(pool.clone()),
                    inbox: $inbox::new(pool.clone()),
                    pool,
                }
            }
        }

        impl $crate::custody_core::admin::Admin for $admin {
            fn backend(&self) -> &'static str {
                $driver.name
            }
            fn dead_letters(
                &self,
            ) -> $crate::custody_core::admin::BoxFuture<
                '_,
                $crate::custody_core::Result<Vec<$crate::custody_core::admin::NumberedDeadLetter>>,
            > {
                Box::pin(crate::dead_letter_rows(&self.pool))
            }
            fn redrive<'a>(
                &'a self,
                seqs: &'a [i64],
                now: $crate::chrono::DateTime<$crate::chrono::Utc>,
            ) -> $crate::custody_core::admin::BoxFuture<
                'a,
                $crate::custody_core::Result<$crate::custody_core::RedriveOutcome>,
            > {
                Box::pin(crate::redrive(&self.pool, seqs, now))
            }
            fn purge<'a>(
                &'a self,
                seqs: &'a [i64],
            ) -> $crate::custody_core::admin::BoxFuture<'a, $crate::custody_core::Result<u64>> {
                Box::pin(crate::purge(&self.pool, seqs))
            }
            fn status(
                &self,
                id: $crate::uuid::Uuid,
            ) -> $crate::custody_core::admin::BoxFuture<
                '_,
                $crate::custody_core::Result<$crate::custody_core::MessageStatus>,
            > {
                Box::pin(crate::status(&self.pool, id))
            }
            fn checkpoint<'a>(
                &'a self,
                subscription: &'a str,
            ) -> $crate::custody_core::admin::BoxFuture<'a, $crate::custody_core::Result<Option<i64>>>
            {
                Box::pin(crate::checkpoint(&self.pool, subscription))
            }
            fn rewind_checkpoint<'a>(
                &'a self,
                subscription: &'a str,
                ids: &'a [$crate::uuid::Uuid],
            ) -> $crate::custody_core::admin::BoxFuture<'a, $crate::custody_core::Result<Option<i64>>>
            {
                Box::pin(crate::rewind_checkpoint(&self.pool, subscription, ids))
            }
            fn topic_seen<'a>(
                &'a self,
                topic: &'a str,
            ) -> $crate::custody_core::admin::BoxFuture<'a, $crate::custody_core::Result<bool>> {
                Box::pin(crate::topic_seen(&self.pool, topic))
            }
            fn consumer_seen<'a>(
                &'a self,
                name: &'a str,
            ) -> $crate::custody_core::admin::BoxFuture<'a, $crate::custody_core::Result<bool>> {
                Box::pin(crate::consumer_seen(&self.pool, name))
            }
            fn topics(
                &self,
                limit: u32,
            ) -> $crate::custody_core::admin::BoxFuture<'_, $crate::custody_core::Result<Vec<String>>>
            {
                Box::pin(crate::topics(&self.pool, limit))
            }
            fn consumers(
                &self,
                limit: u32,
            ) -> $crate::custody_core::admin::BoxFuture<'_, $crate::custody_core::Result<Vec<String>>>
            {
                Box::pin(crate::consumers(&self.pool, limit))
            }
            fn accept_gap<'a>(
                &'a self,
                consumer: &'a str,
                gap: &'a $crate::custody_core::GapAcceptance,
                now: $crate::chrono::DateTime<$crate::chrono::Utc>,
            ) -> $crate::custody_core::admin::BoxFuture<
                'a,
                $crate::custody_core::Result<$crate::custody_core::AcceptedGap>,
            > {
                Box::pin($crate::custody_core::InboxStore::accept_gap(
                    &self.inbox,
                    consumer,
                    gap,
                    now,
                ))
            }
            fn sent(&self) -> &dyn $crate::custody_core::DynSentHistory {
                &self.outbox
            }
            fn processed(&self) -> &dyn $crate::custody_core::DynProcessedHistory {
                &self.inbox
            }
        }
    };
}

/// The history reads whose SQL is the same on every backend
/// ([`crate::history`]), over a backend's own column types: `status`,
/// `dead_letter_rows`, `redrive`, `purge` and `rewind_checkpoint` (over the backend's `rewind(pool,
/// subscription, ids)`), and the backend's
/// [`custody_core::SentHistory`] and [`custody_core::ProcessedHistory`]
/// impls, given with only the methods whose SQL is the backend's own; the
/// macro adds `sent_dead`, `sequence_heads`, `processed_dead`, `redriving`,
/// `sequence_progress` and `numbers_above_floor`.
///
/// - `err`: as in [`checks_impl!`];
/// - `id`: how an id is stored (`Uuid`, hyphenated `String`) and a
///   `fn(stored) -> Option<Uuid>` (an unreadable id is left out);
///   `bind_id`: `fn(&Uuid) -> stored`;
/// - `time`: how a time is stored and a `fn(stored) -> DateTime<Utc>`;
/// - `count`: the integer type of attempts, duplicates and republish counts;
///   `status`: of the outbox status code; `partition`: of a partition;
/// - `at`: `fn(DateTime<Utc>) -> stored`, a time as the backend writes it;
/// - `purge`: the statement deleting dead letters `$1` (a list, as
///   `seq_list`, `fn(&[i64]) -> bindable`, makes it);
/// - `redrive`: the backend's part of redriving one dead letter: `begin` its
///   transaction, read the `dead_letter` `$1` (message_id, origin, topic,
///   envelope) in it, `mark_inbox(tx, consumer, stored id)` so the message
///   passes the consumer's inbox once, `reset_relay(tx, id) -> bool` put a
///   relay dead letter's outbox row back to pending (`false`: it is gone).
///   The locking that makes two concurrent redrives queue a letter once is
///   the backend's (`begin`, `dead_letter`);
/// - `outbox_row`: message `$1`'s outbox row as `status` reads it (topic,
///   message_type, msg_key, position, created_at, enqueued_at, status,
///   attempts, retry_at, last_error, published_at, publish_ref, republish,
///   seq), which differs in where an in-flight row's number is kept.
#[macro_export]
macro_rules! history_impl {
    (
        pool: $pool:ty,
        err: $err:path,
        id: $Id:ty => $uuid:path,
        bind_id: $bind_id:path,
        time: $Time:ty => $time:path,
        count: $Count:ty,
        status: $Status:ty,
        partition: $Part:ty,
        at: $at:path,
        purge: $purge:expr => $seq_list:path,
        redrive: {
            begin: $begin:path,
            dead_letter: $dead_letter:expr,
            mark_inbox: $mark_inbox:path,
            reset_relay: $reset_relay:path $(,)?
        },
        outbox_row: $outbox_row:expr $(,)?;
        impl SentHistory for $outbox:ty { $($sent:tt)* }
        impl ProcessedHistory for $inbox:ty { $($processed:tt)* }
    ) => {
        impl $crate::custody_core::SentHistory for $outbox {
            async fn sent_dead(
                &self,
                topic: &str,
                range: $crate::custody_core::IdRange,
            ) -> $crate::custody_core::Result<Vec<($crate::uuid::Uuid, String)>> {
                read_dead(self.pool(), topic, range, None).await
            }

            async fn sequence_heads(
                &self,
            ) -> $crate::custody_core::Result<
                Option<(String, Vec<$crate::custody_core::SequenceHead>)>,
            > {
                // The stored id, read only (OutboxStore::producer_id may
                // renew it after a restore or for a copied file, and a check
                // never writes to what it checks): the id the published
                // numbers were given under.
                let producer: Option<String> =
                    $crate::sqlx::query_scalar($crate::history::PRODUCER)
                        .fetch_optional(self.pool())
                        .await
                        .map_err($err("read producer id"))?;
                let Some(producer) = producer else {
                    return Ok(None);
                };
                let rows: Vec<(String, $Part, i64)> =
                    $crate::sqlx::query_as($crate::history::SEQUENCE_HEADS)
                        .fetch_all(self.pool())
                        .await
                        .map_err($err("read sequence heads"))?;
                let heads = rows
                    .into_iter()
                    .filter_map(|(topic, partition, last)| {
                        Some($crate::custody_core::SequenceHead {
                            topic,
                            // not a partition or number custody wrote: skip it
                            partition: u32::try_from(partition).ok()?,
                            last: u64::try_from(last).ok()?,
                        })
                    })
                    .collect();
                Ok(Some((producer, heads)))
            }

            $($sent)*
        }

        impl $crate::custody_core::ProcessedHistory for $inbox {
            async fn processed_dead(
                &self,
                consumer: &str,
                topic: &str,
                range: $crate::custody_core::IdRange,
            ) -> $crate::custody_core::Result<Vec<($crate::uuid::Uuid, String)>> {
                read_dead(self.pool(), topic, range, Some(consumer)).await
            }

            async fn redriving(
                &self,
                consumer: &str,
                topic: &str,
                range: $crate::custody_core::IdRange,
            ) -> $crate::custody_core::Result<Vec<$crate::uuid::Uuid>> {
                read_redriving(self.pool(), consumer, topic, range).await
            }

            async fn sequence_progress(
                &self,
                consumer: &str,
            ) -> $crate::custody_core::Result<Vec<$crate::custody_core::PartitionProgress>> {
                $crate::custody_core::InboxStore::progress(self, consumer).await
            }

            async fn numbers_above_floor(
                &self,
                consumer: &str,
                p: &$crate::custody_core::PartitionProgress,
                limit: usize,
            ) -> $crate::custody_core::Result<
                Vec<(u64, $crate::chrono::DateTime<$crate::chrono::Utc>)>,
            > {
                read_numbers_above_floor(self.pool(), consumer, p, limit).await
            }

            $($processed)*
        }

        /// Everything this database's custody tables know about message
        /// `id`: its outbox row (producer), inbox rows (consumers), dead
        /// letters, redrives.
        pub async fn status(
            pool: &$pool,
            id: $crate::uuid::Uuid,
        ) -> $crate::custody_core::Result<$crate::custody_core::MessageStatus> {
            use $crate::custody_core::{ConsumerSide, DeadLetterInfo, ProducerSide, RedriveInfo};
            use $crate::sqlx::Row as _;
            const OP: &str = "read message status";
            type Decoded<T> = ::std::result::Result<T, $crate::sqlx::Error>;
            let key = $bind_id(&id);
            let mut st = $crate::custody_core::MessageStatus::new(id);
            let row = $crate::sqlx::query($outbox_row)
                .bind(&key)
                .fetch_optional(pool)
                .await
                .map_err($err(OP))?;
            if let Some(r) = row {
                let read = || -> Decoded<ProducerSide> {
                    Ok(ProducerSide {
                        topic: r.try_get("topic")?,
                        message_type: r.try_get("message_type")?,
                        key: r.try_get("msg_key")?,
                        position: r.try_get("position")?,
                        created_at: $time(r.try_get::<$Time, _>("created_at")?),
                        enqueued_at: $time(r.try_get::<$Time, _>("enqueued_at")?),
                        status: $crate::custody_core::admin::outbox_status_name(i64::from(
                            r.try_get::<$Status, _>("status")?,
                        ))
                        .to_owned(),
                        attempts: u32::try_from(r.try_get::<$Count, _>("attempts")?).unwrap_or(0),
                        retry_at: r.try_get::<Option<$Time>, _>("retry_at")?.map($time),
                        last_error: r.try_get("last_error")?,
                        published_at: r.try_get::<Option<$Time>, _>("published_at")?.map($time),
                        publish_ref: r.try_get("publish_ref")?,
                        republished: u32::try_from(r.try_get::<$Count, _>("republish")?)
                            .unwrap_or(0),
                        sequence: r
                            .try_get::<Option<i64>, _>("seq")?
                            .and_then(|s| u64::try_from(s).ok()),
                    })
                };
                st.producer = Some(read().map_err($err(OP))?);
            }
            let dead = $crate::sqlx::query($crate::history::DEAD_OF)
                .bind(&key)
                .fetch_all(pool)
                .await
                .map_err($err(OP))?;
            st.dead = dead
                .iter()
                .map(|r| -> Decoded<DeadLetterInfo> {
                    Ok(DeadLetterInfo {
                        origin: r.try_get("origin")?,
                        error: r.try_get("error")?,
                        attempts: u32::try_from(r.try_get::<$Count, _>("attempts")?).unwrap_or(0),
                        dead_at: $time(r.try_get::<$Time, _>("dead_at")?),
                    })
                })
                .collect::<Decoded<_>>()
                .map_err($err(OP))?;
            let inbox = $crate::sqlx::query($crate::history::INBOX_OF)
                .bind(&key)
                .fetch_all(pool)
                .await
                .map_err($err(OP))?;
            st.consumers = inbox
                .iter()
                .map(|r| -> Decoded<ConsumerSide> {
                    let consumer: String = r.try_get("consumer")?;
                    Ok(ConsumerSide {
                        dead: $crate::custody_core::admin::dead_at_consumer(&st.dead, &consumer),
                        consumer,
                        processed_at: $time(r.try_get::<$Time, _>("processed_at")?),
                        duplicates: u32::try_from(r.try_get::<$Count, _>("duplicates")?)
                            .unwrap_or(0),
                    })
                })
                .collect::<Decoded<_>>()
                .map_err($err(OP))?;
            let redrives = $crate::sqlx::query($crate::history::REDRIVES_OF)
                .bind(&key)
                .fetch_all(pool)
                .await
                .map_err($err(OP))?;
            st.redriving = redrives
                .iter()
                .map(|r| -> Decoded<RedriveInfo> {
                    Ok(RedriveInfo {
                        consumer: r.try_get("consumer")?,
                        redriven_at: $time(r.try_get::<$Time, _>("redriven_at")?),
                    })
                })
                .collect::<Decoded<_>>()
                .map_err($err(OP))?;
            Ok(st)
        }

        /// Every dead letter with its sequence number (the handle of
        /// `redrive` and `purge`), oldest first.
        pub async fn dead_letter_rows(
            pool: &$pool,
        ) -> $crate::custody_core::Result<Vec<(i64, $crate::custody_core::DeadLetter)>> {
            use $crate::sqlx::Row as _;
            const OP: &str = "list dead letters";
            let rows = $crate::sqlx::query($crate::history::DEAD_LETTER_ROWS)
                .fetch_all(pool)
                .await
                .map_err($err(OP))?;
            rows.iter()
                .map(|row| {
                    let message_id: Option<$Id> = row.try_get("message_id")?;
                    let attempts: $Count = row.try_get("attempts")?;
                    Ok((
                        row.try_get("seq")?,
                        $crate::custody_core::DeadLetter {
                            message_id: message_id.and_then($uuid),
                            origin: row.try_get("origin")?,
                            topic: row.try_get("topic")?,
                            key: row.try_get("msg_key")?,
                            message_type: row.try_get("message_type")?,
                            payload: row.try_get("payload")?,
                            envelope: row.try_get("envelope")?,
                            error: row.try_get("error")?,
                            attempts: u32::try_from(attempts.max(0)).unwrap_or(u32::MAX),
                            dead_at: $time(row.try_get::<$Time, _>("dead_at")?),
                        },
                    ))
                })
                .collect::<::std::result::Result<Vec<_>, $crate::sqlx::Error>>()
                .map_err($err(OP))
        }

        /// Send dead letters `seqs` back, each in its own transaction, as
        /// [`custody_core::admin::redrive_target`] decides:
        ///
        /// - a consumer's (`consumer:<name>`): its stored envelope goes to
        ///   `custody_redrive`, the dead letter is deleted and the consumer's
        ///   inbox row made to let the message through once (a numbered row
        ///   stays, keeping its number accounted for; see the backend's
        ///   `mark_inbox`);
        ///   the consumer engine processes it once through the inbox;
        /// - the relay's: the outbox row goes back to pending (attempts 0,
        ///   marked as a republish, its sequence number cleared: the skip
        ///   marker accounted for it) and the dead letter is deleted.
        ///
        /// A dead letter without an envelope (a malformed message) or whose
        /// outbox row was pruned is skipped, with the reason.
        pub async fn redrive(
            pool: &$pool,
            seqs: &[i64],
            now: $crate::chrono::DateTime<$crate::chrono::Utc>,
        ) -> $crate::custody_core::Result<$crate::custody_core::RedriveOutcome> {
            let mut out = $crate::custody_core::RedriveOutcome::default();
            for &seq in seqs {
                out.add(seq, redrive_one(pool, seq, now).await?);
            }
            Ok(out)
        }

        async fn redrive_one(
            pool: &$pool,
            seq: i64,
            now: $crate::chrono::DateTime<$crate::chrono::Utc>,
        ) -> $crate::custody_core::Result<$crate::custody_core::admin::RedriveStep> {
            use $crate::custody_core::admin::{RedriveStep, RedriveTarget};
            use $crate::sqlx::Row as _;
            const OP: &str = "redrive dead letter";
            let mut tx = $begin(pool).await?;
            let row = $crate::sqlx::query($dead_letter)
                .bind(seq)
                .fetch_optional(&mut *tx)
                .await
                .map_err($err(OP))?;
            let Some(row) = row else {
                return Ok(RedriveStep::Skipped($crate::custody_core::admin::SKIP_NO_SUCH));
            };
            let id: Option<$Id> = row.try_get("message_id").map_err($err(OP))?;
            let origin: String = row.try_get("origin").map_err($err(OP))?;
            let topic: String = row.try_get("topic").map_err($err(OP))?;
            let envelope: Option<String> = row.try_get("envelope").map_err($err(OP))?;
            let id = id.and_then($uuid);
            let target =
                $crate::custody_core::admin::redrive_target(&origin, id, envelope.as_deref());
            let step = match target {
                RedriveTarget::Skip(why) => return Ok(RedriveStep::Skipped(why)),
                RedriveTarget::Consumer {
                    consumer,
                    id,
                    envelope,
                } => {
                    let id = $bind_id(&id);
                    $crate::sqlx::query($crate::history::QUEUE_REDRIVE)
                        .bind(consumer)
                        .bind(&id)
                        .bind(&topic)
                        .bind(envelope)
                        .bind($at(now))
                        .execute(&mut *tx)
                        .await
                        .map_err($err(OP))?;
                    $mark_inbox(&mut tx, consumer, &id).await?;
                    RedriveStep::ToConsumer
                }
                RedriveTarget::Relay { id } => {
                    if !$reset_relay(&mut tx, id).await? {
                        return Ok(RedriveStep::Skipped(
                            $crate::custody_core::admin::SKIP_OUTBOX_ROW_GONE,
                        ));
                    }
                    RedriveStep::ToRelay
                }
            };
            $crate::sqlx::query($crate::history::DELETE_DEAD_LETTER)
                .bind(seq)
                .execute(&mut *tx)
                .await
                .map_err($err(OP))?;
            tx.commit().await.map_err($err(OP))?;
            Ok(step)
        }

        /// Delete dead letters `seqs`. A consumer's inbox row stays, so a
        /// late redelivery of the message is still skipped. Returns how many
        /// were deleted.
        pub async fn purge(pool: &$pool, seqs: &[i64]) -> $crate::custody_core::Result<u64> {
            let done = $crate::sqlx::query($purge)
                .bind($seq_list(seqs))
                .execute(pool)
                .await
                .map_err($err("purge dead letters"))?;
            Ok(done.rows_affected())
        }

        /// Repair for the embedded transport: move `subscription`'s
        /// checkpoint back to just before the earliest outbox row of `ids`
        /// in the readers' order, so the reader delivers them again (its
        /// consumer's inbox skips the ones it has). Never moves it forward.
        /// Returns the new checkpoint position, or `None` when nothing
        /// needed rewinding. Stop the consumer first: a running reader keeps
        /// its in-memory cursor and its next acknowledgement moves the
        /// checkpoint past the rewind again.
        pub async fn rewind_checkpoint(
            pool: &$pool,
            subscription: &str,
            ids: &[$crate::uuid::Uuid],
        ) -> $crate::custody_core::Result<Option<i64>> {
            rewind(pool, subscription, ids).await
        }

        /// Dead rows (id, error) with ids in `range` of `topic`: the
        /// outbox's ([`SENT_DEAD`]) or, with `consumer`, that consumer's
        /// dead letters ([`PROCESSED_DEAD`]).
        ///
        /// [`SENT_DEAD`]: $crate::history::SENT_DEAD
        /// [`PROCESSED_DEAD`]: $crate::history::PROCESSED_DEAD
        async fn read_dead(
            pool: &$pool,
            topic: &str,
            range: $crate::custody_core::IdRange,
            consumer: Option<&str>,
        ) -> $crate::custody_core::Result<Vec<($crate::uuid::Uuid, String)>> {
            let (sql, op) = match consumer {
                None => ($crate::history::SENT_DEAD, "read dead outbox rows"),
                Some(_) => ($crate::history::PROCESSED_DEAD, "read consumer dead letters"),
            };
            let mut query = $crate::sqlx::query_as::<_, ($Id, String)>(sql)
                .bind($bind_id(&range.from))
                .bind($bind_id(&range.to))
                .bind(topic);
            if let Some(consumer) = consumer {
                query = query.bind(consumer);
            }
            let rows = query.fetch_all(pool).await.map_err($err(op))?;
            Ok(rows
                .into_iter()
                .filter_map(|(id, e)| $uuid(id).map(|id| (id, e)))
                .collect())
        }

        /// `ProcessedHistory::redriving`.
        async fn read_redriving(
            pool: &$pool,
            consumer: &str,
            topic: &str,
            range: $crate::custody_core::IdRange,
        ) -> $crate::custody_core::Result<Vec<$crate::uuid::Uuid>> {
            let rows: Vec<$Id> = $crate::sqlx::query_scalar($crate::history::REDRIVING)
                .bind(consumer)
                .bind(topic)
                .bind($bind_id(&range.from))
                .bind($bind_id(&range.to))
                .fetch_all(pool)
                .await
                .map_err($err("read redrive queue"))?;
            Ok(rows.into_iter().filter_map($uuid).collect())
        }

        /// `ProcessedHistory::numbers_above_floor`.
        async fn read_numbers_above_floor(
            pool: &$pool,
            consumer: &str,
            p: &$crate::custody_core::PartitionProgress,
            limit: usize,
        ) -> $crate::custody_core::Result<
            Vec<(u64, $crate::chrono::DateTime<$crate::chrono::Utc>)>,
        > {
            let rows: Vec<(i64, $Time)> =
                $crate::sqlx::query_as($crate::history::NUMBERS_ABOVE_FLOOR)
                    .bind(consumer)
                    .bind(&p.producer)
                    .bind(&p.topic)
                    .bind(<$Part>::try_from(p.partition).unwrap_or(<$Part>::MAX))
                    .bind(i64::try_from(p.floor).unwrap_or(i64::MAX))
                    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                    .fetch_all(pool)
                    .await
                    .map_err($err("read inbox numbers"))?;
            // seq > floor >= 0: every number converts
            Ok(rows
                .into_iter()
                .filter_map(|(seq, at)| Some((u64::try_from(seq).ok()?, $time(at))))
                .collect())
        }
    };
}
