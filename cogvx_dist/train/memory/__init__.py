"""The memory planner: a traced training step, the per-rank peak of each strategy, and the plan applied to a run
config (pre-flight check, `cogvx plan`). Imports the step's math and the data path, never the run's machinery."""
