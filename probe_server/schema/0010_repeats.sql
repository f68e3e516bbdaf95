-- Repeat workers, and answers we could not read.
--
-- MTurk keeps a worker out of an excluding batch only once `hits sync` has
-- granted them the "took part" qualification, so before a sync a worker can
-- accept two HITs of a split batch, or HITs of two batches that exclude each
-- other. The survey page looks for the worker's sessions on the other HITs
-- of the experiment when it is opened for an accepted assignment: this index
-- keeps that a lookup of the worker's few sessions.
CREATE INDEX sessions_worker ON sessions (worker_id, hit_id) WHERE visit = 'accepted';


-- Why MTurk's Answer (QuestionFormAnswers XML) of an assignment could not be
-- read: not well-formed, an entity declaration (refused, never expanded),
-- not QuestionFormAnswers. NULL when it was read. `answers` is then '{}' and
-- review leaves the assignment for a person, instead of blaming the worker
-- for what our parser could not read.
ALTER TABLE assignments ADD COLUMN answer_error TEXT;
