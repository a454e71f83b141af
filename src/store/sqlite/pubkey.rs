//! The pubkey flow on SQLite: its tables are `pubkey_devices` and
//! `pubkey_used_nonces`.

use rusqlite::{Connection, OptionalExtension, params};

use super::{Cached, OrUnavailable, SqliteStore};
use crate::core::ids::DeviceId;
use crate::store::StoreError;
use crate::store::pubkey::{
    AttestOp, AttestOutcome, Device, DeviceRegisterOutcome, DeviceStatus, PubkeyStore,
};

const DEVICE_COLUMNS: &str =
    "id, public_key, status, registered_ms, attested_ms, attestations, revoked_ms";

fn device_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Device, StoreError>> {
    let id: Vec<u8> = row.get(0)?;
    let status: String = row.get(2)?;
    let parsed = <[u8; 16]>::try_from(id.as_slice())
        .ok()
        .and_then(|b| DeviceId::new(b).ok());
    let (Some(id), Some(status)) = (parsed, DeviceStatus::parse(&status)) else {
        return Ok(Err(StoreError::Corrupt(format!(
            "device {} with status {status:?}",
            hex::encode(&id)
        ))));
    };
    Ok(Ok(Device {
        id,
        public_key: row.get(1)?,
        status,
        registered_ms: row.get(3)?,
        attested_ms: row.get(4)?,
        attestations: row.get::<_, i64>(5)? as u64,
        revoked_ms: row.get(6)?,
    }))
}

fn read_device(conn: &Connection, id: DeviceId) -> Result<Option<Device>, StoreError> {
    conn.row(
        &format!("SELECT {DEVICE_COLUMNS} FROM pubkey_devices WHERE id = ?1"),
        [id.0.as_slice()],
        device_from_row,
    )
    .optional()
    .db()?
    .transpose()
}

fn register_device(
    conn: &Connection,
    id: DeviceId,
    public_key: &[u8],
    now_ms: i64,
) -> Result<DeviceRegisterOutcome, StoreError> {
    let inserted = conn
        .exec(
            "INSERT OR IGNORE INTO pubkey_devices (id, public_key, status, registered_ms, attested_ms,
                 attestations, revoked_ms)
             VALUES (?1, ?2, 'active', ?3, 0, 0, 0)",
            params![id.0.as_slice(), public_key, now_ms],
        )
        .db()?;
    if inserted == 1 {
        return Ok(DeviceRegisterOutcome::Created);
    }
    let existing = read_device(conn, id)?
        .ok_or_else(|| StoreError::Corrupt(format!("device {id} neither inserted nor found")))?;
    Ok(if existing.status == DeviceStatus::Revoked {
        DeviceRegisterOutcome::Revoked
    } else if existing.public_key == public_key {
        DeviceRegisterOutcome::SameKey
    } else {
        DeviceRegisterOutcome::OtherKey
    })
}

fn attest_device(conn: &Connection, op: AttestOp) -> Result<AttestOutcome, StoreError> {
    conn.exec(
        "DELETE FROM pubkey_used_nonces WHERE expires_ms <= ?1",
        [op.now_ms],
    )
    .db()?;
    let status: Option<String> = conn
        .row(
            "SELECT status FROM pubkey_devices WHERE id = ?1",
            [op.device.0.as_slice()],
            |row| row.get(0),
        )
        .optional()
        .db()?;
    match status.as_deref().map(DeviceStatus::parse) {
        None => return Ok(AttestOutcome::UnknownDevice),
        Some(Some(DeviceStatus::Revoked)) => return Ok(AttestOutcome::Revoked),
        Some(Some(DeviceStatus::Active)) => {}
        Some(None) => {
            return Err(StoreError::Corrupt(format!(
                "device {} with status {status:?}",
                op.device
            )));
        }
    }
    let fresh = conn
        .exec(
            "INSERT OR IGNORE INTO pubkey_used_nonces (device, nonce, expires_ms, attempt) \
             VALUES (?1, ?2, ?3, ?4)",
            params![
                op.device.0.as_slice(),
                op.nonce.as_slice(),
                op.nonce_expires_ms,
                op.attempt.as_slice()
            ],
        )
        .db()?;
    if fresh == 0 {
        let used_by: Option<Vec<u8>> = conn
            .row(
                "SELECT attempt FROM pubkey_used_nonces WHERE device = ?1 AND nonce = ?2",
                params![op.device.0.as_slice(), op.nonce.as_slice()],
                |row| row.get(0),
            )
            .db()?;
        // This very attempt, run again: it attested; nothing more to count.
        if used_by.as_deref() == Some(op.attempt.as_slice()) {
            return Ok(AttestOutcome::Attested);
        }
        return Ok(AttestOutcome::NonceUsed);
    }
    conn.exec(
        "UPDATE pubkey_devices SET attested_ms = ?2, attestations = attestations + 1 WHERE id = ?1",
        params![op.device.0.as_slice(), op.now_ms],
    )
    .db()?;
    Ok(AttestOutcome::Attested)
}

impl PubkeyStore for SqliteStore {
    async fn register_device(
        &self,
        id: DeviceId,
        public_key: &[u8],
        now_ms: i64,
    ) -> Result<DeviceRegisterOutcome, StoreError> {
        let public_key = public_key.to_vec();
        self.call(move |conn| register_device(conn, id, &public_key, now_ms))
            .await
    }

    async fn device(&self, id: DeviceId) -> Result<Option<Device>, StoreError> {
        self.call(move |conn| read_device(conn, id)).await
    }

    async fn devices(&self) -> Result<Vec<Device>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {DEVICE_COLUMNS} FROM pubkey_devices ORDER BY registered_ms, id"
                ))
                .db()?;
            let rows = stmt.query_map([], device_from_row).db()?;
            rows.collect::<Result<Vec<_>, _>>()
                .db()?
                .into_iter()
                .collect()
        })
        .await
    }

    async fn attest_device(&self, op: AttestOp) -> Result<AttestOutcome, StoreError> {
        self.call(move |conn| attest_device(conn, op)).await
    }

    async fn revoke_device(&self, id: DeviceId, now_ms: i64) -> Result<(), StoreError> {
        self.call(move |conn| {
            let known = conn
                .exec(
                    "UPDATE pubkey_devices SET status = 'revoked',
                         revoked_ms = CASE WHEN status = 'revoked' THEN revoked_ms ELSE ?2 END
                     WHERE id = ?1",
                    params![id.0.as_slice(), now_ms],
                )
                .db()?;
            if known == 0 {
                return Err(StoreError::UnknownDevice(id));
            }
            Ok(())
        })
        .await
    }
}
