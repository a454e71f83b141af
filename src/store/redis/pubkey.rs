//! The pubkey flow on Redis: a device's record and its used nonces share the slot
//! `{dev:<hex>}`; devices are listed by SCAN.

use std::collections::HashMap;

use super::keys;
use super::{RedisStore, SETTLE_WITHIN, field, int_field, tag, unexpected};
use crate::core::ids::DeviceId;
use crate::store::StoreError;
use crate::store::pubkey::{
    AttestOp, AttestOutcome, Device, DeviceRegisterOutcome, DeviceStatus, PubkeyStore,
};

impl PubkeyStore for RedisStore {
    async fn register_device(
        &self,
        id: DeviceId,
        public_key: &[u8],
        now_ms: i64,
    ) -> Result<DeviceRegisterOutcome, StoreError> {
        let script_keys = [keys::device(id)];
        let args = [hex::encode(public_key), now_ms.to_string()];
        // A re-run after a lost outcome answers `same_key` if the first try bound it
        // (409, the device's "already registered": a success, never a hidden write).
        let reply = self
            .inner
            .settle(SETTLE_WITHIN, || {
                self.inner
                    .run(&self.scripts.register_device, &script_keys, &args)
            })
            .await?;
        match tag(&reply) {
            "created" => Ok(DeviceRegisterOutcome::Created),
            "same_key" => Ok(DeviceRegisterOutcome::SameKey),
            "other_key" => Ok(DeviceRegisterOutcome::OtherKey),
            "revoked" => Ok(DeviceRegisterOutcome::Revoked),
            _ => Err(unexpected("register_device", &reply)),
        }
    }

    async fn device(&self, id: DeviceId) -> Result<Option<Device>, StoreError> {
        let (record,): (HashMap<String, String>,) = self
            .inner
            .query(redis::pipe().hgetall(keys::device(id)))
            .await?;
        if record.is_empty() {
            return Ok(None);
        }
        parse_device(id, &record).map(Some)
    }

    async fn devices(&self) -> Result<Vec<Device>, StoreError> {
        let found = self.inner.scan(keys::DEVICES).await?;
        let mut ids = found
            .iter()
            .map(|key| {
                key.strip_prefix("rg:{dev:")
                    .and_then(|rest| rest.strip_suffix('}'))
                    .and_then(|hex| DeviceId::from_hex(hex).ok())
                    .ok_or_else(|| StoreError::Corrupt(format!("device key {key:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        ids.sort();
        ids.dedup();
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hgetall(keys::device(*id));
        }
        let records: Vec<HashMap<String, String>> = self.inner.query(&pipe).await?;
        let mut devices = Vec::with_capacity(ids.len());
        for (id, record) in ids.into_iter().zip(records) {
            if !record.is_empty() {
                devices.push(parse_device(id, &record)?);
            }
        }
        devices.sort_by_key(|d| (d.registered_ms, d.id));
        Ok(devices)
    }

    async fn attest_device(&self, op: AttestOp) -> Result<AttestOutcome, StoreError> {
        let ttl_ms = (op.nonce_expires_ms - op.now_ms).max(1);
        let script_keys = [
            keys::device(op.device),
            keys::used_nonce(op.device, &op.nonce),
        ];
        let args = [
            op.now_ms.to_string(),
            ttl_ms.to_string(),
            hex::encode(op.attempt),
        ];
        // The used nonce outlives any re-run: a lost outcome is settled by running
        // the same attempt again.
        let reply = self
            .inner
            .settle(SETTLE_WITHIN, || {
                self.inner
                    .run(&self.scripts.attest_device, &script_keys, &args)
            })
            .await?;
        match tag(&reply) {
            "attested" => Ok(AttestOutcome::Attested),
            "used" => Ok(AttestOutcome::NonceUsed),
            "revoked" => Ok(AttestOutcome::Revoked),
            "unknown" => Ok(AttestOutcome::UnknownDevice),
            _ => Err(unexpected("attest_device", &reply)),
        }
    }

    async fn revoke_device(&self, id: DeviceId, now_ms: i64) -> Result<(), StoreError> {
        let reply = self
            .inner
            .run(
                &self.scripts.revoke_device,
                &[keys::device(id)],
                &[now_ms.to_string()],
            )
            .await?;
        match tag(&reply) {
            "ok" => Ok(()),
            "unknown" => Err(StoreError::UnknownDevice(id)),
            _ => Err(unexpected("revoke_device", &reply)),
        }
    }
}

fn parse_device(id: DeviceId, record: &HashMap<String, String>) -> Result<Device, StoreError> {
    let what = format!("device {id}");
    let status = field(&what, record, "status")?;
    let key = field(&what, record, "public_key")?;
    Ok(Device {
        id,
        public_key: hex::decode(key)
            .map_err(|_| StoreError::Corrupt(format!("{what}: public_key is not hex")))?,
        status: DeviceStatus::parse(status)
            .ok_or_else(|| StoreError::Corrupt(format!("{what}: status {status:?}")))?,
        registered_ms: int_field(&what, record, "registered_ms")?,
        attested_ms: int_field(&what, record, "attested_ms")?,
        attestations: int_field(&what, record, "attestations")? as u64,
        revoked_ms: int_field(&what, record, "revoked_ms")?,
    })
}
