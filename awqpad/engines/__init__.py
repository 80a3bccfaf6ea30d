"""Stage 3, engines: what each inference engine accepts, as data citing the engine source it mirrors (TP
rules per engine, the head_dim support table), and the one evaluator of those rules against a checkpoint."""
