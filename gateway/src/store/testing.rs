//! The store's tests on both backends: [`TestDb`] is where one test's store lives (a temporary
//! data directory, and for PostgreSQL a fresh database on the test process's server), and
//! [`on_both_backends!`] runs a test written as `async fn name(kind: Kind)` once on each.

use super::{Backend, Limits, NewTerminal, Store, TerminalRecord};

/// Which backend a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Redb,
    Postgres,
}

/// One test's database.
pub(crate) struct TestDb {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) backend: Backend,
}

impl TestDb {
    /// A new, empty database. For PostgreSQL, starts this process's server on first use (a
    /// missing PostgreSQL fails the test and says what to install).
    pub(crate) async fn new(kind: Kind) -> TestDb {
        let backend = match kind {
            Kind::Redb => Backend::Redb,
            Kind::Postgres => Backend::Postgres {
                url: tokio::task::spawn_blocking(|| posgate_testpg::shared().fresh_db())
                    .await
                    .unwrap(),
                tls: super::PgTls::unverified(),
            },
        };
        TestDb {
            dir: tempfile::tempdir().unwrap(),
            backend,
        }
    }

    /// Opens (again) the store on it.
    pub(crate) async fn open(&self, limits: Limits) -> Store {
        self.try_open(limits).await.unwrap()
    }

    pub(crate) async fn try_open(&self, limits: Limits) -> Result<Store, super::StoreError> {
        let (backend, dir) = (self.backend.clone(), self.dir.path().to_owned());
        // Blocking: redb reads its file, the PostgreSQL client runs its own runtime.
        tokio::task::spawn_blocking(move || Store::open_backend(&backend, &dir, limits))
            .await
            .unwrap()
    }
}

/// A store on a new database of `kind`, with its database (keep it alive).
pub(crate) async fn store(kind: Kind, limits: Limits) -> (TestDb, Store) {
    let db = TestDb::new(kind).await;
    let store = db.open(limits).await;
    (db, store)
}

/// Registers the terminal `id` ([`NewTerminal::for_test`]), which must be new, and returns its
/// record.
pub(crate) async fn register(store: &Store, id: &str) -> TerminalRecord {
    store
        .register_terminal(NewTerminal::for_test(id))
        .await
        .unwrap()
        .expect("a terminal id not registered yet")
}

/// For each `name`, a module `name` with the tests `redb` and `postgres`, which run
/// `name(Kind::…)`. After `paused:`, on paused time (`start_paused`): it moves only while nothing
/// runs, no blocking task (a read) is in flight and no write waits for the store's writer (see
/// `Store::enqueue`), so a test waits for timers without waiting in real time.
macro_rules! on_both_backends {
    (paused: $($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(start_paused = true)]
            async fn redb() {
                super::$name($crate::store::testing::Kind::Redb).await
            }
            #[tokio::test(start_paused = true)]
            async fn postgres() {
                super::$name($crate::store::testing::Kind::Postgres).await
            }
        }
    )*};
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn redb() {
                super::$name($crate::store::testing::Kind::Redb).await
            }
            #[tokio::test]
            async fn postgres() {
                super::$name($crate::store::testing::Kind::Postgres).await
            }
        }
    )*};
}
pub(crate) use on_both_backends;
