"""Evaluate step: the original solution's ranking protocol, and retrieval over the whole test set.

Ranking protocol. For each label, up to ``queries_per_label`` query images are
drawn from the test split. Each gets one positive (another test image of its
label, or a train image of its label when the test split has no other) and
``negatives_per_query`` negatives (images of other labels, drawn without
replacement from the test split, topped up from the train split when the test
split has too few, and fewer than asked — with a note — when both together
have too few; ``evaluation_pairs`` has one row per query and candidate, so a
candidate cannot be drawn twice). The positive's rank among its 1 + N
candidates, by distance to the query, gives top-k accuracy (share of queries
whose positive is within the first k) and the mean and median rank.

Retrieval. Every test image is a query against all other test images; the
relevant ones are those of its label. AP@10 = (1 / min(R, 10)) · Σ_{k≤10}
P(k)·rel(k), with R the number of relevant images; mAP@10 is its mean over the
queries. recall@10 is the standard fraction of a query's relevant images found
in its top 10 (|relevant ∩ top10| / R), averaged over queries — at most 10 / R,
so below 1 for any label with more than 11 test images. Queries with no other
image of their label are left out of both.

Both are measured with L2 and cosine distance, in the raw embedding space, in
the class-score space of the latest classifier trained on those embeddings
(skipped, with a note, when there is none), and in every similarity space fitted
on them (:mod:`lookalike.spaces`). The space with the best top-1 (cosine) is
recorded as the default that ``similar``, ``rank``, the web app and the
procedures use for ``--space auto``. Ties in distance are broken
conservatively: a relevant image (the positive) ranks after every
non-relevant one at the same distance. Draws depend only on the seed and the
images' sha256, so the same data gives the same pairs in any database.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .config import DEFAULT_BACKBONE
from .db import (Database, embeddings, evaluation_pairs, evaluation_results, evaluations, images,
                 latest_classifier_scores, latest_feature_model, now, recorded_run, splits, vector_from_bytes)
from .errors import BadInput, Precondition
from .projection import fitted_spaces
from .spaces import record_default
from .steps import default

TOP_K = (1, 2, 4, 5, 8, 10, 15, 20, 28, 32)
RETRIEVAL_K = 10
METRICS = ("l2", "cosine")
BLOCK_CELLS = 2**24  # distances per block of retrieval queries: 128 MiB of float64, whatever the test size


@dataclass(frozen=True)
class EvaluationSummary:
    evaluation_id: int
    feature_model: str
    model_id: int | None            # the classifier whose scores were evaluated, if any
    labels: int
    queries: int
    pairs: int                      # rows in evaluation_pairs: queries × (1 + negatives)
    test_images: int
    results: tuple[tuple[str, str, str, float], ...]  # (space, metric, measure, value)
    notes: tuple[str, ...]
    plot: Path | None
    default_space: str | None = None   # recorded for --space auto; None without ranking-protocol queries

    def value(self, space: str, metric: str, measure: str) -> float:
        for row in self.results:
            if row[:3] == (space, metric, measure):
                return row[3]
        raise KeyError((space, metric, measure))

    def as_json(self) -> dict:
        """Every space's measures, by space, metric and measure, the default marked."""
        spaces: dict[str, dict] = {}
        for space, metric, measure, value in self.results:
            spaces.setdefault(space, {"default": space == self.default_space}).setdefault(metric, {})[measure] = value
        return {"evaluation_id": self.evaluation_id, "feature_model": self.feature_model,
                "classifier_id": self.model_id, "labels": self.labels, "queries": self.queries, "pairs": self.pairs,
                "test_images": self.test_images, "default_space": self.default_space, "spaces": spaces,
                "notes": list(self.notes)}

    def lines(self) -> list[str]:
        model = f", classifier {self.model_id}" if self.model_id is not None else ""
        out = [f"evaluate ({self.feature_model}{model}): {self.queries} queries over {self.labels} labels, "
               f"{self.pairs} pairs; retrieval over {self.test_images} test images"]
        columns = [f"top{k}" for k in TOP_K] + ["mean_rank", "median_rank", f"map@{RETRIEVAL_K}",
                                                 f"recall@{RETRIEVAL_K}"]
        headers = [f"top{k}" for k in TOP_K] + ["mean", "median", f"mAP@{RETRIEVAL_K}", f"R@{RETRIEVAL_K}"]
        out.append(f"  {'space':<11}{'metric':<7}" + "".join(f"{h:>7}" for h in headers))
        table: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
        for space, metric, measure, value in self.results:
            table[space, metric][measure] = value
        for (space, metric), values in table.items():
            cells = [f"{'-':>7}" if c not in values else f"{values[c]:>7.2f}" if "rank" in c
                     else f"{values[c]:>7.3f}" for c in columns]
            out.append(f"  {space:<11}{metric:<7}" + "".join(cells))
        if self.default_space is not None:
            out.append(f"  default space: {self.default_space} (best top1, cosine), used where --space is auto")
        out += [f"  note: {note}" for note in self.notes]
        if self.plot is not None:
            out.append(f"  plot: {self.plot}")
        return out


@dataclass(frozen=True)
class _TestSet:
    ids: np.ndarray        # image ids, all split images with an embedding, ordered by sha256
    labels: np.ndarray     # str
    is_test: np.ndarray    # bool
    vectors: np.ndarray    # float32 embeddings, one row per image


def evaluate_model(db: Database, *, queries_per_label: int = default("evaluate", "queries_per_label"),
                   negatives_per_query: int = default("evaluate", "negatives_per_query"),
                   seed: int = default("evaluate", "seed"), feature_model: str = DEFAULT_BACKBONE,
                   plot: Path | None = None) -> EvaluationSummary:
    """Run the ranking protocol and the test-set retrieval; store pairs and results; optionally plot."""
    if queries_per_label < 1 or negatives_per_query < 1:
        raise BadInput("queries_per_label and negatives_per_query must be at least 1")
    seed = int(seed)
    inputs = {"queries_per_label": queries_per_label, "negatives_per_query": negatives_per_query, "seed": seed,
              "feature_model": feature_model}
    with recorded_run(db, "evaluate", inputs) as counts:
        with db.engine.connect() as conn:
            feature_model_id = latest_feature_model(conn, feature_model)
            data, split_params = _load_split(conn, feature_model_id)
            model_id, score_vectors = _load_scores(conn, feature_model_id, data.ids)
            fitted = fitted_spaces(conn, feature_model_id)
        inputs.update(split=split_params, model_id=model_id)
        notes: list[str] = []
        queries = _draw_queries(data, queries_per_label, negatives_per_query, np.random.default_rng(seed), notes)

        spaces = {"embeddings": data.vectors}
        if model_id is None:
            notes.append(f"no classifier trained on {feature_model} embeddings: scores space skipped")
        elif score_vectors is None:
            notes.append(f"classifier {model_id} has not scored every split image: scores space skipped "
                         f"(run `lookalike train` again)")
        else:
            spaces["scores"] = score_vectors
        for space in fitted:   # the split's images in the space, from the stored parameters
            spaces[space.name] = space.project(data.vectors)
        if not fitted:
            notes.append(f"no similarity space fitted on {feature_model} embeddings: run `lookalike fit`")
        if not queries:
            notes.append("no test image has another image of its label: no ranking-protocol queries")
        test_labels = data.labels[data.is_test]
        if len(set(test_labels)) == len(test_labels):
            notes.append("no two test images share a label: no retrieval measures")
        results: list[tuple[str, str, str, float]] = []
        for space, vectors in spaces.items():
            for metric in METRICS:
                results += _ranking_results(space, metric, vectors, queries)
                results += _retrieval_results(space, metric, vectors[data.is_test], test_labels)

        if plot is not None:  # before storing: a plot that cannot be written leaves nothing half done
            plot_top_k(results, Path(plot), title=f"Ranking protocol: {len(queries)} queries ({feature_model})")
        evaluation_id = _store(db, feature_model_id, model_id, inputs, notes, data.ids, queries, results)
        default_space = None
        if queries:
            table: dict[str, dict[str, float]] = defaultdict(dict)
            for space, metric, measure, value in results:
                if metric == "cosine":
                    table[space][measure] = value
            with db.begin() as conn:
                default_space = record_default(conn, feature_model_id, table, evaluation_id)
        summary = EvaluationSummary(
            evaluation_id=evaluation_id, feature_model=feature_model, model_id=model_id,
            labels=len(set(test_labels)), queries=len(queries),
            pairs=sum(1 + len(negatives) for _, _, negatives in queries), test_images=len(test_labels),
            results=tuple(results), notes=tuple(notes), plot=Path(plot) if plot is not None else None,
            default_space=default_space)
        counts.update(evaluation_id=evaluation_id, queries=summary.queries, pairs=summary.pairs,
                      spaces=list(spaces), notes=len(notes), default_space=default_space)
    return summary


def _load_split(conn: Connection, feature_model_id: int) -> tuple[_TestSet, dict[str, Any]]:
    split_params = conn.execute(sa.select(splits.c.seed, splits.c.test_ratio).limit(1)).first()
    if split_params is None:
        raise Precondition("no train/test split: run `lookalike split` first")
    rows = conn.execute(
        sa.select(images.c.id, images.c.label, splits.c.split, embeddings.c.vector)
        .select_from(splits.join(images, images.c.id == splits.c.image_id)
                     .join(embeddings, sa.and_(embeddings.c.image_id == splits.c.image_id,
                                               embeddings.c.model_id == feature_model_id)))
        .order_by(images.c.sha256)  # draws then depend on content, not on ids
    ).all()
    data = _TestSet(ids=np.array([r.id for r in rows], dtype=np.int64),
                    labels=np.array([r.label for r in rows], dtype=object),
                    is_test=np.array([r.split == "test" for r in rows], dtype=bool),
                    vectors=np.stack([vector_from_bytes(r.vector) for r in rows]) if rows else np.zeros((0, 0)))
    test_labels = set(data.labels[data.is_test])
    if len(test_labels) < 2:
        raise Precondition(f"need test images with embeddings of at least 2 labels, found {len(test_labels)}: "
                           "run `lookalike featurize`, or split a collection with more labels")
    return data, {"seed": split_params.seed, "test_ratio": split_params.test_ratio}


def _load_scores(conn: Connection, feature_model_id: int, ids: np.ndarray) -> tuple[int | None, np.ndarray | None]:
    """The latest classifier on these embeddings, and its score vectors in ``ids`` order (None if any is missing)."""
    model_id, stored = latest_classifier_scores(conn, feature_model_id)
    if model_id is None:
        return None, None
    if any(int(i) not in stored for i in ids):
        return model_id, None
    return model_id, np.stack([vector_from_bytes(stored[int(i)]) for i in ids])


Query = tuple[int, int, np.ndarray]  # (query row, positive row, negative rows) in _TestSet order


def _draw_queries(data: _TestSet, per_label: int, negatives: int, rng: np.random.Generator,
                  notes: list[str]) -> list[Query]:
    queries: list[Query] = []
    short_negatives, topped_up, no_positive, from_train = 0, 0, 0, 0
    for label in sorted(set(data.labels[data.is_test])):
        same = data.labels == label
        test_same = np.flatnonzero(same & data.is_test)
        train_same = np.flatnonzero(same & ~data.is_test)
        test_other = np.flatnonzero(~same & data.is_test)
        train_other = np.flatnonzero(~same & ~data.is_test)
        for query in rng.choice(test_same, size=min(per_label, len(test_same)), replace=False):
            others = test_same[test_same != query]
            if len(others):
                positive = int(rng.choice(others))
            elif len(train_same):
                positive = int(rng.choice(train_same))
                from_train += 1
            else:
                no_positive += 1
                continue
            if len(test_other) >= negatives:
                drawn = rng.choice(test_other, size=negatives, replace=False)
            else:
                top_up = rng.choice(train_other, size=min(negatives - len(test_other), len(train_other)),
                                    replace=False)
                drawn = np.concatenate([test_other, top_up])
                topped_up += len(top_up) > 0
                short_negatives += len(drawn) < negatives
            queries.append((int(query), positive, drawn.astype(np.int64)))
    if from_train:
        notes.append(f"{from_train} queries had no other test image of their label: positive from the train split")
    if no_positive:
        notes.append(f"{no_positive} test images had no other image of their label: not used as queries")
    if topped_up:
        notes.append(f"{topped_up} queries had fewer than {negatives} test images of other labels: "
                     "negatives topped up from the train split")
    if short_negatives:
        notes.append(f"{short_negatives} queries got fewer than {negatives} negatives "
                     "(too few images of other labels in the whole split)")
    return queries


def _distances(metric: str, query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Distances from each row of ``query`` (2-D) to each row of ``candidates``, in float64."""
    q = np.asarray(query, dtype=np.float64)
    c = np.asarray(candidates, dtype=np.float64)
    if metric == "l2":
        squared = (q * q).sum(1)[:, None] + (c * c).sum(1)[None, :] - 2.0 * q @ c.T
        return np.sqrt(np.maximum(squared, 0.0))
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return 1.0 - q @ c.T


def _ranking_results(space: str, metric: str, vectors: np.ndarray,
                     queries: list[Query]) -> list[tuple[str, str, str, float]]:
    if not queries:
        return []
    ranks = []
    for query, positive, negatives in queries:
        d = _distances(metric, vectors[[query]], vectors[np.concatenate([[positive], negatives])])[0]
        ranks.append(1 + int((d[1:] <= d[0]).sum()))  # the positive loses ties
    ranks = np.array(ranks, dtype=np.float64)
    out = [(space, metric, f"top{k}", float((ranks <= k).mean())) for k in TOP_K]
    return out + [(space, metric, "mean_rank", float(ranks.mean())),
                  (space, metric, "median_rank", float(np.median(ranks)))]


def _retrieval_results(space: str, metric: str, vectors: np.ndarray,
                       labels: np.ndarray) -> list[tuple[str, str, str, float]]:
    n = len(labels)
    k = min(RETRIEVAL_K, n - 1)
    block_rows = max(1, BLOCK_CELLS // n)
    average_precisions, recalls = [], []
    for start in range(0, n, block_rows):
        block = _distances(metric, vectors[start:start + block_rows], vectors)
        for offset, d in enumerate(block):
            i = start + offset
            relevant = labels == labels[i]
            relevant[i] = False
            total_relevant = int(relevant.sum())
            if total_relevant == 0:
                continue
            d[i] = np.inf  # never retrieve the query itself
            # The k nearest, ties at the cut included, then ordered by distance with relevant last.
            near = np.flatnonzero(d <= np.partition(d, k - 1)[k - 1])
            top = near[np.lexsort((relevant[near], d[near]))][:k]
            hits = relevant[top]
            precision_at = np.cumsum(hits) / np.arange(1, k + 1)
            average_precisions.append(float((precision_at * hits).sum()) / min(total_relevant, RETRIEVAL_K))
            recalls.append(hits.sum() / total_relevant)
    if not recalls:
        return []
    return [(space, metric, f"map@{RETRIEVAL_K}", float(np.mean(average_precisions))),
            (space, metric, f"recall@{RETRIEVAL_K}", float(np.mean(recalls)))]


def _store(db: Database, feature_model_id: int, model_id: int | None, inputs: dict[str, Any], notes: list[str],
           ids: np.ndarray, queries: list[Query], results: list[tuple[str, str, str, float]]) -> int:
    """Write one evaluation in one transaction, replacing an earlier one with the same inputs."""
    with db.begin() as conn:
        earlier = conn.execute(sa.select(evaluations.c.id, evaluations.c.params)
                               .where(evaluations.c.feature_model_id == feature_model_id)).all()
        same = [e.id for e in earlier if json.loads(e.params).get("inputs") == inputs]
        if same:
            conn.execute(sa.delete(evaluation_pairs).where(evaluation_pairs.c.evaluation_id.in_(same)))
            conn.execute(sa.delete(evaluation_results).where(evaluation_results.c.evaluation_id.in_(same)))
            conn.execute(sa.delete(evaluations).where(evaluations.c.id.in_(same)))
        evaluation_id = conn.execute(sa.insert(evaluations).values(
            model_id=model_id, feature_model_id=feature_model_id,
            params=json.dumps({"inputs": inputs, "notes": notes}, sort_keys=True), created_at=now(),
        ).returning(evaluations.c.id)).scalar_one()
        pairs = []
        for query, positive, negatives in queries:
            pairs.append({"evaluation_id": evaluation_id, "query_id": int(ids[query]),
                          "candidate_id": int(ids[positive]), "is_positive": True})
            pairs += [{"evaluation_id": evaluation_id, "query_id": int(ids[query]), "candidate_id": int(ids[n]),
                       "is_positive": False} for n in negatives]
        if pairs:
            conn.execute(sa.insert(evaluation_pairs), pairs)
        conn.execute(sa.insert(evaluation_results), [
            {"evaluation_id": evaluation_id, "space": space, "metric": metric, "measure": measure, "value": value}
            for space, metric, measure, value in results])
    return evaluation_id


def plot_top_k(results: list[tuple[str, str, str, float]], path: Path, *, title: str) -> None:
    """Save top-k accuracy curves, one per space and metric found in ``results``, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    values = {row[:3]: row[3] for row in results}
    for space in dict.fromkeys(row[0] for row in results):
        for metric in METRICS:
            if (space, metric, "top1") not in values:
                continue
            curve = [values[space, metric, f"top{k}"] for k in TOP_K]
            axes.plot(TOP_K, curve, marker="o", linestyle="-" if space == "embeddings" else "--",
                      label=f"{space}, {metric}")
    axes.set_xlabel("k (candidates: 1 positive + negatives)")
    axes.set_ylabel("top-k accuracy")
    axes.set_ylim(0, 1.02)
    axes.set_xticks(TOP_K)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    axes.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
