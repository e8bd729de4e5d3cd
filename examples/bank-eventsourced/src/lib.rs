//! An event-sourced bank account on custody's embedded SQLite event store:
//! the `Account` aggregate (open, deposit, withdraw; a typed rejection when
//! funds are short), its repository with snapshots, and an upcaster for the
//! first schema of `Deposited`. See README.md beside this crate and
//! docs/AGGREGATES.md.
#![forbid(unsafe_code)]

use std::fmt;

use custody::aggregate::{decode_tagged, encode_tagged, Aggregate, DomainEvent};
use custody::repository::{Repository, RepositoryConfig};
use custody::sqlite::{connect, migrate, SqliteEventStore};
use custody::upcast::{UpcasterBuilder, Upcasters};
use serde::{Deserialize, Serialize};

/// What happened to an account. Serde tags it adjacently, so the variant
/// name is the event type and its fields are the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum AccountEvent {
    /// The account was opened.
    Opened {
        /// Who owns it.
        owner: String,
    },
    /// Money came in. Schema version 2: version 1 stored `{"amount": …}`.
    Deposited {
        /// Amount in cents.
        cents: i64,
    },
    /// Money went out.
    Withdrawn {
        /// Amount in cents.
        cents: i64,
    },
}

impl DomainEvent for AccountEvent {
    const TYPES: &'static [(&'static str, u32)] =
        &[("Opened", 1), ("Deposited", 2), ("Withdrawn", 1)];

    fn event_type(&self) -> &'static str {
        match self {
            AccountEvent::Opened { .. } => "Opened",
            AccountEvent::Deposited { .. } => "Deposited",
            AccountEvent::Withdrawn { .. } => "Withdrawn",
        }
    }

    fn to_payload(&self) -> custody::Result<serde_json::Value> {
        encode_tagged(self)
    }

    fn from_payload(event_type: &str, payload: serde_json::Value) -> custody::Result<Self> {
        decode_tagged(event_type, payload)
    }
}

/// Deposited v1 `{"amount": 500}` (cents, under an unclear name) becomes
/// v2 `{"cents": 500}` when read; stored events are never rewritten.
pub fn upcasters() -> UpcasterBuilder {
    Upcasters::builder().upcast("Deposited", 1, 2, |mut payload| {
        let amount = payload["amount"].take();
        if !amount.is_i64() {
            return Err(format!("Deposited v1 without an integer amount: {payload}"));
        }
        Ok(serde_json::json!({ "cents": amount }))
    })
}

/// What an account is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountCommand {
    /// Open it for `owner`.
    Open {
        /// Who owns it.
        owner: String,
    },
    /// Put `cents` in.
    Deposit {
        /// Amount in cents, > 0.
        cents: i64,
    },
    /// Take `cents` out.
    Withdraw {
        /// Amount in cents, > 0.
        cents: i64,
    },
}

/// Why an account refused a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Rejection {
    /// Open on an account that is open.
    AlreadyOpen,
    /// Deposit or withdraw on an account never opened.
    NotOpen,
    /// An amount of zero or less.
    NotPositive {
        /// The amount given.
        cents: i64,
    },
    /// Withdraw more than the balance.
    InsufficientFunds {
        /// The balance.
        balance: i64,
        /// What was asked for.
        requested: i64,
    },
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::AlreadyOpen => f.write_str("the account is already open"),
            Rejection::NotOpen => f.write_str("the account is not open; open it first"),
            Rejection::NotPositive { cents } => {
                write!(f, "amounts must be above 0 cents, and {cents} is not")
            }
            Rejection::InsufficientFunds { balance, requested } => write!(
                f,
                "insufficient funds: the balance is {balance} cents, {requested} were requested"
            ),
        }
    }
}

/// The account's state, folded from its events (and saved in snapshots).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Whether it was opened.
    pub open: bool,
    /// Who owns it.
    pub owner: String,
    /// Balance in cents.
    pub balance: i64,
}

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type Event = AccountEvent;
    type Command = AccountCommand;
    type Rejection = Rejection;

    fn handle(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, Rejection> {
        match command {
            AccountCommand::Open { .. } if self.open => Err(Rejection::AlreadyOpen),
            AccountCommand::Open { owner } => Ok(vec![AccountEvent::Opened {
                owner: owner.clone(),
            }]),
            _ if !self.open => Err(Rejection::NotOpen),
            AccountCommand::Deposit { cents } | AccountCommand::Withdraw { cents }
                if *cents <= 0 =>
            {
                Err(Rejection::NotPositive { cents: *cents })
            }
            AccountCommand::Deposit { cents } => {
                Ok(vec![AccountEvent::Deposited { cents: *cents }])
            }
            AccountCommand::Withdraw { cents } if *cents > self.balance => {
                Err(Rejection::InsufficientFunds {
                    balance: self.balance,
                    requested: *cents,
                })
            }
            AccountCommand::Withdraw { cents } => {
                Ok(vec![AccountEvent::Withdrawn { cents: *cents }])
            }
        }
    }

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened { owner } => {
                self.open = true;
                self.owner = owner.clone();
            }
            AccountEvent::Deposited { cents } => self.balance += cents,
            AccountEvent::Withdrawn { cents } => self.balance -= cents,
        }
    }
}

/// The accounts of the bank: a repository over the event store in the
/// SQLite file `db` (created and migrated if needed), with the upcasters
/// and a snapshot every `snapshot_every` events.
pub async fn accounts(
    db: &str,
    snapshot_every: u64,
) -> anyhow::Result<Repository<SqliteEventStore, Account>> {
    let pool = connect(db).await?;
    migrate(&pool).await?; // custody's tables, the event store's among them
    let store = SqliteEventStore::new(pool);
    let config = RepositoryConfig::default()
        .snapshot_every(snapshot_every)
        .max_conflict_retries(10);
    Ok(Repository::with_upcasters(store, upcasters())?.config(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use custody::aggregate::testing::given;

    #[test]
    fn a_withdrawal_within_the_balance_is_applied() {
        given::<Account>([
            AccountEvent::Opened {
                owner: "ada".into(),
            },
            AccountEvent::Deposited { cents: 500 },
        ])
        .when(AccountCommand::Withdraw { cents: 200 })
        .then([AccountEvent::Withdrawn { cents: 200 }]);
    }

    #[test]
    fn a_withdrawal_above_the_balance_is_refused() {
        given::<Account>([
            AccountEvent::Opened {
                owner: "ada".into(),
            },
            AccountEvent::Deposited { cents: 500 },
        ])
        .when(AccountCommand::Withdraw { cents: 501 })
        .then_rejected(Rejection::InsufficientFunds {
            balance: 500,
            requested: 501,
        });
    }

    #[test]
    fn nothing_happens_to_an_account_never_opened() {
        given::<Account>([])
            .when(AccountCommand::Deposit { cents: 1 })
            .then_rejected(Rejection::NotOpen);
        given::<Account>([AccountEvent::Opened {
            owner: "ada".into(),
        }])
        .when(AccountCommand::Deposit { cents: 0 })
        .then_rejected(Rejection::NotPositive { cents: 0 });
    }

    #[test]
    #[should_panic(expected = "but the command was rejected: insufficient funds")]
    fn the_harness_says_what_went_wrong() {
        given::<Account>([AccountEvent::Opened {
            owner: "ada".into(),
        }])
        .when(AccountCommand::Withdraw { cents: 1 })
        .then([AccountEvent::Withdrawn { cents: 1 }]);
    }

    #[test]
    fn the_upcaster_chain_is_valid() -> anyhow::Result<()> {
        let upcasters = upcasters().build(AccountEvent::TYPES)?;
        assert_eq!(upcasters.current_version("Deposited"), Some(2));
        Ok(())
    }
}
