-- The server's tables as create_all made them on postgresql before migrations (commit
-- f3de973), frozen: a database of the first schema, for the migration tests.

CREATE TABLE cycles (
	id SERIAL NOT NULL,
	state VARCHAR(16) NOT NULL,
	base_model_version INTEGER NOT NULL,
	spec_json TEXT NOT NULL,
	spec_hash VARCHAR(64) NOT NULL,
	min_edges INTEGER NOT NULL,
	deadline TIMESTAMP WITH TIME ZONE NOT NULL,
	created_at TIMESTAMP WITH TIME ZONE NOT NULL,
	updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
	result_model_version INTEGER,
	metrics_json TEXT,
	reason TEXT,
	PRIMARY KEY (id)
);
CREATE INDEX ix_cycles_state ON cycles (state);
CREATE UNIQUE INDEX one_collecting_cycle ON cycles (state) WHERE state = 'collecting';
CREATE TABLE edges (
	id VARCHAR(32) NOT NULL,
	name VARCHAR(64) NOT NULL,
	token_hash VARCHAR(64) NOT NULL,
	created_at TIMESTAMP WITH TIME ZONE NOT NULL,
	revoked BOOLEAN NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (token_hash)
);
CREATE UNIQUE INDEX one_active_edge_name ON edges (name) WHERE NOT revoked;
CREATE TABLE leases (
	name VARCHAR(64) NOT NULL,
	owner VARCHAR(128) NOT NULL,
	expires_at TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (name)
);
CREATE TABLE models (
	version INTEGER NOT NULL,
	parent INTEGER,
	backbone VARCHAR(64) NOT NULL,
	cut VARCHAR(64) NOT NULL,
	input_size INTEGER NOT NULL,
	class_names_json TEXT NOT NULL,
	metrics_json TEXT,
	sha256 VARCHAR(64) NOT NULL,
	size BIGINT NOT NULL,
	created_at TIMESTAMP WITH TIME ZONE NOT NULL,
	trained_from_json TEXT,
	privacy_json TEXT,
	PRIMARY KEY (version)
);
CREATE TABLE cycle_members (
	cycle_id INTEGER NOT NULL,
	edge_id VARCHAR(32) NOT NULL,
	joined_at TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (cycle_id, edge_id),
	FOREIGN KEY(cycle_id) REFERENCES cycles (id),
	FOREIGN KEY(edge_id) REFERENCES edges (id)
);
CREATE TABLE edge_evaluations (
	id SERIAL NOT NULL,
	edge_id VARCHAR(32) NOT NULL,
	model_version INTEGER NOT NULL,
	report_json TEXT NOT NULL,
	reported_at TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (id),
	CONSTRAINT one_report_per_model UNIQUE (edge_id, model_version),
	FOREIGN KEY(edge_id) REFERENCES edges (id)
);
CREATE INDEX ix_edge_evaluations_edge_id ON edge_evaluations (edge_id);
CREATE TABLE uploads (
	id SERIAL NOT NULL,
	cycle_id INTEGER NOT NULL,
	edge_id VARCHAR(32) NOT NULL,
	sha256 VARCHAR(64) NOT NULL,
	size BIGINT NOT NULL,
	rows INTEGER NOT NULL,
	received_at TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (id),
	CONSTRAINT one_upload_per_edge UNIQUE (cycle_id, edge_id),
	FOREIGN KEY(cycle_id) REFERENCES cycles (id),
	FOREIGN KEY(edge_id) REFERENCES edges (id)
);
CREATE INDEX ix_uploads_cycle_id ON uploads (cycle_id);
