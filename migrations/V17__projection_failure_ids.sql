-- Parked events get a number of their own, so that admins can name one over the API
-- (`GET /v1/projection-failures`, `DELETE /v1/projection-failures/{id}`), and their type as
-- the projector decoded it (none when it could not).
ALTER TABLE projection_failures ADD COLUMN id bigserial, ADD COLUMN event_type text;
CREATE UNIQUE INDEX projection_failures_id ON projection_failures (id);
