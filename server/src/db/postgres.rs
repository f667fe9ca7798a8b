//! PostgreSQL, shared by the replicas (`STATE=postgres`, `DATABASE_URL`).
//!
//! rust-postgres' blocking client runs each call on a small runtime of its own, which must not
//! run inside the server's: every call leaves the async context first ([`off_runtime`]), as a
//! SQLite call would block on the disk. The schema is `server/migrations/postgres/`, counted in
//! the `backhaul_schema` table; replicas that start together migrate one at a time, under an
//! advisory lock.

use std::collections::HashMap;
use std::error::Error as StdError;

use ::postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use ::postgres::{Client, NoTls, Statement};
use anyhow::Context;
use bytes::BytesMut;

use super::schema::{self, Change, Migration, Plan, Schema};
use super::{Row, Value};

/// The migrations, in order; `backhaul_schema.version` counts those applied.
const MIGRATIONS: &[Migration] = &[
    Migration {
        name: "0001_schema",
        sql: include_str!("../../migrations/postgres/0001_schema.sql"),
        change: Change::Breaking,
    },
    Migration {
        name: "0002_upload_epoch",
        sql: include_str!("../../migrations/postgres/0002_upload_epoch.sql"),
        change: Change::Breaking,
    },
    Migration {
        name: "0003_deployment",
        sql: include_str!("../../migrations/postgres/0003_deployment.sql"),
        // A new table, which only this release's bus reads.
        change: Change::Additive,
    },
];

/// The advisory lock that serialises migrations across replicas ("backhaul" in ASCII, folded).
const MIGRATION_LOCK: i64 = 0x6261_636b_6861_756c;

/// Runs `f` outside the async runtime, so that the client's own runtime may block: on a worker
/// of a multi-threaded runtime with `block_in_place`, on a single-threaded one (the tests) in a
/// scoped thread, and directly where there is no runtime.
fn off_runtime<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        Ok(_) => std::thread::scope(|s| match s.spawn(f).join() {
            Ok(out) => out,
            Err(panic) => std::panic::resume_unwind(panic),
        }),
        Err(_) => f(),
    }
}

/// `?N` parameters (the dialect the owners write) as PostgreSQL's `$N`. Backhaul's statements
/// carry no `?` of their own.
fn dialect(sql: &str) -> String {
    sql.replace('?', "$")
}

/// PostgreSQL's own words: rust-postgres shows only "db error" and keeps the server's message
/// in the source.
fn explained(e: ::postgres::Error) -> anyhow::Error {
    match e.as_db_error() {
        Some(db) => anyhow::anyhow!(
            "PostgreSQL: {} (SQLSTATE {})",
            db.message(),
            db.code().code()
        ),
        None => anyhow::Error::new(e),
    }
}

/// One connection, with its prepared statements.
pub struct Conn {
    /// `None` only while being dropped.
    client: Option<Client>,
    statements: HashMap<String, Statement>,
}

impl Conn {
    pub fn connect(url: &str) -> anyhow::Result<Self> {
        let mut config: ::postgres::Config = url
            .parse()
            .context("DATABASE_URL is not a PostgreSQL connection URL")?;
        config
            .application_name("backhaul-server")
            .connect_timeout(std::time::Duration::from_secs(10));
        let mut client = off_runtime(|| config.connect(NoTls))
            .map_err(explained)
            .context("connecting to PostgreSQL (DATABASE_URL)")?;
        off_runtime(|| migrate(&mut client)).context("migrating the PostgreSQL schema")?;
        Ok(Self {
            client: Some(client),
            statements: HashMap::new(),
        })
    }

    fn parts(&mut self) -> (&mut Client, &mut HashMap<String, Statement>) {
        (
            self.client
                .as_mut()
                .expect("the client is there until drop"),
            &mut self.statements,
        )
    }

    pub fn execute(&mut self, sql: &str, params: &[Value]) -> anyhow::Result<u64> {
        let (client, statements) = self.parts();
        off_runtime(|| Tx { client, statements }.run(sql, params))
    }

    pub fn query(&mut self, sql: &str, params: &[Value]) -> anyhow::Result<Vec<Row>> {
        let (client, statements) = self.parts();
        off_runtime(|| Tx { client, statements }.rows(sql, params))
    }

    pub fn transaction<R: Send>(
        &mut self,
        f: impl FnOnce(&mut dyn super::Exec) -> anyhow::Result<R> + Send,
    ) -> anyhow::Result<R> {
        let (client, statements) = self.parts();
        off_runtime(|| {
            let mut tx = client.transaction().map_err(explained)?;
            let out = f(&mut Tx {
                client: &mut tx,
                statements,
            })?;
            tx.commit().map_err(explained)?;
            Ok(out)
        })
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Closing the client blocks on its runtime.
        if let Some(client) = self.client.take() {
            off_runtime(move || drop(client));
        }
    }
}

/// Statements on a client or inside a transaction, with the connection's prepared statements
/// (a statement prepared on the connection is valid in its transactions).
struct Tx<'a, C: ::postgres::GenericClient> {
    client: &'a mut C,
    statements: &'a mut HashMap<String, Statement>,
}

impl<C: ::postgres::GenericClient> Tx<'_, C> {
    fn statement(&mut self, sql: &str) -> anyhow::Result<Statement> {
        let sql = dialect(sql);
        if let Some(s) = self.statements.get(&sql) {
            return Ok(s.clone());
        }
        let s = self
            .client
            .prepare(&sql)
            .map_err(explained)
            .with_context(|| format!("preparing {sql}"))?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    fn run(&mut self, sql: &str, params: &[Value]) -> anyhow::Result<u64> {
        let stmt = self.statement(sql)?;
        let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
        self.client.execute(&stmt, &params).map_err(explained)
    }

    fn rows(&mut self, sql: &str, params: &[Value]) -> anyhow::Result<Vec<Row>> {
        let stmt = self.statement(sql)?;
        let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
        self.client
            .query(&stmt, &params)
            .map_err(explained)?
            .iter()
            .map(row)
            .collect()
    }
}

impl<C: ::postgres::GenericClient> super::Exec for Tx<'_, C> {
    fn execute(&mut self, sql: &str, params: &[Value]) -> anyhow::Result<u64> {
        self.run(sql, params)
    }
    fn query(&mut self, sql: &str, params: &[Value]) -> anyhow::Result<Vec<Row>> {
        self.rows(sql, params)
    }
}

/// A row's columns as [`Value`]s: integers of any width and booleans as `Int`, text as `Text`.
fn row(r: &::postgres::Row) -> anyhow::Result<Row> {
    let mut out = Vec::with_capacity(r.len());
    for (i, column) in r.columns().iter().enumerate() {
        let ty = column.type_();
        let value = if *ty == Type::INT8 {
            r.try_get::<_, Option<i64>>(i)?.map(Value::Int)
        } else if *ty == Type::INT4 {
            r.try_get::<_, Option<i32>>(i)?
                .map(|v| Value::Int(v.into()))
        } else if *ty == Type::INT2 {
            r.try_get::<_, Option<i16>>(i)?
                .map(|v| Value::Int(v.into()))
        } else if *ty == Type::BOOL {
            r.try_get::<_, Option<bool>>(i)?
                .map(|v| Value::Int(v.into()))
        } else if [Type::TEXT, Type::VARCHAR, Type::BPCHAR, Type::NAME].contains(ty) {
            r.try_get::<_, Option<String>>(i)?.map(Value::Text)
        } else {
            anyhow::bail!("column {} has an unexpected type {ty}", column.name());
        };
        out.push(value.unwrap_or(Value::Null));
    }
    Ok(Row(out))
}

/// A parameter takes the type PostgreSQL infers for it: an `Int` binds as any integer width or
/// as a boolean (SQLite's integers are both).
impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(v) => match *ty {
                Type::INT8 => v.to_sql(ty, out),
                Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
                Type::BOOL => (*v != 0).to_sql(ty, out),
                _ => Err(format!("an integer parameter where {ty} is expected").into()),
            },
            Value::Text(v) => v.as_str().to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        matches!(
            *ty,
            Type::INT8
                | Type::INT4
                | Type::INT2
                | Type::BOOL
                | Type::TEXT
                | Type::VARCHAR
                | Type::BPCHAR
                | Type::NAME
        )
    }

    to_sql_checked!();
}

/// Applies the migrations the database has not seen, in one transaction under the migration
/// lock, and records the oldest release that may still use the database. A newer database is
/// used as it is when every migration this release lacks is additive (a replica of the previous
/// release during a rolling upgrade), and refused otherwise ([`schema::plan`]).
fn migrate(client: &mut Client) -> anyhow::Result<()> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS backhaul_schema (version BIGINT NOT NULL);
         ALTER TABLE backhaul_schema ADD COLUMN IF NOT EXISTS compatible_from BIGINT",
    )?;
    let found = match tx.query_opt("SELECT version, compatible_from FROM backhaul_schema", &[])? {
        Some(r) => Schema {
            version: usize::try_from(r.get::<_, i64>(0))?,
            compatible_from: r
                .get::<_, Option<i64>>(1)
                .map(usize::try_from)
                .transpose()?,
        },
        None => {
            tx.execute("INSERT INTO backhaul_schema (version) VALUES (0)", &[])?;
            Schema {
                version: 0,
                compatible_from: None,
            }
        }
    };
    let Plan::Migrate { from } = schema::plan(found, MIGRATIONS.len())? else {
        return Ok(());
    };
    for m in &MIGRATIONS[from..] {
        tx.batch_execute(m.sql)
            .with_context(|| format!("applying migration {}", m.name))?;
        tracing::info!(migration = m.name, "database migrated");
    }
    tx.execute(
        "UPDATE backhaul_schema SET version = $1, compatible_from = $2",
        &[
            &i64::try_from(MIGRATIONS.len())?,
            &i64::try_from(schema::compatible_from(MIGRATIONS))?,
        ],
    )?;
    tx.commit()?;
    Ok(())
}

/// A new, empty database on the server `admin_url` points at, for one test; its URL.
#[cfg(test)]
pub fn fresh_database(admin_url: &str) -> shared::auth::Secret {
    let name = format!("backhaul_test_{}", uuid::Uuid::new_v4().simple());
    off_runtime(|| {
        let mut client = admin_url
            .parse::<::postgres::Config>()
            .expect("BACKHAUL_TEST_DATABASE_URL is a PostgreSQL URL")
            .connect(NoTls)
            .expect("connecting to the test PostgreSQL");
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("creating a test database");
    });
    let mut url = url::Url::parse(admin_url).expect("BACKHAUL_TEST_DATABASE_URL is a URL");
    url.set_path(&name);
    shared::auth::Secret::new(url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_renumbered() {
        assert_eq!(
            dialect("UPDATE t SET a = ?2 WHERE id = ?1"),
            "UPDATE t SET a = $2 WHERE id = $1"
        );
    }

    /// A new database on the test command's PostgreSQL, migrated by this release; its URL.
    fn migrated() -> String {
        let admin = std::env::var("BACKHAUL_TEST_DATABASE_URL").expect(
            "this test needs PostgreSQL: set BACKHAUL_TEST_DATABASE_URL (scripts/test.sh does)",
        );
        let url = fresh_database(&admin).expose().to_owned();
        drop(Conn::connect(&url).unwrap());
        url
    }

    /// A database migrated by this release, then marked as a newer release would leave it:
    /// one migration more, and `compatible_from`.
    fn as_if_newer(compatible_from: usize) -> String {
        let url = migrated();
        let mut client = Client::connect(&url, NoTls).unwrap();
        client
            .execute(
                "UPDATE backhaul_schema SET version = $1, compatible_from = $2",
                &[
                    &i64::try_from(MIGRATIONS.len() + 1).unwrap(),
                    &i64::try_from(compatible_from).unwrap(),
                ],
            )
            .unwrap();
        url
    }

    fn recorded(url: &str) -> (i64, Option<i64>) {
        let mut client = Client::connect(url, NoTls).unwrap();
        let row = client
            .query_one("SELECT version, compatible_from FROM backhaul_schema", &[])
            .unwrap();
        (row.get(0), row.get(1))
    }

    #[test]
    fn a_replica_of_the_previous_release_runs_on_a_database_past_additive_migrations() {
        let url = as_if_newer(MIGRATIONS.len());
        Conn::connect(&url).expect("a compatible newer database is used");
        let newer = i64::try_from(MIGRATIONS.len() + 1).unwrap();
        let compatible = i64::try_from(MIGRATIONS.len()).unwrap();
        assert_eq!(recorded(&url), (newer, Some(compatible)), "left as it was");
    }

    #[test]
    fn a_replica_of_the_previous_release_is_refused_past_a_breaking_migration() {
        let url = as_if_newer(MIGRATIONS.len() + 1);
        let err = Conn::connect(&url).err().expect("refused");
        assert!(
            format!("{err:#}").contains("newer than this release"),
            "{err:#}"
        );
        let newer = i64::try_from(MIGRATIONS.len() + 1).unwrap();
        assert_eq!(recorded(&url), (newer, Some(newer)), "left as it was");
    }

    #[test]
    fn a_new_database_records_the_oldest_release_that_may_use_it() {
        let url = migrated();
        let want = (
            i64::try_from(MIGRATIONS.len()).unwrap(),
            Some(i64::try_from(schema::compatible_from(MIGRATIONS)).unwrap()),
        );
        assert_eq!(recorded(&url), want);
    }
}
