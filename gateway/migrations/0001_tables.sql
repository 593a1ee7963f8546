-- posgate's tables on PostgreSQL: the redb tables under the same names and key shapes
-- (gateway/src/store/kv.rs). Values are the same JSON documents as in redb, as bytes
-- (`convert_from(v, 'UTF8')::jsonb` reads them). Keys are compared bytewise (COLLATE "C"), the
-- order redb keeps, which the store's ordered scans rely on.

CREATE TABLE events (k text COLLATE "C" PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE intents (k text COLLATE "C" PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE intent_by_address (k text COLLATE "C" PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE terminals (k text COLLATE "C" PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE revoked_serials (k text COLLATE "C" PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE orphan_transfers (k text COLLATE "C" PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE reconcile_state (k text COLLATE "C" PRIMARY KEY, v bytea NOT NULL);

-- Multimaps: a key with a set of values.
CREATE TABLE pending (k text COLLATE "C", v text COLLATE "C", PRIMARY KEY (k, v));
CREATE TABLE undeliverable (k text COLLATE "C", v text COLLATE "C", PRIMARY KEY (k, v));

-- Verified bodies that were not an event envelope, by sequence number.
CREATE TABLE rejected (k bigint PRIMARY KEY, v bytea NOT NULL);

-- Confirmations waiting for their terminal's ack, by (terminal, seq).
CREATE TABLE outbox (
    terminal text COLLATE "C",
    seq bigint,
    v bytea NOT NULL,
    PRIMARY KEY (terminal, seq)
);

-- Answers given to terminals' RPC requests, by (terminal, request id).
CREATE TABLE rpc_answers (
    terminal text COLLATE "C",
    request text COLLATE "C",
    v bytea NOT NULL,
    PRIMARY KEY (terminal, request)
);
