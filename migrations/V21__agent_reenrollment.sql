-- An admin's approval of one registration of a known host by the enrollment token alone
-- (agent.reenroll_approved), cleared by the next registration of that agent.
ALTER TABLE agents ADD COLUMN reenroll_until timestamptz;
