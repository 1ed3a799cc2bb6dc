from serve_fixtures import server  # noqa: F401  (tests/serve/ is on sys.path)
from services import mlflow_server  # noqa: F401
