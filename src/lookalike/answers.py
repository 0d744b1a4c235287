"""What a search answers, apart from where it searched: ranked :class:`Match` rows, and which space ``auto`` means.

Kept free of the database driver, like :mod:`lookalike.index_files`: the CLI, the web app and the
PL/Python routines answer through :mod:`lookalike.search`, and a query by id on a current index
folder through :mod:`lookalike.quick` (the CLI on SQLite, a PL/Python backend), with the same two
functions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

AUTO = "auto"
DEFAULT_KEY = "default_space"            # settings row: the space evaluate found best, and its evidence
BUILT_IN = ("embeddings", "scores")      # spaces with nothing to fit: the raw vectors, the classifier's scores
# Similarities equal to this many places tie and are listed by image id: float noise must not order them. In
# the scores space, class probabilities that agree to the printed 4 places are the classifier equally sure.
TIE_DECIMALS = {"scores": 4}   # per space; others: TIE_DECIMALS_DEFAULT
TIE_DECIMALS_DEFAULT = 6


@dataclass(frozen=True)
class Match:
    rank: int
    image_id: int
    label: str | None
    distance: float
    similarity: float
    source: str
    space: str = "embeddings"   # the space that answered

    def as_dict(self) -> dict:
        return asdict(self)


def ranked(found_ids, distances, rows: dict[int, tuple[str | None, str]], space: str) -> list[Match]:
    """The found images as matches, best first: by similarity as printed, ties by image id.
    ``rows``: (label, source) of each found id."""
    decimals = TIE_DECIMALS.get(space, TIE_DECIMALS_DEFAULT)
    ordered = sorted(zip(list(map(int, found_ids)), list(map(float, distances))),
                     key=lambda pair: (-round(1.0 - pair[1], decimals), pair[0]))   # similarity, as printed
    out = []
    for rank, (image_id, distance) in enumerate(ordered, start=1):
        label, source = rows.get(image_id, (None, ""))
        out.append(Match(rank, image_id, label, distance, 1.0 - distance, source, space))
    return out


def auto_space(recorded: dict | None, feature_model_id: int, fitted: set[str]) -> str:
    """What ``auto`` means: the space the latest evaluation recorded as best on these embeddings (``recorded``,
    the settings row) while it is still there, else ``pca`` where fitted (label-free), else the raw
    ``embeddings``. ``fitted``: the names of the spaces fitted on this feature model."""
    if recorded is not None and recorded.get("feature_model_id") == feature_model_id and (
            recorded["space"] in BUILT_IN or recorded["space"] in fitted):
        return recorded["space"]
    return "pca" if "pca" in fitted else "embeddings"
