//! Criterion benches of the ijam path, one group per concern:
//!
//! - `ijam/decode`: parsing the 88-byte registration plaintext;
//! - `ijam/rsa_decrypt/{2048,4096}`: one RSA-OAEP-SHA1 decryption (the cost that bounds
//!   registrations per second; compare with `openssl speed rsa2048 rsa4096`);
//! - `ijam/reply_build`: the 50-byte 200 reply (checksummed plaintext, AES-256-CBC);
//! - `ijam/state_open`: one state block (AES-256-CBC decrypt, padding and checksum);
//! - `ijam/registration/{sqlite,redis}`: a whole registration without network,
//!   `IjamFlow::open_request` + `IjamFlow::register`, one at a time;
//! - `ijam/registration_store_only/{sqlite,redis}`: the same with the request already
//!   decrypted and parsed, so the store's share is visible.
//!
//! Every registration consumes a fresh passphrase: each sample mints its pool (and
//! encrypts its requests) before starting the clock. Redis runs as a PRIVATE
//! `redis-server` on a free loopback port, killed at the end; without `redis-server` on
//! PATH the Redis benches print a "skipped" line.

use registrar::core::random;
use std::cell::Cell;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio::runtime::Runtime;
use uuid::Uuid;

use registrar::core::crypto::{
    self, KeyRing, MAX_MODULUS_LEN, RsaKey, RsaPublicKey, StorageKey, passphrase,
};
use registrar::flow::ijam::{
    DEFAULT_REPLAY_TTL_MS, IjamError, IjamFlow, RegisterRandomness, Registered,
};
use registrar::store::ijam::{IjamStore, NewPassphrase, Reregistration, StoredPassphrase};
use registrar::store::redis::RedisStore;
use registrar::store::sqlite::SqliteStore;
use registrar::wire::ijam::{
    NetworkId, NodeArch, NodeKey, NodeType, Passphrase, REGISTER_REPLY_LEN, RegisterRequest,
    StateCode, register_reply, register_reply_plaintext,
};

const MEASUREMENT: Duration = Duration::from_secs(5);
const WARM_UP: Duration = Duration::from_secs(2);
/// For benches whose single iteration takes a millisecond or more.
const SLOW_SAMPLES: usize = 20;
/// Passphrases added per `add_passphrases` call while minting a pool.
const MINT_BATCH: usize = 1000;
const NETWORK: &str = "benchnet";

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/ijam")
}

fn vector(name: &str) -> Vec<u8> {
    let path = vectors_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rsa_key(bits: usize) -> RsaKey {
    let pem = String::from_utf8(vector(&format!("rsa{bits}_private_key.pem"))).expect("PEM");
    RsaKey::from_pkcs8_pem(&pem).expect("vector key loads")
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

fn decode(c: &mut Criterion) {
    let plain = vector("reg2048_request_plain.bin");
    let parsed = RegisterRequest::parse(&plain).expect("vector parses");
    assert_eq!(parsed.network_id.as_str(), "vecnet2048");
    let mut group = c.benchmark_group("ijam/decode");
    group.measurement_time(MEASUREMENT);
    group.throughput(Throughput::Elements(1));
    group.bench_function("register_request", |b| {
        b.iter(|| RegisterRequest::parse(black_box(&plain)))
    });
    group.finish();
}

fn rsa_decrypt(c: &mut Criterion) {
    let mut group = c.benchmark_group("ijam/rsa_decrypt");
    group.measurement_time(MEASUREMENT);
    group.warm_up_time(WARM_UP);
    group.sample_size(SLOW_SAMPLES);
    group.throughput(Throughput::Elements(1));
    for bits in [2048, 4096] {
        let key = rsa_key(bits);
        let cipher = vector(&format!("reg{bits}_request_cipher.bin"));
        let plain = vector(&format!("reg{bits}_request_plain.bin"));
        let mut buf = [0u8; MAX_MODULUS_LEN];
        assert_eq!(
            key.decrypt(&cipher, &mut buf).expect("decrypts"),
            &plain[..]
        );
        group.bench_function(bits.to_string(), |b| {
            b.iter(|| {
                key.decrypt(black_box(&cipher), &mut buf)
                    .expect("decrypts")
                    .len()
            })
        });
    }
    group.finish();
}

fn reply_build(c: &mut Criterion) {
    // The captured upstream reply: status ‖ IV ‖ AES-CBC(node key, IV, id ‖ xor ‖ pad).
    let expected = vector("reg2048_response.bin");
    let key = NodeKey(vector("reg2048_node_key.bin").try_into().expect("32 bytes"));
    let node_id = Uuid::from_slice(&vector("reg2048_node_id.bin")).expect("16 bytes");
    let iv: [u8; 16] = expected[2..18].try_into().expect("16 bytes");
    let build = |key: &NodeKey, iv: [u8; 16], node_id: Uuid| {
        let mut body = register_reply_plaintext(node_id);
        crypto::aes_cbc_encrypt(key, iv, &mut body);
        register_reply(iv, body)
    };
    assert_eq!(&build(&key, iv, node_id)[..], &expected[..]);
    let mut group = c.benchmark_group("ijam/reply_build");
    group.measurement_time(MEASUREMENT);
    group.throughput(Throughput::Elements(1));
    group.bench_function("register_reply", |b| {
        b.iter(|| build(black_box(&key), black_box(iv), black_box(node_id)))
    });
    group.finish();
}

fn state_open(c: &mut Criterion) {
    let key = NodeKey(vector("reg2048_node_key.bin").try_into().expect("32 bytes"));
    let iv = [0x5a; 16];
    let mut block = StateCode::Online.plaintext();
    crypto::aes_cbc_encrypt(&key, iv, &mut block);
    let open = |key: &NodeKey, iv: [u8; 16], mut block: [u8; 16]| {
        crypto::aes_cbc_decrypt(key, iv, &mut block);
        StateCode::parse_plaintext(&block)
    };
    assert_eq!(open(&key, iv, block), Ok(StateCode::Online));
    let mut group = c.benchmark_group("ijam/state_open");
    group.measurement_time(MEASUREMENT);
    group.throughput(Throughput::Elements(1));
    group.bench_function("state_block", |b| {
        b.iter(|| open(black_box(&key), black_box(iv), black_box(block)))
    });
    group.finish();
}

/// One store behind an `IjamFlow` with the RSA-2048 vector key, and a network whose
/// passphrase pool is minted on demand.
struct Bench<S: IjamStore> {
    flow: IjamFlow<S>,
    public: RsaPublicKey,
    /// The flow's storage key (the flow does not expose it), to hash minted passphrases.
    storage: StorageKey,
    network: NetworkId,
    /// Node names must be unique per network: a counter across all samples.
    minted: Cell<u64>,
}

impl<S: IjamStore> Bench<S> {
    fn new(rt: &Runtime, store: S) -> Self {
        let master: [u8; StorageKey::LEN] = random::bytes().expect("random");
        let rsa = rsa_key(2048);
        let public = RsaPublicKey::from_pem(rsa.public_pem().as_bytes()).expect("public key");
        let flow = IjamFlow::new(
            KeyRing::new(rsa, None),
            StorageKey::from_bytes(&master),
            Arc::new(store),
            DEFAULT_REPLAY_TTL_MS,
        );
        rt.block_on(flow.store().create_network(
            NETWORK,
            "bench",
            "bench",
            Reregistration::default(),
            now_ms(),
        ))
        .expect("create network");
        Bench {
            flow,
            public,
            storage: StorageKey::from_bytes(&master),
            network: NetworkId::new(NETWORK).expect("network id"),
            minted: Cell::new(0),
        }
    }

    /// `n` parsed requests, each with a fresh passphrase already added to the store
    /// (in batches of `MINT_BATCH`) and a fresh node key.
    fn mint(&self, rt: &Runtime, n: u64) -> Vec<RegisterRequest> {
        let mut requests = Vec::with_capacity(n as usize);
        let mut batch = Vec::with_capacity(MINT_BATCH);
        for i in 0..n {
            let pass = Passphrase::new(&passphrase::generate().expect("passphrase"))
                .expect("generated passphrases are valid");
            let serial = self.minted.get();
            self.minted.set(serial + 1);
            batch.push(NewPassphrase {
                passphrase: StoredPassphrase::Hash(
                    self.storage.passphrase_hash(NETWORK, pass.expose()),
                ),
                node_name: format!("bench-{serial}"),
                expires_ms: None,
                for_node: None,
            });
            let request = RegisterRequest {
                node_id: None,
                network_id: self.network.clone(),
                passphrase: pass,
                node_key: NodeKey(random::bytes().expect("random")),
                node_type: NodeType::Device,
                node_arch: NodeArch::X86Ubuntu,
            };
            // Through the wire format, as the listener would see it.
            requests.push(RegisterRequest::parse(&request.to_bytes()).expect("round trip"));
            if batch.len() == MINT_BATCH || i + 1 == n {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(MINT_BATCH));
                rt.block_on(self.flow.store().add_passphrases(NETWORK, full, now_ms()))
                    .expect("add passphrases");
            }
        }
        requests
    }

    /// Whole registrations: RSA decrypt + parse + store + reply, one at a time. The
    /// pool is minted and the requests encrypted before the clock starts.
    fn full(&self, rt: &Runtime, iters: u64) -> Duration {
        let ciphertexts: Vec<Vec<u8>> = self
            .mint(rt, iters)
            .iter()
            .map(|r| self.public.encrypt(&r.to_bytes()).expect("encrypt"))
            .collect();
        rt.block_on(async {
            let start = Instant::now();
            for cipher in &ciphertexts {
                let request = self.flow.open_request(cipher, now_ms()).expect("opens");
                let rand = RegisterRandomness::from_bytes(random::bytes().expect("random"));
                expect_created(self.flow.register(&request, now_ms(), rand).await);
            }
            start.elapsed()
        })
    }

    /// Only `register`: the requests are parsed before the clock starts.
    fn store_only(&self, rt: &Runtime, iters: u64) -> Duration {
        let requests = self.mint(rt, iters);
        rt.block_on(async {
            let start = Instant::now();
            for request in &requests {
                let rand = RegisterRandomness::from_bytes(random::bytes().expect("random"));
                expect_created(self.flow.register(request, now_ms(), rand).await);
            }
            start.elapsed()
        })
    }
}

fn expect_created(result: Result<(Registered, [u8; REGISTER_REPLY_LEN]), IjamError>) {
    match result {
        Ok((Registered::Created(_), reply)) => {
            black_box(reply);
        }
        other => panic!("registration did not create a node: {other:?}"),
    }
}

fn registration(c: &mut Criterion) {
    let rt = Runtime::new().expect("tokio runtime");
    let sqlite_dir = tempfile::tempdir().expect("temp dir");
    let sqlite = Bench::new(
        &rt,
        SqliteStore::open(
            &sqlite_dir.path().join("registrar.sqlite"),
            registrar::store::Creation::IfMissing,
        )
        .expect("sqlite store"),
    );
    let redis_server = PrivateRedis::start();
    let redis = redis_server.as_ref().map(|server| {
        let store = rt
            .block_on(RedisStore::connect(&server.url()))
            .expect("private redis store");
        Bench::new(&rt, store)
    });

    let mut group = c.benchmark_group("ijam/registration");
    group.measurement_time(MEASUREMENT);
    group.warm_up_time(WARM_UP);
    group.sample_size(SLOW_SAMPLES);
    group.throughput(Throughput::Elements(1));
    group.bench_function("sqlite", |b| b.iter_custom(|iters| sqlite.full(&rt, iters)));
    if let Some(redis) = &redis {
        group.bench_function("redis", |b| b.iter_custom(|iters| redis.full(&rt, iters)));
    }
    group.finish();

    let mut group = c.benchmark_group("ijam/registration_store_only");
    group.measurement_time(MEASUREMENT);
    group.warm_up_time(WARM_UP);
    group.sample_size(SLOW_SAMPLES);
    group.throughput(Throughput::Elements(1));
    group.bench_function("sqlite", |b| {
        b.iter_custom(|iters| sqlite.store_only(&rt, iters))
    });
    if let Some(redis) = &redis {
        group.bench_function("redis", |b| {
            b.iter_custom(|iters| redis.store_only(&rt, iters))
        });
    }
    group.finish();

    // Stores first (the SQLite writer thread ends when its queue drops), then the
    // server they talk to, then the directories.
    drop(sqlite);
    drop(redis);
    drop(redis_server);
    drop(sqlite_dir);
}

/// The test suites' private `redis-server` (own loopback port and directory, killed
/// on drop), shared rather than copied.
#[path = "../tests/integration/support/redis_server.rs"]
#[allow(dead_code)]
mod redis_server;
use redis_server::PrivateRedis;

criterion_group!(
    benches,
    decode,
    rsa_decrypt,
    reply_build,
    state_open,
    registration
);
criterion_main!(benches);
