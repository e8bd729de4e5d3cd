//! custody's own migration runner, shared by the SQL backends (the Rust is
//! [`crate::migrate_impl!`], the decisions are the functions here).
//!
//! sqlx's `Migrator::run` records into `_sqlx_migrations`, the table the
//! application's own sqlx migrations use, and sqlx 0.8 cannot rename it: an
//! application with migrations 1, 2, 3 collided with custody's 0001…. So
//! custody runs the migrations `sqlx::migrate!` embeds itself, into
//! `custody_migrations` (docs/SCHEMA.md): each in its own transaction with
//! its record, so a migration is never half applied nor applied twice.
//!
//! A database migrated by an earlier custody has custody's rows in
//! `_sqlx_migrations`; the rows whose version and checksum are custody's are
//! moved to `custody_migrations` (adopted) in one transaction. The
//! application's own rows (any other checksum) are left alone.

use std::fmt;

use custody_core::admin::AppliedMigration;
use custody_core::Error;
use sqlx::migrate::{Migration, Migrator};

/// The versions and checksums `custody_migrations` holds.
pub const RECORDED: &str = "SELECT version, checksum FROM custody_migrations ORDER BY version";

/// The checksum recorded for version `$1`, if any.
pub const RECORDED_ONE: &str = "SELECT checksum FROM custody_migrations WHERE version = $1";

/// Record migration `$1` (description `$2`, checksum `$3`) that took `$4`
/// nanoseconds to run; `installed_on` is the database's clock.
pub const RECORD: &str =
    "INSERT INTO custody_migrations (version, description, checksum, execution_time) \
     VALUES ($1, $2, $3, $4)";

/// The successful rows of sqlx's table (an earlier custody's, or the
/// application's own).
pub const LEGACY: &str = "SELECT version, checksum FROM _sqlx_migrations WHERE success";

/// Remove custody's row `$1` (with checksum `$2`) from sqlx's table once it
/// is in custody's: the checksum keeps an application's row of the same
/// version out of it.
pub const FORGET_LEGACY: &str = "DELETE FROM _sqlx_migrations WHERE version = $1 AND checksum = $2";

/// Checksums (SHA-384, hex) a migration file had before an edit that
/// changed only its comments, by version. A database recorded with one of
/// them holds exactly the schema of the file as it is now, so it counts as
/// the same migration: never an "edited" error, never applied again. An
/// applied migration's statements are never edited; only a comment may be
/// reworded, and its earlier checksum then goes here.
const REWORDED: &[(i64, &str)] = &[
    // postgres 0001: its comment cited an invariant by a document outside the
    // repository; it now cites docs/ARCHITECTURE.md
    (
        1,
        "763e0fdc18c2c962e777d5c910ac5853747cca27ca2abb6852fa1efb26aaa5ce18655aa7494af490e7a3c614a7d7466b",
    ),
];

/// Whether `sum`, a checksum recorded for `m`'s version, is `m`'s: its
/// file's checksum, or one the file had before a comment-only edit.
fn same(m: &Migration, sum: &[u8]) -> bool {
    m.checksum.as_ref() == sum
        || REWORDED.iter().any(|(version, hex)| {
            *version == m.version
                && sum.iter().map(|b| format!("{b:02x}")).collect::<String>() == *hex
        })
}

/// The migrations of `migrator` that apply (not the down halves of
/// reversible ones), in version order.
pub fn ups(migrator: &Migrator) -> impl Iterator<Item = &Migration> {
    migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
}

/// The versions in `legacy` (rows of `_sqlx_migrations`: version,
/// checksum) that are custody's: same version and same checksum as one of
/// `migrator`'s. A row of the same version with another checksum is the
/// application's own and is not returned.
pub fn custody_rows(migrator: &Migrator, legacy: &[(i64, Vec<u8>)]) -> Vec<i64> {
    legacy
        .iter()
        .filter(|(v, sum)| ups(migrator).any(|m| m.version == *v && same(m, sum)))
        .map(|(v, _)| *v)
        .collect()
}

/// Check what `custody_migrations` records against `migrator`: a version
/// this build knows, recorded with another checksum, means the database
/// holds a schema this build does not (another custody build applied it,
/// or the row was changed). That is an error naming the version; nothing is
/// re-applied. Versions this build does not know (a newer custody's) are
/// tolerated.
pub fn verify(migrator: &Migrator, recorded: &[(i64, Vec<u8>)]) -> custody_core::Result<()> {
    for (version, sum) in recorded {
        if let Some(m) = ups(migrator).find(|m| m.version == *version) {
            if !same(m, sum) {
                return Err(changed(m));
            }
        }
    }
    Ok(())
}

fn changed(m: &Migration) -> Error {
    Error::Config(format!(
        "custody migration {:04} ({}) is recorded in this database's custody_migrations with \
         another checksum than this custody's migration {:04}: the database was migrated by a \
         different custody build, or the row was edited. Nothing was applied. Use the custody \
         release that set this database up (or a later release), and never edit \
         custody_migrations by hand (docs/SCHEMA.md)",
        m.version, m.description, m.version
    ))
}

/// Whether `m` is already recorded (`recorded`: its checksum in
/// `custody_migrations`, if any), checking the checksum as [`verify`] does.
pub fn already(m: &Migration, recorded: Option<&[u8]>) -> custody_core::Result<bool> {
    match recorded {
        None => Ok(false),
        Some(sum) if same(m, sum) => Ok(true),
        Some(_) => Err(changed(m)),
    }
}

/// What [`crate::migrate_impl!`] reports for `m`.
pub fn applied(m: &Migration) -> AppliedMigration {
    AppliedMigration {
        version: m.version,
        description: m.description.to_string(),
    }
}

/// A migration's statements failed; the source is the database's error.
#[derive(Debug)]
pub struct Failed {
    /// The migration's version.
    pub version: i64,
    /// Its description.
    pub description: String,
    /// Whether it ran in a transaction (then nothing of it stayed).
    pub in_transaction: bool,
    /// What the database said.
    pub source: sqlx::Error,
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "custody migration {:04} ({}) failed: {}; ",
            self.version, self.description, self.source
        )?;
        if self.in_transaction {
            f.write_str("it ran in a transaction, so nothing of it stayed: fix the cause and run the migration again")
        } else {
            f.write_str("it runs outside a transaction (see its file), so what it did before failing stays: fix the cause and run the migration again")
        }
    }
}

impl std::error::Error for Failed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use sqlx::migrate::MigrationType;

    use super::*;

    fn migrator() -> Migrator {
        let m = |v: i64, sql: &'static str| {
            Migration::new(
                v,
                Cow::Borrowed("m"),
                MigrationType::Simple,
                Cow::Borrowed(sql),
                false,
            )
        };
        Migrator {
            migrations: Cow::Owned(vec![m(1, "CREATE TABLE a (x INT)"), m(2, "SELECT 1")]),
            ..Migrator::DEFAULT
        }
    }

    #[test]
    fn custody_rows_need_version_and_checksum() {
        let m = migrator();
        let sum1 = m
            .iter()
            .next()
            .map(|x| x.checksum.to_vec())
            .unwrap_or_default();
        let legacy = vec![(1, sum1.clone()), (2, b"app".to_vec()), (3, sum1)];
        assert_eq!(custody_rows(&m, &legacy), [1]);
    }

    #[test]
    fn a_changed_checksum_is_an_error_naming_the_version() {
        let m = migrator();
        let sum1 = m
            .iter()
            .next()
            .map(|x| x.checksum.to_vec())
            .unwrap_or_default();
        assert!(verify(&m, &[(1, sum1.clone()), (99, vec![1])]).is_ok());
        let Err(e) = verify(&m, &[(1, sum1), (2, vec![0])]) else {
            panic!("a changed checksum is refused")
        };
        let text = e.to_string();
        assert!(text.contains("custody migration 0002"), "{text}");
        assert!(text.contains("Nothing was applied"), "{text}");
        let two = m.iter().nth(1).map(|x| (x.clone(), x.checksum.to_vec()));
        let Some((two, sum2)) = two else {
            panic!("two migrations")
        };
        assert!(!already(&two, None).unwrap_or(true));
        assert!(already(&two, Some(&sum2)).unwrap_or(false));
        assert!(already(&two, Some(b"other")).is_err());
    }
}
