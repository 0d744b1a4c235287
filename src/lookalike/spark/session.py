"""The Spark session every job runs in: local by default, any cluster through ``--master``."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from ..errors import BadInput
from ..steps import SPARK_MASTER

DEFAULT_MASTER = SPARK_MASTER.default
TASK_ATTEMPTS = 4   # a task that fails is retried this often before the job fails (Spark's own default)
# Debian's libpostgresql-jdbc-java: the driver the jobs read and write PostgreSQL through.
POSTGRESQL_JAR = Path("/usr/share/java/postgresql.jar")


def with_retries(master: str) -> str:
    """``local[N]`` with task retries: in local mode Spark ignores spark.task.maxFailures and
    fails a job on the first task failure, unless the master says ``local[N,F]``."""
    match = re.fullmatch(r"local(?:\[(\*|\d+)\])?", master)
    return f"local[{match.group(1) or 1},{TASK_ATTEMPTS}]" if match else master


def spark_session(master: str = DEFAULT_MASTER, app: str = "lookalike"):
    """A SparkSession on ``master``; executors run this interpreter, so they import this lookalike."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise BadInput("Spark jobs need pyspark and Java 17: pip install 'lookalike[spark]' "
                       "and apt-get install openjdk-17-jre-headless") from None
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = (SparkSession.builder.master(with_retries(master)).appName(app)
               .config("spark.ui.enabled", "false")
               .config("spark.task.maxFailures", str(TASK_ATTEMPTS))
               .config("spark.sql.execution.arrow.pyspark.enabled", "true"))
    if POSTGRESQL_JAR.exists():
        builder = builder.config("spark.jars", str(POSTGRESQL_JAR))
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("WARN")
    return session
