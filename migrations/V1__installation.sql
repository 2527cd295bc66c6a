-- One row naming this installation: services compare it to be sure they share one database.
CREATE TABLE installation (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    installation_id uuid        NOT NULL DEFAULT gen_random_uuid(),
    installed_at    timestamptz NOT NULL DEFAULT now()
);

INSERT INTO installation DEFAULT VALUES;
