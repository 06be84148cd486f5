-- The compose stack's databases: Flywheel's state (alias history, prediction log, feedback,
-- verdicts, runs) and source tables in `flywheel`, MLflow's tracking and registry in `mlflow`.
CREATE DATABASE mlflow OWNER flywheel;
