"""The step registry: every step's parameters (type, default, bounds, choices, help), written once.

The front ends are built from it: the CLI's sub-commands (:mod:`lookalike.cli`),
``lookalike run`` and :func:`lookalike.pipeline.run_pipeline`, the PL/Python
routines (:func:`procedures_sql`) and the web app's query parameters. The step
functions take their defaults from here (``k: int = default("similar", "k")``),
so a new parameter is one :class:`Param` here plus the keyword in its function.

This module imports nothing heavier than :mod:`lookalike.errors` and
:mod:`lookalike.config`: the CLI builds its parser from it without loading torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import DEFAULT_BACKBONE
from .errors import BadInput

REQUIRED = object()   # a parameter with no default (a positional argument of the CLI)


@dataclass(frozen=True)
class Param:
    name: str                        # the step function's keyword
    type: type                       # int, float, str, bool or Path
    default: Any = REQUIRED
    help: str = ""
    bounds: tuple[float, float] | None = None   # inclusive, unless open
    open: bool = False               # bounds exclusive (a ratio strictly between 0 and 1)
    choices: tuple[str, ...] | None = None
    flag: str | None = None          # CLI spelling when not --<name>; "" for an optional positional argument
    nargs: str | None = None         # "+" for a list
    run: str | None = None           # its name in `lookalike run` and run_pipeline, when not ``name``
    metavar: str | None = None

    @property
    def positional(self) -> bool:
        return self.default is REQUIRED or self.flag == ""

    @property
    def run_name(self) -> str:
        return self.run or self.name

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def check(self, value: Any, name: str | None = None) -> Any:
        """``value`` when it is within the bounds and choices, else :class:`BadInput` naming ``name``."""
        name = name or self.name
        if value is None:
            return value
        if self.bounds is not None:
            low, high = self.bounds
            number = int if self.type is int else (int, float)
            if isinstance(value, bool) or not isinstance(value, number) or not (
                    low < value < high if self.open else low <= value <= high):
                exclusive = " (exclusive)" if self.open else ""
                raise BadInput(f"{name} must be between {_plain(low)} and {_plain(high)}{exclusive}, not {value!r}")
        if self.choices is not None and value not in self.choices:
            raise BadInput(f"{name} must be one of {', '.join(self.choices)}, not {value!r}")
        return value


@dataclass(frozen=True)
class Step:
    name: str                        # the CLI sub-command
    function: str                    # "module.function" in lookalike
    help: str
    params: tuple[Param, ...]

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def kwargs(self, values: dict[str, Any], *, by_run_name: bool = False) -> dict[str, Any]:
        """The step function's keyword arguments among ``values`` (keyed by run names when ``by_run_name``)."""
        key = (lambda p: p.run_name) if by_run_name else (lambda p: p.name)
        return {p.name: values[key(p)] for p in self.params if key(p) in values}


def _plain(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


# ---------------------------------------------------------------- parameters shared by several steps

SEED = Param("seed", int, 0, "random seed")
BACKBONE = Param("backbone", str, DEFAULT_BACKBONE,
                 "efficientnet-lite0 (whole image), efficientnet-lite0-texture (centre, no colour) or "
                 "efficientnet-lite0-dual (both, joined; featurize takes twice as long)")
FEATURE_MODEL = replace(BACKBONE, name="feature_model", flag="--backbone", run="backbone")
SPACE = Param("space", str, "auto", "auto: the space evaluate measured best (else pca where fitted, else "
              "embeddings); embeddings: the CNN vectors; pca: fitted on the collection, label-free; learned: "
              "fitted on the train split's labels; scores: the classifier's class probabilities",
              choices=("auto", "embeddings", "pca", "learned", "scores"))
DEVICE = Param("device", str, "cpu", "cpu or cuda")
RULE = Param("rule", str, "verified", "verified: hash and embedding candidates, each checked; exact: equal "
             "hashes, in SQL; near: within --max-distance bits", choices=("verified", "exact", "near"),
             run="dedupe_rule")
HASH_KIND = Param("hash_kind", str, None, "hash kind (default: dhash_rowcol; size 3 for exact, 8 otherwise)",
                  choices=("dhash_rowcol", "ahash", "dhash", "phash", "whash"), flag="--hash", run="dedupe_hash")
HASH_SIZE = Param("size", int, None, "hash size (default: the rule's)", bounds=(1, 64), run="dedupe_size")
MAX_DISTANCE = Param("max_distance", int, None, "near rule: radius in bits (default: 10 of 128); verified rule: "
                     "candidate radius (default: 16)")
DEDUPE_BACKBONE = replace(BACKBONE, flag="--dedupe-backbone", run="dedupe_backbone",
                          help="verified rule: whose embeddings to compare")
LOW_DETAIL = Param("include_low_detail", bool, False,
                   "exact and near rules: let flat images join groups (the verified rule always checks them)")
CONCURRENCY = Param("concurrency", int, 8, "transfers at once", bounds=(1, 1024))
INDEX_KIND = Param("index", str, "auto", "vector search: exact (NumPy), ivf (FAISS, approximate), auto: ivf from "
                   "200,000 vectors", choices=("auto", "exact", "ivf"))
ID_MAX = 2**63 - 1   # ids are signed 64-bit integers in every database we run on

STEPS: dict[str, Step] = {step.name: step for step in [
    Step("samples", "samples.render_samples", "render the sample texture set into DIR", (
        Param("out_dir", Path, help="folder to render the images, manifest and ground truth into", metavar="DIR"),
        Param("per_label", int, 100, "images per label", bounds=(1, 100_000)),
        replace(SEED, help="random seed of the rendering"),
        Param("copy_share", float, 0.10, "share of planted near-copies", bounds=(0, 1)))),
    Step("load", "ingest.load_images", "load images from a folder tree or a manifest", (
        Param("source", str, help="folder (one sub-folder per label) or manifest (.tsv/.csv/.txt)"),
        Param("label_column", str, None, "manifest column holding the label (default: label)"),
        CONCURRENCY)),
    Step("hash", "hashing.hash_images", "perceptual hashes (dHash 1..8, a/d/p/wHash) for new images", (
        Param("imagehash_sizes", int, (8,), "sizes for aHash/dHash/pHash/wHash (powers of two)", nargs="+",
              metavar="N"),
        Param("draft", bool, False, "decode JPEGs at reduced scale: faster, hashes differ from the reference "
              "packages"))),
    Step("featurize", "features.featurize_images", "CNN embeddings for images that have none", (
        BACKBONE, DEVICE, Param("batch_size", int, 32, "images per batch", bounds=(1, 1024)))),
    Step("dedupe", "dedupe.dedupe_images", "group duplicate images (never deletes)", (
        RULE, HASH_KIND, HASH_SIZE, MAX_DISTANCE, DEDUPE_BACKBONE,
        Param("per_label", bool, False, "group only images with the same label", run="dedupe_per_label"),
        LOW_DETAIL)),
    Step("duplicates", "reports.duplicate_groups_report", "list the groups of the latest dedupe run (review them "
         "with `duplicates review`)", (
        Param("run_id", int, None, "dedupe run id (default: the latest)", bounds=(1, ID_MAX), flag="--run"),
        Param("sort", str, "size", "size: largest groups first; doubt: lowest score first; id",
              choices=("size", "doubt", "id")),
        Param("limit", int, None, "at most this many groups (default: all)", bounds=(1, 1_000_000)),
        Param("offset", int, 0, "skip this many groups first", bounds=(0, ID_MAX)))),
    Step("uniques", "dedupe.unique_counts", "unique images per label at each dHash size 8..1", (
        replace(LOW_DETAIL, help="count flat images as the exact rule groups them"),)),
    Step("is-duplicate", "dedupe.is_duplicate", "is a new image a copy of a stored one?", (
        replace(RULE, choices=("verified", "near")), HASH_KIND, HASH_SIZE, MAX_DISTANCE, DEDUPE_BACKBONE,
        Param("limit", int, 10, "most matches to list", bounds=(1, 1000), flag="--top"),
        replace(LOW_DETAIL, help="near rule: match flat images too"))),
    Step("split", "split.split_images", "stratified train/test split of the unique images", (
        Param("test_ratio", float, 0.25, "share of each label in the test split", bounds=(0, 1), open=True),
        SEED)),
    Step("train", "classify.train_classifier", "train the classifier on the training embeddings", (
        FEATURE_MODEL, SEED, Param("cv_folds", int, 5, "cross-validation folds for the regularisation",
                                   bounds=(2, 100)))),
    Step("fit", "spaces.fit_spaces", "fit the similarity spaces on the collection: pca (label-free), learned "
         "(on the train split's labels, where there are two or more)", (
        BACKBONE, SEED)),
    Step("evaluate", "evaluate.evaluate_model", "the ranking protocol: top-k accuracy, mAP, recall", (
        FEATURE_MODEL,
        Param("queries_per_label", int, 20, "query images per label", bounds=(1, 10_000)),
        Param("negatives_per_query", int, 100, "negatives per query", bounds=(1, 10_000), flag="--negatives"),
        SEED,
        Param("plot", Path, None, "save top-k accuracy curves as a PNG"))),
    Step("rank", "search.rank_queries", "top-K for every query image into ranking_results", (
        Param("top", int, 10, "results per query", bounds=(1, 1000)), SPACE, BACKBONE)),
    Step("similar", "search.similar_images", "the most similar stored images to an image", (
        Param("query", str, help="a stored image id, a path or a URL", metavar="image"),
        Param("k", int, 10, "how many similar images", bounds=(1, 1000), flag="--top"),
        SPACE, BACKBONE,
        INDEX_KIND,
        Param("label", str, None, "only images with this label (still --top of them)"),
        Param("exclude_duplicates", bool, False, "hide the images the latest dedupe run found to be copies "
              "(as the unique_images view does; still --top of them)"))),
    Step("export", "export.export_images", "write the unique images, flat, by label or as Train/<label>/ and "
         "Test/<label>/, with a manifest", (
        Param("dest", str, help="a folder, or az://container/prefix (Azure Blob Storage)"),
        Param("layout", str, None, "flat: one folder; by-label: <label>/ (unlabelled images left out); "
              "train-test: Train/<label>/ and Test/<label>/ of the split (default: train-test when a split "
              "exists, else by-label when labels exist, else flat)", choices=("flat", "by-label", "train-test")),
        Param("name_by", str, "sha256", "file names: the content hash, the dHash, or the source's own file name "
              "(sha256 where two would share one)", choices=("sha256", "dhash", "source")),
        Param("dry_run", bool, False, "list what would be written, write nothing"),
        CONCURRENCY,
        Param("create_container", bool, False, "create the blob container if missing"),
        Param("connection_string_env", str, "AZURE_STORAGE_CONNECTION_STRING",
              "environment variable holding the storage connection string"),
        Param("force", bool, False, "overwrite a manifest.csv or transferimages.txt that lookalike did not "
              "write"))),
    Step("inspect", "quality.inspect_images", "image-quality report: score images not inspected yet, store the "
         "scores, list the flagged ones", (
        Param("all_images", bool, False, "inspect every image again, not only new ones", flag="--all"),
        Param("flag", str, None, "list only images with this flag (default: any flag)",
              choices=("blurry", "dark", "bright", "low-information", "odd-aspect", "tiny")))),
]}

# `lookalike duplicates ACTION`: reviewing the latest run's groups (the web page's buttons call the same).
IMAGE = Param("image", int, None, bounds=(1, ID_MAX), metavar="IMAGE")
REVIEW_ACTIONS: dict[str, Step] = {step.name: step for step in [
    Step("review", "review.review_group", "record a decision on a group of the latest run; later dedupe runs "
         "honour it", (
        Param("group_id", int, help="the group's id", bounds=(1, ID_MAX), metavar="GROUP"),
        replace(IMAGE, name="not_duplicate", help="this image of the group is not a copy of the others"),
        replace(IMAGE, name="keep", help="keep this image of the group (it becomes the keeper)"),
        Param("confirm", bool, False, "the group is right: keep it together in later runs"),
        Param("by", str, None, "who decides (default: your login name)"),
        Param("note", str, None, "a note kept with the decision"))),
    Step("removable", "review.removable_images", "the non-keepers of the latest run, decisions applied: their "
         "store paths and sources, for a script (lookalike deletes nothing)", ()),
    Step("decisions", "review.list_decisions", "every review decision, with who and when", ()),
]}

# `lookalike index ACTION`: the persistent vector index beside the image store (lookalike.index).
INDEX_ACTIONS: dict[str, Step] = {step.name: step for step in [
    Step("status", "index.index_status", "size, generation, fresh or stale, and IVF recall@10 on a sample", (
        BACKBONE,)),
    Step("rebuild", "index.rebuild_index", "rebuild the index from the database's embeddings", (
        BACKBONE, INDEX_KIND)),
]}

# `lookalike spark JOB`: the steps on Apache Spark (lookalike.spark). Each job takes --master.
SPARK_MASTER = Param("master", str, "local[*]", "Spark master: local[*], spark://host:7077, yarn, k8s://…")
SPARK_OUT = Param("out", Path, None, "folder for the Parquet output, replaced each run (default: <store>.spark/JOB "
                  "beside the image store); on a cluster, one the driver and every executor see")
SPARK_SOURCE = Param("source", str, None, "read the image files from here instead of the image store: a folder or "
                     "any path Spark reads (hdfs://, s3a://); matched to loaded images by SHA-256")
SPARK_JOBS: dict[str, Step] = {step.name: step for step in [
    Step("hash", "spark.hash.spark_hash", "the hash step on Spark: Parquet, then into the database", (
        SPARK_MASTER, SPARK_OUT, SPARK_SOURCE, *STEPS["hash"].params)),
    Step("featurize", "spark.featurize.spark_featurize", "the featurize step on Spark (one model per executor "
         "process): Parquet, then into the database, then the vector index catches up", (
        SPARK_MASTER, SPARK_OUT, SPARK_SOURCE, *STEPS["featurize"].params)),
    Step("neardup", "spark.neardup.neardup_job", "the near rule's all-pairs Hamming search on Spark: pairs as "
         "Parquet, then a dedupe run on them (from the database)", (
        SPARK_MASTER, SPARK_OUT,
        Param("hashes", str, None, "Parquet of image_id and value (or hex) to search instead of the database; "
              "writes the pairs only"),
        HASH_KIND, HASH_SIZE, replace(MAX_DISTANCE, help="radius in bits (default: 10 of 128, as dedupe's near rule)"),
        STEPS["dedupe"].param("per_label"), LOW_DETAIL)),
    Step("index", "spark.index_build.index_job", "rebuild the vector index, its IVF rows added on Spark's "
         "executors and merged (the index folder must be at the same path on every node)", (
        SPARK_MASTER, BACKBONE, INDEX_KIND)),
]}

# `lookalike import FOLDER`: a Spark job's Parquet merged into the database (on SQLite the jobs do it themselves).
IMPORT = Step("import", "importing.import_output", "merge a `lookalike spark hash` or `spark featurize` Parquet "
              "output into the database (idempotent: rows already there are kept)", (
    Param("folder", Path, help="the job's output folder (it holds _lookalike.json)", metavar="FOLDER"),))

# `lookalike run`: these steps in this order (featurize before dedupe: the verified rule compares
# embeddings). Its options are theirs, by run name; one option may feed several steps (seed, backbone).
RUN_STEPS = ("load", "hash", "featurize", "dedupe", "split", "train", "fit", "evaluate", "rank")
RUN_SOURCE = Param("source", str, None, "folder or manifest to load first", flag="")


def run_params() -> tuple[Param, ...]:
    """The options of ``lookalike run`` and :func:`~lookalike.pipeline.run_pipeline`, one per run name."""
    found: dict[str, Param] = {"source": RUN_SOURCE}
    for step in RUN_STEPS:
        for p in STEPS[step].params:
            if p.run_name in found:
                continue  # shared (seed, backbone): a test checks that the steps agree on it
            found[p.run_name] = replace(p, name=p.run_name, run=None, flag=p.cli_flag)
    return tuple(found.values())


def default(step: str, name: str) -> Any:
    """The default of parameter ``name`` of ``step``: what the step function's signature says."""
    value = STEPS[step].param(name).default
    if value is REQUIRED:
        raise KeyError(f"{step}.{name} has no default")
    return value


def check(step: str, **values: Any) -> None:
    """:class:`BadInput` for the first of ``values`` outside its bounds or choices."""
    for name, value in values.items():
        STEPS[step].param(name).check(value)


# ---------------------------------------------------------------- PL/Python routines

@dataclass(frozen=True)
class RoutineParam:
    step: str
    param: str
    sql: str | None = None           # the SQL name, when not the parameter's
    sql_type: str | None = None      # when not the parameter type's

    @property
    def spec(self) -> Param:
        return run_param(self.param) if self.step == "run" else STEPS[self.step].param(self.param)

    @property
    def name(self) -> str:
        return self.sql or self.param

    @property
    def type(self) -> str:
        return self.sql_type or SQL_TYPES[self.spec.type]


SQL_TYPES = {str: "text", int: "int", float: "float8"}


@dataclass(frozen=True)
class Routine:
    name: str
    comment: str
    params: tuple[RoutineParam, ...] = ()
    returns: str | None = None       # a function returning this table; else a procedure
    step: str | None = None          # the one step it calls with its parameters; else plpython has an adapter

    @property
    def kind(self) -> str:
        return "FUNCTION" if self.returns else "PROCEDURE"

    @property
    def signature(self) -> str:
        return f"lookalike.{self.name}({', '.join(p.type for p in self.params)})"

    def check(self, values: dict[str, Any]) -> None:
        """:class:`BadInput` (SQLSTATE 22023) for the first of ``values`` that is NULL where the step has no
        NULL default, or outside its parameter's bounds; names (rule, backbone) are the step's to check."""
        for p in self.params:
            if p.name not in values:
                continue
            if values[p.name] is None and p.spec.default is not None:
                raise BadInput(f"{p.name} must not be NULL")
            if p.spec.type is not str:
                p.spec.check(values[p.name], p.name)


def run_param(name: str) -> Param:
    return next(p for p in run_params() if p.name == name)


_SIMILAR = "rank int, image_id bigint, label text, distance float8, similarity float8, source text"
ROUTINES: tuple[Routine, ...] = (
    Routine("load_images", "Load images from a folder (one sub-folder per label) or a manifest, as seen by "
            "the server", (RoutineParam("load", "source"), RoutineParam("load", "label_column")), step="load"),
    Routine("hash_images", "Perceptual hashes for every loaded image that has none", step="hash"),
    Routine("dedupe", "Group duplicates: rule verified (hash and embedding candidates, each checked), exact or "
            "near; NULL hash, size, max_distance: the rule's defaults",
            (RoutineParam("dedupe", "rule"), RoutineParam("dedupe", "hash_kind", "hash"),
             RoutineParam("dedupe", "size"), RoutineParam("dedupe", "max_distance")), step="dedupe"),
    Routine("featurize_images", "CNN embeddings for every image that has none",
            (RoutineParam("featurize", "backbone"), RoutineParam("featurize", "batch_size")), step="featurize"),
    Routine("prepare_data", "Stratified train/test split; remembers the evaluation parameters",
            (RoutineParam("split", "test_ratio"), RoutineParam("evaluate", "queries_per_label"),
             RoutineParam("evaluate", "negatives_per_query"))),
    Routine("train_classifier", "Train the classifier on the train split; scores for every image", step="train"),
    Routine("evaluate_model", "The ranking protocol and retrieval measures, with the parameters prepare_data "
            "remembered"),
    Routine("rank_candidates", "Top-k of every query in query_images into ranking_results (the test split when "
            "it is empty)", (RoutineParam("rank", "top", "top_k"),)),
    Routine("run_once", "The whole pipeline: load (when source is given), hash, featurize, dedupe, split, "
            "train, evaluate, rank", (RoutineParam("run", "source"),)),
    Routine("similar_images", "The k stored images most similar to a stored image id, best first",
            (RoutineParam("similar", "query", "query_image_id", "bigint"), RoutineParam("similar", "k")),
            returns=_SIMILAR),
    Routine("similar_images", "The k stored images most similar to a path (as the server sees it) or a URL, "
            "best first", (RoutineParam("similar", "query"), RoutineParam("similar", "k")), returns=_SIMILAR),
)
# prepare_data remembers its values for evaluate_model and run_once; these stand in until it runs.
PREPARED_DEFAULTS = {p.name: p.spec.default for p in next(r for r in ROUTINES if r.name == "prepare_data").params}


def routine(name: str) -> Routine:
    """Routine ``name``; of similar_images' two, the one taking text (both take the same k)."""
    return next(r for r in reversed(ROUTINES) if r.name == name)


def _sql_default(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return _plain(value) if isinstance(value, float) and value.is_integer() else str(value)


PLPYTHON_PATH = "@PLPYTHON_PATH@"   # filled in by install: where the server imports lookalike from
STORE_PATH = "@STORE_PATH@"         # filled in by install: the image store's folder

# Each body's first lines: on a session's first call, put install's folder first on sys.path and
# import lookalike.backend (no database driver: it imports lookalike.plpython when it needs it), kept in GD
# (PL/Python's per-session dictionary) for later calls.
PREAMBLE = f"""if "lookalike" not in GD:
    import sys
    sys.path.insert(0, {PLPYTHON_PATH})
    import lookalike.backend
    GD["lookalike"] = lookalike.backend
"""

SQL_HEADER = """\
-- lookalike's PL/Python routines, in schema lookalike, generated from lookalike.steps (the step
-- registry). Each is a thin call of the pipeline step the CLI runs (see lookalike/plpython.py); the
-- step reaches the database again over the server's unix socket as the current role, and commits
-- its work as it does from the CLI.
--
-- `lookalike db install` writes the folder it copied lookalike and its dependencies to (where the
-- body says sys.path.insert) and the image store's folder (the string after the routine's name)
-- into each body, so only the routines' owner (a superuser) decides which code the server runs and
-- where it writes files: roles that may edit lookalike.settings do not.
--
-- The procedures commit their own work and so refuse to run inside BEGIN ... COMMIT (SQLSTATE
-- 25001); similar_images refuses a transaction that has written or locked more than reads do. A
-- failure comes back as the exception to raise, so psql shows "ERROR:  lookalike.<routine>:
-- <message>" with a SQLSTATE; its CONTEXT names only the raise below.
"""


def _routine_sql(r: Routine) -> str:
    params = ", ".join(f"{p.name} {p.type}" + ("" if p.spec.default is REQUIRED
                                              else f" DEFAULT {_sql_default(p.spec.default)}")
                       for p in r.params)
    if r.returns:
        head = f"CREATE OR REPLACE FUNCTION lookalike.{r.name}({params})\nRETURNS TABLE ({r.returns})\n" \
               f"LANGUAGE plpython3u VOLATILE AS $body$\n"
        call = (f'rows, failure = GD["lookalike"].similar(plpy, {STORE_PATH}, '
                f'{", ".join(p.name for p in r.params)})\nif failure:\n    raise failure\nreturn rows\n')
    else:
        head = f"CREATE OR REPLACE PROCEDURE lookalike.{r.name}({params})\nLANGUAGE plpython3u AS $body$\n"
        args = "".join(f", {p.name}={p.name}" for p in r.params)
        call = f'failure = GD["lookalike"].call(plpy, "{r.name}", {STORE_PATH}{args})\nif failure:\n    raise failure\n'
    comment = r.comment.replace("'", "''")
    return f"{head}{PREAMBLE}{call}$body$;\nCOMMENT ON {r.kind} {r.signature} IS '{comment}';\n"


def procedures_sql(target: str | Path = PLPYTHON_PATH, store: str | Path = STORE_PATH) -> str:
    """The SQL that creates every routine; ``target`` and ``store`` go into the bodies as Python strings."""
    script = SQL_HEADER + "\n" + "\n".join(_routine_sql(r) for r in ROUTINES)
    script += ("\n-- These routines read files and URLs as the server's OS user: only the roles a DBA grants "
               "may run them.\n")
    script += "".join(f"REVOKE EXECUTE ON {r.kind} {r.signature} FROM PUBLIC;\n" for r in ROUTINES)
    if target != PLPYTHON_PATH:
        script = script.replace(PLPYTHON_PATH, json.dumps(str(target)))
    if store != STORE_PATH:
        script = script.replace(STORE_PATH, json.dumps(str(store)))
    return script
