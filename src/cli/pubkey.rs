//! The pubkey flow's admin commands: devices.

use anyhow::{Context, Result};
use clap::Subcommand;
use registrar::core::clock::now_ms;
use registrar::core::ids::DeviceId;
use registrar::store::pubkey::{Device, PubkeyStore};
use serde_json::json;

use super::output::{print_table, time};
use super::{ADMIN, Common, existing_data_dir, on_store};

#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// List the devices of the pubkey flow.
    List,
    /// Show one device, its public key (PEM) included.
    Show {
        /// Device id: 32 hex digits.
        id: DeviceId,
    },
    /// Revoke a device for good: its key binding ends, and every later register,
    /// challenge or attest naming its id gets 403. A re-provisioned device needs a new id.
    Revoke {
        /// Device id: 32 hex digits.
        id: DeviceId,
    },
}

/// SHA-256 of the SubjectPublicKeyInfo DER, hex: the key's fingerprint.
fn key_sha256(spki: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki))
}

fn public_key_pem(spki: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("PUBLIC KEY", spki.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

fn device_json(d: &Device) -> serde_json::Value {
    json!({
        "id": d.id.to_hex(),
        "status": d.status,
        "public_key": public_key_pem(&d.public_key),
        "key_sha256": key_sha256(&d.public_key),
        "registered_ms": d.registered_ms,
        "attested_ms": d.attested_ms,
        "attestations": d.attestations,
        "revoked_ms": d.revoked_ms,
    })
}

pub async fn device(common: &Common, cmd: DeviceCommand) -> Result<()> {
    let data = existing_data_dir(common)?;
    on_store!(common, data, ADMIN, device_on, common, cmd)
}

async fn device_on<S: PubkeyStore>(store: S, common: &Common, cmd: DeviceCommand) -> Result<()> {
    match cmd {
        DeviceCommand::List => {
            let devices = store.devices().await?;
            if common.json {
                let items: Vec<_> = devices.iter().map(device_json).collect();
                println!("{}", serde_json::to_string(&items)?);
            } else {
                let rows: Vec<Vec<String>> = devices
                    .iter()
                    .map(|d| {
                        vec![
                            d.id.to_hex(),
                            d.status.as_str().to_string(),
                            key_sha256(&d.public_key)[..16].to_string(),
                            time(d.registered_ms),
                            time(d.attested_ms),
                            d.attestations.to_string(),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "DEVICE",
                        "STATUS",
                        "KEY SHA-256",
                        "REGISTERED",
                        "LAST ATTESTED",
                        "ATTESTATIONS",
                    ],
                    &rows,
                );
            }
        }
        DeviceCommand::Show { id } => {
            let d = store
                .device(id)
                .await?
                .with_context(|| format!("device {id} does not exist"))?;
            if common.json {
                println!("{}", device_json(&d));
            } else {
                println!("device:        {}", d.id);
                println!("status:        {}", d.status.as_str());
                println!("key sha-256:   {}", key_sha256(&d.public_key));
                println!("registered:    {}", time(d.registered_ms));
                println!("last attested: {}", time(d.attested_ms));
                println!("attestations:  {}", d.attestations);
                println!("revoked:       {}", time(d.revoked_ms));
                print!("{}", public_key_pem(&d.public_key));
            }
        }
        DeviceCommand::Revoke { id } => {
            store.revoke_device(id, now_ms()).await?;
            if common.json {
                println!("{}", json!({"device": id.to_hex(), "revoked": true}));
            } else {
                println!("revoked device {id}");
            }
        }
    }
    Ok(())
}
