-- An admin's revocation of an agent (agent.revoked): its token is cleared, and its host
-- registers again only after an approval. Cleared by the next registration.
ALTER TABLE agents ADD COLUMN revoked_at timestamptz;
ALTER TABLE agents ADD COLUMN revoked_by text;
