"""Apache Spark as the feature engine (`data.engine: spark`): the same declarative features,
compiled to Spark SQL (`features.to_sql(..., dialect="spark")`), their vocabularies learnt on
Spark, computed on a local Spark or a cluster (`data.spark.master`: local[N], spark://HOST:PORT,
or what Databricks or EMR give). The values are DuckDB's, row for row (the parity tests compare
every feature of every row).

pyspark is an optional extra (`mlflywheel[spark]`), imported here only, and only when a project
asks for Spark.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flywheel.config import SparkConfig
from flywheel.core.extras import require
from flywheel.data.features import (
    CategoryFeature,
    Feature,
    FeatureSpec,
    InputType,
    category_raw_sql,
    input_columns,
    quote_identifier,
    to_sql,
)

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame, SparkSession

ROW = "__flywheel_row__"
TRAIN = "__flywheel_train__"
# Debian's libpostgresql-jdbc-java; elsewhere name the driver in data.spark.jars.
DEBIAN_POSTGRES_JDBC = Path("/usr/share/java/postgresql.jar")


def session(cfg: SparkConfig) -> SparkSession:
    """The Spark session of `cfg` (one per process: Spark's own rule), created on first use."""
    require("spark", "data.engine: spark")
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None and active.sparkContext.master != cfg.master:
        active.stop()  # another master was asked for: a session serves one cluster
    builder = SparkSession.builder.master(cfg.master).appName(cfg.app_name)
    jars = list(cfg.jars) or ([str(DEBIAN_POSTGRES_JDBC)] if DEBIAN_POSTGRES_JDBC.is_file() else [])
    if jars:
        builder = builder.config("spark.jars", ",".join(jars))
    # spark.driver.maxResultSize: the matrix comes back to this process by design (9M rows of
    # the SBA features are 0.55 GiB as float32); Spark's 1 GiB default would refuse a larger
    # window that this machine can hold. Set it in `conf` to have Spark refuse earlier.
    settings = {"spark.sql.session.timeZone": "UTC", "spark.ui.enabled": "false",
                "spark.driver.maxResultSize": "0",
                "spark.sql.execution.arrow.pyspark.enabled": "true", **cfg.conf}
    for key, value in settings.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def to_spark(spark: SparkSession, frame: pd.DataFrame, train: np.ndarray | None = None) -> DataFrame:
    """`frame` as a Spark DataFrame with its row order in a column, and which rows are the
    training slice's when `train` (their positions) is given. NaN is read as null, as DuckDB
    reads a pandas frame."""
    import pyarrow as pa

    table = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
    table = table.append_column(ROW, pa.array(np.arange(len(frame), dtype=np.int64)))
    if train is not None:
        flags = np.zeros(len(frame), dtype=bool)
        flags[np.asarray(train)] = True
        table = table.append_column(TRAIN, pa.array(flags))
    return spark.createDataFrame(table)


def jdbc_source(url: str) -> tuple[str, dict[str, str]]:
    """A SQLAlchemy PostgreSQL URL as Spark's JDBC URL and connection properties (the password
    goes in the properties, never in the URL Spark prints)."""
    import sqlalchemy as sa

    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"Spark reads a PostgreSQL source over JDBC; {parsed.get_backend_name()} is read "
                         "by the driver")
    query = "&".join(f"{k}={v}" for k, v in parsed.query.items() if isinstance(v, str))
    jdbc = f"jdbc:postgresql://{parsed.host or 'localhost'}:{parsed.port or 5432}/{parsed.database or ''}"
    props = {"driver": "org.postgresql.Driver", "user": parsed.username or ""}
    if parsed.password:
        props["password"] = str(parsed.password)
    return (f"{jdbc}?{query}" if query else jdbc), props


def read_jdbc(cfg: SparkConfig, url: str, sql: str, split_on: str | None,
              bounds: tuple[int, int] | None) -> pd.DataFrame:
    """The rows of `sql` read by Spark over JDBC, in `cfg.jdbc_partitions` parallel slices of the
    integer column `split_on` between `bounds` (one read without them); back on the driver as a
    frame with NUMERIC columns as floats, as the SQLAlchemy path reads them."""
    from pyspark.sql.types import DecimalType

    spark = session(cfg)
    jdbc, props = jdbc_source(url)
    reader = (spark.read.format("jdbc").option("url", jdbc)
              .option("dbtable", f"({sql}) AS flywheel_window")
              .option("preferTimestampNTZ", "true"))  # a TIMESTAMP without zone stays one
    for key, value in props.items():
        reader = reader.option(key, value)
    if split_on and bounds and cfg.jdbc_partitions > 1 and bounds[1] > bounds[0]:
        reader = (reader.option("partitionColumn", split_on).option("lowerBound", str(bounds[0]))
                  .option("upperBound", str(bounds[1] + 1))
                  .option("numPartitions", str(cfg.jdbc_partitions)))
    df = reader.load()
    for f in df.schema.fields:
        if isinstance(f.dataType, DecimalType):
            df = df.withColumn(f.name, df[f.name].cast("double"))
    frame = df.toArrow().to_pandas(date_as_object=True)
    for name in frame.columns:  # the dtypes pandas gives reading from the database itself
        dtype = frame[name].dtype
        if isinstance(dtype, np.dtype) and dtype.kind == "M":
            frame[name] = frame[name].astype("datetime64[ns]")
        elif isinstance(dtype, np.dtype) and dtype.kind == "i" and dtype.itemsize < 8:
            frame[name] = frame[name].astype(np.int64)
    return frame


def input_types(df: DataFrame, columns: list[str]) -> dict[str, InputType]:
    from pyspark.sql.types import BooleanType, NumericType

    fields = {f.name: f.dataType for f in df.schema.fields}
    return {c: "number" if isinstance(fields[c], NumericType | BooleanType) else "string" for c in columns}


def _q(name: str) -> str:
    return quote_identifier(name, "spark")


def fit_spec(features: list[Feature], df: DataFrame) -> FeatureSpec:
    """`features.fit_spec` on Spark: vocabularies (most frequent first, ties by text) and input
    types from the training rows in `df`."""
    spark = df.sparkSession
    types = input_types(df, input_columns(features))
    df.createOrReplaceTempView("flywheel_fit_rows")
    vocabularies = {}
    for f in features:
        if isinstance(f, CategoryFeature):
            raw = category_raw_sql(f, types[f.column], "spark")
            found = spark.sql(
                f"SELECT {raw} AS v, count(*) AS n FROM flywheel_fit_rows WHERE {raw} IS NOT NULL "
                f"GROUP BY {raw} HAVING count(*) >= {f.min_count} ORDER BY n DESC, v "
                f"LIMIT {f.max_categories}").collect()
            vocabularies[f.name] = [str(r["v"]) for r in found]
    counts = df.selectExpr(*[f"count_if({_q(c)} IS NULL) AS {_q(c)}" for c in types]).first()
    nullable = [c for c in types if counts is not None and counts[c] > 0]
    return FeatureSpec(features=list(features), vocabularies=vocabularies, input_types=types,
                       nullable_inputs=nullable)


def build_matrix(spec: FeatureSpec, df: DataFrame) -> np.ndarray:
    """Every feature of every row of `df` as a float32 matrix, in the rows' order, computed on Spark."""
    df.createOrReplaceTempView("flywheel_rows")
    query = to_sql(spec, "flywheel_rows", passthrough=[ROW], dialect="spark") + f" ORDER BY {_q(ROW)}"
    # float32 on Spark (the same rounding as numpy's): half the bytes to bring back to this
    # process, which the whole matrix must reach (training runs here).
    ordered = df.sparkSession.sql(query)
    table = ordered.selectExpr(*[f"CAST({_q(f.name)} AS FLOAT) AS {_q(f.name)}"
                                 for f in spec.features]).toArrow()
    if table.num_rows == 0:
        return np.zeros((0, len(spec.features)), dtype=np.float32)
    columns = [table.column(f.name).to_numpy(zero_copy_only=False) for f in spec.features]
    return np.column_stack([np.asarray(c, dtype=np.float32) for c in columns])


def fit_and_build(cfg: SparkConfig, features: list[Feature], frame: pd.DataFrame,
                  train_rows: np.ndarray) -> tuple[FeatureSpec, np.ndarray]:
    """The spec learnt on the rows at positions `train_rows` of `frame` (the training slice:
    vocabularies never see the validation or holdout rows) and the matrix of all of it, on Spark."""
    spark = session(cfg)
    df = to_spark(spark, frame, train_rows).cache()
    try:
        spec = fit_spec(features, df.where(df[TRAIN]))
        return spec, build_matrix(spec, df)
    finally:
        df.unpersist()
