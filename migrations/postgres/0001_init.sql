-- Vigil's state: one revision counter, entities as validated JSON documents,
-- references between them enforced by foreign keys, a change log for snapshot
-- deltas, and the audit trail.

CREATE TABLE revision (
    id smallint PRIMARY KEY CHECK (id = 1),
    value bigint NOT NULL
);
INSERT INTO revision (id, value) VALUES (1, 0);

CREATE TABLE entities (
    kind text NOT NULL,
    id text NOT NULL,
    natural_key text,
    body text NOT NULL,
    secret text,
    version bigint NOT NULL,
    created_at bigint NOT NULL,
    updated_at bigint NOT NULL,
    CONSTRAINT entities_pkey PRIMARY KEY (kind, id)
);
CREATE UNIQUE INDEX entities_natural_key ON entities (kind, natural_key) WHERE natural_key IS NOT NULL;
CREATE UNIQUE INDEX entities_secret ON entities (kind, secret) WHERE secret IS NOT NULL;

CREATE TABLE refs (
    kind text NOT NULL,
    id text NOT NULL,
    ref_kind text NOT NULL,
    ref_id text NOT NULL,
    cascade bigint NOT NULL,
    CONSTRAINT refs_pkey PRIMARY KEY (kind, id, ref_kind, ref_id),
    CONSTRAINT refs_from_fkey FOREIGN KEY (kind, id) REFERENCES entities (kind, id) ON DELETE CASCADE,
    CONSTRAINT refs_to_fkey FOREIGN KEY (ref_kind, ref_id) REFERENCES entities (kind, id) ON DELETE RESTRICT
);
CREATE INDEX refs_to ON refs (ref_kind, ref_id);

CREATE TABLE changes (
    revision bigint NOT NULL,
    kind text NOT NULL,
    id text NOT NULL,
    op text NOT NULL,
    CONSTRAINT changes_pkey PRIMARY KEY (revision, kind, id)
);

CREATE TABLE audit (
    seq bigserial PRIMARY KEY,
    revision bigint NOT NULL,
    at bigint NOT NULL,
    actor text NOT NULL,
    action text NOT NULL,
    kind text NOT NULL,
    entity_id text NOT NULL,
    before text,
    after text
);
CREATE INDEX audit_entity ON audit (kind, entity_id);
