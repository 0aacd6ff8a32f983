"""The engine a simulation runs on: the Ray session, its workers and their warm-up, Flower's dispatcher, clusters."""
