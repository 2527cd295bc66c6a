-- An http check's request header values are secrets to readers: audit records written before
-- the projection redacted them are redacted now (names kept, as new records have them).
UPDATE audit_log
SET details = jsonb_set(
        details, '{options,headers}',
        (SELECT coalesce(jsonb_object_agg(name, '[redacted]'::text), '{}'::jsonb)
         FROM jsonb_object_keys(details -> 'options' -> 'headers') AS name))
WHERE jsonb_typeof(details -> 'options' -> 'headers') = 'object'
  AND details -> 'options' -> 'headers' <> '{}'::jsonb;
