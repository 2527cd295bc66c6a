-- The token hash a registration rotated away: a re-registration proven by it is taken, so an
-- agent that lost the answer of its own re-registration (and kept its old token) gets in.
ALTER TABLE agents ADD COLUMN previous_token_hash text;
