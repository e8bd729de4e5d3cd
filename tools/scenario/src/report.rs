//! The report of a demo or chaos run, computed only from what A's and B's databases hold.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::Serialize;
use uuid::Uuid;

/// What the two databases hold at the end of a run.
#[derive(Debug, Default)]
pub struct Observed {
    /// Every message A committed to its outbox on topic `orders`: (id, type).
    pub a_outbox: Vec<(Uuid, String)>,
    /// A's committed orders: (order id, customer, seq within customer).
    pub a_orders: Vec<(Uuid, String, i64)>,
    /// B's ledger in insertion order: (order id, customer, seq).
    pub b_ledger: Vec<(Uuid, String, i64)>,
    /// B's inbox for the billing consumer: (message id, duplicates seen).
    pub b_inbox: Vec<(Uuid, i64)>,
    /// B's dead letters: (message id, reason).
    pub b_dead: Vec<(Option<Uuid>, String)>,
    /// InvoiceIssued events B derived into its own outbox (same transaction as the ledger).
    pub b_invoices: u64,
    /// B's sequence progress (relayed transports number messages):
    /// (numbered producer partitions, missing numbers below the highest seen).
    pub b_sequences: Option<(u64, u64)>,
}

/// One dead letter in the report.
#[derive(Debug, Serialize)]
pub struct DeadEntry {
    /// The dead letter's message id, if it had one.
    pub message_id: Option<Uuid>,
    /// Why it was dead-lettered.
    pub reason: String,
}

/// The demo's verdict.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The backends and transport of the run.
    pub mode: String,
    /// The seed of the workload and the fault schedule.
    pub seed: u64,
    /// The faults injected, in order.
    pub faults: Vec<String>,
    /// Messages committed in A's outbox (topic `orders`).
    pub sent: u64,
    /// Orders A committed.
    pub orders_committed: u64,
    /// Transactions A rolled back (B must never see them).
    pub rolled_back: u64,
    /// Messages B settled in its inbox.
    pub processed: u64,
    /// Redeliveries B's inbox recognised and did not apply again.
    pub duplicates_suppressed: u64,
    /// What B dead-lettered, and why.
    pub dead_lettered: Vec<DeadEntry>,
    /// InvoiceIssued events B derived into its own outbox.
    pub invoices_derived: u64,
    /// Messages A committed that B neither processed nor dead-lettered.
    pub lost: u64,
    /// Their ids.
    pub lost_ids: Vec<Uuid>,
    /// Ledger entries for orders A never committed.
    pub phantoms: u64,
    /// Orders B applied more than once.
    pub duplicate_effects: u64,
    /// Ledger entries out of A's order within a customer.
    pub order_violations: u64,
    /// Numbered partitions B saw and the gaps left in their numbering
    /// (missing numbers below the highest seen); none on the embedded transport.
    pub sequence_partitions: Option<u64>,
    /// See `sequence_partitions`.
    pub sequence_gaps: Option<u64>,
    /// Wall time of the run.
    pub elapsed_secs: f64,
    /// Messages settled per second.
    pub messages_per_sec: f64,
}

impl Report {
    /// Compare the databases.
    pub fn compute(
        mode: String,
        seed: u64,
        faults: Vec<String>,
        rolled_back: &[Uuid],
        obs: &Observed,
        elapsed: Duration,
    ) -> Report {
        let inbox: HashSet<Uuid> = obs.b_inbox.iter().map(|(id, _)| *id).collect();
        let dead: HashSet<Uuid> = obs.b_dead.iter().filter_map(|(id, _)| *id).collect();
        // lost: A committed it, and B neither processed nor dead-lettered it
        let lost_ids: Vec<Uuid> = obs
            .a_outbox
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !inbox.contains(id) && !dead.contains(id))
            .collect();
        let a_orders: HashSet<Uuid> = obs.a_orders.iter().map(|(id, _, _)| *id).collect();
        let rolled: HashSet<Uuid> = rolled_back.iter().copied().collect();
        let phantoms = obs
            .b_ledger
            .iter()
            .filter(|(id, _, _)| !a_orders.contains(id) || rolled.contains(id))
            .count() as u64;
        let distinct: HashSet<Uuid> = obs.b_ledger.iter().map(|(id, _, _)| *id).collect();
        let duplicate_effects = (obs.b_ledger.len() - distinct.len()) as u64;
        // order: per customer, seq must increase along the ledger
        let mut last: HashMap<&str, i64> = HashMap::new();
        let mut order_violations = 0u64;
        for (_, customer, seq) in &obs.b_ledger {
            let prev = last.entry(customer.as_str()).or_insert(0);
            if *seq <= *prev {
                order_violations += 1;
            }
            *prev = (*prev).max(*seq);
        }
        // an order whose event was never applied (and not dead-lettered) is lost too
        let missing_orders = obs
            .a_orders
            .iter()
            .filter(|(id, _, _)| !distinct.contains(id))
            .count() as u64;
        let lost = (lost_ids.len() as u64).max(missing_orders);
        let secs = elapsed.as_secs_f64().max(1e-9);
        Report {
            mode,
            seed,
            faults,
            sent: obs.a_outbox.len() as u64,
            orders_committed: obs.a_orders.len() as u64,
            rolled_back: rolled_back.len() as u64,
            processed: distinct.len() as u64,
            duplicates_suppressed: obs.b_inbox.iter().map(|(_, d)| *d as u64).sum(),
            dead_lettered: obs
                .b_dead
                .iter()
                .map(|(id, r)| DeadEntry {
                    message_id: *id,
                    reason: r.clone(),
                })
                .collect(),
            invoices_derived: obs.b_invoices,
            lost,
            lost_ids,
            phantoms,
            duplicate_effects,
            order_violations,
            sequence_partitions: obs.b_sequences.map(|(p, _)| p),
            sequence_gaps: obs.b_sequences.map(|(_, g)| g),
            elapsed_secs: secs,
            messages_per_sec: obs.a_outbox.len() as f64 / secs,
        }
    }

    /// Every invariant held.
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.phantoms == 0
            && self.duplicate_effects == 0
            && self.order_violations == 0
            && self.sequence_gaps.unwrap_or(0) == 0
            && self.invoices_derived == self.processed
    }

    /// Print for people, under the heading of the tool that ran
    /// (`custody demo`, `custody chaos`), with the verdict line.
    pub fn print(&self, tool: &str) {
        print!("{}", self.render(tool));
    }

    /// The report for people under `tool`'s heading, ending with the
    /// verdict line (`RESULT: OK …` or `RESULT: FAILED …`).
    pub fn render(&self, tool: &str) -> String {
        let mut out = self.render_without_verdict(tool);
        if self.ok() {
            out.push_str("RESULT: OK — nothing lost, nothing applied twice, no phantom, order kept per customer\n");
        } else {
            out.push_str("RESULT: FAILED — an invariant broke (see above); this is a bug, please report it with the seed\n");
        }
        out
    }

    /// The report for people under `tool`'s heading, without the verdict
    /// (for a tool that adds its own checks and verdict, like chaos).
    pub fn render_without_verdict(&self, tool: &str) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        // writing to a String cannot fail
        let mut line = |text: String| {
            let _ = writeln!(out, "{text}");
        };
        line(String::new());
        line(format!("{tool} — {} (seed {})", self.mode, self.seed));
        line("faults injected:".into());
        for f in &self.faults {
            line(format!("  {f}"));
        }
        line("report (computed by comparing service A's and service B's databases):".into());
        let kv = |k: &str, v: u64| (k.to_owned(), v.to_string());
        let mut rows: Vec<(String, String)> = vec![
            kv("sent (messages committed in A's outbox)", self.sent),
            kv("orders committed in A", self.orders_committed),
            kv("transactions rolled back in A", self.rolled_back),
            kv("processed by B (ledger entries)", self.processed),
            kv(
                "duplicate deliveries suppressed by B's inbox",
                self.duplicates_suppressed,
            ),
            kv("dead-lettered", self.dead_lettered.len() as u64),
        ];
        // the dead letters are listed under their row
        let dead_row = rows.len();
        rows.extend([
            kv(
                "invoices derived by B (same tx as ledger)",
                self.invoices_derived,
            ),
            kv("LOST", self.lost),
            kv("phantoms (rolled back, yet applied)", self.phantoms),
            kv("duplicate effects", self.duplicate_effects),
            kv("order violations (per customer)", self.order_violations),
        ]);
        if let (Some(p), Some(g)) = (self.sequence_partitions, self.sequence_gaps) {
            rows.push(kv(
                &format!("sequence gaps in B ({p} numbered partitions)"),
                g,
            ));
        }
        let width = rows
            .iter()
            .map(|(k, _)| k.chars().count())
            .max()
            .unwrap_or(0);
        for (i, (k, v)) in rows.iter().enumerate() {
            line(format!("  {k:<width$} {v:>10}"));
            if i + 1 == dead_row {
                const SHOWN: usize = 20;
                for d in self.dead_lettered.iter().take(SHOWN) {
                    let id = d
                        .message_id
                        .map(|i| i.to_string())
                        .unwrap_or_else(|| "(no id)".into());
                    line(format!("      {id}  {}", d.reason));
                }
                if self.dead_lettered.len() > SHOWN {
                    line(format!(
                        "      … {} more (`--json` or `custody dlq list` shows all)",
                        self.dead_lettered.len() - SHOWN
                    ));
                }
            }
        }
        line(format!(
            "  elapsed {:.1}s, {:.0} messages/s end to end (faults included)",
            self.elapsed_secs, self.messages_per_sec
        ));
        for id in self.lost_ids.iter().take(10) {
            line(format!("  lost: {id}"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn detects_loss_duplicates_phantoms_and_disorder() {
        let obs = Observed {
            a_outbox: vec![
                (id(1), "OrderPlaced".into()),
                (id(2), "OrderPlaced".into()),
                (id(3), "OrderPlaced".into()),
            ],
            a_orders: vec![
                (id(11), "c".into(), 1),
                (id(12), "c".into(), 2),
                (id(13), "c".into(), 3),
            ],
            b_ledger: vec![
                (id(12), "c".into(), 2),
                (id(11), "c".into(), 1),
                (id(11), "c".into(), 1),
                (id(99), "c".into(), 4),
            ],
            b_inbox: vec![(id(1), 0), (id(2), 3)],
            b_dead: vec![],
            b_invoices: 3,
            b_sequences: None,
        };
        let r = Report::compute("t".into(), 1, vec![], &[], &obs, Duration::from_secs(1));
        assert_eq!(r.lost_ids, vec![id(3)]);
        assert_eq!(r.lost, 1); // order 13 never applied
        assert_eq!(r.duplicate_effects, 1);
        assert_eq!(r.phantoms, 1);
        assert_eq!(r.order_violations, 2); // 1 after 2, and the repeated 1
        assert_eq!(r.duplicates_suppressed, 3);
        assert!(!r.ok());
    }

    #[test]
    fn dead_lettered_is_not_lost() {
        let obs = Observed {
            a_outbox: vec![(id(1), "OrderPlaced".into()), (id(2), "Bad".into())],
            a_orders: vec![(id(11), "c".into(), 1)],
            b_ledger: vec![(id(11), "c".into(), 1)],
            b_inbox: vec![(id(1), 0)],
            b_dead: vec![(Some(id(2)), "malformed".into())],
            b_invoices: 1,
            b_sequences: Some((1, 0)),
        };
        let r = Report::compute("t".into(), 1, vec![], &[], &obs, Duration::from_secs(1));
        assert_eq!(r.lost, 0);
        assert!(r.ok());
    }

    #[test]
    fn a_sequence_gap_fails_the_run() {
        let obs = Observed {
            a_outbox: vec![(id(1), "OrderPlaced".into())],
            a_orders: vec![(id(11), "c".into(), 1)],
            b_ledger: vec![(id(11), "c".into(), 1)],
            b_inbox: vec![(id(1), 0)],
            b_dead: vec![],
            b_invoices: 1,
            b_sequences: Some((16, 1)),
        };
        let r = Report::compute("t".into(), 1, vec![], &[], &obs, Duration::from_secs(1));
        assert_eq!(r.sequence_gaps, Some(1));
        assert!(!r.ok());
    }

    #[test]
    fn the_heading_names_the_tool_that_ran_and_rows_line_up() {
        let obs = Observed {
            a_outbox: vec![(id(1), "OrderPlaced".into())],
            a_orders: vec![(id(11), "c".into(), 1)],
            b_ledger: vec![(id(11), "c".into(), 1)],
            b_inbox: vec![(id(1), 0)],
            b_dead: vec![],
            b_invoices: 1,
            b_sequences: Some((1234567, 0)),
        };
        let r = Report::compute("m".into(), 9, vec![], &[], &obs, Duration::from_secs(1));
        let chaos = r.render_without_verdict("custody chaos");
        assert!(
            chaos.starts_with("\ncustody chaos — m (seed 9)\n"),
            "{chaos}"
        );
        assert!(!chaos.contains("custody demo"), "{chaos}");
        assert!(!chaos.contains("RESULT"), "{chaos}");
        let demo = r.render("custody demo");
        assert!(demo.starts_with("\ncustody demo — m (seed 9)\n"), "{demo}");
        assert!(demo.ends_with("RESULT: OK — nothing lost, nothing applied twice, no phantom, order kept per customer\n"), "{demo}");
        // every value ends in the same column, the longest row name included
        let ends: Vec<usize> = demo
            .lines()
            .filter(|l| {
                l.starts_with("  ")
                    && l.trim_end().ends_with(|c: char| c.is_ascii_digit())
                    && !l.contains("elapsed")
            })
            .map(|l| l.chars().count())
            .collect();
        assert!(ends.len() >= 10, "{demo}");
        assert!(ends.iter().all(|e| *e == ends[0]), "{ends:?}\n{demo}");
    }
}
