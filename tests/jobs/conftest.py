from services import mlflow_server  # noqa: F401  (tests/ is on sys.path)
