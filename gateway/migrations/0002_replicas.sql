-- Several replicas on one database: delivery is shared by leases on terminal shards
-- (docs/architecture.md "Replicas", gateway/src/replicas/).
--
-- A terminal belongs to shard `fnv1a32(utf8(terminal_id)) % 64` (`replicas::shard_of`). Neither
-- the function nor the number of shards may ever change while any replica runs: two replicas
-- computing different shards for one terminal would both publish for it.
CREATE TABLE shard_leases (
    shard smallint PRIMARY KEY CHECK (shard >= 0 AND shard < 64),
    -- The replica (`replicas.id`) whose lease it is; NULL: free.
    owner text COLLATE "C",
    -- By the database's clock (`now()`); a lease past it may be claimed by any replica.
    expires_at timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO shard_leases (shard) SELECT generate_series(0, 63);

-- Replicas alive: each writes `seen_at = now()` with every renewal; the fair share of shards is
-- 64 divided by the replicas seen within one lease time.
CREATE TABLE replicas (
    id text COLLATE "C" PRIMARY KEY,
    seen_at timestamptz NOT NULL
);

-- Wake-ups: every commit that adds outbox rows tells the listening replicas (`LISTEN
-- posgate_outbox`) which terminals got rows, as "terminal_id seq" (the newest), sent at COMMIT
-- and only then. A wake-up only: a replica not listening at that moment finds the rows by its
-- periodic read of the outbox.
CREATE FUNCTION posgate_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('posgate_outbox', terminal || ' ' || max(seq))
        FROM new_rows GROUP BY terminal;
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION posgate_outbox_notify();
