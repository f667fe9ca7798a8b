//! The server's database: SQLite in the data directory (the default, one server), or PostgreSQL
//! shared by several replicas (`STATE=postgres`).
//!
//! Every owner of durable records (the upload store, the inventory, collections, schedules, the
//! token ledger, revocations) holds one [`Db`]: one connection, used one call at a time under its
//! lock, like rusqlite's. The owners write their SQL once, in the dialect both engines accept
//! (`?N` parameters, `ON CONFLICT ... DO UPDATE`, no engine-only functions), and read rows as
//! [`Row`]s of [`Value`]s. Each engine has its own migrations (`sqlite.rs`, `postgres.rs`); they
//! give the same tables.

mod postgres;
mod schema;
mod sqlite;
mod uploads;

use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Context;

pub use uploads::{LoadedRow, ManifestRow, Saved, SqlStore, StoredRow, UploadStore};

/// Where the durable state lives.
#[derive(Debug, Clone)]
pub enum Location {
    /// A SQLite file (created and migrated as needed).
    Sqlite(PathBuf),
    /// A PostgreSQL database, by its connection URL (migrated as needed, one replica at a time).
    /// (`Secret`: the URL may carry a password, and is never printed.)
    Postgres(shared::auth::Secret),
}

impl Location {
    /// A new connection for one owner.
    pub fn connect(&self) -> anyhow::Result<Db> {
        let backend = match self {
            Self::Sqlite(path) => Backend::Sqlite(sqlite::open(path)?),
            Self::Postgres(url) => {
                Backend::Postgres(Box::new(postgres::Conn::connect(url.expose())?))
            }
        };
        Ok(Db(Mutex::new(backend)))
    }
}

/// One value of a parameter or a column: the types Backhaul stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}
impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Self::Int(v.into())
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Self::Int(v.into())
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Self::Int(v.into())
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Self::Text(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Self::Text(v)
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Self::Text(v.clone())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Self::Null, Into::into)
    }
}

/// Parameters for [`Db`] and [`Exec`] calls: `args![a, b]`, each converted with `Value::from`.
#[macro_export]
macro_rules! args {
    ($($v:expr),* $(,)?) => { &[$($crate::db::Value::from($v)),*][..] };
}

/// A row as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row(Vec<Value>);

impl Row {
    fn at(&self, i: usize) -> anyhow::Result<&Value> {
        self.0
            .get(i)
            .with_context(|| format!("no column {i} in a row of {}", self.0.len()))
    }

    pub fn int(&self, i: usize) -> anyhow::Result<i64> {
        self.opt_int(i)?
            .with_context(|| format!("column {i} is NULL"))
    }

    pub fn opt_int(&self, i: usize) -> anyhow::Result<Option<i64>> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Int(v) => Ok(Some(*v)),
            Value::Text(_) => anyhow::bail!("column {i} is text, not an integer"),
        }
    }

    pub fn text(&self, i: usize) -> anyhow::Result<String> {
        self.opt_text(i)?
            .with_context(|| format!("column {i} is NULL"))
    }

    pub fn opt_text(&self, i: usize) -> anyhow::Result<Option<String>> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Text(v) => Ok(Some(v.clone())),
            Value::Int(_) => anyhow::bail!("column {i} is an integer, not text"),
        }
    }
}

/// Statements on a connection or inside a transaction.
pub trait Exec {
    /// Runs a statement; returns how many rows it changed.
    fn execute(&mut self, sql: &str, params: &[Value]) -> anyhow::Result<u64>;
    fn query(&mut self, sql: &str, params: &[Value]) -> anyhow::Result<Vec<Row>>;

    /// The first row, if any.
    fn query_opt(&mut self, sql: &str, params: &[Value]) -> anyhow::Result<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }
}

enum Backend {
    Sqlite(rusqlite::Connection),
    Postgres(Box<postgres::Conn>),
}

/// One connection to the server's database, for one owner, used one call at a time under its
/// lock. Every call leaves it consistent (a transaction commits or rolls back before the guard is
/// dropped), so a poisoned lock is taken over.
pub struct Db(Mutex<Backend>);

impl Db {
    fn lock(&self) -> std::sync::MutexGuard<'_, Backend> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn execute(&self, sql: &str, params: &[Value]) -> anyhow::Result<u64> {
        match &mut *self.lock() {
            Backend::Sqlite(c) => sqlite::Exec(c).execute(sql, params),
            Backend::Postgres(c) => c.execute(sql, params),
        }
    }

    pub fn query(&self, sql: &str, params: &[Value]) -> anyhow::Result<Vec<Row>> {
        match &mut *self.lock() {
            Backend::Sqlite(c) => sqlite::Exec(c).query(sql, params),
            Backend::Postgres(c) => c.query(sql, params),
        }
    }

    pub fn query_opt(&self, sql: &str, params: &[Value]) -> anyhow::Result<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// Runs `f` in one transaction: committed when it returns `Ok`, rolled back otherwise.
    pub fn transaction<R: Send>(
        &self,
        f: impl FnOnce(&mut dyn Exec) -> anyhow::Result<R> + Send,
    ) -> anyhow::Result<R> {
        match &mut *self.lock() {
            Backend::Sqlite(c) => {
                let tx = c.transaction()?;
                let out = f(&mut sqlite::Tx(&tx))?;
                tx.commit()?;
                Ok(out)
            }
            Backend::Postgres(c) => c.transaction(f),
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Databases for the stores' tests: a SQLite file, and, where the test command has started
    //! PostgreSQL (`BACKHAUL_TEST_DATABASE_URL`), a fresh database on it.

    use super::Location;

    /// The engines a store's test runs on. PostgreSQL is required when the variable is set
    /// (`scripts/test.sh` sets it), so that a broken engine fails the test rather than skip it.
    pub fn locations(dir: &std::path::Path) -> Vec<Location> {
        let mut all = vec![Location::Sqlite(dir.join("backhaul.db"))];
        if let Ok(url) = std::env::var("BACKHAUL_TEST_DATABASE_URL") {
            all.push(Location::Postgres(super::postgres::fresh_database(&url)));
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every table's columns, by name, as the engine reports them; not the engines' own
    /// bookkeeping: the schema's record (with the migration count on PostgreSQL), and the
    /// deployment's identity, which only the NATS bus (on PostgreSQL alone) uses.
    fn columns(db: &Db, sqlite: bool) -> std::collections::BTreeMap<String, Vec<String>> {
        let sql = if sqlite {
            "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p
             WHERE m.type = 'table' AND m.name <> 'backhaul_schema' ORDER BY m.name, p.name"
        } else {
            "SELECT table_name::text, column_name::text FROM information_schema.columns
             WHERE table_schema = 'public'
               AND table_name NOT IN ('backhaul_schema', 'backhaul_deployment')
             ORDER BY table_name, column_name"
        };
        let mut tables = std::collections::BTreeMap::<String, Vec<String>>::new();
        for row in db.query(sql, args![]).unwrap() {
            tables
                .entry(row.text(0).unwrap())
                .or_default()
                .push(row.text(1).unwrap());
        }
        tables
    }

    /// PostgreSQL's schema is one file, SQLite's a history of migrations: they must give the same
    /// tables and columns, or a store's SQL would work on one engine only.
    #[test]
    fn both_engines_have_the_same_tables_and_columns() {
        let dir = tempfile::tempdir().unwrap();
        let locations = testing::locations(dir.path());
        let [sqlite, postgres] = &locations[..] else {
            panic!(
                "this test needs PostgreSQL: set BACKHAUL_TEST_DATABASE_URL (scripts/test.sh does)"
            )
        };
        let sqlite = columns(&sqlite.connect().unwrap(), true);
        let postgres = columns(&postgres.connect().unwrap(), false);
        assert_eq!(sqlite, postgres);
        assert!(sqlite.contains_key("store_revocations"), "{sqlite:?}");
    }
}
