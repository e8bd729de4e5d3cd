//! The demo on embedded SQLite: A's outbox is the log B reads (no broker).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use custody::sqlite::{self, SqliteOutbox};
use custody_scenario::embedded::{
    fresh_db, lock_database, observe, processed, setup, SUBSCRIPTION,
};
use custody_scenario::producer::produce_sqlite;
use custody_scenario::report::Report;
use custody_scenario::{Run, Step, Worker, Workload};
use sqlx::SqlitePool;
use uuid::Uuid;

use crate::DemoArgs;

/// Where the demo keeps its two databases.
struct Dir {
    path: PathBuf,
    remove: bool,
}

impl Drop for Dir {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Run the demo on embedded SQLite; the report and what to print after it.
pub async fn run(args: &DemoArgs, seed: u64) -> anyhow::Result<(Report, String)> {
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            Dir {
                path: d.clone(),
                remove: false,
            }
        }
        None => {
            let p =
                std::env::temp_dir().join(format!("custody-demo-{}-{seed}", std::process::id()));
            std::fs::create_dir_all(&p)?;
            Dir {
                path: p,
                remove: !args.keep,
            }
        }
    };
    let a_path = fresh_db(&dir.path, "orders.db")?;
    let b_path = fresh_db(&dir.path, "billing.db")?;
    let (a, b) = setup(&a_path, &b_path).await?;
    let outbox = SqliteOutbox::new(a.clone());

    eprintln!(
        "custody demo: service A (orders, {a_path}) → embedded log → service B (billing, {b_path}); {} orders over {} customers, seed {seed}",
        args.messages, args.customers
    );
    let worker_args = vec![
        "--role".to_owned(),
        "consume-embedded".to_owned(),
        "--a".to_owned(),
        a_path.clone(),
        "--b".to_owned(),
        b_path.clone(),
    ];
    let mut worker = Worker::spawn(worker_args)?;
    let mut run = Run::new(args.messages);
    let mut workload = Workload::new(seed, args.messages, args.customers);
    let mut rolled_back = Vec::new();
    let mut lock_task = None;

    for i in 0..args.messages {
        // the fault schedule, by how far the producer is
        if i == args.messages / 5 {
            run.fault("service B unavailable: its database is write-locked for 2s (consumer retries with backoff)".into());
            lock_task = Some(tokio::spawn(lock_database(
                b_path.clone(),
                Duration::from_secs(2),
            )));
        }
        if i == args.messages * 9 / 20 {
            worker.kill9().await?;
            let cp = sqlite::checkpoint(&a, SUBSCRIPTION).await?.unwrap_or(0);
            let rewound = (cp - 40).max(0);
            sqlite::set_checkpoint(&a, SUBSCRIPTION, rewound).await?;
            run.fault(format!(
                "consumer killed with SIGKILL mid-batch; checkpoint rewound {cp} → {rewound} so {} messages are delivered twice; restarted",
                cp - rewound
            ));
            worker.restart()?;
        }
        if i == args.messages * 7 / 10 {
            worker.kill9().await?;
            run.fault(
                "consumer killed with SIGKILL mid-batch; down for 1s while A keeps committing"
                    .into(),
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
            worker.restart()?;
        }
        produce(&a, &outbox, &workload.step(i)?, &mut rolled_back).await?;
        if i % 50 == 0 {
            worker.check_alive()?;
            run.bar.set_position(processed(&b).await.unwrap_or(0));
        }
    }
    if let Some(t) = lock_task {
        t.await??;
    }
    let expected: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM custody_outbox WHERE topic = 'orders'")
            .fetch_one(&a)
            .await?;
    let elapsed = run
        .drain(&mut [&mut worker], expected as u64, args.timeout, || {
            processed(&b)
        })
        .await?;
    let obs = observe(&a, &b).await?;
    a.close().await;
    b.close().await;
    let report = Report::compute(
        "embedded SQLite, consumer reading A's outbox as the log".into(),
        seed,
        run.faults,
        &rolled_back,
        &obs,
        elapsed,
    );
    let epilogue = if dir.remove {
        crate::epilogue(
            None,
            &format!("the SQLite directory {}", dir.path.display()),
        )
    } else {
        crate::epilogue(
            Some(crate::Kept {
                places: vec![
                    ("SQLite directory", dir.path.display().to_string()),
                    ("A (orders)", a_path.clone()),
                    ("B (billing)", b_path.clone()),
                ],
                a: a_path.clone(),
                b: b_path.clone(),
                example_id: report.dead_lettered.iter().find_map(|d| d.message_id),
                password_left_out: false,
                cleanup: vec![format!("rm -r {}", dir.path.display())],
            }),
            "",
        )
    };
    Ok((report, epilogue))
}

/// One producer transaction, retried up to five times (e.g. on a busy
/// database).
async fn produce(
    a: &SqlitePool,
    outbox: &SqliteOutbox,
    step: &Step,
    rolled_back: &mut Vec<Uuid>,
) -> anyhow::Result<()> {
    let mut tries = 0;
    loop {
        tries += 1;
        let result = produce_sqlite(a, outbox, step, |id| {
            rolled_back.push(id);
            Ok(())
        })
        .await;
        match result {
            Ok(()) => return Ok(()),
            Err(e) if tries < 5 => {
                tracing::warn!(error = %e, "producer transaction failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}
