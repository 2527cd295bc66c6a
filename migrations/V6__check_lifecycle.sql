-- Cancellation of checks; slots waiting for a retry are `retrying` (their interrupted
-- attempt's outcome and end time kept until the next attempt starts).
ALTER TABLE checks ADD COLUMN cancelled_at timestamptz;
CREATE INDEX check_slots_retrying ON check_slots (done_at) WHERE status = 'retrying';
