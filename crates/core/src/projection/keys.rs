//! Operator API keys: created and revoked.

use checkplane_runtime::db::Sql;
use checkplane_wire::events::{Event, KeyCreated, KeyRevoked};

use super::{ApplyError, AT};

pub(super) async fn apply_key_created(
    client: &impl Sql,
    event: &Event,
    e: &KeyCreated,
) -> Result<(), ApplyError> {
    client
        .execute(
            &format!(
                "INSERT INTO api_keys (key_id, name, role, key_hash, created_at, created_by)
                 VALUES ($2, $3, $4, $5, {AT}, $6)
                 ON CONFLICT (key_id) DO NOTHING"
            ),
            &[
                &event.occurred_at,
                &e.key_id,
                &e.name,
                &e.role,
                &e.key_hash,
                &event.actor,
            ],
        )
        .await?;
    Ok(())
}

pub(super) async fn apply_key_revoked(
    client: &impl Sql,
    event: &Event,
    e: &KeyRevoked,
) -> Result<(), ApplyError> {
    // The first revocation counts; a key never comes back.
    client
        .execute(
            &format!(
                "UPDATE api_keys SET revoked_at = {AT}, revoked_by = $3
                 WHERE key_id = $2 AND revoked_at IS NULL"
            ),
            &[&event.occurred_at, &e.key_id, &event.actor],
        )
        .await?;
    Ok(())
}
