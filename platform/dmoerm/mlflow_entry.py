"""MLflow models-from-code entry point: logged as the model's code, so nothing is pickled."""

import mlflow

from dmoerm.mlflow_model import DMoERMPyfunc

mlflow.models.set_model(DMoERMPyfunc())
