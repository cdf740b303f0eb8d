"""MLflow: one run per training job, and everything that reaches the store.

store      is the store there, and the experiment in it
naming     a run's name, from what it trains
record     the params and tags a run starts with
logger     the trainer's logger: buffered metrics, images, artifacts (only logs)
export     the models, for mlflow.pyfunc
outbox     delivery that outlives the server
run        `tracked_run`: a run that always ends with a status
"""
