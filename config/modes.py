"""The run modes shared by run.py, model_fn and input_fn."""
TRAIN = "train"
EVAL = "eval"
PREDICT = "predict"
ALL = (TRAIN, EVAL, PREDICT)
