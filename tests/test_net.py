"""The one fetch policy (lookalike.net): size cap while reading, one deadline, SSRF guard, for every path.

Everything is served by a real HTTP server on 127.0.0.1; nothing reaches another host.
"""

from __future__ import annotations

import time

import pytest

from lookalike import ingest, net, search
from lookalike.db import Database
from lookalike.errors import LookalikeError, Unreachable
from lookalike.net import FetchError, FetchLimits, Refused, fetch_one
from lookalike.search import query_bytes, similar_images
from lookalike.web.app import ApiError, fetch_url
from support.http import LocalHTTPServer


def test_every_path_reads_through_the_one_policy():
    # Moved, not copied: the load step and the query path hold net's own functions.
    assert ingest.fetch is net.fetch and ingest.make_client is net.make_client
    assert not hasattr(search, "fetch_one")   # the query path imports net's own when a query is not by id
    assert ingest.FetchLimits is net.FetchLimits


@pytest.mark.timeout(60)
def test_the_size_cap_holds_while_the_body_is_read(http_server):
    limits = FetchLimits(max_bytes=64 * 1024, retries=0)
    with pytest.raises(FetchError, match=r"^too large: over 65536 bytes$"):
        fetch_one(http_server.url("/huge-nolength"), limits, allow_private=True)  # no length declared
    with pytest.raises(FetchError, match=r"^too large: \d+ bytes declared, limit 65536$"):
        fetch_one(http_server.url("/huge"), limits, allow_private=True)


@pytest.mark.timeout(60)
def test_one_deadline_for_the_whole_request(http_server):
    limits = FetchLimits(timeout=1.5, deadline=2.0, retries=3, backoff=0.05)
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"^too slow: not finished in 2 s$"):
        fetch_one(http_server.url("/trickle"), limits, allow_private=True)  # a byte at a time, never a timeout
    assert time.monotonic() - started < 2.0 + 10  # a hang bound, not a speed check


@pytest.mark.timeout(60)
def test_private_addresses_are_refused_unless_allowed(http_server, sample_images):
    url = http_server.url("/img/a.jpg")
    with pytest.raises(Refused, match=r"^refused: 127\.0\.0\.1 is a loopback address"):
        fetch_one(url, FetchLimits(retries=0), allow_private=False)
    assert http_server.hits["/img/a.jpg"] == 0  # refused before any request
    assert fetch_one(url, FetchLimits(retries=0), allow_private=True) == sample_images["a.jpg"]


@pytest.mark.timeout(60)
def test_a_server_path_never_reads_local_files(tmp_path):
    local = tmp_path / "a.jpg"
    local.write_bytes(b"not for callers")
    for source in (str(local), f"file://{local}", "ftp://127.0.0.1/a.jpg"):
        with pytest.raises(Refused, match=r"^only http:// and https:// URLs can be fetched$"):
            fetch_one(source, FetchLimits(), allow_private=True, local_files=False)
    assert fetch_one(str(local), FetchLimits(), allow_private=False) == b"not for callers"  # the CLI's own files


@pytest.mark.timeout(60)
def test_query_paths_refuse_loopback_before_loading_anything(tmp_path, http_server):
    url = http_server.url("/img/a.jpg")
    with Database(f"sqlite:///{tmp_path}/q.db", tmp_path / "store") as db:
        # An empty database: the refusal comes from the fetch, before the search looks for vectors.
        with pytest.raises(Refused, match="^cannot read query image: refused: "):
            similar_images(db, url, allow_private=False)
    with pytest.raises(Refused, match="^cannot read query image: refused: "):
        query_bytes(url, FetchLimits(), allow_private=False)
    with pytest.raises(ApiError) as info:
        fetch_url(url, FetchLimits())  # the web app's path: private refused by default
    assert info.value.status == 400
    assert sum(http_server.hits.values()) == 0


@pytest.mark.timeout(60)
def test_fetch_errors_carry_one_mapping_for_every_front_end(http_server):
    with pytest.raises(FetchError) as missing:
        fetch_one(http_server.url("/nothing-here"), FetchLimits(retries=0), allow_private=True)
    assert str(missing.value) == "HTTP 404"
    assert isinstance(missing.value, Unreachable) and isinstance(missing.value, LookalikeError)
    assert (missing.value.exit_code, missing.value.http_status, missing.value.sqlstate) == (2, 502, "22023")
    refused = Refused("refused: x")
    assert (refused.exit_code, refused.http_status, refused.sqlstate) == (2, 400, "22023")


@pytest.mark.timeout(60)
def test_a_dead_port_is_unreachable_not_a_crash():
    with LocalHTTPServer() as server:
        url = server.url("/img/a.jpg")
    with pytest.raises(FetchError, match=r"^unreachable: ConnectError \(after 1 attempt\)$"):
        fetch_one(url, FetchLimits(retries=0), allow_private=True)
