"""Spark as the feature engine: the same feature definition, compiled to Spark SQL, gives DuckDB's
values for every feature of every row: on the committed SBA sample (vocabularies learnt on the
training slice, categories, buckets, ratios, flags) and on rows made to hit every edge (nulls,
division by zero, values on bucket edges, numbers as categories, quotes and backslashes in text,
prefixes). Once in local mode, once on a real standalone cluster (a master and a worker started
from pyspark's own launcher on 127.0.0.1). Spark needs Java 17, which the machine has.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flywheel.config import (
    BucketFeature,
    CategoryFeature,
    FlagFeature,
    NumericFeature,
    RatioFeature,
    SparkConfig,
)
from flywheel.data import features as feats
from flywheel.data import spark as spark_engine
from flywheel.lifecycle.features import extract_training_window, prepare_features
from flywheel.serving.process import free_port
from tests.conftest import example_config

pytestmark = [pytest.mark.xdist_group("spark"), pytest.mark.slow]
LOCAL = SparkConfig(master="local[2]", conf={"spark.sql.shuffle.partitions": "4"})


def sba_features():
    from pydantic import TypeAdapter

    return TypeAdapter(list[feats.Feature]).validate_python(example_config()["features"])


def both(features, frame: pd.DataFrame, train: np.ndarray, cfg: SparkConfig = LOCAL):
    duck = feats.fit_spec(features, frame.iloc[train])
    spark_spec, spark_X = spark_engine.fit_and_build(cfg, features, frame, train)
    return duck, feats.build_matrix(duck, frame), spark_spec, spark_X


def assert_same(duck, duck_X, spark_spec, spark_X):
    assert spark_spec.vocabularies == duck.vocabularies
    assert spark_spec.input_types == duck.input_types
    assert sorted(spark_spec.nullable_inputs) == sorted(duck.nullable_inputs)
    assert spark_X.shape == duck_X.shape
    differ = ~((spark_X == duck_X) | (np.isnan(spark_X) & np.isnan(duck_X)))
    rows, cols = np.nonzero(differ)
    first = [(int(r), duck.names[c], duck_X[r, c], spark_X[r, c])
             for r, c in zip(rows[:10], cols[:10], strict=True)]
    assert len(rows) == 0, first


def test_every_feature_of_every_sba_row_equals_duckdb(sba_sample):
    frame = sba_sample.sort_values("approval_date").reset_index(drop=True)
    train = np.arange(int(len(frame) * 0.7))  # the earliest 70%: vocabularies from these only
    features = sba_features()
    duck, duck_X, spark_spec, spark_X = both(features, frame[feats.input_columns(features)], train)
    assert any(duck.vocabularies.values())
    assert_same(duck, duck_X, spark_spec, spark_X)


HOSTILE = "a`) AS x, java_method('java.lang.System', 'exit', 1) --"
EDGE_FEATURES = [
    NumericFeature(name="amount", kind="numeric", column="amount"),
    RatioFeature(name="share", kind="ratio", numerator="part", denominator="amount"),
    FlagFeature(name="is_it", kind="flag", column="text", op="==", value="it's"),
    FlagFeature(name="listed", kind="flag", column="text", op="in", value=["a\\b", "c"]),
    FlagFeature(name="bigger", kind="flag", column="part", op=">", other="amount"),
    FlagFeature(name="over", kind="flag", column="amount", op=">=", value=0.1),
    BucketFeature(name="size", kind="bucket", column="amount", edges=[0.1, 10, 1e6]),
    CategoryFeature(name="code", kind="category", column="code", min_count=1),
    CategoryFeature(name="text_cat", kind="category", column="text", min_count=1, prefix=2),
    # a column name is data, never SQL: an unescaped backtick once let a name run java_method
    NumericFeature(name="quoted", kind="numeric", column=HOSTILE),
]


def edge_rows() -> pd.DataFrame:
    return pd.DataFrame({
        "amount": [0.0, 0.1, 10.0, 1e6, None, -3.5, 0.1 + 1e-17, 2.5, float("nan"), 7.0],
        "part": [1.0, 0.05, None, 5e5, 2.0, 3.5, 0.0, 2.5, 1.0, 8.0],
        "text": ["it's", "a\\b", "c", None, "é-accent", "it's", "ab", "a\\b", "c", "x'y"],
        "code": [1.0, 2.0, 1.0, None, 3.5, 2.0, 1.0, 12.0, 3.5, 1.0],
        HOSTILE: [1.0, None, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0],
    })


def test_edge_rows_equal_duckdb_on_spark():
    frame = edge_rows()
    duck, duck_X, spark_spec, spark_X = both(EDGE_FEATURES, frame, np.arange(len(frame)))
    assert duck.vocabularies["code"][0] == "1"  # 1.0 is the category "1", the most frequent
    assert_same(duck, duck_X, spark_spec, spark_X)


def test_a_project_with_engine_spark_extracts_over_jdbc_and_trains(loaded_project, postgres_url,
                                                                   monkeypatch):
    """The source on PostgreSQL: Spark reads the window over JDBC; the snapshot is the one the
    default path makes from a SQLite copy of the same rows (same content hash), and so are the
    features."""
    project = loaded_project({"data": {"engine": "spark", "spark": {"master": "local[2]"}},
                              "stores": {"source": postgres_url},
                              "model": {"params": {"num_boost_round": 10}}})
    twin = loaded_project({"model": {"params": {"num_boost_round": 10}}}, name="duck")
    seen: list[str] = []
    original = spark_engine.read_jdbc
    monkeypatch.setattr(spark_engine, "read_jdbc", lambda *a: seen.append(a[2]) or original(*a))
    snapshot = extract_training_window(project)
    assert len(seen) == 1 and ">= '1994-10-01'" in seen[0]  # the window's bounds went to the database
    duck_snapshot = extract_training_window(twin)
    assert snapshot.rows == duck_snapshot.rows > 1000
    assert snapshot.content_hash == duck_snapshot.content_hash
    on_spark = prepare_features(project, snapshot)
    on_duck = prepare_features(twin, duck_snapshot)
    assert on_spark.spec.vocabularies == on_duck.spec.vocabularies
    assert np.array_equal(on_spark.X, on_duck.X, equal_nan=True)


def test_jdbc_reads_in_slices_give_the_databases_own_rows(postgres_url):
    """An integer id splits the read into parallel slices; types come back as pandas reads them."""
    import sqlalchemy as sa

    rng = np.random.default_rng(0)
    n = 2_000
    frame = pd.DataFrame({
        "id": np.arange(10, 10 + n), "amount": rng.normal(size=n).round(6),
        "count": pd.array([None if i % 7 == 0 else i for i in range(n)], dtype="Int64"),
        "kind": [None if i % 11 == 0 else f"k{i % 5} 'q' \\" for i in range(n)],
        "day": pd.date_range("2001-01-01", periods=n, freq="D").date,
        "at": pd.date_range("2001-01-01 03:04:05", periods=n, freq="h"),
    })
    engine = sa.create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    frame.to_sql("events", engine, index=False,
                 dtype={"amount": sa.Numeric(12, 6), "count": sa.Integer(), "day": sa.Date()})
    sql = "SELECT id, amount, count, kind, day, at FROM events WHERE day >= '2002-01-01'"
    with engine.connect() as conn:
        expected = pd.read_sql(sql + " ORDER BY id", conn)
    engine.dispose()
    cfg = LOCAL.model_copy(update={"jdbc_partitions": 3})
    bounds = (int(expected.id.min()), int(expected.id.max()))
    got = spark_engine.read_jdbc(cfg, postgres_url, sql, "id", bounds)
    got = got.sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected)


def _wait_port(port: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture
def standalone_cluster(tmp_path):
    """A Spark standalone master and one worker (2 cores), from pyspark's own bin/spark-class."""
    import pyspark

    spark_class = Path(pyspark.__file__).parent / "bin" / "spark-class"
    master_port, ui, worker_ui = free_port(), free_port(), free_port()
    env = {**os.environ, "SPARK_HOME": str(spark_class.parent.parent), "SPARK_LOCAL_IP": "127.0.0.1",
           "SPARK_LOG_DIR": str(tmp_path), "SPARK_WORKER_DIR": str(tmp_path / "work"),
           "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false"}  # no fixed port 6066
    logs = [open(tmp_path / "master.log", "w"), open(tmp_path / "worker.log", "w")]  # noqa: SIM115
    master = subprocess.Popen([str(spark_class), "org.apache.spark.deploy.master.Master",
                               "--host", "127.0.0.1", "--port", str(master_port), "--webui-port", str(ui)],
                              env=env, stdout=logs[0], stderr=subprocess.STDOUT)
    procs = [master]
    try:
        _wait_port(master_port)
        url = f"spark://127.0.0.1:{master_port}"
        procs.append(subprocess.Popen([str(spark_class), "org.apache.spark.deploy.worker.Worker", url,
                                       "--host", "127.0.0.1", "--cores", "2", "--memory", "2g",
                                       "--webui-port", str(worker_ui)], env=env,
                                      stdout=logs[1], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 90
        while "Registering worker" not in (tmp_path / "master.log").read_text():
            assert time.monotonic() < deadline, (tmp_path / "master.log").read_text()[-3000:]
            time.sleep(0.5)
        yield url
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(30)
        for log in logs:
            log.close()


def test_the_features_run_on_a_standalone_cluster_with_the_same_values(standalone_cluster, sba_sample):
    frame = sba_sample.sort_values("approval_date").reset_index(drop=True).head(5000)
    train = np.arange(3500)
    features = sba_features()
    cfg = SparkConfig(master=standalone_cluster, conf={"spark.sql.shuffle.partitions": "4",
                                                       "spark.executor.memory": "1g"})
    duck, duck_X, spark_spec, spark_X = both(features, frame[feats.input_columns(features)], train, cfg)
    assert spark_engine.session(cfg).sparkContext.master == standalone_cluster
    assert_same(duck, duck_X, spark_spec, spark_X)
    spark_engine.session(cfg).stop()
