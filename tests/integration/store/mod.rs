//! The store conformance batteries, one per flow's store trait, each run on every
//! backend (as hickory's `basic_battery!`): SQLite, Redis, and Redis started with
//! `cluster-enabled yes` on one node owning every slot — where Redis refuses any script
//! that strays across slots. The tests are plain generic functions in `ijam.rs` and
//! `pubkey.rs`; a backend only says how to open a fresh, empty store.
//!
//! Time is an argument (`now_ms`), so every test runs on a fixed clock; the only real
//! time is the replay TTL on Redis (a key TTL), which `replay_expires` polls for.

mod ijam;
mod migration;
mod pubkey;
mod scripts;

use std::any::Any;
use std::sync::Arc;

/// A fresh, empty store, and whatever must live as long as it (a temp dir, a server).
pub struct Fixture<S> {
    pub store: Arc<S>,
    _guard: Box<dyn Any + Send>,
}

impl<S> Fixture<S> {
    fn new(store: S, guard: impl Any + Send) -> Self {
        Fixture {
            store: Arc::new(store),
            _guard: Box::new(guard),
        }
    }
}

/// Instantiates `$test`s for every backend: `$tests` is the module of the generic
/// functions, `$by_ref` take `&S`, `$shared` take `&Arc<S>` (they spawn tasks).
macro_rules! battery {
    ($tests:path; by_ref: $($by_ref:ident),* ; shared: $($shared:ident),* $(,)?) => {
        $crate::store::battery!(@backend sqlite; $tests; $($by_ref),*; $($shared),*);
        $crate::store::battery!(@backend redis; $tests; $($by_ref),*; $($shared),*);
        $crate::store::battery!(@backend redis_cluster_node; $tests; $($by_ref),*; $($shared),*);
    };
    (@backend $backend:ident; $tests:path; $($by_ref:ident),*; $($shared:ident),*) => {
        mod $backend {
            use $tests as tests;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $by_ref() {
                    let Some(fixture) = crate::store::backends::$backend().await else { return };
                    tests::$by_ref(&*fixture.store).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $shared() {
                    let Some(fixture) = crate::store::backends::$backend().await else { return };
                    tests::$shared(&fixture.store).await;
                }
            )*
        }
    };
}
pub(crate) use battery;

/// How each backend opens a fresh, empty store; `None` when its server is not
/// installed (the suite says SKIPPED).
pub mod backends {
    use registrar::store::Creation;
    use registrar::store::redis::RedisStore;
    use registrar::store::sqlite::SqliteStore;

    use super::Fixture;
    use crate::support::redis_server::PrivateRedis;

    pub async fn sqlite() -> Option<Fixture<SqliteStore>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("registrar.db"), Creation::IfMissing)
            .expect("open sqlite store");
        Some(Fixture::new(store, dir))
    }

    pub async fn redis() -> Option<Fixture<RedisStore>> {
        let server = PrivateRedis::start()?;
        let store = RedisStore::connect(&server.url())
            .await
            .expect("connect to private redis");
        Some(Fixture::new(store, server))
    }

    /// One Redis node in cluster mode, owning all 16,384 slots.
    pub async fn redis_cluster_node() -> Option<Fixture<RedisStore>> {
        let server = PrivateRedis::start_cluster_node()?;
        let store = RedisStore::connect(&server.url())
            .await
            .expect("connect to the private cluster node");
        Some(Fixture::new(store, server))
    }
}

mod redis {
    use registrar::store::StoreError;
    use registrar::store::Stores;
    use registrar::store::ijam::{
        IjamStore, NodeStatus, PendingPassphrase, RegisterOutcome, Reregistration,
        StateFrameDigest, TransitionOutcome,
    };
    use registrar::store::redis::RedisStore;

    use super::ijam::{hash, id, new_node, op_requesting, pp_for};

    use crate::support::redis_server::PrivateRedis;

    #[tokio::test]
    async fn unreachable_server_is_unavailable_naming_the_url() {
        let url = "redis://127.0.0.1:1/";
        match RedisStore::connect(url).await {
            Err(err @ StoreError::Unavailable { .. }) => {
                let msg = err.to_string();
                assert!(msg.contains(url), "{msg}");
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn errors_never_show_the_password() {
        let url = "redis://user:hunter2@127.0.0.1:1/";
        let err = RedisStore::connect(url)
            .await
            .expect_err("nothing listens on port 1");
        let msg = err.to_string();
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
        assert!(!msg.contains("hunter2"), "{msg}");
        assert!(msg.contains("redis://user:***@127.0.0.1:1/"), "{msg}");
    }

    #[tokio::test]
    async fn describe_is_the_url() {
        let Some(server) = PrivateRedis::start() else {
            return;
        };
        let store = RedisStore::connect(&server.url()).await.expect("connect");
        assert_eq!(store.describe(), server.url());
    }

    /// A multiplexed connection never heals: after the server restarts, the first call
    /// fails (Unavailable) and the store reconnects for the calls after it.
    #[tokio::test]
    async fn survives_a_server_restart() {
        let Some(mut server) = PrivateRedis::start() else {
            return;
        };
        let store = RedisStore::connect(&server.url()).await.expect("connect");
        store
            .create_network("net", "alice", "Net", Reregistration::Owner, 1)
            .await
            .expect("create");
        server.restart();
        let mut recovered = false;
        for _ in 0..3 {
            match store
                .create_network("net", "alice", "Net", Reregistration::Owner, 2)
                .await
            {
                Ok(n) => {
                    assert_eq!(n.created_ms, 2, "the restarted server is empty");
                    recovered = true;
                    break;
                }
                Err(StoreError::Unavailable { .. }) => continue,
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        assert!(recovered, "the store did not reconnect");
        let id = uuid::Uuid::from_u128(7);
        assert_eq!(
            store
                .transition(id, NodeStatus::Online, "", 3, StateFrameDigest([3; 32]))
                .await
                .unwrap(),
            TransitionOutcome::UnknownNode
        );
    }

    /// Records written before the re-registration rules: a network record without
    /// `reregistration` follows `owner`, and a passphrase entry without `for:` is for
    /// any use. One minted for a node leads with `for:<uuid>|`.
    #[tokio::test]
    async fn records_from_before_the_rules_read_as_owner_and_for_any_use() {
        use ::redis::Commands;
        let Some(server) = PrivateRedis::start() else {
            return;
        };
        let store = RedisStore::connect(&server.url()).await.expect("connect");
        store
            .create_network("net", "alice", "Net", Reregistration::Minted, 1)
            .await
            .unwrap();
        let node = new_node(&store, "net", "n", id(1)).await;
        store
            .add_passphrases("net", vec![pp_for("for-n", "n-again", node)], 3)
            .await
            .unwrap();
        let mut conn = ::redis::Client::open(server.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let entries: Vec<String> = conn.hvals("rg:{own:alice}:net:net:pp").unwrap();
        assert_eq!(entries, [format!("for:{node}|3||n-again")]);

        // As create_network.lua and add_passphrases.lua wrote them before the rules.
        let _: () = conn
            .hdel("rg:{own:alice}:net:net", "reregistration")
            .unwrap();
        let _: () = conn.del("rg:{own:alice}:minted").unwrap();
        let _: () = conn.del("rg:{own:alice}:net:net:pp").unwrap();
        let _: () = conn.del("rg:{own:alice}:net:net:ppnames").unwrap();
        let hash = hex::encode(hash("old").0);
        let _: () = conn
            .hset("rg:{own:alice}:net:net:pp", &hash, "5||old-node")
            .unwrap();
        let _: () = conn
            .hset("rg:{own:alice}:net:net:ppnames", "old-node", &hash)
            .unwrap();
        assert_eq!(
            store.network("net").await.unwrap().unwrap().reregistration,
            Reregistration::Owner
        );
        assert_eq!(
            store.passphrases("net").await.unwrap(),
            vec![PendingPassphrase {
                node_name: "old-node".into(),
                created_ms: 5,
                expires_ms: None,
                for_node: None,
            }]
        );
        assert_eq!(
            store
                .register(op_requesting("net", "old", id(2), node))
                .await
                .unwrap(),
            RegisterOutcome::Reregistered { node_id: node },
            "the original rule, with a passphrase for any use"
        );
    }
}
