"""The recipe's parts that need Lightning: the LightningModule (module), optimizers and their schedule (optim),
precision (precision), loggers (loggers) and the callbacks that measure and record a run (callbacks/)."""
