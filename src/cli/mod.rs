//! The `registrar` command line: `serve` and `init` ([`serve`]), and the admin
//! commands of each flow ([`ijam`], [`pubkey`]), all on one `--data-dir` and one
//! `--store`, so they work while a listener runs.

pub mod ijam;
pub mod migrate;
pub mod output;
pub mod pubkey;
pub mod serve;

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use registrar::core::datadir::DataDir;
use registrar::store::Creation;

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Directory holding the RSA key, the storage key and the embedded SQLite store.
    #[arg(
        long,
        global = true,
        env = "REGISTRAR_DATA_DIR",
        default_value = "./registrar-data"
    )]
    pub data_dir: PathBuf,
    /// `sqlite` (the embedded store in --data-dir), `redis://host:port/db`, or
    /// `ota+redis://host:port/db`: a JAMScript-OTA portal's Redis, served in the
    /// portal's own layout (secrets in clear, as the portal keeps them; see `migrate`).
    #[arg(long, global = true, env = "REGISTRAR_STORE", default_value = "sqlite")]
    pub store: String,
    /// Print machine-readable JSON instead of tables (admin commands).
    #[arg(long, global = true)]
    pub json: bool,
}

/// Runs `$run(store, $args…)`, generic over the store, on the store `--store` names.
macro_rules! on_store {
    ($common:expr, $data:expr, $creation:expr, $run:path, $($arg:expr),* $(,)?) => {
        registrar::with_store!(&$common.store, &$data.sqlite_path(), $creation, $run, $($arg),*)
    };
}
pub(crate) use on_store;

/// The data dir a listener made: admin commands never make one (run in another
/// directory, they would start an empty store of their own).
pub fn existing_data_dir(common: &Common) -> Result<DataDir> {
    Ok(DataDir::existing(&common.data_dir)?)
}

/// How an admin command opens its store: never making it.
pub const ADMIN: Creation = Creation::Never;
