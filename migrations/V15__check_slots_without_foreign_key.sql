-- Projections keep no foreign keys between them (docs/events.md): the one from check_slots to
-- checks cost a lookup in checks for every slot written and, because a slot row is usually
-- granted and ended in one projector transaction, for every slot update too. Retention deletes
-- a check's slots with it (crates/runtime/src/retention.rs).
ALTER TABLE check_slots DROP CONSTRAINT check_slots_check_id_fkey;
