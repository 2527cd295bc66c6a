//! PostgreSQL: the work pool, dedicated connections, and migrations.
//!
//! Migrations are the SQL files under `migrations/`, embedded at compile time by refinery. They
//! run on a dedicated connection that first takes a session advisory lock, so replicas that boot
//! together apply them once: the second waits, then finds nothing left to do. The lock dies with
//! the connection, so a crashed migrator never leaves it held.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

mod embedded {
    refinery::embed_migrations!("../../migrations");
}

/// Advisory lock key for migrations (the ASCII of "cpmigrat").
pub const MIGRATION_LOCK: i64 = 0x63706d6967726174;

/// Why a database step failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("connecting to PostgreSQL")]
    Connect(#[source] tokio_postgres::Error),
    #[error("PostgreSQL query")]
    Query(#[from] tokio_postgres::Error),
    #[error("applying migrations")]
    Migrate(#[source] refinery::Error),
    #[error("building the PostgreSQL pool")]
    Pool(#[source] deadpool_postgres::BuildError),
}

/// The pooled connections for request and background work. Creating it does not connect:
/// a database that is down at start-up shows in `/readyz`, it does not stop the process.
pub fn pool(config: &tokio_postgres::Config, size: usize) -> Result<Pool, DbError> {
    let manager = Manager::from_config(
        config.clone(),
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(DbError::Pool)
}

/// A dedicated connection outside the pool (advisory locks, probes). Its driver task ends when
/// the client is dropped.
pub async fn connect(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client, DbError> {
    let (client, connection) = config.connect(NoTls).await.map_err(DbError::Connect)?;
    // detached: the connection's driver, which ends when the client is dropped.
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "dedicated PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// What a migration run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// Names of the migrations this run applied (`V1__installation`, ...).
    pub applied: Vec<String>,
}

/// Apply pending migrations under the advisory lock, on a connection of its own.
pub async fn migrate(config: &tokio_postgres::Config) -> Result<MigrationReport, DbError> {
    let mut client = connect(config).await?;
    migrate_with(&mut client).await
}

/// Apply pending migrations on `client` under the advisory lock.
pub async fn migrate_with(client: &mut tokio_postgres::Client) -> Result<MigrationReport, DbError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let outcome = embedded::migrations::runner()
        .set_abort_divergent(true)
        .run_async(client)
        .await;
    // Unlock even when the run failed; if this fails too the connection is dropped anyway.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    let report = outcome.map_err(DbError::Migrate)?;
    Ok(MigrationReport {
        applied: report
            .applied_migrations()
            .iter()
            .map(|m| format!("V{}__{}", m.version(), m.name()))
            .collect(),
    })
}

/// Names of every embedded migration, oldest first (the test template is keyed by them).
pub fn embedded_migrations() -> Vec<String> {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| format!("V{}__{}:{}", m.version(), m.name(), m.checksum()))
        .collect()
}

/// Whether every embedded migration is applied (for replicas that do not migrate themselves).
pub async fn schema_is_current(config: &tokio_postgres::Config) -> Result<bool, DbError> {
    let client = connect(config).await?;
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('refinery_schema_history') IS NOT NULL AS present",
            &[],
        )
        .await?
        .get("present");
    if !exists {
        return Ok(false);
    }
    let applied: i64 = client
        .query_one("SELECT count(*) AS n FROM refinery_schema_history", &[])
        .await?
        .get("n");
    Ok(usize::try_from(applied).unwrap_or(0)
        >= embedded::migrations::runner().get_migrations().len())
}

/// Parameters of a statement.
pub type Params<'a> = [&'a (dyn tokio_postgres::types::ToSql + Sync)];

/// Where statements run: a connection or a transaction. On a pooled connection (and its
/// transactions) each statement is prepared once per connection and kept (deadpool's
/// statement cache), so a repeated statement is neither parsed nor planned again and costs
/// one round trip instead of two (prepare, then execute). Dedicated connections
/// (`tokio_postgres::Client`) prepare each time.
///
/// Only constant statement texts belong on a cached connection: every distinct text stays
/// prepared for the connection's life.
pub trait Sql: Sync {
    /// Like `Client::execute`: the rows affected.
    fn execute(
        &self,
        sql: &str,
        params: &Params<'_>,
    ) -> impl std::future::Future<Output = Result<u64, tokio_postgres::Error>> + Send;
    /// Like `Client::query`.
    fn query(
        &self,
        sql: &str,
        params: &Params<'_>,
    ) -> impl std::future::Future<Output = Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>> + Send;
    /// Like `Client::query_one`.
    fn query_one(
        &self,
        sql: &str,
        params: &Params<'_>,
    ) -> impl std::future::Future<Output = Result<tokio_postgres::Row, tokio_postgres::Error>> + Send;
    /// Like `Client::query_opt`.
    fn query_opt(
        &self,
        sql: &str,
        params: &Params<'_>,
    ) -> impl std::future::Future<Output = Result<Option<tokio_postgres::Row>, tokio_postgres::Error>>
           + Send;
    /// Like `Client::batch_execute` (simple protocol, never cached).
    fn batch_execute(
        &self,
        sql: &str,
    ) -> impl std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send;
    /// Have `sql` prepared on a cached connection (nothing elsewhere). Statements sent as one
    /// pipeline run in the order their executions are sent, and a statement that still has to
    /// be prepared sends its execution a round trip later than one already prepared: a
    /// pipeline whose order matters, and whose statements are not always all sent together,
    /// prepares them all first.
    fn prepare(
        &self,
        sql: &str,
    ) -> impl std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send;
}

/// `Sql` for `$ty` through the `GenericClient` trait `$client`, the statement each call runs
/// being `$statement` (of `$this` and `$sql`): the text itself, or the connection's prepared
/// statement for it.
macro_rules! sql_impl {
    ($ty:ty, $client:path, |$this:ident, $sql:ident| $statement:expr, $prepare:expr) => {
        impl Sql for $ty {
            async fn execute(
                &self,
                sql: &str,
                params: &Params<'_>,
            ) -> Result<u64, tokio_postgres::Error> {
                let ($this, $sql) = (self, sql);
                let statement = $statement;
                <Self as $client>::execute(self, statement, params).await
            }
            async fn query(
                &self,
                sql: &str,
                params: &Params<'_>,
            ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
                let ($this, $sql) = (self, sql);
                let statement = $statement;
                <Self as $client>::query(self, statement, params).await
            }
            async fn query_one(
                &self,
                sql: &str,
                params: &Params<'_>,
            ) -> Result<tokio_postgres::Row, tokio_postgres::Error> {
                let ($this, $sql) = (self, sql);
                let statement = $statement;
                <Self as $client>::query_one(self, statement, params).await
            }
            async fn query_opt(
                &self,
                sql: &str,
                params: &Params<'_>,
            ) -> Result<Option<tokio_postgres::Row>, tokio_postgres::Error> {
                let ($this, $sql) = (self, sql);
                let statement = $statement;
                <Self as $client>::query_opt(self, statement, params).await
            }
            async fn batch_execute(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
                <Self as $client>::batch_execute(self, sql).await
            }
            async fn prepare(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
                let ($this, $sql) = (self, sql);
                $prepare
            }
        }
    };
}

// Uncached: every statement is prepared as it is sent, so a pipeline keeps its order.
sql_impl!(
    tokio_postgres::Client,
    tokio_postgres::GenericClient,
    |_this, sql| sql,
    {
        let _ = sql;
        Ok(())
    }
);
sql_impl!(
    tokio_postgres::Transaction<'_>,
    tokio_postgres::GenericClient,
    |_this, sql| sql,
    {
        let _ = sql;
        Ok(())
    }
);
sql_impl!(
    deadpool_postgres::Client,
    deadpool_postgres::GenericClient,
    |this, sql| &this.prepare_cached(sql).await?,
    this.prepare_cached(sql).await.map(|_| ())
);
sql_impl!(
    deadpool_postgres::Transaction<'_>,
    deadpool_postgres::GenericClient,
    |this, sql| &this.prepare_cached(sql).await?,
    this.prepare_cached(sql).await.map(|_| ())
);
