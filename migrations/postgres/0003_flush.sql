-- Durability barriers. Write transactions commit with synchronous_commit off, so
-- the revision row lock is not held across the WAL flush; before a write is
-- acknowledged (and before a snapshot build publishes what it read) the control
-- plane bumps one of these rows in a transaction of its own with synchronous
-- commit. That commit's WAL record comes after everything committed before it, so
-- its flush makes all of that durable, and PostgreSQL flushes concurrent barriers
-- together. One row per connection slot (backend pid modulo 1024): bounded, and
-- concurrent barriers rarely touch the same row.
CREATE TABLE flush_barrier (
    slot integer PRIMARY KEY,
    n bigint NOT NULL
);
