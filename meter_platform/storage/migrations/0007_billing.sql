-- Billing: the customer registry, subscriptions to plans, and invoices with their lines.
-- Plans themselves live in the catalog (plans.yaml); a subscription names a plan by its key.

CREATE TABLE customers (
    id          text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 256),
    name        text,
    email       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- A customer's subscriptions never overlap (checked under a lock on the customer row when written):
-- a plan change ends the running subscription at the instant the new one starts.
CREATE TABLE subscriptions (
    subscription_id bigserial PRIMARY KEY,
    customer_id     text        NOT NULL REFERENCES customers (id),
    plan            text        NOT NULL,
    starts_at       timestamptz NOT NULL,
    ends_at         timestamptz,                  -- null: running
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (ends_at IS NULL OR ends_at > starts_at)
);
CREATE INDEX subscriptions_customer ON subscriptions (customer_id, starts_at);

-- One invoice per customer and billing period (a calendar month in UTC, 'YYYY-MM'). Its id is derived
-- from both, so rebuilding a draft keeps the id. Final invoices carry a gapless number per year.
CREATE TABLE invoices (
    id            text PRIMARY KEY,
    customer_id   text        NOT NULL REFERENCES customers (id),
    period        text        NOT NULL CHECK (period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    period_start  timestamptz NOT NULL,
    period_end    timestamptz NOT NULL,
    status        text        NOT NULL CHECK (status IN ('draft', 'final')),
    currency      text        NOT NULL,
    number        text UNIQUE,
    subtotal      numeric     NOT NULL,
    total         numeric     NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    finalized_at  timestamptz,
    UNIQUE (customer_id, period),
    CHECK ((status = 'final') = (number IS NOT NULL AND finalized_at IS NOT NULL))
);
CREATE INDEX invoices_period ON invoices (period, status);

CREATE TABLE invoice_lines (
    invoice_id            text        NOT NULL REFERENCES invoices (id),
    line_no               integer     NOT NULL,
    type                  text        NOT NULL CHECK (type IN ('base_fee', 'usage', 'minimum', 'adjustment')),
    plan                  text        NOT NULL,
    meter                 text,
    grp                   jsonb,                  -- the group's dimension values, for grouped charges
    description           text        NOT NULL,
    quantity              numeric,                -- usage: the meter's value; adjustment: the change
    events                bigint,                 -- usage: events the meter counted; adjustment: the change
    amount                numeric     NOT NULL,   -- rounded once, half-up, to the currency's minor unit
    precise_amount        numeric     NOT NULL,
    service_period_start  timestamptz NOT NULL,
    service_period_end    timestamptz NOT NULL,
    tiers                 jsonb       NOT NULL DEFAULT '[]',
    adjusts_period        text,
    PRIMARY KEY (invoice_id, line_no)
);
CREATE INDEX invoice_lines_adjusts ON invoice_lines (adjusts_period) WHERE adjusts_period IS NOT NULL;

-- Gapless invoice numbers: the counter row is updated in the finalizing transaction, so a rollback
-- gives the number back.
CREATE TABLE invoice_numbers (
    year         integer PRIMARY KEY,
    last_number  integer NOT NULL
);

-- A final invoice never changes: not its row, not its lines. Only draft -> final is allowed.
CREATE FUNCTION refuse_final_invoice_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'invoices' THEN
        IF OLD.status = 'final' THEN
            RAISE EXCEPTION 'invoice % is final and cannot be changed', OLD.id;
        END IF;
    ELSIF EXISTS (SELECT 1 FROM invoices WHERE id = coalesce(OLD.invoice_id, NEW.invoice_id) AND status = 'final') THEN
        RAISE EXCEPTION 'invoice % is final: its lines cannot be changed', coalesce(OLD.invoice_id, NEW.invoice_id);
    END IF;
    RETURN coalesce(NEW, OLD);
END $$;
CREATE TRIGGER invoices_final_immutable BEFORE UPDATE OR DELETE ON invoices
    FOR EACH ROW EXECUTE FUNCTION refuse_final_invoice_change();
CREATE TRIGGER invoice_lines_final_immutable BEFORE INSERT OR UPDATE OR DELETE ON invoice_lines
    FOR EACH ROW EXECUTE FUNCTION refuse_final_invoice_change();
