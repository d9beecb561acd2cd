-- Kept in step with PostgreSQL's 0003 (durability barriers), which SQLite does not
-- need: its writes are durable at commit (synchronous = FULL).
SELECT 1;
