-- The edge's tables as create_all made them on sqlite before migrations (commit
-- f3de973), frozen: a database of the first schema, for the migration tests.

CREATE TABLE jobs (
	id VARCHAR(32) NOT NULL,
	kind VARCHAR(16) NOT NULL,
	state VARCHAR(16) NOT NULL,
	stage VARCHAR(32) NOT NULL,
	progress FLOAT NOT NULL,
	message TEXT NOT NULL,
	params TEXT NOT NULL,
	result TEXT,
	error TEXT,
	created_at DATETIME NOT NULL,
	updated_at DATETIME NOT NULL,
	PRIMARY KEY (id)
);
CREATE INDEX ix_jobs_created_at ON jobs (created_at);
CREATE INDEX ix_jobs_state ON jobs (state);
CREATE TABLE local_models (
	id INTEGER NOT NULL,
	base_version INTEGER,
	source VARCHAR(16) NOT NULL,
	sha256 VARCHAR(64) NOT NULL,
	created_at DATETIME NOT NULL,
	active BOOLEAN NOT NULL,
	metrics TEXT,
	note TEXT NOT NULL,
	PRIMARY KEY (id)
);
CREATE INDEX ix_local_models_active ON local_models (active);
CREATE TABLE state (
	"key" VARCHAR(64) NOT NULL,
	value TEXT NOT NULL,
	PRIMARY KEY ("key")
);
