//! The schema's versions, on either engine, and which releases may run on which database.
//!
//! A database counts the migrations applied to it. A release that knows all of them migrates
//! the database to its own count. A release that knows fewer runs on it only if every migration
//! it does not know left older releases working ([`Change::Additive`]): the database records the
//! fewest migrations a release must know ([`Schema::compatible_from`]). This is what lets
//! replicas of two releases share one PostgreSQL database through a rolling upgrade, and a
//! single server go back to the release before an additive upgrade.

/// What a migration does to releases that do not know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// They keep working: a new table or index, or a column with a default that they neither
    /// read nor need to write.
    Additive,
    /// They must not run on it: a column dropped, renamed or made required, a new constraint, a
    /// value whose meaning changed. The migrations of the releases that did not read
    /// `compatible_from` are marked so whatever they did: those releases refuse any newer
    /// database anyway.
    Breaking,
}

/// One numbered migration of an engine.
pub struct Migration {
    pub name: &'static str,
    pub sql: &'static str,
    pub change: Change,
}

/// A database's schema as it records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schema {
    /// Migrations applied.
    pub version: usize,
    /// The fewest migrations a release must know to run on it. `None` where the release that
    /// wrote it did not record it: then only a release that knows them all may run.
    pub compatible_from: Option<usize>,
}

/// What a release does with the database it opened.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Apply the migrations from this index on (none when the database is up to date).
    Migrate { from: usize },
    /// The database is newer, but every migration this release lacks is additive: run on it
    /// as it is, and migrate nothing.
    RunOnNewer,
}

/// The fewest migrations a release must know to run on a database with all of `migrations`
/// applied: the count up to the last breaking one.
pub fn compatible_from(migrations: &[Migration]) -> usize {
    migrations
        .iter()
        .rposition(|m| m.change == Change::Breaking)
        .map_or(0, |last| last + 1)
}

/// What this release, which knows `known` migrations, does with a database whose schema is
/// `found`. A newer database that this release may not use is an error that says which release
/// it needs.
pub fn plan(found: Schema, known: usize) -> anyhow::Result<Plan> {
    if found.version <= known {
        return Ok(Plan::Migrate {
            from: found.version,
        });
    }
    let needs = found.compatible_from.unwrap_or(found.version);
    anyhow::ensure!(
        needs <= known,
        "the database has schema version {}, newer than this release knows ({known}), and \
         releases that know fewer than {needs} migrations may not use it: run a newer release",
        found.version,
    );
    warn_once(found.version, known);
    Ok(Plan::RunOnNewer)
}

/// Each owner opens its own connection, so a process would otherwise say this several times.
fn warn_once(version: usize, known: usize) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            version,
            known,
            "the database is newer than this release, and compatible with it: running without \
             migrating (finish the upgrade)"
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn m(change: Change) -> Migration {
        Migration {
            name: "",
            sql: "",
            change,
        }
    }

    #[test]
    fn the_oldest_compatible_release_is_the_one_that_knows_the_last_breaking_migration() {
        use Change::{Additive, Breaking};
        assert_eq!(compatible_from(&[]), 0);
        assert_eq!(compatible_from(&[m(Breaking)]), 1);
        assert_eq!(compatible_from(&[m(Breaking), m(Additive), m(Additive)]), 1);
        assert_eq!(compatible_from(&[m(Additive), m(Breaking), m(Additive)]), 2);
        assert_eq!(compatible_from(&[m(Additive)]), 0);
    }

    #[test]
    fn a_release_runs_on_a_newer_database_only_past_additive_migrations() {
        let at = |version, compatible_from| Schema {
            version,
            compatible_from,
        };
        assert_eq!(plan(at(0, None), 3).unwrap(), Plan::Migrate { from: 0 });
        assert_eq!(plan(at(2, Some(1)), 3).unwrap(), Plan::Migrate { from: 2 });
        assert_eq!(plan(at(3, Some(3)), 3).unwrap(), Plan::Migrate { from: 3 });
        assert_eq!(plan(at(5, Some(3)), 3).unwrap(), Plan::RunOnNewer);
        assert_eq!(plan(at(5, Some(2)), 3).unwrap(), Plan::RunOnNewer);
        let refused = plan(at(5, Some(4)), 3).unwrap_err().to_string();
        assert!(refused.contains("schema version 5"), "{refused}");
        assert!(refused.contains("fewer than 4 migrations"), "{refused}");
        // Written by a release that did not record it: only a release that knows all of it.
        let refused = plan(at(4, None), 3).unwrap_err().to_string();
        assert!(refused.contains("fewer than 4 migrations"), "{refused}");
    }
}
