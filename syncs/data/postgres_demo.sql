-- Demo tables for the Postgres example syncs (syncs/pg_*.yaml).
--   createdb backflow_demo && psql -d backflow_demo -f syncs/data/postgres_demo.sql
-- Re-running it resets the tables.
DROP TABLE IF EXISTS accounts, usage_events;
DROP TYPE IF EXISTS account_plan;

CREATE TYPE account_plan AS ENUM ('free', 'team', 'enterprise');

CREATE TABLE accounts (
    account_id   integer PRIMARY KEY,
    name         text NOT NULL,
    plan         account_plan NOT NULL,
    mrr          numeric(12, 2) NOT NULL,
    seats        integer NOT NULL,
    tags         text[] NOT NULL DEFAULT '{}',
    settings     jsonb NOT NULL DEFAULT '{}',
    signed_up_at timestamptz NOT NULL
);

INSERT INTO accounts VALUES
    (1, 'Acme Corp',       'enterprise', 4200.00, 120, '{manufacturing,emea}', '{"sso": true, "region": "eu"}', '2023-02-14 09:30:00+00'),
    (2, 'Globex',          'team',        349.50,  18, '{energy}',             '{"sso": false}',                '2023-06-01 14:00:00+00'),
    (3, 'Initech',         'free',          0.00,   3, '{}',                   '{}',                            '2024-01-09 08:15:00+00'),
    (4, 'Umbrella Health', 'team',        899.00,  40, '{health,us}',          '{"sso": true, "hipaa": true}',  '2024-03-22 17:45:00+00'),
    (5, 'Hooli',           'enterprise', 9800.00, 310, '{tech}',               '{"sso": true, "region": "us"}', '2022-11-30 11:00:00+00');

CREATE TABLE usage_events (
    event_id    uuid PRIMARY KEY,
    account_id  integer NOT NULL REFERENCES accounts,
    feature     text NOT NULL,
    quantity    bigint NOT NULL,
    occurred_at timestamptz NOT NULL
);

INSERT INTO usage_events
SELECT md5('event' || g)::uuid, 1 + g % 5, (ARRAY['export', 'api', 'dashboard'])[1 + g % 3], g * 10,
       timestamptz '2024-06-01 00:00:00+00' + g * interval '1 hour'
FROM generate_series(1, 24) g;
