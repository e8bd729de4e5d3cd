-- The instance token of the process running each relay id (random per
-- process, written with every heartbeat). A relay whose id has a live
-- heartbeat with another token is refused: two processes with one id would
-- share leases and hand out the same sequence numbers. NULL: written before
-- this migration; taken over by the next heartbeat.
ALTER TABLE custody_relay_member ADD COLUMN instance TEXT NULL;
