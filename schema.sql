-- dicom_assets state database (PostgreSQL). Applied idempotently by StateStore.create_schema().
-- The SQLite fallback is built from the same table definitions in dicom_assets/store/tables.py;
-- a test checks that the two agree.

CREATE TABLE IF NOT EXISTS patients (
    patient_id          TEXT PRIMARY KEY,            -- PatientID exactly as the PACS returns it
    partition_key       TEXT NOT NULL UNIQUE,        -- dicom_assets.layout.patient_key(patient_id)
    patient_name        TEXT,
    patient_sex         TEXT,
    patient_birth_date  TEXT,                        -- DICOM DA, YYYYMMDD
    date_created        TIMESTAMPTZ NOT NULL DEFAULT now(),
    date_modified       TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid  TEXT PRIMARY KEY,            -- never StudyID: it is not unique
    patient_id          TEXT NOT NULL REFERENCES patients (patient_id) ON DELETE CASCADE,
    study_id            TEXT,
    study_date          TEXT,
    study_time          TEXT,
    accession_number    TEXT,
    study_description   TEXT,
    modalities_in_study TEXT,                        -- backslash-separated, as in DICOM
    date_created        TIMESTAMPTZ NOT NULL DEFAULT now(),
    date_modified       TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS studies_patient_idx ON studies (patient_id);

CREATE TABLE IF NOT EXISTS series (
    series_instance_uid  TEXT PRIMARY KEY,
    study_instance_uid   TEXT NOT NULL REFERENCES studies (study_instance_uid) ON DELETE CASCADE,
    patient_id           TEXT NOT NULL REFERENCES patients (patient_id) ON DELETE CASCADE,
    series_number        INTEGER,
    modality             TEXT,
    series_description   TEXT,
    body_part_examined   TEXT,
    institution_name     TEXT,
    series_date          TEXT,
    series_time          TEXT,
    expected_instances   INTEGER,                    -- NumberOfSeriesRelatedInstances; NULL = unknown
    downloaded_instances INTEGER NOT NULL DEFAULT 0, -- instance files on disk after the last attempt
    downloaded_bytes     BIGINT NOT NULL DEFAULT 0,
    download_status      TEXT NOT NULL DEFAULT 'pending'
        CHECK (download_status IN ('pending', 'in_progress', 'complete', 'incomplete', 'failed', 'skipped')),
    attempts             INTEGER NOT NULL DEFAULT 0,
    last_error           TEXT,
    claimed_by           TEXT,                       -- worker holding the download claim
    claim_expires_at     TIMESTAMPTZ,                -- a claim past this time is free again
    downloaded_at        TIMESTAMPTZ,
    date_created         TIMESTAMPTZ NOT NULL DEFAULT now(),
    date_modified        TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS series_patient_idx ON series (patient_id);
CREATE INDEX IF NOT EXISTS series_study_idx ON series (study_instance_uid);
CREATE INDEX IF NOT EXISTS series_status_idx ON series (download_status);

CREATE TABLE IF NOT EXISTS archives (
    archive_id      BIGSERIAL PRIMARY KEY,
    patient_id      TEXT NOT NULL REFERENCES patients (patient_id) ON DELETE CASCADE,
    file_name       TEXT NOT NULL,                   -- <patient key><delimiter><series_count>.zip
    series_count    INTEGER NOT NULL,
    instance_count  INTEGER NOT NULL,
    bytes           BIGINT NOT NULL,
    sha256          TEXT NOT NULL,
    superseded_at   TIMESTAMPTZ,                     -- set when a newer archive of the patient exists
    removed_at      TIMESTAMPTZ,                     -- set when the superseded file was deleted
    date_created    TIMESTAMPTZ NOT NULL DEFAULT now(),
    date_modified   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS archives_patient_idx ON archives (patient_id, archive_id);
-- Publishing to a second site (publish.directory): where and when this zip was copied, verified.
ALTER TABLE archives ADD COLUMN IF NOT EXISTS published_to TEXT;
ALTER TABLE archives ADD COLUMN IF NOT EXISTS published_at TIMESTAMPTZ;

-- The PACS request budget shared by every process and run (dicom_assets.pacs.budget.DatabaseBudget).
-- One row per PACS, locked FOR UPDATE by each token request, so grants to one PACS are serialised.
CREATE TABLE IF NOT EXISTS pacs_budgets (
    pacs_key        TEXT PRIMARY KEY,                -- "host:port/called_ae"
    last_sent_at    TIMESTAMPTZ,                     -- time of the newest grant (grants never go back in time)
    granted         BIGINT NOT NULL DEFAULT 0,       -- tokens handed out, ever
    deferred        BIGINT NOT NULL DEFAULT 0        -- token requests answered "wait" (the budget was full)
);

-- One row per granted request still inside the window; older rows are pruned by the next request.
CREATE TABLE IF NOT EXISTS pacs_request_log (
    request_id      BIGSERIAL PRIMARY KEY,
    pacs_key        TEXT NOT NULL REFERENCES pacs_budgets (pacs_key) ON DELETE CASCADE,
    sent_at         TIMESTAMPTZ NOT NULL,            -- grant time on the database clock
    what            TEXT NOT NULL                    -- associate, C-ECHO, C-FIND, C-MOVE, C-GET
);
CREATE INDEX IF NOT EXISTS pacs_request_log_key_idx ON pacs_request_log (pacs_key, sent_at);

CREATE OR REPLACE FUNCTION dicom_assets_touch_date_modified() RETURNS trigger AS $$
BEGIN
    NEW.date_modified = now();
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

DO $$
DECLARE t TEXT;
BEGIN
    FOREACH t IN ARRAY ARRAY['patients', 'studies', 'series', 'archives'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = t || '_date_modified') THEN
            EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE ON %I FOR EACH ROW '
                           'EXECUTE FUNCTION dicom_assets_touch_date_modified()', t || '_date_modified', t);
        END IF;
    END LOOP;
END;
$$;

-- Incremental discovery (dicom_assets.discovery). The PACS's computed counts as last answered, and
-- "outdated since" marks: set when a row is new or its counts changed, NULL once the level below
-- was queried again. Existing rows get now(), so an upgraded DB checks everything once.
ALTER TABLE patients ADD COLUMN IF NOT EXISTS related_studies INTEGER;         -- NumberOfPatientRelatedStudies
ALTER TABLE patients ADD COLUMN IF NOT EXISTS related_series INTEGER;          -- NumberOfPatientRelatedSeries
ALTER TABLE patients ADD COLUMN IF NOT EXISTS related_instances INTEGER;       -- NumberOfPatientRelatedInstances
ALTER TABLE patients ADD COLUMN IF NOT EXISTS studies_outdated_at TIMESTAMPTZ DEFAULT now();  -- NULL: studies known
ALTER TABLE studies ADD COLUMN IF NOT EXISTS related_series INTEGER;           -- NumberOfStudyRelatedSeries
ALTER TABLE studies ADD COLUMN IF NOT EXISTS related_instances INTEGER;        -- NumberOfStudyRelatedInstances
ALTER TABLE studies ADD COLUMN IF NOT EXISTS series_outdated_at TIMESTAMPTZ DEFAULT now();    -- NULL: series known

-- One row per PACS ("host:port/called_ae", like pacs_budgets): the date watermark of discovery.
CREATE TABLE IF NOT EXISTS discovery_watermarks (
    pacs_key        TEXT PRIMARY KEY,
    watermark       TEXT NOT NULL,                   -- DICOM DA: local date the last complete pass started
    passed_at       TIMESTAMPTZ NOT NULL,            -- when that pass ended
    full_pass_at    TIMESTAMPTZ                      -- when the last full pass (every StudyDate) ended
);

-- Claims at scale (StateStore.claim_next_series). claimed_in_run: the retrieval run that last
-- claimed the series; a run skips series it already claimed (instead of sending an ever longer
-- NOT IN list). series_claim_idx is the claim order over not-complete series only, so a claim
-- reads a few index entries however many of a million series are complete.
ALTER TABLE series ADD COLUMN IF NOT EXISTS claimed_in_run TEXT;
CREATE INDEX IF NOT EXISTS series_claim_idx
    ON series (patient_id, study_instance_uid, series_number, series_instance_uid)
    WHERE download_status <> 'complete';

-- Which schema.sql texts (SHA-256) were applied. StateStore.create_schema() runs this file only when
-- its hash is missing here: its ALTER TABLEs lock hot tables even when they alter nothing.
CREATE TABLE IF NOT EXISTS schema_applied (
    sha256      TEXT PRIMARY KEY,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Attempts measure the series, not the network (dicom_assets.retrieval). series.attempts counts
-- only attempts that brought no new instance and ended in an answer of the PACS (a refusal, a
-- failed or partial retrieve); network_faults counts attempts that brought nothing and broke on
-- the connection (reset, refused, timeout, abort), which cost time, never the series. Before
-- this column, every claim counted as an attempt: when StateStore.create_schema() adds it, it
-- moves the count of series whose last error was a connection fault to network_faults, and
-- those given up for it become retryable (store/base.py, NETWORK_FAULTS_MIGRATION).
ALTER TABLE series ADD COLUMN IF NOT EXISTS network_faults INTEGER NOT NULL DEFAULT 0;

-- The adaptive request rate (dicom_assets.pacs.adaptive_rate): the limit in force after the
-- PACS's resets, shared by every worker and machine through this row.
ALTER TABLE pacs_budgets ADD COLUMN IF NOT EXISTS rate_limit INTEGER;              -- NULL: the configured maximum
ALTER TABLE pacs_budgets ADD COLUMN IF NOT EXISTS rate_changed_at TIMESTAMPTZ;     -- last cut; recovery counts from it
ALTER TABLE pacs_budgets ADD COLUMN IF NOT EXISTS resets BIGINT NOT NULL DEFAULT 0; -- resets/aborts reported, ever
ALTER TABLE pacs_budgets ADD COLUMN IF NOT EXISTS lowest_limit INTEGER;            -- the lowest limit reached
ALTER TABLE pacs_budgets ADD COLUMN IF NOT EXISTS last_reset_at TIMESTAMPTZ;

-- Every instance written, with the transfer syntax it arrived in (dicom_assets.store.instances):
-- a PACS that transcodes on the way (C-GET with a poor proposal) shows here and in the series'
-- counts below, which the inventory and the validation report carry.
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid            TEXT PRIMARY KEY,
    series_instance_uid         TEXT NOT NULL REFERENCES series (series_instance_uid) ON DELETE CASCADE,
    sop_class_uid               TEXT,
    transfer_syntax_uid         TEXT NOT NULL,       -- as received, and in the file
    stored_transfer_syntax_uid  TEXT,                -- as the PACS stores it (IMAGE-level Available Transfer Syntax UID); NULL: not said
    bytes                       BIGINT NOT NULL,
    received_at                 TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS instances_series_idx ON instances (series_instance_uid);
ALTER TABLE series ADD COLUMN IF NOT EXISTS transfer_syntaxes TEXT;                              -- received, distinct, backslash-separated
ALTER TABLE series ADD COLUMN IF NOT EXISTS transcoded_instances INTEGER NOT NULL DEFAULT 0;      -- received in another syntax than stored
ALTER TABLE series ADD COLUMN IF NOT EXISTS lossy_transcoded_instances INTEGER NOT NULL DEFAULT 0; -- ... lossy from a lossless original

-- Cohorts as researchers define them (dicom_assets.series_filter, dicom_assets.request_rows).
-- A series that the series filters (selection.series) or the request file's rows do not want is
-- 'skipped', with the rule that skipped it in skip_reason; it is never claimed, never counted as
-- missing, and not counted in the zip's <N>. A complete series is never skipped (nothing
-- downloaded is dropped); a skipped series becomes 'pending' again when the rules want it.
ALTER TABLE series DROP CONSTRAINT IF EXISTS series_download_status_check;
ALTER TABLE series ADD CONSTRAINT series_download_status_check
    CHECK (download_status IN ('pending', 'in_progress', 'complete', 'incomplete', 'failed', 'skipped'));
ALTER TABLE series ADD COLUMN IF NOT EXISTS skip_reason TEXT;          -- why the series is skipped; NULL otherwise
ALTER TABLE series ADD COLUMN IF NOT EXISTS sop_classes TEXT;          -- SOP Class UIDs of its instances, backslash-separated; NULL = not asked
ALTER TABLE studies ADD COLUMN IF NOT EXISTS sop_classes_in_study TEXT; -- SOPClassesInStudy as the PACS answered; NULL = not given

-- The request file's rows (selection.request_file) and what each resolved to, shared by every
-- worker. A row is keyed by what it asks for (RequestRow.key: IDs, window, modalities, regex),
-- not by where it stands in the file, so re-sorting the file changes nothing and editing a row
-- makes it a new request. A row removed from the file is kept with active = FALSE: it stops
-- being fetched, nothing downloaded is deleted.
CREATE TABLE IF NOT EXISTS request_rows (
    row_key             TEXT PRIMARY KEY,
    row_number          INTEGER NOT NULL,            -- first file row asking for it (header = row 1)
    patient_id          TEXT,
    accession_number    TEXT,
    study_instance_uid  TEXT,
    study_date_from     TEXT,                        -- YYYYMMDD
    study_date_until    TEXT,
    modalities          TEXT,                        -- backslash-separated; NULL = any
    study_description   TEXT,                        -- a regex, searched case-insensitively
    active              BOOLEAN NOT NULL DEFAULT TRUE,
    resolution          TEXT NOT NULL DEFAULT 'unresolved'
        CHECK (resolution IN ('unresolved', 'found', 'not_found', 'ambiguous', 'rejected')),
    reason              TEXT,                        -- why not_found / ambiguous / rejected
    resolved_at         TIMESTAMPTZ,
    date_created        TIMESTAMPTZ NOT NULL DEFAULT now(),
    date_modified       TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- The studies a row matched (an ambiguous row's too, for its report; those are not fetched).
CREATE TABLE IF NOT EXISTS request_row_studies (
    row_key             TEXT NOT NULL REFERENCES request_rows (row_key) ON DELETE CASCADE,
    study_instance_uid  TEXT NOT NULL,
    patient_id          TEXT NOT NULL,
    PRIMARY KEY (row_key, study_instance_uid)
);
CREATE INDEX IF NOT EXISTS request_row_studies_study_idx ON request_row_studies (study_instance_uid);
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'request_rows_date_modified') THEN
        CREATE TRIGGER request_rows_date_modified BEFORE UPDATE ON request_rows FOR EACH ROW
            EXECUTE FUNCTION dicom_assets_touch_date_modified();
    END IF;
END;
$$;

-- De-identified copies for sharing (dicom_assets.deid, dicom_assets/deid/pipeline.py). The
-- crosswalk: a patient's pseudonym and date shift, made from the deidentify.secret by HMAC and
-- kept here so a collision (two patients, one pseudonym) is settled once and for ever, and so
-- the honest broker can export it (dicom-assets crosswalk). It never leaves this DB otherwise.
CREATE TABLE IF NOT EXISTS pseudonyms (
    patient_id       TEXT PRIMARY KEY REFERENCES patients (patient_id) ON DELETE CASCADE,
    pseudonym        TEXT NOT NULL UNIQUE,
    date_shift_days  INTEGER NOT NULL,                -- added to every date of the patient (negative)
    attempt          INTEGER NOT NULL DEFAULT 0,      -- > 0: earlier HMAC pseudonyms were taken
    date_created     TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- One row per de-identified zip <pseudonym><delimiter><N>.zip, made from the patient's
-- identifiable archive source_archive_id: a newer identifiable archive means a rebuild.
CREATE TABLE IF NOT EXISTS deidentified_archives (
    archive_id         BIGSERIAL PRIMARY KEY,
    patient_id         TEXT NOT NULL REFERENCES patients (patient_id) ON DELETE CASCADE,
    source_archive_id  BIGINT NOT NULL,
    file_name          TEXT NOT NULL,
    series_count       INTEGER NOT NULL,              -- series in the zip
    excluded_series    INTEGER NOT NULL DEFAULT 0,    -- left out (burned-in text): series.deid_excluded_reason
    instance_count     INTEGER NOT NULL,
    bytes              BIGINT NOT NULL,
    sha256             TEXT NOT NULL,
    superseded_at      TIMESTAMPTZ,
    removed_at         TIMESTAMPTZ,
    published_to       TEXT,
    published_at       TIMESTAMPTZ,
    date_created       TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS deidentified_archives_patient_idx ON deidentified_archives (patient_id, archive_id);
ALTER TABLE series ADD COLUMN IF NOT EXISTS deid_excluded_reason TEXT;  -- why the series is not in the de-identified copy

-- New work flows by itself under the daemon (dicom_assets.store.pending_work, sensor
-- new_patient_work): when the per-patient pipeline last started on the patient. Work marked
-- after it (an outdated mark, a series never tried) has not been seen by any run yet; work
-- marked before it was, and waits for the retrieval schedule if that run could not finish it.
ALTER TABLE patients ADD COLUMN IF NOT EXISTS pipeline_started_at TIMESTAMPTZ;

-- The adaptive number of concurrent retrieves (dicom_assets.pacs.adaptive_concurrency): the
-- count in force for a PACS, shared by every worker and machine through its row, cut with the
-- request rate on a reset (one controller), and the slots that count the retrieves in flight.
ALTER TABLE pacs_budgets ADD COLUMN IF NOT EXISTS concurrency_limit INTEGER;               -- NULL: not probed yet
ALTER TABLE pacs_budgets ADD COLUMN IF NOT EXISTS concurrency_cut_at TIMESTAMPTZ;                  -- the last halving
ALTER TABLE pacs_budgets ADD COLUMN IF NOT EXISTS concurrency_peak INTEGER;                -- the highest count reached
ALTER TABLE pacs_budgets ADD COLUMN IF NOT EXISTS concurrency_cuts BIGINT NOT NULL DEFAULT 0; -- halvings (A7xx/C0xx, resets)
CREATE TABLE IF NOT EXISTS pacs_slots (
    pacs_key    TEXT NOT NULL REFERENCES pacs_budgets (pacs_key) ON DELETE CASCADE,
    holder      TEXT NOT NULL,                       -- host:pid:thread of the worker
    expires_at  TIMESTAMPTZ NOT NULL,                -- renewed every epoch; a dead holder's slot frees itself
    PRIMARY KEY (pacs_key, holder)
);
