-- Every data-quality check evaluation, as the checks record it (the alert sensor reads the latest
-- result per check; the Dagster UI shows the same results as asset-check history).

CREATE TABLE quality_check_results (
    result_id    bigserial PRIMARY KEY,
    check_name   text        NOT NULL,
    asset        text        NOT NULL,
    passed       boolean     NOT NULL,
    severity     text        NOT NULL CHECK (severity IN ('ERROR', 'WARN')),
    description  text        NOT NULL,              -- one sentence: what was found
    metadata     jsonb       NOT NULL DEFAULT '{}',
    run_id       text,
    evaluated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX quality_check_results_latest ON quality_check_results (asset, check_name, evaluated_at DESC);
