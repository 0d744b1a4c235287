"""The Spark session every job runs in: local by default, any cluster through ``--master``."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from ..config import mask_secrets
from ..errors import BadInput, LookalikeError
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
               .config("spark.ui.showConsoleProgress", str(sys.stderr.isatty()).lower())   # no bars in logs
               .config("spark.sql.execution.arrow.pyspark.enabled", "true"))
    if POSTGRESQL_JAR.exists():
        builder = builder.config("spark.jars", str(POSTGRESQL_JAR))
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("WARN")
    return session


class JobFailed(LookalikeError):
    """A Spark job that failed after its task retries; the message is the executors' own error."""

    exit_code = 1


# The last "SomeError: message" line of a task's Python traceback, or of the JVM's report.
_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception|Interrupt)): (.+)$")


def job_failed(exc: BaseException) -> JobFailed | None:
    """``exc`` as one line when PySpark or Py4J raised it (a failed job), else None."""
    if not type(exc).__module__.startswith(("pyspark", "py4j")):
        return None
    found = [m for m in map(_ERROR_LINE.match, str(exc).splitlines()) if m and m.group(1) != "PythonException"]
    reason = (f"{found[-1].group(1)}: {found[-1].group(2)}" if found
              else next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__))
    return JobFailed(f"the Spark job failed: {mask_secrets(reason)[:500]}")
