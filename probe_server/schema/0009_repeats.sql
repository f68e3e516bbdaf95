-- Repeat workers and answers we could not read.
--
-- MTurk keeps a worker out of an excluding batch only once `hits sync` has
-- granted them the "took part" qualification, so before a sync a worker can
-- accept two HITs of a split batch, or HITs of two batches that exclude each
-- other. The survey page looks for the worker's sessions on the other HITs
-- of the experiment when it is opened for an accepted assignment: this index
-- keeps that a lookup of the worker's few sessions.
CREATE INDEX sessions_worker ON sessions (worker_id, hit_id) WHERE visit = 'accepted';

