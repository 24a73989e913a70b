"""landscape-probe's orchestration: specs, checkpoints, workers, the job driver, the Parquet store,
metrics and the audit; the math lives in ``probe/``."""
