"""Scale-out on Apache Spark: the single-machine steps, run over a cluster's executors.

Each job calls the same step functions as the CLI (no forked logic) from inside
``mapInPandas`` over Arrow batches, writes Parquet, then hands the rows to the
database the single-machine steps use. ``pyspark`` is imported only here.
"""
