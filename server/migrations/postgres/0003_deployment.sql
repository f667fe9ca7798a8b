-- This deployment's identity: made once, when the database is made or upgraded to this
-- version, and the same for every replica on the database. A replica on the NATS bus writes
-- it into the presence bucket and refuses to start where another deployment's is found, so
-- that two deployments on one NATS server never take each other's stores and commands for
-- their own (NATS_PREFIX keeps them apart).
CREATE TABLE backhaul_deployment (
    one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    id TEXT NOT NULL
);
INSERT INTO backhaul_deployment (id) VALUES (replace(gen_random_uuid()::text, '-', ''));
