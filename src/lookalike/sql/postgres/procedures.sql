-- lookalike's PL/Python routines, in schema lookalike. Each is a thin call of the pipeline step
-- the CLI runs (see src/lookalike/plpython.py); the step reaches the database again over the
-- server's unix socket as the current role, and commits its work as it does from the CLI.
--
-- Installed by `lookalike db install`, which writes the folder it copied lookalike and its
-- dependencies to into each body (as a Python string, where the body says sys.path.insert),
-- and the image store's folder (the string after the routine's name). Both are in the body,
-- not read from a table, so only the routines' owner (a superuser) decides which code the
-- server runs and where it writes files: roles that may edit lookalike.settings do not. Each body starts with the same preamble: on a session's
-- first call, put that folder first on sys.path and import lookalike.plpython, kept in GD
-- (PL/Python's per-session dictionary) for the session's later calls.
--
-- The procedures commit their own work and so refuse to run inside BEGIN ... COMMIT (SQLSTATE
-- 25001); similar_images refuses a transaction that has written or locked more than reads do.
--
-- A failure comes back as the exception to raise here, so psql shows
-- "ERROR:  lookalike.<routine>: <message>" with a SQLSTATE; its CONTEXT names only the raise below.

CREATE OR REPLACE PROCEDURE lookalike.load_images(source text, label_column text DEFAULT NULL)
LANGUAGE plpython3u AS $body$
if "lookalike" not in GD:
    import sys
    sys.path.insert(0, @PLPYTHON_PATH@)
    import lookalike.plpython
    GD["lookalike"] = lookalike.plpython
failure = GD["lookalike"].call(plpy, "load_images", @STORE_PATH@, source=source, label_column=label_column)
if failure:
    raise failure
$body$;
COMMENT ON PROCEDURE lookalike.load_images IS 'Load images from a folder (one sub-folder per label) or a manifest, as seen by the server';

CREATE OR REPLACE PROCEDURE lookalike.hash_images()
LANGUAGE plpython3u AS $body$
if "lookalike" not in GD:
    import sys
    sys.path.insert(0, @PLPYTHON_PATH@)
    import lookalike.plpython
    GD["lookalike"] = lookalike.plpython
failure = GD["lookalike"].call(plpy, "hash_images", @STORE_PATH@)
if failure:
    raise failure
$body$;
COMMENT ON PROCEDURE lookalike.hash_images IS 'Perceptual hashes for every loaded image that has none';

CREATE OR REPLACE PROCEDURE lookalike.dedupe(rule text DEFAULT 'verified', hash text DEFAULT NULL, size int DEFAULT NULL,
                                              max_distance int DEFAULT NULL)
LANGUAGE plpython3u AS $body$
if "lookalike" not in GD:
    import sys
    sys.path.insert(0, @PLPYTHON_PATH@)
    import lookalike.plpython
    GD["lookalike"] = lookalike.plpython
failure = GD["lookalike"].call(plpy, "dedupe", @STORE_PATH@, rule=rule, hash=hash, size=size, max_distance=max_distance)
if failure:
    raise failure
$body$;
COMMENT ON PROCEDURE lookalike.dedupe IS 'Group duplicates: rule verified (hash and embedding candidates, each checked), exact or near; NULL hash, size, max_distance: the rule''s defaults';

CREATE OR REPLACE PROCEDURE lookalike.featurize_images(backbone text DEFAULT 'efficientnet-lite0', batch_size int DEFAULT 32)
LANGUAGE plpython3u AS $body$
if "lookalike" not in GD:
    import sys
    sys.path.insert(0, @PLPYTHON_PATH@)
    import lookalike.plpython
    GD["lookalike"] = lookalike.plpython
failure = GD["lookalike"].call(plpy, "featurize_images", @STORE_PATH@, backbone=backbone, batch_size=batch_size)
if failure:
    raise failure
$body$;
COMMENT ON PROCEDURE lookalike.featurize_images IS 'CNN embeddings for every image that has none';

CREATE OR REPLACE PROCEDURE lookalike.prepare_data(test_ratio float8 DEFAULT 0.25, queries_per_label int DEFAULT 20, negatives_per_query int DEFAULT 100)
LANGUAGE plpython3u AS $body$
if "lookalike" not in GD:
    import sys
    sys.path.insert(0, @PLPYTHON_PATH@)
    import lookalike.plpython
    GD["lookalike"] = lookalike.plpython
failure = GD["lookalike"].call(plpy, "prepare_data", @STORE_PATH@, test_ratio=test_ratio, queries_per_label=queries_per_label, negatives_per_query=negatives_per_query)
if failure:
    raise failure
$body$;
COMMENT ON PROCEDURE lookalike.prepare_data IS 'Stratified train/test split; remembers the evaluation parameters';

CREATE OR REPLACE PROCEDURE lookalike.train_classifier()
LANGUAGE plpython3u AS $body$
if "lookalike" not in GD:
    import sys
    sys.path.insert(0, @PLPYTHON_PATH@)
    import lookalike.plpython
    GD["lookalike"] = lookalike.plpython
failure = GD["lookalike"].call(plpy, "train_classifier", @STORE_PATH@)
if failure:
    raise failure
$body$;
COMMENT ON PROCEDURE lookalike.train_classifier IS 'Train the classifier on the train split; scores for every image';

CREATE OR REPLACE PROCEDURE lookalike.evaluate_model()
LANGUAGE plpython3u AS $body$
if "lookalike" not in GD:
    import sys
    sys.path.insert(0, @PLPYTHON_PATH@)
    import lookalike.plpython
    GD["lookalike"] = lookalike.plpython
failure = GD["lookalike"].call(plpy, "evaluate_model", @STORE_PATH@)
if failure:
    raise failure
$body$;
COMMENT ON PROCEDURE lookalike.evaluate_model IS 'The ranking protocol and retrieval measures, with the parameters prepare_data remembered';

CREATE OR REPLACE PROCEDURE lookalike.rank_candidates(top_k int DEFAULT 10)
LANGUAGE plpython3u AS $body$
if "lookalike" not in GD:
    import sys
    sys.path.insert(0, @PLPYTHON_PATH@)
    import lookalike.plpython
    GD["lookalike"] = lookalike.plpython
failure = GD["lookalike"].call(plpy, "rank_candidates", @STORE_PATH@, top_k=top_k)
if failure:
    raise failure
$body$;
COMMENT ON PROCEDURE lookalike.rank_candidates IS 'Top-k of every query in query_images into ranking_results (the test split when it is empty)';

CREATE OR REPLACE PROCEDURE lookalike.run_once(source text DEFAULT NULL)
LANGUAGE plpython3u AS $body$
if "lookalike" not in GD:
    import sys
    sys.path.insert(0, @PLPYTHON_PATH@)
    import lookalike.plpython
    GD["lookalike"] = lookalike.plpython
failure = GD["lookalike"].call(plpy, "run_once", @STORE_PATH@, source=source)
if failure:
    raise failure
$body$;
COMMENT ON PROCEDURE lookalike.run_once IS 'The whole pipeline: load (when source is given), hash, featurize, dedupe, split, train, evaluate, rank';

CREATE OR REPLACE FUNCTION lookalike.similar_images(query_image_id bigint, k int DEFAULT 10)
RETURNS TABLE (rank int, image_id bigint, label text, distance float8, similarity float8, source text)
LANGUAGE plpython3u VOLATILE AS $body$
if "lookalike" not in GD:
    import sys
    sys.path.insert(0, @PLPYTHON_PATH@)
    import lookalike.plpython
    GD["lookalike"] = lookalike.plpython
rows, failure = GD["lookalike"].similar(plpy, @STORE_PATH@, query_image_id, k)
if failure:
    raise failure
return rows
$body$;
COMMENT ON FUNCTION lookalike.similar_images(bigint, int) IS 'The k stored images most similar to a stored image id, best first';

CREATE OR REPLACE FUNCTION lookalike.similar_images(query text, k int DEFAULT 10)
RETURNS TABLE (rank int, image_id bigint, label text, distance float8, similarity float8, source text)
LANGUAGE plpython3u VOLATILE AS $body$
if "lookalike" not in GD:
    import sys
    sys.path.insert(0, @PLPYTHON_PATH@)
    import lookalike.plpython
    GD["lookalike"] = lookalike.plpython
rows, failure = GD["lookalike"].similar(plpy, @STORE_PATH@, query, k)
if failure:
    raise failure
return rows
$body$;
COMMENT ON FUNCTION lookalike.similar_images(text, int) IS 'The k stored images most similar to a path (as the server sees it) or a URL, best first';

-- These routines read files and URLs as the server's OS user: only the roles a DBA grants may run them.
REVOKE EXECUTE ON PROCEDURE lookalike.load_images(text, text) FROM PUBLIC;
REVOKE EXECUTE ON PROCEDURE lookalike.hash_images() FROM PUBLIC;
REVOKE EXECUTE ON PROCEDURE lookalike.dedupe(text, text, int, int) FROM PUBLIC;
REVOKE EXECUTE ON PROCEDURE lookalike.featurize_images(text, int) FROM PUBLIC;
REVOKE EXECUTE ON PROCEDURE lookalike.prepare_data(float8, int, int) FROM PUBLIC;
REVOKE EXECUTE ON PROCEDURE lookalike.train_classifier() FROM PUBLIC;
REVOKE EXECUTE ON PROCEDURE lookalike.evaluate_model() FROM PUBLIC;
REVOKE EXECUTE ON PROCEDURE lookalike.rank_candidates(int) FROM PUBLIC;
REVOKE EXECUTE ON PROCEDURE lookalike.run_once(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION lookalike.similar_images(bigint, int) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION lookalike.similar_images(text, int) FROM PUBLIC;
