"""The registered pyfunc's model-from-code file: MLflow runs it to build the model when loading it, so
no pickled Python object is stored in the registry (see `scoring.pyfunc`)."""

from mlflow.models import set_model

from scoring.pyfunc import ScreeningModel

set_model(ScreeningModel())
